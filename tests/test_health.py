"""STN health: the figures are right on transforms whose answer is known, and the collapse of
a real (briefly trained, identity-initialised) STN is caught everywhere it is reported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stn_deploy.cli import cli
from stn_deploy.commands.train import stn_advice
from stn_deploy.config import ModelConfig
from stn_deploy.data import load_dataset, rts_thetas
from stn_deploy.errors import StnDeployError
from stn_deploy.health import (COLLAPSE_PX, NotMeasured, StnHealth, assess, compose, decompose,
                               displacement_px, from_dict, measure)
from stn_deploy.model import build_model, compose_thetas
from stn_deploy.train import (TrainOptions, class_warp_penalty, pose_loss, train, warp_penalty,
                              warp_penalty_on)


def _rotation(deg: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
    r = np.radians(deg)
    t = np.zeros((len(r), 2, 3))
    t[:, 0, 0], t[:, 0, 1] = np.cos(r) * scale, -np.sin(r) * scale
    t[:, 1, 0], t[:, 1, 1] = np.sin(r) * scale, np.cos(r) * scale
    return t


def test_decompose_recovers_rotation_scale_and_shift() -> None:
    t = _rotation(np.array([30.0, -60.0]), np.array([0.5, 2.0]))
    t[:, :, 2] = [[0.1, -0.2], [0.3, 0.0]]
    parts = decompose(t)
    assert parts["rotation_deg"] == pytest.approx([30.0, -60.0])
    assert np.exp(parts["log_scale"]) == pytest.approx([0.5, 2.0])
    assert parts["log_aniso"] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert parts["shear"] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert parts["tx"] == pytest.approx([0.1, 0.3]) and parts["ty"] == pytest.approx([-0.2, 0.0])


def test_displacement_is_in_pixels() -> None:
    # A shift of 0.1 in [-1, 1] coordinates is 0.05 of the frame: 1.6 px on 32 px.
    delta = np.zeros((1, 2, 3))
    delta[0, 0, 2] = 0.1
    assert displacement_px(delta, 32)[0] == pytest.approx(1.6)
    # A scale change of s moves points by |x| s: RMS over [-1, 1] is s / sqrt(3) (x axis only).
    delta = np.zeros((1, 2, 3))
    delta[0, 0, 0] = 0.3
    assert displacement_px(delta, 32)[0] == pytest.approx(0.3 / math.sqrt(3) * 16)


def test_identity_collapses_and_the_exact_inverse_undoes_everything() -> None:
    applied = rts_thetas(200, seed=5).double().numpy()
    identity = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (200, 1, 1))
    h = assess(identity, 32, applied=applied)
    assert isinstance(h, StnHealth) and h.collapsed and h.theta_spread_px == 0.0
    assert h.undone == pytest.approx({"rotation": 0.0, "scale": 0.0, "translation": 0.0})
    assert "collapsed" in h.warnings[0]
    # theta = D^-1 makes D o theta the identity for every image: all of it undone.
    h_inv = np.linalg.inv(np.concatenate([applied, np.tile([[[0, 0, 1.0]]], (200, 1, 1))], 1))
    perfect = assess(h_inv[:, :2], 32, applied=applied)
    assert isinstance(perfect, StnHealth) and not perfect.collapsed
    assert perfect.undone == pytest.approx({"rotation": 1.0, "scale": 1.0, "translation": 1.0})
    assert perfect.canonical_pose == pytest.approx(
        {"rotation_deg": 0.0, "scale": 1.0, "tx": 0.0, "ty": 0.0}, abs=1e-9)
    assert perfect.spread["rotation_deg"] > 20  # RTS rotations are +-45 degrees
    np.testing.assert_allclose(compose(applied, h_inv[:, :2]), identity, atol=1e-9)


def test_half_the_rotation_undone() -> None:
    rng = np.random.default_rng(0)
    angles = rng.uniform(-45, 45, 500)
    applied = _rotation(angles)
    h = assess(_rotation(-angles / 2), 32, applied=applied)
    assert isinstance(h, StnHealth)
    assert h.undone is not None and h.undone["rotation"] == pytest.approx(0.5, abs=1e-4)
    assert "scale" not in h.undone  # nothing applied, nothing to undo


def test_a_pose_per_class_counts_as_undone_within_each_class() -> None:
    # What a Fashion-MNIST STN did (seed 1): every rotation undone, but shoes turned to +20
    # degrees and clothes to -20, so the plain figure sees a spread of 20 degrees left.
    rng = np.random.default_rng(0)
    angles = rng.uniform(-45, 45, 400)
    labels = np.arange(400) % 2
    offset = np.where(labels == 0, 20.0, -20.0)
    theta = _rotation(-angles + offset)
    h = assess(theta, 32, applied=_rotation(angles), labels=labels)
    assert isinstance(h, StnHealth) and h.undone is not None and h.undone_within_class is not None
    # Spread 20 deg after against 90 / sqrt(12) = 26 deg before: a quarter undone overall.
    assert h.undone["rotation"] == pytest.approx(1 - 20 / (90 / math.sqrt(12)), abs=0.03)
    assert h.undone_within_class["rotation"] == pytest.approx(1.0, abs=1e-9)
    assert "(100% within each class)" in h.summary()
    assert h.headline()["rotation_undone_within_class"] == pytest.approx(1.0)  # epoch history
    assert from_dict(json.loads(json.dumps(h.to_dict()))).undone_within_class == pytest.approx(
        h.undone_within_class)
    # One pose for all: the two figures agree, and the summary does not repeat itself.
    same = assess(_rotation(-angles / 2), 32, applied=_rotation(angles), labels=labels)
    assert isinstance(same, StnHealth) and same.undone and same.undone_within_class
    assert same.undone_within_class["rotation"] == pytest.approx(same.undone["rotation"], abs=0.02)
    assert "within each class" not in same.summary()
    with pytest.raises(ValueError, match="3 labels for 400 thetas"):
        assess(theta, 32, applied=_rotation(angles), labels=labels[:3])


def test_a_runaway_theta_is_flagged_not_taken_for_a_working_stn() -> None:
    # The CIFAR-10 rts-recipe probe with the STN at 3x (benchmarks/results/cifar_stn_probes.md):
    # theta blew up to a spread of ~3,000 px and accuracy fell to chance.
    rng = np.random.default_rng(0)
    ran_away = _rotation(rng.uniform(-45, 45, 64), rng.uniform(50, 500, 64))
    h = assess(ran_away, 32)
    assert isinstance(h, StnHealth) and not h.collapsed and h.theta_spread_px > 32
    assert h.warnings and h.warnings[0].startswith("theta has run away")
    nan = assess(np.full((16, 2, 3), np.nan), 32)
    assert isinstance(nan, StnHealth) and nan.warnings[0].startswith("theta has run away")
    # A working STN's spread (RTS digits: 4-8 px) gets no warning.
    working = assess(_rotation(rng.uniform(-45, 45, 64)), 32)
    assert isinstance(working, StnHealth) and not working.warnings
    assert stn_advice(working, TrainOptions(), ModelConfig()) is None
    advice = stn_advice(h, TrainOptions(), ModelConfig())
    assert advice is not None and "--stn-lr-scale" in advice


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
    told = stn_advice(flat, TrainOptions(rts_augment=0.25, stn_pose_loss=1.0), ModelConfig())
    assert told is not None and "--stn-pose-loss" not in told
    distorted = stn_advice(flat, TrainOptions(), ModelConfig(distort="rts"))
    assert distorted is not None and "--stn-pose-loss" not in distorted


def test_small_spread_on_upright_images_is_judged_on_an_rts_copy() -> None:
    """An STN that straightens distorted images may leave upright ones nearly alone: below the
    line on undistorted images, the verdict comes from an RTS-distorted copy of them."""
    rng = np.random.default_rng(0)
    eye = np.tile(np.eye(2, 3), (64, 1, 1))
    calm = eye + rng.normal(0, 0.002, eye.shape)  # about 0.05 px
    moving = _rotation(rng.uniform(-30, 30, 64), rng.uniform(0.7, 1.3, 64))
    working = assess(calm, 32, rts_copy=moving)
    assert isinstance(working, StnHealth) and not working.collapsed
    assert working.theta_spread_px < COLLAPSE_PX < working.rts_copy_spread_px
    assert "on an RTS-distorted copy" in working.summary() and not working.warnings
    flat = assess(calm, 32, rts_copy=calm)
    assert isinstance(flat, StnHealth) and flat.collapsed
    assert "RTS-distorted copy" in flat.warnings[0]
    assert from_dict(json.loads(json.dumps(working.to_dict()))).summary() == working.summary()
    # measure does it itself: the identity-initialised STN is constant on the copy too.
    bundle = load_dataset("digits")
    h = measure(build_model(bundle.config), bundle.test.images)
    assert isinstance(h, StnHealth) and h.collapsed and h.rts_copy_spread_px == pytest.approx(0)


def test_measure_re_judges_on_the_copy_it_is_handed() -> None:
    """train hands its --rts-augment probe in, so the verdict and the probe's health share
    one copy; handed the undistorted images themselves, the copy's spread is theirs."""
    bundle = load_dataset("digits")
    model = build_model(bundle.config).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a theta that depends on the input, but only slightly
        model.stn.regressor[2].weight.normal_(0, 1e-4)
    images = bundle.test.images
    same = measure(model, images, rts_copy=images)
    assert isinstance(same, StnHealth) and same.theta_spread_px < COLLAPSE_PX
    assert same.rts_copy_spread_px == pytest.approx(same.theta_spread_px, rel=1e-6)
    own = measure(model, images)
    assert isinstance(own, StnHealth) and own.rts_copy_spread_px is not None
    assert own.rts_copy_spread_px != pytest.approx(same.rts_copy_spread_px, rel=1e-3)


