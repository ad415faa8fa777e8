"""INT8 by NNCF (``export --quantizer nncf``): the STN-aware scope (regressor, theta, grid and
sampler float; localization convolutions and classifier quantized), verified like every INT8
export, the default per target, accuracy control, and NNCF missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from click.testing import CliRunner

from stn_deploy.cli import cli

pytest.importorskip("onnxruntime")
HAVE_NNCF = importlib.util.find_spec("nncf") is not None
needs_nncf = pytest.mark.skipif(not HAVE_NNCF, reason="nncf is not installed "
                                "(pip install 'stn-deploy[int8]')")


def _export(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["export", *map(str, args)])
    assert "Traceback" not in r.output, r.output
    return r.exit_code, r.output


def _dequantized_readers(model: onnx.ModelProto) -> set[str]:
    producer = {o: n for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node
            if any(getattr(producer.get(i), "op_type", "") == "DequantizeLinear"
                   for i in n.input)}


@needs_nncf
def test_nncf_quantizes_localization_and_classifier_not_theta(tiny_checkpoint: Path,
                                                              tmp_path: Path) -> None:
    from stn_deploy.debug.stages import assign_stages

    out = tmp_path / "nncf.onnx"
    code, text = _export(tiny_checkpoint, "--precision", "int8", "--target", "openvino",
                         "--with-theta", "--out", out, "--verify-samples", 128,
                         "--calib-samples", 128)
    assert code == 0, text
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["quantizer"] == "nncf" and meta["weight_bits"] == "8"  # openvino's default
    stages = assign_stages(model)
    quantized = _dequantized_readers(model)
    compute = {n: stages.stage[n] for n in stages.order
               if stages.op_type[n] in ("Conv", "Gemm", "MatMul", "GridSample")}
    float_stages = {"theta", "grid", "sampler"}
    assert [n for n, s in compute.items() if s in float_stages and n in quantized] == []
    regressor = [n for n in compute if "regressor" in n]
    assert regressor and not set(regressor) & quantized
    loc_convs = [n for n, s in compute.items() if s == "localization" and "Conv" in n]
    assert loc_convs and set(loc_convs) <= quantized  # the cheap part is quantized
    assert any(s == "classifier" and n in quantized for n, s in compute.items())
    assert set(meta["nncf_ignored_scope"].split(",")) >= set(regressor)
    verification = json.loads(meta["verification"])
    assert verification["passed"] and verification["theta_max_px"] is not None
    assert "theta: sampling points shifted by at most" in text


@needs_nncf
def test_accuracy_budget_that_cannot_be_met_writes_nothing(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A metric that any quantized node drops to zero stands in for a budget out of reach:
    NNCF reverts layers until its iterations run out, and export says what it reached."""
    from stn_deploy.export import nncf_quant

    def metric(reference: Any, grid_px: float) -> Any:
        def score(model: onnx.ModelProto, items: Any) -> tuple[float, list[float]]:
            n = len(list(items))
            quantized = any(node.op_type == "QuantizeLinear" for node in model.graph.node)
            return (0.0 if quantized else 1.0), [0.0 if quantized else 1.0] * n
        return score

    monkeypatch.setattr(nncf_quant, "_metric", metric)
    out = tmp_path / "never.onnx"
    code, text = _export(tiny_checkpoint, "--precision", "int8", "--quantizer", "nncf",
                         "--max-accuracy-drop", "0.5", "--out", out, "--verify-samples", 64,
                         "--calib-samples", 64)
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert code == 1 and len(errors) == 1, text
    assert "max accuracy drop 0.5 points not reached" in errors[0]
    assert "drops 100.00 points" in errors[0]
    assert "nothing written" in errors[0] and not out.exists()


@needs_nncf
def test_accuracy_control_reports_what_it_kept_float(tiny_checkpoint: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "ac.onnx"
    code, text = _export(tiny_checkpoint, "--precision", "int8", "--quantizer", "nncf",
                         "--max-accuracy-drop", "1", "--out", out, "--verify-samples", 64,
                         "--calib-samples", 64)
    assert code == 0, text
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["accuracy_control"].startswith("max drop 1 points on 32 held-out images")
    assert "nncf_kept_float" in meta and "kept float by NNCF:" in text


def test_nncf_missing_names_the_extra(tiny_checkpoint: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "nncf" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    out = tmp_path / "m.onnx"
    code, text = _export(tiny_checkpoint, "--precision", "int8", "--target", "openvino",
                         "--out", out)
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert code == 1 and len(errors) == 1, text
    assert "--quantizer nncf" in errors[0] and "pip install 'stn-deploy[int8]'" in errors[0]
    assert "--quantizer onnxruntime" in errors[0] and not out.exists()


def test_weight_bits_follow_vnni() -> None:
    from stn_deploy.export.precision import weights_need_7_bits

    assert weights_need_7_bits(["AVX2"]) and weights_need_7_bits(["AVX2", "AVX-512"])
    assert not weights_need_7_bits(["AVX2", "AVX-512", "VNNI"])
