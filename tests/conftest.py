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
    from stn_deploy.train import TrainOptions, train

    out = tmp_path_factory.mktemp("digits-run")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = train(digits_bundle, out, TrainOptions(epochs=3, quiet=True, device="cpu"))
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
