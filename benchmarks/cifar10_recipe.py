"""Train the shipped CIFAR-10 model's recipe (`--recipe cifar10-stn`), measure it, and ship it.

One run of the recipe takes hours of both cores (300 epochs; about 80-90 s per epoch on a
2-core Zen 3), so everything here continues where it stopped: training resumes from the run
folder's last.pt, and the results are rewritten from what the run holds so far (a run in
progress gets a partial curve, marked so). Never time anything beside it: it takes both cores.

    python benchmarks/cifar10_recipe.py --data-dir ~/.cache/stn-deploy/cifar10-jpeg
        trains (or resumes) runs/cifar10-stn, then, once all epochs are done, exports the FP32
        ONNX (verified by export), evaluates it with ONNX Runtime alone on the 10,000 test
        images, and writes benchmarks/results/cifar10_recipe.{json,md} and the curve
    ... --stop-after N       train up to epoch N only (resume later with the same command)
    ... --report-only        no training: the results of what the run folder holds
    ... --ablation NAME,...  the short-schedule ablations (ABLATIONS below) at --epochs
    ... --ship               also copy the checkpoint (weights only) and the ONNX into
                             stn_deploy/pretrained/ with their record and model card; a run
                             in progress ships as it stands, its card saying so
A run in progress leaves its resumable checkpoint in benchmarks/results/ (IN_PROGRESS) so that
another machine can continue it.

The data: `mkdir -p ~/.cache/stn-deploy/cifar10-jpeg && tar xzf cifar10-jpeg.tar.gz -C` that
folder (CIFAR-10 as JPEGs, `train/` and `test/` with a folder per class); every figure from it
is "CIFAR-10 (JPEG copy)".
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from _provenance import CHECKOUT, RESULTS, provenance, write_results
from stn_deploy.health import pct

RECIPE = "cifar10-stn"
IN_PROGRESS = "cifar10_recipe_in_progress.pt"  # a run's resumable state, between machines
DATA_NOTE = "CIFAR-10 (JPEG copy)"
# The components the recipe keeps, each trained without it on a short schedule beside the
# recipe itself on the same schedule. The weight average (--ema) needs no run of its own:
# every epoch records the raw weights' accuracy too, and the long schedule is compared with
# the 130-epoch run of the same recipe without the average (ARCHIVED_130).
ABLATIONS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "no-label-smoothing": {"label-smoothing": 0},
    "no-crop-flip": {"no-augment": None},
    "no-rts-pose": {"rts-augment": 0, "stn-pose-loss": 0},
}
ARCHIVED_130 = (RESULTS / "archive" / "cifar_stn_probes"
                / "improved-stnadam-rts25-pose1-130ep_done_ep130.json")


def train(run_dir: Path, data_dir: Path, epochs: int | None, stop_after: int | None,
          extra: dict[str, Any] | None = None) -> None:
    """`stn-deploy train` as a user types it, resumed from the folder's last.pt if it has one."""
    cmd = [sys.executable, "-m", "stn_deploy", "train", "--dataset", "imagefolder",
           "--data-dir", str(data_dir), "--recipe", RECIPE, "--out-dir", str(run_dir)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if stop_after is not None:
        cmd += ["--stop-after", str(stop_after)]
    for flag, value in (extra or {}).items():
        cmd += [f"--{flag}"] + ([] if value is None else [str(value)])
    if (run_dir / "last.pt").is_file():
        cmd += ["--resume"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def curve(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per epoch: what the plot and the table show (the kept weights' test accuracy, the raw
    weights', the RTS-distorted copy's and how much of its rotation the STN undid)."""
    rows = []
    for h in history:
        rts = h.get("stn_rts") or {}
        rows.append({"epoch": h["epoch"], "train_acc": h.get("train_acc"),
                     "test_acc": h.get("test_acc"), "raw_test_acc": h.get("raw_test_acc"),
                     "rts_test_acc": h.get("rts_test_acc"),
                     "rotation_undone": rts.get("rotation_undone"),
                     "theta_spread_px": (h.get("stn") or {}).get("theta_spread_px"),
                     "lr": h.get("lr"), "seconds": h.get("seconds")})
    return rows


def onnx_accuracy(onnx_path: Path, data_dir: Path) -> dict[str, Any]:
    """Top-1 on the test split and theta's spread by ONNX Runtime alone: the file, its
    metadata's normalisation, and the images; no torch model in the loop."""
    import numpy as np
    import onnxruntime as ort

    from stn_deploy.data import load_split
    from stn_deploy.health import at_rest_fraction, theta_spread_px

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    config = json.loads(session.get_modelmeta().custom_metadata_map["stn_deploy.config"])
    test = load_split("imagefolder", "test", data_dir, classes=tuple(config["class_names"]))
    images = test.images.numpy().astype(np.float32) / 255.0
    mean = np.asarray(config["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config["std"], np.float32).reshape(1, -1, 1, 1)
    name = session.get_inputs()[0].name
    logits, thetas = [], []
    for i in range(0, len(images), 500):
        out = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {name: (images[i:i + 500] - mean) / std})))
        logits.append(out["logits"])
        thetas.append(out["theta"])
    labels, theta = test.labels.numpy(), np.concatenate(thetas)
    correct = int((np.concatenate(logits).argmax(1) == labels).sum())
    return {"images": int(len(labels)), "correct": correct, "accuracy": correct / len(labels),
            "theta_spread_px": theta_spread_px(theta, config["image_size"]),
            "theta_at_rest": at_rest_fraction(theta, config["image_size"])}


def export_onnx(run_dir: Path, data_dir: Path) -> Path:
    """The FP32 ONNX of the run's checkpoint through `stn-deploy export` (verified there),
    with theta as its second output: a user sees what the STN does without torch."""
    out = run_dir / f"{RECIPE}.onnx"
    subprocess.run([sys.executable, "-m", "stn_deploy", "export", str(run_dir / "last.pt"),
                    "--opset", "17", "--with-theta", "--out", str(out), "--data-dir",
                    str(data_dir), "--verify-samples", "all"], check=True)
    return out


def ablation_rows(folder: Path) -> list[dict[str, Any]]:
    """One row per finished short-schedule run: its last epoch against the recipe's."""
    rows = []
    for name in ABLATIONS:
        metrics = folder / name / "metrics.json"
        if not metrics.is_file():
            continue
        m = json.loads(metrics.read_text())
        last = curve(m["history"][-1:])[0]  # the accuracies, as the curve reads them
        rts = m.get("stn_health_rts") or {}
        rows.append({"run": name, "changes": ABLATIONS[name], "epochs": last["epoch"],
                     **{k: last[k] for k in ("test_acc", "raw_test_acc", "rts_test_acc",
                                             "train_acc")},
                     "rotation_undone": (rts.get("undone") or {}).get("rotation"),
                     "theta_spread_px": m["stn_health"]["theta_spread_px"],
                     "collapsed": m["stn_health"]["collapsed"]})
    return rows


def long_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the full schedule: the average against the raw weights (the same run) and
    300 epochs against the 130-epoch run of this recipe without the average."""
    last = history[-1]
    rows = [{"run": f"{RECIPE}, {last['epoch']} epochs, averaged weights (what ships)",
             "test_acc": last["test_acc"]},
            {"run": f"{RECIPE}, {last['epoch']} epochs, raw weights (no --ema)",
             "test_acc": last.get("raw_test_acc")}]
    if ARCHIVED_130.is_file():
        old = json.loads(ARCHIVED_130.read_text())["history"][-1]
        rows.append({"run": "the same recipe, 130 epochs, raw weights (archived run)",
                     "test_acc": old["test_acc"]})
    return rows


def stn_health(metrics: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """The STN's health: the complete run's final measurement, or, for a run in progress
    (its metrics.json has none yet), the last epoch's headline in the same shape."""
    if metrics.get("stn_health") is not None:
        return {"stn_health": metrics["stn_health"],
                "stn_health_rts": metrics.get("stn_health_rts")}
    stn, rts = last.get("stn") or {}, last.get("stn_rts") or {}
    keys = ("collapsed", "theta_spread_px", "dead_fraction")
    return {"stn_health": {k: stn.get(k) for k in keys},
            "stn_health_rts": {**{k: rts.get(k) for k in keys},
                               "undone": {"rotation": rts.get("rotation_undone"),
                                          "scale": rts.get("scale_undone")}} if rts else None}


def summary(run_dir: Path, data_dir: Path, ablations: Path, evaluate: bool) -> dict[str, Any]:
    """Everything the results file says, from the run folder as it stands. The ONNX is
    exported and evaluated once the run is complete, or before then when ``evaluate`` (a
    run in progress shipped as it stands)."""
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.training.options import RECIPES

    ckpt = load_checkpoint(run_dir / "last.pt")
    epochs = int(ckpt.train_args["epochs"])
    done = ckpt.epoch >= epochs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out: dict[str, Any] = {
        "data": DATA_NOTE, "recipe": RECIPE, "recipe_values": RECIPES[RECIPE],
        "command": f"stn-deploy train --dataset imagefolder --data-dir DIR --recipe {RECIPE}",
        "parameters": metrics["parameters"], "epochs_done": ckpt.epoch, "epochs": epochs,
        "complete": done, "curve": curve(ckpt.history), "long_schedule": long_rows(ckpt.history),
        "ablations": ablation_rows(ablations),
        **stn_health(metrics, ckpt.history[-1]),
    }
    if done or evaluate:
        onnx_path = export_onnx(run_dir, data_dir)
        out["onnx"] = {"file": onnx_path.name, **onnx_accuracy(onnx_path, data_dir)}
    return out


def markdown(res: dict[str, Any]) -> str:
    last = res["curve"][-1]
    state = ("complete" if res["complete"] else
             f"IN PROGRESS: {res['epochs_done']} of {res['epochs']} epochs")
    lines = [f"# The `{RECIPE}` recipe on {DATA_NOTE} ({state})", "",
             *([] if res["complete"] else [
                 f"The run's resumable state is `{IN_PROGRESS}` beside this file: copy it to "
                 f"`runs/{RECIPE}/last.pt` and run `benchmarks/cifar10_recipe.py` to continue.",
                 ""]),
             f"`{res['command']}`: {res['parameters']:,} parameters. Each epoch's seconds are "
             "wall time on the machine that ran it, pauses and other load included (runs "
             "resume across machines).", ""]
    if "onnx" in res:
        o = res["onnx"]
        lines += [f"**Shipped ONNX, ONNX Runtime alone, {o['images']:,} test images: "
                  f"{100 * o['accuracy']:.2f}%**; theta spread {o['theta_spread_px']:.3f} px "
                  "(theta depends on the input); theta at rest (within 0.01 px of its median) on "
                  f"{100 * o['theta_at_rest']:.1f}% of the test images.", ""]
    rts = (res.get("stn_health_rts") or {}).get("undone") or {}
    if rts:
        lines += [f"STN on the RTS-distorted test copy: {100 * rts['rotation']:.0f}% of the "
                  f"rotation, {100 * rts['scale']:.0f}% of the scale undone.", ""]
    lines += ["| run | test accuracy |", "|---|---:|"]
    lines += [f"| {r['run']} | {pct(r['test_acc'], 2)} |" for r in res["long_schedule"]]
    if res["ablations"]:
        lines += ["", "Short-schedule ablations (each without one component, seed 0):", "",
                  "| run | epochs | test acc | raw weights | RTS copy | train acc (last epoch) | "
                  "rotation undone | theta spread px |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['run']} | {r['epochs']} | {pct(r['test_acc'], 2)} | "
                  f"{pct(r['raw_test_acc'], 2)} | {pct(r['rts_test_acc'], 2)} | "
                  f"{pct(r['train_acc'], 2)} | "
                  f"{pct(r['rotation_undone'])} | {r['theta_spread_px']:.3f}"
                  f"{' (COLLAPSED)' if r['collapsed'] else ''} |" for r in res["ablations"]]
    lines += ["", "## Curve", "", "| epoch | test acc | raw weights | RTS copy | rotation undone |"
              " lr | s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['epoch']} | {pct(r['test_acc'], 2)} | {pct(r['raw_test_acc'], 2)} | "
              f"{pct(r['rts_test_acc'], 2)} | {pct(r['rotation_undone'])} | {r['lr']} | "
              f"{r['seconds']} |" for r in res["curve"]]
    lines += ["", f"Last epoch {last['epoch']}: {pct(last['test_acc'], 2)}. The plot: "
              "cifar10_recipe_curves.png."]
    return "\n".join(lines) + "\n"



def ship(run_dir: Path, res: dict[str, Any], prov: dict[str, Any], folder: Path | None) -> None:
    """The checkpoint and the ONNX into the package (stn_deploy.pretrained.ship), with the
    record of what they measured here; the model card is written from that record."""
    from stn_deploy.pretrained import ship as ship_files

    last = res["curve"][-1]
    facts = {"data": DATA_NOTE, "recipe": RECIPE, "command": res["command"],
             "parameters": res["parameters"], "epochs": res["epochs_done"],
             "epochs_planned": res["epochs"], "complete": res["complete"],
             "test_accuracy": last["test_acc"], "onnx_accuracy": res["onnx"]["accuracy"],
             "onnx_images": res["onnx"]["images"],
             "onnx_theta_spread_px": res["onnx"]["theta_spread_px"],
             "onnx_theta_at_rest": res["onnx"]["theta_at_rest"],
             "stn_health": res["stn_health"], "stn_health_rts": res["stn_health_rts"],
             "recipe_values": res["recipe_values"], "trained": prov["time"][:10]}
    shipped = ship_files(RECIPE, run_dir / "last.pt", run_dir / res["onnx"]["file"], facts,
                         folder)
    print(f"shipped {RECIPE}: {shipped.checkpoint}, {shipped.onnx}, {shipped.card}", flush=True)


def keep_state(run_dir: Path, results_dir: Path, complete: bool) -> None:
    """A run in progress leaves its resumable checkpoint beside its results, so that another
    machine continues it (copy it to RUN_DIR/last.pt and run this script again); a complete
    run's is removed: the shipped weights are its record."""
    state = results_dir / IN_PROGRESS
    if complete:
        state.unlink(missing_ok=True)
    else:
        shutil.copyfile(run_dir / "last.pt", state)


def main() -> None:
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.viz import save_curves

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path,
                    default=Path("~/.cache/stn-deploy/cifar10-jpeg").expanduser())
    ap.add_argument("--run-dir", type=Path, default=CHECKOUT / "runs" / RECIPE)
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--ablation", default=None, help="comma-separated: " + ", ".join(ABLATIONS))
    ap.add_argument("--epochs", type=int, default=30, help="the ablations' schedule")
    ap.add_argument("--ship", action="store_true")
    ap.add_argument("--ship-dir", type=Path, default=None,
                    help="where --ship writes (default: the package's stn_deploy/pretrained/)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    ablations = args.run_dir.parent / f"{RECIPE}-ablations-{args.epochs}ep"
    names = args.ablation.split(",") if args.ablation else []
    unknown = [name for name in names if name not in ABLATIONS]
    if unknown:  # before any training: a typo found after an hour's run is an hour lost
        sys.exit(f"unknown ablation {unknown[0]!r}; choose from {', '.join(ABLATIONS)}")
    for name in names:
        train(ablations / name, args.data_dir, args.epochs, args.stop_after, ABLATIONS[name])
    if not args.report_only and not args.ablation:
        train(args.run_dir, args.data_dir, None, args.stop_after)
    res = summary(args.run_dir, args.data_dir, ablations, evaluate=args.ship)
    write_results("cifar10_recipe", res, markdown(res), args.results_dir)
    save_curves(load_checkpoint(args.run_dir / "last.pt").history,
                args.results_dir / "cifar10_recipe_curves.png")
    keep_state(args.run_dir, args.results_dir, res["complete"])
    if args.ship:
        ship(args.run_dir, res, provenance(), args.ship_dir)


if __name__ == "__main__":
    from stn_deploy.errors import StnDeployError

    try:
        main()
    except (StnDeployError, subprocess.CalledProcessError) as e:  # one line, not a traceback
        sys.exit(f"Error: {e}")
