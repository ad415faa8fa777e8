"""Training: SGD with a one-cycle schedule on in-memory tensors, a checkpoint each epoch.

Each epoch reseeds from (seed, epoch), so a run resumed from epoch k draws the same batches,
augmentations and dropout masks as one that never stopped. Under ``torchrun`` the same code
runs DistributedDataParallel (gloo on the CPU, nccl on GPUs); only rank 0 writes files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from stn_deploy.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from stn_deploy.config import ModelConfig
from stn_deploy.data import (TEST_SEED_OFFSET, DataBundle, ImageSet, distort, normalize,
                             rts_thetas, warp_images)
from stn_deploy.errors import StnDeployError
from stn_deploy.fileio import write_text_atomic
from stn_deploy.health import Health, measure_set, theta_spread_px
from stn_deploy.model import STNClassifier, build_model, compose_thetas, count_parameters

# NHWC activations: oneDNN's convolutions (forward and backward) run about 1.3x faster in it
# on the CPU than in NCHW; the weights are the same numbers, saved contiguous.
_LAYOUT = torch.channels_last

RECIPES: dict[str, dict[str, Any]] = {
    # The seed design: SGD + one-cycle, no augmentation. The STN learns at a tenth of the
    # rate: at the full peak rate theta ran away on CIFAR-10 and on RTS digits (test accuracy
    # fell to chance), a known STN instability.
    "seed": dict(lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4, label_smoothing=0.0,
                 augment=False, stn_lr_scale=0.1, batch_size=64, dropout=0.05),
    # Same model, a stronger recipe: crop+flip and label smoothing instead of dropout. The
    # 145k-parameter model underfits once augmented (train accuracy below test accuracy with
    # dropout 0.05), and on the CPU dropout's random masks cost a third of each step.
    # The STN: without being told what to undo, every CIFAR-10 run collapsed to a constant
    # theta (benchmarks/results/cifar_stn_probes.md); a quarter of each batch RTS-distorted,
    # the pose loss on it and the STN on its own AdamW without decay kept it transforming
    # (71% of the rotation undone on the RTS-distorted test split) at 84.73% after 130
    # epochs, where the collapsed STN's run reached 84.41%.
    "improved": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                     label_smoothing=0.1, augment=True, stn_lr_scale=0.1, batch_size=64,
                     dropout=0.0, rts_augment=0.25, stn_pose_loss=1.0, stn_optimizer="adam",
                     stn_lr=1e-3, stn_weight_decay=0.0),
    # Distorted data (--distort rts): what kept the STN transforming in
    # benchmarks/stn_recipes.py. Under the seed recipe theta collapsed or undid 2-24% of the
    # rotation; AdamW with the STN without weight decay, and a fresh distortion of every image
    # each epoch, undid 60-70% (with --loc-net large) on two seeds in three. A quarter of each
    # epoch's images left upright (a pose to map to) made it take off on all three. The STN
    # learns at the full rate: at 3x it ran away on a 30-epoch Fashion-MNIST schedule, and on
    # the digits 1x undoes as much as 3x did (two passes, 3 seeds: 66% / 64% of rotation /
    # scale against 67% / 61%). Once the STN has taken off (training thetas spread 2 px), a
    # charge on the warp (0.1): without it one Fashion-MNIST seed in three turned clothes and
    # footwear to poses of their own, undoing 33% of the rotation; charged from the first
    # step, one digits seed took off late and undid 37% of the scale. Charged per image (0.1)
    # that seed still undid 59%, and twice that cost scale: the charge is on each class's mean
    # warp (0.3), which a class's own pose pays and the undoing does not (Fashion-MNIST 3
    # seeds: 68-74% of the rotation undone; README: "Keeping the STN alive").
    "rts": dict(optimizer="adam", lr=1e-3, weight_decay=1e-4, stn_weight_decay=0.0,
                stn_lr_scale=1.0, redistort=True, clean_fraction=0.25, label_smoothing=0.0,
                augment=False, batch_size=64, dropout=0.05, stn_warp_penalty=0.3,
                stn_warp_from_px=2.0, stn_warp_per_class=True),
}


# The options that act on the STN alone: each one's "off" value (--no-stn sets them so), and
# the flag and reason train names when one is asked for without an STN.
STN_ONLY: dict[str, tuple[float | bool, str, str]] = {
    "stn_pose_loss": (0.0, "--stn-pose-loss", "it tells the STN what to undo"),
    "stn_warp_penalty": (0.0, "--stn-warp-penalty", "it charges the STN's warp"),
    "stn_warp_from_px": (0.0, "--stn-warp-from", "it waits for the STN's take-off"),
    "stn_warp_per_class": (False, "--stn-warp-per-class", "it charges the STN's warp per class"),
}
# The options that shape the warp charge, and what each says about it: without a charge they
# mean nothing, so a recipe's go with its charge and one asked for alone is refused.
WARP_PARTS: dict[str, str] = {"stn_warp_from_px": "when that starts",
                              "stn_warp_per_class": "what that charges"}


@dataclass
class TrainOptions:
    """Defaults are the seed recipe."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05  # one-cycle peak
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: bool = False  # random crop (pad 4) and horizontal flip
    affine_deg: float = 0.0  # random rotation within +-this many degrees, per image and step
    affine_scale: float = 0.0  # random zoom within 1 +- this, per image and step
    rts_augment: float = 0.0  # this share of each batch gets a fresh --distort rts distortion
    stn_pose_loss: float = 0.0  # weight of pose_loss on the --rts-augment batches (0: off)
    stn_warp_penalty: float = 0.0  # weight of warp_penalty on every batch (0: off)
    # The warp penalty starts after the first epoch whose training thetas spread this many
    # pixels (0: from the first step); see warp_penalty_on.
    stn_warp_from_px: float = 0.0
    # The warp penalty charges each class's mean warp in the batch, not each image's: see
    # class_warp_penalty.
    stn_warp_per_class: bool = False
    stn_lr_scale: float = 0.1  # the STN's LR relative to the rest
    optimizer: str = "sgd"  # sgd (momentum, nesterov as set) or adam (AdamW: decoupled decay)
    stn_optimizer: str | None = None  # None: the same as optimizer; else the STN's own
    stn_lr: float | None = None  # the STN's one-cycle peak; None: lr * stn_lr_scale
    stn_weight_decay: float | None = None  # None: the same as weight_decay
    redistort: bool = False  # distorted data: a fresh distortion per image every epoch
    clean_fraction: float = 0.0  # with redistort: this share of each epoch's images undistorted
    dropout: float = 0.05  # after every 3x3 block; saved in the checkpoint's ModelConfig
    seed: int = 0
    device: str = "auto"
    recipe: str = "seed"
    quiet: bool = False
    stop_after: int | None = None  # end this run after that epoch; --resume finishes the schedule
    ema: float = 0.0  # per-step decay of a moving average of the weights (0: off); see WeightEma

    @classmethod
    def from_recipe(cls, recipe: str, **overrides: Any) -> "TrainOptions":
        if recipe not in RECIPES:
            raise StnDeployError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        values = {**RECIPES[recipe], **given}
        if "stn_lr_scale" in given and "stn_lr" not in given:
            values.pop("stn_lr", None)  # a scale asked for is not overruled by the recipe's rate
        if "clean_fraction" not in given and not values.get("redistort", False):
            values["clean_fraction"] = 0.0  # the recipe's share applies to fresh distortions only
        for part in WARP_PARTS:
            if part not in given and not values.get("stn_warp_penalty"):
                values[part] = STN_ONLY[part][0]  # the recipe's start and kind go with its charge
        return cls(recipe=recipe, **values)

    def without_stn(self, asked: dict[str, Any] | None = None) -> "TrainOptions":
        """The same recipe for the classifier-only ablation (--no-stn): the STN's own losses
        have no STN to act on; the rest, RTS augmentation included, stays. One in `asked` (given
        by name, not by the recipe) stays too, so that train refuses it under its own name."""
        kept = {k: v for k, v in (asked or {}).items() if k in STN_ONLY and v is not None}
        return replace(self, **{**{k: off for k, (off, _, _) in STN_ONLY.items()}, **kept})


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


