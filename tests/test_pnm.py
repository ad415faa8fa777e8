"""PGM/PPM round trips and refusals (the C++ runtime reads the same files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stn_deploy.errors import StnDeployError
from stn_deploy.pnm import read_pnm, write_pnm


@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 1), (4, 9, 3)])
def test_round_trip(tmp_path: Path, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = write_pnm(tmp_path / "a.pnm", img)
    back = read_pnm(path)
    expect = img if img.ndim == 3 else img[:, :, None]
    assert back.dtype == np.uint8 and back.shape == expect.shape
    np.testing.assert_array_equal(back, expect)
    magic = path.read_bytes()[:2]
    assert magic == (b"P6" if shape[-1] == 3 and len(shape) == 3 else b"P5")


def test_digits_images_round_trip(tmp_path: Path, digits_bundle: object) -> None:
    images = digits_bundle.test.images[:3].permute(0, 2, 3, 1).numpy()  # type: ignore[attr-defined]
    for i, img in enumerate(images):
        np.testing.assert_array_equal(read_pnm(write_pnm(tmp_path / f"{i}.pgm", img)), img)


def test_header_comments_and_maxval_rescale(tmp_path: Path) -> None:
    p = tmp_path / "c.pgm"
    p.write_bytes(b"P5 # a comment\n2 # width\n1\n# more\n15\n" + bytes([0, 15]))
    np.testing.assert_array_equal(read_pnm(p)[:, :, 0], [[0, 255]])


@pytest.mark.parametrize("image, message", [
    (np.zeros((2, 2), np.float32), "uint8"),
    (np.zeros((2, 2, 2), np.uint8), "shape"),
    (np.zeros((2,), np.uint8), "shape"),
])
def test_write_refuses_bad_arrays(tmp_path: Path, image: np.ndarray, message: str) -> None:
    with pytest.raises(StnDeployError, match=message):
        write_pnm(tmp_path / "x.pgm", image)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("data, message", [
    (b"", "not a binary PGM/PPM"),
    (b"hello world", "not a binary PGM/PPM"),
    (b"P2\n2 2\n255\n0 0 0 0\n", "ASCII"),
    (b"P5\n2 2\n255\n\x00\x00\x00", "truncated image data"),
    (b"P5\n2 2\n255\n\x00\x00\x00\x00\x00", "unexpected bytes"),
    (b"P5\n2 2\n65535\n" + bytes(8), "16-bit"),
    (b"P5\n2", "truncated PGM/PPM header"),
    (b"P6\n0 2\n255\n", "width 0 out of range"),
    (b"P6\n2 x\n255\n", "bad height"),
    (b"P5\n2 1\n10\n\x00\x0b", "exceeds maxval"),
])
def test_read_refuses_bad_files(tmp_path: Path, data: bytes, message: str) -> None:
    p = tmp_path / "bad.ppm"
    p.write_bytes(data)
    with pytest.raises(StnDeployError, match=message):
        read_pnm(p)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StnDeployError, match="image not found"):
        read_pnm(tmp_path / "nope.ppm")
