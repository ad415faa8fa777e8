"""How much of the applied distortion *could* an STN undo? The digits' own pose sets a ceiling.

STN health's "undone" compares the spread of distortion-then-theta with the spread of the
distortion alone. A perfect pose normaliser also straightens the digits' own slant and evens
out their own sizes, which the distortion did not apply, so its composed transforms keep a
spread of their own and "undone" stays below 100% however good the STN is.

This script measures that from a checkpoint trained on ``--distort rts`` data: it runs the
STN on each test image undistorted (theta_u, what it does to the digit's own pose) and
distorted (theta_d), and reports per component
- ``undone``: the health figure, 1 - spread(D then theta_d) / spread(D);
- ``own pose``: the spread of theta_u, what the STN changes on images nobody distorted;
- ``undone, own pose aside``: 1 - spread(D then theta_d, minus theta_u per image) / spread(D):
  how far the STN maps each distorted image to where it maps that image undistorted;
- ``undone within each class``: the health figure with each class's own canonical pose
  allowed (spreads within each class, pooled);
- the classes' mean rotations after distortion and STN: one canonical pose for all, or one
  per class.

Usage: python benchmarks/stn_pose_ceiling.py CHECKPOINT [CHECKPOINT ...] --name NAME
           [--labels A,B,...]
Writes benchmarks/results/stn_pose_ceiling_<NAME>.{json,md}.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from _provenance import write_results
from stn_deploy.checkpoint import load_checkpoint
from stn_deploy.data import (CANVAS_FACTOR, TEST_SEED_OFFSET, load_split, normalize, prepare,
                             warp_images)
from stn_deploy.errors import StnDeployError
from stn_deploy.health import StnHealth, compose, decompose, measure, pct


def _thetas(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.stn.theta(normalize(images, model.config)).double().numpy()


def _wrap(deg: np.ndarray) -> np.ndarray:
    return (deg + 180.0) % 360.0 - 180.0


def _spread(parts: dict[str, np.ndarray]) -> dict[str, float]:
    rot = _wrap(parts["rotation_deg"] - parts["rotation_deg"].mean())
    return {"rotation_deg": float(np.sqrt((rot ** 2).mean())),
            "log_scale": float(parts["log_scale"].std())}


def analyse(path: str) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    model = ckpt.model().eval()
    cfg = ckpt.config
    if cfg.distort not in ("rts", "rts-canvas") or model.stn is None:
        raise SystemExit(f"{path}: needs an STN checkpoint trained on --distort rts data")
    seed = int(ckpt.train_args.get("seed", 0) or 0)
    size = round(cfg.image_size / CANVAS_FACTOR) if cfg.distort == "rts-canvas" \
        else cfg.image_size
    clean = prepare(load_split(cfg.dataset, "test", None, image_size=size), size, "none", 0)
    # The same seed as load_dataset's test split, so these are the images health measures.
    distorted = prepare(clean, size, cfg.distort, seed + TEST_SEED_OFFSET)
    assert distorted.applied is not None
    applied = distorted.applied.double().numpy()
    if cfg.distort == "rts-canvas":  # the undistorted image centred on the canvas, at scale 1
        base = torch.tensor([[CANVAS_FACTOR, 0.0, 0.0], [0.0, CANVAS_FACTOR, 0.0]]).expand(
            len(clean), 2, 3)
        theta_u = _thetas(model, warp_images(clean.images, base, cfg.image_size))
        own = compose(base.double().numpy(), theta_u)
    else:
        theta_u = _thetas(model, clean.images)
        own = theta_u
    theta_d = _thetas(model, distorted.images)
    composed = decompose(compose(applied, theta_d))
    own_parts = decompose(own)
    before = _spread(decompose(applied))
    after = _spread(composed)
    own_spread = _spread(own_parts)
    aside = _spread({k: composed[k] - own_parts[k] for k in ("rotation_deg", "log_scale")})
    health = measure(model, distorted.images, applied=applied, labels=distorted.labels)
    row: dict[str, Any] = {"checkpoint": str(path), "seed": seed, "epochs": ckpt.epoch,
                           "dataset": cfg.dataset, "distort": cfg.distort,
                           "test_acc": ckpt.history[-1]["test_acc"] if ckpt.history else None,
                           "images": len(clean), "applied_spread": before,
                           "composed_spread": after, "own_pose_spread": own_spread,
                           "composed_minus_own_spread": aside, "health": health.to_dict()}
    # Where each class ends up: one canonical pose for all, or one per class.
    labels = distorted.labels.numpy()
    row["class_rotation_deg"] = [round(float(_wrap(composed["rotation_deg"][labels == c]).mean()), 1)
                                 for c in range(int(labels.max()) + 1)]
    within = health.undone_within_class if isinstance(health, StnHealth) else None
    for key, name in (("rotation_deg", "rotation"), ("log_scale", "scale")):
        row[f"{name}_undone"] = 1 - after[key] / before[key]
        row[f"{name}_undone_own_pose_aside"] = 1 - aside[key] / before[key]
        row[f"{name}_undone_within_class"] = (within or {}).get(name)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--name", required=True)
    ap.add_argument("--labels", default=None, help="comma-separated, one per checkpoint")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = args.labels.split(",") if args.labels else args.checkpoints
    if len(labels) != len(args.checkpoints):
        ap.error("--labels needs one label per checkpoint")
    try:
        rows = [{"label": label, **analyse(p)} for label, p in zip(labels, args.checkpoints)]
    except StnDeployError as e:
        raise SystemExit(f"Error: {e}") from None
    doc = {"rows": rows}
    md = ["STN pose ceiling; spreads: rotation in degrees, scale as std of log scale", "",
          "| checkpoint | seed | test acc | applied rot / scale | STN on undistorted: rot / "
          "scale | rotation undone | scale undone | rotation undone, own pose aside | scale "
          "undone, own pose aside | rotation / scale undone within each class | the classes' "
          "mean rotations (deg) |",
          "|---|---:|---:|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        a, o = r["applied_spread"], r["own_pose_spread"]
        acc = "-" if r["test_acc"] is None else f"{100 * r['test_acc']:.2f}%"
        md.append(f"| {r['label']} | {r['seed']} | {acc} | {a['rotation_deg']:.1f} / "
                  f"{a['log_scale']:.3f} | {o['rotation_deg']:.1f} / {o['log_scale']:.3f} | "
                  f"{pct(r['rotation_undone'])} | {pct(r['scale_undone'])} | "
                  f"{pct(r['rotation_undone_own_pose_aside'])} | "
                  f"{pct(r['scale_undone_own_pose_aside'])} | "
                  f"{pct(r['rotation_undone_within_class'])} / "
                  f"{pct(r['scale_undone_within_class'])} | "
                  f"{' '.join(f'{d:+.0f}' for d in r['class_rotation_deg'])} |")
    write_results(f"stn_pose_ceiling_{args.name}", doc, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
