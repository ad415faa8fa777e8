"""What each training step does to its uint8 images before normalising them, and the
RTS-distorted test copy that shows what the STN undoes on undistorted data."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from stn_deploy.data import (TEST_SEED_OFFSET, DataBundle, ImageSet, distort, rts_thetas,
                             warp_images)
from stn_deploy.training.options import TrainOptions


def augment_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop with 4-pixel zero padding and horizontal flip, per sample, on uint8."""
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, c, h, w + 8)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, c, h, w)
    out = torch.gather(out, 3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def affine_batch(x: Tensor, generator: torch.Generator, max_deg: float,
                 max_scale: float) -> Tensor:
    """A random rotation and zoom about the centre of each uint8 image.

    On undistorted data this is what gives the STN something to undo: without it the
    CIFAR-10 STN's theta ends up the same for every image.
    """
    u = torch.rand(len(x), 2, generator=generator) * 2 - 1
    angle = u[:, 0] * math.radians(max_deg)
    scale = 1 + u[:, 1] * max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros_like(cos)
    # Sampling theta of the forward map p = s R q: q = R^T p / s.
    thetas = torch.stack([torch.stack([cos, sin, zero], -1),
                          torch.stack([-sin, cos, zero], -1)], -2)
    return warp_images(x, thetas)


def rts_batch(x: Tensor, seed: int, share: float) -> tuple[Tensor, Tensor]:
    """A fresh ``--distort rts`` distortion for ``share`` of the uint8 images, and every
    image's sampling theta (identity for the rest).

    Training-time RTS for data that is not distorted (CIFAR-10): the STN gets a pose to undo,
    and the undistorted rest is the pose it should map to. The test set is left as it is.
    """
    thetas = rts_thetas(len(x), seed, clean_fraction=1 - share)
    return warp_images(x, thetas), thetas


def step_images(x: Tensor, opts: TrainOptions, generator: torch.Generator,
                rts_seed: int) -> tuple[Tensor, Tensor | None]:
    """One step's images through the augmentations asked for, in a fixed order (the draws
    follow it), and the --rts-augment thetas applied (None without it)."""
    a = opts.augment
    if a.augment:
        x = augment_batch(x, generator)
    if a.affine_deg or a.affine_scale:
        x = affine_batch(x, generator, a.affine_deg, a.affine_scale)
    if not a.rts_augment:
        return x, None
    return rts_batch(x, rts_seed, a.rts_augment)


def rts_probe(bundle: DataBundle, opts: TrainOptions) -> ImageSet | None:
    """With --rts-augment on undistorted data: the test split RTS-distorted once (seeded, as
    --distort rts distorts it), with each image's transform known.

    The undistorted test images alone cannot show whether the STN undoes the distortion it is
    trained on: the pose it should map them to is the one they have, so a working STN may
    leave them nearly alone.
    """
    if not opts.augment.rts_augment or bundle.test.applied is not None:
        return None
    return rts_test_copy(bundle.test, opts.run.seed)


def rts_test_copy(test: ImageSet, seed: int) -> ImageSet:
    """The test split RTS-distorted as rts_probe distorts it for a run of that seed."""
    images, thetas = distort(test.images, "rts", seed + TEST_SEED_OFFSET)
    return ImageSet(images, test.labels, test.classes, thetas)
