"""Exact-opset export with both exporters, parity with PyTorch, metadata, the down-converter
and the export command's failure paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from stn_deploy.cli import cli
from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError
from stn_deploy.export.downconvert import downconvert
from stn_deploy.artifacts import config_from_onnx, read_metadata
from stn_deploy.export.onnx_export import OnnxOptions, export_onnx, max_opset
from stn_deploy.model import STNClassifier, build_model

ort = pytest.importorskip("onnxruntime")


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})


def _opset(path: Path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def _parity(model: STNClassifier, path: Path, batches: tuple[int, ...] = (1, 3, 8)) -> None:
    torch.manual_seed(1)
    for b in batches:
        x = torch.randn(b, *model.config.input_shape)
        with torch.no_grad():
            ref, theta = model.forward_with_theta(x)
        out = _run(path, x.numpy())
        np.testing.assert_allclose(out[0], ref.numpy(), atol=1e-4, rtol=1e-4)
        if len(out) > 1:
            np.testing.assert_allclose(out[1], theta.numpy(), atol=1e-5)


@pytest.mark.parametrize("opset", [16, 17, 18, 19, 20])
def test_torchscript_exact_opset_and_parity(random_model: STNClassifier, tmp_path: Path,
                                            opset: int) -> None:
    path = export_onnx(random_model, tmp_path / "m.onnx",
                       OnnxOptions(opset=opset, exporter="torchscript", with_theta=True))
    assert _opset(path) == opset
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "GridSample" in ops and "AffineGrid" not in ops and "MatMul" in ops
    _parity(random_model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no external data


def test_dynamo_at_16_is_converted_down(random_model: STNClassifier, tmp_path: Path) -> None:
    path = export_onnx(random_model, tmp_path / "d.onnx", OnnxOptions(opset=16, exporter="dynamo"))
    assert _opset(path) == 16
    proto = onnx.load(str(path))
    reduce = [n for n in proto.graph.node if n.op_type.startswith("Reduce")]
    assert reduce and all(len(n.input) == 1 for n in reduce)  # axes became an attribute
    assert read_metadata(path)["exporter"] == "dynamo"
    _parity(random_model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("opset", [17, 18, 19, 20])
def test_dynamo_exact_opset(random_model: STNClassifier, tmp_path: Path, opset: int) -> None:
    path = export_onnx(random_model, tmp_path / "d.onnx",
                       OnnxOptions(opset=opset, exporter="dynamo", with_theta=True))
    assert _opset(path) == opset
    _parity(random_model, path)


@pytest.mark.parametrize("align_corners", [False, True])
def test_align_corners_both_ways(tmp_path: Path, align_corners: bool) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(align_corners=align_corners)).eval()
    with torch.no_grad():
        model.stn.regressor[2].weight.normal_(0, 0.05)  # type: ignore[union-attr]
    path = export_onnx(model, tmp_path / "m.onnx", OnnxOptions(opset=17, with_theta=True))
    grid = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "GridSample")
    assert helper.get_attribute_value(next(a for a in grid.attribute
                                           if a.name == "align_corners")) == int(align_corners)
    _parity(model, path, (1, 5))


def test_affine_grid_op_at_20(random_model: STNClassifier, tmp_path: Path) -> None:
    path = export_onnx(random_model, tmp_path / "a.onnx",
                       OnnxOptions(opset=20, affine_grid_op=True, exporter="torchscript"))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "AffineGrid" in ops and "MatMul" not in ops
    _parity(random_model, path, (1, 3))
    with pytest.raises(StnDeployError, match="AffineGrid op exists from opset 20"):
        export_onnx(random_model, tmp_path / "b.onnx", OnnxOptions(opset=19, affine_grid_op=True))
    assert not (tmp_path / "b.onnx").exists()


def test_embed_preprocess_and_static_batch(random_model: STNClassifier, tmp_path: Path) -> None:
    from stn_deploy.data import normalize

    path = export_onnx(random_model, tmp_path / "e.onnx",
                       OnnxOptions(opset=17, static_batch=4, embed_preprocess=True))
    inp = onnx.load(str(path)).graph.input[0]
    assert inp.type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [4, 32, 32, 3]
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = _run(path, images.permute(0, 2, 3, 1).contiguous().numpy())[0]
    with torch.no_grad():
        ref = random_model(normalize(images, random_model.config)).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_metadata_round_trip(random_model: STNClassifier, tmp_path: Path) -> None:
    path = export_onnx(random_model, tmp_path / "m.onnx", OnnxOptions(opset=18),
                       {"source_sha256": "ab" * 32})
    assert config_from_onnx(path) == random_model.config
    meta = read_metadata(path)
    assert meta["opset"] == "18" and meta["source_sha256"] == "ab" * 32
    assert meta["mean"].split(",")[0] == repr(random_model.config.mean[0])
    assert meta["stn_deploy.version"] and meta["input_layout"] == "NCHW"


@pytest.mark.parametrize("opset", [15, max_opset() + 1])
def test_unsupported_opset_fails(random_model: STNClassifier, tmp_path: Path, opset: int) -> None:
    with pytest.raises(StnDeployError, match=f"opset {opset} is not supported"):
        export_onnx(random_model, tmp_path / "m.onnx", OnnxOptions(opset=opset))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- downconvert, hand-made

def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], opset: int,
           inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name: str, shape: list[int], t: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, t, shape)


def test_downconvert_reduce_axes_input_to_attribute() -> None:
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
    m = _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1)], [axes], 18,
               [_vi("x", [2, 3, 4, 5])], [_vi("y", [2, 3, 1, 1])])
    low = downconvert(m, 16)
    onnx.checker.check_model(low, full_check=True)
    node = low.graph.node[0]
    assert list(node.input) == ["x"] and list(helper.get_attribute_value(node.attribute[-1])) == [2, 3]
    assert not low.graph.initializer  # the axes constant is gone
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    got = ort.InferenceSession(low.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x.mean(axis=(2, 3), keepdims=True), rtol=1e-6)


def test_downconvert_pad_and_refusals() -> None:
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads")
    m = _model([helper.make_node("Pad", ["x", "pads"], ["y"])], [pads], 18,
               [_vi("x", [1, 1, 2, 2])], [_vi("y", [1, 1, 4, 4])])
    onnx.checker.check_model(downconvert(m, 17), full_check=True)
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
    pads4 = numpy_helper.from_array(np.array([1, 1, 1, 1], dtype=np.int64), "pads")
    m = _model([helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"])], [pads4, axes], 18,
               [_vi("x", [1, 1, 2, 2])], [_vi("y", [1, 1, 4, 4])])
    with pytest.raises(StnDeployError, match="Pad .* axes input"):
        downconvert(m, 17)
    m = _model([helper.make_node("Mish", ["x"], ["y"])], [], 18, [_vi("x", [2])], [_vi("y", [2])])
    with pytest.raises(StnDeployError, match="Mish does not exist before opset 18"):
        downconvert(m, 17)


def test_downconvert_gridsample_20_to_19_renames_mode() -> None:
    m = _model([helper.make_node("GridSample", ["x", "g"], ["y"], mode="linear")], [], 20,
               [_vi("x", [1, 1, 4, 4]), _vi("g", [1, 4, 4, 2])], [_vi("y", [1, 1, 4, 4])])
    low = downconvert(m, 19)
    assert helper.get_attribute_value(low.graph.node[0].attribute[0]) == b"bilinear"
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 1, 4, 4)).astype(np.float32),
             "g": rng.uniform(-1, 1, (1, 4, 4, 2)).astype(np.float32)}
    runs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
            .run(None, feeds)[0] for p in (m, low)]
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6)


# ------------------------------------------------------------------------------ the CLI

def test_export_help() -> None:
    for cmd in ("export", "inspect"):
        r = CliRunner().invoke(cli, [cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output


def test_cli_export_verifies_and_writes(digits_checkpoint: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "d.onnx"
    r = CliRunner().invoke(cli, ["export", str(digits_checkpoint), "--opset", "16", "--out",
                                 str(out), "--with-theta", "--verify-samples", "100"])
    assert r.exit_code == 0, r.output
    assert "PASSED  top-1 agreement 100.00%" in r.output and "FAILED" not in r.output
    assert _opset(out) == 16
    meta = read_metadata(out)
    report = json.loads(meta["verification"])
    assert report["passed"] and report["samples"] == 100 and report["theta_max_abs"] < 1e-5
    assert meta["precision"] == "fp32" and len(meta["source_sha256"]) == 64


def test_rgb_model_without_its_data_is_verified_on_digits_as_rgb(tiny_folder_checkpoint: Path,
                                                                 tmp_path: Path) -> None:
    """A model trained on colour photos the user does not have (the shipped CIFAR-10 one)
    still exports verified: parity with PyTorch on the embedded digits as RGB, said so. INT8
    would calibrate colour photos' scales on grey digits: refused, nothing written."""
    import json

    out = tmp_path / "rgb.onnx"
    r = CliRunner().invoke(cli, ["export", str(tiny_folder_checkpoint), "--out", str(out),
                                 "--verify-samples", "64"])
    assert r.exit_code == 0, r.output
    assert "on the embedded digits test split as RGB (model data not given: parity" in r.output
    report = json.loads(read_metadata(out)["verification"])
    assert report["passed"] and report["samples"] == 64 and report["agreement"] == 1.0
    assert report["accuracy_ref"] is None  # digits' labels are not the model's classes

    r = CliRunner().invoke(cli, ["export", str(tiny_folder_checkpoint), "--precision", "int8",
                                 "--out", str(tmp_path / "int8.onnx")])
    assert r.exit_code == 1
    assert "Error: INT8 calibration needs real imagefolder images: pass --data-dir" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rgb.onnx"]


