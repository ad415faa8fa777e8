"""INT8 by NNCF, OpenVINO's post-training quantizer, with an STN-aware scope.

What is quantized and what is not (``stn_aware_scope``): the localization convolutions and
the classifier are quantized (they are most of the time); the regressor (the localization
net's fully connected layers, from its first Gemm/MatMul), theta, the grid and the sampler
stay float. Theta decides where every output pixel samples from, so its six numbers are the
last place to spend precision, and they cost little. Measured on a Xeon with AMX (OpenVINO,
batch 256): this scope ran 22.6-24.1k img/s with 99.3% top-1 agreement with FP32, against
~22k and 98.9% with everything quantized and 14-16k with the whole STN (the localization
convolutions too) float.

That scope is not safe for every STN: the shipped CIFAR-10 model barely moves upright photos
(theta's spread over the test split 0.39 px), and quantizing its localization convolutions
moved theta by 0.57 px there, almost six times INT8's verification bound (0.1 px), so the
export failed its theta check and wrote nothing. No partial scope helps: any one of the four
convolutions quantized alone moved theta by 0.22-0.54 px (``benchmarks/nncf_scope.py``, all
10,000 CIFAR-10 (JPEG copy) test images). So the export measures the theta shift of
the STN-aware quantization on its verification images (``theta_shift``, FP32 graph against
quantized, both on ONNX Runtime) and, when it is past the bound, quantizes once more with
the whole STN path float (``stn-float``: the nodes ONNX Runtime's quantizer keeps float,
``precision.stn_path_nodes``), and says so; the file records the scope (``nncf_scope``).

Weights are 8-bit, NNCF's default, except the first quantized convolution's: NNCF's default
overflow fix gives that layer half the range (7 bits' worth), which CPUs without VNNI need for
a layer reading signed inputs. Measured on the shipped CIFAR-10 model, whole STN path float,
on OpenVINO on an AMD EPYC Zen 3 (AVX2, no VNNI): with the fix off (all 8-bit), top-1
agreement with FP32 fell from 97.3% to 89.9% on held-out training images; with it on every
layer, no change.

NNCF is imported lazily; ``request._nncf_ready`` has already refused its absence by name.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError
from stn_deploy.fileio import atomic_path

FLOAT_STAGES = ("theta", "grid", "sampler")
# What NNCF leaves float: the regressor, theta, grid and sampler (``stn_aware_scope``), or the
# whole STN path, the localization convolutions too (``precision.stn_path_nodes``).
SCOPES = ("stn-aware", "stn-float")
REGRESSOR_OPS = ("Gemm", "MatMul")
VALIDATION_SHARE = 0.5  # of the verification images, held out for accuracy control
# NNCF's full BiasCorrection, not its default FastBiasCorrection. Measured on the shipped
# CIFAR-10 model (whole STN path float, 500 calibration images, OpenVINO with f32 float parts):
# top-1 agreement with FP32 on 5,000 held-out training images rose from 97.3-97.6% to
# 99.4-99.5% over four calibration draws (test split: 97.2% -> 99.2%, accuracy drop 0.50 ->
# 0.16 points). The fast variant moved the classifier's biases about ten times as far as the
# full one (features.11: 0.015 against 0.0005 on average); no bias correction at all scored
# 99.3-99.4%. MIXED preset, 300 or 1,000 images, quantile or min-max ranges, the first or last
# convolution float: none beat 97.5% with the fast variant. The full one costs a few seconds.
FAST_BIAS_CORRECTION = False


@dataclass
class NncfResult:
    """What NNCF wrote: the file, the nodes it was told to leave float, and, under accuracy
    control, the nodes it kept float itself and the accuracy it reached (percent)."""

    path: Path
    ignored: list[str]
    kept_float: list[str] = field(default_factory=list)
    accuracy_fp32: float | None = None
    accuracy_int8: float | None = None

    @property
    def drop(self) -> float | None:
        if self.accuracy_fp32 is None or self.accuracy_int8 is None:
            return None
        return self.accuracy_fp32 - self.accuracy_int8


def stn_aware_scope(model: onnx.ModelProto) -> list[str]:
    """The nodes NNCF leaves float: the regressor, theta, the grid and the sampler (node
    names as ``precision.name_nodes`` gives them; stages from ``debug.stages``)."""
    from stn_deploy.debug.stages import assign_stages

    stages = assign_stages(model)
    keep = set(stages.nodes_in(*FLOAT_STAGES))
    regressor = False
    for name in stages.nodes_in("localization"):  # topological order
        regressor = regressor or stages.op_type[name] in REGRESSOR_OPS
        if regressor:
            keep.add(name)
    return [n for n in stages.order if n in keep]


def float_scope(model: onnx.ModelProto, scope: str) -> list[str]:
    """The nodes NNCF leaves float under ``scope`` (one of SCOPES)."""
    from stn_deploy.export.precision import stn_path_nodes

    if scope not in SCOPES:
        raise StnDeployError(f"unknown NNCF scope {scope!r}: one of {', '.join(SCOPES)}")
    return stn_aware_scope(model) if scope == "stn-aware" else stn_path_nodes(model)


def _feeds(model: onnx.ModelProto, images: np.ndarray, config: ModelConfig) -> list[np.ndarray]:
    """The graph's input batches for uint8 NCHW ``images``: normalised NCHW, or uint8 NHWC
    for a graph with embedded preprocessing; the graph's static batch, else 32."""
    import torch

    from stn_deploy.data import normalize

    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    step = dim.dim_value if dim.HasField("dim_value") else 32
    embed = model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    stop = len(images) - step + 1 if dim.HasField("dim_value") else len(images)
    out = []
    for start in range(0, max(stop, 0), step):
        chunk = torch.from_numpy(images[start:start + step])
        x = chunk.permute(0, 2, 3, 1).contiguous() if embed else normalize(chunk, config)
        out.append(x.numpy())
    if not out:
        raise StnDeployError(f"{len(images)} calibration images; the graph's static batch needs "
                             f"at least {step}")
    return out


