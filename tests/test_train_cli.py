"""``stn-deploy train``: what its options resolve to, its help, its refusals by real flag names,
and the advice it ends with."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner

from stn_deploy.cli import cli
from stn_deploy.commands.train import stn_advice
from stn_deploy.commands.train import train as train_command
from stn_deploy.config import ModelConfig
from stn_deploy.health import assess
from stn_deploy.training.options import TrainOptions, TrainSetup, flag, resolve

COMMAND_ONLY = {"out_dir", "resume", "print_config"}  # not options of the training itself


def _setup(*args: str) -> TrainSetup:
    """What ``stn-deploy train ARGS`` resolves to, through click's own parsing."""
    ctx = train_command.make_context("train", list(args))
    return resolve({k: v for k, v in ctx.params.items() if k not in COMMAND_ONLY})


def _flags() -> set[str]:
    return {n for p in train_command.params if isinstance(p, click.Option)
            for n in (*p.opts, *p.secondary_opts)}


def test_plain_train_resolves_to_a_setup_whose_stn_transforms() -> None:
    """No options: the digits RTS-distorted with the rts recipe for 20 epochs, the large
    localization net in two passes: the demo's training, whose STN undoes about two thirds of
    the rotation and scale (undistorted, the same digits left the STN collapsed)."""
    setup = _setup()
    assert (setup.data.dataset, setup.data.distort) == ("digits", "rts")
    assert (setup.model.use_stn, setup.model.loc_net, setup.model.stn_passes) == (True, "large", 2)
    opts = setup.train
    assert (opts.run.recipe, opts.run.epochs) == ("rts", 20)
    assert (opts.optim.optimizer, opts.optim.lr, opts.optim.stn_lr_scale) == ("adam", 1e-3, 1.0)
    assert (opts.augment.redistort, opts.augment.clean_fraction) == (True, 0.25)
    assert (opts.stn.stn_warp_penalty, opts.stn.stn_warp_from_px,
            opts.stn.stn_warp_per_class) == (0.3, 2.0, True)
    demo = _setup("--dataset", "digits", "--distort", "rts", "--epochs", "20")
    assert setup == demo
    # Other data is taken as it is, with the seed recipe; auto follows an explicit distortion.
    photos = _setup("--dataset", "cifar10", "--data-dir", "/nowhere")
    assert (photos.data.distort, photos.train.run.recipe, photos.model.loc_net,
            photos.train.run.epochs) == ("none", "seed", "seed", 10)
    upright = _setup("--distort", "none")
    assert (upright.train.run.recipe, upright.model.stn_passes) == ("seed", 1)


def test_print_config_shows_every_option_resolved_and_trains_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--print-config", "--out-dir", str(out),
                                 "--lr", "0.002"])
    assert r.exit_code == 0, r.output
    assert not out.exists()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^  (--[\w-]+(?: \w+)?) +(\S+)",
                                                          r.output, re.M)}
    listed = {name.split()[0] for name in rows}
    hidden = {"--help", "-h", "--help-all", "--print-config"}
    # Every option of the command is printed with its value (a switch by its first name).
    options = [p for p in train_command.params
               if isinstance(p, click.Option) and not hidden & set(p.opts)]
    assert all(set(p.opts) & listed for p in options), sorted(
        p.opts[0] for p in options if not set(p.opts) & listed)
    assert rows["--distort"] == "rts" and "auto: rts for digits" in r.output
    assert rows["--recipe"] == "rts" and rows["--epochs"] == "20"
    assert rows["--lr"] == "0.002" and rows["--optimizer"] == "adam"
    assert rows["--out-dir"] == str(out) and rows["--affine DEGREES"] == "0"
    assert re.search(r"--stn-lr +- += --lr x --stn-lr-scale = 0.002$", r.output, re.M)
    # A combination that means nothing is refused before anything is printed or loaded.
    bad = CliRunner().invoke(cli, ["train", "--print-config", "--distort", "none",
                                   "--clean-fraction", "0.2"])
    assert bad.exit_code == 1 and "--clean-fraction needs --distort data" in bad.output


