"""benchmarks/cifar10_recipe.py, the script that trains the shipped CIFAR-10 model over many
sessions: stopped and started again, it must continue the run where it stopped (a run of 300
epochs that restarts from epoch 1 each session never ends), and say in its results file how far
it got. Run here on a small image folder of digits: the script takes any ImageFolder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from stn_deploy.pretrained import pretrained
from stn_deploy.pretrained.card import model_card

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar10_recipe.py"


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600)


def test_a_stopped_run_continues_and_reports_its_progress(digits_folders: dict[str, Path],
                                                          tmp_path: Path) -> None:
    run_dir, results = tmp_path / "run", tmp_path / "results"
    common = ["--data-dir", str(digits_folders["data"]), "--run-dir", str(run_dir),
              "--results-dir", str(results)]
    first = _script(*common, "--stop-after", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "--resume" not in first.stdout  # a fresh run starts from nothing

    second = _script(*common, "--stop-after", "2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "--resume" in second.stdout
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]  # epoch 1 not trained twice

    res = json.loads((results / "cifar10_recipe.json").read_text())
    assert (res["epochs_done"], res["epochs"], res["complete"]) == (2, 300, False)
    assert "IN PROGRESS: 2 of 300 epochs" in (results / "cifar10_recipe.md").read_text()
    state = torch.load(results / "cifar10_recipe_in_progress.pt", weights_only=True)
    assert state["epoch"] == 2

    # Shipped as it stands: the ONNX evaluated by ONNX Runtime alone, the card saying which
    # epoch of how many these weights are, and the shipped files loadable by name.
    shipped = _script(*common, "--report-only", "--ship", "--ship-dir", str(tmp_path / "pkg"))
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    model = pretrained("cifar10-stn", tmp_path / "pkg")
    record = model.record
    assert (record["epochs"], record["epochs_planned"], record["complete"]) == (2, 300, False)
    assert record["onnx_images"] == 40 and 0 <= record["onnx_accuracy"] <= 1
    assert 0 <= record["onnx_theta_at_rest"] <= 1
    card = model.card.read_text()
    assert card == model_card(record)
    assert "**Training in progress**: these are the weights after epoch 2 of the recipe's 300" \
        in card and "(2 of its 300 epochs so far;" in card
    assert "of the (upright) test images theta rests" in card
    assert torch.load(model.checkpoint, weights_only=True)["epoch"] == 2


def test_an_unknown_ablation_is_refused_before_training(digits_folders: dict[str, Path],
                                                        tmp_path: Path) -> None:
    out = _script("--data-dir", str(digits_folders["data"]), "--run-dir", str(tmp_path / "run"),
                  "--results-dir", str(tmp_path / "results"), "--ablation", "recipe,no-such")
    assert out.returncode != 0
    assert "unknown ablation 'no-such'" in out.stderr
    assert not (tmp_path / "cifar10-stn-ablations-30ep").exists()


def test_each_ablation_trains_without_its_component_and_gets_a_row(
        digits_folders: dict[str, Path], tmp_path: Path) -> None:
    run_dir, results = tmp_path / "run", tmp_path / "results"
    common = ["--data-dir", str(digits_folders["data"]), "--run-dir", str(run_dir),
              "--results-dir", str(results)]
    assert _script(*common, "--stop-after", "1").returncode == 0  # the run the report reads
    out = _script(*common, "--ablation", "recipe,no-label-smoothing", "--epochs", "1")
    assert out.returncode == 0, out.stderr[-2000:]

    folder = tmp_path / "cifar10-stn-ablations-1ep"
    options = {name: json.loads((folder / name / "metrics.json").read_text())["options"]
               for name in ("recipe", "no-label-smoothing")}
    assert options["recipe"]["label_smoothing"] > 0  # the recipe smooths; its ablation not
    assert options["no-label-smoothing"]["label_smoothing"] == 0
    assert options["recipe"]["epochs"] == options["no-label-smoothing"]["epochs"] == 1
    rows = json.loads((results / "cifar10_recipe.json").read_text())["ablations"]
    assert [(r["run"], r["epochs"]) for r in rows] == [("recipe", 1), ("no-label-smoothing", 1)]
    assert rows[1]["changes"] == {"label-smoothing": 0}
    assert all(0 <= r[k] <= 1 for r in rows for k in ("test_acc", "rts_test_acc", "train_acc"))
    assert "| no-label-smoothing | 1 |" in (results / "cifar10_recipe.md").read_text()
