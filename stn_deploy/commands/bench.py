"""``stn-deploy bench``: accuracy and speed of every deployed form of a model, side by side.

The JSON/CSV schema is documented in stn_deploy/report.py; the measurement rules in
stn_deploy/harness.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from stn_deploy.commands.options import DATASET_CHOICES


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not sizes or any(s < 1 for s in sizes):
        raise click.BadParameter("batch sizes must be positive integers")
    return tuple(sorted(set(sizes)))


def _backends(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return "all"
    from stn_deploy.backends import BACKENDS

    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise click.BadParameter(f"unknown backend {', '.join(unknown) or value!r}; choose from "
                                 f"{', '.join(BACKENDS)} or all")
    return tuple(dict.fromkeys(names))


@click.command()
@click.argument("models", nargs=-1,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--backend", "backends", callback=_backends, default=None, metavar="NAMES",
              help="Comma-separated backends, or 'all' (every available one; the rest are "
                   "listed with the reason). [default: torch for a checkpoint, onnxruntime and "
                   "openvino for .onnx, trt for a plan]")
@click.option("--batch-sizes", callback=_batch_sizes, default="1,8,64,256", show_default=True)
@click.option("--iterations", type=click.IntRange(1), default=None,
              help="Timed iterations per batch size and mode [default: 100 unless --duration].")
@click.option("--duration", type=click.FloatRange(0, min_open=True), default=None,
              help="Seconds of timed iterations per batch size and mode (instead of "
                   "--iterations).")
@click.option("--warmup", type=click.IntRange(0), default=10, show_default=True,
              help="Untimed runs before each timed loop.")
@click.option("--compute-only/--no-compute-only", default=True, show_default=True,
              help="Also time compute-only latency where the runtime can separate it.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads per runtime [default: all CPUs this process may use].")
@click.option("--ov-hint", type=click.Choice(["latency", "throughput"]), default="latency",
              show_default=True, help="OpenVINO performance hint (throughput: a batch is "
              "split across concurrent requests).")
@click.option("--ov-precision", type=click.Choice(["f32", "bf16"]), default="f32",
              show_default=True, help="OpenVINO compute precision for FP32 files. bf16 is "
              "OpenVINO's own default on CPUs with AVX512_BF16 or AMX; its row is labelled bf16.")
@click.option("--device", default=None, help="torch device (cpu, cuda:0) [default: cpu].")
@click.option("--dataset", type=click.Choice(DATASET_CHOICES), default=None,
              help="Evaluation data [default: the model's own dataset].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Dataset folder (needed for cifar10 and imagefolder).")
@click.option("--eval-samples", type=click.IntRange(0), default=None,
              help="First N test images for accuracy/agreement; 0 skips evaluation "
                   "[default: the whole test split].")
@click.option("--min-agreement", type=click.FloatRange(0, 100), default=None,
              help="Gate: exit 1 if a backend's top-1 agreement with the reference is below "
                   "this percentage.")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), default=None,
              help="Gate: exit 1 if a backend's accuracy is more than this many points below "
                   "the reference's.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write every figure as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every figure as CSV (one line per backend, batch size and mode).")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the summary table as markdown.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write latency and throughput against batch size as PNG.")
@click.option("--quiet", is_flag=True, help="No progress bars and no table (files and the "
              "gate still work).")
def bench(models: tuple[Path, ...], backends: Any, batch_sizes: tuple[int, ...],
          iterations: int | None, duration: float | None, warmup: int, compute_only: bool,
          threads: int | None, ov_hint: str, ov_precision: str, device: str | None,
          dataset: str | None, data_dir: str | None, eval_samples: int | None,
          min_agreement: float | None, max_accuracy_drop: float | None, json_path: Path | None, csv_path: Path | None,
          md_path: Path | None, plot_path: Path | None, quiet: bool) -> None:
    """Measure accuracy and speed of MODEL... (checkpoints, .onnx files, TensorRT plans) on
    each backend that can run them.

    With no MODEL: the last training run's checkpoint (runs/train/last.pt) and its exports in
    export/ (ONNX files and plans whose recorded checkpoint hash is that checkpoint's).

    A gated run (--min-agreement, --max-accuracy-drop) fails when any backend errored, named
    or not; skipped ones (not installed, no GPU) are listed and do not fail it."""
    from stn_deploy.errors import StnDeployError
    from stn_deploy.harness import BenchSettings

    if iterations is not None and duration is not None:
        raise click.UsageError("give --iterations or --duration, not both")
    if iterations is None and duration is None:
        iterations = 100
    settings = BenchSettings(batch_sizes=batch_sizes, iterations=iterations,
                             duration_s=duration, warmup=warmup, threads=threads,
                             compute_only=compute_only, eval_batch=max(batch_sizes))
    gate_asked = min_agreement is not None or max_accuracy_drop is not None
    if gate_asked and eval_samples == 0:
        raise click.UsageError("--min-agreement/--max-accuracy-drop need evaluation "
                               "(--eval-samples is 0)")
    missing = None
    if not models:
        from stn_deploy.defaults import EXPORT_DIR, bench_models

        picked, line = bench_models()
        click.echo(line, err=True)
        models = tuple(picked)
        missing = (f"no TensorRT plan of {picked[0]} in {EXPORT_DIR}/: run `stn-deploy export "
                   "--format engine` first")
    report = run_bench(list(models), backends, settings, dataset=dataset, data_dir=data_dir,
                       eval_samples=eval_samples, device=device, ov_hint=ov_hint,
                       ov_precision=ov_precision, quiet=quiet, missing=missing)
    from stn_deploy import report as rep

    if gate_asked and report["eval_data"] is None:
        raise StnDeployError("the gate needs evaluation data: pass --dataset/--data-dir")
    failures = rep.apply_gate(report["results"], min_agreement, max_accuracy_drop)
    report["settings"].update(min_agreement_pct=min_agreement,
                              max_accuracy_drop_pct=max_accuracy_drop)
    report["gate"] = {"passed": not failures, "failures": failures}
    if not quiet:
        rep.print_table(report)
    for path, writer in ((json_path, rep.write_json), (csv_path, rep.write_csv),
                         (md_path, rep.write_markdown), (plot_path, rep.write_plot)):
        if path is not None:
            writer(report, path)
            if not quiet:
                click.echo(f"wrote {path}", err=True)
    # A gated run has already turned every errored row into a gate failure line; otherwise
    # only what --backend named fails the command.
    errors = [r for r in report["results"] if r.get("requested") and (
        r["status"] == "skipped" or (r["status"] == "error" and not gate_asked))]
    for line in failures:
        click.echo(line, err=True)
    for r in errors:
        click.echo(f"{r['status']} {rep.label(r)}: {r['reason']}", err=True)
    unused = [] if backends in (None, "all") else [
        f"skipped {name}: {reason}" for name, reason in report["skipped_backends"].items()]
    for line in unused:
        click.echo(line, err=True)
    if gate_asked:  # what the gate did not check, so a CI log says so even with --quiet
        for r in report["results"]:
            if r["status"] == "skipped" and not r.get("requested"):
                click.echo(f"not gated: skipped {rep.label(r)}: {r['reason']}", err=True)
        if backends == "all":
            for name, reason in report["skipped_backends"].items():
                click.echo(f"not gated: skipped {name}: {reason}", err=True)
    if failures or errors or unused:
        sys.exit(1)


# ---------------------------------------------------------------------------- the work

def plan_rows(models: list[Path], backends: Any, missing: str | None = None
              ) -> tuple[list[tuple[Path, str]], dict[str, str]]:
    """(model, backend) pairs to run, and {backend: reason} for backends left out of 'all'.

    ``missing``: the models were picked by default, and this says what to run first when a
    named backend found none of its kind among them (unless the backend cannot run here at
    all, which is the more useful line: it names what to install)."""
    from stn_deploy.backends import (BACKENDS, DEFAULT_BACKENDS, available_backends,
                                     unavailable_reason)
    from stn_deploy.backends.base import model_kind

    pairs: list[tuple[Path, str]] = []
    skipped: dict[str, str] = {}
    if backends == "all":
        avail = available_backends()
        skipped = {n: r for n, r in avail.items() if r is not None}
        for m in models:
            kind = model_kind(m)
            for name, info in BACKENDS.items():
                runs = kind in info.kinds or (kind == "checkpoint" and "onnx" in info.kinds)
                if runs and avail[name] is None:
                    pairs.append((m, name))
        used = {b for _, b in pairs}
        for name in BACKENDS:
            if name not in used and name not in skipped:
                skipped[name] = "no model of a kind it runs was given"
        return pairs, skipped
    for m in models:
        kind = model_kind(m)
        for name in backends or DEFAULT_BACKENDS[kind]:
            info = BACKENDS[name]
            if kind in info.kinds or (kind == "checkpoint" and "onnx" in info.kinds):
                pairs.append((m, name))
    for name in backends or ():
        if any(b == name for _, b in pairs):
            continue
        if missing is None:
            skipped[name] = f"runs {' or '.join(BACKENDS[name].kinds)} files and none was given"
        else:
            skipped[name] = unavailable_reason(name) or missing
    return pairs, skipped


def load_eval_data(config: Any, dataset: str | None, data_dir: str | None,
                   eval_samples: int | None, seed: int = 0) -> tuple[Any, str | None]:
    """The test split at the model's input size, or (None, reason) when it cannot be read."""
    from stn_deploy.data import model_split
    from stn_deploy.errors import StnDeployError
    from stn_deploy.harness import EvalData

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


def run_bench(models: list[Path], backends: Any, settings: Any, *, dataset: str | None = None,
              data_dir: str | None = None, eval_samples: int | None = None,
              device: str | None = None, ov_hint: str = "latency",
              ov_precision: str = "f32", quiet: bool = False,
              missing: str | None = None) -> dict[str, Any]:
    """Run every (model, backend) pair; returns the report (schema in report.py).
    ``missing``: see plan_rows."""
    import datetime
    import tempfile

    from tqdm import tqdm

    from stn_deploy import __version__
    from stn_deploy import report as rep
    from stn_deploy.backends import create_runner, unavailable_reason
    from stn_deploy.backends.base import model_kind, onnx_precision
    from stn_deploy.errors import StnDeployError
    from stn_deploy.harness import bench_runner, busy_warning, system_info

    pairs, skipped = plan_rows(models, backends, missing)
    if not pairs:
        raise StnDeployError("no available backend runs these models: " +
                             "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    explicit = backends not in (None, "all")
    report: dict[str, Any] = {
        "schema_version": rep.SCHEMA_VERSION, "tool": "stn-deploy", "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "system": system_info(), "settings": {**settings.to_dict(), "eval_samples": eval_samples,
                                              "dataset": dataset},
        "reference": None, "eval_data": None, "skipped_backends": skipped, "results": [],
        "gate": {"passed": True, "failures": []},
    }
    warning = busy_warning(report["system"]["cpu_busy_pct_at_start"])
    if warning:
        print(warning, file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="stn-bench-") as tmp:
        exported: dict[Path, Path] = {}

        def onnx_for(ckpt: Path) -> Path:
            """Checkpoints run on ONNX backends through a temporary opset-17 export with the
            theta output (so theta differences are measured)."""
            if ckpt not in exported:
                from stn_deploy.checkpoint import load_checkpoint
                from stn_deploy.export.onnx_export import OnnxOptions, export_onnx

                target = Path(tmp) / f"{len(exported)}-{ckpt.stem}.onnx"
                export_onnx(load_checkpoint(ckpt).model(), target,
                            OnnxOptions(opset=17, with_theta=True))
                exported[ckpt] = target
            return exported[ckpt]

        reference, data = None, None
        if any(unavailable_reason(b) is None for _, b in pairs):
            reference, data = _reference(models, settings, dataset, data_dir, eval_samples,
                                         device, report, onnx_for)
        steps_per_row = 1 + len(settings.batch_sizes)
        bar = tqdm(total=len(pairs) * steps_per_row, disable=quiet, file=sys.stderr,
                   unit="step", leave=False)
        for model, name in pairs:
            kind = model_kind(model)
            row = rep.new_result(str(model), kind, name, requested=explicit)
            bar.set_description(f"{name} {model.name}")
            try:
                reason = unavailable_reason(name)
                if reason is not None:
                    raise _Skip(reason)
                path = model
                from stn_deploy.backends import BACKENDS

                if kind == "checkpoint" and "onnx" in BACKENDS[name].kinds:
                    path = onnx_for(model)
                    row["source_model"] = str(model)
                    row["notes"].append("ran a temporary opset-17 ONNX export of the checkpoint")
                elif kind not in BACKENDS[name].kinds:
                    raise _Skip(f"{name} runs {' or '.join(BACKENDS[name].kinds)} files, "
                                f"not {kind} files")
                row["size_mb"] = os.path.getsize(path) / 1e6
                opts: dict[str, Any] = {"threads": settings.threads}
                if name.startswith("torch"):
                    opts["device"] = device
                if name == "openvino":
                    opts["hint"] = ov_hint
                    if ov_precision == "bf16" and onnx_precision(path) == "fp32":
                        opts["precision"] = "bf16"
                runner = create_runner(name, path, **opts)
                bench_runner(runner, row, settings, data, reference,
                             progress=lambda _s: bar.update(1))
            except _Skip as e:
                row.update(status="skipped", reason=str(e))
            except StnDeployError as e:
                row.update(status="error", reason=str(e))
            report["results"].append(row)
        bar.close()
    return report


class _Skip(Exception):
    pass


def _reference(models: list[Path], settings: Any, dataset: str | None, data_dir: str | None,
               eval_samples: int | None, device: str | None, report: dict[str, Any],
               onnx_for: Any) -> tuple[Any, Any]:
    """The reference outputs for agreement: the first checkpoint on PyTorch, else the first
    FP32 model (ONNX on ONNX Runtime, a plan on TensorRT), else the first model."""
    from stn_deploy.backends import create_runner, unavailable_reason
    from stn_deploy.backends.base import model_kind, onnx_precision
    from stn_deploy.harness import Reference, compare_outputs, run_batched

    ckpts = [m for m in models if model_kind(m) == "checkpoint"]
    note = ""
    if ckpts:
        ref_model, ref_backend = ckpts[0], "torch"
        note = "the PyTorch checkpoint"
    else:
        def fp32(m: Path) -> bool:
            try:
                return model_kind(m) == "onnx" and onnx_precision(m) == "fp32"
            except Exception:  # unreadable files are reported by their own row
                return False

        ref_model = next((m for m in models if fp32(m)), models[0])
        kind = model_kind(ref_model)
        ref_backend = "trt" if kind == "plan" else next(
            (b for b in ("onnxruntime", "openvino") if unavailable_reason(b) is None),
            "onnxruntime")
        note = ("no checkpoint given: the first FP32 model is the reference" if fp32(ref_model)
                else "no checkpoint or FP32 model given: the first model is the reference")
    opts: dict[str, Any] = {"threads": settings.threads}
    if ref_backend == "torch":
        opts["device"] = device
    runner = create_runner(ref_backend, ref_model, **opts)
    data, why = load_eval_data(runner.config, dataset, data_dir, eval_samples,
                               seed=_train_seed(ref_model))
    if data is None:
        report["settings"]["eval_note"] = why
        return None, None
    with runner:
        outputs = run_batched(runner, data.images, settings.eval_batch)
    acc = compare_outputs(outputs, data.labels).accuracy_pct
    reference = Reference(str(ref_model), ref_backend, runner.precision, outputs, acc, note)
    report["reference"] = reference.to_dict()
    report["eval_data"] = {"dataset": data.dataset, "split": data.split, "n": len(data.images)}
    return reference, data


def _train_seed(model: Path) -> int:
    """The training seed (only matters for the seeded 'rts' distortion of the test split)."""
    from stn_deploy.backends.base import model_kind

    if model_kind(model) != "checkpoint":
        return 0
    from stn_deploy.checkpoint import load_checkpoint

    return int(load_checkpoint(model).train_args.get("seed", 0) or 0)
