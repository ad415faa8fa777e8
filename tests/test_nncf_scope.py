"""NNCF's scope (``export --quantizer nncf``): the STN-aware scope (localization convolutions
quantized) unless it moves theta past INT8's bound on the verification images; then the
export quantizes once more with the whole STN path float, says so in one line and records
the scope in the file (ONNX metadata, OpenVINO IR rt_info). The theta shift is measured on
the graphs themselves, so it needs no --with-theta."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from stn_deploy.cli import cli

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("nncf") is None,
                                reason="nncf is not installed (pip install 'stn-deploy[int8]')")
RETRY = "NNCF: quantizing the localization convolutions moved theta by"


def _export(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["export", *map(str, args)])
    assert "Traceback" not in r.output, r.output
    return r.exit_code, r.output


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _quantized(model: onnx.ModelProto, stage: str) -> dict[str, bool]:
    """Each Conv of ``stage``: does it read a DequantizeLinear output (is it quantized)?"""
    from stn_deploy.debug.stages import assign_stages

    stages = assign_stages(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    return {n.name: any(getattr(producer.get(i), "op_type", "") == "DequantizeLinear"
                        for i in n.input)
            for n in model.graph.node
            if n.op_type == "Conv" and stages.stage[n.name] == stage}


@pytest.fixture
def tight_theta(monkeypatch: pytest.MonkeyPatch) -> float:
    """INT8's theta bound set to FP32's (0.001 px): quantized localization convolutions move
    theta more than that, a float STN path does not. The export's verification is held to
    it too, so a file written with it has an FP32-exact theta."""
    from stn_deploy.export import verify

    bound = verify.FP32.theta_px
    assert bound is not None
    monkeypatch.setitem(verify.TOLERANCES, "int8",
                        dataclasses.replace(verify.INT8, theta_px=bound))
    return bound


def _retry_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(RETRY)]
    assert len(lines) == 1, text
    return lines[0]


def test_theta_moved_past_the_bound_keeps_the_whole_stn_path_float(
        tiny_checkpoint: Path, tmp_path: Path, tight_theta: float) -> None:
    out = tmp_path / "m.onnx"
    code, text = _export(tiny_checkpoint, "--precision", "int8", "--quantizer", "nncf",
                         "--with-theta", "--out", out, "--verify-samples", 128,
                         "--calib-samples", 128)
    assert code == 0, text
    line = _retry_line(text)
    found = re.search(r"moved theta by ([0-9.e+-]+) px", line)
    assert found is not None, line
    moved = float(found.group(1))
    assert moved > tight_theta and f"(bound {tight_theta:g} px;" in line
    assert "kept the whole STN path float instead" in line
    assert "float (the whole STN path: localization" in text
    meta = _meta(out)
    assert meta["nncf_scope"] == "stn-float"
    model = onnx.load(str(out))
    localization = _quantized(model, "localization")
    assert localization and not any(localization.values())  # the retry's scope
    assert any(_quantized(model, "classifier").values())  # the classifier still INT8
    verification = json.loads(meta["verification"])  # held to the tight bound, and passed
    assert verification["passed"] and verification["theta_max_px"] <= tight_theta


def test_theta_within_the_bound_keeps_the_stn_aware_scope(tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    """No retry at the real bound; and the shift the scope is chosen by is the verification's
    own theta figure (FP32 graph against quantized on ONNX Runtime, against PyTorch there)."""
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.nncf_quant import theta_shift
    from stn_deploy.export.verify import verification_data

    fp32, out = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    code, text = _export(tiny_checkpoint, "--with-theta", "--out", fp32,
                         "--verify-samples", 128)
    assert code == 0, text
    code, text = _export(tiny_checkpoint, "--precision", "int8", "--quantizer", "nncf",
                         "--with-theta", "--out", out, "--verify-samples", 128,
                         "--calib-samples", 128)
    assert code == 0, text
    assert RETRY not in text and "float (regressor, theta, grid, sampler)" in text
    meta = _meta(out)
    assert meta["nncf_scope"] == "stn-aware"
    assert all(_quantized(onnx.load(str(out)), "localization").values())
    config = load_checkpoint(tiny_checkpoint).config
    images = verification_data(config, "test", None, 128)[0].images.numpy()
    shift = theta_shift(fp32, out, images, config)
    assert shift is not None and shift.images == 128
    verified = json.loads(meta["verification"])["theta_max_px"]
    assert 0 < shift.moved_px < 0.1
    assert shift.moved_px == pytest.approx(verified, rel=0.05, abs=1e-4)
    same = theta_shift(fp32, fp32, images, config)
    assert same is not None and same.moved_px == 0.0 and same.spread_px == shift.spread_px
    assert np.isclose(shift.spread_px, json.loads(meta["verification"])["theta_spread_px"],
                      rtol=1e-3)


def test_accuracy_control_starts_from_the_scope_that_keeps_theta(
        tiny_checkpoint: Path, tmp_path: Path, tight_theta: float) -> None:
    out = tmp_path / "ac.onnx"
    code, text = _export(tiny_checkpoint, "--precision", "int8", "--quantizer", "nncf",
                         "--max-accuracy-drop", "5", "--with-theta", "--out", out,
                         "--verify-samples", 64, "--calib-samples", 64)
    assert code == 0, text
    _retry_line(text)
    meta = _meta(out)
    assert meta["nncf_scope"] == "stn-float" and "accuracy_control" in meta
    assert not any(_quantized(onnx.load(str(out)), "localization").values())
    assert json.loads(meta["verification"])["passed"]


def test_openvino_ir_int8_takes_the_same_fallback(tiny_checkpoint: Path, tmp_path: Path,
                                                  tight_theta: float) -> None:
    """Without --with-theta: the scope is chosen on the graphs' own theta tensors."""
    pytest.importorskip("openvino")
    from stn_deploy.artifacts import read_ir_metadata

    out = tmp_path / "m.xml"
    code, text = _export(tiny_checkpoint, "--format", "openvino", "--precision", "int8",
                         "--out", out, "--verify-samples", 64, "--calib-samples", 64)
    assert code == 0, text
    _retry_line(text)
    meta = read_ir_metadata(out)
    assert meta["nncf_scope"] == "stn-float" and meta["quantizer"] == "nncf"
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert json.loads(meta["verification"])["passed"]


