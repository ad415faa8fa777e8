"""Every exported graph is checked against PyTorch on real images before it counts as done.

Both sides run through the same runners and the same batched loop as ``stn-deploy bench``
(``harness.run_batched``, ``EVAL_BATCH`` images a batch): the PyTorch reference is the
``torch`` runner on the checkpoint, the ONNX file runs on the ``onnxruntime`` runner, a
TensorRT plan on the ``trt`` runner. So export and bench report the same logits for the same
file and images, and what export verified is what bench measures.

Tolerances are constants here and are printed with every result (Polygraphy style: each
metric PASSED/FAILED beside the bound it had to meet). Measured on a digits model trained for
3 epochs (86.9% accuracy; opset 17, all 450 test images): FP32 max |diff| 3.8e-6, theta 1.2e-7,
100% agreement; FP16 with the STN path in FP32: max |diff| 0.0098, 100% agreement, theta
1.2e-7; INT8 QDQ (STN in float, 500 calibration images): 98.9% agreement, drop 0.67 points
(everything quantized: 98.4%, 1.11 points, theta 4.9e-3). The bounds sit well outside those numbers and well inside "broken".

bf16 (an OpenVINO IR computed in bf16 on CPUs with AVX512_BF16 or AMX) was first bounded from
PyTorch's bf16 on the same digits model (autocast max |diff| 0.062, every op in bf16 0.134;
agreement 99.3-100%; theta 0.033 px). Measured since on a bf16 CPU (AMD EPYC Zen 4, AVX512_BF16,
OpenVINO 2026.4.1) on ``cifar10-stn`` and the 10,000 CIFAR-10 (JPEG copy) test images: max
|diff| 0.377 with the STN path in bf16 (the IR before it was marked precision-sensitive), 0.24
with it in f32 (``precision.mark_stn_path_precise``); agreement 99.1-99.5%, drop 0.00-0.08
points; the worst image's sampling points 0.044 px from PyTorch's (OpenVINO still runs the
regressor's fully connected layers in bf16). The logits bound is twice the larger max |diff|;
theta, its STN path in f32 as in FP16 and INT8 files, is held to their 0.1 px. A bf16 IR
that the runtime computes in f32 (a CPU without bf16) is held to FP32's bounds (``held_to``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stn_deploy.config import ModelConfig
from stn_deploy.data import ImageSet
from stn_deploy.errors import StnDeployError


@dataclass(frozen=True)
class Tolerances:
    """None skips a metric (INT8 logits are not expected to match elementwise)."""

    atol: float | None  # |onnx - torch| <= atol + rtol * |torch| for every logit
    rtol: float | None
    min_agreement: float  # fraction of samples whose top-1 class matches PyTorch
    # Largest shift, in pixels, that the exported theta moves any image's sampling points by
    # (RMS over the frame; health.displacement_px). A bilinear sample moved by d px changes by
    # at most d times the step between neighbouring pixels, so at 0.1 px every warped pixel
    # stays within a tenth of its local contrast of PyTorch's: the warped images agree.
    theta_px: float | None
    max_accuracy_drop: float | None = None  # percentage points, against the labels


FP32 = Tolerances(atol=1e-4, rtol=1e-4, min_agreement=1.0, theta_px=1e-3)
# The STN path stays FP32, so theta is nearly exact; the classifier runs in FP16.
FP16 = Tolerances(atol=5e-2, rtol=1e-2, min_agreement=0.99, theta_px=0.1,
                  max_accuracy_drop=1.0)
# 1.5 points: a 450-image digits test split moves in 0.22-point steps; measured drop 0.67.
INT8 = Tolerances(atol=None, rtol=None, min_agreement=0.95, theta_px=0.1,
                  max_accuracy_drop=1.5)
# bf16 rounds the classifier's layers (and the regressor's) to 8 significant bits (see above).
BF16 = Tolerances(atol=0.75, rtol=0.05, min_agreement=0.98, theta_px=0.1,
                  max_accuracy_drop=1.0)
TOLERANCES = {"fp32": FP32, "fp16": FP16, "bf16": BF16, "int8": INT8}


@dataclass
class VerifyReport:
    samples: int
    max_abs: float
    max_rel: float
    agreement: float
    theta_max_abs: float | None
    theta_max_px: float | None  # largest sampling-point shift of any image (pixels)
    theta_spread_px: float | None  # PyTorch theta's own spread across the images (pixels)
    accuracy_ref: float | None  # percent
    accuracy_onnx: float | None
    tolerances: Tolerances
    checks: list[tuple[str, str, bool]] = field(default_factory=list)  # (metric, text, ok)
    # What was verified: the runner (backend and its version) and the file's opset, as
    # written (after any rewrite for the target runtime).
    backend: str = ""
    backend_version: str = ""
    opset: int | None = None
    # The precision the runtime says it computed in (OpenVINO; None: it does not say, or an
    # INT8 graph), and what that means for the file's (a bf16 IR run in f32: not judged).
    computed: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(ok for _, _, ok in self.checks)

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_ref is None or self.accuracy_onnx is None:
            return None
        return self.accuracy_ref - self.accuracy_onnx

    def lines(self) -> list[str]:
        on = f" on {self.backend} {self.backend_version}".rstrip() if self.backend else ""
        computed = f" (computed in {self.computed})" if self.computed else ""
        out = [f"verified{on}{computed} on {self.samples} samples against PyTorch:"]
        for _, text, ok in self.checks:
            out.append(f"  {'PASSED' if ok else 'FAILED'}  {text}")
        if self.accuracy_ref is not None and self.accuracy_onnx is not None:
            out.append(f"  accuracy: PyTorch {self.accuracy_ref:.2f}%, exported "
                       f"{self.accuracy_onnx:.2f}% (drop {self.accuracy_drop:+.2f} points)")
        return out + [f"  {note}" for note in self.notes]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "checks"}
        d["passed"] = self.passed
        d["accuracy_drop"] = self.accuracy_drop
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def torch_reference(checkpoint: str | os.PathLike[str], images_uint8: np.ndarray,
                    loaded: Any = None) -> dict[str, np.ndarray]:
    """PyTorch's logits and theta on the CPU through the torch runner, as bench's reference;
    ``loaded``: the checkpoint already read."""
    from stn_deploy.backends import create_runner
    from stn_deploy.harness import EVAL_BATCH, run_batched

    with create_runner("torch", checkpoint, device="cpu", checkpoint=loaded) as runner:
        return run_batched(runner, images_uint8, EVAL_BATCH)


def verify_file(path: str | os.PathLike[str], reference: dict[str, np.ndarray],
                images_uint8: np.ndarray, labels: np.ndarray | None, config: ModelConfig,
                tolerances: Tolerances = FP32, backend: str = "onnxruntime",
                options: dict[str, Any] | None = None) -> VerifyReport:
    """Run ``path`` on ``backend`` (with runner ``options``, e.g. OpenVINO's ``compute``) and
    hold it to ``reference`` (from ``torch_reference``); accuracy when labels are given."""
    from stn_deploy.artifacts import load_onnx, model_kind, onnx_opset
    from stn_deploy.backends import create_runner
    from stn_deploy.harness import EVAL_BATCH, run_batched
    from stn_deploy.report import computes_in

    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4:
        raise StnDeployError("verification images must be uint8 NCHW")
    if len(images_uint8) == 0:
        raise StnDeployError("no verification images")
    with create_runner(backend, path, **(options or {})) as runner:
        got = run_batched(runner, images_uint8, EVAL_BATCH)
        computed = computes_in(runner.describe(), runner.precision)
        tolerances, notes = held_to(tolerances, runner.precision, computed, runner.name)
        report = compare(got, reference, labels, config, tolerances)
        report.backend, report.backend_version = runner.name, runner.version
        report.computed, report.notes = computed, notes
    if model_kind(path) == "onnx":
        report.opset = onnx_opset(load_onnx(path))
    return report


def held_to(tolerances: Tolerances, precision: str, computed: str | None,
            runtime: str) -> tuple[Tolerances, list[str]]:
    """The bounds a file of ``precision`` is held to when the runtime computed it in
    ``computed``, and a line when the two differ. A bf16 IR runs in f32 on a CPU without
    AVX512_BF16 or AMX (OpenVINO decides at compile time, the file is the same): what ran is
    f32, so it meets FP32's bounds, and bf16 itself was not judged on this CPU."""
    if precision != "bf16" or computed in (None, "bf16"):
        return tolerances, []
    from stn_deploy.harness import cpu_isa
    from stn_deploy.report import ACCELERATED_BY

    isa = ", ".join(cpu_isa()) or "no AVX2"
    return TOLERANCES.get(computed, tolerances), [
        f"bf16 not judged on this CPU ({isa}; bf16 needs "
        f"{' or '.join(ACCELERATED_BY['bf16'])}): {runtime} computed in {computed}, held to "
        f"{computed.upper()}'s bounds"]


def compare(got: dict[str, np.ndarray], reference: dict[str, np.ndarray],
            labels: np.ndarray | None, config: ModelConfig, tol: Tolerances) -> VerifyReport:
    """The checks, each PASSED/FAILED against its bound (float64, as bench's
    ``compare_outputs``, so both report the same differences)."""
    ref = np.asarray(reference["logits"], dtype=np.float64)
    out = np.asarray(got["logits"], dtype=np.float64)
    diff = np.abs(out - ref)
    max_abs = float(diff.max())
    max_rel = float((diff / np.maximum(np.abs(ref), 1e-6)).max())
    agreement = float((out.argmax(1) == ref.argmax(1)).mean())
    theta_max = theta_px = spread_px = None
    if "theta" in got and "theta" in reference:
        from stn_deploy.health import displacement_px, theta_spread_px

        got_theta = np.asarray(got["theta"], dtype=np.float64)
        ref_theta = np.asarray(reference["theta"], dtype=np.float64)
        theta_max = float(np.abs(got_theta - ref_theta).max())
        theta_px = float(displacement_px(got_theta - ref_theta, config.image_size).max())
        spread_px = theta_spread_px(ref_theta, config.image_size)
    acc_ref = acc_onnx = None
    if labels is not None and int(np.max(labels)) < ref.shape[1]:
        lab = np.asarray(labels)
        acc_ref = float((ref.argmax(1) == lab).mean() * 100)
        acc_onnx = float((out.argmax(1) == lab).mean() * 100)
    report = VerifyReport(len(ref), max_abs, max_rel, agreement, theta_max, theta_px,
                          spread_px, acc_ref, acc_onnx, tol)
    if tol.atol is not None:
        rtol = tol.rtol or 0.0
        ok = bool(np.all(diff <= tol.atol + rtol * np.abs(ref)))
        report.checks.append(("logits", f"logits: max abs {max_abs:.3g}, max rel {max_rel:.3g} "
                              f"(required |diff| <= {tol.atol:g} + {rtol:g}*|ref|)", ok))
    report.checks.append(("agreement", f"top-1 agreement {agreement * 100:.2f}% (required >= "
                          f"{tol.min_agreement * 100:.0f}%)", agreement >= tol.min_agreement))
    if theta_px is not None and spread_px is not None and tol.theta_px is not None:
        share = f"{100 * theta_px / spread_px:.2g}% of" if spread_px > 0 else "theta constant,"
        report.checks.append(("theta", f"theta: sampling points shifted by at most "
                              f"{theta_px:.2g} px = {share} theta's spread of {spread_px:.2f} px "
                              f"(max abs {theta_max:.2g}; required <= {tol.theta_px:g} px)",
                              theta_px <= tol.theta_px))
    if tol.max_accuracy_drop is not None and report.accuracy_drop is not None:
        report.checks.append(("accuracy", f"accuracy drop {report.accuracy_drop:+.2f} points "
                              f"(required <= {tol.max_accuracy_drop:g})",
                              report.accuracy_drop <= tol.max_accuracy_drop))
    return report


def verification_data(config: ModelConfig, split: str, data_dir: str | Path | None,
                      samples: int | None) -> tuple[ImageSet, str]:
    """Real images for ``config``: its own dataset, else the embedded digits (parity only:
    the exported file computes what PyTorch computes on real images, no accuracy), grey or
    as RGB, so that a model trained on data the user does not have (a shipped pretrained
    one) still exports verified. INT8 calibration (``split`` "train") on another dataset's
    RGB images would set the scales of colour photos from grey digits: refused.
    ``samples``: a seeded draw of that many (None or 0: the whole split)."""
    from stn_deploy.data import model_split

    note = f"{config.dataset} {split} split"
    name = config.dataset
    if name not in ("digits", "fashion-mnist") and data_dir is None:
        if config.in_channels != 1 and split != "test":
            raise StnDeployError(f"INT8 calibration needs real {config.dataset} images: pass "
                                 "--data-dir (or --calib-dir) with that dataset")
        grey = "" if config.in_channels == 1 else " as RGB"
        name, note = "digits", (f"embedded digits {split} split{grey} (model data not given: "
                                "parity with PyTorch only, no accuracy)")
    data = model_split(config, split, data_dir if name == config.dataset else None, name=name)
    if name != config.dataset and data.images.shape[1] == 1 and config.in_channels == 3:
        data = ImageSet(data.images.expand(-1, 3, -1, -1).contiguous(), data.labels,
                        data.classes)
    if int(data.images.shape[1]) != config.in_channels:
        raise StnDeployError(f"{note} has {data.images.shape[1]} channels, the model expects "
                             f"{config.in_channels}")
    if name != config.dataset:
        data = ImageSet(data.images, torch.full_like(data.labels, config.num_classes),
                        data.classes)  # labels of another dataset: no accuracy
    if samples:
        idx = _draw(len(data), samples)
        data = ImageSet(data.images[idx], data.labels[idx], data.classes,
                        None if data.applied is None else data.applied[idx])
    return data, note


def _draw(n: int, samples: int) -> torch.Tensor:
    """The seeded draw every sample count makes: the same images for the same count."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:samples]


# ------------------------------------------------------- images, references, user modules

@dataclass(frozen=True)
class Images:
    """uint8 NCHW images to verify or calibrate on, and where they came from (``note`` reads
    after "on": "the digits test split", "64 random inputs")."""

    images: np.ndarray
    labels: np.ndarray | None
    note: str
    applied: np.ndarray | None = None  # each image's known distortion (STN health)
    warning: str | None = None  # what verifying on these images does not prove


def subset(data: Images, samples: int | None) -> Images:
    """``samples`` of ``data`` by the seeded draw (None: all of them)."""
    if not samples or samples >= len(data.images):
        return data
    idx = _draw(len(data.images), samples).numpy()
    return Images(data.images[idx], None if data.labels is None else data.labels[idx],
                  data.note, None if data.applied is None else data.applied[idx],
                  data.warning)


def as_images(images: Any, config: ModelConfig, what: str = "images") -> np.ndarray:
    """uint8 NCHW images of the model's input shape, as numpy, or one line naming ``what``."""
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or tuple(arr.shape[1:]) != config.input_shape:
        c, h, w = config.input_shape
        raise StnDeployError(f"{what} must be uint8 (N, {c}, {h}, {w}), got {arr.dtype} "
                             f"{tuple(arr.shape)}")
    if len(arr) == 0:
        raise StnDeployError(f"{what}: no images")
    return np.ascontiguousarray(arr)


@dataclass
class Reference:
    """PyTorch's outputs on the verification images by output name, and, for a user's
    module, the grids its samplers used and the grid size each theta output made."""

    outputs: dict[str, np.ndarray]
    grids: list[np.ndarray] = field(default_factory=list)
    sampled_shapes: list[tuple[int, ...]] = field(default_factory=list)  # each sampler's input
    theta_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)


