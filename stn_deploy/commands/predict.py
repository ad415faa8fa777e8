"""``stn-deploy predict``: classify image files with any backend.

Preprocessing comes from the model's stored config: convert the image to the model's channel
count, resize to its input size (PIL bilinear, as the imagefolder loader does), then normalise
with its mean/std (or hand uint8 NHWC to a graph with embedded preprocessing).

Image modes: as torchvision's loaders do, any 8-bit image is converted (PIL ``convert``) to
what the model takes, L for a 1-channel model and RGB for a 3-channel one: colour to grayscale,
grayscale and palette to RGB, CMYK/YCbCr to RGB, and an alpha channel dropped. Each conversion
is named in a note beside the prediction (and in the JSON), so none happens unseen. Refused,
one line for that file: what cannot be read (not an image, truncated, corrupt), 16-bit and
float images (PIL clips them to 255 instead of scaling; ``stn_deploy.pnm`` refuses 16-bit PNM
for the same reason), and headers claiming more pixels than PIL's decompression-bomb limit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from stn_deploy.commands.options import (backend_option, device_option, is_stdout, json_option,
                                         write_json_text)

# PIL modes of more than 8 bits a channel: "I", "I;16", "I;16B", ..., "F".
HIGH_DEPTH_PREFIXES = ("I", "F")


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@backend_option(default_help="torch for a checkpoint, onnxruntime for .onnx, trt for a plan")
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True)
@json_option("the predictions", stdout_note=", instead of the text")
@click.option("--save-warped", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write what the STN made of each image (PNG) into this folder; needs the "
                   "theta output (checkpoints have it; ONNX: export with --with-theta).")
@click.option("--save-ppm", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write each preprocessed (resized) input as PPM/PGM into this folder, for the "
                   "C++ runtime.")
@device_option
def predict(model: Path, images: tuple[Path, ...], backend: str | None, top_k: int,
            json_path: Path | None, save_warped: Path | None, save_ppm: Path | None,
            device: str) -> None:
    """Classify IMAGE... (PNG, JPEG, ...) with MODEL (checkpoint, .onnx or TensorRT plan)."""
    import json

    from stn_deploy.artifacts import model_kind
    from stn_deploy.backends import DEFAULT_BACKENDS, create_runner, runner_class
    from stn_deploy.backends.base import AUTO_DEVICE
    from stn_deploy.errors import StnDeployError

    name = backend or DEFAULT_BACKENDS[model_kind(model)][0]
    if device != AUTO_DEVICE and "device" not in runner_class(name).OPTIONS:
        raise click.BadParameter(f"{device!r}: the {name} runner chooses its own device; "
                                 "--device applies to the torch runners", param_hint="--device")
    runner = create_runner(name, model, device=device)
    config = runner.config
    results: list[dict[str, Any]] = []
    loaded: list[tuple[int, Any]] = []
    for path in images:
        try:
            img, notes = load_image(path, config.in_channels, config.image_size)
            loaded.append((len(results), img))
            results.append({"file": str(path), "ok": True, "notes": notes})
        except StnDeployError as e:
            results.append({"file": str(path), "ok": False, "error": str(e)})
    if loaded:
        out = _infer(runner, [img for _, img in loaded], save_warped is not None, model)
        _fill_results(results, loaded, out, config, top_k, save_warped, save_ppm)
    if json_path is not None:
        write_json_text(json_path, json.dumps(
            {"model": str(model), "backend": name, "device": runner.device_name,
             "results": results}, indent=2))
    if not is_stdout(json_path):
        for r in results:
            if r["ok"]:
                top = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%"
                                for t in r["top_k"])
                notes = "".join(f"  ({n})" for n in r["notes"])
                click.echo(f"{r['file']}: {top}{notes}")
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        click.echo(f"Error: {r['file']}: {r['error']}", err=True)
    if failed:
        sys.exit(1)


def _infer(runner: Any, images: list[Any], want_theta: bool, model: Path) -> dict[str, Any]:
    """Every image through the runner in chunks (a static-batch graph gets its batch, the last
    chunk padded with copies of its last image); outputs per image, padding dropped."""
    import numpy as np

    from stn_deploy.errors import StnDeployError
    from stn_deploy.harness import to_runner_input

    batch = np.stack(images).transpose(0, 3, 1, 2)  # NCHW uint8
    with runner:
        if want_theta and "theta" not in runner.output_names:
            raise StnDeployError(f"--save-warped needs the theta output, which {model.name} "
                                 "does not have (export it with --with-theta)")
        static = runner.input_spec.static_batch
        outs: dict[str, list[Any]] = {}
        step = static or 64
        for start in range(0, len(batch), step):
            chunk = batch[start:start + step]
            n = len(chunk)
            if static is not None and n < static:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], static - n, axis=0)])
            for k, v in runner.infer(to_runner_input(runner, chunk)).items():
                outs.setdefault(k, []).append(np.asarray(v)[:n])
    return {k: np.concatenate(v) for k, v in outs.items()}


def _fill_results(results: list[dict[str, Any]], loaded: list[tuple[int, Any]],
                  out: dict[str, Any], config: Any, top_k: int, save_warped: Path | None,
                  save_ppm: Path | None) -> None:
    """Top-k classes per image, and the warped PNG / PPM files asked for."""
    import numpy as np

    k = min(top_k, config.num_classes)
    logits = out["logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    theta = out.get("theta")
    for j, (i, img) in enumerate(loaded):
        order = np.argsort(-probs[j], kind="stable")[:k]
        results[i]["top_k"] = [{"index": int(c), "class": config.class_names[c],
                                "probability": float(probs[j, c])} for c in order]
        stem = f"{i:03d}-{Path(results[i]['file']).stem}"
        if save_ppm is not None:
            from stn_deploy.pnm import write_pnm

            ext = ".pgm" if img.shape[2] == 1 else ".ppm"
            results[i]["ppm"] = str(write_pnm(save_ppm / f"{stem}{ext}", img))
        if save_warped is not None:
            results[i]["warped"] = str(save_warped_png(save_warped / f"{stem}-warped.png",
                                                       img, theta[j], config))
            results[i]["theta"] = np.asarray(theta[j]).round(6).tolist()


def load_image(path: Path, channels: int, size: int) -> tuple[Any, list[str]]:
    """uint8 HWC at the model's size and channel count, and the notes saying what was
    converted; StnDeployError (without the file name, the caller adds it) when it cannot be
    read."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from stn_deploy.errors import StnDeployError

    if not path.exists():
        raise StnDeployError("file not found")
    if not path.is_file():
        raise StnDeployError("not a file")
    if channels not in (1, 3):
        raise StnDeployError(f"the model takes {channels} channels; predict reads 1 or 3")
    target = "L" if channels == 1 else "RGB"
    notes: list[str] = []
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode.startswith(HIGH_DEPTH_PREFIXES):
                raise StnDeployError(f"image mode {mode} (more than 8 bits a channel) is not "
                                     "supported: PIL would clip it to 8 bits; convert it first")
            if mode == target:
                img = im.copy()
            else:
                img = im.convert(target)
                dropped = "A" in im.getbands() and im.getchannel("A").getextrema()[0] < 255
                notes.append(f"converted {mode} to {target}"
                             + (" (transparency dropped)" if dropped else ""))
    except UnidentifiedImageError:
        raise StnDeployError("not an image PIL can read") from None
    except Image.DecompressionBombError as e:  # a huge header: refused before decoding
        raise StnDeployError(f"refused as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated, corrupt, unconvertible mode
        raise StnDeployError(f"cannot decode the image ({e})") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # a copy: PIL's buffer is read-only
    return (arr[:, :, None] if arr.ndim == 2 else arr), notes


def save_warped_png(path: Path, image_hwc: Any, theta: Any, config: Any) -> Path:
    """Warp the normalised image with theta, as the model does, then undo the normalisation
    for display (the model's zero padding is the dataset mean colour)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from stn_deploy.data import normalize
    from stn_deploy.fileio import atomic_path
    from stn_deploy.model import AffineGrid

    x = normalize(torch.from_numpy(image_hwc).permute(2, 0, 1)[None].contiguous(), config)
    t = torch.as_tensor(np.asarray(theta, dtype=np.float32)).reshape(1, 2, 3)
    grid = AffineGrid(config.image_size, config.image_size, config.align_corners)(t)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                      align_corners=config.align_corners)
    mean = torch.tensor(config.mean).view(1, -1, 1, 1)
    std = torch.tensor(config.std).view(1, -1, 1, 1)
    pixels = ((y * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)[0]
    arr = pixels.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
