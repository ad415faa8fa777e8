"""``stn-deploy profile``: per-node time from the runtime's own profiler, mapped back to ONNX
nodes and STN stages. The work is in ``stn_deploy.debug.profiling``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from stn_deploy.commands.options import (backend_option, batch_sizes, is_stdout, json_option,
                                         write_json_text)

PROFILED = ("onnxruntime", "openvino", "trt")


class _Command(click.Command):
    """One line for a failure the user can act on, also outside the ``stn-deploy`` CLI."""

    def invoke(self, ctx: click.Context) -> Any:
        from stn_deploy.errors import StnDeployError

        try:
            return super().invoke(ctx)
        except StnDeployError as e:
            raise click.ClickException(str(e)) from None


@click.command("profile", cls=_Command)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@backend_option(default_help="onnxruntime for .onnx, trt for a plan",
                note=" (profile reads the profilers of onnxruntime, openvino and trt)")
@click.option("--batch-sizes", callback=batch_sizes, default="1,64", show_default=True,
              metavar="N[,N...]",
              help="Batch sizes to profile at.")
@click.option("--iterations", type=click.IntRange(1), default=20, show_default=True,
              metavar="N",
              help="Profiled runs per batch size.")
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True, metavar="N",
              help="Unprofiled runs before them.")
@click.option("--threads", type=click.IntRange(1), default=None, metavar="N",
              help="CPU threads for the runtime [default: all this process may use].")
@json_option("every kernel, node and stage time", ", instead of the table")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE", help="Write each stage's share as PNG.")
def profile(model: Path, backend: str | None, batch_sizes: tuple[int, ...], iterations: int,
            warmup: int, threads: int | None, json_path: Path | None,
            plot_path: Path | None) -> None:
    """Time MODEL (an ONNX file with GridSample, or a TensorRT plan) node by node with the
    runtime's own profiler, and say what share of inference each part of the spatial
    transformer (localization, theta, grid, sampler) and the classifier takes."""
    from stn_deploy.artifacts import model_kind
    from stn_deploy.debug.profiling import profile_model

    kind = model_kind(model)
    if kind == "checkpoint":
        raise click.BadParameter("must be an ONNX file or a TensorRT plan", param_hint="MODEL")
    backend = backend or ("trt" if kind == "plan" else "onnxruntime")
    if backend not in PROFILED:
        raise click.BadParameter(f"{backend} has no profiler here; choose from "
                                 f"{', '.join(PROFILED)}", param_hint="--backend")
    report = profile_model(model, backend, batch_sizes, iterations=iterations, warmup=warmup,
                           threads=threads)
    for line in report.lines():
        click.echo(line, err=is_stdout(json_path))
    if json_path is not None:
        write_json_text(json_path, json.dumps(report.to_dict(), indent=2, sort_keys=True))
    if plot_path is not None:
        from stn_deploy.debug.report import profile_plot

        profile_plot(report, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
