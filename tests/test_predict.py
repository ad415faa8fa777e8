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
                                   backend, "--top-k", "3", "--json", "-"])
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
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((32, 32), 4000, dtype=np.uint16)).save(deep)  # 16-bit gray
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(digit_files[0].read_bytes()[:60])
    missing = tmp_path / "missing.png"
    args = [str(digit_files[0]), str(notimg), str(deep), str(missing), str(truncated),
            str(digit_files[1])]
    res = CliRunner().invoke(cli, ["predict", str(digits_checkpoint), *args, "--top-k", "1"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert any(ln.startswith(f"{digit_files[0]}: ") for ln in lines)
    assert any(ln.startswith(f"{digit_files[1]}: ") for ln in lines)
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 4 and "Traceback" not in res.output
    joined = "\n".join(errors)
    assert f"{notimg}: not an image" in joined
    assert f"{deep}: image mode I;16 (more than 8 bits a channel)" in joined
    assert f"{missing}: file not found" in joined
    assert f"{truncated}: " in joined


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid PNG header for width x height 8-bit gray pixels, with one row of pixel data:
    a few hundred bytes on disk that a decoder would have to expand to width*height bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_one_line_and_the_others_still_run(
        digits_checkpoint: Path, digit_files: list[Path], tmp_path: Path) -> None:
    bomb = _png_claiming(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 1000
    res = CliRunner().invoke(cli, ["predict", str(digits_checkpoint), str(digit_files[0]),
                                   str(bomb), str(digit_files[1]), "--top-k", "1",
                                   "--json", "-"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "900000000 pixels" in errors[0]
    assert errors[0].startswith(f"Error: {bomb}: refused as a possible decompression bomb")
    doc = json.loads(res.stdout)  # the error lines went to stderr
    assert [r["ok"] for r in doc["results"]] == [True, False, True]
    expected = _expected_top1(digits_checkpoint, [digit_files[0], digit_files[1]])
    assert [doc["results"][i]["top_k"][0]["index"] for i in (0, 2)] == expected


def test_rgb_photo_on_the_digits_model_is_converted_with_a_note(
        digits_checkpoint: Path, digits_bundle: DataBundle, tmp_path: Path) -> None:
    """A digit in colour (orange ink, as a photo of a screen would be), as JPEG and PPM: the
    1-channel model gets PIL's RGB->L conversion, the one torchvision's loaders do."""
    from stn_deploy.pnm import write_pnm

    gray = digits_bundle.test.images[5, 0].numpy().astype(np.float32)
    tint = np.array([1.0, 0.55, 0.1], dtype=np.float32)
    rgb = np.clip(gray[:, :, None] * tint, 0, 255).astype(np.uint8)
    jpg = tmp_path / "photo.jpg"
    Image.fromarray(rgb, mode="RGB").save(jpg, quality=95)
    ppm = write_pnm(tmp_path / "photo.ppm", rgb)
    res = CliRunner().invoke(cli, ["predict", str(digits_checkpoint), str(jpg), str(ppm),
                                   "--top-k", "1"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, (jpg, ppm)):
        assert line.startswith(f"{path}: ") and line.endswith("(converted RGB to L)")
    # The prediction is the model's on the converted image, not something else.
    converted = []
    for path in (jpg, ppm):
        target = tmp_path / f"{path.stem}-{path.suffix[1:]}-as-l.png"
        Image.open(path).convert("L").save(target)
        converted.append(target)
    res = CliRunner().invoke(cli, ["predict", str(digits_checkpoint), str(jpg), str(ppm),
                                   "--json", "-"])
    doc = json.loads(res.output)
    want = _expected_top1(digits_checkpoint, converted)
    assert [r["top_k"][0]["index"] for r in doc["results"]] == want
    assert [r["notes"] for r in doc["results"]] == [["converted RGB to L"]] * 2


def test_rgba_png_is_converted_with_a_note(digits_checkpoint: Path, digit_files: list[Path],
                                           random_model: object, tmp_path: Path) -> None:
    """RGBA for the 1-channel digits model (to L) and for a 3-channel model (to RGB); the note
    says so, and says when transparent pixels lost their transparency."""
    from stn_deploy.checkpoint import Checkpoint, save_checkpoint

    gray = np.asarray(Image.open(digit_files[1]))
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    opaque = tmp_path / "opaque.png"
    Image.fromarray(rgba, mode="RGBA").save(opaque)
    rgba[:4, :4, 3] = 0  # a transparent corner
    clear = tmp_path / "corner.png"
    Image.fromarray(rgba, mode="RGBA").save(clear)
    res = CliRunner().invoke(cli, ["predict", str(digits_checkpoint), str(opaque), str(clear),
                                   str(digit_files[1]), "--json", "-"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [r["notes"] for r in doc["results"]] == [
        ["converted RGBA to L"], ["converted RGBA to L (transparency dropped)"], []]
    # Same pixels as the grayscale PNG, so the same prediction.
    top = [r["top_k"][0]["index"] for r in doc["results"]]
    assert top == _expected_top1(digits_checkpoint, [digit_files[1]]) * 3

    ckpt = tmp_path / "colour.pt"
    save_checkpoint(ckpt, Checkpoint(config=random_model.config,  # type: ignore[attr-defined]
                                     state_dict=random_model.state_dict()))  # type: ignore[attr-defined]
    res = CliRunner().invoke(cli, ["predict", str(ckpt), str(clear), "--top-k", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith("(converted RGBA to RGB (transparency dropped))")


def test_mode_rules(tmp_path: Path) -> None:
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    rgb = np.asarray(gray.convert("RGB"))
    path = tmp_path / "m.png"
    gray.save(path)
    as_rgb, notes = load_image(path, channels=3, size=8)  # gray -> RGB is lossless
    assert as_rgb.shape == (8, 8, 3) and (as_rgb == rgb).all() and notes == ["converted L to RGB"]
    same, notes = load_image(path, channels=1, size=8)
    assert (same[:, :, 0] == np.asarray(gray)).all() and notes == []
    Image.fromarray(rgb).save(path)  # gray content stored as RGB: the same values back
    back, notes = load_image(path, channels=1, size=8)
    assert (back[:, :, 0] == np.asarray(gray)).all() and notes == ["converted RGB to L"]
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "m.jpg")
    red, notes = load_image(tmp_path / "m.jpg", channels=3, size=8)
    assert notes == ["converted CMYK to RGB"] and red[..., 0].min() > 200
    big, _ = load_image(path, channels=3, size=22)
    assert big.shape == (22, 22, 3) and big.dtype == np.uint8
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), mode="F").save(tmp_path / "f.tiff")
    with pytest.raises(StnDeployError, match="mode F "):
        load_image(tmp_path / "f.tiff", channels=1, size=8)


def test_save_warped_and_ppm(digits_checkpoint: Path, digit_files: list[Path],
                             digits_onnx_plain: Path, tmp_path: Path) -> None:
    from stn_deploy.pnm import read_pnm

    res = CliRunner().invoke(cli, ["predict", str(digits_checkpoint), str(digit_files[1]),
                                   "--save-warped", str(tmp_path / "w"), "--save-ppm",
                                   str(tmp_path / "p"), "--json", "-"])
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
    res = CliRunner().invoke(cli, ["predict", str(ckpt), *map(str, files), "--json", "-"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [r["ok"] for r in doc["results"]] == [True] * 5
    assert doc["results"][0]["top_k"][0]["class"] in random_model.config.class_names  # type: ignore[attr-defined]


def test_json_file_beside_the_text(digits_checkpoint: Path, digit_files: list[Path],
                                   tmp_path: Path) -> None:
    """--json FILE writes the document and the terminal still gets the text; '-' replaces
    the text with the document."""
    out = tmp_path / "p" / "predictions.json"
    res = CliRunner().invoke(cli, ["predict", str(digits_checkpoint), *map(str, digit_files),
                                   "--top-k", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    lines = res.stdout.strip().splitlines()
    assert [ln.split(": ")[0] for ln in lines] == [r["file"] for r in doc["results"]]
    want = _expected_top1(digits_checkpoint, digit_files)
    assert [r["top_k"][0]["index"] for r in doc["results"]] == want
    assert [ln.split(": ")[1].split(" ")[0] for ln in lines] == [str(w) for w in want]
    assert doc["backend"] == "torch"
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "missing.pt"), str(digit_files[0]),
                                   "--json", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and not (tmp_path / "x.json").exists()


def test_device_and_backend_by_name(digits_checkpoint: Path, digits_onnx_plain: Path,
                                    digit_files: list[Path]) -> None:
    """--device is where torch runs: refused by name for a runner that picks its own;
    auto (the default) runs anywhere; tensorrt is the quiet alias of trt."""
    one = str(digit_files[0])
    res = CliRunner().invoke(cli, ["predict", str(digits_onnx_plain), one, "--device", "cpu"])
    assert res.exit_code == 2 and "--device" in res.output and "onnxruntime" in res.output
    res = CliRunner().invoke(cli, ["predict", str(digits_checkpoint), one, "--device", "cpu",
                                   "--json", "-"])
    assert res.exit_code == 0 and json.loads(res.stdout)["backend"] == "torch"
    res = CliRunner().invoke(cli, ["predict", str(digits_onnx_plain), one, "--json", "-"])
    assert res.exit_code == 0 and json.loads(res.stdout)["backend"] == "onnxruntime"
    res = CliRunner().invoke(cli, ["predict", str(digits_onnx_plain), one, "--backend",
                                   "tensorrt"])
    assert res.exit_code == 1 and "backend trt cannot run onnx files" in res.output
    res = CliRunner().invoke(cli, ["predict", str(digits_checkpoint), one, "--backend", "nope"])
    assert res.exit_code == 2 and "torch-compile" in res.output  # the choices, named


def test_help() -> None:
    res = CliRunner().invoke(cli, ["predict", "--help"])
    assert res.exit_code == 0 and "--save-warped" in res.output and "--top-k" in res.output
