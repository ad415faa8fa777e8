"""What ``stn-deploy export`` and ``stn_deploy.export_model`` ask for, and what it resolves
to: ``ExportRequest`` (every option, the same names for both callers), its refusals by name
(``OptionError``), the model it names (a ``sources`` Source) and the ``Plan`` the pipeline
runs.

An option is honoured for both sources or refused here, before any work, with one line that
names it as its caller spelled it (``--calib-dir`` or ``calib_dir=``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stn_deploy.defaults import EXPORT_DIR
from stn_deploy.errors import StnDeployError
from stn_deploy.names import DEFAULT_PRECISION, PRECISIONS, canonical

if TYPE_CHECKING:
    from stn_deploy.export.onnx_export import OnnxOptions
    from stn_deploy.export.sources import Source

FORMATS = ("onnx", "trt", "openvino")
QUANTIZERS = ("onnxruntime", "nncf")
# What each target's INT8 is quantized with by default. NNCF places its QDQ pairs where
# OpenVINO's CPU plugin fuses them (measured on a Xeon with AMX: NNCF INT8 ~22k img/s against
# 12.9k for ONNX Runtime's QDQ placement, both on OpenVINO); ONNX Runtime's quantizer is made
# for ONNX Runtime, and TensorRT needs its symmetric, float-bias QDQ.
DEFAULT_QUANTIZER = {"openvino": "nncf", "onnxruntime": "onnxruntime", "trt": "onnxruntime"}
NNCF_INSTALL = "pip install 'stn-deploy[int8]'"
# bf16 is OpenVINO's: its IR keeps FP32 weights and says bf16 in its metadata, and the CPU
# plugin computes in bf16 when it compiles the IR on a CPU with AVX512_BF16 or AMX. An ONNX
# file or TensorRT plan has no such CPU path here.
BF16_FORMAT = "openvino"
CALIB_SAMPLES = 500
TRT_PROFILE = (1, 32, 256)
WORKSPACE_MB = 1024
ALL = "all"
# What a user's module is told with; a checkpoint carries each fact itself.
MODULE_ONLY = {
    "input_shape": "its input shape", "mean": "its normalisation", "std": "its normalisation",
    "class_names": "its class names", "weights": "its weights", "dataset": "its dataset",
    "extra_outputs": "its outputs (logits, and theta when asked for)",
}
CLI_SPELLING = {"checkpoint": "CHECKPOINT", "extra_outputs": "--extra-output"}


class OptionError(StnDeployError):
    """An option refused by name (a conflict, or one this model cannot honour); the command
    reports it as a usage error (exit 2)."""


@dataclass
class ExportRequest:
    """Every export option, as ``stn-deploy export`` and ``export_model`` both take them (the
    same names); None means the default, resolved by ``resolve``. Paths may arrive as
    strings, sequences as lists, sample counts as ``"all"``: ``__post_init__`` gives each its
    one form."""

    # The model: a checkpoint, a shipped one by name, or a user's module (CLI: --factory;
    # API: the module itself).
    checkpoint: Path | None = None
    pretrained: str | None = None  # a name in stn_deploy.pretrained: its shipped checkpoint
    factory: str | None = None  # PACKAGE.MODULE:FACTORY
    module: Any = None  # an nn.Module (API)
    weights: Path | None = None
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    extra_outputs: tuple[str, ...] = ()
    dataset: str | None = None
    # What to write.
    format: str = "onnx"  # onnx | trt
    precision: str = DEFAULT_PRECISION
    opset: int = 17
    out: Path | None = None
    static_batch: int | None = None
    with_theta: bool = False
    embed_preprocess: bool = False
    exporter: str | None = None
    affine_grid_op: bool = False
    target: str | None = None  # None: the format's runtime (trt, openvino), else onnxruntime
    # Precision variants.
    keep_float: Path | tuple[str, ...] | None = None  # debug precision's JSON, or node names
    quantizer: str | None = None  # int8: None: DEFAULT_QUANTIZER[target]
    max_accuracy_drop: float | None = None  # int8 + nncf: accuracy-controlled quantization
    # What to verify and calibrate on.
    data_dir: Path | None = None
    calib_dir: Path | None = None
    verify_samples: int | None = None  # None: all
    calib_samples: int | None = CALIB_SAMPLES  # None: all
    images: Any = None  # uint8 NCHW (API)
    labels: Any = None
    calib_images: Any = None
    # The TensorRT build.
    trt_profile: tuple[int, int, int] | None = None  # None: TRT_PROFILE, or the static batch
    workspace_mb: int | None = None  # None: WORKSPACE_MB
    timing_cache: Path | None = None
    caller: str = "cli"  # how errors spell an option: "cli" (--calib-dir) or "api" (calib_dir=)

    def __post_init__(self) -> None:
        """One form for what both callers may spell differently: paths, tuples, ``all``,
        and the old names of trt (``engine``, ``tensorrt``)."""
        for name in ("format", "target", "precision", "quantizer"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, canonical(value))
        for name in ("checkpoint", "weights", "out", "data_dir", "calib_dir", "timing_cache"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        for name in ("verify_samples", "calib_samples"):
            if str(getattr(self, name)).lower() == ALL:
                setattr(self, name, None)
        if isinstance(self.keep_float, (str, os.PathLike)):
            self.keep_float = Path(self.keep_float)
        elif self.keep_float is not None:
            self.keep_float = tuple(self.keep_float)
        if isinstance(self.extra_outputs, str):  # one name, not its letters
            self.extra_outputs = (self.extra_outputs,)
        for name in ("input_shape", "mean", "std", "class_names", "extra_outputs",
                     "trt_profile"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                setattr(self, name, tuple(value))

    def spell(self, name: str) -> str:
        """Option ``name`` as the caller typed it: ``--calib-dir``, or ``calib_dir=``."""
        if self.caller == "api":
            return "model=" if name in ("checkpoint", "module") else f"{name}="
        return CLI_SPELLING.get(name, "--" + name.replace("_", "-"))

    def spell_as(self, name: str, value: object) -> str:
        """``--opset 19``, or ``opset=19``."""
        if self.caller == "api":
            return f"{name}={value!r}"
        return f"{self.spell(name)} {value}"


@dataclass(frozen=True)
class Plan:
    """The request resolved: what is written, where, and how."""

    format: str
    target: str
    precision: str
    out: Path | None
    onnx: "OnnxOptions"
    trt_profile: tuple[int, int, int]
    workspace_mb: int
    timing_cache: Path | None
    quantizer: str | None = None  # int8 only
    max_accuracy_drop: float | None = None

    @property
    def path(self) -> Path:
        """The output file (``fit_source`` always chooses one)."""
        if self.out is None:
            raise StnDeployError("no output path was chosen")
        return self.out


# ------------------------------------------------------------------------ options -> plan

def resolve(req: ExportRequest) -> Plan:
    """The options on their own: names canonical, defaults filled, conflicts refused."""
    from stn_deploy.export.onnx_export import OnnxOptions

    fmt = req.format
    if fmt not in FORMATS:
        raise OptionError(f"{req.spell('format')} {req.format!r}: choose from "
                          f"{', '.join(FORMATS)}")
    precision = req.precision
    if precision not in PRECISIONS:  # every one (bf16: BF16_FORMAT only)
        raise OptionError(f"{req.spell('precision')} {req.precision!r}: choose from "
                          f"{', '.join(PRECISIONS)}")
    target = _target(req, fmt)
    for name, why in _conflicts(req, fmt, precision, target):
        raise OptionError(f"{req.spell(name)}: {why}")
    onnx = OnnxOptions(opset=req.opset, static_batch=req.static_batch,
                       with_theta=req.with_theta, embed_preprocess=req.embed_preprocess,
                       exporter=req.exporter, affine_grid_op=req.affine_grid_op)
    batch = req.static_batch
    profile = req.trt_profile or ((batch, batch, batch) if batch else TRT_PROFILE)
    if fmt == "trt":
        _tensorrt_ready(req)
    quantizer = (req.quantizer or DEFAULT_QUANTIZER[target]) if precision == "int8" else None
    if quantizer == "nncf":
        _nncf_ready(req)
    return Plan(fmt, target, precision, req.out, onnx, profile,
                req.workspace_mb or WORKSPACE_MB, req.timing_cache, quantizer,
                req.max_accuracy_drop)


def _target(req: ExportRequest, fmt: str) -> str:
    from stn_deploy.export.targets import TARGETS

    if req.target is None:
        return fmt if fmt in ("trt", "openvino") else "onnxruntime"
    target = req.target
    if target not in TARGETS:
        raise OptionError(f"{req.spell('target')} {req.target!r}: choose from "
                          f"{', '.join(TARGETS)}")
    return target


def _conflicts(req: ExportRequest, fmt: str, precision: str,
               target: str) -> Iterator[tuple[str, str]]:
    """(option, why) for every option that cannot mean anything with the others."""
    from stn_deploy.export.onnx_export import affine_grid_op_problem

    for name in ("static_batch", "verify_samples", "calib_samples", "workspace_mb"):
        value = getattr(req, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            yield name, f"{value!r}: give a positive number" + (" or all" if "samples" in name
                                                                  else "")
    if precision != "int8":
        int8 = req.spell_as("precision", "int8")
        for name in ("calib_dir", "calib_images"):
            if getattr(req, name) is not None:
                yield name, f"calibration images are read only with {int8}"
        if req.calib_samples != CALIB_SAMPLES:
            yield "calib_samples", f"calibration images are read only with {int8}"
    if fmt != "trt":
        for name in ("trt_profile", "workspace_mb", "timing_cache"):
            if getattr(req, name) is not None:
                yield name, f"only {req.spell_as('format', 'trt')} builds a TensorRT engine"
    problem = check_trt_profile(req.trt_profile, req.static_batch)
    if problem:
        yield "trt_profile", problem
    yield from _precision_conflicts(req, fmt, precision, target)
    if fmt == "openvino" and target != "openvino":
        yield "target", (f"{req.spell_as('format', 'openvino')} writes OpenVINO IR, which only "
                         f"openvino runs, not {target}")
    if fmt == "openvino" and precision == "fp16" and req.keep_float is not None:
        yield "keep_float", ("OpenVINO's FP16 IR stores weights in FP16 and computes in f32 on "
                             f"the CPU: no node to keep; use {req.spell_as('format', 'onnx')}")
    if fmt == "openvino" and req.out is not None and req.out.suffix.lower() != ".xml":
        yield "out", (f"{req.spell_as('format', 'openvino')} writes FILE.xml and FILE.bin: "
                      "name the .xml")
    if fmt == "trt" and target != "trt":
        yield "target", f"{req.spell_as('format', 'trt')} builds for trt only, not {target}"
    if fmt == "onnx" and target == "trt" and req.opset >= 20:
        yield "target", (f"TensorRT reads opset-{req.opset} GridSample 'linear' as nearest "
                         f"(NVIDIA/TensorRT#4646): pass {req.spell_as('opset', 19)}")
    if req.affine_grid_op:
        problem = affine_grid_op_problem(req.opset)
        if problem:
            yield "affine_grid_op", f"{problem}; pass {req.spell_as('opset', 20)} or drop it"
        if target == "trt":
            yield "affine_grid_op", "TensorRT's ONNX parser has no AffineGrid op"
    if req.images is not None and req.data_dir is not None:
        yield "data_dir", f"{req.spell('images')} are given: verify on one or the other"
    if req.labels is not None and req.images is None:
        yield "labels", f"labels go with {req.spell('images')}"
    if req.calib_images is not None and req.calib_dir is not None:
        yield "calib_dir", (f"{req.spell('calib_images')} are given: calibrate on one or the "
                            "other")


def _precision_conflicts(req: ExportRequest, fmt: str, precision: str,
                         target: str) -> Iterator[tuple[str, str]]:
    """bf16 against the format; --keep-float, --quantizer and --max-accuracy-drop against the
    precision and target."""
    bf16_ir = req.spell_as("format", BF16_FORMAT)
    if precision == "bf16" and fmt != BF16_FORMAT:
        yield "precision", (f"bf16 is OpenVINO's CPU precision (an IR that it computes in "
                            f"bf16 on CPUs with AVX512_BF16 or AMX), which "
                            f"{req.spell_as('format', fmt)} does not write: use {bf16_ir}")
    if precision == "bf16" and req.keep_float is not None:
        yield "keep_float", ("OpenVINO chooses bf16 for the whole graph when it compiles the IR: "
                             f"no node to keep; nodes are kept float with "
                             f"{req.spell_as('precision', 'fp16')} or int8")
    if req.keep_float is not None and precision == "fp32":
        yield "keep_float", (f"an FP32 graph is all float; nodes are kept float with "
                             f"{req.spell_as('precision', 'fp16')} or int8")
    int8 = req.spell_as("precision", "int8")
    if req.quantizer is not None:
        if precision != "int8":
            yield "quantizer", f"only {int8} is quantized"
        elif req.quantizer not in QUANTIZERS:
            yield "quantizer", f"{req.quantizer!r}: choose from {', '.join(QUANTIZERS)}"
    drop = req.max_accuracy_drop
    if drop is not None:
        quantizer = req.quantizer or DEFAULT_QUANTIZER.get(target)
        if precision != "int8" or quantizer != "nncf":
            yield "max_accuracy_drop", (f"accuracy-controlled quantization is NNCF's: it needs "
                                        f"{int8} and {req.spell_as('quantizer', 'nncf')}")
        elif not isinstance(drop, (int, float)) or not 0 < drop < 100:
            yield "max_accuracy_drop", f"{drop!r}: give accuracy points, e.g. 0.5"
        elif req.static_batch is not None:
            yield "max_accuracy_drop", (f"accuracy control runs one image at a time; drop "
                                        f"{req.spell('static_batch')} or export it after")


def _nncf_ready(req: ExportRequest) -> None:
    """Fail before any work when NNCF is not installed, naming the extra and the other
    quantizer (never a silent switch to it)."""
    import importlib.util

    if importlib.util.find_spec("nncf") is None:
        raise StnDeployError(f"{req.spell_as('quantizer', 'nncf')} needs nncf, not installed: "
                             f"{NNCF_INSTALL} (or {req.spell_as('quantizer', 'onnxruntime')})")


def parse_trt_profile(text: str) -> tuple[int, int, int]:
    """"1,32,256" -> (1, 32, 256), or StnDeployError saying what MIN,OPT,MAX needs."""
    try:
        lo, opt, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise StnDeployError(f"{text!r}: expected MIN,OPT,MAX, e.g. 1,32,256") from None
    problem = check_trt_profile((lo, opt, hi), None)
    if problem:
        raise StnDeployError(problem)
    return lo, opt, hi


def check_trt_profile(profile: tuple[int, ...] | None, static_batch: int | None) -> str | None:
    """Why a TensorRT batch profile cannot be built (None: it can)."""
    if profile is None:
        return None
    if len(profile) != 3 or not all(isinstance(v, int) for v in profile):
        return f"{profile!r}: expected three batch sizes MIN,OPT,MAX"
    lo, opt, hi = profile
    if not 1 <= lo <= opt <= hi:
        return f"{lo},{opt},{hi}: needs 1 <= MIN <= OPT <= MAX"
    if static_batch is not None and tuple(profile) != (static_batch,) * 3:
        return (f"{lo},{opt},{hi} does not fit the static batch {static_batch}: give "
                f"{static_batch},{static_batch},{static_batch} or leave it out")
    return None


def _tensorrt_ready(req: ExportRequest) -> None:
    """Fail before any work when TensorRT cannot build here."""
    from stn_deploy.export.tensorrt import cuda_device, import_tensorrt, trt_major

    try:
        trt_major(import_tensorrt())
        cuda_device()
    except StnDeployError as e:
        raise StnDeployError(f"{req.spell_as('format', 'trt')}: {e}") from None


# ------------------------------------------------------------------------------- sources

def open_source(req: ExportRequest) -> "Source":
    """The checkpoint or the user's module the request names, with what a checkpoint carries
    itself refused by name."""
    from stn_deploy.export.sources import CheckpointSource

    named = [n for n in ("checkpoint", "pretrained", "factory", "module")
             if getattr(req, n) is not None]
    if len(named) != 1:
        which = (f"{req.spell('checkpoint')}, {req.spell('pretrained')} or "
                 f"{req.spell('factory')}")
        given = " and ".join(map(req.spell, named))
        raise OptionError(f"give one model to export ({which}), "
                          f"{'not ' + given if named else 'none was given'}")
    if req.checkpoint is None and req.pretrained is None:
        return _module_source(req, named[0])
    for name, what in MODULE_ONLY.items():
        if getattr(req, name) not in (None, ()):
            raise OptionError(f"{req.spell(name)}: a checkpoint carries {what}; "
                              f"{req.spell(name)} is for a user's module")
    if req.pretrained is not None:
        from stn_deploy.pretrained import pretrained

        return CheckpointSource.load(pretrained(req.pretrained).checkpoint)
    return CheckpointSource.load(req.checkpoint)


def _module_source(req: ExportRequest, named: str) -> "Source":
    import copy

    from stn_deploy.export.sources import ModuleSource
    from stn_deploy.export.user_module import load_factory, load_weights

    shape = req.input_shape
    if shape is None:
        raise OptionError(f"{req.spell(named)} needs {req.spell('input_shape')} CxHxW, "
                          "e.g. 1x28x28")
    if len(shape) != 3 or not all(isinstance(v, int) and v >= 1 for v in shape):
        raise OptionError(f"{req.spell('input_shape')} {shape!r}: expected (C, H, W)")
    for name in ("mean", "std"):
        values = getattr(req, name)
        if values is not None and len(values) != shape[0]:
            raise OptionError(f"{req.spell(name)}: {len(values)} values for {shape[0]} "
                              "channel(s)")
    if req.module is not None:
        model = copy.deepcopy(req.module) if req.weights is not None else req.module
    else:
        model = load_factory(str(req.factory), req.spell("factory"))
    if req.weights is not None:
        load_weights(model, req.weights)
    dataset = req.dataset or ("imagefolder" if req.data_dir else "custom")
    return ModuleSource.build(model, shape, name=req.factory or type(model).__name__,
                              mean=req.mean, std=req.std, class_names=req.class_names,
                              dataset=dataset, extra_outputs=req.extra_outputs)


def fit_source(req: ExportRequest, plan: Plan, source: "Source") -> Plan:
    """The options this source cannot honour, refused by name; the default output path."""
    for name, why in source.unsupported(req).items():
        raise OptionError(f"{req.spell(name)}: {why}")
    out = plan.out or default_out(source.default_name, plan.onnx.opset, plan.precision,
                                  plan.format)
    if out.is_dir():
        raise StnDeployError(f"{req.spell('out')} {out} is a folder; give a file path")
    return dataclasses.replace(plan, out=out)


def default_out(name: str, opset: int, precision: str, fmt: str,
                root: Path = EXPORT_DIR) -> Path:
    suffix = {"trt": ".plan", "openvino": ".xml"}.get(fmt, ".onnx")
    return root / f"{name}-opset{opset}-{precision}{suffix}"
