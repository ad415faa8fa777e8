"""The STN classifier: localization net -> affine grid -> grid_sample -> CNN classifier.

The affine grid is a constant base grid times theta (one MatMul), numerically identical to
``F.affine_grid`` but exportable to plain ONNX ops at every opset from 16; ``F.affine_grid``
itself only exports as the AffineGrid op at opset 20+.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stn_deploy.config import ModelConfig


def base_grid(height: int, width: int, align_corners: bool) -> Tensor:
    """The (H*W, 3) rows of (x, y, 1) that ``F.affine_grid`` multiplies by theta."""

    def axis(n: int) -> Tensor:
        # Same float32 arithmetic as ATen's affine_grid, so the two agree bit for bit.
        if n <= 1:
            return torch.zeros(n)
        t = torch.linspace(-1.0, 1.0, n)
        return t if align_corners else t * (n - 1) / n

    ys, xs = torch.meshgrid(axis(height), axis(width), indexing="ij")
    ones = torch.ones_like(xs)
    return torch.stack([xs, ys, ones], dim=-1).reshape(height * width, 3)


class AffineGrid(nn.Module):
    """``F.affine_grid`` for a fixed output size, as one constant and one MatMul."""

    def __init__(self, height: int, width: int, align_corners: bool) -> None:
        super().__init__()
        self.height, self.width = height, width
        # Not persistent: derived from the config, so checkpoints carry only learned weights.
        self.register_buffer("base", base_grid(height, width, align_corners), persistent=False)

    def forward(self, theta: Tensor) -> Tensor:
        grid = torch.matmul(self.base, theta.transpose(1, 2))  # (N, H*W, 2)
        return grid.reshape(-1, self.height, self.width, 2)


def _loc_feature_size(image_size: int) -> int:
    s = image_size - 2 - 2 - 6  # k3, k3, k7 valid convolutions
    s = s // 2 - 4  # pool, k5
    return s // 2  # pool


LEAKY_SLOPE = 0.1


def _act(config: ModelConfig) -> nn.Module:
    """The STN's activation: ReLU units can die (output 0 and gradient 0 for every image), and a
    regressor with most of them dead no longer moves theta; LeakyReLU units cannot."""
    return nn.LeakyReLU(LEAKY_SLOPE, True) if config.loc_act == "leaky" else nn.ReLU(True)


def _localization(config: ModelConfig) -> tuple[nn.Sequential, int, int]:
    """(conv stack, flattened feature size, regressor width) for ``config.loc_net``."""
    c = config.in_channels
    if config.loc_net == "large":
        # Padded 5x5/5x5/3x3 convolutions with an activation after each pooling: each stage sees
        # twice the extent of the last, enough to tell a digit's orientation and extent.
        net = nn.Sequential(
            nn.Conv2d(c, 16, 5, padding=2), nn.MaxPool2d(2), _act(config),
            nn.Conv2d(16, 32, 5, padding=2), nn.MaxPool2d(2), _act(config),
            nn.Conv2d(32, 32, 3, padding=1), nn.MaxPool2d(2), _act(config),
        )
        side = config.image_size // 8
        return net, 32 * side * side, 64
    net = nn.Sequential(
        nn.Conv2d(c, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 7),
        nn.MaxPool2d(2), _act(config),
        nn.Conv2d(8, 10, 5), nn.MaxPool2d(2), _act(config),
    )
    side = _loc_feature_size(config.image_size)
    return net, 10 * side * side, 32


def compose_thetas(outer: Tensor, inner: Tensor) -> Tensor:
    """The sampling theta of warping by ``outer`` and then by ``inner``: a point p of the
    final output samples the input at outer([inner(p); 1])."""
    a = torch.matmul(outer[:, :, :2], inner[:, :, :2])
    t = torch.matmul(outer[:, :, :2], inner[:, :, 2:]) + outer[:, :, 2:]
    return torch.cat([a, t], dim=2)


class SpatialTransformer(nn.Module):
    """Regresses a 2x3 affine theta (initialised to identity) and warps the input with it.

    With ``stn_passes`` > 1 the same localization net looks again at its own output and
    regresses a correction, composed into theta (the compositional STN of Lin & Lucey 2017):
    no parameters are added, and the input is still sampled once, through the composed theta.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.localization, features, width = _localization(config)
        self.regressor = nn.Sequential(
            nn.Linear(features, width), _act(config), nn.Linear(width, 6)
        )
        nn.init.zeros_(self.regressor[2].weight)
        with torch.no_grad():
            self.regressor[2].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
        self.grid = AffineGrid(config.image_size, config.image_size, config.align_corners)
        self.align_corners = config.align_corners
        self.passes = config.stn_passes

    def _regress(self, x: Tensor) -> Tensor:
        return self.regressor(torch.flatten(self.localization(x), 1)).view(-1, 2, 3)

    def _sample(self, x: Tensor, theta: Tensor) -> Tensor:
        return F.grid_sample(x, self.grid(theta), mode="bilinear", padding_mode="zeros",
                             align_corners=self.align_corners)

    def theta(self, x: Tensor) -> Tensor:
        theta = self._regress(x)
        for _ in range(self.passes - 1):
            theta = compose_thetas(theta, self._regress(self._sample(x, theta)))
        return theta

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        theta = self.theta(x)
        return self._sample(x, theta), theta


