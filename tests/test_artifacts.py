"""The torch-free artifact readers, the runners built on them, and export and bench agreeing
because they run the same runner through the same batched loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from stn_deploy.artifacts import read_metadata
from stn_deploy.backends import create_runner
from stn_deploy.cli import cli
from stn_deploy.errors import StnDeployError

pytest.importorskip("onnxruntime")


def test_onnx_runner_runs_without_torch(digits_onnx: Path) -> None:
    """Reading an exported file and running it on ONNX Runtime never imports torch."""
    code = f"""
import sys
import numpy as np
from stn_deploy.artifacts import config_from_onnx, onnx_precision
from stn_deploy.backends import create_runner
from stn_deploy.harness import run_batched
config = config_from_onnx({str(digits_onnx)!r})
assert onnx_precision({str(digits_onnx)!r}) == "fp32"
images = np.zeros((3, *config.input_shape), dtype=np.uint8)
with create_runner("onnxruntime", {str(digits_onnx)!r}) as runner:
    out = run_batched(runner, images)
assert out["logits"].shape == (3, config.num_classes), out["logits"].shape
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_runners_take_only_the_options_they_declare(digits_onnx: Path) -> None:
    from stn_deploy.backends.onnxrt import OnnxRuntimeRunner

    # One option set for every backend: each runner keeps its own.
    runner = create_runner("onnxruntime", digits_onnx, device="cuda:0", hint="throughput",
                           memory_format="contiguous", threads=1)
    assert runner.options == {} and runner.threads == 1
    with pytest.raises(StnDeployError, match="takes no option hint"):
        OnnxRuntimeRunner(digits_onnx, hint="throughput")


def test_cpu_session_reports_where_each_node_ran(digits_onnx: Path) -> None:
    with create_runner("onnxruntime", digits_onnx) as runner:
        placed = runner.describe()["node_providers"]
        assert runner.describe()["providers"] == ["CPUExecutionProvider"]
        n = len(onnx.load(str(digits_onnx)).graph.node)
    assert set(placed) == {"CPUExecutionProvider"}
    # ORT fuses some nodes, so at most as many as the file has, and most of them.
    assert n // 2 <= placed["CPUExecutionProvider"] <= n


def test_gpu_provider_lists_and_options(digits_onnx: Path, tmp_path: Path) -> None:
    """CUDA after TensorRT (not the CPU), and no FP16 flag that would let TensorRT run the
    STN path the FP16 file keeps in FP32 at half precision. Built without a GPU: only
    activation needs one."""
    from stn_deploy.artifacts import set_metadata
    from stn_deploy.backends.onnxrt import OnnxRuntimeCudaRunner, OnnxRuntimeTensorRTRunner

    assert OnnxRuntimeCudaRunner(digits_onnx).providers() == ("CUDAExecutionProvider",
                                                              "CPUExecutionProvider")
    runner = OnnxRuntimeTensorRTRunner(digits_onnx)
    assert runner.providers() == ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                  "CPUExecutionProvider")
    assert runner.provider_options() == {"device_id": 0}
    for precision, expected in (("fp16", {"device_id": 0}),
                                ("int8", {"device_id": 0, "trt_int8_enable": True})):
        proto = onnx.load(str(digits_onnx))
        set_metadata(proto, {**read_metadata(digits_onnx), "precision": precision})
        path = tmp_path / f"{precision}.onnx"
        onnx.save(proto, str(path))
        assert OnnxRuntimeTensorRTRunner(path).provider_options() == expected


def test_onnxruntime_and_onnxruntime_gpu_together_are_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from stn_deploy.backends import onnxrt

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.32.0")
    reason = onnxrt.OnnxRuntimeCudaRunner.probe()
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: the clash cannot show")
    assert reason is not None
    assert "both onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0 are installed" in reason


def _int32_dequantize_graph() -> onnx.ModelProto:
    bias = numpy_helper.from_array(np.array([3, -2], dtype=np.int32), "bias_q")
    scale = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "bias_scale")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    nodes = [helper.make_node("DequantizeLinear", ["bias_q", "bias_scale"], ["bias"],
                              name="bias_dq"),
             helper.make_node("Add", ["x", "bias"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[bias, scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inspect_flags_an_int32_dequantize_for_tensorrt(tmp_path: Path) -> None:
    path = tmp_path / "int32dq.onnx"
    onnx.save(_int32_dequantize_graph(), str(path))
    r = CliRunner().invoke(cli, ["inspect", str(path), "--target", "tensorrt"])
    assert r.exit_code == 1, r.output
    assert "int32-dequantize (bias_dq)" in r.output and "Traceback" not in r.output
    # The same graph is fine for ONNX Runtime, which dequantizes INT32.
    assert CliRunner().invoke(cli, ["inspect", str(path), "--target",
                                    "onnxruntime"]).exit_code == 0


def test_export_and_bench_report_the_same_logits(digits_checkpoint: Path,
                                                 tmp_path: Path) -> None:
    """Export verifies the file on the onnxruntime runner against the torch runner through
    harness.run_batched; bench does the same: on the same images the differences are equal
    to the last bit, and the metadata says what was verified."""
    out = tmp_path / "d.onnx"
    r = CliRunner().invoke(cli, ["export", str(digits_checkpoint), "--opset", "17", "--out",
                                 str(out), "--with-theta"])
    assert r.exit_code == 0, r.output
    verified = json.loads(read_metadata(out)["verification"])
    assert verified["backend"] == "onnxruntime" and verified["opset"] == 17
    assert verified["backend_version"]
    report = tmp_path / "b.json"
    r = CliRunner().invoke(cli, ["bench", str(digits_checkpoint), str(out), "--backend",
                                 "torch,onnxruntime", "--batch-sizes", "1", "--iterations",
                                 "1", "--warmup", "0", "--quiet", "--json", str(report)])
    assert r.exit_code == 0, r.output
    rows = json.loads(report.read_text())["results"]
    row = next(x for x in rows if x["backend"] == "onnxruntime" and x["model"] == str(out))
    assert row["eval"]["n"] == verified["samples"]
    assert row["eval"]["max_abs_logit_diff"] == verified["max_abs"]
    assert row["eval"]["agreement_pct"] == pytest.approx(100 * verified["agreement"])
