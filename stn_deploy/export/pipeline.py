"""``stn-deploy export`` and ``stn_deploy.export_model`` as one function, ``run_export``:

    request -> plan and source (a checkpoint or a user's module) -> FP32 graph -> verify
            -> precision variant (FP16; INT8 by ONNX Runtime's quantizer or NNCF)
            -> verify -> target checks -> metadata -> file
            [-> TensorRT plan | -> OpenVINO IR (.xml + .bin; FP32, FP16, bf16, INT8),
             verified on openvino]

The command and the API fill the same ``request.ExportRequest``; options are resolved and
refused by name there, before any work, and each stage below is one short function, the same
for both sources. Everything is built in a temporary folder and moved to the output path
only after every check passed, so a failed export leaves no file behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stn_deploy.errors import StnDeployError
from stn_deploy.export.request import (ExportRequest, OptionError, Plan, fit_source,
                                       open_source, resolve)

if TYPE_CHECKING:
    from stn_deploy.config import ModelConfig
    from stn_deploy.export.nncf_quant import NncfResult
    from stn_deploy.export.sources import Source
    from stn_deploy.export.verify import Images, Reference, VerifyReport

__all__ = ["ExportRequest", "ExportResult", "OptionError", "run_export"]


@dataclass
class ExportResult:
    """What was written (``path``; for a TensorRT plan, ``onnx_path`` is the ONNX it was
    built from, beside it; for an OpenVINO IR, the .xml again), the lines printed, and the
    verification report (of the IR itself for --format openvino)."""

    path: Path
    onnx_path: Path
    lines: list[str] = field(default_factory=list)
    report: "VerifyReport | None" = None


# ---------------------------------------------------------------------------- the pipeline

def run_export(req: ExportRequest, echo: Callable[[str], None] = print) -> ExportResult:
    """Export, verify, make the precision variant, verify it, check it for the target, and
    only then write the file (and build the TensorRT plan from it)."""
    plan = resolve(req)
    source = open_source(req)
    plan = fit_source(req, plan, source)
    data = verification_images(req, source)
    lines = [data.warning] if data.warning else []
    logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer's pre-processing hint
    with tempfile.TemporaryDirectory(prefix="stn-export-") as work_dir:
        fp32 = Path(work_dir) / "fp32.onnx"
        meta = write_fp32(source, plan, fp32, lines)
        reference = source.reference(data.images, plan.onnx)
        report = verified("FP32 ONNX", fp32, reference, data, source.config, "fp32", lines)
        health = source.health(data)
        lines += health.lines
        meta.update(health.metadata)
        final = precision_variant(req, plan, source, fp32, data, lines, meta)
        if final != fp32:  # bf16 is the FP32 graph: OpenVINO computes it in bf16
            what = f"{plan.precision.upper()} ONNX ({float_part(plan, meta)} in FP32)"
            report = verified(what, final, reference, data, source.config, plan.precision,
                              lines)
        check_for_target(final, plan.target, lines)
        finish_metadata(final, plan, report, data, meta)
        if plan.format == "trt":
            return build_plan(final, plan, reference, data, source.config, report, lines,
                              echo)
        if plan.format == "openvino":
            ir_source = fp32 if plan.precision == "fp16" else final
            if ir_source != final:
                finish_metadata(ir_source, plan, report, data, meta)
            return write_ir(ir_source, plan, reference, data, source.config, lines, echo)
        move_into_place(final, plan.path)
        lines.append(f"wrote {plan.path}")
        emit(lines, echo)
        return ExportResult(plan.path, plan.path, lines, report)


# ---------------------------------------------------------------------------------- images

def verification_images(req: ExportRequest, source: "Source") -> "Images":
    """The images given, else the source's own (its dataset, an image folder, or random)."""
    from stn_deploy.export.verify import Images, as_images, subset

    if req.images is None:
        return source.test_images(req.data_dir, req.verify_samples)
    images = as_images(req.images, source.config, req.spell("images"))
    labels = None if req.labels is None else _labels(req, len(images))
    return subset(Images(images, labels, "the given images"), req.verify_samples)


def _labels(req: ExportRequest, count: int) -> Any:
    import numpy as np

    labels = np.asarray(req.labels.numpy() if hasattr(req.labels, "numpy") else req.labels)
    if labels.shape != (count,):
        raise OptionError(f"{req.spell('labels')}: {labels.shape} for {count} images")
    return labels