def test_cli_failed_verification_writes_nothing(digits_checkpoint: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from stn_deploy.export import verify

    strict = verify.Tolerances(atol=0.0, rtol=0.0, min_agreement=1.0, theta_px=0.0)
    monkeypatch.setitem(verify.TOLERANCES, "fp32", strict)
    out = tmp_path / "x.onnx"
    r = CliRunner().invoke(cli, ["export", str(digits_checkpoint), "--out", str(out),
                                 "--verify-samples", "32"])
    assert r.exit_code == 1 and "verification failed, nothing written" in r.output
    assert "FAILED  logits" in r.output
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_inputs(digits_checkpoint: Path, tmp_path: Path) -> None:
    """Bad files exit 1, refused options exit 2 (a usage error); each one line, no file."""
    runner = CliRunner()
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(digits_checkpoint.read_bytes()[:5000])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        ([str(text)], 1, "not a readable stn-deploy checkpoint"),
        ([str(truncated)], 1, "not a readable stn-deploy checkpoint"),
        ([str(digits_checkpoint), "--opset", "15"], 1, "opset 15 is not supported"),
        ([str(digits_checkpoint), "--out", str(blocker / "m.onnx")], 1, "cannot write"),
        ([str(digits_checkpoint), "--target", "tensorrt", "--opset", "20"], 2, "--opset 19"),
    ]
    for args, code, message in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "o" / "m.onnx")]
        r = runner.invoke(cli, ["export", *args, *out, "--verify-samples", "16"])
        assert r.exit_code == code, (args, r.output)
        errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_library_request_spells_options_as_before(digits_checkpoint: Path,
                                                  tmp_path: Path) -> None:
    """ExportRequest(checkpoint=...) straight to run_export, as triton-repo and the benchmarks
    call it: the old spellings (format "engine", target "tensorrt") read as trt."""
    from stn_deploy.export.pipeline import ExportRequest, run_export

    req = ExportRequest(checkpoint=digits_checkpoint, format="engine", target="TensorRT",
                        verify_samples="all")
    assert (req.format, req.target, req.verify_samples) == ("trt", "trt", None)
    lines: list[str] = []
    res = run_export(ExportRequest(checkpoint=str(digits_checkpoint), out=tmp_path / "m.onnx",
                                   verify_samples=16, embed_preprocess=True),
                     echo=lines.append)
    assert res.path == tmp_path / "m.onnx" and res.report is not None
    assert res.report.samples == 16 and lines[-1] == f"wrote {res.path}"


