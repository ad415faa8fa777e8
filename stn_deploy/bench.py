"""The bench as a library: ``run_bench(BenchRequest(...))`` runs every (model, backend) pair
through the one harness and returns the report (schema in report.py). ``stn-deploy bench``
only parses options into a request and prints what comes back; scripts call this directly.

Each input is read once: a checkpoint is loaded once and handed to every runner and export
that needs it, the temporary ONNX of a checkpoint is exported once, and the evaluation images
are loaded once for every row.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stn_deploy.artifacts import model_kind, onnx_precision, read_ir_metadata
from stn_deploy.errors import StnDeployError
from stn_deploy.harness import BenchSettings, EvalData, Reference
from stn_deploy.names import DEFAULT_PRECISION, OV_PRECISIONS
from stn_deploy.report import not_accelerated


@dataclass
class BenchRequest:
    models: list[Path]
    backends: tuple[str, ...] | str | None = None  # names, "all", or None (defaults per kind)
    settings: BenchSettings = field(default_factory=BenchSettings)
    dataset: str | None = None  # None: each model's own
    data_dir: str | None = None
    eval_samples: int | None = None  # None: the whole test split; 0: no evaluation
    device: str | None = None  # torch device; TensorRT plans run on cuda:0
    ov_hint: str = "latency"
    ov_precision: str = "fp32"  # "bf16": OpenVINO computes the float parts of FP32, FP16 and
    # INT8 files in bfloat16 (a bf16 IR computes in bf16 by its own metadata, where the CPU has
    # bf16); see ov_compute
    progress: bool = False  # a progress bar on stderr
    # The models were picked by default; this says what to run first when a named backend
    # found none of its kind among them (see plan_rows).
    missing: str | None = None

    def __post_init__(self) -> None:
        if self.ov_precision not in OV_PRECISIONS:  # refused, not run as fp32
            raise StnDeployError(f"ov_precision must be one of {', '.join(OV_PRECISIONS)}, "
                                 f"not {self.ov_precision!r}")


class _Inputs:
    """Every model file of a run, each read once."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._checkpoints: dict[Path, Any] = {}
        self._onnx: dict[Path, Path] = {}

    def checkpoint(self, path: Path) -> Any:
        if path not in self._checkpoints:
            from stn_deploy.checkpoint import load_checkpoint

            self._checkpoints[path] = load_checkpoint(path)
        return self._checkpoints[path]

    def onnx_for(self, ckpt: Path) -> Path:
        """Checkpoints run on ONNX backends through a temporary opset-17 export with the
        theta output (so theta differences are measured)."""
        if ckpt not in self._onnx:
            from stn_deploy.export.onnx_export import OnnxOptions, export_onnx

            target = self.tmp / f"{len(self._onnx)}-{ckpt.stem}.onnx"
            export_onnx(self.checkpoint(ckpt).model(), target,
                        OnnxOptions(opset=17, with_theta=True))
            self._onnx[ckpt] = target
        return self._onnx[ckpt]

    def train_seed(self, model: Path) -> int:
        """The training seed (only matters for the seeded 'rts' distortion of the test
        split)."""
        if model_kind(model) != "checkpoint":
            return 0
        return int(self.checkpoint(model).train_args.get("seed", 0) or 0)

    def runner(self, name: str, path: Path, req: BenchRequest) -> Any:
        """A runner with the request's options; each runner takes those it declares."""
        from stn_deploy.backends import create_runner

        checkpoint = self.checkpoint(path) if model_kind(path) == "checkpoint" else None
        return create_runner(name, path, threads=req.settings.threads, device=req.device,
                             hint=req.ov_hint, compute=ov_compute(name, path, req.ov_precision),
                             checkpoint=checkpoint)


def ov_compute(backend: str, path: Path, ov_precision: str) -> str | None:
    """The openvino runner's ``compute`` for ``--ov-precision``: bf16 for the float parts of
    FP32, FP16 and INT8 files (an FP32 file's row is then labelled bf16, an INT8 or FP16
    file's keeps its label and says it computed in bf16); None for a bf16 IR, bf16 by its own
    metadata, and for fp32, the files' own compute."""
    if backend != "openvino" or ov_precision != "bf16" or stored_precision(path) == "bf16":
        return None
    return "bf16"