def pose_loss(applied: Tensor, theta: Tensor) -> Tensor:
    """Mean squared displacement (in half-frames, over the frame) between the identity and the
    distortion followed by the STN's theta: zero when the STN undoes exactly what was applied.

    The augmentation's transform is known, so the STN can be told what to undo. On CIFAR-10
    the classification loss alone never made theta depend on the input (every recipe in
    benchmarks/results/cifar_stn_probes collapsed within four epochs).
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


def warp_penalty_on(opts: TrainOptions, history: list[dict[str, Any]]) -> bool:
    """Whether the warp penalty acts in the next epoch: with --stn-warp-from, only once the STN
    has taken off (an earlier epoch's training thetas spread that far).

    Before the take-off the charge only holds theta at the identity: on 1,347 RTS digits it
    delayed one seed's take-off and left 37% of the scale undone (52% without it).
    Read from the history, so a resumed run decides as the uninterrupted one did.
    """
    if not opts.stn_warp_penalty:
        return False
    return not opts.stn_warp_from_px or any(
        h.get("train_theta_spread_px", 0.0) >= opts.stn_warp_from_px for h in history)


def rts_probe(bundle: DataBundle, opts: TrainOptions) -> ImageSet | None:
    """With --rts-augment on undistorted data: the test split RTS-distorted once (seeded, as
    --distort rts distorts it), with each image's transform known.

    The undistorted test images alone cannot show whether the STN undoes the distortion it is
    trained on: the pose it should map them to is the one they have, so a working STN may
    leave them nearly alone.
    """
    if not opts.rts_augment or bundle.test.applied is not None:
        return None
    return rts_test_copy(bundle.test, opts.seed)


def rts_test_copy(test: ImageSet, seed: int) -> ImageSet:
    """The test split RTS-distorted as rts_probe distorts it for a run of that seed."""
    images, thetas = distort(test.images, "rts", seed + TEST_SEED_OFFSET)
    return ImageSet(images, test.labels, test.classes, thetas)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


# Options a resumed run may change: they do not shape the weights.
_RESUME_FREE = {"quiet", "device", "stop_after", "epochs"}  # epochs: its own message


def _changed_options(trained: dict[str, Any], opts: TrainOptions) -> str:
    """'--flag was -> now' for each option that differs from the checkpoint's; a recipe
    that changed since (or a flag left out) would otherwise alter a run halfway through.
    Options a checkpoint predates count as their defaults."""
    defaults = asdict(TrainOptions())
    diffs = [f"--{k.replace('_', '-')} {trained.get(k, defaults[k])} -> {v}"
             for k, v in asdict(opts).items()
             if k not in _RESUME_FREE and trained.get(k, defaults[k]) != v]
    return ", ".join(diffs[:4]) + (", ..." if len(diffs) > 4 else "")


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StnDeployError(f"device {name!r} asked for, but no CUDA device is available")
        if "LOCAL_RANK" in os.environ and name == "cuda":
            name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    elif name != "cpu":
        raise StnDeployError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


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


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, config: ModelConfig, device: torch.device,
             batch_size: int = 500, dist_info: _Dist | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) on ``data``; under DDP each rank takes a shard and they sum."""
    model.eval()
    d = dist_info or _Dist()
    idx = torch.arange(d.rank, len(data), d.world)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        x = normalize(data.images[sel].to(device), config).contiguous(memory_format=_LAYOUT)
        y = data.labels[sel].to(device)
        logits = model(x)
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum().double()
        totals[2] += len(sel)
    if d.world > 1:
        dist.all_reduce(totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def _make(kind: str, groups: list[dict[str, Any]], opts: TrainOptions) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.AdamW(groups)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=opts.momentum, nesterov=opts.nesterov)
    raise StnDeployError(f"unknown optimizer {kind!r}; use sgd or adam")


class _Optimizers:
    """The classifier's optimizer and, when it differs, the STN's own (AdamW beside SGD),
    each under its one-cycle schedule; stepped, saved and restored as one."""

    def __init__(self, model: STNClassifier, opts: TrainOptions, steps_per_epoch: int) -> None:
        stn = list(model.stn.parameters()) if model.stn is not None else []
        stn_ids = {id(p) for p in stn}
        rest = {"params": [p for p in model.parameters() if id(p) not in stn_ids],
                "lr": opts.lr, "weight_decay": opts.weight_decay}
        groups = [[rest]]
        if stn:
            decay = opts.weight_decay if opts.stn_weight_decay is None else opts.stn_weight_decay
            stn_group = {"params": stn, "weight_decay": decay,
                         "lr": opts.stn_lr if opts.stn_lr is not None
                         else opts.lr * opts.stn_lr_scale}
            if opts.stn_optimizer in (None, opts.optimizer):
                groups[0].append(stn_group)
            else:
                groups.append([stn_group])
        kinds = [opts.optimizer, opts.stn_optimizer or opts.optimizer]
        self.optimizers = [_make(kind, g, opts) for kind, g in zip(kinds, groups)]
        self.schedulers = [torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=[g["lr"] for g in o.param_groups], epochs=opts.epochs,
            steps_per_epoch=steps_per_epoch) for o in self.optimizers]

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()
        for sch in self.schedulers:
            sch.step()

    @property
    def lr(self) -> float:
        return float(self.schedulers[0].get_last_lr()[0])

    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """One optimizer's state as torch writes it (checkpoints before the split read the
        same); two as {"main": ..., "stn": ...}."""
        opt = [o.state_dict() for o in self.optimizers]
        sch = [s.state_dict() for s in self.schedulers]
        if len(opt) == 1:
            return opt[0], sch[0]
        return {"main": opt[0], "stn": opt[1]}, {"main": sch[0], "stn": sch[1]}

    def load_state_dicts(self, optimizer: dict[str, Any], scheduler: dict[str, Any]) -> None:
        split = "main" in optimizer
        if split != (len(self.optimizers) == 2):
            raise StnDeployError("the checkpoint was trained with another --stn-optimizer; "
                                 "resume with the same one")
        opt = [optimizer["main"], optimizer["stn"]] if split else [optimizer]
        sch = [scheduler["main"], scheduler["stn"]] if split else [scheduler]
        for o, state in zip(self.optimizers, opt):
            o.load_state_dict(state)
        for s, state in zip(self.schedulers, sch):
            s.load_state_dict(state)