def test_cli_engine_without_tensorrt_writes_nothing(digits_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("tensorrt and a GPU are present: the missing-dependency path cannot run")
    r = CliRunner().invoke(cli, ["export", str(digits_checkpoint), "--format", "engine",
                                 "--out", str(tmp_path / "m.plan")])
    assert r.exit_code == 1
    assert ("tensorrt is not available" in r.output and "pip install" in r.output) or \
        "no CUDA device" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_leaky_stn_exports_at_16_with_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(loc_act="leaky")).eval()
    with torch.no_grad():
        assert model.stn is not None
        model.stn.regressor[2].weight.normal_(0, 0.01)
    path = export_onnx(model, tmp_path / "leaky.onnx", OnnxOptions(opset=16, with_theta=True))
    assert _opset(path) == 16
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "LeakyRelu" in ops and "GridSample" in ops
    assert config_from_onnx(path).loc_act == "leaky"
    _parity(model, path)


def test_two_pass_stn_exports_at_16_with_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(stn_passes=2)).eval()
    with torch.no_grad():
        assert model.stn is not None
        model.stn.regressor[2].weight.normal_(0, 0.01)
        model.stn.regressor[2].bias.add_(torch.tensor([-0.1, 0.05, 0.02, 0.03, -0.08, -0.04]))
    path = export_onnx(model, tmp_path / "two.onnx", OnnxOptions(opset=16, with_theta=True))
    assert _opset(path) == 16
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("GridSample") == 2  # the look at its own output, and the final warp
    assert config_from_onnx(path).stn_passes == 2
    _parity(model, path)
