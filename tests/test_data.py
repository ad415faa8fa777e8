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
    distort_rts,
    load_dataset,
    load_split,
    normalize,
    rts_thetas,
)
from stn_deploy.errors import StnDeployError


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
