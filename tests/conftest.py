"""Shared fixtures: real (small) data and a model really trained on it, built once per session."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from stn_deploy.config import ModelConfig
from stn_deploy.data import DataBundle, load_dataset
from stn_deploy.model import STNClassifier, build_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_TARBALL = SHARED_DATA / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def digits_bundle() -> DataBundle:
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_checkpoint(digits_bundle: DataBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint trained for 3 epochs on the digits by the real training code (~85% test)."""
    from stn_deploy.training import TrainOptions, train

    out = tmp_path_factory.mktemp("digits-run")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = train(digits_bundle, out, TrainOptions.of(epochs=3, quiet=True, device="cpu"))
    return result.checkpoint


@pytest.fixture(scope="session")
def digits_onnx(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits checkpoint as ONNX (opset 17, with the theta output)."""
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx

    out = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    return export_onnx(load_checkpoint(digits_checkpoint).model(), out,
                       OnnxOptions(opset=17, with_theta=True))


@pytest.fixture
def random_model() -> STNClassifier:
    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    # Move theta away from identity so the sampler really interpolates.
    with torch.no_grad():
        assert model.stn is not None
        model.stn.regressor[2].weight.normal_(0, 0.01)
        model.stn.regressor[2].bias.add_(torch.tensor([-0.1, 0.05, 0.02, 0.03, -0.08, -0.04]))
    return model


def _untrained_checkpoint(config: ModelConfig, images: torch.Tensor, path: Path) -> Path:
    """A seeded, untrained checkpoint: the regressor moved off the identity (so the sampler
    interpolates) and BatchNorm's statistics set from ``images`` (so the logits have a real
    spread: FP16 and INT8 then agree with FP32 on real images, as a trained model's do)."""
    from stn_deploy.checkpoint import Checkpoint, save_checkpoint
    from stn_deploy.data import normalize

    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        assert model.stn is not None
        model.stn.regressor[2].weight.normal_(0, 0.01)
        model.stn.regressor[2].bias.add_(torch.tensor([-0.1, 0.05, 0.02, 0.03, -0.08, -0.04]))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # a plain average over the one batch
                module.reset_running_stats()
        model.train()(normalize(images, config))
    save_checkpoint(path, Checkpoint(config, model.eval().state_dict()))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(digits_bundle: DataBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained digits checkpoint (seconds, not a training run), for tests of what export
    does with its options rather than of accuracy."""
    out = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    return _untrained_checkpoint(digits_bundle.config, digits_bundle.train.images[:256], out)


@pytest.fixture(scope="session")
def digits_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two image folders of different digits, "data" and "calib": train/ (5 a class) and
    test/ (4 a class), one folder per class, RGB PNGs at 28x28."""
    from PIL import Image

    bundle = load_dataset("digits", image_size=28)
    root = tmp_path_factory.mktemp("digit-folders")
    folders = {}
    for offset, name in enumerate(("data", "calib")):
        for split, data, count in (("train", bundle.train, 5), ("test", bundle.test, 4)):
            for k in range(10):
                idx = (data.labels == k).nonzero().flatten()[offset * count:(offset + 1) * count]
                folder = root / name / split / str(k)
                folder.mkdir(parents=True)
                for i in idx.tolist():
                    image = Image.fromarray(data.images[i, 0].numpy()).convert("RGB")
                    image.save(folder / f"{i}.png")
        folders[name] = root / name
    return folders


@pytest.fixture(scope="session")
def tiny_folder_checkpoint(digits_folders: dict[str, Path],
                           tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained RGB checkpoint of an image folder's classes (dataset imagefolder): it
    verifies and calibrates on the folder given with --data-dir / --calib-dir."""
    from stn_deploy.data import load_imagefolder

    train = load_imagefolder("train", digits_folders["data"], image_size=32)
    config = ModelConfig(in_channels=3, image_size=32, num_classes=10, class_names=train.classes,
                         mean=(0.1, 0.1, 0.1), std=(0.3, 0.3, 0.3), dataset="imagefolder")
    out = tmp_path_factory.mktemp("tiny-folder") / "folder.pt"
    return _untrained_checkpoint(config, train.images, out)


@pytest.fixture(scope="session")
def cifar_jpeg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ImageFolder cut of the CIFAR-10 JPEG copy (20 train, 10 test images a class)."""
    import tarfile

    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"CIFAR-10 JPEG copy not found at {CIFAR_TARBALL} (only in the dev sandbox)")
    out = tmp_path_factory.mktemp("cifar-jpeg")
    keep = {"train": 20, "test": 10}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_TARBALL) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3:
                continue
            split, cls = parts[-3], parts[-2]
            if split not in keep or counts.get((split, cls), 0) >= keep[split]:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            target = out / split / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            target.write_bytes(src.read())
            if len(counts) == 20 and all(counts[k] >= keep[k[0]] for k in counts):
                break
    return out


@pytest.fixture
def spin_cpus() -> Iterator[Callable[[int], None]]:
    """``spin_cpus(n)`` keeps n CPUs busy with other processes until the test ends."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(n: int) -> None:
        procs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"])
                     for _ in range(n))
        time.sleep(0.3)  # let them start spinning

    yield start
    for p in procs:
        p.kill()
        p.wait()
