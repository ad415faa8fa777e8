"""Summarise a training run's metrics.json into a results file: final and best test accuracy,
wall time per epoch, STN health, with the provenance of every results file here.

Usage: python benchmarks/summarize_training.py RUN/metrics.json OUT.json [--dataset NAME]
Writes OUT.json and OUT.md (one line: accuracy, epochs, time)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _provenance import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("metrics")
    ap.add_argument("out")
    ap.add_argument("--dataset", default="")
    args = ap.parse_args()
    doc = json.loads(Path(args.metrics).read_text())
    hist = doc["history"]
    secs = [h["seconds"] for h in hist]
    summary = {
        "dataset": args.dataset or doc["config"]["dataset"],
        "distort": doc["config"]["distort"],
        "use_stn": doc["config"]["use_stn"],
        "recipe": doc["options"]["recipe"],
        "options": doc["options"],
        "parameters": doc["parameters"],
        "epochs": len(hist),
        "final_test_acc": hist[-1]["test_acc"],
        "best_test_acc": max(h["test_acc"] for h in hist),
        # With --ema, test_acc is the averaged weights' (the checkpoint's model), this the raw.
        "final_raw_test_acc": hist[-1].get("raw_test_acc"),
        "median_epoch_seconds": statistics.median(secs),
        "total_minutes": round(sum(secs) / 60, 1),
        # The final STN health (train's last measurement), on the test split and, with
        # --rts-augment, on it RTS-distorted: a run whose theta is constant says so here.
        "stn_health": doc.get("stn_health"),
        "stn_health_rts": doc.get("stn_health_rts"),
        "history": hist,
    }
    line = (f"{summary['dataset']} {summary['recipe']}: {100 * summary['final_test_acc']:.2f}% "
            f"after {summary['epochs']} epochs, {summary['median_epoch_seconds']:.0f} s/epoch")
    out = Path(args.out)
    write_results(out.name, summary, line, folder=out.parent)
    print(line)


if __name__ == "__main__":
    main()