def _block(cin: int, cout: int, dropout: float, *, stride: int = 1, dilation: int = 1,
           groups: int = 1) -> nn.Sequential:
    pad = dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=pad, dilation=dilation, groups=groups,
                  bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(True), nn.Dropout(dropout),
    )


def _pointwise(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=False)


class Classifier(nn.Module):
    """The seed's CNN: dilated, depthwise and grouped 3x3 convs, 1x1 transitions, GAP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dropout
        self.features = nn.Sequential(
            _block(config.in_channels, 24, d),
            _block(24, 24, d),
            _block(24, 24, d, stride=2),
            _pointwise(24, 24),
            _block(24, 24, d, dilation=2),
            _block(24, 24, d, groups=24),
            _block(24, 24, d, stride=2, groups=12),
            _pointwise(24, 48),
            _block(48, 48, d, dilation=2),
            _block(48, 48, d, groups=48),
            _pointwise(48, 96),
            _block(96, 96, d, dilation=2),
            _block(96, 96, d, groups=12),
            _pointwise(96, config.num_classes),
        )
        # Equal to the seed's AvgPool(8) at 32x32; also fits 28x28 and other sizes.
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class STNClassifier(nn.Module):
    """Takes normalised NCHW float images, returns logits (and theta via ``forward_with_theta``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.stn = SpatialTransformer(config) if config.use_stn else None
        self.classifier = Classifier(config)

    def forward_with_theta(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.stn is None:
            eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=x.dtype, device=x.device)
            theta = eye.expand(x.shape[0], 2, 3)
        else:
            x, theta = self.stn(x)
        return self.classifier(x), theta

    @overload
    def forward(self, x: Tensor) -> Tensor: ...

    @overload
    def forward(self, x: Tensor, with_theta: Literal[True]) -> tuple[Tensor, Tensor]: ...

    def forward(self, x: Tensor, with_theta: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        # with_theta through forward (not forward_with_theta) so DDP's wrapper sees the call.
        out = self.forward_with_theta(x)
        return out if with_theta else out[0]

    def warp(self, x: Tensor) -> Tensor:
        """What the classifier sees: the STN's output (the input itself without an STN)."""
        return x if self.stn is None else self.stn(x)[0]


def build_model(config: ModelConfig) -> STNClassifier:
    return STNClassifier(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Normalize(nn.Module):
    """uint8 NHWC in, normalised float NCHW out: preprocessing baked into an exported graph."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.in_channels
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(config.std))).view(1, c, 1, 1),
                             persistent=False)
        self.register_buffer("shift", (torch.tensor(config.mean) / torch.tensor(config.std))
                             .view(1, c, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2).float() * self.scale - self.shift
