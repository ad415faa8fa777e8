"""FP16 and INT8 (QDQ) variants: they load and run on ONNX Runtime, keep the STN path in
float, and lose no more accuracy than the stated bounds on the digits test split."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from stn_deploy.checkpoint import load_checkpoint
from stn_deploy.artifacts import read_metadata
from stn_deploy.export.onnx_export import OnnxOptions, export_onnx
from stn_deploy.export.precision import (convert_fp16, count_qdq, quantize_int8,
                                         stn_path_nodes)
from stn_deploy.export.verify import TOLERANCES, torch_reference, verification_data, verify_file

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    ckpt = load_checkpoint(digits_checkpoint)
    model = ckpt.model()
    out = tmp_path_factory.mktemp("precision")
    path = export_onnx(model, out / "fp32.onnx", OnnxOptions(opset=17, with_theta=True),
                       {"source_sha256": ckpt.sha256()})
    test, _ = verification_data(ckpt.config, "test", None, None)
    reference = torch_reference(digits_checkpoint, test.images.numpy(), ckpt)
    return reference, ckpt.config, path, test, out


def _stn_path_problems(path: Path) -> list[str]:
    """What is not float on the STN path: every node upstream of GridSample's grid (the whole
    localization net back to the input) and GridSample itself: quantized ops, and any tensor
    they read or write that is not FP32 (INT64 shapes aside). Empty when it stays float."""
    model = onnx.load(str(path))
    stn = set(stn_path_nodes(model))
    nodes = [n for n in model.graph.node if n.name in stn]
    problems = [f"{n.op_type} {n.name}" for n in nodes
                if n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv",
                                 "QLinearMatMul")]
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input,
                       *inferred.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for n in nodes:
        for name in [*n.input, *n.output]:
            if name and n.op_type != "Shape" and types.get(name) not in (
                    onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, None):
                problems.append(f"{name} ({n.op_type}) is "
                                f"{onnx.TensorProto.DataType.Name(types[name])}")
    assert any(n.op_type == "GridSample" for n in nodes)
    return problems


def _float_stn(path: Path) -> None:
    problems = _stn_path_problems(path)
    assert not problems, problems


def test_fp16_within_bounds(trained) -> None:  # type: ignore[no-untyped-def]
    reference, config, path, test, out = trained
    half = convert_fp16(path, out / "fp16.onnx")
    _float_stn(half)
    proto = onnx.load(str(half))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [onnx.TensorProto.FLOAT] * 2
    report = verify_file(half, reference, test.images.numpy(), test.labels.numpy(), config,
                         TOLERANCES["fp16"])
    assert report.passed, report.lines()
    assert report.theta_max_abs is not None and report.theta_max_abs < 1e-5  # STN in FP32
    assert read_metadata(half)["precision"] == "fp16"


def test_int8_qdq_within_bounds(trained) -> None:  # type: ignore[no-untyped-def]
    reference, config, path, test, out = trained
    calib, _ = verification_data(config, "train", None, 300)
    q = quantize_int8(path, out / "int8.onnx", calib.images, config)
    assert count_qdq(q) > 10
    _float_stn(q)
    # The check is strict enough to see a quantized STN path.
    everything = quantize_int8(path, out / "int8-all.onnx", calib.images, config,
                               keep_stn_float=False)
    assert any("QuantizeLinear" in p for p in _stn_path_problems(everything))
    report = verify_file(q, reference, test.images.numpy(), test.labels.numpy(), config,
                         TOLERANCES["int8"])
    assert report.passed, report.lines()
    assert report.accuracy_drop is not None and report.accuracy_drop <= 1.5
    zero_points = [t for t in onnx.load(str(q)).graph.initializer if "zero_point" in t.name]
    assert zero_points and all(not onnx.numpy_helper.to_array(t).any() for t in zero_points)


def test_int8_with_embedded_preprocess(trained, digits_checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    reference, config, _, test, out = trained
    model = load_checkpoint(digits_checkpoint).model()
    path = export_onnx(model, out / "embed.onnx", OnnxOptions(opset=17, embed_preprocess=True))
    calib, _ = verification_data(config, "train", None, 200)
    q = quantize_int8(path, out / "embed-int8.onnx", calib.images, config)
    first = {k: v[:200] for k, v in reference.items()}
    report = verify_file(q, first, test.images[:200].numpy(), test.labels[:200].numpy(), config,
                         TOLERANCES["int8"])
    assert report.passed, report.lines()


def test_two_pass_stn_stays_float_in_fp16_and_int8(digits_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Both GridSamples of a two-pass STN, and the second look's localization net between
    them, stay FP32: the STN path is read from the graph, not from names."""
    import torch

    from stn_deploy.model import build_model

    config = digits_bundle.config.replace(stn_passes=2)
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        model.stn.regressor[2].weight.normal_(0, 0.01)
    path = export_onnx(model, tmp_path / "two.onnx", OnnxOptions(opset=17, with_theta=True))
    grids = [n for n in onnx.load(str(path)).graph.node if n.op_type == "GridSample"]
    assert len(grids) == 2
    _float_stn(convert_fp16(path, tmp_path / "two-fp16.onnx"))
    q = quantize_int8(path, tmp_path / "two-int8.onnx", digits_bundle.train.images[:64], config)
    assert count_qdq(q) > 10
    _float_stn(q)


def test_int8_calibration_prints_nothing(digits_bundle, tmp_path: Path,  # type: ignore[no-untyped-def]
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """ONNX Runtime's percentile calibrator prints its progress; the export's stdout is its
    own (and may be ``--json -``). An image count no batch size divides calibrates too."""
    import torch

    from stn_deploy.model import build_model

    torch.manual_seed(0)
    model = build_model(digits_bundle.config).eval()
    path = export_onnx(model, tmp_path / "m.onnx", OnnxOptions(opset=17))
    capsys.readouterr()
    q = quantize_int8(path, tmp_path / "q.onnx", digits_bundle.train.images[:37],
                      digits_bundle.config)
    assert count_qdq(q) > 10
    assert capsys.readouterr().out == ""
