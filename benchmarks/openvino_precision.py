"""OpenVINO's default inference precision on this CPU vs f32 forced, same FP32 ONNX, one run.

Why it exists: on CPUs with AVX512-BF16 or AMX, OpenVINO runs an FP32 model in bfloat16 unless
told otherwise, so "FP32" speeds quoted without the hint are bf16 speeds.
Writes benchmarks/results/openvino_precision.{json,md}.
Usage: python benchmarks/openvino_precision.py MODEL.onnx [--batch 256] [--iterations 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import openvino as ov

from _provenance import write_results
from stn_deploy.artifacts import config_from_onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("onnx")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=30)
    args = ap.parse_args()
    c, h, w = config_from_onnx(args.onnx).input_shape
    x = np.random.default_rng(0).standard_normal((args.batch, c, h, w), dtype=np.float32)
    core = ov.Core()
    rows = []
    for asked in ("default", "f32", "bf16"):
        cfg = {"PERFORMANCE_HINT": "LATENCY"}
        if asked != "default":
            cfg["INFERENCE_PRECISION_HINT"] = asked
        compiled = core.compile_model(args.onnx, "CPU", cfg)
        req = compiled.create_infer_request()
        for _ in range(5):
            req.infer([x])
        times = []
        for _ in range(args.iterations):
            t = time.perf_counter()
            req.infer([x])
            times.append(time.perf_counter() - t)
        rows.append({"asked": asked,
                     "runs_in": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
                     "img_per_s": args.batch / float(np.mean(times))})
        print(rows[-1], flush=True)
    doc = {"model": Path(args.onnx).name, "batch": args.batch,
           "iterations": args.iterations, "rows": rows}
    md = [f"OpenVINO {ov.__version__}, batch {args.batch}", "",
          "| precision asked | OpenVINO runs in | img/s |", "|---|---|---:|"]
    md += [f"| {r['asked']} | {r['runs_in']} | {r['img_per_s']:,.0f} |" for r in rows]
    write_results("openvino_precision", doc, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
