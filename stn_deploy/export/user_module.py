"""A user's ``nn.Module`` that warps with ``F.affine_grid`` / ``F.grid_sample``, made ready for
the export pipeline: loaded, probed, wrapped, and run as the PyTorch reference.

Three things make such a model deploy the way ours does:

* ``exact_affine_grid``: while the model is traced, ``F.affine_grid`` is replaced by our
  ``AffineGrid`` (a constant base grid times theta, bit-identical to ATen's) at whatever size
  each call asks for, so the graph has no AffineGrid op and exports at every opset from 16.
  Each call's theta is recorded too, so ``--with-theta`` can add them as outputs.
* The FP32 sampling path is found from the graph by ``precision.stn_path_nodes`` (everything
  feeding any GridSample's grid), so FP16 and INT8 keep it float for any number of samplers.
* The reference records the grids PyTorch's ``F.grid_sample`` got, so verification can hold
  every GridSample's grid to them (``verify.verify_export``).

The patches work through the ``torch.nn.functional`` module attribute, so a model must call
``F.affine_grid`` / ``F.grid_sample`` (or ``torch.nn.functional.…``); a name imported with
``from torch.nn.functional import affine_grid`` is bound before we can replace it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError, error_line
from stn_deploy.export.verify import Images, Reference

RANDOM_SAMPLES = 64  # random inputs to verify on when no images are given
THETA = "theta"


# ------------------------------------------------------------------------ the user's model

def load_factory(spec: str, option: str = "--factory") -> nn.Module:
    """``package.module:factory`` -> the module the factory returns (or the module object
    itself when the name is one), in eval mode on the CPU."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise StnDeployError(f"{option} {spec!r}: expected PACKAGE.MODULE:FACTORY")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the user's module raises at import
        raise StnDeployError(f"{option} {spec}: cannot import {module_name} "
                             f"({type(e).__name__}: {error_line(e)})") from None
    if not hasattr(module, attr):
        raise StnDeployError(f"{option} {spec}: {module_name} has no attribute {attr!r}")
    factory = getattr(module, attr)
    if isinstance(factory, nn.Module):
        model = factory
    elif callable(factory):
        try:
            model = factory()
        except Exception as e:  # the user's code: any exception is theirs to read
            raise StnDeployError(f"{option} {spec}: the factory raised {type(e).__name__}: "
                                 f"{error_line(e)}") from None
    else:
        raise StnDeployError(f"{option} {spec}: {attr} is a {type(factory).__name__}, not a "
                             "factory or torch.nn.Module")
    if not isinstance(model, nn.Module):
        raise StnDeployError(f"{option} {spec}: the factory returned a "
                             f"{type(model).__name__}, not a torch.nn.Module")
    return model.eval().cpu()


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a state dict (or an stn-deploy/Lightning-style {"state_dict": ...} file) with
    ``weights_only=True``: the file is data, never unpickled as code."""
    from stn_deploy.checkpoint import load_tensors

    p = Path(path)
    payload = load_tensors(p, "weights file")
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise StnDeployError(f"{p} holds no state dict (a mapping of names to tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[1:2])
        raise StnDeployError(f"weights {p.name} do not fit the model: "
                             f"{(detail or error_line(e))[:300]}") from None


# ------------------------------------------------------------------------------- patches

@dataclass
class AffineGridCalls:
    """What the ``F.affine_grid`` calls inside a patch saw: each call's output size and its
    theta (in call order)."""

    sizes: list[tuple[int, int]] = field(default_factory=list)
    thetas: list[Tensor] = field(default_factory=list)


@contextmanager
def _affine_grid_patch(exact: bool) -> Iterator[AffineGridCalls]:
    from stn_deploy.model import AffineGrid

    functional = torch.nn.functional
    original = functional.affine_grid
    calls = AffineGridCalls()

    def patched(theta: Tensor, size: Sequence[int] | torch.Size,
                align_corners: bool | None = None) -> Tensor:
        if len(size) != 4:
            raise StnDeployError(f"F.affine_grid with a {len(size)}-D size (a volumetric warp) "
                                 "has no constant-grid form in stn-deploy")
        height, width = int(size[2]), int(size[3])  # never size[0]: the batch stays dynamic
        calls.sizes.append((height, width))
        calls.thetas.append(theta)
        if not exact:
            return original(theta, size, align_corners=align_corners)
        return AffineGrid(height, width, bool(align_corners)).to(theta.device)(theta)

    functional.affine_grid = patched
    try:
        yield calls
    finally:
        functional.affine_grid = original


def exact_affine_grid() -> Any:
    """Within the block, ``F.affine_grid`` is our AffineGrid for the size of each call (no
    AffineGrid op in the graph); yields the calls seen."""
    return _affine_grid_patch(exact=True)


def recorded_affine_grids() -> Any:
    """Within the block, ``F.affine_grid`` is itself (the AffineGrid op when exported at opset
    20, and PyTorch's own numbers for the reference); yields the calls seen."""
    return _affine_grid_patch(exact=False)


@contextmanager
def recorded_grids() -> Iterator[list[tuple[Tensor, tuple[int, ...]]]]:
    """Within the block, every ``F.grid_sample`` call records (grid, input shape)."""
    functional = torch.nn.functional
    original = functional.grid_sample
    calls: list[tuple[Tensor, tuple[int, ...]]] = []

    def recording(input: Tensor, grid: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        calls.append((grid.detach().float().cpu(), tuple(input.shape)))
        return original(input, grid, *args, **kwargs)

    functional.grid_sample = recording
    try:
        yield calls
    finally:
        functional.grid_sample = original


def theta_names(count: int) -> list[str]:
    """The outputs ``--with-theta`` adds: ``theta`` for one F.affine_grid call, ``theta0``,
    ``theta1``, ... for several (call order)."""
    return [THETA] if count == 1 else [f"{THETA}{i}" for i in range(count)]


def as_outputs(value: Any) -> tuple[Tensor, ...]:
    if isinstance(value, Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, Tensor) for v in value):
        return tuple(value)
    raise StnDeployError(f"the model returned a {type(value).__name__}; stn-deploy exports "
                         "models that return a tensor or a tuple of tensors")


class ModuleWrapper(nn.Module):
    """The user's model with its first ``count`` outputs, our normalisation in front when the
    preprocessing is embedded, and, given the patch's ``calls``, the theta of every
    F.affine_grid call of the forward pass as further outputs."""

    def __init__(self, model: nn.Module, config: ModelConfig, count: int,
                 embed_preprocess: bool, calls: AffineGridCalls | None = None) -> None:
        super().__init__()
        from stn_deploy.model import Normalize

        self.model, self.count, self.calls = model, count, calls
        self.pre = Normalize(config) if embed_preprocess else None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.pre is not None:
            # Standard NCHW strides: after the NHWC permute a 1-channel batch counts as
            # contiguous yet makes convolutions return channels-last, which a .view() rejects.
            x = self.pre(x).clone(memory_format=torch.contiguous_format)
        start = len(self.calls.thetas) if self.calls is not None else 0
        outs = as_outputs(self.model(x))[:self.count]
        if self.calls is not None:  # this pass's thetas: the tracer may run forward again
            outs = (*outs, *self.calls.thetas[start:])
        return outs[0] if len(outs) == 1 else outs


# ---------------------------------------------------------------------------------- probe

@dataclass(frozen=True)
class Probe:
    """What one forward pass at the input shape says about the model."""

    num_classes: int
    num_outputs: int
    grid_samples: int
    affine_grids: int


def probe(model: nn.Module, input_shape: Sequence[int], extra_outputs: Sequence[str]) -> Probe:
    shape = tuple(input_shape)
    text = "x".join(str(v) for v in shape)
    with torch.inference_mode(), recorded_grids() as grids, recorded_affine_grids() as affine:
        try:
            outs = as_outputs(model(torch.rand(2, *shape)))
        except StnDeployError:
            raise
        except Exception as e:  # the user's forward: any exception means "rejects the shape"
            raise StnDeployError(f"the model rejects input shape {text} "
                                 f"({type(e).__name__}: {error_line(e)})") from None
    if len(outs) < 1 + len(extra_outputs):
        raise StnDeployError(f"the model returns {len(outs)} tensor(s); naming "
                             f"{', '.join(extra_outputs)} needs {1 + len(extra_outputs)}")
    logits = outs[0]
    if logits.dim() != 2 or logits.shape[0] != 2 or logits.shape[1] < 2:
        raise StnDeployError(f"the model's first output has shape {tuple(logits.shape)} for a "
                             f"batch of 2; stn-deploy needs (batch, classes) logits")
    for name, out in zip(extra_outputs, outs[1:]):
        if out.shape[0] != 2:
            raise StnDeployError(f"output {name} has shape {tuple(out.shape)} for a batch of 2; "
                                 "every output needs the batch first")
    return Probe(int(logits.shape[1]), len(outs), len(grids), len(affine.sizes))


def module_config(model: nn.Module, input_shape: Sequence[int], *,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  class_names: Sequence[str] | None = None, dataset: str = "custom",
                  extra_outputs: Sequence[str] = ()) -> tuple[ModelConfig, Probe]:
    """The ModelConfig every artifact carries, from what is known: the input shape, the class
    count of a trial forward pass, and normalisation / class names when given (without
    normalisation the model gets pixel / 255)."""
    c, h, w = input_shape
    if h != w:
        raise StnDeployError(f"input shape {c}x{h}x{w}: stn-deploy's artifacts describe square "
                             "inputs only (height == width)")
    found = probe(model, input_shape, extra_outputs)
    k = found.num_classes
    names = tuple(class_names) if class_names else tuple(str(i) for i in range(k))
    if len(names) != k:
        raise StnDeployError(f"{len(names)} class names given, the model outputs {k} classes")
    config = ModelConfig(in_channels=c, image_size=h, num_classes=k, class_names=names,
                         mean=tuple(mean) if mean else (0.0,) * c,
                         std=tuple(std) if std else (1.0,) * c,
                         use_stn=found.grid_samples > 0, dataset=dataset)
    return config, found


# ----------------------------------------------------------------------- the reference

def torch_outputs(model: nn.Module, images_uint8: np.ndarray, config: ModelConfig,
                  extra_outputs: Sequence[str] = (), with_theta: bool = False,
                  batch: int = 64) -> Reference:
    """The original model (F.affine_grid untouched) in eval mode on the CPU: its outputs by
    name, the grids its samplers used and, ``with_theta``, each F.affine_grid call's theta."""
    from stn_deploy.data import normalize

    names = ("logits", *extra_outputs)
    parts: dict[str, list[np.ndarray]] = {}
    grids: list[list[np.ndarray]] = []
    shapes: list[tuple[int, ...]] = []
    sizes: list[tuple[int, int]] = []
    model = model.eval().cpu()
    for start in range(0, len(images_uint8), batch):
        x = normalize(torch.from_numpy(images_uint8[start:start + batch]), config)
        with torch.inference_mode(), recorded_grids() as calls, \
                recorded_affine_grids() as affine:
            outs = as_outputs(model(x))
        named = list(zip(names, outs))
        if with_theta:
            named += zip(theta_names(len(affine.thetas)), affine.thetas)
        for name, out in named:
            parts.setdefault(name, []).append(out.float().numpy())
        grids = grids or [[] for _ in calls]
        shapes, sizes = [shape for _, shape in calls], affine.sizes
        for i, (grid, _) in enumerate(calls):
            grids[i].append(grid.numpy())
    thetas = dict(zip(theta_names(len(sizes)), sizes)) if with_theta else {}
    return Reference({k: np.concatenate(v) for k, v in parts.items()},
                     [np.concatenate(g) for g in grids], shapes, thetas)


# ---------------------------------------------------------------------------------- images

def random_images(config: ModelConfig, samples: int | None, seed: int = 0) -> Images:
    """Random uint8 inputs (``samples``; None: RANDOM_SAMPLES), with the warning of what they
    do not prove."""
    n = samples or RANDOM_SAMPLES
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *config.input_shape), generator=g, dtype=torch.uint8)
    return Images(images.numpy(), None, f"{n} random inputs")


def imagefolder_images(data_dir: Path, split: str, input_shape: Sequence[int],
                       samples: int | None = None) -> Images:
    """An ImageFolder split at the model's size (grey: ITU-R 601 luma of the RGB files)."""
    from stn_deploy.data import load_imagefolder
    from stn_deploy.export.verify import subset

    channels, size = input_shape[0], input_shape[-1]
    data = load_imagefolder(split, Path(data_dir), image_size=size)
    images = data.images
    if channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
    elif channels != 3:
        raise StnDeployError(f"{data_dir} holds RGB images, the model takes {channels} channels")
    found = Images(images.numpy(), data.labels.numpy(), f"the {split} split of {data_dir}")
    return subset(found, samples)
