"""Datasets as in-memory uint8 tensors (N, C, H, W): all of ours fit in memory, which keeps
training free of data-loader workers on a 2-core machine.

Kinds: ``digits`` (scikit-learn's bundled 8x8 digits, the embedded default), ``cifar10``
(torchvision's python or binary batches), ``imagefolder`` (train/ and test/ of class folders:
the CIFAR-10 JPEG copy and users' own images) and ``fashion-mnist`` (gzipped IDX files).
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stn_deploy.config import CIFAR10_CLASSES, ModelConfig
from stn_deploy.errors import StnDeployError

DATASETS = ("digits", "cifar10", "imagefolder", "fashion-mnist")
# rts: the digit rotated, scaled and shifted inside its own frame. rts-canvas: the paper's
# 42x42 RTS MNIST setting, the image on a canvas 1.5x its size, so the STN must find and zoom.
DISTORTIONS = ("none", "rts", "rts-canvas")
# The test split's distortions are drawn from seed + this, so no test image is a distorted
# copy of a training one; everything that rebuilds the test split uses the same offset.
TEST_SEED_OFFSET = 1_000_003
CANVAS_FACTOR = 1.5
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".webp", ".tif",
                  ".tiff"}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle-boot")
# Image size the model sees when the data's own is too small for the localization net.
DEFAULT_SIZE = {"digits": 32, "fashion-mnist": 28, "cifar10": 32}


@dataclass
class ImageSet:
    images: Tensor  # uint8, (N, C, H, W)
    labels: Tensor  # int64, (N,)
    classes: tuple[str, ...]
    # Per image, the sampling theta of the distortion applied to it (None: undistorted):
    # what STN health compares the STN's own theta against.
    applied: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int) -> "ImageSet":
        applied = None if self.applied is None else self.applied[:n]
        return ImageSet(self.images[:n], self.labels[:n], self.classes, applied)


# ---------------------------------------------------------------------------------- loaders

def load_digits(split: str) -> ImageSet:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    idx_train, idx_test = train_test_split(
        np.arange(len(x)), test_size=0.25, random_state=0, stratify=d.target
    )
    idx = idx_train if split == "train" else idx_test
    return ImageSet(torch.from_numpy(x[idx]), torch.from_numpy(d.target[idx]).long(),
                    tuple(str(i) for i in range(10)))


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles: allow only what they contain, nothing callable
    beyond numpy's array reconstruction."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
    except Exception as e:  # any failure here means the file is not a CIFAR-10 batch
        raise StnDeployError(f"corrupt CIFAR-10 batch {path}: {e}") from None
    if len(labels) != len(data):
        raise StnDeployError(f"corrupt CIFAR-10 batch {path}: {len(data)} images, "
                             f"{len(labels)} labels")
    return data, labels


def _cifar_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    record = 1 + 3 * 32 * 32
    if raw.size == 0 or raw.size % record:
        raise StnDeployError(f"corrupt CIFAR-10 binary batch {path}: {raw.size} bytes is not a "
                             f"multiple of {record}")
    raw = raw.reshape(-1, record)
    return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].astype(np.int64)


def load_cifar10(split: str, data_dir: Path, download: bool = False) -> ImageSet:
    py_dir, bin_dir = data_dir / "cifar-10-batches-py", data_dir / "cifar-10-batches-bin"
    if download and not py_dir.is_dir() and not bin_dir.is_dir():
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(str(data_dir), train=True, download=True)
        except Exception as e:  # network and archive errors alike
            raise StnDeployError(f"CIFAR-10 download into {data_dir} failed: {e}") from None
    if py_dir.is_dir():
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        reader, folder = _cifar_python_batch, py_dir
    elif bin_dir.is_dir():
        names = ([f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train"
                 else ["test_batch.bin"])
        reader, folder = _cifar_binary_batch, bin_dir
    else:
        raise StnDeployError(
            f"no CIFAR-10 in {data_dir} (expected cifar-10-batches-py/ or cifar-10-batches-bin/;"
            " pass --download where online, or use --dataset imagefolder for a JPEG copy)"
        )
    parts = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise StnDeployError(f"missing CIFAR-10 file {path}")
        parts.append(reader(path))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() > 9:
        raise StnDeployError(f"CIFAR-10 labels outside 0..9 in {folder}")
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), CIFAR10_CLASSES)


def _read_idx(path: Path, expect_dims: int) -> np.ndarray:
    if not path.is_file():
        raise StnDeployError(f"missing IDX file {path}")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise StnDeployError(f"corrupt IDX file {path}: {e}") from None
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08 or data[3] != expect_dims:
        raise StnDeployError(f"{path} is not a uint8 IDX file with {expect_dims} dimensions")
    dims = struct.unpack(f">{expect_dims}I", data[4:4 + 4 * expect_dims])
    body = data[4 + 4 * expect_dims:]
    if len(body) != math.prod(dims):
        raise StnDeployError(f"truncated IDX file {path}: {len(body)} bytes of data, "
                             f"header says {math.prod(dims)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_fashion_mnist(split: str, data_dir: Path) -> ImageSet:
    prefix = "train" if split == "train" else "t10k"

    def find(stem: str) -> Path:
        for name in (f"{prefix}-{stem}-ubyte.gz", f"{prefix}-{stem}-ubyte"):
            if (data_dir / name).is_file():
                return data_dir / name
        expected = data_dir / f"{prefix}-{stem}-ubyte.gz"
        raise StnDeployError(f"missing Fashion-MNIST file {expected}"
                             " (apt-get install dataset-fashion-mnist, or pass --data-dir)")

    images = _read_idx(find("images-idx3"), 3)
    labels = _read_idx(find("labels-idx1"), 1).astype(np.int64)
    if len(images) != len(labels):
        raise StnDeployError(f"Fashion-MNIST in {data_dir}: {len(images)} images, "
                             f"{len(labels)} labels")
    return ImageSet(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels),
                    FASHION_MNIST_CLASSES)


def _decode(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert(mode)
            if size is not None and im.size != size:
                im = im.resize(size, Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for bad files
        raise StnDeployError(f"cannot read image {path}: {e}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_imagefolder(split: str, data_dir: Path, classes: tuple[str, ...] | None = None,
                     image_size: int | None = None) -> ImageSet:
    root = data_dir / split
    if not root.is_dir():
        raise StnDeployError(f"missing folder {root} (imagefolder needs {data_dir}/train and "
                             f"{data_dir}/test, each with one folder per class)")
    found = tuple(sorted(p.name for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith(".")))
    if not found:
        raise StnDeployError(f"no class folders in {root}")
    if classes is not None and found != classes:
        raise StnDeployError(f"class folders of {root} differ from the training classes: "
                             f"{', '.join(found)}")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(found):
        imgs = sorted(p for p in (root / name).iterdir()
                      if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not imgs:
            raise StnDeployError(f"empty class folder {root / name} (no image files)")
        files.extend((p, label) for p in imgs)
    size = (image_size, image_size) if image_size else None
    first = _decode(files[0][0], "RGB", size)
    size = size or (first.shape[1], first.shape[0])
    out = np.empty((len(files),) + first.shape, dtype=np.uint8)
    out[0] = first
    for i, (path, _) in enumerate(files[1:], start=1):
        out[i] = _decode(path, "RGB", size)
    labels = torch.tensor([lab for _, lab in files], dtype=torch.long)
    return ImageSet(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), labels, found)


# ----------------------------------------------------------------------- transforms

def resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=images.shape[-1] > size)
    return x.round().clamp(0, 255).to(torch.uint8)


def rts_thetas(n: int, seed: int, canvas: bool = False, clean_fraction: float = 0.0) -> Tensor:
    """Per-sample sampling thetas for the STN paper's rotated, translated, scaled distortion.

    In the frame (rts): rotation in +-45 degrees, scale 0.5-0.85 of the frame, shift up to a
    quarter of it. On a canvas (rts-canvas, the paper's 42x42 MNIST): the image fills 1/1.5
    of the canvas at scale 1, is scaled 0.7-1.2 and placed anywhere it stays mostly inside.
    ``clean_fraction`` of the samples (picked by the seed) keep the original pose:
    upright, full size, centred.
    """
    # One row of draws per sample: sample i's transform is the same whatever n is.
    u = torch.rand(n, 4, generator=torch.Generator().manual_seed(seed))
    clean = torch.zeros(n, dtype=torch.bool)
    if clean_fraction > 0:  # its own draws, so the distortions are those without it
        clean = torch.rand(n, generator=torch.Generator().manual_seed(seed + 7_919)) \
            < clean_fraction
    angle = (u[:, 0] * 2 - 1) * math.pi / 4
    if canvas:
        scale = (0.7 + u[:, 1] * 0.5) / CANVAS_FACTOR
        shift = (u[:, 2:] * 2 - 1) * (1.0 - 0.7 * scale[:, None])
        scale = torch.where(clean, 1.0 / CANVAS_FACTOR, scale)
    else:
        scale = 0.5 + u[:, 1] * 0.35
        shift = (u[:, 2:] * 2 - 1) * 0.25
        scale = torch.where(clean, 1.0, scale)
    angle = torch.where(clean, 0.0, angle)
    shift = torch.where(clean[:, None], 0.0, shift)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Forward map p = s R q + t; sampling needs its inverse q = R^T (p - t) / s.
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    inv = inv / scale[:, None, None]
    offset = -(inv @ shift[:, :, None])
    return torch.cat([inv, offset], dim=2)


def warp_images(images: Tensor, thetas: Tensor, size: int | None = None) -> Tensor:
    """uint8 images sampled through per-image thetas, at ``size`` (default: their own)."""
    n, c, h, w = images.shape
    out_h, out_w = (size, size) if size else (h, w)
    out = torch.empty((n, c, out_h, out_w), dtype=torch.uint8)
    for start in range(0, n, 4096):
        x = images[start:start + 4096].float()
        grid = F.affine_grid(thetas[start:start + 4096], [len(x), c, out_h, out_w],
                             align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[start:start + 4096] = y.round().clamp(0, 255).to(torch.uint8)
    return out


def distort(images: Tensor, kind: str, seed: int,
            clean_fraction: float = 0.0) -> tuple[Tensor, Tensor]:
    """(distorted images, the sampling thetas applied); deterministic per sample and seed."""
    canvas = kind == "rts-canvas"
    thetas = rts_thetas(len(images), seed, canvas=canvas, clean_fraction=clean_fraction)
    size = round(images.shape[-1] * CANVAS_FACTOR) if canvas else None
    return warp_images(images, thetas, size), thetas


def distort_rts(images: Tensor, seed: int) -> Tensor:
    """Deterministic per sample: sample i of a given seed is always distorted the same way."""
    return warp_images(images, rts_thetas(len(images), seed))


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.double() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


# -------------------------------------------------------------------------- entry points

def load_split(name: str, split: str, data_dir: str | Path | None = None,
               download: bool = False, classes: tuple[str, ...] | None = None,
               image_size: int | None = None) -> ImageSet:
    """One split at its own resolution (imagefolder: resized to ``image_size`` if given)."""
    if name not in DATASETS:
        raise StnDeployError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise StnDeployError(f"unknown split {split!r}")
    if name == "digits":
        return load_digits(split)
    if name == "fashion-mnist":
        return load_fashion_mnist(split, Path(data_dir) if data_dir else FASHION_MNIST_DIR)
    if data_dir is None:
        raise StnDeployError(f"--dataset {name} needs --data-dir")
    path = Path(data_dir).expanduser()
    if not path.is_dir() and not (name == "cifar10" and download):
        raise StnDeployError(f"data folder not found: {path}")
    if name == "cifar10":
        return load_cifar10(split, path, download)
    return load_imagefolder(split, path, classes, image_size)


def prepare(data: ImageSet, image_size: int, kind: str, seed: int,
            clean_fraction: float = 0.0) -> ImageSet:
    """Resize to the image size, then apply the (seeded) distortion, remembering its thetas."""
    if kind not in DISTORTIONS:
        raise StnDeployError(f"unknown distortion {kind!r}; choose from {', '.join(DISTORTIONS)}")
    images = resize(data.images, image_size)
    if kind == "none":
        return ImageSet(images, data.labels, data.classes)
    images, thetas = distort(images, kind, seed, clean_fraction)
    return ImageSet(images, data.labels, data.classes, thetas)


def model_split(config: ModelConfig, split: str, data_dir: str | Path | None, *,
                name: str | None = None, seed: int = 0) -> ImageSet:
    """A split as the model saw it in training: resized, and distorted with load_dataset's
    seeds (so the test split's applied transforms are known), or another dataset undistorted
    at the model's input size."""
    name = name or config.dataset
    own = name == config.dataset
    size = config.image_size
    if own and config.distort == "rts-canvas":
        size = round(size / CANVAS_FACTOR)
    classes = tuple(config.class_names) if own and name == "imagefolder" else None
    data = load_split(name, split, data_dir, classes=classes, image_size=size)
    return prepare(data, size, config.distort if own else "none",
                   seed + (TEST_SEED_OFFSET if split == "test" else 0))


@dataclass
class DataBundle:
    train: ImageSet
    test: ImageSet
    config: ModelConfig
    # The training images before distortion (resized), so training can draw fresh
    # distortions each epoch; None for undistorted data.
    train_clean: ImageSet | None = None

    def redistort_train(self, seed: int, clean_fraction: float = 0.0) -> ImageSet:
        """The training set with a fresh seeded distortion per image (same seed, same set);
        ``clean_fraction`` of the images keep their original pose this time."""
        if self.train_clean is None:
            return self.train
        return prepare(self.train_clean, self.train_clean.images.shape[-1], self.config.distort,
                       seed, clean_fraction)


def _load_size(name: str, image_size: int | None, distort: str) -> int | None:
    """The size images are loaded at: the model's input, or for rts-canvas the image placed
    on the canvas (``image_size`` is the canvas's); None: the images' own."""
    size = image_size or DEFAULT_SIZE.get(name)
    if size is not None and distort == "rts-canvas" and image_size:
        size = round(size / CANVAS_FACTOR)
    return size


def model_image_size(name: str, image_size: int | None, distort: str) -> int | None:
    """The model's input size load_dataset gives for these choices; None: the images' own
    (imagefolder without --image-size), known only once they are read."""
    size = _load_size(name, image_size, distort)
    if size is None or distort != "rts-canvas":
        return size
    return round(size * CANVAS_FACTOR)


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = False,
                 image_size: int | None = None, distort: str = "none", seed: int = 0,
                 use_stn: bool = True, align_corners: bool = False,
                 loc_net: str = "seed", loc_act: str = "relu",
                 stn_passes: int = 1, dropout: float = 0.05) -> DataBundle:
    """Train and test splits at the model's input size, and the config that fits them: the
    one place a trained model's ModelConfig is built (``stn-deploy train`` passes its resolved
    choices, dropout included, in here)."""
    size = _load_size(name, image_size, distort)
    train = load_split(name, "train", data_dir, download, image_size=size)
    size = size or max(int(train.images.shape[-1]), 22)
    test = load_split(name, "test", data_dir, classes=train.classes, image_size=size)
    clean = ImageSet(resize(train.images, size), train.labels, train.classes)
    # Test seed differs from train's, so no test image is a distorted copy of a training one.
    train = prepare(clean, size, distort, seed)
    test = prepare(test, size, distort, seed + TEST_SEED_OFFSET)
    mean, std = channel_stats(train.images)
    config = ModelConfig(
        in_channels=int(train.images.shape[1]), image_size=int(train.images.shape[-1]),
        num_classes=len(train.classes),
        class_names=train.classes, mean=mean, std=std, use_stn=use_stn,
        align_corners=align_corners, dataset=name, distort=distort, loc_net=loc_net,
        loc_act=loc_act, stn_passes=stn_passes, dropout=dropout,
    )
    return DataBundle(train, test, config, None if distort == "none" else clean)


def normalize(images: Tensor, config: ModelConfig) -> Tensor:
    """uint8 NCHW -> the float input the model was trained on."""
    mean = torch.tensor(config.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std
