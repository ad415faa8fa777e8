"""``export --keep-float FILE``: the list ``debug precision`` writes is honoured by FP16 (the
converter's block list) and INT8 (the quantizer's excluded nodes), and refused by name for
FP32 and for nodes the graph does not have."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from stn_deploy.cli import cli

pytest.importorskip("onnxruntime")

CLASSIFIER_CONV = "/classifier/features/features.4/features.4.0/Conv"


def _export(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["export", *map(str, args)])
    assert "Traceback" not in r.output, r.output
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def keep_file(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``debug precision``'s JSON for the INT8 variant of the tiny model's FP32 export, with
    one classifier convolution added by hand (as a user widens the list)."""
    work = tmp_path_factory.mktemp("keep")
    fp32 = work / "fp32.onnx"
    code, out = _export(tiny_checkpoint, "--out", fp32, "--with-theta", "--verify-samples", 64)
    assert code == 0, out
    found = work / "found.json"
    r = CliRunner().invoke(cli, ["debug", "precision", str(fp32), "--precision", "int8",
                                 "--samples", "64", "--calib-samples", "64", "--json",
                                 str(found)])
    assert r.exit_code == 0, r.output
    data = json.loads(found.read_text())
    assert isinstance(data["keep_float"], list)
    assert CLASSIFIER_CONV in data["stages"] or CLASSIFIER_CONV not in data["keep_float"]
    data["keep_float"] = [*data["keep_float"], CLASSIFIER_CONV]
    keep = work / "keep.json"
    keep.write_text(json.dumps(data))
    return keep


def _reads_quantized(model: onnx.ModelProto, name: str) -> bool:
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == name)
    return any(getattr(producer.get(i), "op_type", "") == "DequantizeLinear" for i in node.input)


def test_int8_keeps_the_listed_nodes_float(tiny_checkpoint: Path, keep_file: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "int8.onnx"
    code, text = _export(tiny_checkpoint, "--precision", "int8", "--quantizer", "onnxruntime",
                         "--keep-float", keep_file, "--out", out, "--with-theta",
                         "--verify-samples", 64, "--calib-samples", 64)
    assert code == 0, text
    model = onnx.load(str(out))
    keep = json.loads(keep_file.read_text())["keep_float"]
    assert [n for n in keep if _reads_quantized(model, n)] == []
    # ... while its neighbour, not listed, is quantized: the list, not a blanket, did it.
    assert _reads_quantized(model, CLASSIFIER_CONV.replace("features.4/features.4.0",
                                                           "features.5/features.5.0"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["keep_float"].split(",") == keep and "--keep-float" in text


def test_fp16_keeps_the_listed_nodes_float(tiny_checkpoint: Path, keep_file: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "fp16.onnx"
    code, text = _export(tiny_checkpoint, "--precision", "fp16", "--keep-float", keep_file,
                         "--out", out, "--verify-samples", 64)
    assert code == 0, text
    model = onnx.load(str(out))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.name == CLASSIFIER_CONV)
    assert inits[conv.input[1]] == onnx.TensorProto.FLOAT  # its weight stayed FP32
    assert onnx.TensorProto.FLOAT16 in inits.values()  # the rest is FP16


def test_refused_by_name(tiny_checkpoint: Path, keep_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    code, text = _export(tiny_checkpoint, "--keep-float", keep_file, "--out", out)
    assert code == 2 and "--keep-float" in text and "FP32 graph is all float" in text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"keep_float": ["/no/such/Conv", CLASSIFIER_CONV, "Nope_3"]}))
    code, text = _export(tiny_checkpoint, "--precision", "fp16", "--keep-float", bad,
                         "--out", out, "--verify-samples", 32)
    errors = [line for line in text.splitlines() if "Error" in line]
    assert code == 2 and len(errors) == 1, text
    assert "/no/such/Conv, Nope_3" in errors[0] and CLASSIFIER_CONV not in errors[0]
    bad.write_text("{not json")
    code, text = _export(tiny_checkpoint, "--precision", "fp16", "--keep-float", bad,
                         "--out", out, "--verify-samples", 32)
    assert code == 2 and "not valid JSON" in text
    assert not out.exists()
