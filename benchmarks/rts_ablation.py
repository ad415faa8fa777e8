"""STN vs no-STN on RTS-distorted images (the STN paper's setting).

Trains both with the same recipe, seeds and epochs, one after the other in one run, and writes
benchmarks/results/<dataset>_rts_ablation_<epochs>ep.{json,md}. The embedded digits have 450
test images (one image = 0.22 points); Fashion-MNIST (Debian's dataset-fashion-mnist) has
10,000, enough to tell a 0.5-point difference from noise.
Usage: python benchmarks/rts_ablation.py [--dataset digits|fashion-mnist] [--epochs 30]
       [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from _provenance import write_results
from stn_deploy.data import load_dataset
from stn_deploy.training import TrainOptions, train

DESCRIBE = {"digits": "scikit-learn digits (1,347 train / 450 test), 32x32",
            "fashion-mnist": "Fashion-MNIST (60,000 train / 10,000 test), 28x28"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipe", default="seed")
    ap.add_argument("--stn-lr-scale", type=float, default=None,
                    help="the STN's LR relative to the rest [default: the recipe's, 0.1]")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for use_stn in (True, False):
        for seed in seeds:
            opts = TrainOptions.from_recipe(args.recipe, use_stn=use_stn, epochs=args.epochs,
                                            quiet=True, device="cpu", seed=seed,
                                            stn_lr_scale=args.stn_lr_scale)
            bundle = load_dataset(args.dataset, args.data_dir, distort="rts", seed=seed,
                                  use_stn=use_stn, dropout=opts.optim.dropout)
            with tempfile.TemporaryDirectory() as tmp:
                result = train(bundle, tmp, opts)
            last = result.history[-1]
            rows.append({"use_stn": use_stn, "seed": seed, "parameters": result.parameters,
                         "test_acc": last["test_acc"],
                         "epoch_seconds": statistics.median(h["seconds"] for h in result.history)})
            print(f"stn={use_stn} seed={seed}: {100 * last['test_acc']:.2f}%", flush=True)
    summary = {}
    for use_stn in (True, False):
        accs = [r["test_acc"] for r in rows if r["use_stn"] == use_stn]
        summary["stn" if use_stn else "no_stn"] = {
            "mean_test_acc": statistics.mean(accs), "min": min(accs), "max": max(accs),
            "epoch_seconds": statistics.median(r["epoch_seconds"] for r in rows
                                               if r["use_stn"] == use_stn),
        }
    base = TrainOptions.from_recipe(args.recipe, stn_lr_scale=args.stn_lr_scale)
    doc = {"dataset": f"{DESCRIBE[args.dataset]}, RTS-distorted",
           "recipe": args.recipe, "stn_lr_scale": base.optim.stn_lr_scale, "epochs": args.epochs,
           "seeds": seeds, "runs": rows,
           "summary": summary}
    stem = f"{args.dataset.replace('-', '_')}_rts_ablation_{args.epochs}ep"
    if args.stn_lr_scale is not None:
        stem += f"_stnlr{args.stn_lr_scale:g}"
    md = ["| model | parameters | test accuracy (mean of seeds) | min | max | s/epoch |",
          "|---|---|---|---|---|---|"]
    for key, label in (("stn", "STN + classifier"), ("no_stn", "classifier only (--no-stn)")):
        s = summary[key]
        params = next(r["parameters"] for r in rows if r["use_stn"] == (key == "stn"))
        md.append(f"| {label} | {params:,} | {100 * s['mean_test_acc']:.2f}% | "
                  f"{100 * s['min']:.2f}% | {100 * s['max']:.2f}% | {s['epoch_seconds']:.1f} |")
    write_results(stem, doc, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
