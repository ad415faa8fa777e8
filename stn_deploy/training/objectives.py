"""The STN's own objectives: loss terms beside the classification loss, each behind one small
interface, so that adding one touches this file only (a class and a line in ``objectives``).

Each objective adds a term to every batch's loss (or none), may keep a per-image figure
summed over the epoch, and says what the epoch's history row records about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stn_deploy.model import compose_thetas
from stn_deploy.training.options import TrainOptions


@dataclass
class Batch:
    """What an objective sees of one training batch."""

    theta: Tensor  # the STN's sampling thetas, (n, 2, 3), with their gradient
    labels: Tensor
    # Each image's sampling theta of the distortion --rts-augment applied (None: none applied)
    applied: Tensor | None
    num_classes: int


class Objective:
    """A loss term for the STN, computed per batch, recorded per epoch."""

    name = ""

    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)

    def begin_epoch(self, history: list[dict[str, Any]]) -> None:
        """Before each epoch, from the rows of those before it: read from the history, so a
        resumed run decides as the uninterrupted one did."""
        self.total = torch.zeros((), dtype=torch.float64)

    def loss(self, batch: Batch) -> Tensor | None:
        """The weighted term to add to this batch's loss; None: nothing this batch."""
        raise NotImplementedError

    def row(self, mean: float) -> dict[str, Any]:
        """The epoch row's entries; ``mean``: ``total`` per training image, over all ranks."""
        return {}

    def _tally(self, per_image_mean: Tensor, n: int) -> None:
        self.total += per_image_mean.detach().double().cpu() * n


class PoseLoss(Objective):
    """--stn-pose-loss: tells the STN to undo the distortions --rts-augment applied."""

    name = "pose"

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def loss(self, batch: Batch) -> Tensor | None:
        if batch.applied is None:
            return None
        pose = pose_loss(batch.applied, batch.theta)
        self._tally(pose, len(batch.theta))
        return self.weight * pose

    def row(self, mean: float) -> dict[str, Any]:
        return {"train_pose_loss": round(mean, 5)}


class WarpPenalty(Objective):
    """--stn-warp-penalty: charges how far theta moves the sampling points (each image's, or
    with --stn-warp-per-class each class's mean), from the STN's take-off on if
    --stn-warp-from says so."""

    name = "warp"

    def __init__(self, weight: float, from_px: float = 0.0, per_class: bool = False) -> None:
        super().__init__()
        self.weight, self.from_px, self.per_class = weight, from_px, per_class
        self.active = 0.0  # this epoch's weight: 0 until the take-off

    def begin_epoch(self, history: list[dict[str, Any]]) -> None:
        """Before the take-off the charge only holds theta at the identity: on 1,347 RTS digits
        it delayed one seed's take-off and left 37% of the scale undone (52% without it)."""
        super().begin_epoch(history)
        took_off = not self.from_px or any(
            h.get("train_theta_spread_px", 0.0) >= self.from_px for h in history)
        self.active = self.weight if took_off else 0.0

    def loss(self, batch: Batch) -> Tensor | None:
        if not self.active:
            return None
        return self.active * (class_warp_penalty(batch.theta, batch.labels, batch.num_classes)
                              if self.per_class else warp_penalty(batch.theta))

    def row(self, mean: float) -> dict[str, Any]:
        return {"stn_warp_penalty": self.active}


def objectives(opts: TrainOptions) -> list[Objective]:
    """The objectives the options turn on, in the order their terms join the loss."""
    s = opts.stn
    found: list[Objective] = []
    if s.stn_pose_loss:
        found.append(PoseLoss(s.stn_pose_loss))
    if s.stn_warp_penalty:
        found.append(WarpPenalty(s.stn_warp_penalty, s.stn_warp_from_px, s.stn_warp_per_class))
    return found


# ------------------------------------------------------------------------------ the terms

def pose_loss(applied: Tensor, theta: Tensor) -> Tensor:
    """Mean squared displacement (in half-frames, over the frame) between the identity and the
    distortion followed by the STN's theta: zero when the STN undoes exactly what was applied.

    The augmentation's transform is known, so the STN can be told what to undo. On CIFAR-10
    the classification loss alone never made theta depend on the input (every recipe in
    benchmarks/results/archive/cifar_stn_probes collapsed within four epochs).
    """
    return _displacement(compose_thetas(applied.to(theta), theta)).mean()


def _displacement(theta: Tensor) -> Tensor:
    """Each theta's mean squared displacement of the sampling points from the identity's."""
    m = theta - torch.eye(2, 3, dtype=theta.dtype, device=theta.device)
    # Over p uniform in [-1, 1]^2: E|M [p; 1]|^2 = (|m_x|^2 + |m_y|^2) / 3 + |m_t|^2.
    return (m[:, :, :2] ** 2).sum((1, 2)) / 3 + (m[:, :, 2] ** 2).sum(1)


def warp_penalty(theta: Tensor) -> Tensor:
    """The pose loss against no distortion: how far theta moves the sampling points.

    A prior for the smallest warp that serves the classifier. Undoing a zero-mean distortion
    costs least when the canonical pose is the upright one; mapping a class to a pose of its
    own costs its offset squared on top, which the classification loss alone never charges
    (a Fashion-MNIST seed turned clothes and footwear opposite ways).
    """
    return _displacement(theta).mean()


def class_warp_penalty(theta: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """warp_penalty on each class's mean theta in the batch, weighted by its share.

    The per-image charge pays for a class's own pose and, on top, for every image's departure
    from it, which is the undoing itself: at 0.2 a Fashion-MNIST seed undid more of the
    rotation (66% against 59% at 0.1) and less of the scale (47% against 56%). On the class
    means shifts average out and what is left to pay is the class's own pose; turns leave a
    slight shrink (the mean of +-30 degrees is 0.87 of the identity), 1/15 of their charge.
    """
    onehot = F.one_hot(labels, num_classes).to(theta.dtype)
    counts = onehot.sum(0)
    present = counts > 0
    means = (onehot.T @ theta.reshape(len(theta), 6))[present] / counts[present, None]
    return (_displacement(means.reshape(-1, 2, 3)) * counts[present]).sum() / len(theta)
