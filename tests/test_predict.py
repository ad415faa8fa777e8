"""``stn-deploy predict`` on real digit images written as JPEG/PNG, and on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from stn_deploy.cli import cli
from stn_deploy.commands.predict import load_image
from stn_deploy.data import DataBundle
from stn_deploy.errors import StnDeployError


@pytest.fixture(scope="module")
def digit_files(digits_bundle: DataBundle, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("digit-images")
    files = []
    for i in range(4):
        arr = digits_bundle.test.images[i, 0].numpy()
        path = out / (f"d{i}.png" if i % 2 else f"d{i}.jpg")
        Image.fromarray(arr, mode="L").save(path, **({} if i % 2 else {"quality": 95}))
        files.append(path)
    return files


@pytest.fixture(scope="module")
def digits_onnx_plain(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx

    out = tmp_path_factory.mktemp("predict") / "digits.onnx"
    return export_onnx(load_checkpoint(digits_checkpoint).model(), out, OnnxOptions(opset=17))


def _expected_top1(checkpoint: Path, files: list[Path]) -> list[int]:
    import torch

    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.data import normalize

    ckpt = load_checkpoint(checkpoint)
    x = np.stack([np.asarray(Image.open(f).convert("L"))[None] for f in files])
    with torch.no_grad():
        logits = ckpt.model()(normalize(torch.from_numpy(x), ckpt.config))
    return logits.argmax(1).tolist()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_predict_real_images_json(backend: str, digits_checkpoint: Path,
                                  digits_onnx_plain: Path, digit_files: list[Path]) -> None:
    from stn_deploy.backends import unavailable_reason

    if unavailable_reason(backend):
        pytest.skip(unavailable_reason(backend))
    model = digits_checkpoint if backend == "torch" else digits_onnx_plain
    res = CliRunner().invoke(cli, ["predict", str(model), *map(str, digit_files), "--backend",
                                   backend, "--top-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["backend"] == backend and len(doc["results"]) == len(digit_files)
    expected = _expected_top1(digits_checkpoint, digit_files)
    for r, want in zip(doc["results"], expected):
        assert r["ok"] and len(r["top_k"]) == 3
        probs = [t["probability"] for t in r["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert r["top_k"][0]["index"] == want and r["top_k"][0]["class"] == str(want)


def test_bad_files_get_one_line_each_others_still_run(digits_checkpoint: Path,
                                                      digit_files: list[Path],
                                                      tmp_path: Path) -> None:
    notimg = tmp_path / "notes.jpg"
    notimg.write_text("not an image")
    colour = tmp_path / "colour.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(colour)
    clear = tmp_path / "clear.png"
    Image.new("LA", (32, 32), (100, 0)).save(clear)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(digit_files[0].read_bytes()[:60])
    missing = tmp_path / "missing.png"
    args = [str(digit_files[0]), str(notimg), str(colour), str(missing), str(clear),
            str(truncated), str(digit_files[1])]
    res = CliRunner().invoke(cli, ["predict", str(digits_checkpoint), *args, "--top-k", "1"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert any(ln.startswith(f"{digit_files[0]}: ") for ln in lines)
    assert any(ln.startswith(f"{digit_files[1]}: ") for ln in lines)
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 5 and "Traceback" not in res.output
    joined = "\n".join(errors)
    assert f"{notimg}: not an image" in joined
    assert f"{colour}: RGB colour image" in joined and "grayscale" in joined
    assert f"{missing}: file not found" in joined
    assert f"{clear}: LA image with transparency" in joined
    assert f"{truncated}: " in joined


def test_mode_rules() -> None:
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    rgb = np.asarray(gray.convert("RGB"))
    path = Path("/tmp") / f"stn-predict-mode-{id(gray)}.png"
    try:
        gray.save(path)
        as_rgb = load_image(path, channels=3, size=8)  # gray -> RGB is lossless
        assert as_rgb.shape == (8, 8, 3) and (as_rgb == rgb).all()
        Image.fromarray(rgb).save(path)  # gray content stored as RGB is fine for 1 channel
        assert load_image(path, channels=1, size=8).shape == (8, 8, 1)
        Image.new("CMYK", (8, 8)).save(path.with_suffix(".jpg"))
        with pytest.raises(StnDeployError, match="mode CMYK"):
            load_image(path.with_suffix(".jpg"), channels=3, size=8)
        big = load_image(path, channels=3, size=22)
        assert big.shape == (22, 22, 3) and big.dtype == np.uint8
    finally:
        path.unlink(missing_ok=True)
        path.with_suffix(".jpg").unlink(missing_ok=True)


def test_save_warped_and_ppm(digits_checkpoint: Path, digit_files: list[Path],
                             digits_onnx_plain: Path, tmp_path: Path) -> None:
    from stn_deploy.pnm import read_pnm

    res = CliRunner().invoke(cli, ["predict", str(digits_checkpoint), str(digit_files[1]),
                                   "--save-warped", str(tmp_path / "w"), "--save-ppm",
                                   str(tmp_path / "p"), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)["results"][0]
    warped = np.asarray(Image.open(r["warped"]))
    assert warped.shape == (32, 32) and len(r["theta"]) == 2
    pgm = read_pnm(r["ppm"])
    original = np.asarray(Image.open(digit_files[1]))
    assert pgm.reshape(32, 32).tolist() == original.tolist()
    # An ONNX without the theta output cannot say what the STN did: one line, exit 1.
    res = CliRunner().invoke(cli, ["predict", str(digits_onnx_plain), str(digit_files[1]),
                                   "--save-warped", str(tmp_path / "w2")])
    assert res.exit_code == 1 and "--with-theta" in res.output
    assert not (tmp_path / "w2").exists() or not any((tmp_path / "w2").iterdir())


@pytest.mark.cifar
def test_predict_cifar_jpegs(cifar_jpeg_dir: Path, random_model: object, tmp_path: Path) -> None:
    """Real CIFAR-10 JPEGs through a 3-channel model: every file classified."""
    from stn_deploy.checkpoint import Checkpoint, save_checkpoint

    ckpt = tmp_path / "cifar.pt"
    save_checkpoint(ckpt, Checkpoint(config=random_model.config,  # type: ignore[attr-defined]
                                     state_dict=random_model.state_dict()))  # type: ignore[attr-defined]
    files = sorted((cifar_jpeg_dir / "test").rglob("*.jpg"))[:5]
    res = CliRunner().invoke(cli, ["predict", str(ckpt), *map(str, files), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [r["ok"] for r in doc["results"]] == [True] * 5
    assert doc["results"][0]["top_k"][0]["class"] in random_model.config.class_names  # type: ignore[attr-defined]


def test_help() -> None:
    res = CliRunner().invoke(cli, ["predict", "--help"])
    assert res.exit_code == 0 and "--save-warped" in res.output and "--top-k" in res.output