# ------------------------------------------- one localization convolution quantized alone

@pytest.fixture(scope="module")
def tiny_fp32(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, list[str]]:
    """The tiny digits model's FP32 graph and its localization convolutions, in order."""
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx
    from stn_deploy.export.precision import name_nodes

    out = tmp_path_factory.mktemp("nncf-one-conv") / "fp32.onnx"
    export_onnx(load_checkpoint(tiny_checkpoint).model(), out, OnnxOptions(opset=17))
    model = onnx.load(str(out))
    name_nodes(model)
    convs = list(_quantized(model, "localization"))
    assert len(convs) == 4
    return out, convs


def test_one_localization_convolution_quantized_alone(
        tiny_checkpoint: Path, tiny_fp32: tuple[Path, list[str]], tmp_path: Path) -> None:
    """NNCF's full bias correction cuts out a sub-model whose inputs name the graph input
    twice (the quantized convolution's path and the sampler both read it) when exactly one
    localization convolution is quantized; ONNX Runtime refused that sub-model until
    ``nncf_quant`` de-duplicated the names. Both NNCF paths, each with another convolution."""
    from onnx.utils import Extractor

    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.nncf_quant import quantize_nncf, quantize_nncf_controlled
    from stn_deploy.export.verify import verification_data

    src, convs = tiny_fp32
    config = load_checkpoint(tiny_checkpoint).config
    calib = verification_data(config, "train", None, 64)[0].images.numpy()
    held = verification_data(config, "test", None, 32)[0]
    original = Extractor.extract_model

    first = quantize_nncf(src, tmp_path / "first.onnx", calib, config, keep_float=convs[1:])
    got = _quantized(onnx.load(str(first.path)), "localization")
    assert got == {c: c == convs[0] for c in convs}

    # A budget of 100 points is met at once: accuracy control returns its first quantization.
    last = quantize_nncf_controlled(src, tmp_path / "last.onnx", calib, held.images.numpy(),
                                    held.labels.numpy(), config, max_drop=100.0, grid_px=1e9,
                                    keep_float=convs[:-1])
    got = _quantized(onnx.load(str(last.path)), "localization")
    assert got == {c: c == convs[-1] for c in convs}
    assert Extractor.extract_model is original  # the patch lives only while NNCF runs