def quantize_nncf(src: Path, dst: Path, calib_images: np.ndarray, config: ModelConfig, *,
                  keep_float: Sequence[str] = (), scope: str = "stn-aware") -> NncfResult:
    """NNCF post-training INT8 of the FP32 graph ``src``, calibrated on ``calib_images``
    (uint8 NCHW), ``scope``'s nodes and ``keep_float`` left float."""
    import nncf

    model, ignored = _prepared(src, keep_float, scope)
    feeds = _feeds(model, calib_images, config)
    name = model.graph.input[0].name
    dataset = nncf.Dataset(feeds, lambda x: {name: x})
    with _no_progress_bars(), _unique_extraction_names():
        q = nncf.quantize(model, dataset, subset_size=len(calib_images),
                          fast_bias_correction=FAST_BIAS_CORRECTION,
                          ignored_scope=nncf.IgnoredScope(names=ignored))
    _save(model, _keep_float(q, keep_float, model), dst)
    return NncfResult(Path(dst), ignored)


def _keep_float(q: onnx.ModelProto, keep_float: Sequence[str],
                fp32: onnx.ModelProto) -> onnx.ModelProto:
    """Ignored nodes may still read a tensor NNCF quantized for another consumer: route the
    ``keep_float`` nodes around those pairs (the scope's own nodes read float already)."""
    from stn_deploy.export.precision import float_inputs

    if keep_float:
        float_inputs(q, keep_float, fp32)
    return q


