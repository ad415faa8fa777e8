"""Does lower precision pay? INT8 and bf16 against FP32, judged on the precision targets, in one
run: every artifact from the product's one export pipeline, every speed row from the one
harness, every target judged for the ISA of the CPU it ran on.

    python benchmarks/precision_targets.py --checkpoint runs/cifar10-stn/last.pt \\
        --data-dir ~/.cache/stn-deploy/cifar10-jpeg       # the real figures (quiet machine)
    python benchmarks/precision_targets.py --checkpoint digits/last.pt --quick
                                                         # proves the script works

Variants (each ``stn_deploy.export.pipeline.run_export`` with the theta output, verified on the
evaluation images, so each report gives accuracy, top-1 agreement and theta's shift in pixels
against its bound): FP32 ONNX; INT8 ONNX by ONNX Runtime's quantizer; INT8 ONNX by NNCF (the
default quantizer for --target openvino; STN-aware scope, or the whole STN float where that
moves theta past INT8's bound, as the export decides); OpenVINO IR FP32, bf16 and
INT8; and, on CPUs with AVX512_BF16 or AMX, that INT8 IR with OpenVINO computing its float
parts in bf16 instead of f32 (the openvino runner's ``compute="bf16"``, ``bench --ov-precision
bf16``), held to INT8's bounds like the files; and the FP32 ONNX computed in bf16 on OpenVINO,
the STN path included (an ONNX file carries no mark keeping it in f32), held to bf16's bounds:
what OpenVINO's default gives a user on such a CPU. Where the STN path is float (the CIFAR-10
model's case), those float parts are the localization convolutions, which bf16 speeds up on
AMX; ``benchmarks/nncf_scope.py`` has why they cannot be INT8 and what bf16 does to theta. The
export verifies a checkpoint's theta but not its sampling grid (it compares grids
only for a user's module), so the grid shift is measured here: the exported file with its
grid as an extra output, on the runtime that verified it, against PyTorch's grid.

Speed rows (``harness.measure_latency`` on ``backends.create_runner``, end-to-end: host numpy
in, host numpy out): ONNX Runtime FP32, INT8 and INT8 on NNCF's file; OpenVINO f32
(INFERENCE_PRECISION_HINT forced to f32, so a bf16-capable CPU does not report bf16 as FP32),
bf16 (the IR, its STN path in f32), bf16 of the whole FP32 ONNX, INT8 (NNCF) and INT8 with
bf16 float parts (skipped, with the runner's reason, on CPUs without bf16). OpenVINO
runs batch 1 under its LATENCY hint and larger batches under THROUGHPUT. Speed on shared VMs
drifts 20-30% in phases, so every row is measured in --rounds rounds that visit every row in
turn, and each figure is the median over the rounds.

Profiles (``stage_profile``, each runtime's own profiler as ``stn-deploy profile`` reads it):
OpenVINO on the FP32 and the NNCF INT8 file at the largest batch, ONNX Runtime on its FP32 and
INT8 files at batch 1; summed per stage, with what INT8 / f32 would be at most with the float
stages as they are, and the slowest INT8 kernels.

Writes benchmarks/results/precision_targets.{json,md} (or --results-dir).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stn_deploy.export.request import CALIB_SAMPLES

NAME = "precision_targets"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
CIFAR_NOTE = "CIFAR-10 (JPEG copy)"
GRID_PREFIX = "stn_deploy.grid."  # the grid outputs of a verification copy (export.verify)


# ------------------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class Variant:
    """One artifact, as ``stn-deploy export`` would be asked for it."""

    key: str
    label: str
    request: dict[str, Any]  # ExportRequest fields beyond the shared ones
    needs: tuple[str, ...] = ()  # optional packages: missing -> the variant is skipped

    @property
    def suffix(self) -> str:
        return ".xml" if self.request.get("format") == "openvino" else ".onnx"


VARIANTS: tuple[Variant, ...] = (
    Variant("fp32-onnx", "FP32 ONNX", {"format": "onnx", "precision": "fp32"}),
    Variant("int8-ort", "INT8 ONNX (onnxruntime quantizer)",
            {"format": "onnx", "precision": "int8", "quantizer": "onnxruntime"}),
    Variant("int8-nncf", "INT8 ONNX (NNCF)",
            {"format": "onnx", "precision": "int8", "target": "openvino"}, ("nncf",)),
    Variant("ir-fp32", "OpenVINO IR FP32", {"format": "openvino", "precision": "fp32"},
            ("openvino",)),
    Variant("ir-bf16", "OpenVINO IR bf16", {"format": "openvino", "precision": "bf16"},
            ("openvino",)),
    Variant("ir-int8", "OpenVINO IR INT8 (NNCF)", {"format": "openvino", "precision": "int8"},
            ("openvino", "nncf")),
)
# Variants that are a runtime setting, not a file (the openvino runner's ``compute`` option),
# verified here the way export verifies a file. Only CPUs with AVX512_BF16 or AMX run them:
# - the INT8 IR with OpenVINO computing its float parts (the STN path NNCF left float) in bf16;
# - the FP32 ONNX computed in bf16 on OpenVINO, the whole graph (an ONNX file carries no mark
#   keeping its STN path in f32): what a user gets from OpenVINO's default on a bf16 CPU, the
#   baseline an INT8 file has to beat.
@dataclass(frozen=True)
class ComputedVariant:
    key: str
    label: str
    file: str  # the exported variant it runs
    options: dict[str, Any]
    backend: str | None = None  # None: the runtime that verified the file
    held_to: str = "int8"  # whose bounds (``verify.TOLERANCES``)


COMPUTED_VARIANTS: tuple[ComputedVariant, ...] = (
    ComputedVariant("ir-int8-bf16", "OpenVINO IR INT8 (NNCF), float parts bf16", "ir-int8",
                    {"compute": "bf16"}),
    ComputedVariant("onnx-bf16", "FP32 ONNX on OpenVINO in bf16, STN path included",
                    "fp32-onnx", {"compute": "bf16"}, "openvino", "bf16"),
)
INT8_VARIANTS = ("int8-ort", "int8-nncf", "ir-int8", "ir-int8-bf16")


@dataclass(frozen=True)
class SpeedRow:
    """One timed row: a runtime on the first of ``variants`` that was exported."""

    key: str
    label: str
    backend: str
    variants: tuple[str, ...]
    f32: str  # the same runtime's f32 row
    options: dict[str, Any] = field(default_factory=dict)


SPEED_ROWS: tuple[SpeedRow, ...] = (
    SpeedRow("ort-fp32", "ONNX Runtime FP32", "onnxruntime", ("fp32-onnx",), "ort-fp32"),
    SpeedRow("ort-int8", "ONNX Runtime INT8", "onnxruntime", ("int8-ort",), "ort-fp32"),
    # Not judged: it says whether NNCF's file, the more faithful on CPUs without VNNI, would
    # cost speed as ONNX Runtime's INT8 default.
    SpeedRow("ort-int8-nncf", "ONNX Runtime INT8 (NNCF)", "onnxruntime", ("int8-nncf",),
             "ort-fp32"),
    # precision="fp32" on an FP32 file: the runner sets INFERENCE_PRECISION_HINT=f32.
    SpeedRow("ov-f32", "OpenVINO f32", "openvino", ("ir-fp32",), "ov-f32",
             {"precision": "fp32"}),
    SpeedRow("ov-bf16", "OpenVINO bf16", "openvino", ("ir-bf16",), "ov-f32"),
    # The runtime flag: OpenVINO's bf16 on the FP32 ONNX, the STN path in bf16 too.
    SpeedRow("ov-bf16-all", "OpenVINO bf16, STN path included", "openvino", ("fp32-onnx",),
             "ov-f32", {"compute": "bf16"}),
    SpeedRow("ov-int8", "OpenVINO INT8 (NNCF)", "openvino", ("ir-int8", "int8-nncf"), "ov-f32"),
    SpeedRow("ov-int8-bf16", "OpenVINO INT8 (NNCF), float parts bf16", "openvino",
             ("ir-int8",), "ov-f32", {"compute": "bf16"}),
)


# ------------------------------------------------------------------------------- targets

@dataclass(frozen=True)
class SpeedTarget:
    """``num``'s figure over ``den``'s at ``metric``, held to ``op goal`` on CPUs with any of
    ``needs`` (and none of ``not_with``, where another target applies instead)."""

    key: str
    what: str
    num: str
    den: str
    metric: str  # "b1_p50_ms" or "b256_ips"
    op: str  # ">=" or "<="
    goal: float
    needs: tuple[str, ...]
    not_with: tuple[str, ...] = ()


INT8_ISA = ("VNNI", "AMX")  # what makes INT8 arithmetic fast on x86
# INT8 against bf16 is judged against OpenVINO's bf16 of the whole graph (``ov-bf16-all``), the
# speed a user gets from a runtime flag, not against stn-deploy's bf16 IR, whose STN path stays
# f32 and which is slower for it.
SPEED_TARGETS: tuple[SpeedTarget, ...] = (
    SpeedTarget("ov_int8_vs_f32_amx", "OpenVINO INT8 / OpenVINO f32, batch 256 img/s",
                "ov-int8", "ov-f32", "b256_ips", ">=", 3.5, ("AMX",)),
    SpeedTarget("ov_int8_vs_bf16_amx", "OpenVINO INT8 / OpenVINO bf16, batch 256 img/s "
                "(never slower)", "ov-int8", "ov-bf16-all", "b256_ips", ">=", 1.0, ("AMX",)),
    SpeedTarget("ov_int8_vs_bf16_amx_goal", "OpenVINO INT8 / OpenVINO bf16, batch 256 img/s "
                "(goal)", "ov-int8", "ov-bf16-all", "b256_ips", ">=", 1.25, ("AMX",)),
    SpeedTarget("ov_int8_vs_f32_vnni", "OpenVINO INT8 / OpenVINO f32, batch 256 img/s "
                "(VNNI without AMX)", "ov-int8", "ov-f32", "b256_ips", ">=", 3.0, ("VNNI",),
                ("AMX",)),
    SpeedTarget("ort_int8_b1", "ONNX Runtime INT8 / FP32, batch-1 p50", "ort-int8", "ort-fp32",
                "b1_p50_ms", "<=", 0.75, INT8_ISA),
    SpeedTarget("ov_int8_b1", "OpenVINO INT8 / f32, batch-1 p50", "ov-int8", "ov-f32",
                "b1_p50_ms", "<=", 0.75, INT8_ISA),
    SpeedTarget("ort_int8_vs_fp32", "ONNX Runtime INT8 / FP32, batch 256 img/s", "ort-int8",
                "ort-fp32", "b256_ips", ">=", 1.0, ("VNNI",)),
    # The same INT8 IR with its float parts in bf16: the AMX targets again (bf16 needs
    # AVX512_BF16 or AMX; the b1 target wherever INT8 is fast: where bf16 does not run,
    # the row is not measured and says why).
    SpeedTarget("ov_int8_bf16_vs_f32_amx", "OpenVINO INT8, float parts bf16 / OpenVINO f32, "
                "batch 256 img/s", "ov-int8-bf16", "ov-f32", "b256_ips", ">=", 3.5, ("AMX",)),
    SpeedTarget("ov_int8_bf16_vs_bf16_amx", "OpenVINO INT8, float parts bf16 / OpenVINO bf16, "
                "batch 256 img/s (never slower)", "ov-int8-bf16", "ov-bf16-all", "b256_ips", ">=",
                1.0, ("AMX",)),
    SpeedTarget("ov_int8_bf16_vs_bf16_amx_goal", "OpenVINO INT8, float parts bf16 / OpenVINO "
                "bf16, batch 256 img/s (goal)", "ov-int8-bf16", "ov-bf16-all", "b256_ips", ">=",
                1.25, ("AMX",)),
    SpeedTarget("ov_int8_bf16_b1", "OpenVINO INT8, float parts bf16 / f32, batch-1 p50",
                "ov-int8-bf16", "ov-f32", "b1_p50_ms", "<=", 0.75, INT8_ISA),
)
MAX_DROP_POINTS = 0.3
MIN_AGREEMENT_PCT = 98.5


@dataclass
class Figures:
    """What ``judge`` reads. ``speed``: row key -> {"b1_p50_ms", "b256_ips", "reason"} (None
    where not measured); ``variants``: variant key -> {"accuracy_drop" (points),
    "agreement_pct", "theta_px", "grid_px", "bound_px", "reason"}."""

    speed: dict[str, dict[str, Any]]
    variants: dict[str, dict[str, Any]]
    data_note: str = ""


def _holds(value: float, op: str, goal: float) -> bool:
    return value >= goal if op == ">=" else value <= goal


def _isa_status(needs: tuple[str, ...], not_with: tuple[str, ...], isa: list[str]) -> str | None:
    """Why a target is not judged on this ISA (None: it is)."""
    if needs and not any(n in isa for n in needs):
        return f"not judged here: needs {'/'.join(needs)}"
    present = [n for n in not_with if n in isa]
    if present:
        return (f"not judged here: this CPU has {'/'.join(present)}, where the "
                f"{'/'.join(present)} target applies")
    return None


def _speed_row(t: SpeedTarget, fig: Figures, isa: list[str]) -> dict[str, Any]:
    num, den = fig.speed.get(t.num, {}), fig.speed.get(t.den, {})
    a, b = num.get(t.metric), den.get(t.metric)
    value = a / b if a is not None and b else None
    status = _isa_status(t.needs, t.not_with, isa)
    if status is None:
        why = num.get("reason") or den.get("reason") or f"{t.metric} not measured"
        status = "not measured: " + why if value is None else (
            "met" if _holds(value, t.op, t.goal) else "missed")
    return {"target": t.key, "what": t.what, "value": value, "goal": f"{t.op} {t.goal:g}",
            "status": status, "kind": "speed"}


def short_reason(key: str, v: dict[str, Any]) -> str | None:
    """A variant's reason as a target or speed row repeats it: whole if short, else a
    pointer to the variant's own row (a failed verification is a paragraph)."""
    why = v.get("reason")
    if why is None or len(why) <= 60:
        return why
    return f"{key} {v.get('status', 'failed')}, see Variants"


