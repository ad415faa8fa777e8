from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stn_deploy.data import (
    DISTORTIONS,
    distort_rts,
    load_dataset,
    load_split,
    model_image_size,
    normalize,
    rts_thetas,
)
from stn_deploy.errors import StnDeployError
from stn_deploy.health import decompose


def _digits_rgb(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Real images (the sklearn digits, upsampled to 32x32 RGB) to write in other formats."""
    from stn_deploy.data import load_digits, resize

    d = load_digits("test")
    x = resize(d.images[:n], 32).repeat(1, 3, 1, 1).numpy()
    return x, d.labels[:n].numpy()


def test_digits_split_is_deterministic_and_stratified() -> None:
    a, b = load_split("digits", "train"), load_split("digits", "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    test = load_split("digits", "test")
    assert len(a) + len(test) == 1797
    assert a.images.dtype == torch.uint8 and a.images.shape[1:] == (1, 8, 8)
    assert set(test.labels.tolist()) == set(range(10))


def test_load_dataset_digits_config(digits_bundle) -> None:
    c = digits_bundle.config
    assert c.input_shape == (1, 32, 32) and c.num_classes == 10 and c.dataset == "digits"
    x = normalize(digits_bundle.train.images, c)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.02


def test_rts_is_seeded_per_sample(digits_bundle) -> None:
    imgs = digits_bundle.test.images[:16]
    a, b = distort_rts(imgs, seed=3), distort_rts(imgs, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, distort_rts(imgs, seed=4))
    # Sample i's transform does not depend on how many samples follow it.
    assert torch.equal(rts_thetas(16, 7)[:5], rts_thetas(5, 7))
    assert not torch.equal(a, imgs)


def test_cifar10_python_and_binary_batches(tmp_path: Path) -> None:
    x, y = _digits_rgb(20)
    py = tmp_path / "py" / "cifar-10-batches-py"
    py.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(py / name, "wb") as f:
            pickle.dump({b"data": x.reshape(20, -1), b"labels": y.tolist()}, f)
    got = load_split("cifar10", "test", tmp_path / "py")
    assert torch.equal(got.images, torch.from_numpy(x)) and got.labels.tolist() == y.tolist()
    assert len(load_split("cifar10", "train", tmp_path / "py")) == 100

    binary = tmp_path / "bin" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    rec = np.concatenate([y[:, None].astype(np.uint8), x.reshape(20, -1)], axis=1)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec.tofile(binary / name)
    got = load_split("cifar10", "test", tmp_path / "bin")
    assert torch.equal(got.images, torch.from_numpy(x))
    (binary / "test_batch.bin").write_bytes(rec.tobytes()[:-7])
    with pytest.raises(StnDeployError, match="test_batch.bin"):
        load_split("cifar10", "test", tmp_path / "bin")


def test_cifar10_refuses_pickled_code(tmp_path: Path) -> None:
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    with open(py / "test_batch", "wb") as f:
        pickle.dump({b"data": Path("x"), b"labels": [0]}, f)
    with pytest.raises(StnDeployError, match="refusing to load"):
        load_split("cifar10", "test", tmp_path)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx(tmp_path: Path) -> None:
    x, y = _digits_rgb(12)
    gray = x[:, 0, 2:30, 2:30]
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", gray)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", y)
    bundle = load_dataset("fashion-mnist", tmp_path)
    assert bundle.config.input_shape == (1, 28, 28)
    assert bundle.config.class_names[0] == "t-shirt"
    assert torch.equal(bundle.test.images[:, 0], torch.from_numpy(gray))
    # Truncated data: header promises more bytes than there are.
    raw = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(StnDeployError, match="truncated IDX file .*t10k-images"):
        load_split("fashion-mnist", "test", tmp_path)


def _imagefolder(root: Path, n: int = 3) -> Path:
    x, y = _digits_rgb(40)
    for split in ("train", "test"):
        for cls in ("0", "1"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            for cls in ("0", "1"):
                idx = int(np.nonzero(y == int(cls))[0][i])
                Image.fromarray(x[idx].transpose(1, 2, 0)).save(root / split / cls / f"{i}.png")
    return root


def test_imagefolder_reads_class_folders(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path)
    (root / "train" / "0" / "notes.txt").write_text("not an image")
    bundle = load_dataset("imagefolder", root)
    assert bundle.config.class_names == ("0", "1")
    assert bundle.config.input_shape == (3, 32, 32)
    assert len(bundle.train) == 6 and bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_errors_name_the_file(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path)
    bad = root / "test" / "1" / "9.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(StnDeployError, match="cannot read image .*9.jpg"):
        load_dataset("imagefolder", root)
    bad.unlink()
    (root / "test" / "2").mkdir()
    with pytest.raises(StnDeployError, match="differ from the training classes"):
        load_dataset("imagefolder", root)
    (root / "train" / "2").mkdir()
    with pytest.raises(StnDeployError, match="empty class folder .*train/2"):
        load_dataset("imagefolder", root)
    with pytest.raises(StnDeployError, match="data folder not found"):
        load_dataset("imagefolder", tmp_path / "nowhere")
    with pytest.raises(StnDeployError, match="missing folder"):
        load_dataset("imagefolder", root / "train" / "0")


@pytest.mark.cifar
def test_cifar_jpeg_copy_reads(cifar_jpeg_dir: Path) -> None:
    bundle = load_dataset("imagefolder", cifar_jpeg_dir)
    assert bundle.config.class_names[0] == "airplane" and bundle.config.num_classes == 10
    assert bundle.train.images.shape == (200, 3, 32, 32) and len(bundle.test) == 100
    # Real photos: channel means near CIFAR-10's own (0.49, 0.48, 0.45).
    assert all(0.3 < m < 0.65 for m in bundle.config.mean)


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


def test_rts_canvas_places_the_image_on_a_larger_canvas() -> None:
    bundle = load_dataset("digits", distort="rts-canvas")
    assert bundle.config.image_size == 48 and bundle.train.images.shape[-1] == 48
    assert bundle.test.applied is not None and bundle.test.applied.shape == (450, 2, 3)
    # The digit (32 px source) covers 32/48 of the canvas at scale 1: the applied sampling
    # theta scales by 1.5 / s with s in 0.7-1.2.
    scale = np.exp(-decompose(bundle.test.applied.numpy())["log_scale"])
    assert scale.min() >= 0.7 / 1.5 - 1e-6 and scale.max() <= 1.2 / 1.5 + 1e-6


def test_model_image_size_is_the_size_load_dataset_gives() -> None:
    """--print-config reports the input size without loading data: it must be load_dataset's."""
    for kwargs in ({}, {"distort": "rts"}, {"distort": "rts-canvas"}, {"image_size": 40},
                   {"image_size": 50, "distort": "rts-canvas"},
                   {"image_size": 35, "distort": "rts-canvas"}):
        config = load_dataset("digits", **kwargs).config  # type: ignore[arg-type]
        assert model_image_size("digits", kwargs.get("image_size"),  # type: ignore[arg-type]
                                str(kwargs.get("distort", "none"))) == config.image_size, kwargs
    assert model_image_size("imagefolder", None, "none") is None  # the images' own


def test_the_model_config_carries_the_choices_it_is_built_with() -> None:
    config = load_dataset("digits", distort="rts", loc_net="large", stn_passes=2,
                          loc_act="leaky", dropout=0.0).config
    assert (config.distort, config.loc_net, config.stn_passes, config.loc_act,
            config.dropout) == ("rts", "large", 2, "leaky", 0.0)


def test_the_command_lists_the_distortions_data_knows() -> None:
    from stn_deploy.training.options import DISTORTIONS as LISTED  # torch-free copy

    assert LISTED == DISTORTIONS
