"""Spatial-transformer models that stn-deploy did not design, for ``stn-deploy export --factory``.

They are written the way users write them, with ``F.affine_grid`` and ``F.grid_sample`` (or a
grid built by hand), not with our ``AffineGrid``: they are the proof that export, verification
and the FP32 sampling path work on any such model, e.g.
``stn-deploy export --factory stn_deploy.examples:tutorial_mnist_stn --input-shape 1x28x28``.
Every factory takes no required argument and returns a model for 1x28x28 inputs, 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _identity_regressor(features: int, hidden: int) -> nn.Sequential:
    """fc -> relu -> fc(6), starting at the identity transform (as the tutorial does)."""
    head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(True), nn.Linear(hidden, 6))
    head[2].weight.data.zero_()
    head[2].bias.data.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.float))
    return head


class TutorialMnistStn(nn.Module):
    """The PyTorch STN tutorial's MNIST network, from its description: localization conv8-k7,
    pool, relu, conv10-k5, pool, relu; fc 10*3*3 -> 32 -> 6; classifier conv10-k5, conv20-k5,
    dropout, fc 320 -> 50 -> 10; log-softmax out. ``return_theta``: also return theta."""

    def __init__(self, return_theta: bool = False) -> None:
        super().__init__()
        self.return_theta = return_theta
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)
        self.localization = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=7), nn.MaxPool2d(2, stride=2), nn.ReLU(True),
            nn.Conv2d(8, 10, kernel_size=5), nn.MaxPool2d(2, stride=2), nn.ReLU(True),
        )
        self.fc_loc = _identity_regressor(10 * 3 * 3, 32)

    def stn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xs = self.localization(x).view(-1, 10 * 3 * 3)
        theta = self.fc_loc(xs).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.size()), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False), theta

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x, theta = self.stn(x)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.dropout(F.relu(self.fc1(x)), training=self.training)
        out = F.log_softmax(self.fc2(x), dim=1)
        return (out, theta) if self.return_theta else out


class _Transformer(nn.Module):
    """One affine spatial transformer whose output has its own size (a zoom when smaller)."""

    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        self.out_size = out_size
        side = ((in_size - 4) // 2 - 2) // 2  # k5, pool, k3, pool
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 5), nn.MaxPool2d(2), nn.ReLU(True),
            nn.Conv2d(8, 8, 3), nn.MaxPool2d(2), nn.ReLU(True),
        )
        self.head = _identity_regressor(8 * side * side, 32)

    def forward(self, x: Tensor) -> Tensor:
        theta = self.head(torch.flatten(self.features(x), 1)).view(-1, 2, 3)
        size = [x.shape[0], x.shape[1], self.out_size, self.out_size]
        return F.grid_sample(x, F.affine_grid(theta, size, align_corners=False),
                             align_corners=False)


def _small_classifier(channels: int = 1, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3), nn.ReLU(True), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3), nn.ReLU(True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, classes),
    )


class TwoStn(nn.Module):
    """Two spatial transformers in sequence: 28x28 -> 28x28, then a 20x20 zoom, then a CNN.
    Two GridSample nodes, two affine-grid sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.first = _Transformer(28, 28)
        self.second = _Transformer(28, 20)
        self.classifier = _small_classifier()

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.second(self.first(x)))


class FlowWarp(nn.Module):
    """Warps with ``grid_sample`` from a predicted per-pixel flow field (no affine grid):
    grid = identity grid + a bounded flow, border padding, then a CNN."""

    def __init__(self, size: int = 28, max_flow: float = 0.1) -> None:
        super().__init__()
        self.max_flow = max_flow
        self.flow = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(True), nn.Conv2d(8, 2, 3, padding=1),
        )
        # Pixel centres in [-1, 1] (align_corners=False), built directly: no affine_grid call.
        axis = (torch.arange(size, dtype=torch.float) * 2 + 1) / size - 1
        ys, xs = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("identity", torch.stack([xs, ys], dim=-1)[None], persistent=False)
        self.classifier = _small_classifier()

    def forward(self, x: Tensor) -> Tensor:
        flow = torch.tanh(self.flow(x)) * self.max_flow
        grid = self.identity + flow.permute(0, 2, 3, 1)
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                               align_corners=False)
        return self.classifier(warped)


def tutorial_mnist_stn(return_theta: bool = False) -> TutorialMnistStn:
    return TutorialMnistStn(return_theta)


def two_stn() -> TwoStn:
    return TwoStn()


def flow_warp() -> FlowWarp:
    return FlowWarp()


def plain_cnn() -> nn.Sequential:
    """No spatial transformer at all: exports, with the STN checks marked not applicable."""
    return _small_classifier()