def _accuracy_rows(key: str, v: dict[str, Any], note: str) -> list[dict[str, Any]]:
    """The four accuracy targets of one INT8 variant (no ISA needed: judged everywhere)."""
    bound = v.get("bound_px")
    checks = [("accuracy_drop", "accuracy drop (points)", "<=", MAX_DROP_POINTS),
              ("agreement_pct", "top-1 agreement with FP32 PyTorch (%)", ">=",
               MIN_AGREEMENT_PCT),
              ("theta_px", "theta shift (px)", "<=", bound),
              ("grid_px", "grid shift (px)", "<=", bound)]
    rows = []
    for field_name, what, op, goal in checks:
        value = v.get(field_name)
        if value is None or goal is None:
            why = v.get(f"{field_name}_reason") or short_reason(key, v) or f"no {field_name}"
            status = "not measured: " + why
        else:
            status = "met" if _holds(value, op, goal) else "missed"
        rows.append({"target": f"{key}_{field_name}", "what": f"{key}: {what}"
                     + (f" on {note}" if note else ""), "value": value,
                     "goal": f"{op} {goal:g}" if goal is not None else "-", "status": status,
                     "kind": "accuracy"})
    return rows


def judge(fig: Figures, isa: list[str]) -> list[dict[str, Any]]:
    """Every target's row: its value, goal and "met", "missed", "not judged here: needs ..."
    (the CPU lacks the ISA the target is for; the value is still shown) or "not measured:
    why". Pure: no clock, no files, so it is tested on figures alone."""
    rows = [_speed_row(t, fig, isa) for t in SPEED_TARGETS]
    for key in INT8_VARIANTS:
        rows += _accuracy_rows(key, fig.variants.get(key, {"reason": "not exported"}),
                               fig.data_note)
    return rows