def test_help_shows_the_first_options_and_help_all_the_advanced_ones() -> None:
    short = CliRunner().invoke(cli, ["train", "--help"])
    full = CliRunner().invoke(cli, ["train", "--help-all"])
    assert short.exit_code == 0 and full.exit_code == 0
    assert len(short.output.splitlines()) <= 50  # one screen
    for first in ("--dataset", "--data-dir", "--distort", "--recipe", "--epochs", "--out-dir",
                  "--resume", "--device", "--seed", "--quiet", "--print-config", "--help-all"):
        assert first in short.output, first
    for advanced in ("Advanced: STN objectives", "--stn-warp-penalty", "--loc-net", "--lr ",
                     "--affine", "--stop-after"):
        assert advanced not in short.output and advanced in full.output, advanced
    assert re.search(r"\d+ more options \(the model, optimizer, .*\): --help-all\.",
                     " ".join(short.output.split()))
    # Every default a recipe sets is shown with its values, never as "by recipe".
    assert "by recipe" not in full.output
    assert "[default: seed, improved, cifar10-stn: 0.05; rts: 0.001]" in " ".join(
        full.output.split())
    # An option left unset is resolved elsewhere (a recipe, auto): its help says to what.
    ctx = train_command.make_context("train", [])
    unsaid = [p.name for p in train_command.params
              if isinstance(p, click.Option) and p.default is None
              and p.name not in ("data_dir", "stop_after")  # a folder; the whole schedule
              and "[default: " not in (p.get_help_record(ctx) or ("", ""))[1]]
    assert unsaid == []


def test_every_option_names_the_flag_that_sets_it() -> None:
    """Refusals name options by flag(): derived here from the click option map, every training
    option and model config field must map to a real flag of the command."""
    by_param = {p.name: p for p in train_command.params if isinstance(p, click.Option)}
    feeds = {"affine_deg": "affine", "affine_scale": "affine", "use_stn": "no_stn"}
    for name in [*TrainOptions().to_dict(), "use_stn", "loc_net", "loc_act", "stn_passes",
                 "align_corners", "image_size", "distort", "dataset"]:
        param = by_param[feeds.get(name, name)]
        assert flag(name).split()[0] in param.opts, (name, flag(name), param.opts)
    for data_fact in ("in_channels", "num_classes", "class_names", "mean", "std"):
        assert set(flag(data_fact).split("/")) <= _flags()


def _train(out: Path, *extra: str) -> Any:
    return CliRunner().invoke(cli, ["train", "--distort", "none", "--epochs", "2", "--quiet",
                                    "--device", "cpu", "--out-dir", str(out), *extra])


def test_resume_refusals_name_real_flags(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _train(out, "--stop-after", "1", "--recipe", "rts", "--affine", "10", "0.1",
                   "--stn-warp-penalty", "0.1", "--stn-warp-from", "5")
    assert first.exit_code == 0, first.output
    again = ["--resume", "--recipe", "rts", "--stn-warp-penalty", "0.1"]
    changed = _train(out, *again, "--affine", "5", "0.1", "--stn-warp-from", "6")
    assert changed.exit_code == 1
    assert ("other options (--affine DEGREES 10.0 -> 5.0, --stn-warp-from 5.0 -> 6.0)"
            in changed.output), changed.output
    model = _train(out, *again, "--affine", "10", "0.1", "--stn-warp-from", "5",
                   "--loc-act", "leaky")
    assert model.exit_code == 1
    assert "another model or data (--loc-act relu -> leaky)" in model.output, model.output
    ablation = _train(out, "--resume", "--recipe", "rts", "--no-stn")
    assert ablation.exit_code == 1 and "(--no-stn off -> on)" in ablation.output
    for message in (changed.output, model.output, ablation.output):
        named = set(re.findall(r"(--[a-z][\w-]*)", message.split("options it was")[0]))
        assert named and named <= _flags(), named - _flags()
    resumed = _train(out, *again, "--affine", "10", "0.1", "--stn-warp-from", "5")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "metrics.json").read_text())["history"][-1]["epoch"] == 2


