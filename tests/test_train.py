"""The training loop (stn_deploy.training): real short runs on the bundled digits, resumed
runs equal to uninterrupted ones, the STN objectives on transforms whose answer is known, and
the options' grouping and refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stn_deploy.checkpoint import load_checkpoint
from stn_deploy.data import load_dataset, rts_thetas, warp_images
from stn_deploy.errors import StnDeployError
from stn_deploy.health import StnHealth
from stn_deploy.model import build_model, compose_thetas
from stn_deploy.training import TrainOptions, evaluate, train
from stn_deploy.training.augment import affine_batch, augment_batch, rts_batch
from stn_deploy.training.loop import EpochTotals, epoch_seed
from stn_deploy.training.objectives import (Batch, PoseLoss, WarpPenalty, class_warp_penalty,
                                            objectives, pose_loss, warp_penalty)
from stn_deploy.training.optim import WeightEma
from stn_deploy.training.options import check


def _rotation(deg: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
    r = np.radians(deg)
    t = np.zeros((len(r), 2, 3))
    t[:, 0, 0], t[:, 0, 1] = np.cos(r) * scale, -np.sin(r) * scale
    t[:, 1, 0], t[:, 1, 1] = np.sin(r) * scale, np.cos(r) * scale
    return t


def test_short_training_beats_chance(digits_checkpoint: Path, digits_bundle) -> None:
    ckpt = load_checkpoint(digits_checkpoint)
    assert ckpt.epoch == 3 and len(ckpt.history) == 3
    # Ten classes: chance is 10%. Three epochs on the real digits reach far above it.
    _, acc = evaluate(ckpt.model(), digits_bundle.test, ckpt.config, torch.device("cpu"))
    assert acc > 0.6
    assert acc == pytest.approx(ckpt.history[-1]["test_acc"], abs=1e-4)
    assert ckpt.history[-1]["train_loss"] < ckpt.history[0]["train_loss"]
    out = digits_checkpoint.parent
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["parameters"] == 144_528 and len(doc["history"]) == 3
    for picture in ("transforms.png", "curves.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_resume_continues_exactly(digits_checkpoint: Path, digits_bundle, tmp_path: Path) -> None:
    """Stopping after epoch 2 and resuming gives the same weights as never stopping."""
    train(digits_bundle, tmp_path,
          TrainOptions.of(epochs=3, stop_after=2, quiet=True, device="cpu"))
    assert load_checkpoint(tmp_path / "last.pt").epoch == 2
    train(digits_bundle, tmp_path, TrainOptions.of(epochs=3, quiet=True, device="cpu"),
          resume=tmp_path / "last.pt")
    resumed, straight = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(digits_checkpoint)
    assert resumed.epoch == 3 and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for k, v in straight.state_dict.items():
        assert torch.equal(v, resumed.state_dict[k]), k
    with pytest.raises(StnDeployError, match="already has 3 epochs"):
        train(digits_bundle, tmp_path, TrainOptions.of(epochs=3, quiet=True),
              resume=tmp_path / "last.pt")
    with pytest.raises(StnDeployError, match="same --epochs"):
        train(digits_bundle, tmp_path, TrainOptions.of(epochs=5, quiet=True),
              resume=tmp_path / "last.pt")


def test_stn_optimizer_of_its_own_resumes_exactly(digits_bundle, tmp_path: Path) -> None:
    """AdamW for the STN beside SGD: both optimizers' states travel in the checkpoint."""
    opts = TrainOptions.of(epochs=2, quiet=True, device="cpu", stn_optimizer="adam",
                           stn_lr=1e-3)
    train(digits_bundle, tmp_path / "straight", opts)
    train(digits_bundle, tmp_path / "c", opts.replace(epochs=3, stop_after=1))
    train(digits_bundle, tmp_path / "split", opts.replace(stop_after=1))
    train(digits_bundle, tmp_path / "split", opts, resume=tmp_path / "split" / "last.pt")
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")
    for k, v in straight.state_dict.items():
        assert torch.equal(v, resumed.state_dict[k]), k
    assert type(straight.optimizer["stn"]["state"][0]["exp_avg"]) is torch.Tensor  # AdamW's
    assert "momentum_buffer" in straight.optimizer["main"]["state"][0]  # SGD's
    assert [g["max_lr"] for g in straight.optimizer["stn"]["param_groups"]] == [1e-3]
    with pytest.raises(StnDeployError, match="other options .*--stn-optimizer adam -> None"):
        train(digits_bundle, tmp_path / "split", TrainOptions.of(epochs=3, quiet=True),
              resume=tmp_path / "c" / "last.pt")
    with pytest.raises(StnDeployError, match="needs --stn-lr"):
        train(digits_bundle, tmp_path / "x", TrainOptions.of(stn_optimizer="adam", quiet=True))
    assert not (tmp_path / "x").exists()


