"""Checkpoints that carry everything later steps need: weights, the model config, the
training state for ``--resume`` and the metric history.

Loading uses ``torch.load(weights_only=True)``: a checkpoint handed to us is data, and is
never unpickled as code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError
from stn_deploy.fileio import atomic_path, sha256_file
from stn_deploy.model import STNClassifier, build_model
from stn_deploy.version import __version__

FORMAT = "stn-deploy-checkpoint/1"


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    train_args: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    # With --ema, state_dict holds the averaged weights (what every later step uses) and this
    # the raw ones that --resume continues from; None without --ema.
    train_state_dict: dict[str, torch.Tensor] | None = None
    path: Path | None = None

    def model(self) -> STNClassifier:
        """The model in eval mode, on the CPU."""
        model = build_model(self.config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "state dict mismatch"
            raise StnDeployError(f"checkpoint weights do not fit its config: {first}") from None
        return model.eval()

    def sha256(self) -> str:
        return sha256_file(self.path) if self.path is not None else ""


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    payload = {
        "format": FORMAT,
        "version": __version__,
        "config": ckpt.config.to_dict(),
        "state_dict": ckpt.state_dict,
        "epoch": ckpt.epoch,
        "history": ckpt.history,
        "train_args": ckpt.train_args,
        "optimizer": ckpt.optimizer,
        "scheduler": ckpt.scheduler,
        "train_state_dict": ckpt.train_state_dict,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_tensors(path: str | os.PathLike[str], what: str) -> Any:
    """``torch.load(weights_only=True)`` of a file that must exist, or one line naming it as
    not a readable ``what``."""
    p = Path(path)
    if not p.is_file():
        raise StnDeployError(f"{what} not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for bad bytes
        # First sentence only: torch's full text suggests weights_only=False, which we never do.
        text = str(e).strip()
        reason = text.splitlines()[0].split(". ")[0][:160] if text else type(e).__name__
        raise StnDeployError(f"{p} is not a readable {what} ({reason})") from None


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    p = Path(path)
    payload = load_tensors(p, "stn-deploy checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise StnDeployError(f"{p} is not an stn-deploy checkpoint (no '{FORMAT}' marker)")
    try:
        return Checkpoint(
            config=ModelConfig.from_dict(payload["config"]),
            state_dict=payload["state_dict"],
            epoch=int(payload.get("epoch", 0)),
            history=list(payload.get("history") or []),
            train_args=dict(payload.get("train_args") or {}),
            optimizer=payload.get("optimizer"),
            scheduler=payload.get("scheduler"),
            train_state_dict=payload.get("train_state_dict"),
            path=p,
        )
    except KeyError as e:
        raise StnDeployError(f"{p} is missing the checkpoint field {e}") from None
