"""Per-epoch STN health of short CIFAR-10 probe runs, side by side.

The probes are `benchmarks/stn_recipes.py` runs on CIFAR-10 (JPEG copy), 10-epoch schedules,
several stopped early once theta had collapsed; each left its training `metrics.json`, kept
under benchmarks/results/cifar_stn_probes/. Writes benchmarks/results/cifar_stn_probes.md.

Usage: python benchmarks/summarize_stn_probes.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "results"
# What each probe changed from the improved recipe (SGD, STN at 0.1x with weight decay 5e-4).
CHANGES = {
    "improved-stn-wd0": "no weight decay on the STN",
    "improved-affine15": "no STN weight decay, STN at 0.3x, --affine 15 0.1",
    "improved-adamw": "AdamW 2e-3 for all (weight decay 0.05), STN 1x without decay",
    "improved-adamw-affine15": "AdamW 1e-3 for all, STN 1x without decay, --affine 15 0.1",
    "improved-stnadam-affine15": "STN on its own AdamW 1e-3 without decay, --affine 15 0.1",
    "improved-stnadam-rts50": "STN on its own AdamW 1e-3 without decay, --rts-augment 0.5",
    "rts-recipe-rts50": "--recipe rts (AdamW 1e-3, STN 3x without decay) + crop/flip, "
                        "--rts-augment 0.5",
}


def main() -> None:
    rows = ["| probe | change from `improved` | epochs run | theta spread per epoch (px) | "
            "dead regressor units per epoch | test accuracy at the last |",
            "|---|---|---:|---|---|---:|"]
    for path in sorted((HERE / "cifar_stn_probes").glob("*.json")):
        name = path.stem.split("_")[0]
        history = json.loads(path.read_text())["history"]
        spreads = ", ".join(f"{h['stn']['theta_spread_px']:.3f}" for h in history)
        dead = ", ".join(f"{100 * h['stn']['dead_fraction']:.0f}%" for h in history)
        rows.append(f"| {name} | {CHANGES.get(name, '?')} | {len(history)} of 10 | {spreads} | "
                    f"{dead} | {100 * history[-1]['test_acc']:.2f}% |")
    head = ("CIFAR-10 (JPEG copy), 145,104-parameter model, seed 0, 1 thread per run, "
            "2026-11-25. Below 0.5 px theta is taken as constant (COLLAPSED).\n\n")
    (HERE / "cifar_stn_probes.md").write_text(head + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
