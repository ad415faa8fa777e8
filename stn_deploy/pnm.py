"""Binary PGM (P5) and PPM (P6) images: the format the C++ runtime reads without an image
library, so Python and C++ can be compared on byte-identical inputs.

Only 8-bit binary files are written and read. ``read_pnm`` accepts maxval 1..255 and rescales to
0..255 with the same integer rounding as runtimes/cpp/src/pnm.cpp; it refuses ASCII (P1-P4),
16-bit, truncated files and trailing bytes, exactly as the C++ reader does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stn_deploy.errors import StnDeployError
from stn_deploy.fileio import atomic_path

MAX_SIDE = 1 << 15
_WHITESPACE = b" \t\n\r\v\f"


def write_pnm(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a uint8 image (HxW or HxWx1 -> P5, HxWx3 -> P6) atomically."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise StnDeployError(f"write_pnm needs a uint8 image, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        magic = b"P5"
    elif arr.ndim == 3 and arr.shape[2] == 3:
        magic = b"P6"
    else:
        raise StnDeployError(f"write_pnm needs an HxW, HxWx1 or HxWx3 image, got shape {arr.shape}")
    h, w = int(arr.shape[0]), int(arr.shape[1])
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise StnDeployError(f"write_pnm: image size {w}x{h} is out of range")
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_bytes(magic + f"\n{w} {h}\n255\n".encode("ascii") +
                        np.ascontiguousarray(arr).tobytes())
    return target


def _token(data: bytes, pos: int, path: Path) -> tuple[bytes, int]:
    n = len(data)
    while pos < n:
        if data[pos:pos + 1] == b"#":
            while pos < n and data[pos:pos + 1] not in (b"\n", b"\r"):
                pos += 1
        elif data[pos:pos + 1] in (b" ", b"\t", b"\n", b"\r", b"\v", b"\f"):
            pos += 1
        else:
            break
    start = pos
    while pos < n and data[pos] not in _WHITESPACE and data[pos:pos + 1] != b"#":
        pos += 1
    if start == pos:
        raise StnDeployError(f"{path}: truncated PGM/PPM header")
    return data[start:pos], pos


def _number(tok: bytes, path: Path, what: str, lo: int, hi: int) -> int:
    if not tok.isdigit() or len(tok) > 9:
        raise StnDeployError(f"{path}: bad {what} {tok.decode('latin-1')!r} in PGM/PPM header")
    v = int(tok)
    if not lo <= v <= hi:
        raise StnDeployError(f"{path}: {what} {v} out of range [{lo}, {hi}]")
    return v


def read_pnm(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a binary PGM/PPM as uint8 HxWxC (C = 1 for P5, 3 for P6)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise StnDeployError(f"image not found: {p}") from None
    except OSError as e:
        raise StnDeployError(f"cannot read image {p}: {e.strerror or e}") from None
    if data[:1] != b"P" or data[1:2] not in (b"5", b"6"):
        if data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4"):
            raise StnDeployError(f"{p}: ASCII or 1-bit PNM (P{data[1:2].decode()}) is not "
                                 "supported; write binary P5/P6")
        raise StnDeployError(f"{p} is not a binary PGM/PPM image (P5/P6)")
    channels = 1 if data[1:2] == b"5" else 3
    tok, pos = _token(data, 2, p)
    w = _number(tok, p, "width", 1, MAX_SIDE)
    tok, pos = _token(data, pos, p)
    h = _number(tok, p, "height", 1, MAX_SIDE)
    tok, pos = _token(data, pos, p)
    maxval = _number(tok, p, "maxval", 1, 65535)
    if maxval > 255:
        raise StnDeployError(f"{p}: 16-bit PGM/PPM (maxval {maxval}) is not supported")
    if pos >= len(data) or data[pos] not in _WHITESPACE:
        raise StnDeployError(f"{p}: truncated PGM/PPM header")
    pos += 1
    n = w * h * channels
    have = len(data) - pos
    if have < n:
        raise StnDeployError(f"{p}: truncated image data ({have} of {n} bytes)")
    if have > n:
        raise StnDeployError(f"{p}: {have - n} unexpected bytes after the image data")
    img = np.frombuffer(data, dtype=np.uint8, count=n, offset=pos).reshape(h, w, channels)
    if maxval != 255:
        if int(img.max()) > maxval:
            raise StnDeployError(f"{p}: pixel value {int(img.max())} exceeds maxval")
        img = ((img.astype(np.uint32) * 255 + maxval // 2) // maxval).astype(np.uint8)
    return img.copy()
