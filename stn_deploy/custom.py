"""Export and verification of any ``nn.Module`` that warps with ``F.affine_grid`` /
``F.grid_sample``: the user's model, not ours.

Three things make such a model deploy the way ours does:

* ``exact_affine_grid``: while the model is traced, ``F.affine_grid`` is replaced by our
  ``AffineGrid`` (a constant base grid times theta, bit-identical to ATen's) at whatever size
  each call asks for, so the graph has no AffineGrid op and exports at every opset from 16.
* The FP32 sampling path is found from the graph by ``precision.stn_path_nodes`` (everything
  feeding any GridSample's grid), so FP16 and INT8 keep it float for any number of samplers.
* Verification checks the outputs *and* every GridSample's grid: a verification copy of the
  graph exposes the grids as outputs, compared with the grids PyTorch's ``F.grid_sample`` got
  (recorded by ``recorded_grids``), in pixels of the image each one samples.

The patches work through the ``torch.nn.functional`` module attribute, so a model must call
``F.affine_grid`` / ``F.grid_sample`` (or ``torch.nn.functional.…``); a name imported with
``from torch.nn.functional import affine_grid`` is bound before we can replace it.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError, error_line
from stn_deploy.export.pipeline import ExportResult
from stn_deploy.export.verify import TOLERANCES, Tolerances, VerifyReport

GRID_OUTPUT = "stn_deploy.grid.{}"  # the verification copy's extra outputs, one per GridSample
RANDOM_SAMPLES = 64
RANDOM_WARNING = ("warning: verified on random inputs (no --data-dir): this proves the ONNX "
                  "graph computes what PyTorch computes on those inputs, not that it is "
                  "accurate on your data, nor that INT8 calibrated on noise keeps accuracy")
NO_GRID_NOTE = ("note: the model has no grid_sample: exported and verified as a plain network; "
                "the STN checks (grid parity, FP32 sampling path) do not apply")


# ------------------------------------------------------------------------ the user's model

def load_factory(spec: str) -> nn.Module:
    """``package.module:factory`` -> the module the factory returns (or the module object
    itself when the name is one), in eval mode on the CPU."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise StnDeployError(f"--model {spec!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the user's module raises at import
        raise StnDeployError(f"--model {spec}: cannot import {module_name} "
                             f"({type(e).__name__}: {error_line(e)})") from None
    if not hasattr(module, attr):
        raise StnDeployError(f"--model {spec}: {module_name} has no attribute {attr!r}")
    factory = getattr(module, attr)
    if isinstance(factory, nn.Module):
        model = factory
    elif callable(factory):
        try:
            model = factory()
        except Exception as e:  # the user's code: any exception is theirs to read
            raise StnDeployError(f"--model {spec}: the factory raised {type(e).__name__}: "
                                 f"{error_line(e)}") from None
    else:
        raise StnDeployError(f"--model {spec}: {attr} is a {type(factory).__name__}, not a "
                             "factory or torch.nn.Module")
    if not isinstance(model, nn.Module):
        raise StnDeployError(f"--model {spec}: the factory returned a {type(model).__name__}, "
                             "not a torch.nn.Module")
    return model.eval().cpu()


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a state dict (or an stn-deploy/Lightning-style {"state_dict": ...} file) with
    ``weights_only=True``: the file is data, never unpickled as code."""
    from stn_deploy.checkpoint import load_tensors

    p = Path(path)
    payload = load_tensors(p, "weights file")
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise StnDeployError(f"{p} holds no state dict (a mapping of names to tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[1:2])
        raise StnDeployError(f"weights {p.name} do not fit the model: "
                             f"{(detail or error_line(e))[:300]}") from None


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """"1x28x28" -> (1, 28, 28): channels, height, width (no batch)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise StnDeployError(f"--input-shape {text!r}: expected CxHxW, e.g. 1x28x28")
    return shape  # type: ignore[return-value]


# -------------------------------------------------------------------------- export patches

@contextmanager
def exact_affine_grid() -> Iterator[list[tuple[int, int]]]:
    """Within the block, ``F.affine_grid`` is our AffineGrid for the size of each call; yields
    the (height, width) sizes seen."""
    from stn_deploy.model import AffineGrid

    functional = torch.nn.functional
    original = functional.affine_grid
    sizes: list[tuple[int, int]] = []

    def constant_grid(theta: Tensor, size: Sequence[int] | torch.Size,
                      align_corners: bool | None = None) -> Tensor:
        if len(size) != 4:
            raise StnDeployError(f"F.affine_grid with a {len(size)}-D size (a volumetric warp) "
                                 "has no constant-grid form in stn-deploy")
        height, width = int(size[2]), int(size[3])  # never size[0]: the batch stays dynamic
        sizes.append((height, width))
        return AffineGrid(height, width, bool(align_corners)).to(theta.device)(theta)

    functional.affine_grid = constant_grid
    try:
        yield sizes
    finally:
        functional.affine_grid = original


@contextmanager
def recorded_grids() -> Iterator[list[tuple[Tensor, tuple[int, ...]]]]:
    """Within the block, every ``F.grid_sample`` call records (grid, input shape)."""
    functional = torch.nn.functional
    original = functional.grid_sample
    calls: list[tuple[Tensor, tuple[int, ...]]] = []

    def recording(input: Tensor, grid: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        calls.append((grid.detach().float().cpu(), tuple(input.shape)))
        return original(input, grid, *args, **kwargs)

    functional.grid_sample = recording
    try:
        yield calls
    finally:
        functional.grid_sample = original


def _as_outputs(value: Any) -> tuple[Tensor, ...]:
    if isinstance(value, Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, Tensor) for v in value):
        return tuple(value)
    raise StnDeployError(f"the model returned a {type(value).__name__}; stn-deploy exports "
                         "models that return a tensor or a tuple of tensors")


class ModuleWrapper(nn.Module):
    """The user's model with its first ``count`` outputs (and our normalisation when the
    preprocessing is embedded)."""

    def __init__(self, model: nn.Module, config: ModelConfig, count: int,
                 embed_preprocess: bool) -> None:
        super().__init__()
        from stn_deploy.model import Normalize

        self.model, self.count = model, count
        self.pre = Normalize(config) if embed_preprocess else None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.pre is not None:
            x = self.pre(x)
        outs = _as_outputs(self.model(x))[:self.count]
        return outs[0] if self.count == 1 else outs


@dataclass(frozen=True)
class Probe:
    """What one forward pass at the input shape says about the model."""

    num_classes: int
    num_outputs: int
    grid_samples: int


def probe(model: nn.Module, input_shape: Sequence[int], extra_outputs: Sequence[str]) -> Probe:
    shape = tuple(input_shape)
    text = "x".join(str(v) for v in shape)
    with torch.inference_mode(), recorded_grids() as grids:
        try:
            outs = _as_outputs(model(torch.rand(2, *shape)))
        except StnDeployError:
            raise
        except Exception as e:  # the user's forward: any exception means "rejects the shape"
            raise StnDeployError(f"the model rejects input shape {text} "
                                 f"({type(e).__name__}: {error_line(e)})") from None
    if len(outs) < 1 + len(extra_outputs):
        raise StnDeployError(f"the model returns {len(outs)} tensor(s); naming "
                             f"{', '.join(extra_outputs)} needs {1 + len(extra_outputs)}")
    logits = outs[0]
    if logits.dim() != 2 or logits.shape[0] != 2 or logits.shape[1] < 2:
        raise StnDeployError(f"the model's first output has shape {tuple(logits.shape)} for a "
                             f"batch of 2; stn-deploy needs (batch, classes) logits")
    for name, out in zip(extra_outputs, outs[1:]):
        if out.shape[0] != 2:
            raise StnDeployError(f"output {name} has shape {tuple(out.shape)} for a batch of 2; "
                                 "every output needs the batch first")
    return Probe(int(logits.shape[1]), len(outs), len(grids))


def module_config(model: nn.Module, input_shape: Sequence[int], *,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  class_names: Sequence[str] | None = None, dataset: str = "custom",
                  extra_outputs: Sequence[str] = ()) -> tuple[ModelConfig, Probe]:
    """The ModelConfig every artifact carries, from what is known: the input shape, the class
    count of a trial forward pass, and normalisation / class names when given (without
    normalisation the model gets pixel / 255)."""
    c, h, w = input_shape
    if h != w:
        raise StnDeployError(f"input shape {c}x{h}x{w}: stn-deploy's artifacts describe square "
                             "inputs only (height == width)")
    found = probe(model, input_shape, extra_outputs)
    k = found.num_classes
    names = tuple(class_names) if class_names else tuple(str(i) for i in range(k))
    if len(names) != k:
        raise StnDeployError(f"{len(names)} class names given, the model outputs {k} classes")
    config = ModelConfig(in_channels=c, image_size=h, num_classes=k, class_names=names,
                         mean=tuple(mean) if mean else (0.0,) * c,
                         std=tuple(std) if std else (1.0,) * c,
                         use_stn=found.grid_samples > 0, dataset=dataset)
    return config, found


# ---------------------------------------------------------------------------- verification

@dataclass
class TorchReference:
    """PyTorch's outputs on the verification images and the grids its samplers used."""

    outputs: dict[str, np.ndarray]
    grids: list[np.ndarray] = field(default_factory=list)
    sampled_shapes: list[tuple[int, ...]] = field(default_factory=list)  # each sampler's input


def torch_outputs(model: nn.Module, images_uint8: np.ndarray, config: ModelConfig,
                  extra_outputs: Sequence[str] = (), batch: int = 64) -> TorchReference:
    """The original model (F.affine_grid untouched) in eval mode on the CPU."""
    from stn_deploy.data import normalize

    names = ("logits", *extra_outputs)
    parts: dict[str, list[np.ndarray]] = {}
    grids: list[list[np.ndarray]] = []
    shapes: list[tuple[int, ...]] = []
    model = model.eval().cpu()
    for start in range(0, len(images_uint8), batch):
        x = normalize(torch.from_numpy(images_uint8[start:start + batch]), config)
        with torch.inference_mode(), recorded_grids() as calls:
            outs = _as_outputs(model(x))
        for name, out in zip(names, outs):
            parts.setdefault(name, []).append(out.float().numpy())
        grids = grids or [[] for _ in calls]
        shapes = [shape for _, shape in calls]
        for i, (grid, _) in enumerate(calls):
            grids[i].append(grid.numpy())
    return TorchReference({k: np.concatenate(v) for k, v in parts.items()},
                          [np.concatenate(g) for g in grids], shapes)


def with_grid_outputs(src: Path, dst: Path) -> int:
    """A verification copy of ``src`` with every GridSample's grid as an extra output
    (GRID_OUTPUT.format(i), graph order); returns how many."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(src))
    grids = [n.input[1] for n in proto.graph.node if n.op_type == "GridSample"]
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    for i, name in enumerate(grids):
        out = GRID_OUTPUT.format(i)
        proto.graph.node.append(helper.make_node("Identity", [name], [out]))
        proto.graph.output.append(helper.make_tensor_value_info(
            out, types.get(name, onnx.TensorProto.FLOAT), None))
    onnx.save(proto, str(dst))
    return len(grids)


def _grid_checks(got: dict[str, np.ndarray], ref: TorchReference,
                 tol: Tolerances) -> list[tuple[str, str, bool]]:
    bound = tol.theta_px
    count = sum(1 for k in got if k.startswith(GRID_OUTPUT.format("")))
    if count != len(ref.grids):
        return [("grids", f"grids: the graph has {count} GridSample nodes, PyTorch called "
                 f"grid_sample {len(ref.grids)} times", False)]
    checks = []
    for i, (want, shape) in enumerate(zip(ref.grids, ref.sampled_shapes)):
        diff = np.abs(np.asarray(got[GRID_OUTPUT.format(i)], np.float64) - want)
        # A normalised grid unit is half the sampled image's width (x) or height (y) in pixels.
        px = float(max((diff[..., 0] * shape[-1] / 2).max(), (diff[..., 1] * shape[-2] / 2).max()))
        ok = bound is None or px <= bound
        need = f"required <= {bound:g} px" if bound is not None else "no bound"
        checks.append((f"grid{i}", f"grid {i} (samples {shape[-2]}x{shape[-1]}): points "
                       f"moved by at most {px:.2g} px ({need})", ok))
    return checks


def _output_checks(got: dict[str, np.ndarray], ref: TorchReference,
                   tol: Tolerances) -> list[tuple[str, str, bool]]:
    """Named outputs beyond logits and theta (which ``verify.compare`` checks)."""
    checks = []
    for name, want in ref.outputs.items():
        if name in ("logits", "theta"):
            continue
        diff = np.abs(np.asarray(got[name], np.float64) - want)
        if tol.atol is None:
            checks.append((name, f"{name}: max abs {diff.max():.3g} (reported; {name} has no "
                           "elementwise bound at this precision)", True))
            continue
        ok = bool(np.all(diff <= tol.atol + (tol.rtol or 0.0) * np.abs(want)))
        checks.append((name, f"{name}: max abs {diff.max():.3g} (required |diff| <= "
                       f"{tol.atol:g} + {tol.rtol or 0:g}*|ref|)", ok))
    return checks


def verify_module(path: str | os.PathLike[str], reference: TorchReference,
                  images_uint8: np.ndarray, labels: np.ndarray | None, config: ModelConfig,
                  tol: Tolerances, backend: str = "onnxruntime") -> VerifyReport:
    """``verify.verify_file`` on the outputs, plus every GridSample's grid and every named
    extra output, run from a verification copy of the graph on the same backend."""
    from stn_deploy.backends import create_runner
    from stn_deploy.export.verify import verify_file
    from stn_deploy.harness import EVAL_BATCH, run_batched

    report = verify_file(path, reference.outputs, images_uint8, labels, config, tol, backend)
    extra = [k for k in reference.outputs if k not in ("logits", "theta")]
    if not reference.grids and not extra:
        return report
    with tempfile.TemporaryDirectory(prefix="stn-grids-") as work:
        copy = Path(work) / "grids.onnx"
        with_grid_outputs(Path(path), copy)
        with create_runner(backend, copy) as runner:
            got = run_batched(runner, images_uint8, EVAL_BATCH)
    report.checks += _output_checks(got, reference, tol) + _grid_checks(got, reference, tol)
    return report


def as_images(images: Any, config: ModelConfig) -> np.ndarray:
    """uint8 NCHW images of the model's input shape, as numpy."""
    arr = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or tuple(arr.shape[1:]) != config.input_shape:
        c, h, w = config.input_shape
        raise StnDeployError(f"images must be uint8 (N, {c}, {h}, {w}), got {arr.dtype} "
                             f"{tuple(arr.shape)}")
    if len(arr) == 0:
        raise StnDeployError("no images")
    return np.ascontiguousarray(arr)


def random_images(config: ModelConfig, n: int = RANDOM_SAMPLES) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, *config.input_shape), generator=g,
                         dtype=torch.uint8).numpy()


