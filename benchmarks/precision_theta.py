"""Theta under FP16 and INT8: how far each precision moves the STN's sampling points, against
theta's own spread, on every test image (the issue's bound: small enough that the warped
images agree).

Exports the checkpoint with the theta output at FP32, FP16 and INT8 through the same pipeline
as `stn-deploy export` (so every figure is what export's verification measured) and writes
benchmarks/results/precision_theta.{json,md}.
Usage: python benchmarks/precision_theta.py --checkpoint export/demo/train/last.pt [--opset 17]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _provenance import write_results
from stn_deploy.export.pipeline import ExportRequest, run_export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "fp16", "int8"):
            req = ExportRequest(checkpoint=args.checkpoint, precision=precision,
                                opset=args.opset, with_theta=True, data_dir=args.data_dir,
                                out=Path(tmp) / f"{precision}.onnx")
            result = run_export(req, echo=lambda _line: None)
            rep = result.report
            rows.append({"precision": precision, "samples": rep.samples,
                         "theta_max_px": rep.theta_max_px,
                         "theta_spread_px": rep.theta_spread_px,
                         "theta_max_abs": rep.theta_max_abs,
                         "bound_px": rep.tolerances.theta_px,
                         "agreement": rep.agreement, "accuracy_ref": rep.accuracy_ref,
                         "accuracy_onnx": rep.accuracy_onnx, "passed": rep.passed})
            print(rows[-1], flush=True)
    doc = {"checkpoint": str(args.checkpoint), "opset": args.opset, "rows": rows}
    md = [f"{args.checkpoint}, opset {args.opset}", "",
          "| precision | images | theta shift, max (px) | theta spread (px) | shift / spread |"
          " bound (px) | top-1 agreement | accuracy (PyTorch -> ONNX) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = r["theta_max_px"] / r["theta_spread_px"] if r["theta_spread_px"] else float("nan")
        md.append(f"| {r['precision']} | {r['samples']} | {r['theta_max_px']:.2g} | "
                  f"{r['theta_spread_px']:.2f} | {share:.2g} | {r['bound_px']:g} | "
                  f"{100 * r['agreement']:.2f}% | {r['accuracy_ref']:.2f}% -> "
                  f"{r['accuracy_onnx']:.2f}% |")
    write_results("precision_theta", doc, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
