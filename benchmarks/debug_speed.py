"""How long `stn-deploy debug compare` takes on the FP32, FP16 and INT8 exports of a model,
and what share of inference time each STN stage takes on ONNX Runtime and OpenVINO
(`stn-deploy profile`).

The variants are exported through the export pipeline (`run_export`, so each one passed
export's own verification); compare runs against the checkpoint, as `debug compare` does by
default (REF exported to FP32 ONNX on the fly, inside the timed call). The compare time is the
in-process call after imports (Python start-up and imports add ~2 s to the command).
Target (the issue's): under 30 s for 256 samples on 2 cores.

Writes benchmarks/results/debug_speed.{json,md}.
Usage: python benchmarks/debug_speed.py [--checkpoint export/demo/train/last.pt]
       [--samples 256] [--batch-sizes 1,64,256] [--iterations 50]
A smoke run: --samples 16 --batch-sizes 1 --iterations 2 --results-dir /tmp/x
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from _provenance import RESULTS, write_results
from stn_deploy.debug import compare, profile
from stn_deploy.export.pipeline import ExportRequest, run_export

PRECISIONS = ("fp32", "fp16", "int8")
STAGES = ("localization", "theta", "grid", "sampler", "classifier")


def export_variants(checkpoint: Path, opset: int, folder: Path,
                    data_dir: Path | None) -> dict[str, Path]:
    out = {}
    for precision in PRECISIONS:
        req = ExportRequest(checkpoint=checkpoint, precision=precision, opset=opset,
                            with_theta=True, out=folder / f"{precision}.onnx", data_dir=data_dir)
        out[precision] = run_export(req, echo=lambda _line: None).path
        print(f"exported {precision}: {out[precision]}", flush=True)
    return out


def time_compare(variant: Path, checkpoint: Path, samples: int,
                 data_dir: Path | None) -> dict[str, Any]:
    start = time.perf_counter()
    report = compare(variant, checkpoint, samples=samples, data_dir=data_dir)
    seconds = time.perf_counter() - start
    first = report.first
    return {"seconds": seconds, "samples": report.samples, "nodes": len(report.rows),
            "passed": report.passed,
            "first_divergent": None if first is None else
            {"node": first.node, "stage": first.stage, "reason": first.reason},
            "top1_agreement": report.end_to_end.get("top1_agreement")}


def profile_rows(variant: Path, precision: str, batch_sizes: tuple[int, ...],
                 iterations: int, threads: int | None) -> list[dict[str, Any]]:
    rows = []
    for backend in ("onnxruntime", "openvino"):
        report = profile(variant, backend, batch_sizes, iterations=iterations, threads=threads)
        for run in report.runs:
            rows.append({"precision": precision, "backend": backend, "version": run.version,
                         "batch_size": run.batch_size, "wall_ms": run.wall_ms,
                         "kernel_ms": run.kernel_ms, "shares": run.shares,
                         "stn_share": run.stn_share, "threads": report.threads})
            print(f"{precision} {backend} batch {run.batch_size}: STN "
                  f"{100 * run.stn_share:.1f}%", flush=True)
    return rows


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# debug compare speed and STN time shares", "",
             f"Checkpoint {doc['checkpoint']}, opset {doc['opset']}, "
             f"{doc['samples']} samples for compare (target: under 30 s on 2 cores).", "",
             "| variant | compare (s) | samples | nodes | first divergent |",
             "|---|---|---|---|---|"]
    for precision, c in doc["compare"].items():
        first = c["first_divergent"]
        where = "none" if first is None else f"{first['node']} ({first['stage']})"
        lines.append(f"| {precision} | {c['seconds']:.1f} | {c['samples']} | {c['nodes']} | "
                     f"{where} |")
    lines += ["", "Share of kernel time per stage (`stn-deploy profile`):", "",
              "| variant | runtime | batch | ms/run (wall) | "
              + " | ".join(STAGES) + " | STN total |",
              "|---|---|---|---|" + "---|" * len(STAGES) + "---|"]
    for r in doc["profile"]:
        shares = " | ".join(f"{100 * r['shares'].get(s, 0.0):.1f}%" for s in STAGES)
        lines.append(f"| {r['precision']} | {r['backend']} {r['version'].split('-')[0]} | "
                     f"{r['batch_size']} | {r['wall_ms']:.3g} | {shares} | "
                     f"{100 * r['stn_share']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("export/demo/train/last.pt"))
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-sizes", default="1,64,256")
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="the checkpoint's dataset folder (CIFAR-10 JPEG copy: imagefolder)")
    ap.add_argument("--name", default="debug_speed",
                    help="results file name (one per model, e.g. debug_speed_cifar10)")
    args = ap.parse_args()
    if not args.checkpoint.is_file():
        raise SystemExit(f"{args.checkpoint} not found: run `stn-deploy demo` first or pass "
                         "--checkpoint")
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    doc: dict[str, Any] = {"checkpoint": str(args.checkpoint), "opset": args.opset,
                           "data_dir": None if args.data_dir is None else str(args.data_dir),
                           "samples": args.samples, "compare": {}, "profile": []}
    with tempfile.TemporaryDirectory(prefix="debug-speed-") as tmp:
        variants = export_variants(args.checkpoint, args.opset, Path(tmp), args.data_dir)
        for precision, path in variants.items():
            doc["compare"][precision] = time_compare(path, args.checkpoint, args.samples,
                                                     args.data_dir)
            print(f"compare {precision}: {doc['compare'][precision]['seconds']:.1f} s",
                  flush=True)
        for precision, path in variants.items():
            doc["profile"] += profile_rows(path, precision, batch_sizes, args.iterations,
                                           args.threads)
    md = markdown(doc)
    json_path, md_path = write_results(args.name, doc, md, folder=args.results_dir)
    print(md)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
