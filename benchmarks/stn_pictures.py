"""What a trained STN does, as pictures: test images beside their warped versions, and, for a
model trained with --rts-augment (or any model on undistorted data), the same for the test
split RTS-distorted as train's probe distorts it. Each caption carries the STN's health.

For a run still training (or one trained before train drew the RTS copy): the pictures
train draws at its end, from any checkpoint.

Usage: python benchmarks/stn_pictures.py CHECKPOINT --name NAME [--data-dir DIR]
Writes benchmarks/results/<NAME>_transforms.png and, on undistorted data,
<NAME>_transforms_rts.png, and <NAME>_transforms.{json,md} with the health behind each
picture and where it was drawn; prints the health summaries.
"""

from __future__ import annotations

import argparse
from typing import Any

from _provenance import RESULTS, write_results
from stn_deploy.checkpoint import load_checkpoint
from stn_deploy.data import model_split
from stn_deploy.errors import StnDeployError
from stn_deploy.health import measure_set
from stn_deploy.training.augment import rts_test_copy
from stn_deploy.viz import save_transforms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--name", required=True)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    try:
        ckpt = load_checkpoint(args.checkpoint)
        model = ckpt.model().eval()
        seed = int(ckpt.train_args.get("seed", 0) or 0)
        test = model_split(ckpt.config, "test", args.data_dir, seed=seed)
    except StnDeployError as e:
        raise SystemExit(f"Error: {e}") from None
    health = measure_set(model, test)
    pictures: dict[str, Any] = {f"{args.name}_transforms.png": health}
    save_transforms(model, test, RESULTS / f"{args.name}_transforms.png", health=health)
    print(f"test split ({ckpt.epoch} epochs): {health.summary()}")
    if test.applied is None:  # the copy train's --rts-augment probe measures
        probe = rts_test_copy(test, seed)
        health_rts = measure_set(model, probe)
        pictures[f"{args.name}_transforms_rts.png"] = health_rts
        save_transforms(model, probe, RESULTS / f"{args.name}_transforms_rts.png",
                        health=health_rts, distort="test split RTS-distorted (--rts-augment)")
        print(f"test split RTS-distorted: {health_rts.summary()}")
    doc = {"checkpoint": str(args.checkpoint), "epochs": ckpt.epoch,
           "pictures": {name: h.to_dict() for name, h in pictures.items()}}
    md = [f"# STN pictures of {args.checkpoint} ({ckpt.epoch} epochs)", ""]
    md += [f"- `{name}`: {h.summary()}" for name, h in pictures.items()]
    write_results(f"{args.name}_transforms", doc, "\n".join(md))


if __name__ == "__main__":
    main()