def stored_precision(path: Path) -> str:
    """The precision an ONNX file or OpenVINO IR records."""
    if model_kind(path) == "openvino":
        return read_ir_metadata(path).get("precision") or DEFAULT_PRECISION
    return onnx_precision(path)


class _Skip(Exception):
    pass


def plan_rows(models: list[Path], backends: tuple[str, ...] | str | None,
              missing: str | None = None) -> tuple[list[tuple[Path, str]], dict[str, str]]:
    """(model, backend) pairs to run, and {backend: reason} for backends left out of 'all'.

    ``missing``: the models were picked by default, and this says what to run first when a
    named backend found none of its kind among them (unless the backend cannot run here at
    all, which is the more useful line: it names what to install)."""
    from stn_deploy.backends import (BACKENDS, DEFAULT_BACKENDS, available_backends,
                                     unavailable_reason)

    def runs(name: str, kind: str) -> bool:
        kinds = BACKENDS[name].kinds
        return kind in kinds or (kind == "checkpoint" and "onnx" in kinds)

    pairs: list[tuple[Path, str]] = []
    skipped: dict[str, str] = {}
    if backends == "all":
        avail = available_backends()
        skipped = {n: r for n, r in avail.items() if r is not None}
        pairs = [(m, name) for m in models for name in BACKENDS
                 if runs(name, model_kind(m)) and avail[name] is None]
        used = {b for _, b in pairs}
        for name in BACKENDS:
            if name not in used and name not in skipped:
                skipped[name] = "no model of a kind it runs was given"
        return pairs, skipped
    for m in models:
        kind = model_kind(m)
        pairs += [(m, name) for name in backends or DEFAULT_BACKENDS[kind] if runs(name, kind)]
    for name in backends or ():
        if any(b == name for _, b in pairs):
            continue
        if missing is None:
            skipped[name] = f"runs {' or '.join(BACKENDS[name].kinds)} files and none was given"
        else:
            skipped[name] = unavailable_reason(name) or missing
    return pairs, skipped


def load_eval_data(config: Any, dataset: str | None, data_dir: str | None,
                   eval_samples: int | None, seed: int = 0) -> tuple[EvalData | None, str | None]:
    """The test split at the model's input size, or (None, reason) when it cannot be read."""
    from stn_deploy.data import model_split

    if eval_samples == 0:
        return None, "evaluation skipped (--eval-samples 0)"
    name = dataset or config.dataset
    if name in ("cifar10", "imagefolder") and data_dir is None:
        return None, f"no accuracy: the model's dataset is {name}; pass --data-dir"
    try:
        test = model_split(config, "test", data_dir, name=name, seed=seed)
    except StnDeployError as e:
        return None, f"no accuracy: {e}"
    if int(test.images.shape[1]) != config.in_channels:
        raise StnDeployError(f"{name} has {int(test.images.shape[1])}-channel images, the model "
                             f"takes {config.in_channels}")
    if eval_samples is not None:
        test = test.subset(eval_samples)
    applied = None if test.applied is None else test.applied.numpy()
    return EvalData(test.images.numpy(), test.labels.numpy(), name, "test", applied), None


