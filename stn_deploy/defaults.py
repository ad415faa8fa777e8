"""What ``export`` and ``bench`` pick when they are given no paths, so the plain flow
``stn-deploy train``, ``stn-deploy export --opset 16``, ``stn-deploy bench`` works as written.

The checkpoint is the last training run's (in train's default ``--out-dir``); its exports are
the files in ``export/`` whose recorded checkpoint hash (``source_sha256`` in the ONNX metadata
or the plan's sidecar) is that checkpoint's. Hashes, not file names: a retrained checkpoint keeps
its name, and its old exports must not be benchmarked as if they were of it.

Only the standard library is imported at the top: the commands' ``--help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path

from stn_deploy.errors import StnDeployError

TRAIN_OUT = Path("runs/train")  # stn-deploy train's --out-dir default (tests/test_plain_flow.py)
DEFAULT_CHECKPOINT = TRAIN_OUT / "last.pt"
EXPORT_DIR = Path("export")  # stn-deploy export writes here unless --out says otherwise


def default_checkpoint(argument: str) -> Path:
    """The last training run's checkpoint, or one line naming what to run first."""
    if not DEFAULT_CHECKPOINT.is_file():
        raise StnDeployError(f"no {argument} given and {DEFAULT_CHECKPOINT} does not exist: run "
                             f"`stn-deploy train` first (or name a checkpoint)")
    return DEFAULT_CHECKPOINT


def exports_of(checkpoint: Path, folder: Path = EXPORT_DIR) -> tuple[list[Path], list[Path]]:
    """(ONNX files, OpenVINO IRs and TensorRT plans under ``folder`` exported from ``checkpoint``, the model
    files there that come from other checkpoints or cannot tell), each sorted by path."""
    from stn_deploy.artifacts import PLAN_SUFFIXES, recorded_source
    from stn_deploy.fileio import sha256_file

    mine: list[Path] = []
    others: list[Path] = []
    if not folder.is_dir():
        return mine, others
    want = sha256_file(checkpoint)
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".onnx", ".xml", *PLAN_SUFFIXES):
            continue
        (mine if recorded_source(path) == want else others).append(path)
    return mine, others


def bench_models() -> tuple[list[Path], str]:
    """The checkpoint and its exports for ``bench`` with no MODELS, and the one line saying
    what was picked."""
    ckpt = default_checkpoint("MODELS")
    mine, others = exports_of(ckpt)
    if mine:
        names = ", ".join(str(p.relative_to(EXPORT_DIR)) for p in mine)
        line = (f"bench: {ckpt} (the last training run) and its {len(mine)} "
                f"export{'s' if len(mine) > 1 else ''} in {EXPORT_DIR}/: {names}")
    else:
        line = (f"bench: {ckpt} (the last training run); no export of it in {EXPORT_DIR}/ "
                "(`stn-deploy export` writes one)")
    if others:
        many = len(others) > 1
        line += (f"; ignored {len(others)} model file{'s' if many else ''} there that "
                 f"{'are' if many else 'is'} not of it")
    return [ckpt, *mine], line
