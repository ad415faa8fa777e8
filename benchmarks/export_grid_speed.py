"""ONNX Runtime speed of the exported grid forms: ours (constant base grid + MatMul), the graph
the stock exporter writes for F.affine_grid (torch.onnx.export defaults: dynamo, opset 18), and
the AffineGrid op (opset 20). Same weights, same inputs, CPU, compute only (inputs prepared
before the clock starts; one session per graph, warmed up).

    python benchmarks/export_grid_speed.py            # full: batch 1 and 256
    python benchmarks/export_grid_speed.py --quick    # seconds: proves it runs

Writes benchmarks/results/export_grid_speed.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from _provenance import write_results
from stn_deploy.config import ModelConfig
from stn_deploy.export.onnx_export import OnnxOptions, export_onnx, with_affine_grid_op
from stn_deploy.model import build_model


def stock_export(model: torch.nn.Module, path: Path) -> None:
    """What a user gets from torch.onnx.export on an STN written with F.affine_grid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(with_affine_grid_op(model), (torch.randn(2, 3, 32, 32),), str(path),
                          input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                          external_data=False)


def time_session(path: Path, batch: int, seconds: float, threads: int) -> dict[str, float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    for _ in range(5):
        sess.run(None, {"input": x})
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        sess.run(None, {"input": x})
        times.append(time.perf_counter() - t0)
    p50 = statistics.median(times)
    return {"p50_ms": p50 * 1e3, "img_per_s": batch / p50, "runs": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs, batch 1 and 16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per graph")
    args = ap.parse_args()
    batches = [1, 16] if args.quick else [1, 256]
    seconds = 0.3 if args.quick else 2.0
    rounds = 1 if args.quick else args.rounds

    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    with tempfile.TemporaryDirectory() as d:
        graphs = {
            "ours: base grid + MatMul (torchscript, opset 17)": Path(d) / "ours.onnx",
            "stock: torch.onnx.export of F.affine_grid (dynamo, opset 18)": Path(d) / "stock.onnx",
            "AffineGrid op (torchscript, opset 20)": Path(d) / "affine.onnx",
        }
        names = list(graphs)
        export_onnx(model, graphs[names[0]], OnnxOptions(opset=17, exporter="torchscript"))
        stock_export(model, graphs[names[1]])
        export_onnx(model, graphs[names[2]], OnnxOptions(opset=20, affine_grid_op=True,
                                                         exporter="torchscript"))
        results: dict[str, dict[str, dict[str, float]]] = {n: {} for n in names}
        for batch in batches:
            per: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(rounds):  # alternate graphs so machine noise hits all alike
                for n in names:
                    per[n].append(time_session(graphs[n], batch, seconds, args.threads)["img_per_s"])
            for n in names:
                best = max(per[n])
                results[n][str(batch)] = {"img_per_s": best, "p50_ms": batch / best * 1e3,
                                          "rounds": per[n]}
    out = {"threads": args.threads, "quick": args.quick,
           "metric": "compute only, best of rounds of the median run", "results": results}
    lines = ["# ONNX Runtime speed of the grid forms (CPU, compute only)", "",
             f"onnxruntime {ort.__version__}, torch {torch.__version__}, {args.threads} threads"
             + (" (quick run: not a measurement)" if args.quick else ""), "",
             "| graph | " + " | ".join(f"batch {b} img/s" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{results[n][str(b)]['img_per_s']:,.0f}"
                                              for b in batches) + " |")
    write_results("export_grid_speed", out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