def run_bench(req: BenchRequest) -> dict[str, Any]:
    """Run every (model, backend) pair of ``req``; returns the report (schema in report.py)."""
    from tqdm import tqdm

    import stn_deploy.report as rep
    from stn_deploy.backends import BACKENDS, unavailable_reason
    from stn_deploy.harness import bench_runner, busy_warning, system_info
    from stn_deploy.version import __version__

    pairs, skipped = plan_rows(req.models, req.backends, req.missing)
    if not pairs:
        raise StnDeployError("no available backend runs these models: " +
                             "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    settings = req.settings
    explicit = req.backends not in (None, "all")
    report: dict[str, Any] = {
        "schema_version": rep.SCHEMA_VERSION, "tool": "stn-deploy", "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "system": system_info(), "settings": {**settings.to_dict(),
                                              "eval_samples": req.eval_samples,
                                              "dataset": req.dataset},
        "reference": None, "eval_data": None, "skipped_backends": skipped, "results": [],
        "gate": {"passed": True, "failures": []},
    }
    warning = busy_warning(report["system"]["cpu_busy_pct_at_start"])
    if warning:
        print(warning, file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="stn-bench-") as tmp:
        inputs = _Inputs(Path(tmp))
        reference, data = None, None
        if any(unavailable_reason(b) is None for _, b in pairs):
            reference, data = _reference(req, inputs, report)
        bar = tqdm(total=len(pairs) * (1 + len(settings.batch_sizes)), disable=not req.progress,
                   file=sys.stderr, unit="step", leave=False)
        for model, name in pairs:
            kind = model_kind(model)
            row = rep.new_result(str(model), kind, name, requested=explicit)
            bar.set_description(f"{name} {model.name}")
            try:
                reason = unavailable_reason(name)
                if reason is not None:
                    raise _Skip(reason)
                path = model
                if kind == "checkpoint" and "onnx" in BACKENDS[name].kinds:
                    path = inputs.onnx_for(model)
                    row["source_model"] = str(model)
                    row["notes"].append("ran a temporary opset-17 ONNX export of the checkpoint")
                elif kind not in BACKENDS[name].kinds:
                    raise _Skip(f"{name} runs {' or '.join(BACKENDS[name].kinds)} files, "
                                f"not {kind} files")
                row["size_mb"] = os.path.getsize(path) / 1e6
                bench_runner(inputs.runner(name, path, req), row, settings, data, reference,
                             progress=lambda _s: bar.update(1))
            except _Skip as e:
                row.update(status="skipped", reason=str(e))
            except StnDeployError as e:
                row.update(status="error", reason=str(e))
            row["not_accelerated"] = not_accelerated(row, report["system"]["cpu_isa"])
            report["results"].append(row)
        bar.close()
    return report


def _reference(req: BenchRequest, inputs: _Inputs, report: dict[str, Any]
               ) -> tuple[Reference | None, EvalData | None]:
    """The reference outputs for agreement: the first checkpoint on PyTorch, else the first
    FP32 model (ONNX on ONNX Runtime, a plan on TensorRT), else the first model."""
    from stn_deploy.backends import unavailable_reason
    from stn_deploy.harness import compare_outputs, run_batched

    models = req.models
    ckpts = [m for m in models if model_kind(m) == "checkpoint"]
    if ckpts:
        ref_model, ref_backend = ckpts[0], "torch"
        note = "the PyTorch checkpoint"
    else:
        def fp32(m: Path) -> bool:
            try:
                return model_kind(m) == "onnx" and onnx_precision(m) == "fp32"
            except StnDeployError:  # unreadable files are reported by their own row
                return False

        ref_model = next((m for m in models if fp32(m)), models[0])
        kind = model_kind(ref_model)
        ref_backend = {"plan": "trt", "openvino": "openvino"}.get(kind) or next(
            (b for b in ("onnxruntime", "openvino") if unavailable_reason(b) is None),
            "onnxruntime")
        note = ("no checkpoint given: the first FP32 model is the reference" if fp32(ref_model)
                else "no checkpoint or FP32 model given: the first model is the reference")
    runner = inputs.runner(ref_backend, ref_model, req)
    data, why = load_eval_data(runner.config, req.dataset, req.data_dir, req.eval_samples,
                               seed=inputs.train_seed(ref_model))
    if data is None:
        report["settings"]["eval_note"] = why
        return None, None
    with runner:
        outputs = run_batched(runner, data.images, req.settings.eval_batch)
    acc = compare_outputs(outputs, data.labels).accuracy_pct
    reference = Reference(str(ref_model), ref_backend, runner.precision, outputs, acc, note)
    report["reference"] = reference.to_dict()
    report["eval_data"] = {"dataset": data.dataset, "split": data.split, "n": len(data.images)}
    return reference, data
