"""STN health: the figures are right on transforms whose answer is known, and the collapse of
a real (briefly trained, identity-initialised) STN is caught everywhere it is reported."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stn_deploy.data import load_dataset, rts_thetas
from stn_deploy.health import (COLLAPSE_PX, NotMeasured, StnHealth, assess, at_rest_fraction,
                               compose, decompose, displacement_px, from_dict, measure)
from stn_deploy.model import build_model


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


def test_at_rest_counts_the_images_a_relu_regressor_leaves_at_its_bias() -> None:
    # A regressor (hidden ReLU, then linear) whose hidden layer is zero on 7 of 10 images:
    # those 7 get exactly its bias; the other 3 move by at least 0.5 px.
    rng = np.random.default_rng(0)
    features = rng.normal(size=(10, 4))
    features[:7] = -np.abs(features[:7])  # all negative: ReLU gives zero
    weight, bias = rng.normal(size=(4, 6)), np.array([1.0, 0, 0, 0, 1.0, 0])
    theta = np.maximum(features, 0) @ weight + bias
    moved = displacement_px(theta[7:] - bias, 32)
    assert moved.min() > 0.5
    assert at_rest_fraction(theta, 32) == pytest.approx(0.7)
    # Every image moved a little (no rest): nothing counts, though the spread is small.
    assert at_rest_fraction(theta + rng.normal(scale=0.01, size=theta.shape), 32) < 0.2


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


def test_the_verdict_says_in_words_what_the_stn_undoes() -> None:
    """The sentence train ends with: the figures of the summary, or COLLAPSED."""
    applied = rts_thetas(200, seed=5).double().numpy()
    h_inv = np.linalg.inv(np.concatenate([applied, np.tile([[[0, 0, 1.0]]], (200, 1, 1))], 1))
    perfect = assess(h_inv[:, :2], 32, applied=applied)
    assert isinstance(perfect, StnHealth)
    assert perfect.verdict() == ("The STN transforms: it undoes 100% of the rotation, 100% of "
                                 "the scale and 100% of the translation the images were "
                                 "distorted with.")
    identity = assess(np.tile(np.eye(2, 3), (200, 1, 1)), 32, applied=applied)
    assert isinstance(identity, StnHealth)
    assert identity.verdict().startswith("The STN has COLLAPSED: theta moves the sampling "
                                         "points by 0.00 px")
    moving = assess(_rotation(np.linspace(-30, 30, 64)), 32)  # nothing applied to undo
    assert isinstance(moving, StnHealth)
    assert moving.verdict().startswith("The STN transforms: theta moves the sampling points by")


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
    # The CIFAR-10 rts-recipe probe with the STN at 3x (benchmarks/results/archive/cifar_stn_probes.md):
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
    assert "dead regressor" not in h.summary() and h.headline()["dead_fraction"] is None