def test_weight_ema_is_the_moving_average_of_the_weights(digits_bundle) -> None:
    model = build_model(digits_bundle.config)
    ema = WeightEma(model, 0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
        for k, b in model.named_buffers():
            if not b.is_floating_point():
                b.fill_(7)  # BN's num_batches_tracked: copied, not averaged
    ema.update(10**6)  # the ramp has reached the decay
    for k, v in ema.model.state_dict().items():
        if k in params:
            assert torch.allclose(v, before[k] + 0.1, atol=1e-5), k
        elif not v.is_floating_point():
            assert int(v) == 7, k
    key = "classifier.features.13.weight"
    ema.update(0)  # the first step: decay 1/10, the average mostly follows the weights
    assert torch.allclose(ema.model.state_dict()[key],
                          0.1 * (before[key] + 0.1) + 0.9 * params[key], atol=1e-5)
    with pytest.raises(ValueError, match="decay must be in"):
        WeightEma(model, 1.0)
    with pytest.raises(StnDeployError, match="--ema must be in"):
        check(TrainOptions.of(ema=1.0), use_stn=True, distort="none")


def test_ema_checkpoint_carries_the_average_and_resumes_exactly(digits_bundle,
                                                               tmp_path: Path) -> None:
    opts = TrainOptions.of(epochs=2, quiet=True, device="cpu", ema=0.99)
    train(digits_bundle, tmp_path / "straight", opts)
    train(digits_bundle, tmp_path / "split", opts.replace(stop_after=1))
    train(digits_bundle, tmp_path / "split", opts, resume=tmp_path / "split" / "last.pt")
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")
    assert straight.train_state_dict is not None
    for k, v in straight.state_dict.items():
        assert torch.equal(v, resumed.state_dict[k]), k
        assert torch.equal(straight.train_state_dict[k], resumed.train_state_dict[k]), k
    moved = [k for k, v in straight.state_dict.items()
             if v.is_floating_point() and not torch.equal(v, straight.train_state_dict[k])]
    assert moved  # the average is not the last weights
    # test_acc is the saved (averaged) model's; raw_test_acc the trained weights'.
    last = straight.history[-1]
    _, acc = evaluate(straight.model(), digits_bundle.test, straight.config,
                      torch.device("cpu"))
    assert acc == pytest.approx(last["test_acc"], abs=1e-4)
    raw = build_model(straight.config)
    raw.load_state_dict(straight.train_state_dict)
    _, raw_acc = evaluate(raw, digits_bundle.test, straight.config, torch.device("cpu"))
    assert raw_acc == pytest.approx(last["raw_test_acc"], abs=1e-4)
    with pytest.raises(StnDeployError, match="--ema 0.99 -> 0.0"):
        train(digits_bundle, tmp_path / "split", opts.replace(epochs=2, ema=0.0),
              resume=tmp_path / "split" / "last.pt")
    # Any option that shapes the weights (here a recipe's rate) may not change halfway.
    with pytest.raises(StnDeployError, match="--lr 0.05 -> 0.01"):
        train(digits_bundle, tmp_path / "split", opts.replace(epochs=2, lr=0.01),
              resume=tmp_path / "split" / "last.pt")


def test_augment_is_a_crop_and_flip() -> None:
    x = torch.arange(2 * 3 * 8 * 8).remainder(251).to(torch.uint8).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # Every output pixel is either padding or a pixel of the same image and channel.
    for i in range(2):
        for c in range(3):
            vals = set(out[i, c].flatten().tolist()) - {0}
            assert vals <= set(x[i, c].flatten().tolist())


def test_affine_rotates_and_zooms_by_the_drawn_amounts() -> None:
    """A bar's orientation follows the drawn angle; a square's area the drawn zoom squared."""
    n = 6
    bar = torch.zeros(n, 1, 33, 33, dtype=torch.uint8)
    bar[:, :, 16, 4:29] = 255
    out = affine_batch(bar, torch.Generator().manual_seed(1), 30.0, 0.0).float()[:, 0]
    drawn = torch.rand(n, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ys, xs = torch.meshgrid(torch.arange(33.0) - 16, torch.arange(33.0) - 16, indexing="ij")
    for i in range(n):
        w = out[i] / out[i].sum()
        cxx, cyy, cxy = (w * xs * xs).sum(), (w * ys * ys).sum(), (w * xs * ys).sum()
        angle = 0.5 * math.degrees(math.atan2(float(2 * cxy), float(cxx - cyy)))
        assert angle == pytest.approx(30.0 * float(drawn[i, 0]), abs=0.1)
    square = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    square[:, :, 8:24, 8:24] = 255
    zoomed = affine_batch(square, torch.Generator().manual_seed(2), 0.0, 0.3).float()
    drawn = torch.rand(4, 2, generator=torch.Generator().manual_seed(2)) * 2 - 1
    area = zoomed.sum((1, 2, 3)) / square.float().sum((1, 2, 3))
    torch.testing.assert_close(area, (1 + 0.3 * drawn[:, 1]) ** 2, atol=0.03, rtol=0)
    assert torch.equal(affine_batch(square, torch.Generator(), 0.0, 0.0), square)


def test_rts_batch_distorts_that_share_and_keeps_the_rest() -> None:
    x = torch.randint(1, 255, (400, 3, 32, 32), dtype=torch.uint8)
    out, thetas = rts_batch(x, 7, 0.5)
    kept = (out == x).flatten(1).all(dim=1)
    assert 0.4 < kept.float().mean() < 0.6
    assert (out[~kept] == 0).flatten(1).any(dim=1).all()  # shrunk: zero borders appear
    # The thetas returned are those applied: the identity for exactly the images kept.
    identity = (thetas == torch.eye(2, 3)).flatten(1).all(dim=1)
    assert torch.equal(identity, kept)
    assert torch.equal(warp_images(x, thetas), out)
    assert torch.equal(rts_batch(x, 7, 0.5)[0], out)
    assert not torch.equal(rts_batch(x, 8, 0.5)[0], out)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found beside the Python interpreter")
    cmd = [torchrun, "--nproc-per-node", "2", "-m", "stn_deploy", "train", "--dataset", "digits",
           "--epochs", "6", "--distort", "none", "--out-dir", str(tmp_path), "--quiet",
           "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "metrics.json").read_text())
    # Each rank sees half the data: 6 epochs are 66 steps, enough to learn (1 epoch: chance).
    assert doc["world_size"] == 2 and doc["history"][-1]["test_acc"] > 0.5
    assert load_checkpoint(tmp_path / "last.pt").epoch == 6


def test_clean_fraction_without_redistort_is_refused(tmp_path: Path) -> None:
    bundle = load_dataset("digits", distort="rts")
    opts = TrainOptions.from_recipe("rts", epochs=1, redistort=False, clean_fraction=0.2,
                                    quiet=True, device="cpu")
    with pytest.raises(StnDeployError, match="--clean-fraction needs --redistort"):
        train(bundle, tmp_path, opts)
    assert not any(tmp_path.iterdir())


def test_rts_augment_also_measures_the_stn_on_an_rts_distorted_test_split(
        tmp_path: Path) -> None:
    """Undistorted data: the clean test images show no distortion to undo, so --rts-augment
    measures the STN on the test split RTS-distorted too, with each image's transform known."""
    bundle = load_dataset("digits")  # undistorted
    opts = TrainOptions.from_recipe("rts", epochs=2, rts_augment=0.5, quiet=True, device="cpu")
    result = train(bundle, tmp_path, opts)
    row = result.history[-1]
    assert 0.0 <= row["rts_test_acc"] <= 1.0 and row["rts_test_acc"] != row["test_acc"]
    assert "rotation_undone" in row["stn_rts"] and row["stn"]["rotation_undone"] is None
    h = result.health_rts
    assert isinstance(h, StnHealth) and h.images == len(bundle.test) and h.undone is not None
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["stn_health_rts"]["undone"] == h.to_dict()["undone"]
    assert (tmp_path / "transforms_rts.png").stat().st_size > 1000
    # Without --rts-augment there is no second split, and none on --distort data either.
    plain = train(bundle, tmp_path / "plain", TrainOptions.from_recipe(
        "seed", epochs=1, quiet=True, device="cpu"))
    assert plain.health_rts is None and "stn_rts" not in plain.history[-1]
    assert not (tmp_path / "plain" / "transforms_rts.png").exists()


def test_pose_loss_is_zero_exactly_when_the_stn_undoes_the_distortion() -> None:
    applied = rts_thetas(64, seed=5, clean_fraction=0.25)
    eye = torch.eye(3)[:2].expand(64, 2, 3)
    h = torch.cat([applied, torch.tensor([0.0, 0.0, 1.0]).expand(64, 1, 3)], 1)
    inverse = torch.linalg.inv(h)[:, :2]
    assert float(pose_loss(applied, inverse)) == pytest.approx(0.0, abs=1e-10)
    # Otherwise it is the mean squared displacement over the frame, here by sampling it.
    p = torch.rand(200_000, 2, dtype=torch.float64) * 2 - 1
    m = compose_thetas(applied.double(), eye.double()) - torch.eye(2, 3, dtype=torch.float64)
    moved = torch.einsum("nij,pj->npi", m[:, :, :2], p) + m[:, None, :, 2]
    expect = (moved ** 2).sum(-1).mean()
    assert float(pose_loss(applied.double(), eye.double())) == pytest.approx(float(expect),
                                                                             rel=1e-2)


def test_warp_penalty_charges_a_pose_per_class_beyond_the_upright_one() -> None:
    """The STN undoing zero-mean rotations to upright, against the same STN turning two
    classes to -14 and +20 degrees (Fashion-MNIST seed 1): the penalty is the rotation's
    mean squared displacement, 4 (1 - cos a) / 3, and the offsets cost their share on top."""
    rng = np.random.default_rng(0)
    applied = rng.normal(0.0, 26.0, 4000)
    applied -= applied.mean()
    offset = np.where(np.arange(4000) % 2 == 0, -14.0, 20.0)

    def penalty(deg: np.ndarray) -> float:
        return float(warp_penalty(torch.from_numpy(_rotation(deg))))

    assert penalty(np.zeros(4)) == pytest.approx(0.0, abs=1e-12)
    assert penalty(np.full(4, 30.0)) == pytest.approx(4 * (1 - math.cos(math.radians(30))) / 3)
    upright, own_poses = penalty(-applied), penalty(offset - applied)
    assert own_poses > 1.2 * upright
    assert own_poses == pytest.approx(np.mean(4 * (1 - np.cos(np.radians(offset - applied))) / 3))


def test_class_warp_penalty_charges_a_class_its_own_pose_not_the_undoing() -> None:
    """Two classes: where each class's shifts average to none, the class charge is zero and
    the per-image one is not; turns cost it a little (their mean is a slight shrink); a class
    with a pose of its own pays that pose's warp, weighted by the class's share."""
    def turns(degrees: list[float]) -> torch.Tensor:
        a = torch.tensor(degrees, dtype=torch.float64).deg2rad()
        c, s, z = a.cos(), a.sin(), torch.zeros_like(a)
        return torch.stack([torch.stack([c, -s, z], 1), torch.stack([s, c, z], 1)], 1)

    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    shifts = turns([0] * 6)
    shifts[:, :, 2] = torch.tensor([[0.2, -0.1], [-0.2, 0.1], [0.3, 0.0], [-0.3, 0.0],
                                    [0.0, 0.25], [0.0, -0.25]], dtype=torch.float64)
    assert float(warp_penalty(shifts)) > 0.03
    assert float(class_warp_penalty(shifts, labels, 3)) == pytest.approx(0.0, abs=1e-12)
    undoing = turns([-30, 30, -20, 20, -10, 10])
    assert 0 < float(class_warp_penalty(undoing, labels, 3)) < float(warp_penalty(undoing)) / 10
    own_pose = turns([25, 25, 0, 0, 0, 0])  # class 0 turned 25 degrees, class 1 upright
    expected = float(warp_penalty(own_pose[:1])) * 2 / 6
    assert float(class_warp_penalty(own_pose, labels, 3)) == pytest.approx(expected)


def test_warp_penalty_waits_for_the_take_off_when_asked() -> None:
    """--stn-warp-from: on from the epoch after one whose training thetas spread that far, and
    staying on if the spread falls back (the history decides, so a resume agrees)."""
    history = [{"train_theta_spread_px": s} for s in (0.1, 1.9)]

    def weight(objective: WarpPenalty, rows: list[dict[str, float]]) -> float:
        objective.begin_epoch(rows)
        return objective.active

    late = WarpPenalty(0.1, from_px=2.0)
    assert weight(late, history) == 0.0
    assert weight(late, history + [{"train_theta_spread_px": 2.4}]) == 0.1
    assert weight(late, history + [{"train_theta_spread_px": 2.4},
                                   {"train_theta_spread_px": 1.0}]) == 0.1
    assert weight(WarpPenalty(0.1), []) == 0.1
    theta = torch.eye(2, 3).expand(4, 2, 3) * 1.1
    batch = Batch(theta, torch.zeros(4, dtype=torch.long), None, 10)
    assert late.loss(batch) == pytest.approx(0.1 * float(warp_penalty(theta)))
    assert late.row(0.0) == {"stn_warp_penalty": 0.1}
    # The options turn on exactly the objectives asked for, pose first (the loss's order).
    assert objectives(TrainOptions()) == []
    kinds = objectives(TrainOptions.of(stn_pose_loss=1.0, rts_augment=0.25,
                                       stn_warp_penalty=0.3))
    assert [type(o) for o in kinds] == [PoseLoss, WarpPenalty]


def test_pose_loss_makes_the_stn_undo_the_augmentation_it_is_told_about(
        tmp_path: Path) -> None:
    """Digits, undistorted, --rts-augment 0.5, two epochs of the rts recipe: told the transform
    it should undo, the STN undoes more of the RTS-distorted test split than without."""
    bundle = load_dataset("digits")
    runs = {w: train(bundle, tmp_path / str(w), TrainOptions.from_recipe(
        "rts", epochs=2, rts_augment=0.5, stn_pose_loss=w, quiet=True, device="cpu"))
        for w in (0.0, 1.0)}
    told, untold = runs[1.0].health_rts, runs[0.0].health_rts
    assert told is not None and untold is not None and told.undone and untold.undone
    assert told.undone["scale"] > 0.15 and told.undone["scale"] > untold.undone["scale"] + 0.1
    assert not told.collapsed
    pose = [row["train_pose_loss"] for row in runs[1.0].history]
    assert pose[1] < pose[0] and "train_pose_loss" not in runs[0.0].history[-1]


def test_pose_loss_without_rts_augment_is_refused(tmp_path: Path) -> None:
    opts = TrainOptions.from_recipe("rts", epochs=1, stn_pose_loss=1.0, quiet=True, device="cpu")
    with pytest.raises(StnDeployError, match="--stn-pose-loss needs --rts-augment"):
        train(load_dataset("digits"), tmp_path, opts)
    assert not any(tmp_path.iterdir())


def test_rts_recipe_without_fresh_distortions_drops_its_clean_fraction(tmp_path: Path) -> None:
    """The recipe's clean share only applies to fresh distortions; --no-redistort still trains."""
    assert TrainOptions.from_recipe("rts").augment.clean_fraction == 0.25
    opts = TrainOptions.from_recipe("rts", epochs=1, redistort=False, quiet=True, device="cpu")
    assert opts.augment.clean_fraction == 0.0
    train(load_dataset("digits", distort="rts"), tmp_path, opts)
    assert (tmp_path / "last.pt").is_file()


def test_rts_recipe_without_its_warp_penalty_drops_its_start(tmp_path: Path) -> None:
    """--stn-warp-penalty 0 turns the recipe's charge off, and its start goes with it, so
    train does not refuse --stn-warp-from as given alone."""
    assert TrainOptions.from_recipe("rts").stn.stn_warp_from_px == 2.0
    opts = TrainOptions.from_recipe("rts", epochs=1, stn_warp_penalty=0.0, quiet=True,
                                    device="cpu")
    assert opts.stn.stn_warp_from_px == 0.0
    result = train(load_dataset("digits", distort="rts"), tmp_path, opts)
    assert "stn_warp_penalty" not in result.history[-1]


def test_train_reports_health_every_epoch(digits_checkpoint: Path) -> None:
    doc = json.loads((digits_checkpoint.parent / "metrics.json").read_text())
    assert all("theta_spread_px" in row["stn"] for row in doc["history"])
    assert doc["stn_health"]["images"] == 450


def test_options_are_grouped_by_what_they_act_on_and_recorded_flat() -> None:
    """Each flat name lives in one group; checkpoints and metrics.json keep the flat names
    (so checkpoints written before the grouping resume alike)."""
    opts = TrainOptions.of(lr=0.01, rts_augment=0.25, stn_pose_loss=1.0, epochs=3)
    assert (opts.optim.lr, opts.augment.rts_augment, opts.stn.stn_pose_loss,
            opts.run.epochs) == (0.01, 0.25, 1.0, 3)
    flat = opts.to_dict()
    assert len(flat) == 29 and TrainOptions.of(**flat) == opts
    assert opts.replace(lr=0.02).optim.lr == 0.02 and opts.optim.lr == 0.01
    with pytest.raises(StnDeployError, match="unknown training option.*: learning_rate"):
        TrainOptions.of(learning_rate=0.1)
    # Without an STN the recipe's STN terms go; one given by name stays, to be refused by name.
    improved = TrainOptions.from_recipe("improved", use_stn=False)
    assert improved.stn.stn_pose_loss == 0.0 and improved.augment.rts_augment == 0.25
    asked = TrainOptions.from_recipe("improved", use_stn=False, stn_warp_penalty=0.1)
    with pytest.raises(StnDeployError, match="--stn-warp-penalty needs an STN"):
        check(asked, use_stn=False, distort="none")
    assert TrainOptions.from_recipe("rts").run.epochs == 20  # the recipe's schedule


def test_the_data_and_the_options_agree_on_dropout(tmp_path: Path) -> None:
    """The model config (built once, by load_dataset) carries dropout; options that ask for
    another are refused by name, not silently overruled."""
    improved = TrainOptions.from_recipe("improved", epochs=1, quiet=True, device="cpu")
    with pytest.raises(StnDeployError, match="dropout 0.05 and the options 0.0"):
        train(load_dataset("digits"), tmp_path / "x", improved)
    assert not (tmp_path / "x").exists()
    assert load_dataset("digits", dropout=0.0).config.dropout == 0.0
    check(improved, use_stn=True, distort="none", dropout=0.0)


def test_pose_loss_objective_adds_its_weighted_term_and_tallies_the_plain_one() -> None:
    applied = rts_thetas(8, seed=3)
    theta = torch.eye(2, 3).expand(8, 2, 3).clone().requires_grad_(True)
    pose = PoseLoss(2.0)
    batch = Batch(theta, torch.arange(8) % 10, applied, 10)
    term = pose.loss(batch)
    plain = pose_loss(applied, theta)
    assert term is not None and float(term.detach()) == pytest.approx(2 * float(plain.detach()))
    assert float(pose.total) == pytest.approx(8 * float(plain.detach()))
    term.backward()  # the term reaches theta: it is what tells the STN what to undo
    assert theta.grad is not None and float(theta.grad.abs().sum()) > 0
    assert pose.loss(Batch(theta, batch.labels, None, 10)) is None  # nothing applied
    pose.begin_epoch([])
    assert float(pose.total) == 0.0
    totals = EpochTotals(loss=20.0, correct=6, seen=8, theta_spread_px=1.23456,
                         objectives=[4.0])
    assert totals.row([pose], use_stn=True) == {
        "train_loss": 2.5, "train_acc": 0.75, "train_theta_spread_px": 1.235,
        "train_pose_loss": 0.5}
    assert epoch_seed(1, 2) == 100_005  # one formula: the epoch's draws derive from it
