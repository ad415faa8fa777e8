"""``stn-deploy export`` as one function: export, verify, precision variant, verify, engine.

Everything is built in a temporary folder and moved to the output path only after every check
passed, so a failed export leaves no file behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stn_deploy.defaults import EXPORT_DIR
from stn_deploy.errors import StnDeployError


@dataclass
class ExportRequest:
    checkpoint: Path
    format: str = "onnx"  # onnx | engine
    precision: str = "fp32"
    opset: int = 17
    out: Path | None = None
    static_batch: int | None = None
    with_theta: bool = False
    embed_preprocess: bool = False
    exporter: str | None = None
    affine_grid_op: bool = False
    data_dir: Path | None = None
    calib_data: Path | None = None
    calib_samples: int = 500
    verify_samples: int = 0  # 0: the whole test split
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 256
    workspace_mb: int = 1024
    timing_cache: Path | None = None
    target: str | None = None  # None: tensorrt for engines, onnxruntime otherwise


@dataclass
class ExportResult:
    path: Path
    onnx_path: Path
    lines: list[str] = field(default_factory=list)
    report: object | None = None


def default_out(req: ExportRequest, root: Path = EXPORT_DIR) -> Path:
    suffix = ".plan" if req.format == "engine" else ".onnx"
    return root / f"{req.checkpoint.stem}-opset{req.opset}-{req.precision}{suffix}"


def run_export(req: ExportRequest, echo: Callable[[str], None] = print) -> ExportResult:
    import onnx

    from stn_deploy.artifacts import metadata, onnx_opset, sidecar_path, set_metadata
    from stn_deploy.backends import unavailable_reason
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export import precision as prec
    from stn_deploy.export import targets
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx
    from stn_deploy.export.verify import (TOLERANCES, torch_reference, verification_data,
                                          verify_file)
    from stn_deploy.fileio import write_text_atomic
    from stn_deploy.health import measure_set

    target = req.target or ("tensorrt" if req.format == "engine" else "onnxruntime")
    if req.format == "engine":
        if target != "tensorrt":
            raise StnDeployError("--format engine builds for --target tensorrt only")
        from stn_deploy.export.tensorrt import cuda_device, import_tensorrt, trt_major

        trt_major(import_tensorrt())  # fail before any work when TensorRT cannot run
        cuda_device()
    if req.format == "onnx" and target == "tensorrt" and req.opset >= 20:
        raise StnDeployError(f"TensorRT reads opset-{req.opset} GridSample 'linear' as nearest "
                             "(NVIDIA/TensorRT#4646): pass --opset 19 for --target tensorrt")
    out = Path(req.out) if req.out else default_out(req)
    if out.exists() and out.is_dir():
        raise StnDeployError(f"--out {out} is a folder; give a file path")
    ckpt = load_checkpoint(req.checkpoint)
    model = ckpt.model()
    config = ckpt.config
    logging.getLogger("root").setLevel(logging.ERROR)  # quantizer's pre-processing hint

    with tempfile.TemporaryDirectory(prefix="stn-export-") as work_dir:
        work = Path(work_dir)
        fp32 = work / "fp32.onnx"
        options = OnnxOptions(opset=req.opset, static_batch=req.static_batch,
                              with_theta=req.with_theta, embed_preprocess=req.embed_preprocess,
                              exporter=req.exporter, affine_grid_op=req.affine_grid_op)
        extra = {"source_sha256": ckpt.sha256(), "source_checkpoint": req.checkpoint.name,
                 "precision": "fp32"}
        export_onnx(model, fp32, options, extra)
        proto = onnx.load(str(fp32))
        lines = [f"exported {req.checkpoint.name} at opset {req.opset} with the "
                 f"{metadata(proto).get('exporter', '?')} exporter"]
        if req.format == "engine":  # rewrite first, so the graph verified is the one built
            proto, changes = targets.make_safe(proto, target)
            lines += changes
            onnx.save(proto, str(fp32))
        test, note = verification_data(config, "test", req.data_dir or req.calib_data,
                                       req.verify_samples)
        images = test.images.numpy()
        labels = test.labels.numpy()
        reference = torch_reference(req.checkpoint, images, ckpt)
        report = verify_file(fp32, reference, images, labels, config, TOLERANCES["fp32"])
        lines += [f"FP32 ONNX on the {note}:", *report.lines()]
        if not report.passed:
            raise verification_failed("FP32", lines)
        health = measure_set(model, test)
        lines.append(f"STN health on the {note}: {health.summary()}")
        lines += [f"warning: {w}" for w in getattr(health, "warnings", [])]
        final = fp32
        if req.precision == "fp16":
            final = prec.convert_fp16(fp32, work / "fp16.onnx")
        elif req.precision == "int8":
            calib, cnote = verification_data(config, "train", req.calib_data or req.data_dir,
                                             req.calib_samples)
            lines.append(f"INT8 calibration on {len(calib)} images of the {cnote}")
            final = prec.quantize_int8(fp32, work / "int8.onnx", calib.images, config)
        if req.precision != "fp32":
            report = verify_file(final, reference, images, labels, config,
                                 TOLERANCES[req.precision])
            lines += [f"{req.precision.upper()} ONNX:", *report.lines()]
            if not report.passed:
                raise verification_failed(req.precision, lines)
        proto = onnx.load(str(final))
        findings = targets.check_target(proto, target)
        lines += [f"{target} check: {f.line()}" for f in findings]
        errors = [f for f in findings if f.severity == "error"]
        if errors:
            raise StnDeployError(f"the graph is not safe for {target}: {errors[0].line()}")
        meta = metadata(proto)
        meta.update(precision=req.precision, opset=str(onnx_opset(proto)),
                    verification=report.to_json(),
                    stn_health=json.dumps(health.to_dict(), sort_keys=True))
        set_metadata(proto, meta)
        onnx.save(proto, str(final))

        if req.format == "onnx":
            move_into_place(final, out)
            lines.append(f"wrote {out}")
            emit(lines, echo)
            return ExportResult(out, out, lines, report)
        from stn_deploy.export.tensorrt import build_engine

        onnx_out = out.with_suffix(".onnx")
        built = work / "engine.plan"
        side = build_engine(final, built, req.precision,
                            (req.min_batch, req.opt_batch, req.max_batch), req.workspace_mb,
                            req.timing_cache)
        side["onnx_path"] = onnx_out.name
        # The plan itself, through the trt runner as bench runs it, where it can run here.
        why_not = unavailable_reason("trt")
        if why_not is None:
            plan_report = verify_file(built, reference, images, labels, config,
                                      TOLERANCES[req.precision], backend="trt")
            lines += ["TensorRT plan:", *plan_report.lines()]
            if not plan_report.passed:
                raise verification_failed("TensorRT plan", lines)
            side["plan_verification"] = plan_report.to_dict()
        else:
            side["plan_verification"] = f"built, not run: {why_not}"
            lines.append(f"TensorRT plan: built, not run ({why_not}); verified: the ONNX it "
                         "was built from")
        move_into_place(final, onnx_out)
        move_into_place(built, out)
        write_text_atomic(sidecar_path(out), json.dumps(side, indent=2, sort_keys=True))
        lines.append(f"wrote {out}, {sidecar_path(out).name} and {onnx_out}")
        emit(lines, echo)
        return ExportResult(out, onnx_out, lines, report)


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