def imagefolder_images(data_dir: Path, split: str, input_shape: Sequence[int],
                       samples: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An ImageFolder split at the model's size (grey: ITU-R 601 luma of the RGB files)."""
    from stn_deploy.data import load_imagefolder

    channels, size = input_shape[0], input_shape[-1]
    data = load_imagefolder(split, Path(data_dir), image_size=size)
    images = data.images
    if channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
    elif channels != 3:
        raise StnDeployError(f"{data_dir} holds RGB images, the model takes {channels} channels")
    if samples > 0:
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:samples]
        return images[idx].numpy(), data.labels[idx].numpy()
    return images.numpy(), data.labels.numpy()


# ---------------------------------------------------------------------------------- export

def export_module(model: nn.Module, out: str | os.PathLike[str], *,
                  input_shape: Sequence[int], opset: int = 17, precision: str = "fp32",
                  images: Any = None, labels: Any = None, calib_images: Any = None,
                  data_note: str = "given images", extra_outputs: Sequence[str] = (),
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  class_names: Sequence[str] | None = None, dataset: str = "custom",
                  exporter: str | None = None, static_batch: int | None = None,
                  embed_preprocess: bool = False, source: str = "",
                  echo: Callable[[str], None] = print) -> ExportResult:
    """Export, verify (outputs and grids), make the precision variant, verify it, and only
    then write ``out``. ``images``: uint8 NCHW verification images (None: random inputs,
    with a warning); ``calib_images``: INT8 calibration images [default: ``images``]."""

    import onnx

    from stn_deploy.artifacts import metadata, set_metadata
    from stn_deploy.export import precision as prec
    from stn_deploy.export.onnx_export import OnnxOptions, write_onnx
    from stn_deploy.export.pipeline import emit, move_into_place, verification_failed

    if not isinstance(model, nn.Module):
        raise StnDeployError(f"expected a torch.nn.Module, got a {type(model).__name__}")
    if precision not in TOLERANCES:
        raise StnDeployError(f"unknown precision {precision!r}; choose from "
                             f"{', '.join(TOLERANCES)}")
    target = Path(out)
    if target.is_dir():
        raise StnDeployError(f"--out {target} is a folder; give a file path")
    model = model.eval().cpu()
    logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer's pre-processing hint
    source = source or type(model).__name__
    config, found = module_config(model, input_shape, mean=mean, std=std,
                                  class_names=class_names, dataset=dataset,
                                  extra_outputs=extra_outputs)
    lines: list[str] = []
    if images is None:
        images, labels, data_note = random_images(config), None, "random inputs"
        lines.append(RANDOM_WARNING)
    images = as_images(images, config)
    labels = None if labels is None else np.asarray(labels)
    outputs = ["logits", *extra_outputs]
    options = OnnxOptions(opset=opset, static_batch=static_batch,
                          embed_preprocess=embed_preprocess, exporter=exporter)
    with tempfile.TemporaryDirectory(prefix="stn-export-") as work_dir:
        work = Path(work_dir)
        fp32 = work / "fp32.onnx"
        wrapper = ModuleWrapper(model, config, len(outputs), embed_preprocess).eval()
        with exact_affine_grid() as sizes:
            write_onnx(wrapper, config, fp32, options, outputs,
                       {"model_source": source, "precision": "fp32"})
        replaced = sorted(set(sizes))
        affine = ("F.affine_grid replaced by a constant grid and MatMul at "
                  + ", ".join(f"{h}x{w}" for h, w in replaced)) if replaced else "none"
        lines.append(f"exported {source} at opset {opset} ({found.grid_samples} grid_sample "
                     f"call(s); affine grids: {affine})")
        if not found.grid_samples:
            lines.append(NO_GRID_NOTE)
        reference = torch_outputs(model, images, config, extra_outputs)
        report = verify_module(fp32, reference, images, labels, config, TOLERANCES["fp32"])
        lines += [f"FP32 ONNX on {data_note}:", *report.lines()]
        if not report.passed:
            raise verification_failed("FP32", lines)
        final = fp32
        if precision == "fp16":
            final = prec.convert_fp16(fp32, work / "fp16.onnx")
        elif precision == "int8":
            calib = images if calib_images is None else as_images(calib_images, config)
            lines.append(f"INT8 calibration on {len(calib)} images")
            final = prec.quantize_int8(fp32, work / "int8.onnx", torch.from_numpy(calib), config)
        if precision != "fp32":
            report = verify_module(final, reference, images, labels, config,
                                   TOLERANCES[precision])
            lines += [f"{precision.upper()} ONNX (sampling path in FP32):", *report.lines()]
            if not report.passed:
                raise verification_failed(precision, lines)
        proto = onnx.load(str(final))
        meta = metadata(proto)
        meta.update(precision=precision, verification=report.to_json(), affine_grid=affine,
                    grid_samples=str(found.grid_samples),
                    normalization="given" if mean or std else "none given: pixel / 255",
                    stn_checks=("grid parity and FP32 sampling path" if found.grid_samples
                                else "not applicable: no grid_sample"),
                    verified_on=data_note)
        set_metadata(proto, meta)
        onnx.save(proto, str(final))
        move_into_place(final, target)
    lines.append(f"wrote {target}")
    emit(lines, echo)
    return ExportResult(target, target, lines, report)


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    """"0.485,0.456,0.406" -> floats (None stays None)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise StnDeployError(f"{what} {text!r}: expected comma-separated numbers") from None


def export_factory(spec: str, out: Path | None, *, input_shape: str,
                   weights: Path | None = None, data_dir: Path | None = None,
                   verify_samples: int = 0, calib_samples: int = 500,
                   echo: Callable[[str], None] = print, **options: Any) -> ExportResult:
    """``stn-deploy export --model package.module:factory``: build the model, load its
    weights, read verification (test split) and calibration (train split) images from an
    ImageFolder ``data_dir`` (None: random inputs), then ``export_module``. ``options``:
    export_module's keywords (opset, precision, mean, std, class_names, ...)."""
    from stn_deploy.defaults import EXPORT_DIR

    model = load_factory(spec)
    if weights is not None:
        load_weights(model, weights)
    shape = parse_input_shape(input_shape)
    if out is None:
        out = EXPORT_DIR / (f"{spec.rpartition(':')[2]}-opset{options.get('opset', 17)}-"
                            f"{options.get('precision', 'fp32')}.onnx")
    data: dict[str, Any] = {}
    if data_dir is not None:
        data["images"], data["labels"] = imagefolder_images(data_dir, "test", shape,
                                                            verify_samples)
        if options.get("precision") == "int8":
            data["calib_images"] = imagefolder_images(data_dir, "train", shape, calib_samples)[0]
        data.update(dataset="imagefolder", data_note=f"the test split of {data_dir}")
    return export_module(model, out, input_shape=shape, source=spec, echo=echo, **data,
                         **options)
