"""Which training keeps the STN alive? Candidate causes of a collapsed theta, one at a time.

Each variant changes the seed recipe in one or a few named ways (weight decay on the STN,
the one-cycle peak, the optimizer, fresh distortions every epoch, the STN's learning rate,
the localization net's size) and is trained on RTS-distorted data with the same seeds; for
each run the script records test accuracy and the STN's health on the test split (theta
spread in pixels, how much of the applied rotation and scale it undoes, dead regressor
units). Writes benchmarks/results/stn_recipes_<name>.{json,md}.

Usage: python benchmarks/stn_recipes.py --name digits30 --epochs 30 --seeds 0
           [--dataset digits] [--distort rts] [--variants seed,redistort,...] [--threads 1]
           [--keep DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from _provenance import write_results
from stn_deploy.data import load_dataset
from stn_deploy.health import StnHealth, pct
from stn_deploy.training import TrainOptions, train

# name -> (recipe, TrainOptions overrides, model overrides). "seed" is the design's recipe.
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "seed": ("seed", {}, {}),
    # train's default for --distort data up to 2026-11-25 (one pass); now "rts-2pass-1x".
    "rts": ("rts", {}, {"loc_net": "large"}),
    # The rts recipe before its last change (STN at 1x, every image distorted): what the
    # results files written before that change call "rts". The variants below pin the values
    # they ran with, so that they mean the same whatever the recipe becomes.
    "rts-1x": ("rts", {"stn_lr_scale": 1.0, "clean_fraction": 0.0}, {"loc_net": "large"}),
    "rts-seed-loc": ("rts", {"stn_lr_scale": 1.0, "clean_fraction": 0.0}, {"loc_net": "seed"}),
    "rts-clean10": ("rts", {"stn_lr_scale": 1.0, "clean_fraction": 0.1}, {"loc_net": "large"}),
    "rts-clean25": ("rts", {"stn_lr_scale": 1.0, "clean_fraction": 0.25}, {"loc_net": "large"}),
    "rts-clean50": ("rts", {"stn_lr_scale": 1.0, "clean_fraction": 0.5}, {"loc_net": "large"}),
    "rts-clean25-stnlr3": ("rts", {"stn_lr_scale": 3.0, "clean_fraction": 0.25},
                           {"loc_net": "large"}),
    "rts-clean50-stnlr3": ("rts", {"stn_lr_scale": 3.0, "clean_fraction": 0.5},
                           {"loc_net": "large"}),
    "rts-clean10-no-stn": ("rts", {"clean_fraction": 0.1}, {"use_stn": False}),
    "rts-clean25-no-stn": ("rts", {"clean_fraction": 0.25}, {"use_stn": False}),
    "no-stn": ("seed", {}, {"use_stn": False}),
    # CIFAR-10 (no distortion): what keeps theta input-dependent under the improved recipe.
    "improved": ("improved", {}, {}),
    "improved-stn-wd0": ("improved", {"stn_weight_decay": 0.0}, {}),
    "improved-stn-wd0-lr0.3": ("improved", {"stn_weight_decay": 0.0, "stn_lr_scale": 0.3}, {}),
    "improved-affine15": ("improved", {"affine_deg": 15.0, "affine_scale": 0.1,
                                       "stn_weight_decay": 0.0, "stn_lr_scale": 0.3}, {}),
    "improved-adamw-affine15": ("improved", {"optimizer": "adam", "lr": 1e-3,
                                             "weight_decay": 0.05, "stn_weight_decay": 0.0,
                                             "stn_lr_scale": 1.0, "affine_deg": 15.0,
                                             "affine_scale": 0.1}, {}),
    "improved-stnadam-affine15": ("improved", {"stn_optimizer": "adam", "stn_lr": 1e-3,
                                               "stn_weight_decay": 0.0, "affine_deg": 15.0,
                                               "affine_scale": 0.1}, {}),
    "improved-stnadam-rts50": ("improved", {"stn_optimizer": "adam", "stn_lr": 1e-3,
                                            "stn_weight_decay": 0.0, "rts_augment": 0.5}, {}),
    "rts-recipe-rts50": ("rts", {"rts_augment": 0.5, "augment": True}, {}),
    "improved-adamw": ("improved", {"optimizer": "adam", "lr": 2e-3, "weight_decay": 0.05,
                                    "stn_weight_decay": 0.0, "stn_lr_scale": 1.0}, {}),
    "redistort": ("seed", {"redistort": True}, {}),
    "stn-wd0": ("seed", {"stn_weight_decay": 0.0}, {}),
    "peak0.01": ("seed", {"lr": 0.01}, {}),
    "stnlr1": ("seed", {"stn_lr_scale": 1.0}, {}),
    "sgd-all": ("seed", {"redistort": True, "stn_weight_decay": 0.0, "lr": 0.01,
                         "stn_lr_scale": 1.0}, {}),
    "adam": ("seed", {"optimizer": "adam", "lr": 1e-3, "stn_lr_scale": 1.0,
                      "stn_weight_decay": 0.0, "weight_decay": 1e-4}, {}),
    "adam-redistort": ("seed", {"optimizer": "adam", "lr": 1e-3, "stn_lr_scale": 1.0,
                                "stn_weight_decay": 0.0, "weight_decay": 1e-4,
                                "redistort": True}, {}),
    "adam-redistort-large": ("seed", {"optimizer": "adam", "lr": 1e-3, "stn_lr_scale": 1.0,
                                      "stn_weight_decay": 0.0, "weight_decay": 1e-4,
                                      "redistort": True}, {"loc_net": "large"}),
    "adam-redistort-no-stn": ("seed", {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4,
                                       "redistort": True}, {"use_stn": False}),
    "sgd-all-large": ("seed", {"redistort": True, "stn_weight_decay": 0.0, "lr": 0.01,
                               "stn_lr_scale": 1.0}, {"loc_net": "large"}),
    "adam-redistort-large-stnlr3": ("seed", {"optimizer": "adam", "lr": 1e-3, "stn_lr_scale": 3.0,
                                             "stn_weight_decay": 0.0, "weight_decay": 1e-4,
                                             "redistort": True}, {"loc_net": "large"}),
    # LeakyReLU in the STN (--loc-act leaky): units that cannot die, no parameters added.
    "rts-leaky": ("rts", {}, {"loc_net": "large", "loc_act": "leaky"}),
    # Two passes of the same localization net (--stn-passes 2): it refines its own output.
    # train's default for --distort data on 2026-12-01 (the STN at 3x).
    "rts-2pass": ("rts", {}, {"loc_net": "large", "stn_passes": 2}),
    # On a 30-epoch Fashion-MNIST schedule the STN at 3x ran away at the one-cycle peak
    # (epoch 11: theta spread 2,323 px, accuracy 10%); the same at 1x: train's default for
    # --distort data from 2026-12-01 (second change) to 2026-12-02.
    "rts-2pass-1x": ("rts", {"stn_lr_scale": 1.0}, {"loc_net": "large", "stn_passes": 2}),
    # The same with --stn-warp-penalty: seed 1 of that Fashion-MNIST schedule mapped clothes
    # and footwear to poses of their own (-14 and +20 degrees); a charge on the warp prefers
    # one upright pose.
    "rts-2pass-1x-warp0.1": ("rts", {"stn_lr_scale": 1.0, "stn_warp_penalty": 0.1},
                             {"loc_net": "large", "stn_passes": 2}),
    # On the digits that charge held one seed's take-off back (epoch 20 -> 25, 37% of the
    # scale undone): the same, from the epoch after the training thetas first spread 2 px.
    # train's default for --distort data on 2026-12-02.
    "rts-2pass-1x-warp0.1-from2px": ("rts", {"stn_lr_scale": 1.0, "stn_warp_penalty": 0.1,
                                             "stn_warp_from_px": 2.0},
                                     {"loc_net": "large", "stn_passes": 2}),
    # Under it Fashion-MNIST seed 1 still gave clothes and footwear poses of their own (the
    # classes' mean rotations span 20 degrees, 59% of the rotation undone): twice the charge.
    "rts-2pass-1x-warp0.2-from2px": ("rts", {"stn_lr_scale": 1.0, "stn_warp_penalty": 0.2,
                                             "stn_warp_from_px": 2.0},
                                     {"loc_net": "large", "stn_passes": 2}),
    # Twice the charge undid more of seed 1's rotation and less of its scale (the per-image
    # charge pays for the undoing itself): the charge on each class's mean warp instead.
    # train's default for --distort data since 2026-12-02 (evening).
    "rts-2pass-1x-classwarp0.3-from2px": ("rts", {"stn_lr_scale": 1.0, "stn_warp_penalty": 0.3,
                                                  "stn_warp_from_px": 2.0,
                                                  "stn_warp_per_class": True},
                                          {"loc_net": "large", "stn_passes": 2}),
    "improved-stnadam-affine15-leaky": ("improved", {"stn_optimizer": "adam", "stn_lr": 1e-3,
                                                     "stn_weight_decay": 0.0, "affine_deg": 15.0,
                                                     "affine_scale": 0.1}, {"loc_act": "leaky"}),
    "improved-stnadam-rts50-leaky": ("improved", {"stn_optimizer": "adam", "stn_lr": 1e-3,
                                                  "stn_weight_decay": 0.0, "rts_augment": 0.5},
                                     {"loc_act": "leaky"}),
    "improved-stn-wd0-leaky": ("improved", {"stn_weight_decay": 0.0}, {"loc_act": "leaky"}),
    "adam-large": ("seed", {"optimizer": "adam", "lr": 1e-3, "stn_lr_scale": 1.0,
                            "stn_weight_decay": 0.0, "weight_decay": 1e-4}, {"loc_net": "large"}),
}


# What "improved" was when the variants built on it ran (it had no STN settings of its own
# before 2026-12-01); pinned so that they mean the same whatever the recipe becomes.
PINNED = {"improved": {"rts_augment": 0.0, "stn_pose_loss": 0.0, "stn_optimizer": None,
                       "stn_lr": None, "stn_weight_decay": None},
          # "rts" had the STN at 3x from 2026-11-25 to 2026-12-01 and no warp penalty until
          # 2026-12-02 (the variants' own overrides still win: rts-2pass-1x is 1x).
          "rts": {"stn_lr_scale": 3.0, "stn_warp_penalty": 0.0, "stn_warp_from_px": 0.0,
                  "stn_warp_per_class": False}}


def run(variant: str, dataset: str, data_dir: str | None, distort: str, epochs: int,
        seed: int, keep: Path | None = None) -> dict[str, Any]:
    recipe, overrides, model = VARIANTS[variant]
    use_stn = model.get("use_stn", True)
    opts = TrainOptions.from_recipe(recipe, use_stn=use_stn, epochs=epochs, quiet=True,
                                    device="cpu", seed=seed)
    opts = opts.replace(**{**PINNED.get(recipe, {}), **overrides})
    bundle = load_dataset(dataset, data_dir, distort=distort, seed=seed, use_stn=use_stn,
                          loc_net=model.get("loc_net", "seed"),
                          loc_act=model.get("loc_act", "relu"),
                          stn_passes=model.get("stn_passes", 1), dropout=opts.optim.dropout)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) if keep is None else keep / f"{variant}_seed{seed}"
        # A kept run that was stopped (a session's end) continues where it was.
        resume = out / "last.pt" if (out / "last.pt").is_file() else None
        result = train(bundle, out, opts, resume=resume)
    last = result.history[-1]
    row: dict[str, Any] = {"variant": variant, "seed": seed, "parameters": result.parameters,
                           "options": opts.to_dict(),
                           # Over every epoch, across a resume too.
                           "test_acc": last["test_acc"], "minutes": round(
                               sum(h["seconds"] for h in result.history) / 60, 2),
                           "history_rotation_undone": [h.get("stn", {}).get("rotation_undone")
                                                       for h in result.history],
                           "history_theta_spread_px": [h.get("stn", {}).get("theta_spread_px")
                                                       for h in result.history],
                           "history_test_acc": [h["test_acc"] for h in result.history]}
    if isinstance(result.health, StnHealth):
        row["health"] = result.health.to_dict()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--distort", default="rts")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep each run's folder (last.pt, metrics, pictures) as "
                         "KEEP/<variant>_seed<N>, e.g. for stn_pose_ceiling.py; a stopped run "
                         "found there is resumed")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.name or Path(args.name).name != args.name:
        ap.error(f"--name {args.name!r}: a file name stem, not a path")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []
    for variant in variants:
        for seed in seeds:
            row = run(variant, args.dataset, args.data_dir, args.distort, args.epochs, seed,
                      args.keep)
            rows.append(row)
            h = row.get("health", {})
            print(f"{variant} seed={seed}: {100 * row['test_acc']:.2f}%  "
                  f"spread {h.get('theta_spread_px', 0):.2f}px  "
                  f"rot undone {pct((h.get('undone') or {}).get('rotation'))}  "
                  f"scale undone {pct((h.get('undone') or {}).get('scale'))}  "
                  f"dead {pct(h.get('dead_fraction'))}  ({row['minutes']} min)", flush=True)
            write(args, seeds, rows)  # after every run: a long sweep keeps what it has


def write(args: argparse.Namespace, seeds: list[int], rows: list[dict[str, Any]]) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    summary = {}
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        accs = [r["test_acc"] for r in mine]
        undone = [(r.get("health") or {}).get("undone") or {} for r in mine]
        summary[variant] = {
            "runs": len(mine), "mean_test_acc": statistics.mean(accs),
            "min_test_acc": min(accs), "max_test_acc": max(accs),
            "mean_rotation_undone": (statistics.mean(u["rotation"] for u in undone)
                                     if all("rotation" in u for u in undone) else None),
            "mean_scale_undone": (statistics.mean(u["scale"] for u in undone)
                                  if all("scale" in u for u in undone) else None),
            "mean_theta_spread_px": (statistics.mean(r["health"]["theta_spread_px"]
                                                     for r in mine) if "health" in mine[0]
                                     else None),
        }
    doc = {"dataset": args.dataset, "distort": args.distort, "epochs": args.epochs,
           "seeds": seeds, "variants": {v: {"recipe": VARIANTS[v][0], "train": VARIANTS[v][1],
                                            "model": VARIANTS[v][2]} for v in variants},
           "summary": summary, "runs": rows}
    md = [f"{args.dataset}, --distort {args.distort}, {args.epochs} epochs, seeds {args.seeds}",
          "",
          "| variant | runs | test accuracy (mean, min-max) | rotation undone | scale undone | "
          "theta spread |", "|---|---|---|---|---|---|"]
    for v, s in summary.items():
        spread = "-" if s["mean_theta_spread_px"] is None else f"{s['mean_theta_spread_px']:.2f} px"
        md.append(f"| {v} | {s['runs']} | {100 * s['mean_test_acc']:.2f}% "
                  f"({100 * s['min_test_acc']:.2f}-{100 * s['max_test_acc']:.2f}) | "
                  f"{pct(s['mean_rotation_undone'])} | {pct(s['mean_scale_undone'])} | "
                  f"{spread} |")
    # The name as given, suffix and all: "warp0.1_seed1" has a dot of its own.
    write_results(f"stn_recipes_{args.name}", doc, "\n".join(md))


if __name__ == "__main__":
    main()
