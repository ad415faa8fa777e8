"""Pictures of training: what the STN does to test images, and the learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stn_deploy.data import ImageSet, normalize
from stn_deploy.fileio import atomic_path
from stn_deploy.model import STNClassifier


def _grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    from torchvision.utils import make_grid

    return make_grid(images.float() / 255.0, nrow=nrow, padding=2, pad_value=1.0)


@torch.no_grad()
def save_transforms(model: STNClassifier, data: ImageSet, path: str | Path, n: int = 32,
                    health: Any = None, distort: str | None = None) -> None:
    """Test images beside their STN-warped versions, as the seed and the PyTorch tutorial show;
    the caption states the STN's health, so a picture of a collapsed STN says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = model.config
    model = model.eval().cpu()
    # Evenly spaced: test sets sorted by class (imagefolder) would otherwise show one class.
    images = data.images[torch.linspace(0, len(data.images) - 1, min(n, len(data.images))).long()]
    warped = model.warp(normalize(images, config))
    mean = torch.tensor(config.mean).view(1, -1, 1, 1)
    std = torch.tensor(config.std).view(1, -1, 1, 1)
    warped = ((warped * std + mean) * 255.0).clamp(0, 255)
    nrow = 8
    rows = -(-len(images) // nrow)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.9 + 5.0 * rows / nrow))
    for ax, imgs, title in ((axes[0], images, "input"), (axes[1], warped, "STN output")):
        grid = _grid(imgs, nrow).permute(1, 2, 0).numpy()
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid,
                  cmap="gray" if grid.shape[-1] == 1 else None, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    stn = "STN" if config.use_stn else "no STN (identity)"
    # ``distort`` names data distorted other than the config says (the --rts-augment probe).
    distort = distort or ("no distortion" if config.distort == "none"
                          else f"{config.distort} distortion")
    title = f"{config.dataset}, {distort}: {stn}"
    if health is not None:
        title += f"\n{health.summary()}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_curves(history: list[dict[str, float]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.grid(alpha=0.3)
    b.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    b.plot(epochs, [100 * h["test_acc"] for h in history], "o-", label="test")
    b.set_xlabel("epoch"), b.set_ylabel("top-1 accuracy (%)"), b.legend(), b.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
