"""FP16 and INT8 (QDQ) variants: they load and run on ONNX Runtime, keep the STN path in
float, and lose no more accuracy than the stated bounds on the digits test split."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from stn_deploy.checkpoint import load_checkpoint
from stn_deploy.export.onnx_export import OnnxOptions, export_onnx, read_metadata
from stn_deploy.export.precision import (convert_fp16, count_qdq, quantize_int8,
                                         stn_path_nodes)
from stn_deploy.export.verify import TOLERANCES, verification_data, verify_onnx

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    ckpt = load_checkpoint(digits_checkpoint)
    model = ckpt.model()
    out = tmp_path_factory.mktemp("precision")
    path = export_onnx(model, out / "fp32.onnx", OnnxOptions(opset=17, with_theta=True),
                       {"source_sha256": ckpt.sha256()})
    test, _ = verification_data(ckpt.config, "test", None, 0)
    return model, ckpt.config, path, test, out


def _float_stn(path: Path) -> None:
    """GridSample and its grid producers run in FP32, with no quantize node among them."""
    model = onnx.load(str(path))
    stn = set(stn_path_nodes(model))
    nodes = [n for n in model.graph.node if n.name in stn]
    assert any(n.op_type == "GridSample" for n in nodes)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and "grid" in n.name
                   for n in model.graph.node)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    grid = next(n for n in nodes if n.op_type == "GridSample").input[1]
    assert types.get(grid) == onnx.TensorProto.FLOAT


def test_fp16_within_bounds(trained) -> None:  # type: ignore[no-untyped-def]
    model, config, path, test, out = trained
    half = convert_fp16(path, out / "fp16.onnx")
    _float_stn(half)
    proto = onnx.load(str(half))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [onnx.TensorProto.FLOAT] * 2
    report = verify_onnx(half, model, test.images, test.labels, config, TOLERANCES["fp16"])
    assert report.passed, report.lines()
    assert report.theta_max_abs is not None and report.theta_max_abs < 1e-5  # STN in FP32
    assert read_metadata(half)["precision"] == "fp16"


def test_int8_qdq_within_bounds(trained) -> None:  # type: ignore[no-untyped-def]
    model, config, path, test, out = trained
    calib, _ = verification_data(config, "train", None, 300)
    q = quantize_int8(path, out / "int8.onnx", calib.images, config)
    assert count_qdq(q) > 10
    _float_stn(q)
    report = verify_onnx(q, model, test.images, test.labels, config, TOLERANCES["int8"])
    assert report.passed, report.lines()
    assert report.accuracy_drop is not None and report.accuracy_drop <= 1.5
    zero_points = [t for t in onnx.load(str(q)).graph.initializer if "zero_point" in t.name]
    assert zero_points and all(not onnx.numpy_helper.to_array(t).any() for t in zero_points)


def test_int8_with_embedded_preprocess(trained) -> None:  # type: ignore[no-untyped-def]
    model, config, _, test, out = trained
    path = export_onnx(model, out / "embed.onnx", OnnxOptions(opset=17, embed_preprocess=True))
    calib, _ = verification_data(config, "train", None, 200)
    q = quantize_int8(path, out / "embed-int8.onnx", calib.images, config)
    report = verify_onnx(q, model, test.images[:200], test.labels[:200], config,
                         TOLERANCES["int8"])
    assert report.passed, report.lines()