class WeightEma:
    """An exponential moving average of the model's weights (and BN statistics), updated after
    every optimizer step; with --ema it is the model the checkpoint carries.

    Averaging the last few thousand steps smooths the noise of SGD at a high learning rate;
    the decay ramps up as (1 + t) / (10 + t) so that early on the average follows the weights.
    """

    def __init__(self, model: STNClassifier, decay: float) -> None:
        if not 0 < decay < 1:
            raise StnDeployError(f"--ema must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        theirs = model.state_dict()
        self._pairs = [(mine, theirs[k]) for k, mine in self.model.state_dict().items()]

    @torch.no_grad()
    def update(self, t: int) -> None:
        """After optimizer step number ``t`` (from 0, counted over the whole schedule)."""
        decay = min(self.decay, (1 + t) / (10 + t))
        for mine, theirs in self._pairs:
            if mine.is_floating_point():
                mine.lerp_(theirs, 1 - decay)
            else:
                mine.copy_(theirs)


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    parameters: int = 0
    health: Health | None = None
    health_rts: Health | None = None  # on the RTS-distorted test split (see rts_probe)


def train(bundle: DataBundle, out_dir: str | Path, opts: TrainOptions,
          resume: str | Path | None = None) -> TrainResult:
    """Train on ``bundle`` and write last.pt, metrics.json, transforms.png and curves.png."""
    from tqdm import tqdm

    out = Path(out_dir)
    # Like --redistort, a clean fraction does nothing on undistorted data (the CLI refuses an
    # explicit one there); without --redistort it would silently do nothing, so it is refused.
    if opts.clean_fraction and not opts.redistort:
        raise StnDeployError("--clean-fraction needs --redistort: it picks which of each "
                             "epoch's fresh distortions stay undistorted")
    if opts.stn_optimizer not in (None, opts.optimizer) and opts.stn_lr is None:
        raise StnDeployError(f"--stn-optimizer {opts.stn_optimizer} beside --optimizer "
                             f"{opts.optimizer} needs --stn-lr: a fraction of the other's rate "
                             "means nothing across optimizers")
    if not 0 <= opts.clean_fraction < 1:
        raise StnDeployError(f"--clean-fraction must be in [0, 1), got {opts.clean_fraction}")
    if opts.stn_pose_loss and not (opts.rts_augment and bundle.config.use_stn):
        raise StnDeployError("--stn-pose-loss needs --rts-augment and an STN: it tells the STN "
                             "to undo the distortions --rts-augment applies")
    for name, (off, flag, why) in STN_ONLY.items():
        if not bundle.config.use_stn and getattr(opts, name) != off:
            raise StnDeployError(f"{flag} needs an STN: {why}")
    for name, says in WARP_PARTS.items():
        if getattr(opts, name) != STN_ONLY[name][0] and not opts.stn_warp_penalty:
            raise StnDeployError(f"{STN_ONLY[name][1]} needs --stn-warp-penalty: it says {says}")
    device = resolve_device(opts.device)
    d = _init_distributed(device)
    config = replace(bundle.config, dropout=opts.dropout)
    start_epoch, history = 1, []
    state: Checkpoint | None = None
    if resume is not None:
        state = load_checkpoint(resume)
        if state.config != config:
            raise StnDeployError(f"{resume} was trained with another model/data config; "
                                 "resume with the same --dataset, --distort and --no-stn")
        if state.train_args.get("epochs", opts.epochs) != opts.epochs:
            raise StnDeployError(f"{resume} follows a {state.train_args['epochs']}-epoch schedule;"
                                 " resume with the same --epochs")
        changed = _changed_options(state.train_args, opts)
        if changed:
            raise StnDeployError(f"{resume} was trained with other options ({changed}); resume "
                                 "with the ones it was trained with")
        if state.epoch >= opts.epochs:
            raise StnDeployError(f"{resume} already has {state.epoch} epochs; pass --epochs "
                                 f"above {state.epoch} to train further")
        start_epoch, history = state.epoch + 1, list(state.history)

    torch.manual_seed(opts.seed)
    model = build_model(config).to(device, memory_format=_LAYOUT)
    if state is not None:
        model.load_state_dict(state.state_dict if state.train_state_dict is None
                              else state.train_state_dict)
    ema = WeightEma(model, opts.ema) if opts.ema else None
    if ema is not None and state is not None:
        ema.model.load_state_dict(state.state_dict)
    # What is measured, pictured and saved: the average with --ema, else the weights trained.
    kept: STNClassifier = model if ema is None else ema.model
    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    n_train = len(bundle.train)
    per_rank = math.ceil(n_train / d.world)
    steps = math.ceil(per_rank / opts.batch_size)
    optimizer = _Optimizers(model, opts, steps)
    if state is not None and state.optimizer is not None and state.scheduler is not None:
        optimizer.load_state_dicts(state.optimizer, state.scheduler)
    criterion = nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing)
    ckpt_path = out / "last.pt"
    if d.main:
        out.mkdir(parents=True, exist_ok=True)

    last_epoch = min(opts.epochs, opts.stop_after or opts.epochs)
    probe = rts_probe(bundle, opts)
    copy_images = None if probe is None else probe.images  # health re-judges a still theta on it
    health_rts: Health | None = None
    for epoch in range(start_epoch, last_epoch + 1):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(_epoch_seed(opts.seed, epoch))
        torch.manual_seed(opts.seed * 100_003 + epoch + d.rank)
        order = torch.randperm(n_train, generator=g)
        order = torch.cat([order, order[: per_rank * d.world - n_train]])  # equal shards
        mine = order[d.rank::d.world]
        train_set = bundle.redistort_train(_epoch_seed(opts.seed, epoch), opts.clean_fraction) \
            if opts.redistort else bundle.train
        net.train()
        warp_weight = opts.stn_warp_penalty if warp_penalty_on(opts, history) else 0.0
        thetas: list[Tensor] = []
        loss_sum = torch.zeros((), dtype=torch.float64)
        pose_sum = torch.zeros((), dtype=torch.float64)
        correct, seen = 0, 0
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{opts.epochs}", unit="batch",
                   disable=opts.quiet or not d.main, leave=False, dynamic_ncols=True)
        for step in bar:
            sel = mine[step * opts.batch_size:(step + 1) * opts.batch_size]
            xb = train_set.images[sel]
            if opts.augment:
                xb = augment_batch(xb, g)
            if opts.affine_deg or opts.affine_scale:
                xb = affine_batch(xb, g, opts.affine_deg, opts.affine_scale)
            applied: Tensor | None = None
            if opts.rts_augment:
                xb, applied = rts_batch(xb, _epoch_seed(opts.seed, epoch) * 10_000 + step,
                                        opts.rts_augment)
            x = normalize(xb.to(device, non_blocking=True), config).contiguous(
                memory_format=_LAYOUT)
            y = train_set.labels[sel].to(device, non_blocking=True)
            # theta comes with the logits at no cost: the STN computes it anyway.
            logits, theta = net(x, with_theta=True)
            loss = criterion(logits, y)
            if opts.stn_pose_loss and applied is not None:
                pose = pose_loss(applied, theta)
                loss = loss + opts.stn_pose_loss * pose
                pose_sum += pose.detach().double().cpu() * len(sel)
            if warp_weight:
                loss = loss + warp_weight * (
                    class_warp_penalty(theta, y, config.num_classes) if opts.stn_warp_per_class
                    else warp_penalty(theta))
            if config.use_stn:
                thetas.append(theta.detach().reshape(-1, 6))  # stays on the device: no sync
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update((epoch - 1) * steps + step)
            loss_sum += loss.detach().double().cpu() * len(sel)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(sel)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        bar.close()
        # How far this epoch's thetas spread, training mode (a rank's own share; their mean).
        spread = theta_spread_px(torch.cat(thetas).double().cpu().numpy(), config.image_size) \
            if thetas else 0.0
        train_stats = torch.tensor([float(loss_sum), correct, seen, float(pose_sum), spread],
                                   dtype=torch.float64, device=device)
        if d.world > 1:
            dist.all_reduce(train_stats)
        test_loss, test_acc = evaluate(kept, bundle.test, config, device, dist_info=d)
        raw = {} if ema is None else {"raw_test_acc": round(
            evaluate(model, bundle.test, config, device, dist_info=d)[1], 5)}
        health = measure_set(kept, bundle.test, rts_copy=copy_images)
        row = {
            "epoch": epoch,
            "train_loss": round(float(train_stats[0] / train_stats[2]), 5),
            "train_acc": round(float(train_stats[1] / train_stats[2]), 5),
            **({"train_pose_loss": round(float(train_stats[3] / train_stats[2]), 5)}
               if opts.stn_pose_loss else {}),
            **({"train_theta_spread_px": round(float(train_stats[4]) / d.world, 3)}
               if config.use_stn else {}),
            **({"stn_warp_penalty": warp_weight} if opts.stn_warp_penalty else {}),
            "test_loss": round(test_loss, 5),
            "test_acc": round(test_acc, 5),
            **raw,
            "lr": round(optimizer.lr, 6),
            "seconds": round(time.perf_counter() - t0, 2),
            "stn": health.headline(),
        }
        if probe is not None:
            row["rts_test_acc"] = round(evaluate(kept, probe, config, device, dist_info=d)[1], 5)
            health_rts = measure_set(kept, probe)
            row["stn_rts"] = health_rts.headline()
        history.append(row)
        if d.main:
            opt_state, sched_state = optimizer.state_dicts()
            save_checkpoint(ckpt_path, Checkpoint(
                config=config, state_dict=_cpu_state(kept), epoch=epoch, history=history,
                train_args=asdict(opts), optimizer=opt_state, scheduler=sched_state,
                train_state_dict=None if ema is None else _cpu_state(model)))
            write_metrics(out / "metrics.json", config, opts, history, count_parameters(model),
                          d.world)
            if not opts.quiet:
                tqdm.write(f"epoch {epoch}/{opts.epochs}  loss {row['train_loss']:.4f}  "
                           f"train {100 * row['train_acc']:.2f}%  test {100 * test_acc:.2f}%  "
                           f"({row['seconds']:.1f}s)  STN: {health.summary()}"
                           + (f"; RTS-distorted test {100 * row['rts_test_acc']:.2f}%, STN: "
                              f"{health_rts.summary()}" if health_rts is not None else ""))
    # The last epoch already measured the final weights; only a run with no epoch left to
    # train (a resume at its --stop-after) measures here.
    final = health if last_epoch >= start_epoch else measure_set(
        kept, bundle.test, rts_copy=copy_images)
    if probe is not None and health_rts is None:
        health_rts = measure_set(kept, probe)
    if d.main:
        from stn_deploy.viz import save_curves, save_transforms

        save_transforms(kept, bundle.test, out / "transforms.png", health=final)
        if probe is not None:  # what the STN does to what it was trained to undo
            save_transforms(kept, probe, out / "transforms_rts.png", health=health_rts,
                            distort="test split RTS-distorted (--rts-augment)")
        save_curves(history, out / "curves.png")
        write_metrics(out / "metrics.json", config, opts, history, count_parameters(model),
                      d.world, final, health_rts)
    if d.world > 1:
        dist.barrier()
    return TrainResult(ckpt_path, history, count_parameters(model), final, health_rts)


def write_metrics(path: Path, config: ModelConfig, opts: TrainOptions,
                  history: list[dict[str, Any]], parameters: int, world: int,
                  health: Health | None = None, health_rts: Health | None = None) -> None:
    doc = {"config": config.to_dict(), "options": asdict(opts), "parameters": parameters,
           "world_size": world, "torch": torch.__version__, "history": history}
    if health is not None:
        doc["stn_health"] = health.to_dict()
    if health_rts is not None:
        doc["stn_health_rts"] = health_rts.to_dict()
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")
