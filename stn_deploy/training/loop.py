"""The training loop: one epoch at a time on in-memory tensors, a checkpoint after each.

Each epoch reseeds from (seed, epoch) alone (``epoch_seed``), so a run resumed from epoch k
draws the same batches, augmentations and dropout masks as one that never stopped. Under
``torchrun`` the same code runs DistributedDataParallel (gloo on the CPU, nccl on GPUs); only
rank 0 writes files. Progress bars show on a terminal only; a log gets one line per epoch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from stn_deploy.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from stn_deploy.config import ModelConfig
from stn_deploy.data import DataBundle, ImageSet, normalize
from stn_deploy.errors import StnDeployError
from stn_deploy.fileio import write_text_atomic
from stn_deploy.health import Health, measure_set, theta_spread_px
from stn_deploy.model import STNClassifier, build_model, count_parameters
from stn_deploy.training.augment import rts_probe, step_images
from stn_deploy.training.objectives import Batch, Objective, objectives
from stn_deploy.training.optim import Optimizers, WeightEma
from stn_deploy.training.options import TrainOptions, check, flag, show

# NHWC activations: oneDNN's convolutions (forward and backward) run about 1.3x faster in it
# on the CPU than in NCHW; the weights are the same numbers, saved contiguous.
_LAYOUT = torch.channels_last
# Options a resumed run may change: they do not shape the weights.
_RESUME_FREE = {"quiet", "device", "stop_after", "epochs"}  # epochs: its own message


def epoch_seed(seed: int, epoch: int) -> int:
    """The one seed of an epoch: its batch order and augmentation draws, its fresh
    distortions, and (plus the rank) its dropout masks all derive from it."""
    return seed * 100_003 + epoch


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    parameters: int = 0
    health: Health | None = None
    health_rts: Health | None = None  # on the RTS-distorted test split (see rts_probe)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class EpochTotals:
    """One epoch's training figures, summed over the images seen (on every rank)."""

    loss: float
    correct: int
    seen: int
    theta_spread_px: float  # how far the epoch's training thetas spread (mean over ranks)
    objectives: list[float]  # each objective's total, in the order of _Fit.objectives

    def reduced(self, d: _Dist, device: torch.device) -> "EpochTotals":
        """Summed over the ranks (the spread averaged); as it is on one process."""
        if d.world == 1:
            return self
        t = torch.tensor([self.loss, self.correct, self.seen, self.theta_spread_px,
                          *self.objectives], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        v = t.tolist()
        return EpochTotals(v[0], int(v[1]), int(v[2]), v[3] / d.world, v[4:])

    def row(self, objs: list[Objective], use_stn: bool) -> dict[str, Any]:
        row = {"train_loss": round(self.loss / self.seen, 5),
               "train_acc": round(self.correct / self.seen, 5)}
        if use_stn:
            row["train_theta_spread_px"] = round(self.theta_spread_px, 3)
        for obj, total in zip(objs, self.objectives):
            row.update(obj.row(total / self.seen))
        return row


@dataclass
class _Fit:
    """What the epochs train, measure and save: built once a run, restored by --resume."""

    config: ModelConfig
    device: torch.device
    dist: _Dist
    model: STNClassifier  # the weights trained
    net: nn.Module  # the same, wrapped for DistributedDataParallel across ranks
    ema: WeightEma | None
    optimizer: Optimizers
    criterion: nn.Module
    objectives: list[Objective]
    steps: int  # per epoch, on each rank
    per_rank: int  # images per epoch on each rank

    @property
    def kept(self) -> STNClassifier:
        """What is measured, pictured and saved: the average with --ema, else the weights."""
        return self.model if self.ema is None else self.ema.model


def train(bundle: DataBundle, out_dir: str | Path, opts: TrainOptions,
          resume: str | Path | None = None) -> TrainResult:
    """Train on ``bundle`` and write last.pt, metrics.json, transforms.png and curves.png."""
    from tqdm import tqdm

    config = bundle.config
    check(opts, use_stn=config.use_stn, distort=config.distort, dropout=config.dropout)
    device = resolve_device(opts.run.device)
    d = _init_distributed(device)
    state = None if resume is None else _resumable(Path(resume), config, opts)
    start, history = (1, []) if state is None else (state.epoch + 1, list(state.history))
    fit = _build(bundle, opts, device, d, state)
    out = Path(out_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    last = min(opts.run.epochs, opts.run.stop_after or opts.run.epochs)
    probe = rts_probe(bundle, opts)
    copy_images = None if probe is None else probe.images  # health re-judges a still theta on it
    health: Health | None = None
    health_rts: Health | None = None
    for epoch in range(start, last + 1):
        t0 = time.perf_counter()
        totals = train_epoch(fit, bundle, opts, epoch, history).reduced(d, device)
        measured, health, health_rts = _measure(fit, bundle, probe, copy_images)
        history.append({"epoch": epoch, **totals.row(fit.objectives, config.use_stn),
                        **measured, "lr": round(fit.optimizer.lr, 6),
                        "seconds": round(time.perf_counter() - t0, 2),
                        "stn": health.headline(),
                        **({} if health_rts is None else {"stn_rts": health_rts.headline()})})
        if d.main:
            _save(fit, out, opts, history)
            if not opts.run.quiet:
                tqdm.write(_epoch_line(history[-1], opts.run.epochs, health, health_rts))
    # The last epoch measured the final weights; a resume at its --stop-after measures here.
    final = health if health is not None else measure_set(fit.kept, bundle.test,
                                                          rts_copy=copy_images)
    if probe is not None and health_rts is None:
        health_rts = measure_set(fit.kept, probe)
    if d.main:
        _save_pictures(fit, bundle, probe, out, final, health_rts, history)
        write_metrics(out / "metrics.json", config, opts, history, count_parameters(fit.model),
                      d.world, final, health_rts)
    if d.world > 1:
        dist.barrier()
    return TrainResult(out / "last.pt", history, count_parameters(fit.model), final, health_rts)


def train_epoch(fit: _Fit, bundle: DataBundle, opts: TrainOptions, epoch: int,
                history: list[dict[str, Any]]) -> EpochTotals:
    """One pass over this rank's share of the training set, drawn from epoch_seed alone."""
    from tqdm import tqdm

    seed, d, batch_size = epoch_seed(opts.run.seed, epoch), fit.dist, opts.optim.batch_size
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + d.rank)
    n_train = len(bundle.train)
    order = torch.randperm(n_train, generator=g)
    order = torch.cat([order, order[: fit.per_rank * d.world - n_train]])  # equal shards
    mine = order[d.rank::d.world]
    train_set = bundle.redistort_train(seed, opts.augment.clean_fraction) \
        if opts.augment.redistort else bundle.train
    fit.net.train()
    for obj in fit.objectives:
        obj.begin_epoch(history)
    thetas: list[Tensor] = []
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct, seen = 0, 0
    bar = tqdm(range(fit.steps), desc=f"epoch {epoch}/{opts.run.epochs}", unit="batch",
               disable=opts.run.quiet or not d.main or not sys.stderr.isatty(), leave=False,
               dynamic_ncols=True)
    for step in bar:
        sel = mine[step * batch_size:(step + 1) * batch_size]
        xb, applied = step_images(train_set.images[sel], opts, g, seed * 10_000 + step)
        x = normalize(xb.to(fit.device, non_blocking=True), fit.config).contiguous(
            memory_format=_LAYOUT)
        y = train_set.labels[sel].to(fit.device, non_blocking=True)
        # theta comes with the logits at no cost: the STN computes it anyway.
        logits, theta = fit.net(x, with_theta=True)
        loss = fit.criterion(logits, y)
        for obj in fit.objectives:
            term = obj.loss(Batch(theta, y, applied, fit.config.num_classes))
            if term is not None:
                loss = loss + term
        if fit.config.use_stn:
            thetas.append(theta.detach().reshape(-1, 6))  # stays on the device: no sync
        fit.optimizer.zero_grad()
        loss.backward()
        fit.optimizer.step()
        if fit.ema is not None:
            fit.ema.update((epoch - 1) * fit.steps + step)
        loss_sum += loss.detach().double().cpu() * len(sel)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(sel)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    # How far this epoch's thetas spread, training mode (a rank's own share).
    spread = theta_spread_px(torch.cat(thetas).double().cpu().numpy(),
                             fit.config.image_size) if thetas else 0.0
    return EpochTotals(float(loss_sum), correct, seen, spread,
                       [float(obj.total) for obj in fit.objectives])


def _build(bundle: DataBundle, opts: TrainOptions, device: torch.device, d: _Dist,
           state: Checkpoint | None) -> _Fit:
    """The model (from the run's seed, or the checkpoint), its average, optimizers, loss."""
    config = bundle.config
    torch.manual_seed(opts.run.seed)
    model = build_model(config).to(device, memory_format=_LAYOUT)
    if state is not None:
        model.load_state_dict(state.state_dict if state.train_state_dict is None
                              else state.train_state_dict)
    ema = WeightEma(model, opts.optim.ema) if opts.optim.ema else None
    if ema is not None and state is not None:
        ema.model.load_state_dict(state.state_dict)
    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank = math.ceil(len(bundle.train) / d.world)
    steps = math.ceil(per_rank / opts.optim.batch_size)
    optimizer = Optimizers(model, opts.optim, opts.run.epochs, steps)
    if state is not None and state.optimizer is not None and state.scheduler is not None:
        optimizer.load_state_dicts(state.optimizer, state.scheduler)
    criterion = nn.CrossEntropyLoss(label_smoothing=opts.optim.label_smoothing)
    return _Fit(config, device, d, model, net, ema, optimizer, criterion, objectives(opts),
                steps, per_rank)


def _measure(fit: _Fit, bundle: DataBundle, probe: ImageSet | None,
             copy_images: Tensor | None) -> tuple[dict[str, Any], Health, Health | None]:
    """(the epoch row's test figures, STN health on the test split, and on the probe)."""
    kept, config, device, d = fit.kept, fit.config, fit.device, fit.dist
    test_loss, test_acc = evaluate(kept, bundle.test, config, device, dist_info=d)
    row = {"test_loss": round(test_loss, 5), "test_acc": round(test_acc, 5)}
    if fit.ema is not None:
        row["raw_test_acc"] = round(evaluate(fit.model, bundle.test, config, device,
                                             dist_info=d)[1], 5)
    health = measure_set(kept, bundle.test, rts_copy=copy_images)
    if probe is None:
        return row, health, None
    row["rts_test_acc"] = round(evaluate(kept, probe, config, device, dist_info=d)[1], 5)
    return row, health, measure_set(kept, probe)


def _epoch_line(row: dict[str, Any], epochs: int, health: Health,
                health_rts: Health | None) -> str:
    line = (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  "
            f"train {100 * row['train_acc']:.2f}%  test {100 * row['test_acc']:.2f}%  "
            f"({row['seconds']:.1f}s)  STN: {health.summary()}")
    if health_rts is not None:
        line += (f"; RTS-distorted test {100 * row['rts_test_acc']:.2f}%, STN: "
                 f"{health_rts.summary()}")
    return line


def _save(fit: _Fit, out: Path, opts: TrainOptions, history: list[dict[str, Any]]) -> None:
    opt_state, sched_state = fit.optimizer.state_dicts()
    save_checkpoint(out / "last.pt", Checkpoint(
        config=fit.config, state_dict=_cpu_state(fit.kept), epoch=history[-1]["epoch"],
        history=history, train_args=opts.to_dict(), optimizer=opt_state,
        scheduler=sched_state, train_state_dict=None if fit.ema is None
        else _cpu_state(fit.model)))
    write_metrics(out / "metrics.json", fit.config, opts, history,
                  count_parameters(fit.model), fit.dist.world)


def _save_pictures(fit: _Fit, bundle: DataBundle, probe: ImageSet | None, out: Path,
                   health: Health, health_rts: Health | None,
                   history: list[dict[str, Any]]) -> None:
    from stn_deploy.viz import save_curves, save_transforms

    save_transforms(fit.kept, bundle.test, out / "transforms.png", health=health)
    if probe is not None:  # what the STN does to what it was trained to undo
        save_transforms(fit.kept, probe, out / "transforms_rts.png", health=health_rts,
                        distort="test split RTS-distorted (--rts-augment)")
    save_curves(history, out / "curves.png")


def _resumable(path: Path, config: ModelConfig, opts: TrainOptions) -> Checkpoint:
    """The checkpoint to continue from, or one line naming by flag what differs: a run ends
    with the options it started with (a recipe changed since would alter it halfway)."""
    state = load_checkpoint(path)
    if state.config != config:
        raise StnDeployError(f"{path} was trained with another model or data "
                             f"({_config_changes(state.config, config)}); resume with the "
                             "options it was trained with")
    if state.train_args.get("epochs", opts.run.epochs) != opts.run.epochs:
        raise StnDeployError(f"{path} follows a {state.train_args['epochs']}-epoch schedule;"
                             " resume with the same --epochs")
    changed = _changed_options(state.train_args, opts)
    if changed:
        raise StnDeployError(f"{path} was trained with other options ({changed}); resume "
                             "with the ones it was trained with")
    if state.epoch >= opts.run.epochs:
        raise StnDeployError(f"{path} already has {state.epoch} epochs; pass --epochs "
                             f"above {state.epoch} to train further")
    return state


def _changed_options(trained: dict[str, Any], opts: TrainOptions) -> str:
    """'--flag was -> now' for each option that differs from the checkpoint's. Options a
    checkpoint predates count as their defaults."""
    defaults = TrainOptions().to_dict()
    diffs = [f"{flag(k)} {trained.get(k, defaults[k])} -> {v}"
             for k, v in opts.to_dict().items()
             if k not in _RESUME_FREE and trained.get(k, defaults[k]) != v]
    return ", ".join(diffs[:4]) + (", ..." if len(diffs) > 4 else "")


def _config_changes(was: ModelConfig, now: ModelConfig) -> str:
    """The flags behind the model config fields that differ (a data fact names the data)."""
    said: list[str] = []
    for f in fields(ModelConfig):
        a, b = getattr(was, f.name), getattr(now, f.name)
        if a == b:
            continue
        if f.name == "use_stn":
            a, b = not a, not b  # the flag is --no-stn
        text = flag(f.name) if isinstance(a, tuple) or f.name in ("in_channels", "num_classes") \
            else f"{flag(f.name)} {show(a)} -> {show(b)}"
        if text not in said:
            said.append(text)
    return ", ".join(said)


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


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


def write_metrics(path: Path, config: ModelConfig, opts: TrainOptions,
                  history: list[dict[str, Any]], parameters: int, world: int,
                  health: Health | None = None, health_rts: Health | None = None) -> None:
    doc = {"config": config.to_dict(), "options": opts.to_dict(), "parameters": parameters,
           "world_size": world, "torch": torch.__version__, "history": history}
    if health is not None:
        doc["stn_health"] = health.to_dict()
    if health_rts is not None:
        doc["stn_health_rts"] = health_rts.to_dict()
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")