def calibration_images(req: ExportRequest, source: "Source",
                       verification: "Images") -> "Images":
    """The calibration images given, else --calib-dir's (default --data-dir's) train split,
    else the source's own."""
    from stn_deploy.export.verify import Images, as_images, subset

    if req.calib_images is not None:
        images = as_images(req.calib_images, source.config, req.spell("calib_images"))
        return subset(Images(images, None, "the given calibration images"), req.calib_samples)
    return source.calib_images(req.calib_dir or req.data_dir, req.calib_samples, verification)


# ---------------------------------------------------------------------------------- stages

def write_fp32(source: "Source", plan: Plan, path: Path, lines: list[str]) -> dict[str, str]:
    """The FP32 graph; for a TensorRT plan, rewritten first for TensorRT, so the graph
    verified is the one built. Returns the source's metadata keys."""
    written = source.write_fp32(path, plan.onnx)
    lines += written.lines
    if plan.format == "trt":
        import onnx

        from stn_deploy.export.targets import make_safe

        proto, changes = make_safe(onnx.load(str(path)), plan.target)
        lines += changes
        if changes:
            onnx.save(proto, str(path))
    return dict(written.metadata)


def verified(what: str, path: Path, reference: "Reference", data: "Images",
             config: "ModelConfig", precision: str, lines: list[str],
             backend: str = "onnxruntime", grids: bool = True) -> "VerifyReport":
    """``path`` held to PyTorch at ``precision``'s tolerances; a failure ends the export."""
    from stn_deploy.export.verify import TOLERANCES, verify_export

    report = verify_export(path, reference, data, config, TOLERANCES[precision], backend, grids)
    lines += [f"{what} on {data.note}:", *report.lines()]
    if not report.passed:
        raise verification_failed(what, lines)
    return report


def precision_variant(req: ExportRequest, plan: Plan, source: "Source", fp32: Path,
                      data: "Images", lines: list[str], meta: dict[str, str]) -> Path:
    """FP16 or INT8 (QDQ) from the verified FP32 graph, the STN path (and --keep-float's
    nodes) left in FP32."""
    from stn_deploy.export import precision as prec

    keep = keep_float_nodes(req, fp32)
    if keep:
        meta["keep_float"] = ",".join(keep)
        lines.append(f"kept in float as asked ({req.spell('keep_float')}): {len(keep)} nodes")
    if plan.precision == "fp16":
        return prec.convert_fp16(fp32, fp32.with_name("fp16.onnx"), keep)
    if plan.precision != "int8":
        return fp32
    calib = calibration_images(req, source, data)
    meta["calibration"] = f"{len(calib.images)} images from {calib.note}"
    meta["quantizer"] = str(plan.quantizer)
    lines.append(f"INT8 calibration on {meta['calibration']}")
    if plan.quantizer == "nncf":
        return nncf_variant(plan, source, fp32, calib, data, lines, meta, keep)
    import torch

    seven = prec.weights_need_7_bits()
    meta["weight_bits"] = "7" if seven else "8"
    lines.append(f"INT8 by onnxruntime's quantizer, {meta['weight_bits']}-bit weights "
                 f"({'no VNNI on this CPU' if seven else 'VNNI on this CPU'})")
    return prec.quantize_int8(fp32, fp32.with_name("int8.onnx"),
                              torch.from_numpy(calib.images), source.config,
                              reduce_range=seven, keep_float=keep)


def float_part(plan: Plan, meta: dict[str, str]) -> str:
    """What stayed float, for the verification heading: NNCF's STN-aware scope quantizes the
    localization convolutions unless it had to fall back to the whole STN path."""
    stn_aware = plan.quantizer == "nncf" and meta.get("nncf_scope") != "stn-float"
    return "regressor, grid, sampler" if stn_aware else "STN path"


def keep_float_nodes(req: ExportRequest, fp32: Path) -> list[str]:
    """--keep-float's node names, each one in the FP32 graph, or one line naming those not."""
    import onnx

    from stn_deploy.export import precision as prec

    if req.keep_float is None:
        return []
    try:
        names = prec.read_keep_float(req.keep_float)
        model = onnx.load(str(fp32), load_external_data=False)
        prec.name_nodes(model)
        prec.check_keep_float(model, names)
    except StnDeployError as e:
        raise OptionError(f"{req.spell('keep_float')}: {e}") from None
    return names


