"""Atomic writes: complete or absent, never half-written, readable as the umask allows."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stn_deploy.fileio import atomic_path, write_text_atomic


def test_written_file_has_umask_permissions(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    write_text_atomic(tmp_path / "a" / "metrics.json", "{}\n")
    mode = stat.S_IMODE((tmp_path / "a" / "metrics.json").stat().st_mode)
    assert mode == 0o666 & ~umask  # as open() would make it; mkstemp alone gives 0600
    assert (tmp_path / "a" / "metrics.json").read_text() == "{}\n"


def test_failure_keeps_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("export failed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
