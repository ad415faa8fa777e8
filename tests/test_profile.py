"""``profile``: the runtimes' own profilers, mapped back to ONNX nodes and STN stages.

On the digits STN exported by the export pipeline (conftest's untrained ``tiny_checkpoint``:
kernel time does not depend on the weights' values), at small batches and few runs.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner, Result

from stn_deploy.commands.profile import profile

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(profile, [str(a) for a in args])


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx

    out = tmp_path_factory.mktemp("profile") / "digits.onnx"
    return export_onnx(load_checkpoint(tiny_checkpoint).model(), out,
                       OnnxOptions(opset=17, with_theta=True))


@pytest.mark.parametrize("backend", [
    "onnxruntime",
    pytest.param("openvino", marks=pytest.mark.skipif(not HAS_OPENVINO,
                                                      reason="openvino is not installed")),
])
def test_stage_shares_add_up_and_every_stage_is_timed(model: Path, backend: str) -> None:
    from stn_deploy.debug import profile as profile_api

    report = profile_api(model, backend, (4,), iterations=3, warmup=1, threads=1)
    run_ = report.runs[0]
    assert run_.batch_size == 4 and run_.backend == backend
    assert sum(run_.shares.values()) == pytest.approx(1.0, abs=1e-9)
    for stage in ("localization", "sampler", "classifier"):
        assert run_.stage_ms[stage] > 0, (stage, run_.stage_ms)
    assert run_.kernel_ms == pytest.approx(sum(run_.stage_ms.values()), rel=1e-9)
    # Units, not speed: per-node times summed over threads and a busy machine's wall clock
    # differ by a few times either way; a microsecond/millisecond slip would be 1000x.
    assert 0.02 * run_.wall_ms < run_.kernel_ms < 20 * run_.wall_ms
    # Runtime-inserted kernels (layout reorders) are a small part of the time.
    unmapped = sum(k.ms for k in run_.kernels if not k.nodes)
    assert unmapped < 0.2 * run_.kernel_ms
    sampler = [n for n in run_.nodes if n.stage == "sampler"]
    assert [n.node for n in sampler] == ["/stn/GridSample"]
    assert 0 < run_.stn_share < 1


def test_runtime_names_map_back_to_onnx_nodes(model: Path) -> None:
    from stn_deploy.debug.graph import GraphIndex
    from stn_deploy.debug.profiling import onnx_nodes_for

    idx = GraphIndex(onnx.load(str(model)))
    by_length = sorted(idx.nodes, key=len, reverse=True)
    conv = "/stn/localization/localization.0/Conv"
    relu_out = "/classifier/features/features.0/features.0.2/Relu_output_0"
    cases = {  # names seen in ONNX Runtime 1.32 profiles and OpenVINO 2026.4 counters
        "fused /stn/regressor/regressor.0/Gemm": "/stn/regressor/regressor.0/Gemm",
        "/classifier/features/features.3/Conv_token_75": "/classifier/features/features.3/Conv",
        f"{conv}_output_0_nchwc": conv,
        f"{relu_out}_nchwc": "/classifier/features/features.0/features.0.2/Relu",
        "/stn/grid/MatMul/MatmulTransposeFusion/": "/stn/grid/MatMul",
        f"{conv}/WithoutBiases": conv,
        "theta": "/stn/Reshape",
        "/stn/grid/Constant/Unsqueeze": "/stn/grid/Constant",
    }
    for name, want in cases.items():
        assert onnx_nodes_for(name, idx, by_length) == [want], name
    assert onnx_nodes_for("ReorderOutput_token_38", idx, by_length) == []


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
def test_cli_writes_json_and_plot(model: Path, tmp_path: Path) -> None:
    png = tmp_path / "shares.png"
    result = run(model, "--backend", "openvino", "--batch-sizes", "1,2", "--iterations", "2",
                 "--warmup", "1", "--threads", "1", "--json", "-", "--plot", png)
    assert result.exit_code == 0, result.output
    start = result.output.index("{")
    report = json.loads(result.output[start:result.output.rindex("}") + 1])
    assert [r["batch_size"] for r in report["runs"]] == [1, 2]
    for r in report["runs"]:
        assert sum(r["shares"].values()) == pytest.approx(1.0, abs=1e-9)
        assert r["stn_share"] == pytest.approx(sum(v for s, v in r["shares"].items()
                                                   if s not in ("input", "classifier")),
                                                abs=1e-9)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_gets_one_line(model: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    torch_backend = run(model, "--backend", "torch")
    assert torch_backend.exit_code == 2 and "no profiler" in torch_backend.output
    trt_on_onnx = run(model, "--backend", "trt")
    assert trt_on_onnx.exit_code == 1 and "cannot run onnx files" in trt_on_onnx.output
    fixed = run(model, "--batch-sizes", "0")
    assert fixed.exit_code == 2
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    missing = run(model, "--backend", "openvino", "--batch-sizes", "1", "--iterations", "1")
    lines = [line for line in missing.output.splitlines() if line.startswith("Error:")]
    assert missing.exit_code == 1 and len(lines) == 1
    assert "openvino is not available" in lines[0] and "pip install" in lines[0]


def test_a_plan_without_tensorrt_gets_one_line(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: its profiler runs on a GPU")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0" * 64)
    result = run(plan)
    assert result.exit_code == 1 and "tensorrt is not available" in result.output


@pytest.mark.tensorrt
def test_tensorrt_layer_times_map_to_stages(model: Path, tmp_path: Path) -> None:
    """Runs only where TensorRT and a GPU are: an IProfiler on a plan built here."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: TensorRT cannot run")
    from stn_deploy.debug import profile as profile_api
    from stn_deploy.export.tensorrt import build_engine

    source = tmp_path / "fp32.onnx"
    source.write_bytes(model.read_bytes())
    build_engine(source, tmp_path / "fp32.plan", "fp32", (1, 4, 8), 512, None)
    run_ = profile_api(tmp_path / "fp32.plan", "trt", (4,), iterations=3).runs[0]
    assert sum(run_.shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert run_.stage_ms["sampler"] > 0 and run_.stage_ms["classifier"] > 0


def test_help() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "onnxruntime, openvino and trt" in " ".join(result.output.split())
