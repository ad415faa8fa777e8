"""``stn-deploy debug``: when a deployed form disagrees, name the node, the STN stage, and
the fix (``compare``), and find what must stay in float (``precision``).

The work is in ``stn_deploy.debug``; this module parses options and prints.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from stn_deploy.commands.options import SampleCount, is_stdout, json_option, write_json_text


class _Group(click.Group):
    """Failures the user can act on print one line (``Error: ...``, exit 1), also when this
    group runs on its own (tests, embedding) rather than under the ``stn-deploy`` CLI."""

    def invoke(self, ctx: click.Context) -> Any:
        from stn_deploy.errors import StnDeployError

        try:
            return super().invoke(ctx)
        except StnDeployError as e:
            raise click.ClickException(str(e)) from None


def _data_dir_option(f: Any) -> Any:
    return click.option("--data-dir", type=click.Path(exists=True, file_okay=False,
                                                      path_type=str), default=None,
                        metavar="DIR",
                        help="The model's dataset folder (cifar10, imagefolder, "
                             "fashion-mnist); digits needs none.")(f)


def _threads_option(f: Any) -> Any:
    return click.option("--threads", type=click.IntRange(1), default=None, metavar="N",
                        help="CPU threads for ONNX Runtime [default: all it may use].")(f)


def _emit(lines: list[str], to_stderr: bool) -> None:
    for line in lines:
        click.echo(line, err=to_stderr)


@click.group("debug", cls=_Group)
def debug() -> None:
    """Find where a deployed form goes wrong: which node, which part of the spatial
    transformer (localization, theta, grid, sampler, classifier), and the fix."""


@debug.command("compare")
@click.argument("suspect", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="REF: the checkpoint or the FP32 ONNX file [default: the checkpoint "
                   "SUSPECT's metadata records, found beside it, in . or in runs/train/].")
@_data_dir_option
@click.option("--samples", type=SampleCount(), default="256", show_default=True,
              help="Test images to compare on (a file without stn-deploy metadata gets this "
                   "many random inputs).")
@click.option("--atol", type=click.FloatRange(0), default=None,
              help="Absolute bound per value [default: SUSPECT's precision's own].")
@click.option("--rtol", type=click.FloatRange(0), default=None,
              help="Relative bound per value [default: SUSPECT's precision's own].")
@json_option("every node's errors and the first divergent node", ", instead of the table")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="Write the error along the graph, STN stages shaded, as PNG.")
@_threads_option
def compare(suspect: Path, reference: Path | None, data_dir: str | None, samples: int | None,
            atol: float | None, rtol: float | None, json_path: Path | None,
            plot_path: Path | None, threads: int | None) -> None:
    """Run SUSPECT (an ONNX file of any precision, or a TensorRT plan) and REF on the same
    images with every intermediate tensor exposed, and name the first node that diverges,
    its STN stage and the likely fix.

    Exit 0 when no node diverges, 1 when one does, 2 for a usage error."""
    from stn_deploy.artifacts import model_kind
    from stn_deploy.debug.comparison import compare_files
    from stn_deploy.errors import StnDeployError

    if model_kind(suspect) == "checkpoint":
        raise click.BadParameter("must be an ONNX file or a TensorRT plan (.plan); a "
                                 "checkpoint is a reference: pass it as --reference",
                                 param_hint="SUSPECT")
    if reference is not None and model_kind(reference) == "plan":
        raise click.BadParameter("must be the checkpoint or the FP32 ONNX file, not a plan",
                                 param_hint="--reference")
    if reference is None:
        from stn_deploy.debug.comparison import resolve_reference
        from stn_deploy.debug.inputs import load_model

        try:
            sus = load_model(suspect) if model_kind(suspect) == "onnx" else None
            reference = resolve_reference(None, suspect, sus)
        except StnDeployError as e:
            raise click.UsageError(str(e)) from None
    report = compare_files(suspect, reference, samples=samples, data_dir=data_dir, atol=atol,
                           rtol=rtol, threads=threads)
    _emit(report.lines(), to_stderr=is_stdout(json_path))
    if json_path is not None:
        import json

        write_json_text(json_path, json.dumps(report.to_dict(), indent=2, sort_keys=True))
    if plot_path is not None:
        from stn_deploy.debug.report import compare_plot

        compare_plot(report, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
    sys.exit(0 if report.passed else 1)


@debug.command("precision")
@click.argument("fp32", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--precision", type=click.Choice(["fp16", "int8"]), required=True,
              help="The variant to repair.")
@click.option("--variant", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="An INT8 QDQ graph of FP32 to repair [default: quantize every node here, "
                   "calibrated on the model's training images].")
@_data_dir_option
@click.option("--samples", type=SampleCount(), default="all", show_default=True,
              help="Test images each candidate is judged on.")
@click.option("--calib-dir", type=click.Path(exists=True, file_okay=False, path_type=str),
              default=None, metavar="DIR",
              help="Dataset folder for INT8 calibration [default: --data-dir].")
@click.option("--calib-samples", type=SampleCount(), default="500", show_default=True,
              help="Training images to calibrate INT8 on.")
@json_option("the set (`keep_float`) and the verdicts", ", instead of the text")
@_threads_option
def precision(fp32: Path, precision: str, variant: Path | None, data_dir: str | None,
              samples: int | None, calib_dir: str | None, calib_samples: int | None,
              json_path: Path | None, threads: int | None) -> None:
    """Find a small set of nodes an FP16 or INT8 variant of FP32 must keep in float to meet
    its gates (top-1 agreement, and the grid's shift in pixels), by bisection over the graph,
    the STN's stages first.

    Pass the written JSON to `stn-deploy export --keep-float FILE` for an export with them
    in float."""
    from stn_deploy.artifacts import graph_precision
    from stn_deploy.debug.inputs import load_model
    from stn_deploy.debug.precision import find_keep_float, to_json

    if graph_precision(load_model(fp32)) != "fp32":
        raise click.BadParameter("must be the FP32 graph the variant is made from",
                                 param_hint="FP32")
    if variant is not None and precision != "int8":
        raise click.UsageError("--variant takes an INT8 QDQ graph: use it with --precision int8")
    result = find_keep_float(fp32, precision, variant=variant, samples=samples,
                             data_dir=data_dir, calib_dir=calib_dir,
                             calib_samples=calib_samples or 500, threads=threads)
    _emit(result.lines(), to_stderr=is_stdout(json_path))
    if json_path is not None:
        write_json_text(json_path, to_json(result))