def test_too_few_images_and_no_stn_are_not_errors() -> None:
    few = assess(np.zeros((3, 2, 3)), 32)
    assert isinstance(few, NotMeasured) and "too few" in few.summary()
    bundle = load_dataset("digits", use_stn=False)
    none = measure(build_model(bundle.config), bundle.test.images)
    assert isinstance(none, NotMeasured) and none.summary() == "no STN"
    assert from_dict(none.to_dict()) == none


def test_untrained_stn_is_collapsed_on_real_distorted_digits() -> None:
    bundle = load_dataset("digits", distort="rts")
    torch.manual_seed(0)
    h = measure(build_model(bundle.config), bundle.test.images, applied=bundle.test.applied)
    # Identity initialisation: theta is the identity for every image.
    assert isinstance(h, StnHealth) and h.collapsed and h.theta_spread_px < COLLAPSE_PX
    assert h.images == 450 and h.undone is not None and abs(h.undone["rotation"]) < 1e-6
    assert h.dead_fraction is not None and 0.0 <= h.dead_fraction <= 1.0
    assert from_dict(json.loads(json.dumps(h.to_dict()))).summary() == h.summary()


def test_leaky_stn_reports_no_dead_units() -> None:
    bundle = load_dataset("digits", distort="rts", loc_act="leaky")
    torch.manual_seed(0)
    model = build_model(bundle.config)
    with torch.no_grad():  # every hidden unit negative: dead for ReLU, alive for LeakyReLU
        model.stn.regressor[0].bias.fill_(-1e3)
    h = measure(model, bundle.test.images, applied=bundle.test.applied)
    assert isinstance(h, StnHealth) and h.dead_fraction is None
    assert "dead units" not in h.summary() and h.headline()["dead_fraction"] is None


