"""The optimizers and their one-cycle schedules, and the moving average of the weights."""

from __future__ import annotations

import copy
from typing import Any

import torch

from stn_deploy.errors import StnDeployError
from stn_deploy.model import STNClassifier
from stn_deploy.training.options import OptimOptions


def _make(kind: str, groups: list[dict[str, Any]], o: OptimOptions) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.AdamW(groups)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=o.momentum, nesterov=o.nesterov)
    raise StnDeployError(f"unknown optimizer {kind!r}; use sgd or adam")


class Optimizers:
    """The classifier's optimizer and, when it differs, the STN's own (AdamW beside SGD),
    each under its one-cycle schedule; stepped, saved and restored as one."""

    def __init__(self, model: STNClassifier, o: OptimOptions, epochs: int,
                 steps_per_epoch: int) -> None:
        stn = list(model.stn.parameters()) if model.stn is not None else []
        stn_ids = {id(p) for p in stn}
        rest = {"params": [p for p in model.parameters() if id(p) not in stn_ids],
                "lr": o.lr, "weight_decay": o.weight_decay}
        groups = [[rest]]
        if stn:
            decay = o.weight_decay if o.stn_weight_decay is None else o.stn_weight_decay
            stn_group = {"params": stn, "weight_decay": decay,
                         "lr": o.stn_lr if o.stn_lr is not None else o.lr * o.stn_lr_scale}
            if o.stn_optimizer in (None, o.optimizer):
                groups[0].append(stn_group)
            else:
                groups.append([stn_group])
        kinds = [o.optimizer, o.stn_optimizer or o.optimizer]
        self.optimizers = [_make(kind, g, o) for kind, g in zip(kinds, groups)]
        self.schedulers = [torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], epochs=epochs,
            steps_per_epoch=steps_per_epoch) for opt in self.optimizers]

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
        if not 0 < decay < 1:  # the command's --ema is checked by name in options.check
            raise ValueError(f"the decay must be in (0, 1), got {decay}")
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