GRID_OUTPUT = "stn_deploy.grid.{}"  # the verification copy's extra outputs, one per GridSample


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


def _grid_checks(got: dict[str, np.ndarray], ref: Reference,
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


def _output_checks(got: dict[str, np.ndarray], ref: Reference,
                   tol: Tolerances) -> list[tuple[str, str, bool]]:
    """Named outputs beyond logits and theta (which ``compare`` checks): the thetas of
    several F.affine_grid calls in pixels, like theta; any other elementwise."""
    from stn_deploy.health import displacement_px

    checks = []
    for name, want in ref.outputs.items():
        if name in ("logits", "theta"):
            continue
        diff = np.asarray(got[name], np.float64) - want
        if name in ref.theta_sizes and tol.theta_px is not None:
            px = float(displacement_px(diff, max(ref.theta_sizes[name])).max())
            checks.append((name, f"{name}: sampling points shifted by at most {px:.2g} px "
                           f"(required <= {tol.theta_px:g} px)", px <= tol.theta_px))
            continue
        diff = np.abs(diff)
        if tol.atol is None:
            checks.append((name, f"{name}: max abs {diff.max():.3g} (reported; {name} has no "
                           "elementwise bound at this precision)", True))
            continue
        ok = bool(np.all(diff <= tol.atol + (tol.rtol or 0.0) * np.abs(want)))
        checks.append((name, f"{name}: max abs {diff.max():.3g} (required |diff| <= "
                       f"{tol.atol:g} + {tol.rtol or 0:g}*|ref|)", ok))
    return checks


def verify_export(path: str | os.PathLike[str], reference: Reference, data: Images,
                  config: ModelConfig, tol: Tolerances, backend: str = "onnxruntime",
                  grids: bool = True) -> VerifyReport:
    """``verify_file`` on logits and theta, plus every other named output and, with
    ``grids`` (an ONNX file), every GridSample's grid, from a verification copy of the graph
    run on the same backend. A checkpoint's reference has no grids or other outputs: its
    report is ``verify_file``'s."""
    from stn_deploy.backends import create_runner
    from stn_deploy.harness import EVAL_BATCH, run_batched

    report = verify_file(path, reference.outputs, data.images, data.labels, config, tol,
                         backend)
    extra = [k for k in reference.outputs if k not in ("logits", "theta")]
    grids = grids and bool(reference.grids or reference.sampled_shapes)
    if not grids and not extra:
        return report
    with tempfile.TemporaryDirectory(prefix="stn-grids-") as work:
        copy = Path(path)
        if grids:
            copy = Path(work) / "grids.onnx"
            with_grid_outputs(Path(path), copy)
        with create_runner(backend, copy) as runner:
            got = run_batched(runner, data.images, EVAL_BATCH)
    report.checks += _output_checks(got, reference, tol)
    if grids:
        report.checks += _grid_checks(got, reference, tol)
    return report
