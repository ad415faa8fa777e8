"""Training the STN classifier.

- ``options``: the options grouped by what they act on, the recipes, the ``auto`` policy and
  every refusal (standard library only: the command's ``--help`` reads it);
- ``objectives``: the STN's own loss terms behind one interface;
- ``augment``: what each step does to its images;
- ``optim``: the optimizers, their schedules and the moving average of the weights;
- ``loop``: ``train`` and ``train_epoch``.

``from stn_deploy.training import TrainOptions, train`` loads the loop (and torch) on first
use, so importing the package for its options stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stn_deploy.training.loop import TrainResult, evaluate, train
    from stn_deploy.training.options import RECIPES, TrainOptions

_WHERE = {"train": "loop", "evaluate": "loop", "TrainResult": "loop",
          "TrainOptions": "options", "RECIPES": "options"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"stn_deploy.training.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'stn_deploy.training' has no attribute {name!r}")


__all__ = list(_WHERE)