def _prepared(src: Path, keep_float: Sequence[str],
              scope: str) -> tuple[onnx.ModelProto, list[str]]:
    from stn_deploy.export.precision import check_keep_float, name_nodes

    _quiet_nncf()
    model = onnx.load(str(src))
    name_nodes(model)
    check_keep_float(model, keep_float)
    constants_to_initializers(model)  # before the scope: NNCF refuses names not in the graph
    ignored = float_scope(model, scope)
    return model, ignored + [n for n in keep_float if n not in ignored]


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Constant nodes holding a tensor become initializers: NNCF's accuracy control reads
    every MatMul's constant operand as an initializer (the grid's base grid is a Constant)."""
    for node in [n for n in model.graph.node if n.op_type == "Constant"]:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if value is None or len(node.attribute) != 1:
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value.t)
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)


def _save(model: onnx.ModelProto, q: onnx.ModelProto, dst: Path) -> None:
    from stn_deploy.artifacts import metadata, set_metadata

    set_metadata(q, {**metadata(model), "precision": "int8"})
    with atomic_path(dst) as tmp:
        onnx.save(q, str(tmp))


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """NNCF draws its progress bars on stdout (rich): the export's output is its own. What
    NNCF itself raises becomes one line."""
    from stn_deploy.errors import error_line

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            yield
        except StnDeployError:
            raise
        except Exception as e:  # NNCF's errors share no base class
            raise StnDeployError(f"NNCF could not quantize the graph: "
                                 f"{error_line(e, with_type=True)}") from None


@contextlib.contextmanager
def _unique_extraction_names() -> Iterator[None]:
    """While NNCF runs, ``onnx.utils.Extractor.extract_model`` takes each input and output
    name once (order kept); restored on exit, error or not. The one patch of a third-party
    function in the package, for an NNCF bug: full BiasCorrection cuts a sub-model out of
    the graph to correct a layer's bias and lists its inputs once per consumer. An STN's
    input tensor feeds both the first localization convolution and the sampler, so with one
    localization convolution quantized and the others float (``keep_float``) the sub-model
    names the input twice, and ONNX Runtime refuses it ("Duplicate definition-site for
    (input)"). Measured on the seed localization net: any one of its four convolutions
    alone triggers it; two or more of them, all of them, or none (the two scopes as they
    are) do not."""
    from onnx.utils import Extractor

    original = Extractor.extract_model

    def extract_model(self: Extractor, input_names: list[str],
                      output_names: list[str]) -> onnx.ModelProto:
        return original(self, list(dict.fromkeys(input_names)),
                        list(dict.fromkeys(output_names)))

    Extractor.extract_model = extract_model  # type: ignore[method-assign]
    try:
        yield
    finally:
        Extractor.extract_model = original  # type: ignore[method-assign]


def _quiet_nncf() -> None:
    """NNCF logs every node it skips and draws progress bars: the export prints its own."""
    import logging

    logging.getLogger("nncf").setLevel(logging.ERROR)


# ------------------------------------------------------------------------- theta's shift

@dataclass(frozen=True)
class ThetaShift:
    """How far a quantized graph's theta moved from the FP32 graph's, in pixels."""

    moved_px: float  # the largest over the images (health.displacement_px, as verify's check)
    spread_px: float  # FP32 theta's own spread over the same images (health.theta_spread_px)
    images: int


def theta_shift(fp32: Path, quantized: Path, images: np.ndarray,
                config: ModelConfig) -> ThetaShift | None:
    """Theta's shift from the FP32 graph ``fp32`` to ``quantized`` on ``images`` (uint8 NCHW),
    both on ONNX Runtime; None for a graph without a theta (no (N, 2, 3) tensor feeding a
    sampler). Theta is found by ``debug.stages`` in the FP32 graph, so the graph needs no
    theta output; every theta of a multi-pass STN counts."""
    from stn_deploy.debug.stages import assign_stages
    from stn_deploy.health import displacement_px, theta_spread_px

    model = onnx.load(str(fp32))
    names = assign_stages(model).theta_tensors
    if not names:
        return None
    feeds = _feeds(model, images, config)
    want = _outputs(model, names, feeds)
    got = _outputs(onnx.load(str(quantized)), names, feeds)
    moved = max(float(displacement_px(got[n] - want[n], config.image_size).max())
                for n in names)
    spread = max(theta_spread_px(want[n], config.image_size) for n in names)
    return ThetaShift(moved, spread, len(want[names[0]]))


def _outputs(model: onnx.ModelProto, names: list[str],
             feeds: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors ``names`` over all ``feeds`` (float64), read as debug compare reads them
    (a copy of the graph with them as outputs, ``debug.taps``)."""
    from stn_deploy.debug.taps import OrtTaps

    taps = OrtTaps(model, names, "the theta check's copy of the graph")
    name = model.graph.input[0].name
    runs = [taps.run({name: feed}) for feed in feeds]
    return {n: np.concatenate([r[n] for r in runs]).astype(np.float64) for n in names}


# ------------------------------------------------------------------------ accuracy control

def quantize_nncf_controlled(src: Path, dst: Path, calib_images: np.ndarray,
                             images: np.ndarray, labels: np.ndarray, config: ModelConfig,
                             max_drop: float, grid_px: float, *,
                             keep_float: Sequence[str] = (),
                             scope: str = "stn-aware") -> NncfResult:
    """``nncf.quantize_with_accuracy_control`` on a held-out split (``images``/``labels``,
    uint8 NCHW): NNCF returns quantized layers to float, most damaging first, until top-1
    accuracy is within ``max_drop`` points of FP32's. The metric also holds the STN: a
    variant whose sampling grid moves by more than ``grid_px`` pixels from FP32's on any
    image scores 0, so NNCF keeps reverting layers (theta's shift as the sampler feels it,
    the verification's own bound; rotation undone would need the distorted test split
    and a health run per candidate, too costly inside the search). ``scope``: the nodes left
    float from the start (the export picks it from the plain quantization's theta shift:
    NNCF ranks layers to revert by accuracy alone, so it may spend its iterations on the
    classifier before it reaches a localization convolution). Raises when the budget cannot
    be met, saying what was reached; writes nothing then."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    model, ignored = _prepared(src, keep_float, scope)
    name = model.graph.input[0].name
    calib = nncf.Dataset(_feeds(model, calib_images, config), lambda x: {name: x})
    one = [(x[None], int(y)) for x, y in zip(images, labels)]
    items = [(feed, y) for (x, y) in one for feed in _feeds(_dynamic(model), x, config)]
    validation = nncf.Dataset(items, lambda item: {name: item[0]})
    reference = _grids(model, [f for f, _ in items])
    score = _metric(reference, grid_px)
    with _no_progress_bars(), _unique_extraction_names():
        q = nncf.quantize_with_accuracy_control(
            model, calib, validation, score, max_drop=max_drop / 100.0,
            subset_size=len(calib_images), fast_bias_correction=FAST_BIAS_CORRECTION,
            ignored_scope=nncf.IgnoredScope(names=ignored),
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=8))
    fp32_acc, _ = score(model, items)
    int8_acc, _ = score(q, items)
    result = NncfResult(Path(dst), ignored, _kept_float(model, q, ignored), 100 * fp32_acc,
                        100 * int8_acc)
    if result.drop is not None and result.drop > max_drop + 1e-9:
        raise StnDeployError(
            f"max accuracy drop {max_drop:g} points not reached: the best NNCF found drops "
            f"{result.drop:.2f} points ({result.accuracy_fp32:.2f}% -> "
            f"{result.accuracy_int8:.2f}%, or its grid moved more than {grid_px:g} px) with "
            f"{len(result.kept_float)} layers float, on {len(items)} held-out images; "
            "nothing written")
    _save(model, _keep_float(q, keep_float, model), dst)
    return result


def _dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Only its input's type matters to ``_feeds``: one image a batch."""
    copy = onnx.ModelProto()
    copy.graph.input.add().CopyFrom(model.graph.input[0])
    copy.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    return copy


def _grids(model: onnx.ModelProto, feeds: list[np.ndarray]) -> list[np.ndarray]:
    """Every GridSample's grid for each feed (the model made to output them)."""
    runs = _run_with_grids(model, feeds)
    return [grids for _, grids in runs]


def _run_with_grids(model: onnx.ModelProto,
                    feeds: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(logits, the first GridSample's grid) for each feed, on ONNX Runtime."""
    import onnxruntime as ort

    from stn_deploy.export.verify import with_grid_outputs

    with tempfile.TemporaryDirectory(prefix="stn-nncf-") as work:
        src, dst = Path(work) / "m.onnx", Path(work) / "grids.onnx"
        onnx.save(model, str(src))
        with_grid_outputs(src, dst)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sess = ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    name = sess.get_inputs()[0].name
    grid = next((i for i, n in enumerate(names) if n.startswith("stn_deploy.grid.")), None)
    out = []
    for feed in feeds:
        got = sess.run(None, {name: feed})
        out.append((got[0], got[grid] if grid is not None else np.zeros(1, np.float32)))
    return out


def _metric(reference: list[np.ndarray], grid_px: float
            ) -> Callable[[onnx.ModelProto, Any], tuple[float, list[float]]]:
    """NNCF's validation function: top-1 accuracy (a fraction), 0 when any image's grid
    moved by more than ``grid_px`` pixels; and each image's correctness."""

    def score(model: onnx.ModelProto, items: Any) -> tuple[float, list[float]]:
        items = list(items)
        runs = _run_with_grids(model, [feed for feed, _ in items])
        correct = [float(logits.argmax(1)[0] == y) for (logits, _), (_, y) in zip(runs, items)]
        shift = 0.0
        if len(items) == len(reference):
            for (_, grid), want in zip(runs, reference):
                h, w = (grid.shape[1], grid.shape[2]) if grid.ndim == 4 else (1, 1)
                d = np.abs(grid.astype(np.float64) - want)
                if d.ndim == 4:
                    shift = max(shift, float((d[..., 0] * w / 2).max()),
                                float((d[..., 1] * h / 2).max()))
        accuracy = float(np.mean(correct)) if correct else 0.0
        return (accuracy if shift <= grid_px else 0.0), correct
    return score


def _kept_float(model: onnx.ModelProto, q: onnx.ModelProto, ignored: list[str]) -> list[str]:
    """The nodes NNCF's plain quantization would quantize that the controlled result left
    float: compute nodes with a DequantizeLinear input, outside ``ignored``."""
    reads_dq = _reads_dequantized(q)
    return [n.name for n in model.graph.node
            if n.name not in ignored and n.op_type in _QUANTIZABLE and n.name not in reads_dq]


_QUANTIZABLE = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def _reads_dequantized(model: onnx.ModelProto) -> set[str]:
    producer = {o: n for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node
            if any(getattr(producer.get(i), "op_type", "") == "DequantizeLinear"
                   for i in n.input)}


def held_out(images: np.ndarray, labels: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray]:
    """The accuracy-control split: every other verification image (VALIDATION_SHARE). The
    search tunes on these; the verification that follows runs on all the images, half of
    them unseen by the search (so its accuracy drop is not only the search's own figure)."""
    if labels is None:
        raise StnDeployError("accuracy control needs labelled images (the model's dataset, "
                             "--data-dir, or labels=)")
    step = int(round(1 / VALIDATION_SHARE))
    return images[::step], labels[::step]


def is_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nncf") is not None


__all__ = ["SCOPES", "NncfResult", "ThetaShift", "float_scope", "held_out", "is_available",
           "quantize_nncf", "quantize_nncf_controlled", "stn_aware_scope", "theta_shift"]
