"""benchmarks/cpu_backends.py and benchmarks/cpp_vs_python.py run end to end in their --quick
mode and write results files with every key and section a reader (and the README's links)
rely on. The timings of a quick run prove nothing and are not checked; the structure is.

Both are slow (every CPU runtime timed and the FP32 peak measured on the session's digits
model; a C++ build from scratch), so they are marked slow; they write only under tmp_path."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True,
                          text=True, timeout=900)


def _cpp_skip_reason() -> str | None:
    """Why stn_classify cannot be built here (None: it can), as tests/test_cpp.py decides."""
    if shutil.which("cmake") is None:
        return "cmake not found on PATH"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++ or clang++) on PATH"
    if importlib.util.find_spec("openvino") is None:
        return "the openvino wheel is not installed"
    import openvino

    if not (Path(openvino.__file__).parent / "cmake" / "OpenVINOConfig.cmake").is_file():
        return "the openvino wheel has no cmake/OpenVINOConfig.cmake"
    return None


def test_cpu_backends_quick_writes_every_row_target_and_section(digits_checkpoint: Path,
                                                                 tmp_path: Path) -> None:
    for module in ("onnxruntime", "openvino"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed: cpu_backends.py times every CPU runtime")
    done = _script("cpu_backends.py", "--checkpoint", str(digits_checkpoint), "--quick",
                   "--batch-sizes", "1,8", "--eval-samples", "64", "--calib-samples", "16",
                   "--out", str(tmp_path / "cpu.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "cpu.json").read_text())
    md = (tmp_path / "cpu.md").read_text()

    assert list(doc)[0] == "provenance"
    for key in ("schema_version", "system", "settings", "reference", "eval_data", "results",
                "peak", "bf16", "targets", "checkpoint"):
        assert key in doc, key
    assert doc["settings"]["batch_sizes"] == [1, 8] and doc["settings"]["quick"] is True
    assert doc["eval_data"]["n"] == 64 and doc["settings"]["calib_samples"] == 16
    assert doc["checkpoint"] == str(digits_checkpoint)
    assert doc["reference"]["accuracy_pct"] > 50.0  # the 3-epoch digits model, ~85%
    rows = [(r["backend"], r["precision"], " ".join(r["notes"])) for r in doc["results"]]
    assert rows[:3] == [("torch", "fp32", "channels_last"), ("torch", "fp32", "contiguous"),
                        ("onnxruntime", "fp32", "")]
    assert ("onnxruntime", "int8", "") in rows and len(rows) == 10
    ort = doc["results"][2]
    assert ort["status"] == "ok" and ort["eval"]["agreement_pct"] >= 98.0
    assert ort["eval"]["accuracy_pct"] == pytest.approx(doc["reference"]["accuracy_pct"], abs=2)
    assert {lat["batch_size"] for lat in ort["latency"]} == {1, 8}

    targets = doc["targets"]
    assert list(targets) == ["fp32_batch1_speedup_vs_eager", "fp32_throughput_over_peak",
                             "int8_over_fp32_throughput", "int8_accuracy_drop_points",
                             "harness_overhead"]
    rounds = targets["fp32_batch1_speedup_vs_eager"]["rounds"]
    assert len(rounds) == 5 and all(len(r["p50_ms"]) == 1 for r in rounds)  # the FP32 rows
    assert targets["fp32_batch1_speedup_vs_eager"]["value"] > 0
    assert len(targets["harness_overhead"]["bare_p50_ms"]) == 1
    assert targets["int8_accuracy_drop_points"]["value"] is not None
    peak = doc["peak"]
    assert peak["gflops"] == max(peak["measured_gflops"].values()) > 0
    assert peak["images_per_s"] == pytest.approx(peak["gflops"] * 1e3 / peak["mflop_per_image"])

    assert "**Quick run: timings prove the script only.**" in md
    for heading in ("| Backend | Precision | Setting | Accuracy | Agreement | p50 ms b1 | "
                    "p50 ms b8 | img/s b1 | img/s b8 |", "| Kernel | GFLOP/s |",
                    "| Target | Value | Goal | Best |", "| Row | Rounds | Median |",
                    "bf16 (OpenVINO's own default"):
        assert heading in md, heading
    printed = done.stdout.splitlines()
    assert [line.split(":")[0] for line in printed] == [*targets, "peak"]
    assert printed[-1] == f"peak: {peak['derivation']}"


def test_cpp_vs_python_quick_writes_both_sides(tmp_path: Path) -> None:
    reason = _cpp_skip_reason()
    if reason:
        pytest.skip(f"C++ runtime cannot be built: {reason}")
    done = _script("cpp_vs_python.py", "--quick", "--build-dir", str(tmp_path / "build"),
                   "--out", str(tmp_path / "cpp"))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "cpp.json").read_text())
    md = (tmp_path / "cpp.md").read_text()

    assert list(doc)[0] == "provenance"
    assert (doc["runs"], doc["rounds"], doc["batch"]) == (200, 1, 1)
    assert doc["input"] == [1, 32, 32] and doc["embedded_preprocess"] is False
    assert doc["python_runner"].startswith("stn_deploy.backends create_runner('openvino')")
    for side in ("cpp", "python"):
        for mode in ("end_to_end", "inference_only"):
            figures = doc["ms"][side][mode]
            assert 0 < figures["p50"] <= figures["p99"], (side, mode)
    assert {k: len(v) for k, v in doc["per_round"].items()} == {
        "cpp_e2e": 1, "cpp_infer": 1, "py_e2e": 1, "py_infer": 1}
    assert doc["ms"]["cpp"]["end_to_end"] == doc["per_round"]["cpp_e2e"][0]
    # What it prints is the markdown without the provenance line.
    printed = [line for line in done.stdout.splitlines() if line]
    assert printed[0] == "# C++ vs Python, OpenVINO CPU, batch 1"
    assert all(line in md for line in printed)
    assert "| C++ stn_classify |" in md and "| Python runner |" in md
