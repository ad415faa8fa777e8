"""``stn-deploy bench``: accuracy and speed of every deployed form of a model, side by side.

It parses options into a ``stn_deploy.bench.BenchRequest`` and prints what ``run_bench``
returns. The JSON/CSV schema is documented in stn_deploy/report.py; the measurement rules in
stn_deploy/harness.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from stn_deploy.commands.options import (DATASET_CHOICES, OV_PRECISION_CHOICES, SampleCount,
                                         backend_option, batch_sizes, device_option, is_stdout,
                                         json_option, pretrained_option, write_json_text)


@click.command()
@click.argument("models", nargs=-1,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@backend_option(multiple=True, allow_all=True, dest="backends",
                note=" (all: every available one; the rest are listed with the reason)",
                default_help="torch for a checkpoint, onnxruntime and openvino for .onnx, trt "
                             "for a plan")
@pretrained_option("bench its checkpoint and its shipped FP32 ONNX (instead of MODEL...)")
@click.option("--batch-sizes", callback=batch_sizes, default="1,8,64,256", show_default=True)
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
@click.option("--ov-precision", type=click.Choice(OV_PRECISION_CHOICES), default="fp32",
              show_default=True, help="OpenVINO compute precision for the float parts of "
              "FP32, FP16 and INT8 files (a bf16 IR is bf16 by itself). bf16: an FP32 file's "
              "row is labelled bf16, an INT8 or FP16 file's keeps its label and says it computes "
              "bf16; refused on a CPU without AVX512_BF16 or AMX.")
@device_option
@click.option("--dataset", type=click.Choice(DATASET_CHOICES), default=None,
              help="Evaluation data [default: the model's own dataset].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Dataset folder (needed for cifar10 and imagefolder).")
@click.option("--eval-samples", type=SampleCount(allow_none=True), default=None,
              help="First N test images for accuracy/agreement, or all; 0 skips evaluation "
                   "[default: all].")
@click.option("--min-agreement", type=click.FloatRange(0, 100), default=None,
              help="Gate: exit 1 if a backend's top-1 agreement with the reference is below "
                   "this percentage.")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), default=None,
              help="Gate: exit 1 if a backend's accuracy is more than this many points below "
                   "the reference's.")
@json_option("every figure")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every figure as CSV (one line per backend, batch size and mode).")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the summary table as markdown.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write latency and throughput against batch size as PNG.")
@click.option("--quiet", is_flag=True, help="No progress bars and no table (files and the "
              "gate still work).")
def bench(models: tuple[Path, ...], pretrained: str | None, backends: Any,
          batch_sizes: tuple[int, ...],
          iterations: int | None, duration: float | None, warmup: int, compute_only: bool,
          threads: int | None, ov_hint: str, ov_precision: str, device: str,
          dataset: str | None, data_dir: str | None, eval_samples: int | None,
          min_agreement: float | None, max_accuracy_drop: float | None, json_path: Path | None,
          csv_path: Path | None, md_path: Path | None, plot_path: Path | None, quiet: bool) -> None:
    """Measure accuracy and speed of MODEL... (checkpoints, .onnx files, TensorRT plans) on
    each backend that can run them.

    With no MODEL: the last training run's checkpoint (runs/train/last.pt) and its exports in
    export/ (ONNX files and plans whose recorded checkpoint hash is that checkpoint's).

    A gated run (--min-agreement, --max-accuracy-drop) fails when any backend errored, named
    or not; skipped ones (not installed, no GPU) are listed and do not fail it."""
    from stn_deploy.bench import BenchRequest, run_bench
    from stn_deploy.errors import StnDeployError
    from stn_deploy.harness import BenchSettings

    if iterations is not None and duration is not None:
        raise click.UsageError("give --iterations or --duration, not both")
    if iterations is None and duration is None:
        iterations = 100
    settings = BenchSettings(batch_sizes=batch_sizes, iterations=iterations,
                             duration_s=duration, warmup=warmup, threads=threads,
                             compute_only=compute_only)
    gate_asked = min_agreement is not None or max_accuracy_drop is not None
    if gate_asked and eval_samples == 0:
        raise click.UsageError("--min-agreement/--max-accuracy-drop need evaluation "
                               "(--eval-samples is 0)")
    missing = None
    if pretrained is not None:
        from stn_deploy.pretrained import pretrained as shipped

        if models:
            raise click.UsageError("give MODEL... or --pretrained, not both")
        model = shipped(pretrained)
        models = (model.checkpoint, model.onnx)
    if not models:
        from stn_deploy.defaults import EXPORT_DIR, bench_models

        picked, line = bench_models()
        click.echo(line, err=True)
        models = tuple(picked)
        missing = (f"no TensorRT plan of {picked[0]} in {EXPORT_DIR}/: run `stn-deploy export "
                   "--format trt` first")
    report = run_bench(BenchRequest(
        list(models), backends, settings, dataset=dataset, data_dir=data_dir,
        eval_samples=eval_samples, device=device, ov_hint=ov_hint, ov_precision=ov_precision,
        progress=not quiet and sys.stderr.isatty(), missing=missing))
    import stn_deploy.report as rep

    if gate_asked and report["eval_data"] is None:
        raise StnDeployError("the gate needs evaluation data: pass --dataset/--data-dir")
    failures = rep.apply_gate(report["results"], min_agreement, max_accuracy_drop)
    report["settings"].update(min_agreement_pct=min_agreement,
                              max_accuracy_drop_pct=max_accuracy_drop)
    report["gate"] = {"passed": not failures, "failures": failures}
    _write_outputs(report, quiet, json_path, csv_path, md_path, plot_path)
    if _echo_problems(report, backends, failures, gate_asked):
        sys.exit(1)


def _echo_problems(report: dict[str, Any], backends: Any, failures: list[str],
                   gate_asked: bool) -> bool:
    """One stderr line per gate failure, per named backend that errored or was skipped, and
    (gated) per row the gate did not check; True when the run fails. A gated run has already
    turned every errored row into a gate failure line; otherwise only what --backend named
    fails the command."""
    import stn_deploy.report as rep

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
    return bool(failures or errors or unused)


def _write_outputs(report: dict[str, Any], quiet: bool, json_path: Path | None,
                   csv_path: Path | None, md_path: Path | None, plot_path: Path | None) -> None:
    """The table and every file asked for. ``--json -`` takes standard output, so the table
    goes to standard error then: what a pipe reads stays one JSON document."""
    import stn_deploy.report as rep

    if not quiet:
        if is_stdout(json_path):
            from rich.console import Console

            rep.print_table(report, Console(stderr=True))
        else:
            rep.print_table(report)
    if json_path is not None:
        write_json_text(json_path, rep.to_json(report))
        if not quiet and not is_stdout(json_path):
            click.echo(f"wrote {json_path}", err=True)
    for path, writer in ((csv_path, rep.write_csv), (md_path, rep.write_markdown),
                         (plot_path, rep.write_plot)):
        if path is not None:
            writer(report, path)
            if not quiet:
                click.echo(f"wrote {path}", err=True)
