"""The one model config that travels with every artifact (checkpoint, ONNX, engine sidecar).

Export, bench, predict and the C++ runtime read everything they need from it, so no step asks
the user again for a fact the checkpoint already knows.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from stn_deploy.errors import StnDeployError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
LOC_NETS = ("seed", "large")
# The STN's activations: "relu" (the design's) or "leaky" (LeakyReLU 0.1: no parameters added,
# and a unit that goes negative for every image still passes gradient, so it cannot die).
LOC_ACTS = ("relu", "leaky")
MAX_STN_PASSES = 4


@dataclass(frozen=True)
class ModelConfig:
    """Facts about a model that every deployment step needs."""

    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    class_names: tuple[str, ...] = CIFAR10_CLASSES
    mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
    use_stn: bool = True
    align_corners: bool = False
    dropout: float = 0.05
    dataset: str = "cifar10"
    distort: str = "none"
    loc_net: str = "seed"  # the STN's localization net: "seed" (the design's) or "large"
    loc_act: str = "relu"  # the STN's activations: "relu" or "leaky" (see LOC_ACTS)
    stn_passes: int = 1  # > 1: the localization net refines its own output (same weights)

    def __post_init__(self) -> None:
        # Lists arrive from JSON; keep the dataclass hashable and comparable.
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        self.validate()

    def validate(self) -> None:
        if self.in_channels < 1:
            raise StnDeployError(f"in_channels must be positive, got {self.in_channels}")
        if self.num_classes < 2:
            raise StnDeployError(f"num_classes must be at least 2, got {self.num_classes}")
        if len(self.class_names) != self.num_classes:
            raise StnDeployError(
                f"{len(self.class_names)} class names for {self.num_classes} classes"
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise StnDeployError("mean and std need one value per input channel")
        if any(s <= 0 for s in self.std):
            raise StnDeployError("std values must be positive")
        if self.loc_net not in LOC_NETS:
            raise StnDeployError(f"unknown loc_net {self.loc_net!r}; choose from "
                                 f"{', '.join(LOC_NETS)}")
        if self.loc_act not in LOC_ACTS:
            raise StnDeployError(f"unknown loc_act {self.loc_act!r}; choose from "
                                 f"{', '.join(LOC_ACTS)}")
        if not 1 <= self.stn_passes <= MAX_STN_PASSES:
            raise StnDeployError(f"stn_passes must be 1 to {MAX_STN_PASSES}, got "
                                 f"{self.stn_passes}")
        # The localization net's valid convolutions and two poolings need at least 22 pixels.
        if self.image_size < 22:
            raise StnDeployError(f"image_size must be at least 22, got {self.image_size}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("class_names", "mean", "std"):
            d[k] = list(d[k])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise StnDeployError("model config is not a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StnDeployError(f"unknown model config keys: {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise StnDeployError(f"malformed model config: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise StnDeployError(f"model config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Flat keys written beside the JSON config into ONNX metadata_props and engine sidecars, so a
# C++ reader needs no JSON parser. Values: comma-separated numbers, newline-separated names.
def flat_metadata(config: ModelConfig) -> dict[str, str]:
    return {
        "stn_deploy.config": config.to_json(),
        "input_shape": ",".join(str(v) for v in config.input_shape),
        "mean": ",".join(repr(v) for v in config.mean),
        "std": ",".join(repr(v) for v in config.std),
        "class_names": "\n".join(config.class_names),
        "num_classes": str(config.num_classes),
    }