def test_extraction_names_deduplicated_only_inside_and_restored_on_error() -> None:
    from onnx import TensorProto, helper
    from onnx.utils import Extractor

    from stn_deploy.export.nncf_quant import _unique_extraction_names

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"], name="add")],
                              "g", [x], [y])
    model = helper.make_model(graph)
    original = Extractor.extract_model

    def names(m: onnx.ModelProto) -> tuple[list[str], list[str]]:
        return [i.name for i in m.graph.input], [o.name for o in m.graph.output]

    assert names(Extractor(model).extract_model(["x", "x"], ["y", "y"])) == (
        ["x", "x"], ["y", "y"])  # ONNX's own: one entry per name given
    with pytest.raises(RuntimeError, match="inside"), _unique_extraction_names():
        assert names(Extractor(model).extract_model(["x", "x"], ["y", "y"])) == (["x"], ["y"])
        raise RuntimeError("inside")
    assert Extractor.extract_model is original


# ------------------------------------------------- benchmarks/nncf_scope.py end to end

def test_scope_benchmark_measures_every_scope_and_bf16_path(tiny_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    """The script behind the results page's NNCF-scope table, on the tiny digits model: one
    row per localization convolution quantized alone, all quantized, and the whole STN path
    float (which leaves theta exactly as FP32's); two bf16 rows; the conclusion built from
    the rows it prints; nothing written outside --results-dir."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "nncf_scope.py"
    done = subprocess.run([sys.executable, str(script), "--checkpoint", str(tiny_checkpoint),
                           "--data-note", "digits", "--calib-samples", "64",
                           "--eval-samples", "64", "--out", "scope",
                           "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scope.json", "scope.md"]
    doc = json.loads((tmp_path / "scope.json").read_text())
    bound = doc["bound_px"]

    rows = doc["nncf_rows"]
    assert [r["scope"] for r in rows] == ["stn-aware"] * 5 + ["stn-float"]
    assert [len(r["keep_float"]) for r in rows] == [3, 3, 3, 3, 0, 0]
    assert rows[-1]["theta_shift_max_px"] < 1e-4  # no STN node quantized: FP32's theta
    for r in rows:
        assert r["images"] == 64 == doc["eval_images"]
        assert r["within_bound"] == (r["theta_shift_max_px"] <= bound)
        assert r["theta_spread_px"] == pytest.approx(doc["theta_spread_px_pytorch"], rel=1e-3)
    assert [r["bf16"] for r in doc["bf16_rows"]] == [["localization"],
                                                      ["localization", "regressor"]]
    for r in doc["bf16_rows"]:
        assert r["theta_shift_max_px"] >= r["theta_shift_p99_px"] >= r["theta_shift_median_px"]
        assert 0.0 <= r["unchanged_share"] <= 1.0

    partial_ok = any(r["within_bound"] for r in rows[:-1])
    opening = "A partial NNCF scope keeps" if partial_ok else "No partial NNCF scope keeps"
    assert doc["conclusion"].startswith(opening)
    md = (tmp_path / "scope.md").read_text()
    assert f"**Conclusion, digits:** {doc['conclusion']}" in md
    assert md.count("| stn-aware |") == 5 and md.count("| stn-float |") == 1