def nncf_variant(plan: Plan, source: "Source", fp32: Path, calib: "Images", data: "Images",
                 lines: list[str], meta: dict[str, str], keep: list[str]) -> Path:
    """NNCF's INT8 with the STN-aware scope, or with the whole STN path float when that scope
    moves theta past INT8's bound on the verification images (``nncf_scope``); with
    --max-accuracy-drop, accuracy-controlled on half the verification images, in that scope."""
    from stn_deploy.export import nncf_quant

    out = fp32.with_name("int8.onnx")
    meta["weight_bits"] = "8"
    result = nncf_quant.quantize_nncf(fp32, out, calib.images, source.config, keep_float=keep)
    scope = nncf_scope(fp32, out, data, source.config, lines)
    if plan.max_accuracy_drop is not None:
        result = accuracy_controlled(plan.max_accuracy_drop, source, fp32, out, calib, data,
                                     lines, meta, keep, scope)
    elif scope != "stn-aware":
        result = nncf_quant.quantize_nncf(fp32, out, calib.images, source.config,
                                          keep_float=keep, scope=scope)
    meta["nncf_scope"] = scope
    meta["nncf_ignored_scope"] = ",".join(result.ignored)
    what = ("regressor, theta, grid, sampler" if scope == "stn-aware"
            else "the whole STN path: localization, regressor, theta, grid, sampler")
    lines.append(f"INT8 by NNCF, 8-bit weights (the first convolution's at half range); "
                 f"float ({what}{', --keep-float' if keep else ''}): {len(result.ignored)} nodes")
    return result.path


def nncf_scope(fp32: Path, quantized: Path, data: "Images", config: "ModelConfig",
               lines: list[str]) -> str:
    """"stn-aware" when NNCF's STN-aware ``quantized`` keeps theta within INT8's bound on the
    verification images, else "stn-float", with one line giving both numbers (why:
    ``nncf_quant``'s docstring)."""
    from stn_deploy.export import nncf_quant
    from stn_deploy.export.verify import TOLERANCES

    bound = TOLERANCES["int8"].theta_px
    shift = nncf_quant.theta_shift(fp32, quantized, data.images, config)
    if bound is None or shift is None or shift.moved_px <= bound:
        return "stn-aware"
    lines.append(f"NNCF: quantizing the localization convolutions moved theta by "
                 f"{shift.moved_px:.2g} px (bound {bound:g} px; theta's spread "
                 f"{shift.spread_px:.2f} px, on {shift.images} verification images): kept the "
                 "whole STN path float instead")
    return "stn-float"


def accuracy_controlled(max_drop: float, source: "Source", fp32: Path, out: Path,
                        calib: "Images", data: "Images", lines: list[str],
                        meta: dict[str, str], keep: list[str], scope: str) -> "NncfResult":
    """--max-accuracy-drop: NNCF's accuracy control on half the verification images, from
    ``scope`` (the plain quantization's theta shift chose it)."""
    from stn_deploy.export import nncf_quant
    from stn_deploy.export.verify import TOLERANCES

    images, labels = nncf_quant.held_out(data.images, data.labels)
    bound = TOLERANCES["int8"].theta_px or 0.1
    result = nncf_quant.quantize_nncf_controlled(
        fp32, out, calib.images, images, labels, source.config, max_drop, bound,
        keep_float=keep, scope=scope)
    meta["accuracy_control"] = (f"max drop {max_drop:g} points on "
                                f"{len(images)} held-out images: {result.drop:.2f} reached; "
                                f"grid shift <= {bound:g} px")
    meta["nncf_kept_float"] = ",".join(result.kept_float)
    lines.append(f"accuracy control: {meta['accuracy_control']}; kept float by NNCF: "
                 f"{', '.join(result.kept_float) or 'none'}")
    return result


def check_for_target(path: Path, target: str, lines: list[str]) -> None:
    from stn_deploy.artifacts import load_onnx
    from stn_deploy.export.targets import check_target

    findings = check_target(load_onnx(path), target)
    lines += [f"{target} check: {f.line()}" for f in findings]
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise StnDeployError(f"the graph is not safe for {target}: {errors[0].line()}")


def finish_metadata(path: Path, plan: Plan, report: "VerifyReport", data: "Images",
                    meta: dict[str, str]) -> None:
    """What the file is, was checked for and was verified on, in its metadata_props."""
    import onnx

    from stn_deploy.artifacts import metadata, onnx_opset, set_metadata

    proto = onnx.load(str(path))
    set_metadata(proto, {**metadata(proto), **meta, "precision": plan.precision,
                         "opset": str(onnx_opset(proto)), "target": plan.target,
                         "verification": report.to_json(), "verified_on": data.note})
    onnx.save(proto, str(path))