def test_a_log_gets_one_line_per_epoch_and_no_progress_bars(tmp_path: Path) -> None:
    """Not a terminal (a pipe, a log file): the bars stay off, each epoch is one line."""
    r = CliRunner().invoke(cli, ["train", "--distort", "none", "--epochs", "2", "--device",
                                 "cpu", "--out-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "\r" not in r.output and "batch/s" not in r.output
    assert [ln.split("  ")[0] for ln in r.output.splitlines()
            if ln.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]


def test_train_picks_the_rts_recipe_and_warns_on_a_collapsed_stn(tmp_path: Path) -> None:
    common = ["train", "--dataset", "digits", "--distort", "rts", "--epochs", "1", "--quiet",
              "--device", "cpu"]
    r = CliRunner().invoke(cli, [*common, "--out-dir", str(tmp_path / "auto")])
    assert r.exit_code == 0, r.output
    assert "recipe rts, 1 epoch, large localization net, 2 passes" in r.output
    assert "STN health on the test split: theta spread" in r.output
    # The recipe's warp penalty waits for the take-off: after one epoch it has not started.
    auto = json.loads((tmp_path / "auto" / "metrics.json").read_text())["history"][-1]
    assert auto["stn_warp_penalty"] == 0.0 and auto["train_theta_spread_px"] < 2.0
    # The seed recipe moves the STN at a tenth of the rate: after one epoch theta is still the
    # identity for every image, and train says so, with what to try.
    r = CliRunner().invoke(cli, [*common, "--recipe", "seed", "--loc-net", "seed",
                                 "--out-dir", str(tmp_path / "seed")])
    assert r.exit_code == 0, r.output
    assert "The STN has COLLAPSED" in r.output
    assert "warning: the STN has collapsed" in r.output and "--optimizer adam" in r.output
    doc = json.loads((tmp_path / "seed" / "metrics.json").read_text())
    assert doc["stn_health"]["collapsed"] is True


def test_advice_for_a_runaway_theta_names_the_stn_rate() -> None:
    rng = np.random.default_rng(0)
    angles = np.radians(rng.uniform(-45, 45, 64))
    scale = rng.uniform(50, 500, 64)
    ran_away = np.zeros((64, 2, 3))
    ran_away[:, 0, 0], ran_away[:, 0, 1] = np.cos(angles) * scale, -np.sin(angles) * scale
    ran_away[:, 1, 0], ran_away[:, 1, 1] = np.sin(angles) * scale, np.cos(angles) * scale
    advice = stn_advice(assess(ran_away, 32), TrainOptions(), ModelConfig())
    assert advice is not None and "--stn-lr-scale" in advice
    working = assess(ran_away / scale[:, None, None], 32)
    assert stn_advice(working, TrainOptions(), ModelConfig()) is None


def test_advice_names_leaky_units_for_a_dead_regressor_only_where_they_are_relu() -> None:
    dead = assess(np.tile(np.eye(2, 3), (16, 1, 1)), 32, dead_fraction=0.95)
    relu = stn_advice(dead, TrainOptions(), ModelConfig())
    assert relu is not None and "--loc-act leaky" in relu
    leaky = stn_advice(dead, TrainOptions(), ModelConfig(loc_act="leaky"))
    assert leaky is not None and "--loc-act" not in leaky


def test_advice_names_the_pose_loss_on_undistorted_data_until_it_is_on() -> None:
    flat = assess(np.tile(np.eye(2, 3), (16, 1, 1)), 32, dead_fraction=0.0)
    plain = stn_advice(flat, TrainOptions(), ModelConfig())
    assert plain is not None and "--stn-pose-loss 1" in plain
    told = stn_advice(flat, TrainOptions.of(rts_augment=0.25, stn_pose_loss=1.0), ModelConfig())
    assert told is not None and "--stn-pose-loss" not in told
    distorted = stn_advice(flat, TrainOptions(), ModelConfig(distort="rts"))
    assert distorted is not None and "--stn-pose-loss" not in distorted


@pytest.mark.parametrize("args,said", [
    (["--distort", "none", "--redistort"], "--redistort needs --distort data"),
    (["--distort", "none", "--clean-fraction", "0.2"], "--clean-fraction needs --distort data"),
    (["--stn-warp-penalty", "0", "--stn-warp-per-class"],
     "--stn-warp-per-class needs --stn-warp-penalty"),
    (["--no-stn", "--stn-warp-from", "2"], "--stn-warp-from needs an STN"),
])
def test_meaningless_combinations_are_one_line_before_any_data(args: list[str], said: str,
                                                               tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["train", "--out-dir", str(tmp_path / "o"), *args])
    assert r.exit_code == 1 and said in r.output, r.output
    assert not (tmp_path / "o").exists()
