from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dataclasses import replace

from stn_deploy.checkpoint import load_checkpoint
from stn_deploy.data import warp_images
from stn_deploy.errors import StnDeployError
from stn_deploy.model import build_model
from stn_deploy.train import (TrainOptions, WeightEma, affine_batch, augment_batch, evaluate,
                               rts_batch, train)


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
    train(digits_bundle, tmp_path, TrainOptions(epochs=3, stop_after=2, quiet=True, device="cpu"))
    assert load_checkpoint(tmp_path / "last.pt").epoch == 2
    train(digits_bundle, tmp_path, TrainOptions(epochs=3, quiet=True, device="cpu"),
          resume=tmp_path / "last.pt")
    resumed, straight = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(digits_checkpoint)
    assert resumed.epoch == 3 and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for k, v in straight.state_dict.items():
        assert torch.equal(v, resumed.state_dict[k]), k
    with pytest.raises(StnDeployError, match="already has 3 epochs"):
        train(digits_bundle, tmp_path, TrainOptions(epochs=3, quiet=True),
              resume=tmp_path / "last.pt")
    with pytest.raises(StnDeployError, match="same --epochs"):
        train(digits_bundle, tmp_path, TrainOptions(epochs=5, quiet=True),
              resume=tmp_path / "last.pt")


def test_stn_optimizer_of_its_own_resumes_exactly(digits_bundle, tmp_path: Path) -> None:
    """AdamW for the STN beside SGD: both optimizers' states travel in the checkpoint."""
    opts = TrainOptions(epochs=2, quiet=True, device="cpu", stn_optimizer="adam", stn_lr=1e-3)
    train(digits_bundle, tmp_path / "straight", opts)
    train(digits_bundle, tmp_path / "c", replace(opts, epochs=3, stop_after=1))
    train(digits_bundle, tmp_path / "split", replace(opts, stop_after=1))
    train(digits_bundle, tmp_path / "split", opts, resume=tmp_path / "split" / "last.pt")
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")
    for k, v in straight.state_dict.items():
        assert torch.equal(v, resumed.state_dict[k]), k
    assert type(straight.optimizer["stn"]["state"][0]["exp_avg"]) is torch.Tensor  # AdamW's
    assert "momentum_buffer" in straight.optimizer["main"]["state"][0]  # SGD's
    assert [g["max_lr"] for g in straight.optimizer["stn"]["param_groups"]] == [1e-3]
    with pytest.raises(StnDeployError, match="other options .*--stn-optimizer adam -> None"):
        train(digits_bundle, tmp_path / "split", TrainOptions(epochs=3, quiet=True),
              resume=tmp_path / "c" / "last.pt")
    with pytest.raises(StnDeployError, match="needs --stn-lr"):
        train(digits_bundle, tmp_path / "x", TrainOptions(stn_optimizer="adam", quiet=True))
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
    with pytest.raises(StnDeployError, match="--ema must be in"):
        WeightEma(model, 1.0)


def test_ema_checkpoint_carries_the_average_and_resumes_exactly(digits_bundle,
                                                               tmp_path: Path) -> None:
    opts = TrainOptions(epochs=2, quiet=True, device="cpu", ema=0.99)
    train(digits_bundle, tmp_path / "straight", opts)
    train(digits_bundle, tmp_path / "split", replace(opts, stop_after=1))
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
        train(digits_bundle, tmp_path / "split", replace(opts, epochs=2, ema=0.0),
              resume=tmp_path / "split" / "last.pt")
    # Any option that shapes the weights (here a recipe's rate) may not change halfway.
    with pytest.raises(StnDeployError, match="--lr 0.05 -> 0.01"):
        train(digits_bundle, tmp_path / "split", replace(opts, epochs=2, lr=0.01),
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
           "--epochs", "6", "--out", str(tmp_path), "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "metrics.json").read_text())
    # Each rank sees half the data: 6 epochs are 66 steps, enough to learn (1 epoch: chance).
    assert doc["world_size"] == 2 and doc["history"][-1]["test_acc"] > 0.5
    assert load_checkpoint(tmp_path / "last.pt").epoch == 6
