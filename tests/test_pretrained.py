"""Shipped pretrained models: written by stn_deploy.pretrained.ship, found by name from the
CLI and the API, refused when a file is missing or is not the one its record describes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import stn_deploy
import stn_deploy.pretrained as pretrained_pkg
from stn_deploy.checkpoint import load_checkpoint
from stn_deploy.cli import cli
from stn_deploy.errors import StnDeployError
from stn_deploy.pretrained import names, pretrained, ship
from stn_deploy.pretrained.card import model_card

NAME = "digits-test"


@pytest.fixture(scope="module")
def shipped_folder(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a digits model shipped as benchmarks/cifar10_recipe.py ships one."""
    from stn_deploy.export.pipeline import ExportRequest, run_export

    work = tmp_path_factory.mktemp("ship-src")
    onnx = run_export(ExportRequest(checkpoint=digits_checkpoint, out=work / "m.onnx",
                                    with_theta=True, verify_samples=64),
                      echo=lambda _line: None).path
    folder = tmp_path_factory.mktemp("pretrained")
    facts = {"data": "scikit-learn digits", "recipe": "seed", "command": "stn-deploy train",
             "parameters": 1, "epochs": 3, "test_accuracy": 0.85, "onnx_accuracy": 0.85,
             "onnx_theta_spread_px": 0.5, "stn_health": {"collapsed": False},
             "stn_health_rts": None, "recipe_values": {"epochs": 3}, "trained": "2026-12-05"}
    ship(NAME, digits_checkpoint, onnx, facts, folder)
    return folder


@pytest.fixture
def as_installed(shipped_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shipped folder in place of the package's own."""
    monkeypatch.setattr(pretrained_pkg, "FOLDER", shipped_folder)
    return shipped_folder


def test_ship_writes_weights_onnx_record_and_card(shipped_folder: Path,
                                                  digits_checkpoint: Path) -> None:
    model = pretrained(NAME, shipped_folder)
    assert names(shipped_folder) == [NAME]
    shipped, trained = load_checkpoint(model.checkpoint), load_checkpoint(digits_checkpoint)
    assert shipped.optimizer is None and shipped.scheduler is None
    assert shipped.epoch == trained.epoch == 3
    for key, value in trained.state_dict.items():
        assert torch.equal(shipped.state_dict[key], value), key
    assert model.checkpoint.stat().st_size < digits_checkpoint.stat().st_size
    assert model.card.read_text() == model_card(model.record)
    assert "85.00%" in model.card.read_text() and "scikit-learn digits" in model.card.read_text()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.model()(x), trained.model()(x))


def test_a_damaged_or_missing_file_is_refused(shipped_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in shipped_folder.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    onnx = folder / f"{NAME}.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-100])  # truncated
    with pytest.raises(StnDeployError, match="not the file its record describes"):
        pretrained(NAME, folder)
    onnx.unlink()
    with pytest.raises(StnDeployError, match="is missing"):
        pretrained(NAME, folder)
    with pytest.raises(StnDeployError, match=f"no pretrained model 'nope'; shipped: {NAME}"):
        pretrained("nope", folder)


def test_api_finds_it_by_name(as_installed: Path) -> None:
    model = stn_deploy.pretrained_model(NAME)
    assert model.onnx == as_installed / f"{NAME}.onnx"
    assert model.record["onnx_accuracy"] == 0.85


def test_bench_pretrained_runs_its_checkpoint_and_onnx(as_installed: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "--pretrained", NAME, "--backend", "onnxruntime",
                                      "--batch-sizes", "1", "--iterations", "2",
                                      "--eval-samples", "64", "--quiet", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    models = {Path(r["model"]).name for r in rows}
    assert models == {f"{NAME}.pt", f"{NAME}.onnx"}, rows
    assert all(r["status"] == "ok" for r in rows), rows


def test_bench_refuses_unknown_name_and_a_model_beside_it(as_installed: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", "--pretrained", "nope"])
    assert result.exit_code == 2 and "no pretrained model 'nope'" in result.output
    model = str(as_installed / f"{NAME}.onnx")
    result = CliRunner().invoke(cli, ["bench", model, "--pretrained", NAME])
    assert result.exit_code == 2 and "not both" in result.output


def test_export_pretrained_from_cli_and_api(as_installed: Path, tmp_path: Path) -> None:
    from stn_deploy.artifacts import read_metadata

    record = pretrained(NAME).record
    out = tmp_path / "cli.onnx"
    result = CliRunner().invoke(cli, ["export", "--pretrained", NAME, "--out", str(out),
                                      "--verify-samples", "64"])
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["source_checkpoint"] == f"{NAME}.pt"
    assert meta["source_sha256"] == record["checkpoint_sha256"]
    api = stn_deploy.export_model(pretrained=NAME, out=tmp_path / "api.onnx", verify_samples=64)
    assert api.report.passed and read_metadata(api.path)["source_sha256"] == meta["source_sha256"]


def test_export_refuses_pretrained_beside_a_checkpoint(as_installed: Path) -> None:
    checkpoint = str(as_installed / f"{NAME}.pt")
    result = CliRunner().invoke(cli, ["export", checkpoint, "--pretrained", NAME])
    assert result.exit_code == 2
    assert "give one model to export" in result.output and "not CHECKPOINT and --pretrained" \
        in result.output
    with pytest.raises(StnDeployError, match="not model= and pretrained="):
        stn_deploy.export_model(checkpoint, pretrained=NAME)


@pytest.mark.skipif(not names(), reason="no pretrained model shipped in this checkout")
def test_every_shipped_model_matches_its_record_and_card() -> None:
    """What the package ships: hashes as recorded, the card as the record writes it, the
    ONNX the checkpoint's own export (same logits and theta; the accuracy ONNX Runtime measured
    the checkpoint's), theta not constant."""
    import numpy as np
    import onnxruntime as ort

    for name in names():
        model = pretrained(name)
        record = model.record
        assert model.card.read_text() == model_card(record)
        assert record["onnx_theta_spread_px"] > 0.05
        assert not record["stn_health"]["collapsed"]
        assert abs(record["onnx_accuracy"] - record["test_accuracy"]) <= 0.002
        net = model.model()
        x = torch.randn(8, *net.config.input_shape)
        with torch.no_grad():
            logits, theta = net(x, with_theta=True)
        session = ort.InferenceSession(str(model.onnx), providers=["CPUExecutionProvider"])
        out = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {session.get_inputs()[0].name: x.numpy()})))
        np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(out["theta"], theta.numpy(), atol=1e-4, rtol=1e-4)
