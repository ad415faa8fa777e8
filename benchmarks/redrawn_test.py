"""Is the STN ahead of the classifier alone by more than the seeds' spread? Measured on many
draws of the test distortions, so that the test draw's own noise does not decide it.

Each training seed distorts its test split with its own seed (``seed + TEST_SEED_OFFSET``), so
the accuracies in a results file differ by the model *and* by the draw. On the digits one draw
is 450 images: one image is 0.22 points, and a model at 99.5% has a binomial standard error of
0.33 points on one draw, as large as the whole seed-to-seed spread. This evaluates every
checkpoint on its own draw (which reproduces the figure its training recorded) and on the same
``--draws`` fresh draws of the same test images (seeds ``REDRAW_SEED + k``, the same for every
model), and reports per group of checkpoints (one per seed) the mean, the standard deviation
and the range of the seeds' mean accuracies, and the gap between the first two groups against
both spreads.

Usage: python benchmarks/redrawn_test.py --group STN=a/last.pt,b/last.pt
           --group no-STN=c/last.pt,d/last.pt --name NAME [--draws 20] [--data-dir DIR]
Writes benchmarks/results/redrawn_test_<NAME>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from _provenance import write_results
from stn_deploy.checkpoint import load_checkpoint
from stn_deploy.data import CANVAS_FACTOR, TEST_SEED_OFFSET, ImageSet, load_split, prepare
from stn_deploy.errors import StnDeployError
from stn_deploy.training import evaluate

# Far from every training seed's test draw (seed + TEST_SEED_OFFSET for small seeds).
REDRAW_SEED = 2 * TEST_SEED_OFFSET


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "range": max(values) - min(values), "min": min(values), "max": max(values)}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None  # seeds that all scored the same: no spread to compare


class Draws:
    """The test split of one dataset, undistorted and under each draw, built once."""

    def __init__(self, data_dir: str | None, draws: int) -> None:
        self.data_dir, self.draws = data_dir, draws
        self._clean: dict[tuple[str, int], ImageSet] = {}
        self._drawn: dict[tuple[str, int, str, int], ImageSet] = {}

    def get(self, dataset: str, size: int, distort: str, seed: int) -> ImageSet:
        key = (dataset, size)
        if key not in self._clean:
            self._clean[key] = prepare(load_split(dataset, "test", self.data_dir,
                                                  image_size=size), size, "none", 0)
        dkey = (dataset, size, distort, seed)
        if dkey not in self._drawn:
            self._drawn[dkey] = prepare(self._clean[key], size, distort, seed)
        return self._drawn[dkey]


def analyse(path: str, draws: Draws) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    model = ckpt.model().eval()
    cfg = ckpt.config
    if cfg.distort not in ("rts", "rts-canvas"):
        raise SystemExit(f"{path}: needs a checkpoint trained on --distort rts data")
    seed = int(ckpt.train_args.get("seed", 0) or 0)
    size = round(cfg.image_size / CANVAS_FACTOR) if cfg.distort == "rts-canvas" \
        else cfg.image_size
    cpu = torch.device("cpu")

    def acc(draw_seed: int) -> float:
        return evaluate(model, draws.get(cfg.dataset, size, cfg.distort, draw_seed), cfg, cpu)[1]

    redrawn = [acc(REDRAW_SEED + k) for k in range(draws.draws)]
    return {"checkpoint": str(path), "seed": seed, "dataset": cfg.dataset,
            "distort": cfg.distort, "use_stn": cfg.use_stn,
            "recorded_test_acc": ckpt.history[-1]["test_acc"] if ckpt.history else None,
            "own_draw_acc": acc(seed + TEST_SEED_OFFSET), "redrawn_accs": redrawn,
            "redrawn_mean_acc": statistics.mean(redrawn)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--group", action="append", required=True,
                    help="LABEL=CKPT[,CKPT...], one checkpoint per seed; the first two groups "
                         "are compared")
    ap.add_argument("--name", required=True)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if Path(args.name).name != args.name:
        ap.error(f"--name {args.name!r}: a file name stem, not a path")
    if args.draws < 2:
        ap.error("--draws must be at least 2")
    groups: dict[str, list[str]] = {}
    for g in args.group:
        label, sep, paths = g.partition("=")
        if not sep or not label or not paths:
            ap.error(f"--group {g!r}: expected LABEL=CKPT[,CKPT...]")
        groups[label] = paths.split(",")
    if any(len(paths) < 2 for paths in list(groups.values())[:2]):
        ap.error("the two groups compared need a checkpoint per seed, at least 2 each")
    draws = Draws(args.data_dir, args.draws)
    try:
        rows = {label: [analyse(p, draws) for p in paths] for label, paths in groups.items()}
    except StnDeployError as e:
        raise SystemExit(f"Error: {e}") from None
    summary: dict[str, Any] = {
        label: {"seeds": [r["seed"] for r in rs],
                "own_draw": _spread([r["own_draw_acc"] for r in rs]),
                "redrawn": _spread([r["redrawn_mean_acc"] for r in rs])}
        for label, rs in rows.items()}
    labels = list(groups)
    comparison: dict[str, Any] | None = None
    if len(labels) >= 2:
        a, b = labels[0], labels[1]
        comparison = {"ahead": a, "behind": b}
        for kind, key in (("own_draw", "own_draw_acc"), ("redrawn", "redrawn_mean_acc")):
            sa, sb = summary[a][kind], summary[b][kind]
            gap = sa["mean"] - sb["mean"]
            behind = {r["seed"]: r[key] for r in rows[b]}
            pairs = [(r[key], behind[r["seed"]]) for r in rows[a] if r["seed"] in behind]
            comparison[kind] = {"gap": gap,
                                "gap_over_max_std": _ratio(gap, max(sa["std"], sb["std"])),
                                "gap_over_max_range": _ratio(gap, max(sa["range"], sb["range"])),
                                "seed_pairs": len(pairs),
                                "ahead_on_every_seed_pair": all(x > y for x, y in pairs)}
    doc = {"draws": args.draws, "redraw_seed": REDRAW_SEED, "groups": rows,
           "summary": summary, "comparison": comparison}
    md = [f"Test accuracy on each seed's own test draw and on {args.draws} fresh draws of the "
          "same test images", "",
          "| group | seed | recorded in training | own draw | mean of the fresh draws | "
          "lowest / highest draw |", "|---|---:|---:|---:|---:|---|"]
    for label, rs in rows.items():
        for r in rs:
            rec = "-" if r["recorded_test_acc"] is None else f"{100 * r['recorded_test_acc']:.2f}%"
            md.append(f"| {label} | {r['seed']} | {rec} | {100 * r['own_draw_acc']:.2f}% | "
                      f"{100 * r['redrawn_mean_acc']:.2f}% | {100 * min(r['redrawn_accs']):.2f}"
                      f" / {100 * max(r['redrawn_accs']):.2f}% |")
    md += ["", "| group | on | mean | std across seeds | range across seeds |",
           "|---|---|---:|---:|---:|"]
    for label, s in summary.items():
        for kind, name in (("own_draw", "own draw"), ("redrawn", f"{args.draws} fresh draws")):
            v = s[kind]
            md.append(f"| {label} | {name} | {100 * v['mean']:.2f}% | {100 * v['std']:.2f} | "
                      f"{100 * v['range']:.2f} ({100 * v['min']:.2f}-{100 * v['max']:.2f}) |")
    if comparison:
        md += ["", f"{comparison['ahead']} ahead of {comparison['behind']}:", ""]
        for kind, name in (("own_draw", "own draw"), ("redrawn", f"{args.draws} fresh draws")):
            c = comparison[kind]
            times = {k: "-" if c[k] is None else f"{c[k]:.1f}x"
                     for k in ("gap_over_max_std", "gap_over_max_range")}
            md.append(f"- {name}: by {100 * c['gap']:.2f} points, {times['gap_over_max_std']} "
                      f"the larger std, {times['gap_over_max_range']} the larger range; ahead "
                      f"on every seed: {'yes' if c['ahead_on_every_seed_pair'] else 'no'}")
    write_results(f"redrawn_test_{args.name}", doc, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