def build_plan(final: Path, plan: Plan, reference: "Reference", data: "Images",
               config: "ModelConfig", report: "VerifyReport", lines: list[str],
               echo: Callable[[str], None]) -> ExportResult:
    """The TensorRT plan from the verified ONNX, verified itself where TensorRT runs; the
    plan, its sidecar and the ONNX it was built from are written together.

    Written against the TensorRT API (``export.tensorrt.build_engine``); never run here."""
    from stn_deploy.artifacts import sidecar_path
    from stn_deploy.backends import unavailable_reason
    from stn_deploy.export.tensorrt import build_engine
    from stn_deploy.fileio import write_text_atomic

    onnx_out = plan.path.with_suffix(".onnx")
    built = final.with_name("engine.plan")
    side = build_engine(final, built, plan.precision, plan.trt_profile, plan.workspace_mb,
                        plan.timing_cache)
    side["onnx_path"] = onnx_out.name
    why_not = unavailable_reason("trt")
    if why_not is None:  # the plan itself, through the trt runner as bench runs it
        plan_report = verified("TensorRT plan", built, reference, data, config, plan.precision,
                               lines, backend="trt", grids=False)
        side["plan_verification"] = plan_report.to_dict()
    else:
        side["plan_verification"] = f"built, not run: {why_not}"
        lines.append(f"TensorRT plan: built, not run ({why_not}); verified: the ONNX it "
                     "was built from")
    move_into_place(final, onnx_out)
    move_into_place(built, plan.path)
    write_text_atomic(sidecar_path(plan.path), json.dumps(side, indent=2, sort_keys=True))
    lines.append(f"wrote {plan.path}, {sidecar_path(plan.path).name} and {onnx_out}")
    emit(lines, echo)
    return ExportResult(plan.path, onnx_out, lines, report)


def write_ir(onnx_path: Path, plan: Plan, reference: "Reference", data: "Images",
             config: "ModelConfig", lines: list[str],
             echo: Callable[[str], None]) -> ExportResult:
    """OpenVINO IR (.xml + .bin) converted from the verified ONNX graph, its metadata in the
    IR's rt_info under ``stn_deploy``, verified through the openvino runner, and that
    verification (what OpenVINO computed in, on this CPU) recorded in it. FP16 is the FP32
    graph with weights compressed to FP16 (OpenVINO's own FP16 IR: the CPU plugin computes
    in f32 or bf16 from it, so no FP16 island in the STN path to protect); bf16 is the FP32
    graph whose metadata says bf16, so the runner compiles it with bf16 as the inference
    precision, which OpenVINO computes on CPUs with AVX512_BF16 or AMX and in f32 elsewhere
    (the file is the same: it is decided at compile time)."""
    from stn_deploy.artifacts import IR_SECTION, ir_bin_path, read_metadata
    from stn_deploy.backends.ov import import_openvino
    from stn_deploy.export.precision import mark_stn_path_precise

    ov = import_openvino()
    model = ov.convert_model(str(onnx_path))
    if plan.precision != "int8":  # an INT8 IR's float parts are the STN path: the user's choice
        marked = mark_stn_path_precise(model)
        lines.append(f"OpenVINO IR: the STN path ({marked} nodes) marked precision-sensitive, "
                     f"so a CPU computing in bf16 keeps it in f32")
    for key, value in read_metadata(onnx_path).items():
        model.set_rt_info(value, [IR_SECTION, key])
    model.set_rt_info("openvino", [IR_SECTION, "format"])
    xml = onnx_path.with_name("model.xml")
    compress = plan.precision == "fp16"
    ov.save_model(model, str(xml), compress_to_fp16=compress)
    report = verified(f"OpenVINO IR ({plan.precision.upper()})", xml, reference, data, config,
                      plan.precision, lines, backend="openvino", grids=False)
    model.set_rt_info(report.to_json(), [IR_SECTION, "verification"])  # the IR's own
    ov.save_model(model, str(xml), compress_to_fp16=compress)
    move_into_place(ir_bin_path(xml), ir_bin_path(plan.path))
    move_into_place(xml, plan.path)
    lines.append(f"wrote {plan.path} and {ir_bin_path(plan.path).name}")
    emit(lines, echo)
    return ExportResult(plan.path, plan.path, lines, report)  # no ONNX file is written


def verification_failed(what: str, lines: list[str]) -> StnDeployError:
    return StnDeployError(f"{what} verification failed, nothing written:\n" + "\n".join(lines))


def move_into_place(src: Path, dst: Path) -> None:
    """Copy a checked file from the work folder to ``dst`` atomically."""
    from stn_deploy.fileio import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def emit(lines: list[str], echo: Callable[[str], None]) -> None:
    for line in lines:
        echo(line)
