"""The plain flow with no paths, as the README's "The commands" starts: ``stn-deploy train``,
``stn-deploy export --opset 16``, ``stn-deploy bench``, in an empty folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from stn_deploy.cli import cli
from stn_deploy.defaults import DEFAULT_CHECKPOINT, EXPORT_DIR, TRAIN_OUT, exports_of

FAST = ["--batch-sizes", "1,4", "--iterations", "3", "--warmup", "1", "--eval-samples", "64",
        "--no-compute-only", "--quiet"]


def test_train_writes_where_export_and_bench_look() -> None:
    train = cli.get_command(None, "train")  # type: ignore[arg-type]
    assert train is not None
    out = next(p for p in train.params if p.name == "out_dir")
    assert Path(str(out.default)) == TRAIN_OUT and DEFAULT_CHECKPOINT == TRAIN_OUT / "last.pt"


def _decoy(onnx_path: Path, source_sha256: str, target: Path) -> Path:
    """An ONNX export of another checkpoint, under a name that looks like ours."""
    import onnx

    from stn_deploy.artifacts import set_metadata

    proto = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    set_metadata(proto, {**meta, "source_sha256": source_sha256})
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(target))
    return target


def _plain_flow(folder: Path, train: Callable[[], None], other_sha256: str,
                other_onnx: Path) -> None:
    """Runs in ``folder`` (the current directory); ``train`` stands for `stn-deploy train`."""
    from stn_deploy.backends import unavailable_reason

    runner = CliRunner()
    # Before training, each default is missing: one line naming what to run first.
    for args in (["export", "--opset", "16"], ["bench", *FAST]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert res.output.strip().splitlines()[-1].startswith("Error: no ")
        assert f"{DEFAULT_CHECKPOINT} does not exist: run `stn-deploy train` first" in res.output
    train()
    ckpt = folder / DEFAULT_CHECKPOINT
    assert ckpt.is_file()

    res = runner.invoke(cli, ["export", "--opset", "16"])
    assert res.exit_code == 0, res.output
    assert f"export: {DEFAULT_CHECKPOINT} (the last training run" in res.output
    onnx16 = folder / EXPORT_DIR / "last-opset16-fp32.onnx"
    assert onnx16.is_file() and f"wrote {EXPORT_DIR / onnx16.name}" in res.output

    # Matched by hash, not by name: an export of another checkpoint named like ours is left out.
    decoy = _decoy(other_onnx, other_sha256, folder / EXPORT_DIR / "last-opset17-fp32.onnx")
    res = runner.invoke(cli, ["bench", *FAST, "--json", "b.json", "--min-agreement", "99"])
    assert res.exit_code == 0, res.output
    assert (f"bench: {DEFAULT_CHECKPOINT} (the last training run) and its 1 export in "
            f"{EXPORT_DIR}/: {onnx16.name}; ignored 1 model file there that is not of it"
            in res.output)
    doc = json.loads((folder / "b.json").read_text())
    rows = sorted((r["model"], r["backend"]) for r in doc["results"])
    want = [(str(DEFAULT_CHECKPOINT), "torch"), (str(EXPORT_DIR / onnx16.name), "onnxruntime")]
    if unavailable_reason("openvino") is None:
        want.append((str(EXPORT_DIR / onnx16.name), "openvino"))
    assert rows == sorted(want) and doc["reference"]["model"] == str(DEFAULT_CHECKPOINT)
    assert all(r["status"] == "ok" for r in doc["results"]) and doc["gate"]["passed"]
    assert exports_of(ckpt, folder / EXPORT_DIR) == ([onnx16], [decoy])

    # --backend trt with no plan: on a machine that cannot run TensorRT, the line says why
    # (no GPU, or what to install); where it can, it names the export to run first.
    res = runner.invoke(cli, ["bench", "--backend", "trt", *FAST])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    reason = unavailable_reason("trt") or "run `stn-deploy export --format engine` first"
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and reason in last


def test_plain_flow_in_an_empty_folder(digits_checkpoint: Path, digits_onnx: Path,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """export --opset 16 and bench with no paths; train is stood in for by copying the
    session's trained checkpoint to where train writes (the slow test below runs train)."""
    monkeypatch.chdir(tmp_path)

    def train() -> None:
        (tmp_path / TRAIN_OUT).mkdir(parents=True)
        shutil.copyfile(digits_checkpoint, tmp_path / DEFAULT_CHECKPOINT)

    _plain_flow(tmp_path, train, hashlib.sha256(b"another checkpoint").hexdigest(), digits_onnx)


@pytest.mark.slow
def test_plain_flow_with_real_training(digits_checkpoint: Path, digits_onnx: Path,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stn_deploy.fileio import sha256_file

    monkeypatch.chdir(tmp_path)

    def train() -> None:
        res = CliRunner().invoke(cli, ["train", "--epochs", "2", "--quiet"])
        assert res.exit_code == 0, res.output

    _plain_flow(tmp_path, train, sha256_file(digits_checkpoint), digits_onnx)


def test_bench_trt_without_a_plan_names_the_export_to_run(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """Where TensorRT can run but export/ has no plan of the checkpoint, the skip reason (and
    so the one error line) says what to run; where it cannot run, why not comes first."""
    import stn_deploy.backends as backends
    from stn_deploy.bench import plan_rows

    ckpt = tmp_path / "last.pt"
    onnx_file = tmp_path / "last-opset16-fp32.onnx"
    hint = "no TensorRT plan of last.pt in export/: run `stn-deploy export --format engine` first"
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None)
    assert plan_rows([ckpt, onnx_file], ("trt",), hint) == ([], {"trt": hint})
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: f"{name}: no GPU")
    assert plan_rows([ckpt, onnx_file], ("trt",), hint) == ([], {"trt": "trt: no GPU"})
    # Models named on the command line keep the plain reason.
    assert plan_rows([ckpt], ("trt",)) == ([], {"trt": "runs plan files and none was given"})
