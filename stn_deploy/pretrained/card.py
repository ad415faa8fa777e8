"""A shipped model's card, written from its record alone, so that the card, the record the
commands read and the recipe cannot disagree (``benchmarks/cifar10_recipe.py --ship`` writes
both; ``tests/test_pretrained.py`` holds a shipped card equal to what its record writes)."""

from __future__ import annotations

import json
from typing import Any

from stn_deploy.health import pct



def _epochs(record: dict[str, Any]) -> str:
    planned = record.get("epochs_planned", record["epochs"])
    done = record["epochs"]
    return f"{done} epochs" if done >= planned else f"{done} of its {planned} epochs so far"


def _in_progress(record: dict[str, Any]) -> list[str]:
    """The card's first words for weights shipped before their run ended: a user comparing
    this card's accuracy with the recipe's must know these are not its final weights."""
    if record.get("complete", True):
        return []
    return [f"**Training in progress**: these are the weights after epoch {record['epochs']} "
            f"of the recipe's {record['epochs_planned']}, shipped so that the model can be "
            "tried now; the files and this card are replaced when the run ends. Every figure "
            f"below is epoch {record['epochs']}'s.", ""]


def model_card(record: dict[str, Any]) -> str:
    """The markdown card of a record as ``benchmarks/cifar10_recipe.py`` writes it."""
    name, data = record["name"], record["data"]
    health = record.get("stn_health") or {}
    undone = (record.get("stn_health_rts") or {}).get("undone") or {}
    lines = [
        f"# {name}", "", *_in_progress(record),
        f"A Spatial Transformer Network classifier trained on {data}: a localization net "
        "regresses a 2x3 affine theta, `affine_grid` and `grid_sample` warp the image, and a "
        f"CNN classifies the warped image. {record['parameters']:,} parameters.", "",
        "## Use it", "",
        "```bash",
        f"stn-deploy export --pretrained {name} --opset 16      # your own ONNX of it",
        f"stn-deploy bench --pretrained {name} --data-dir DIR   # DIR: the CIFAR-10 JPEG folder",
        "```", "",
        "```python",
        "import stn_deploy",
        f'shipped = stn_deploy.pretrained_model("{name}")  # .checkpoint .onnx .card .record',
        "net = shipped.model()  # the torch module, eval mode",
        "```", "",
        "Input: float NCHW 3x32x32, RGB scaled to [0, 1] then normalised by the mean and std "
        "in the ONNX metadata; outputs `logits` (10 classes, CIFAR-10's order) and `theta`.", "",
        f"## Measured ({data} test split, {record.get('onnx_images', 10000):,} images)", "",
        f"- Top-1 of the checkpoint: {pct(record['test_accuracy'], 2)}; of the ONNX file run by "
        f"ONNX Runtime alone: {pct(record['onnx_accuracy'], 2)}.",
        f"- The STN transforms: theta spread {record['onnx_theta_spread_px']:.3f} px on the "
        f"test images (ONNX Runtime; collapsed: {health.get('collapsed')}).",
    ]
    parts = [f"{pct(undone[k])} of the {k}" for k in ("rotation", "scale", "translation")
             if undone.get(k) is not None]
    if parts:
        lines.append(f"- On the RTS-distorted copy of the test split it undoes "
                     f"{', '.join(parts[:-1])}{' and ' if len(parts) > 1 else ''}{parts[-1]}.")
    if record.get("onnx_theta_at_rest") is not None:
        lines.append(f"- On {pct(record['onnx_theta_at_rest'])} of the (upright) test images "
                     "theta rests: it stays within 0.01 px of its median, the value the "
                     "regressor gives when the localization net finds nothing to undo.")
    lines += [
        "", "## Recipe", "",
        f"`{record['command']}` ({_epochs(record)}; resumable with `--resume`; "
        "`benchmarks/cifar10_recipe.py` runs it and writes the curve). Values:", "",
        "```json", json.dumps(record["recipe_values"], indent=1, sort_keys=True), "```", "",
        "## Limits", "",
        f"Trained on {data}, 32x32 images: other image domains and sizes need training "
        "(`stn-deploy train --dataset imagefolder`). The STN was taught to undo the rotation, "
        "scale and translation of `--distort rts`; on upright CIFAR-10 images it moves little.",
        "", "## Files", "",
        f"- `{name}.pt` (weights, no optimizer state) sha256 `{record['checkpoint_sha256']}`",
        f"- `{name}.onnx` (FP32, opset 17, verified against the checkpoint) sha256 "
        f"`{record['onnx_sha256']}`",
        f"- Trained {record['trained']}.", ""]
    return "\n".join(lines)
