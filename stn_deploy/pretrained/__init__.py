"""The models stn-deploy ships trained, by name: ``stn-deploy export --pretrained cifar10-stn``,
``bench --pretrained cifar10-stn``, ``stn_deploy.pretrained_model("cifar10-stn")``.

A shipped model is four files in this folder, written together by
``benchmarks/cifar10_recipe.py --ship``: ``NAME.pt`` (the training checkpoint), ``NAME.onnx``
(its FP32 export, verified), ``NAME.json`` (the record: what it was trained on and with, what
it measured, both files' SHA-256) and ``NAME.md`` (the model card, written from the record).
The record is the one source: a name is shipped when its record is here, and a file whose hash
differs from the record's is refused rather than benchmarked as if it were the model the card
describes.

Only the standard library is imported: the commands' ``--help`` lists the names instantly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stn_deploy.errors import StnDeployError
from stn_deploy.fileio import sha256_file, write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:
    from stn_deploy.model import STNClassifier

FOLDER = Path(__file__).resolve().parent
# What each shipped file is, by suffix; the record names the first two by hash.
CHECKPOINT_SUFFIX, ONNX_SUFFIX, RECORD_SUFFIX, CARD_SUFFIX = ".pt", ".onnx", ".json", ".md"


@dataclass(frozen=True)
class Pretrained:
    """A shipped model's files and its record (accuracy, STN health, recipe, data)."""

    name: str
    checkpoint: Path
    onnx: Path
    card: Path
    record: dict[str, Any]

    def model(self) -> "STNClassifier":
        """The trained model in eval mode, on the CPU (loads torch)."""
        from stn_deploy.checkpoint import load_checkpoint

        return load_checkpoint(self.checkpoint).model()


def names(folder: Path | None = None) -> list[str]:
    """The shipped models' names: those with a record in ``folder`` (this package's)."""
    folder = FOLDER if folder is None else folder
    return sorted(p.stem for p in folder.glob(f"*{RECORD_SUFFIX}"))


def pretrained(name: str, folder: Path | None = None) -> Pretrained:
    """The shipped model ``name``, its files checked against its record's hashes."""
    folder = FOLDER if folder is None else folder
    known = names(folder)
    if name not in known:
        have = ", ".join(known) if known else "none in this install"
        raise StnDeployError(f"no pretrained model {name!r}; shipped: {have}")
    record_path = folder / f"{name}{RECORD_SUFFIX}"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as e:
        raise StnDeployError(f"pretrained {name}: cannot read {record_path} ({e})") from None
    model = Pretrained(name, folder / f"{name}{CHECKPOINT_SUFFIX}", folder / f"{name}{ONNX_SUFFIX}",
                       folder / f"{name}{CARD_SUFFIX}", record)
    for path, key in ((model.checkpoint, "checkpoint_sha256"), (model.onnx, "onnx_sha256")):
        _check_file(name, path, record.get(key))
    return model


def _check_file(name: str, path: Path, expected: str | None) -> None:
    if not path.is_file():
        raise StnDeployError(f"pretrained {name}: {path} is missing (reinstall stn-deploy)")
    if expected is None:
        raise StnDeployError(f"pretrained {name}: its record has no hash for {path.name}")
    if sha256_file(path) != expected:
        raise StnDeployError(f"pretrained {name}: {path.name} is not the file its record "
                             "describes (damaged or replaced; reinstall stn-deploy)")


def ship(name: str, checkpoint: Path, onnx: Path, facts: dict[str, Any],
         folder: Path | None = None) -> Pretrained:
    """Write ``name``'s files into ``folder`` (this package's): the checkpoint's kept weights
    without optimizer state (a third of a resumable checkpoint's size), the ONNX, then the
    record (``facts`` and both hashes) and the card written from it. The record goes last: a
    name is shipped once its record is there, never with half its files."""
    from stn_deploy.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from stn_deploy.pretrained.card import model_card

    folder = FOLDER if folder is None else folder
    ckpt = load_checkpoint(checkpoint)
    weights, onnx_out = folder / f"{name}{CHECKPOINT_SUFFIX}", folder / f"{name}{ONNX_SUFFIX}"
    save_checkpoint(weights, Checkpoint(ckpt.config, ckpt.state_dict, ckpt.epoch, ckpt.history,
                                        ckpt.train_args))
    write_bytes_atomic(onnx_out, Path(onnx).read_bytes())
    record = {"name": name, **facts, "checkpoint_sha256": sha256_file(weights),
              "onnx_sha256": sha256_file(onnx_out)}
    write_text_atomic(folder / f"{name}{CARD_SUFFIX}", model_card(record))
    write_text_atomic(folder / f"{name}{RECORD_SUFFIX}", json.dumps(record, indent=2) + "\n")
    return pretrained(name, folder)