def test_redistort_draws_fresh_distortions_with_known_thetas() -> None:
    bundle = load_dataset("digits", distort="rts")
    a, b = bundle.redistort_train(1), bundle.redistort_train(2)
    assert not torch.equal(a.images, b.images) and not torch.equal(a.applied, b.applied)
    assert torch.equal(a.images, bundle.redistort_train(1).images)
    assert torch.equal(a.labels, bundle.train.labels)


def test_clean_fraction_keeps_that_share_in_the_original_pose() -> None:
    bundle = load_dataset("digits", distort="rts")
    plain, mixed = bundle.redistort_train(3), bundle.redistort_train(3, clean_fraction=0.25)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    clean = (mixed.applied == identity).flatten(1).all(dim=1)
    assert 0.2 < clean.float().mean() < 0.3
    # the clean images are the undistorted ones; the rest keep the draws made without the option
    assert torch.equal(mixed.images[clean], bundle.train_clean.images[clean])
    assert torch.equal(mixed.applied[~clean], plain.applied[~clean])
    canvas = load_dataset("digits", distort="rts-canvas").redistort_train(3, clean_fraction=0.5)
    centred = (canvas.applied == identity * 1.5).flatten(1).all(dim=1)  # full size, centred
    assert 0.4 < centred.float().mean() < 0.6


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
    late = TrainOptions(stn_warp_penalty=0.1, stn_warp_from_px=2.0)
    assert not warp_penalty_on(late, history)
    assert warp_penalty_on(late, history + [{"train_theta_spread_px": 2.4}])
    assert warp_penalty_on(late, history + [{"train_theta_spread_px": 2.4},
                                            {"train_theta_spread_px": 1.0}])
    assert warp_penalty_on(TrainOptions(stn_warp_penalty=0.1), [])
    assert not warp_penalty_on(TrainOptions(stn_warp_from_px=2.0), history * 3 + [
        {"train_theta_spread_px": 9.0}])


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
    assert TrainOptions.from_recipe("rts").clean_fraction == 0.25
    opts = TrainOptions.from_recipe("rts", epochs=1, redistort=False, quiet=True, device="cpu")
    assert opts.clean_fraction == 0.0
    train(load_dataset("digits", distort="rts"), tmp_path, opts)
    assert (tmp_path / "last.pt").is_file()