# ------------------------------------------------------------------------------ options

def sample_count(text: str) -> int | None:
    """N or all (None)."""
    if text.lower() == "all":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number or all")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="ImageFolder with train/ and test/ (default: the checkpoint's dataset)")
    p.add_argument("--data-note", default=None, help="what the data is, beside every figure "
                   f"[default: {CIFAR_NOTE!r} for CIFAR-10's classes, else the split's name]")
    p.add_argument("--calib-samples", type=sample_count, default=CALIB_SAMPLES,
                   help=f"N or all [{CALIB_SAMPLES}, export's default]")
    p.add_argument("--eval-samples", type=sample_count, default=None, help="N or all [all]")
    p.add_argument("--batch-sizes", default="1,256", help="[1,256]")
    p.add_argument("--iterations", type=int, default=200, help="timed runs a round [200]")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs a round [20]")
    p.add_argument("--threads", type=int, default=None, help="[all available CPUs]")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds visiting every speed row in turn; the median is reported [5]")
    p.add_argument("--quick", action="store_true", help="10 iterations, 1 round, 256 eval and "
                   "64 calibration images: proves the script, measures nothing")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    a = p.parse_args(argv)
    a.batch_sizes = tuple(sorted({int(b) for b in a.batch_sizes.split(",")}))
    if a.quick:
        a.iterations, a.warmup, a.rounds = 10, 2, 1
        a.eval_samples = min(a.eval_samples or 256, 256)
        a.calib_samples = min(a.calib_samples or 64, 64)
    if min(a.iterations, a.rounds, *a.batch_sizes) < 1 or a.warmup < 0:
        p.error("--iterations, --rounds and --batch-sizes must be positive, --warmup >= 0")
    return a


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- exports

def missing_package(names: tuple[str, ...]) -> str | None:
    import importlib.util

    gone = [n for n in names if importlib.util.find_spec(n) is None]
    return f"{', '.join(gone)} not installed (pip install 'stn-deploy[int8]')" if gone else None


def export_variant(v: Variant, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One variant through ``run_export``: its file and verification report, or the reason
    it was skipped (a package missing) or failed (the export refused or failed to verify)."""
    from stn_deploy.errors import StnDeployError
    from stn_deploy.export.pipeline import ExportRequest, run_export

    row: dict[str, Any] = {"key": v.key, "label": v.label, "request": v.request}
    why = missing_package(v.needs)
    if why:
        return {**row, "status": "skipped", "reason": why}
    calib = {"calib_samples": args.calib_samples} if v.request["precision"] == "int8" else {}
    req = ExportRequest(checkpoint=args.checkpoint, with_theta=True, data_dir=args.data_dir,
                        verify_samples=args.eval_samples, out=work / f"{v.key}{v.suffix}",
                        caller="api", **calib, **v.request)
    try:
        result = run_export(req, echo=lambda _line: None)
    except StnDeployError as e:
        text = str(e).splitlines()
        failed = [t.strip() for t in text if "FAILED" in t]
        return {**row, "status": "failed", "reason": "; ".join([text[0], *failed])}
    rep = result.report
    assert rep is not None  # run_export always verifies
    notes = [line for line in result.lines if line.startswith(("INT8 by", "NNCF:"))]
    return {**row, **report_figures(rep, notes), "path": str(result.path),
            "report": rep.to_dict(), "lines": result.lines}


def report_figures(rep: Any, notes: list[str]) -> dict[str, Any]:
    """A variant's figures from its verification report (``verify.VerifyReport``)."""
    return {"status": "ok", "backend": rep.backend, "computed": rep.computed,
            "samples": rep.samples, "accuracy_ref": rep.accuracy_ref,
            "accuracy": rep.accuracy_onnx, "accuracy_drop": rep.accuracy_drop,
            "agreement_pct": 100 * rep.agreement, "theta_px": rep.theta_max_px,
            "theta_spread_px": rep.theta_spread_px, "bound_px": rep.tolerances.theta_px,
            "passed": rep.passed, "notes": [*rep.notes, *notes]}


def verify_computed(c: ComputedVariant, exported: dict[str, Any], data: Any,
                    reference: dict[str, np.ndarray], config: Any) -> dict[str, Any]:
    """``c``'s file run with ``c.options`` on the images every export verified on, held to
    ``c.held_to``'s bounds against the same PyTorch reference (``verify.verify_file``): the
    row reads as an exported variant's does. Skipped where the file was not exported or the runner
    refuses the setting on this CPU (bf16 without AVX512_BF16 or AMX)."""
    from stn_deploy.errors import StnDeployError
    from stn_deploy.export.verify import TOLERANCES, verify_file

    row: dict[str, Any] = {"key": c.key, "label": c.label, "request": {"file": c.file,
                                                                      **c.options}}
    if exported.get("status") != "ok":
        return {**row, "status": "skipped", "reason": f"{exported['label']} not exported"}
    try:
        rep = verify_file(exported["path"], reference, data.images, data.labels, config,
                          TOLERANCES[c.held_to], c.backend or exported["backend"], c.options)
    except StnDeployError as e:
        return {**row, "status": "skipped", "reason": str(e)}
    return {**row, **report_figures(rep, []), "path": exported["path"], "options": c.options}


# ---------------------------------------------------------------------------------- grids

def eval_images(args: argparse.Namespace) -> Any:
    """The images every export verifies on (the same seeded draw), and their note."""
    from stn_deploy.export.sources import CheckpointSource

    return CheckpointSource.load(args.checkpoint).test_images(args.data_dir, args.eval_samples)


def pytorch_grid(checkpoint: Path, images: np.ndarray) -> np.ndarray | None:
    """The grid PyTorch samples each image with (N, H, W, 2), from its own theta; None for a
    model without an STN."""
    import torch

    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.verify import torch_reference

    ckpt = load_checkpoint(checkpoint)
    model = ckpt.model()
    if model.stn is None:
        return None
    theta = torch.from_numpy(torch_reference(checkpoint, images, ckpt)["theta"]).float()
    with torch.no_grad():
        return model.stn.grid(theta).double().numpy()


def with_grids(path: Path, work: Path) -> Path:
    """A copy of an exported file whose GridSample grids are extra outputs (GRID_PREFIX + i):
    ``verify.with_grid_outputs`` for ONNX; for an IR, the same made with OpenVINO's own
    ``add_outputs`` (its rt_info, and so its precision, kept)."""
    from stn_deploy.export.verify import with_grid_outputs

    if path.suffix != ".xml":
        dst = work / f"{path.stem}-grids.onnx"
        with_grid_outputs(path, dst)
        return dst
    from stn_deploy.backends.ov import import_openvino

    ov = import_openvino()
    model = ov.Core().read_model(str(path))
    samplers = [op for op in model.get_ordered_ops() if op.get_type_name() == "GridSample"]
    for i, op in enumerate(samplers):
        out = model.add_outputs([op.input_value(1)])[0]
        out.get_tensor().set_names({f"{GRID_PREFIX}{i}"})
    dst = work / f"{path.stem}-grids.xml"
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return dst


def grid_shift_px(variant: dict[str, Any], images: np.ndarray, ref: np.ndarray | None,
                  work: Path) -> float | None:
    """Largest shift (px) of any sampling point of the last GridSample (the one that feeds the
    classifier) from PyTorch's, on the runtime that verified the variant."""
    from stn_deploy.backends import create_runner
    from stn_deploy.harness import EVAL_BATCH, run_batched

    if ref is None or variant.get("status") != "ok":
        return None
    copy = with_grids(Path(variant["path"]), work)
    with create_runner(variant["backend"], copy, **variant.get("options", {})) as runner:
        got = run_batched(runner, images, EVAL_BATCH)
    names = sorted((k for k in got if k.startswith(GRID_PREFIX)),
                   key=lambda k: int(k[len(GRID_PREFIX):]))
    if not names:
        return None
    diff = np.abs(got[names[-1]].astype(np.float64) - ref)
    h, w = ref.shape[1:3]  # a normalised grid unit is half the image's width (x) or height (y)
    return float(max((diff[..., 0] * w / 2).max(), (diff[..., 1] * h / 2).max()))


# ---------------------------------------------------------------------------------- speed

def speed_plan(variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each speed row with the file it runs, or why it cannot run."""
    plan = []
    for row in SPEED_ROWS:
        done = [variants[k] for k in row.variants if variants[k].get("status") == "ok"]
        entry: dict[str, Any] = {"key": row.key, "label": row.label, "backend": row.backend,
                                 "f32": row.f32, "options": row.options, "rounds": {}}
        if done:
            entry.update(variant=done[0]["key"], path=done[0]["path"], status="ok")
        else:
            first = variants[row.variants[0]]
            entry.update(status="skipped", reason=f"{first['label']} not exported: "
                                                  f"{short_reason(first['key'], first)}")
        plan.append(entry)
    return plan


def measure_round(plan: list[dict[str, Any]], args: argparse.Namespace,
                  images: np.ndarray, threads: int) -> None:
    """One round: every runnable row at every batch size, in turn, through the harness."""
    from stn_deploy.backends import create_runner
    from stn_deploy.errors import StnDeployError
    from stn_deploy.harness import measure_latency

    for row in plan:
        for batch in args.batch_sizes:
            if row["status"] != "ok":
                break
            hint = ({"hint": "latency" if batch == 1 else "throughput"}
                    if row["backend"] == "openvino" else {})
            try:
                with create_runner(row["backend"], row["path"], threads=threads,
                                   **row["options"], **hint) as runner:
                    stats = measure_latency(runner, batch, iterations=args.iterations,
                                            warmup=args.warmup, sample=images)
                    row["computed"] = computed_in(runner)
            except StnDeployError as e:  # e.g. a runtime that refuses the file here
                row.update(status="skipped", reason=str(e))
                log(f"  {row['label']}: skipped: {e}")
                break
            row["rounds"].setdefault(str(batch), []).append(
                {"p50_ms": stats.p50_ms, "ips": stats.throughput_ips})


def computed_in(runner: Any) -> str:
    """What the row computed in: OpenVINO's inference precision (an INT8 graph's float parts
    run in it), else the file's precision."""
    said = runner.describe().get("inference_precision")
    if said is None:
        return str(runner.precision)
    return f"int8, float parts {said}" if runner.precision == "int8" else str(said)


def summarise_speed(plan: list[dict[str, Any]]) -> None:
    """Median p50 and img/s over the rounds per batch size; b1 / b256 for the targets."""
    for row in plan:
        row["median"] = {b: {"p50_ms": float(np.median([r["p50_ms"] for r in rs])),
                             "ips": float(np.median([r["ips"] for r in rs]))}
                         for b, rs in row["rounds"].items()}
        row["b1_p50_ms"] = row["median"].get("1", {}).get("p50_ms")
        row["b256_ips"] = row["median"].get("256", {}).get("ips")


@dataclass(frozen=True)
class Profiled:
    """A runtime's own per-node profile of its f32 and INT8 files at one batch size (None: the
    largest timed)."""

    key: str
    runtime: str
    backend: str
    f32: str  # variant keys
    int8: str
    batch: int | None


PROFILED: tuple[Profiled, ...] = (
    # OpenVINO at the largest batch: NNCF's INT8 file is the graph the INT8 IR is converted
    # from; its float parts are what INT8 cannot speed up.
    Profiled("openvino", "OpenVINO", "openvino", "fp32-onnx", "int8-nncf", None),
    # ONNX Runtime at batch 1, where its INT8 misses its target: which kernels cost it.
    Profiled("onnxruntime-b1", "ONNX Runtime", "onnxruntime", "fp32-onnx", "int8-ort", 1),
)
# AVX-512 VNNI's 8-bit multiply-adds per instruction over AVX-512's f32 FMAs (64 vs 16): the
# most INT8 can speed a convolution up on a VNNI CPU without AMX.
VNNI_PEAK = 4.0
TOP_KERNELS = 6  # the slowest INT8 kernels listed under each profile


def stage_profile(variants: dict[str, dict[str, Any]], largest: int, iterations: int,
                  threads: int) -> list[dict[str, Any]]:
    """Each ``PROFILED`` runtime's own per-node profile (``stn-deploy profile``), summed per
    stage, so the results say where INT8's time goes: a stage kept float costs INT8 what it
    cost f32, and bounds INT8 / f32 however fast the quantized classifier gets. ``iterations``
    profiled runs at batch 1, a tenth of them at larger batches."""
    from stn_deploy.debug.profiling import profile_model
    from stn_deploy.errors import StnDeployError

    out = []
    for p in PROFILED:
        batch = p.batch or largest
        runs = iterations if batch == 1 else max(1, iterations // 10)
        entry: dict[str, Any] = {"key": p.key, "runtime": p.runtime, "batch": batch,
                                 "files": {}}
        for role, key in (("f32", p.f32), ("int8", p.int8)):
            v = variants[key]
            if v.get("status") != "ok":
                reason = f"{v['label']} not exported"
                entry["files"][role] = {"status": "skipped", "reason": reason}
                continue
            try:
                run = profile_model(v["path"], p.backend, (batch,), iterations=runs,
                                    threads=threads).runs[0]
            except StnDeployError as e:  # e.g. OpenVINO not installed
                entry["files"][role] = {"status": "skipped", "reason": str(e)}
                continue
            entry["files"][role] = {
                "status": "ok", "variant": key, "label": v["label"],
                "kernel_ms": run.kernel_ms, "stage_ms": run.stage_ms,
                "top": [{"name": k.name, "op": k.op_type, "stage": k.stage, "ms": k.ms}
                        for k in run.kernels[:TOP_KERNELS]]}
        f32, int8 = entry["files"]["f32"], entry["files"]["int8"]
        if f32["status"] == int8["status"] == "ok":
            float_ms = int8["kernel_ms"] - int8["stage_ms"].get("classifier", 0.0)
            classifier_4x = f32["stage_ms"].get("classifier", 0.0) / VNNI_PEAK
            entry.update(int8_vs_f32=f32["kernel_ms"] / int8["kernel_ms"],
                         ceiling_free_classifier=f32["kernel_ms"] / float_ms if float_ms
                         else None,
                         ceiling_vnni_classifier=f32["kernel_ms"] / (float_ms + classifier_4x))
        out.append(entry)
    return out


# ------------------------------------------------------------------------------ markdown

def _f(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def variants_table(variants: list[dict[str, Any]], note: str) -> list[str]:
    lines = [f"## Variants (verified against PyTorch FP32 on {note})", "",
             "| Variant | Verified on | Images | Accuracy (PyTorch -> variant) | Agreement | "
             "Theta shift (px) | Grid shift (px) | Bound (px) | Theta spread (px) | Status |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for v in variants:
        if v["status"] != "ok":
            lines.append(f"| {v['label']} | - | - | - | - | - | - | - | - | "
                         f"{v['status']}: {v['reason']} |")
            continue
        on = v["backend"] + (f" (computed in {v['computed']})" if v.get("computed") else "")
        acc = (f"{v['accuracy_ref']:.2f}% -> {v['accuracy']:.2f}%"
               if v.get("accuracy") is not None else "-")
        lines.append(f"| {v['label']} | {on} | {v['samples']} | {acc} | "
                     f"{v['agreement_pct']:.2f}% | {_f(v['theta_px'], '.2g')} | "
                     f"{_f(v.get('grid_px'), '.2g')} | {_f(v['bound_px'], 'g')} | "
                     f"{_f(v['theta_spread_px'], '.2f')} | "
                     f"{'passed' if v['passed'] else 'FAILED'}"
                     f"{'; ' + '; '.join(v['notes']) if v['notes'] else ''} |")
    return lines


def speed_table(plan: list[dict[str, Any]], rounds: int) -> list[str]:
    by_key = {r["key"]: r for r in plan}

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a is not None and b else "-"

    lines = [f"## Speed (end-to-end, median of {rounds} alternating rounds)", "",
             "| Row | File | Computed in | b1 p50 ms | b1 p50 / same runtime f32 | b256 img/s | "
             "b256 / OpenVINO f32 | b256 / same runtime f32 |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    ov = by_key.get("ov-f32", {})
    for r in plan:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | skipped: {r['reason']} | - | - | - | - | - | - |")
            continue
        same = by_key.get(r["f32"], {})
        lines.append(f"| {r['label']} | {r['variant']} | {r.get('computed') or '-'} | "
                     f"{_f(r['b1_p50_ms'], '.3f')} | "
                     f"{ratio(r['b1_p50_ms'], same.get('b1_p50_ms'))} | "
                     f"{_f(r['b256_ips'], ',.0f')} | "
                     f"{ratio(r['b256_ips'], ov.get('b256_ips'))} | "
                     f"{ratio(r['b256_ips'], same.get('b256_ips'))} |")
    return lines


def profile_table(profiles: list[dict[str, Any]] | None) -> list[str]:
    lines: list[str] = []
    for prof in profiles or []:
        f32, int8 = prof["files"]["f32"], prof["files"]["int8"]
        lines += [f"## Where the time goes: {prof['runtime']}'s per-node profile, batch "
                  f"{prof['batch']}, ms per batch", ""]
        if f32["status"] != "ok" or int8["status"] != "ok":
            lines += [f"not profiled: {f32.get('reason') or int8.get('reason')}", ""]
            continue
        lines += [f"| Stage | {f32['label']}, f32 | {int8['label']} | f32 / INT8 | "
                  f"share of INT8 |", "|---|---:|---:|---:|---:|"]
        for stage in dict.fromkeys([*f32["stage_ms"], *int8["stage_ms"]]):
            a, b = f32["stage_ms"].get(stage, 0.0), int8["stage_ms"].get(stage, 0.0)
            if a or b:
                lines.append(f"| {stage} | {a:.3f} | {b:.3f} | "
                             f"{_f(a / b if b else None, '.2f')} | {b / int8['kernel_ms']:.0%} |")
        lines.append(f"| all | {f32['kernel_ms']:.3f} | {int8['kernel_ms']:.3f} | "
                     f"{prof['int8_vs_f32']:.2f} | 100% |")
        free = _f(prof.get("ceiling_free_classifier"), ".2f")
        vnni = _f(prof.get("ceiling_vnni_classifier"), ".2f")
        lines += ["", f"INT8 / f32 with every other stage as INT8 runs it, if the classifier "
                      f"ran {VNNI_PEAK:g}x faster than in f32 (VNNI's 8-bit multiply-add rate "
                      f"over f32's): {vnni}; if it took no time: {free}. The slowest INT8 "
                      f"kernels:", "",
                  "| Kernel | Op | Stage | ms |", "|---|---|---|---:|"]
        lines += [f"| {k['name']} | {k['op']} | {k['stage']} | {k['ms']:.3f} |"
                  for k in int8["top"]]
        lines.append("")
    return lines


def targets_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Targets", "", "| Target | Value | Goal | Verdict |", "|---|---:|---|---|"]
    lines += [f"| {r['what']} | {_f(r['value'], target_format(r))} | {r['goal']} | "
              f"{r['status']} |" for r in rows]
    return lines


def target_format(row: dict[str, Any]) -> str:
    """Ratios and accuracy to two decimals; pixel shifts to two significant digits."""
    return ".2g" if row["target"].endswith("_px") else ".2f"


def markdown(doc: dict[str, Any], plan: list[dict[str, Any]]) -> str:
    s = doc["settings"]
    head = [f"# Precision targets on {doc['data']}", "",
            f"Checkpoint `{doc['checkpoint']}`; {s['threads']} threads per runtime; "
            f"{s['calib_samples'] or 'all'} calibration images; CPU ISA: "
            f"{', '.join(doc['isa']) or 'no AVX2'}."]
    if s["quick"]:
        head.append("**Quick run: the timings prove the script works; they measure nothing.**")
    tail = ["", "OpenVINO: batch 1 under the LATENCY hint, larger batches under THROUGHPUT; the "
            "f32 row forces INFERENCE_PRECISION_HINT=f32. Ratios of b1 are p50 over p50 (lower "
            "is faster), of b256 img/s over img/s. The OpenVINO INT8 row runs the INT8 IR when "
            "it was exported, else the NNCF ONNX; its float parts compute in f32, and in bf16 in "
            "the row that says so. INT8 is judged against OpenVINO's bf16 with the STN path "
            "included (the FP32 ONNX, which carries no mark keeping its STN path in f32): the "
            "speed a runtime flag gives. Grid shift: the last GridSample's grid on the "
            "runtime that verified the variant, against PyTorch's."]
    return "\n".join([*head, "", *variants_table(doc["variants"], doc["data"]), "",
                      *speed_table(plan, s["rounds"]), "", *profile_table(doc.get("profile")),
                      *targets_table(doc["targets"]),
                      *tail]) + "\n"


# ----------------------------------------------------------------------------------- main

def data_note(args: argparse.Namespace, split_note: str) -> str:
    """--data-note, else "CIFAR-10 (JPEG copy)" for a folder of CIFAR-10's classes, else the
    split the export names ("the digits test split")."""
    if args.data_note:
        return args.data_note
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.config import CIFAR10_CLASSES

    names = set(load_checkpoint(args.checkpoint).config.class_names or ())
    if args.data_dir is not None and names == set(CIFAR10_CLASSES):
        return f"{CIFAR_NOTE} test split"
    return split_note.removeprefix("the ")


def run(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Export and verify every variant, measure grids and speed, judge the targets."""
    from stn_deploy.backends.base import available_cpus
    from stn_deploy.errors import StnDeployError
    from stn_deploy.harness import cpu_isa

    threads = args.threads or available_cpus()
    variants: dict[str, dict[str, Any]] = {}
    for v in VARIANTS:
        log(f"export {v.label}")
        variants[v.key] = export_variant(v, args, work)
        if v.key == "fp32-onnx" and variants[v.key]["status"] != "ok":
            raise StnDeployError(f"the FP32 export failed: {variants[v.key]['reason']}")
    data = eval_images(args)
    computed_variants(variants, args, data)
    ref = pytorch_grid(args.checkpoint, data.images)
    for v in variants.values():
        try:
            v["grid_px"] = grid_shift_px(v, data.images, ref, work)
        except (StnDeployError, RuntimeError) as e:  # OpenVINO raises RuntimeErrors
            v["grid_px"], v["grid_px_reason"] = None, f"grid not measured: {e}"
    plan = speed_plan(variants)
    for i in range(args.rounds):
        log(f"speed round {i + 1} of {args.rounds}")
        measure_round(plan, args, data.images, threads)
    summarise_speed(plan)
    log("profile per node")
    profile = stage_profile(variants, max(args.batch_sizes), args.iterations, threads)
    note, isa = data_note(args, data.note), cpu_isa()
    targets = judge(Figures({r["key"]: r for r in plan}, variants, note), isa)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc = {"checkpoint": str(args.checkpoint), "data": note, "isa": isa,
           "settings": {**settings, "threads": threads},
           "variants": [{k: x for k, x in v.items() if k != "path"} for v in variants.values()],
           "speed": plan, "profile": profile, "targets": targets}
    return doc, plan


def computed_variants(variants: dict[str, dict[str, Any]], args: argparse.Namespace,
                      data: Any) -> None:
    """Verify each COMPUTED_VARIANTS entry against PyTorch, as the exports were."""
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.verify import torch_reference

    ckpt = load_checkpoint(args.checkpoint)
    reference = torch_reference(args.checkpoint, data.images, ckpt)
    for c in COMPUTED_VARIANTS:
        log(f"verify {c.label}")
        variants[c.key] = verify_computed(c, variants[c.file], data, reference, ckpt.config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _provenance import write_results
    from stn_deploy.errors import StnDeployError

    try:
        with tempfile.TemporaryDirectory(prefix="stn-precision-") as tmp:
            doc, plan = run(args, Path(tmp))
            for row in plan:
                row.pop("path", None)  # a temporary file, gone after the run
    except StnDeployError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    json_path, md_path = write_results(NAME, doc, markdown(doc, plan), folder=args.results_dir)
    log(f"wrote {json_path} and {md_path}")
    for t in doc["targets"]:
        print(f"{t['what']}: {_f(t['value'], target_format(t))} ({t['goal']}): {t['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
