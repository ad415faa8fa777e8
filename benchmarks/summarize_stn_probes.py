"""Per-epoch STN health of short CIFAR-10 probe runs, side by side.

The probes are `benchmarks/stn_recipes.py` runs on CIFAR-10 (JPEG copy), 10-epoch schedules,
several stopped early once theta had collapsed (or, for a long run still training, where it
had got to); each left its training `metrics.json`, kept in the research record under
benchmarks/results/archive/cifar_stn_probes/. Writes benchmarks/results/archive/cifar_stn_probes.md.

Usage: python benchmarks/summarize_stn_probes.py
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from _provenance import RESULTS, write_markdown
from stn_deploy.health import pct

ARCHIVE = RESULTS / "archive"
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
    # 2026-12-01: LeakyReLU in the STN (--loc-act leaky), so no unit can die.
    "improved-stnadam-affine15-leaky": "as improved-stnadam-affine15, --loc-act leaky",
    "improved-stnadam-rts50-leaky": "as improved-stnadam-rts50, --loc-act leaky",
    "rts-recipe-rts50-leaky": "as rts-recipe-rts50, --loc-act leaky",
    "rts-recipe1x-rts50-leaky": "as rts-recipe-rts50-leaky, the STN at 1x (--stn-lr-scale 1)",
    "rts-recipe1x-rts50-leaky-30ep": "as rts-recipe1x-rts50-leaky, on a 30-epoch schedule",
    # 2026-12-01, later: the 130-epoch schedule of the 84.41% model, the STN on its own AdamW
    # 1e-3 without decay, a quarter of each batch RTS-distorted; with and without being told
    # what to undo (--stn-pose-loss 1).
    "improved-stnadam-rts25-130ep": "STN on its own AdamW 1e-3 without decay, "
                                    "--rts-augment 0.25, 130-epoch schedule",
    "improved-stnadam-rts25-pose1-130ep": "as improved-stnadam-rts25-130ep, --stn-pose-loss 1",
}
# Where each probe ran (the 2026-11-25 ones on a 2-core AMD EPYC, the rest on a 2-core Xeon).
DATES = {name: "2026-12-01" for name in CHANGES if "-leaky" in name or "-130ep" in name}


def _shown(history: list[dict]) -> tuple[list[dict], bool]:
    """Every epoch of a short probe; of a long run the first five, every tenth and the last."""
    if len(history) <= 10:
        return history, False
    keep = [h for h in history if h["epoch"] <= 5 or h["epoch"] % 10 == 0 or h is history[-1]]
    return keep, True


def _series(rows: list[dict], labelled: bool, value: Any) -> str:
    return ", ".join((f"{h['epoch']}: " if labelled else "") + value(h) for h in rows)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    rows = ["| probe | change from `improved` | date | epochs run | theta spread per epoch (px) | "
            "dead regressor units per epoch | RTS-distorted test: rotation, scale undone per "
            "epoch | test accuracy at the last |",
            "|---|---|---|---:|---|---|---|---:|"]
    for path in sorted((ARCHIVE / "cifar_stn_probes").glob("*.json")):
        name = path.stem.split("_")[0]
        doc = json.loads(path.read_text())
        history = doc["history"]
        shown, labelled = _shown(history)
        spreads = _series(shown, labelled, lambda h: f"{h['stn']['theta_spread_px']:.3f}")
        # None: LeakyReLU units, which cannot die.
        dead = _series(shown, labelled, lambda h: pct(h["stn"]["dead_fraction"]))
        rts = _series([h for h in shown if "stn_rts" in h], labelled, lambda h: (
            f"{pct(h['stn_rts']['rotation_undone'])} / {pct(h['stn_rts']['scale_undone'])}"))
        rows.append(f"| {name} | {CHANGES.get(name, '?')} | {DATES.get(name, '2026-11-25')} | "
                    f"{len(history)} of {doc['options']['epochs']} | {spreads} | {dead} | "
                    f"{rts or '-'} | {100 * history[-1]['test_acc']:.2f}% |")
    head = ("CIFAR-10 (JPEG copy), 145,104-parameter model, seed 0, 1 thread per run, two runs "
            "at a time (the 130-epoch pose-loss run: both cores). Below 0.5 px theta is taken "
            "as constant (COLLAPSED); above the 32-px "
            "frame it has run away.\n\n")
    write_markdown("cifar_stn_probes", head + "\n".join(rows), folder=ARCHIVE)


if __name__ == "__main__":
    main()