def test_rts_recipe_without_its_warp_penalty_drops_its_start(tmp_path: Path) -> None:
    """--stn-warp-penalty 0 turns the recipe's charge off, and its start goes with it, so
    train does not refuse --stn-warp-from as given alone."""
    assert TrainOptions.from_recipe("rts").stn_warp_from_px == 2.0
    opts = TrainOptions.from_recipe("rts", epochs=1, stn_warp_penalty=0.0, quiet=True,
                                    device="cpu")
    assert opts.stn_warp_from_px == 0.0
    result = train(load_dataset("digits", distort="rts"), tmp_path, opts)
    assert "stn_warp_penalty" not in result.history[-1]


def test_rts_canvas_places_the_image_on_a_larger_canvas() -> None:
    bundle = load_dataset("digits", distort="rts-canvas")
    assert bundle.config.image_size == 48 and bundle.train.images.shape[-1] == 48
    assert bundle.test.applied is not None and bundle.test.applied.shape == (450, 2, 3)
    # The digit (32 px source) covers 32/48 of the canvas at scale 1: the applied sampling
    # theta scales by 1.5 / s with s in 0.7-1.2.
    scale = np.exp(-decompose(bundle.test.applied.numpy())["log_scale"])
    assert scale.min() >= 0.7 / 1.5 - 1e-6 and scale.max() <= 1.2 / 1.5 + 1e-6


def test_train_reports_health_every_epoch(digits_checkpoint: Path) -> None:
    doc = json.loads((digits_checkpoint.parent / "metrics.json").read_text())
    assert all("theta_spread_px" in row["stn"] for row in doc["history"])
    assert doc["stn_health"]["images"] == 450


def test_inspect_checkpoint_and_export_metadata(digits_checkpoint: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["inspect", str(digits_checkpoint)])
    assert r.exit_code == 0, r.output
    assert "STN health on the digits test split (450 images): theta spread" in r.output
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(cli, ["export", str(digits_checkpoint), "--out", str(out),
                                 "--with-theta", "--verify-samples", "64"])
    assert r.exit_code == 0, r.output
    assert "STN health on the digits test split: theta spread" in r.output
    assert "% of theta's spread" in r.output or "theta constant" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "STN health (measured at export): theta spread" in r.output


def test_bench_flags_a_collapsed_stn(tmp_path: Path) -> None:
    """An identity STN (as initialised) is collapsed: bench says so in table and JSON."""
    from stn_deploy.checkpoint import Checkpoint, save_checkpoint

    bundle = load_dataset("digits")
    model = build_model(bundle.config)
    ckpt = tmp_path / "identity.pt"
    save_checkpoint(ckpt, Checkpoint(config=bundle.config, state_dict=model.state_dict()))
    js = tmp_path / "b.json"
    md = tmp_path / "b.md"
    r = CliRunner().invoke(cli, ["bench", str(ckpt), "--backend", "torch", "--batch-sizes", "4",
                                 "--iterations", "2", "--warmup", "0", "--eval-samples", "64",
                                 "--json", str(js), "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    health = json.loads(js.read_text())["results"][0]["eval"]["stn_health"]
    assert health["collapsed"] is True and health["theta_spread_px"] == 0.0
    assert "COLLAPSED (0.00 px)" in md.read_text() and "COLLAPSED STN" in md.read_text()


def test_train_picks_the_rts_recipe_and_warns_on_a_collapsed_stn(tmp_path: Path) -> None:
    common = ["train", "--dataset", "digits", "--distort", "rts", "--epochs", "1", "--quiet",
              "--device", "cpu"]
    r = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "auto")])
    assert r.exit_code == 0, r.output
    assert "recipe rts, large localization net, 2 passes" in r.output
    assert "STN health on the test split: theta spread" in r.output
    # The recipe's warp penalty waits for the take-off: after one epoch it has not started.
    auto = json.loads((tmp_path / "auto" / "metrics.json").read_text())["history"][-1]
    assert auto["stn_warp_penalty"] == 0.0 and auto["train_theta_spread_px"] < 2.0
    # The seed recipe moves the STN at a tenth of the rate: after one epoch theta is still the
    # identity for every image, and train says so, with what to try.
    r = CliRunner().invoke(cli, [*common, "--recipe", "seed", "--loc-net", "seed",
                                 "--out", str(tmp_path / "seed")])
    assert r.exit_code == 0, r.output
    assert "warning: the STN has collapsed" in r.output and "--optimizer adam" in r.output
    doc = json.loads((tmp_path / "seed" / "metrics.json").read_text())
    assert doc["stn_health"]["collapsed"] is True
