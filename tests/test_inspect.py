"""Target checks: what TensorRT would silently mishandle, on hand-made and exported graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from stn_deploy.cli import cli
from stn_deploy.errors import StnDeployError
from stn_deploy.export.onnx_export import OnnxOptions, export_onnx
from stn_deploy.export.targets import check_target, make_safe
from stn_deploy.model import STNClassifier


def _grid_model(opset: int, mode: str | None, rank: int = 4) -> onnx.ModelProto:
    kw = {"mode": mode} if mode else {}
    xs, gs = [1, 1] + [4] * (rank - 2), [1] + [4] * (rank - 2) + [rank - 2]
    graph = helper.make_graph(
        [helper.make_node("GridSample", ["x", "g"], ["y"], name="gs", **kw)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, xs),
         helper.make_tensor_value_info("g", TensorProto.FLOAT, gs)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, xs)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _rules(model: onnx.ModelProto, target: str = "trt") -> list[str]:
    return [f.rule for f in check_target(model, target) if f.severity == "error"]


def test_gridsample_linear_at_20_is_flagged_and_fixable() -> None:
    for mode in ("linear", "cubic", None):  # None: the opset-20 default, linear
        found = check_target(_grid_model(20, mode), "trt")
        assert [f.rule for f in found] == ["gridsample-mode"] and found[0].fixable
    assert _rules(_grid_model(20, "nearest")) == []
    assert _rules(_grid_model(19, "bilinear")) == []
    assert _rules(_grid_model(20, "linear"), "onnxruntime") == []


def test_non_4d_gridsample_is_refused() -> None:
    model = _grid_model(20, "linear", rank=5)
    assert "gridsample-rank" in _rules(model)
    with pytest.raises(StnDeployError, match="refusing the graph for trt"):
        make_safe(model, "trt")


def test_make_safe_rewrites_to_19() -> None:
    safe, changes = make_safe(_grid_model(20, "linear"), "trt")
    assert safe.opset_import[0].version == 19 and "opset 20 -> 19" in changes[0]
    assert helper.get_attribute_value(safe.graph.node[0].attribute[0]) == b"bilinear"
    assert _rules(safe) == []


def test_unsupported_ops_reduce_axes_and_int64() -> None:
    graph = helper.make_graph(
        [helper.make_node("AffineGrid", ["t", "size"], ["g"], name="ag"),
         helper.make_node("Shape", ["t"], ["axes"], name="sh"),
         helper.make_node("ReduceMean", ["g", "axes"], ["y"], name="rm")], "g",
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, 2**40, 4], dtype=np.int64), "size")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    rules = _rules(model)
    assert {"unsupported-op", "reduce-axes", "int64-range"} <= set(rules)
    with pytest.raises(StnDeployError, match="AffineGrid is not supported"):
        make_safe(model, "trt")


def test_exported_graphs(random_model: STNClassifier, tmp_path: Path) -> None:
    p19 = export_onnx(random_model, tmp_path / "m19.onnx", OnnxOptions(opset=19))
    p20 = export_onnx(random_model, tmp_path / "m20.onnx", OnnxOptions(opset=20))
    assert _rules(onnx.load(str(p19))) == []
    assert _rules(onnx.load(str(p20))) == ["gridsample-mode"]
    runner = CliRunner()
    r = runner.invoke(cli, ["inspect", str(p19), "--target", "trt"])
    assert r.exit_code == 0 and "trt: no findings" in r.output and "GridSample 1" in r.output
    for typed in ("trt", "tensorrt"):  # the old spelling: a quiet alias
        r = runner.invoke(cli, ["inspect", str(p20), "--target", typed])
        assert r.exit_code == 1 and "read as nearest" in r.output
        assert "export --format trt rewrites them" in r.output
    r = runner.invoke(cli, ["inspect", str(p20), "--target", "onnxruntime"])
    assert r.exit_code == 0 and "onnxruntime: no findings" in r.output
    r = runner.invoke(cli, ["inspect", str(p20), "--target", "tensorflow"])
    assert r.exit_code == 2 and "'trt'" in r.output and "tensorrt" not in r.output
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    r = runner.invoke(cli, ["inspect", str(bad)])
    assert r.exit_code == 1 and "not a readable ONNX file" in r.output


def test_inspect_checkpoint_and_export_metadata(digits_checkpoint: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["inspect", str(digits_checkpoint)])
    assert r.exit_code == 0, r.output
    assert "STN health on the digits test split (450 images): theta spread" in r.output
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(cli, ["export", str(digits_checkpoint), "--out", str(out),
                                 "--with-theta", "--verify-samples", "64"])
    assert r.exit_code == 0, r.output
    assert "STN health on the digits test split: theta spread" in r.output
    assert "% of theta's spread" in r.output or "theta constant" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "STN health (measured at export): theta spread" in r.output
