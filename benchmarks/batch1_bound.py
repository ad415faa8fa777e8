"""Where batch-1 FP32 time goes in OpenVINO, and how far 5x PyTorch eager is from the floor.

Why it exists: the issue asks the best FP32 CPU backend to be 5x faster than PyTorch eager at
batch 1. This script measures, in one run with rounds alternating the two runtimes:
- PyTorch eager (channels_last, the faster layout here) p50 at batch 1;
- OpenVINO (static 1x shape, LATENCY, f32) p50 through the stn-deploy runner, and its own
  per-operation times (PERF_COUNT), summed by operation type;
- the FP32 floor: FLOP per image / the best dense FP32 product on the same threads.
If the convolutions alone already take more than eager/5, no FP32 runtime reaches 5x here.

    python benchmarks/batch1_bound.py --checkpoint runs/cifar-improved-80ep/last.pt
Writes benchmarks/results/batch1_bound.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import RESULTS, write_results  # noqa: E402
from cpu_backends import measured_peak_gflops, mflop_per_image  # noqa: E402


def ov_profile(path: Path, shape: tuple[int, ...], threads: int, iterations: int,
               profiled: int = 200) -> dict[str, float]:
    """Microseconds per op type, median over the last ``profiled`` of ``iterations`` runs
    (OpenVINO reports the latest run only, and a single run is noisy)."""
    import openvino as ov

    from stn_deploy.backends.ov import compile_config

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({0: [1, *shape]})
    compiled = core.compile_model(model, "CPU", {
        **compile_config("latency", threads, "fp32"), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    request.set_input_tensor(ov.Tensor(np.zeros((1, *shape), np.float32)))
    runs: list[collections.Counter[str]] = []
    for i in range(iterations):
        request.infer()
        if i >= iterations - profiled:
            by_type: collections.Counter[str] = collections.Counter()
            for p in request.get_profiling_info():
                by_type[p.node_type] += p.real_time.total_seconds() * 1e6
            runs.append(by_type)
    types = sorted(runs[-1], key=runs[-1].get, reverse=True)
    return {t: float(np.median([r[t] for r in runs])) for t in types}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "batch1_bound.json")
    args = ap.parse_args(argv)

    from stn_deploy.backends import create_runner
    from stn_deploy.backends.base import available_cpus
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx
    from stn_deploy.harness import measure_latency

    threads = args.threads or available_cpus()
    ckpt = load_checkpoint(args.checkpoint)
    mflop = mflop_per_image(args.checkpoint)
    p50: dict[str, list[float]] = {"torch eager channels_last": [], "openvino f32 latency": []}
    with tempfile.TemporaryDirectory(prefix="stn-b1-") as tmp:
        onnx = export_onnx(ckpt.model(), Path(tmp) / "fp32.onnx", OnnxOptions(opset=17))
        runs: list[tuple[str, str, Path, dict[str, Any]]] = [
            ("torch eager channels_last", "torch", args.checkpoint, {}),
            ("openvino f32 latency", "openvino", onnx, {"hint": "latency"})]
        for _ in range(args.rounds):
            for label, backend, path, opts in runs:
                with create_runner(backend, path, threads=threads, **opts) as r:
                    p50[label].append(measure_latency(r, 1, iterations=args.iterations,
                                                      warmup=100).p50_ms)
        ops_us = ov_profile(onnx, ckpt.config.input_shape, threads, args.iterations)
    peak = measured_peak_gflops(threads)
    peak_gflops = max(peak.values())
    eager, ov_ms = (float(np.median(v)) for v in p50.values())
    conv_us = sum(v for k, v in ops_us.items() if "Convolution" in k)
    doc = {
        "threads": threads, "checkpoint": str(args.checkpoint),
        "mflop_per_image": mflop, "rounds_p50_ms": p50,
        "eager_p50_ms": eager, "openvino_p50_ms": ov_ms, "speedup": eager / ov_ms,
        "target_ms": eager / 5, "openvino_ops_us": ops_us,
        "openvino_ops_sum_us": sum(ops_us.values()), "convolution_us": conv_us,
        "convolution_gflops": mflop / conv_us * 1e3 if conv_us else None,
        "peak_gflops": peak, "fp32_floor_ms": mflop / peak_gflops,
    }
    md = [f"# Batch-1 FP32 bound ({threads} threads)", "",
          f"PyTorch eager (channels_last) p50 {eager:.3f} ms; OpenVINO f32 (static 1x, "
          f"LATENCY) p50 {ov_ms:.3f} ms: {eager / ov_ms:.2f}x (median of {args.rounds} "
          f"alternating rounds of {args.iterations}). 5x needs <= {eager / 5:.3f} ms.", "",
          f"OpenVINO's own op times (median of 200 runs): {doc['openvino_ops_sum_us']:.0f} us in all, "
          f"convolutions {conv_us:.0f} us ({doc['convolution_gflops']:.0f} GFLOP/s on "
          f"{mflop:.2f} MFLOP). FP32 floor at the best dense product ({peak_gflops:.0f} "
          f"GFLOP/s): {doc['fp32_floor_ms'] * 1e3:.0f} us.", "",
          "| op type | us |", "|---|---:|"]
    md += [f"| {k} | {v:.0f} |" for k, v in ops_us.items() if v > 0]
    write_results(args.out.name, doc, "\n".join(md), folder=args.out.parent)
    print("\n".join(md[:5]))
    return 0


if __name__ == "__main__":
    from stn_deploy.errors import StnDeployError

    try:
        sys.exit(main())
    except StnDeployError as e:  # bad input: one line, no traceback
        sys.exit(f"batch1_bound: {e}")
