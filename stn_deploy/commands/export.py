"""``stn-deploy export``: a checkpoint or your own ``nn.Module`` to a verified ONNX file,
OpenVINO IR or TensorRT plan.

Every parameter is named as the ``ExportRequest`` field it fills, so the command is one
mapping onto the request that ``stn_deploy.export_model`` fills too; the pipeline does the
rest and refuses by name what it cannot honour (shown here as a usage error, exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from stn_deploy.commands.options import (PRECISION_CHOICES, TARGET_CHOICES, TRT, AliasChoice,
                                         SampleCount, pretrained_option)
from stn_deploy.export.request import CALIB_SAMPLES, QUANTIZERS, TRT_PROFILE, WORKSPACE_MB
from stn_deploy.names import DEFAULT_PRECISION

FILE = click.Path(dir_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
PROFILE_TEXT = ",".join(str(v) for v in TRT_PROFILE)


def _parsed(parse: Any) -> Any:
    """A click callback from a parser that raises StnDeployError (a usage error here)."""
    from stn_deploy.errors import StnDeployError

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except StnDeployError as e:
            raise click.BadParameter(str(e)) from None
    return callback


def _input_shape(text: str) -> tuple[int, ...]:
    from stn_deploy.errors import StnDeployError

    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise StnDeployError(f"{text!r}: expected CxHxW, e.g. 1x28x28")
    return shape


def _floats(text: str) -> tuple[float, ...]:
    from stn_deploy.errors import StnDeployError

    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise StnDeployError(f"{text!r}: expected comma-separated numbers") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(","))


def _profile(text: str) -> tuple[int, int, int]:
    from stn_deploy.export.request import parse_trt_profile

    return parse_trt_profile(text)


@click.command("export")
@click.argument("checkpoint", required=False, default=None, type=EXISTING_FILE)
@pretrained_option("export its checkpoint (instead of CHECKPOINT)")
@click.option("--format", "format", type=AliasChoice(("onnx", TRT, "openvino")), default="onnx",
              show_default=True, help="trt: a TensorRT plan (needs tensorrt and a GPU); "
              "openvino: OpenVINO IR, .xml + .bin (needs openvino).")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES),
              default=DEFAULT_PRECISION, show_default=True,
              help="fp16/int8 keep the STN path (theta, grid, sampler) in FP32. bf16: "
                   "--format openvino only, an IR that OpenVINO computes in bf16 on CPUs "
                   "with AVX512_BF16 or AMX (in f32 elsewhere).")
@click.option("--keep-float", type=EXISTING_FILE, default=None, metavar="FILE",
              help="fp16/int8: also keep these nodes in float: the JSON 'debug precision "
                   "--json' writes, or a JSON list of node names.")
@click.option("--quantizer", type=click.Choice(QUANTIZERS), default=None,
              help="int8: whose quantizer [default: nncf for --target openvino, else "
                   "onnxruntime]. nncf leaves the regressor, grid and sampler float and "
                   "quantizes the localization convolutions.")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100, min_open=True),
              default=None, metavar="POINTS",
              help="int8 with nncf: keep layers float until top-1 accuracy is within POINTS "
                   "of FP32's on half the verification images; nothing written if it cannot.")
@click.option("--opset", type=click.IntRange(1, None), default=17, show_default=True,
              help="Exact ONNX opset to write (16 up to what torch and onnx support here).")
@click.option("--out", type=FILE, default=None,
              help="Output file [default: export/<model>-opset<N>-<precision>.onnx|.xml|.plan].")
@click.option("--static-batch", type=click.IntRange(1, None), default=None,
              help="Fixed batch size instead of a dynamic batch dimension.")
@click.option("--with-theta", is_flag=True,
              help="Add theta as an output (your own module: the theta of each F.affine_grid "
                   "call, theta or theta0, theta1, ...).")
@click.option("--embed-preprocess", is_flag=True,
              help="Graph takes uint8 NHWC images and normalises inside.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default=None,
              help="torch exporter [default: torchscript while torch has it, else dynamo; "
                   "dynamo graphs below opset 18 are converted down by stn-deploy].")
@click.option("--affine-grid-op", is_flag=True,
              help="Write the ONNX AffineGrid op (opset 20+, torchscript exporter) instead of "
                   "the constant base grid and MatMul.")
@click.option("--target", type=AliasChoice(TARGET_CHOICES), default=None,
              help="Runtime to check the graph for [default: trt for --format trt, openvino "
                   "for --format openvino, else onnxruntime].")
@click.option("--data-dir", type=EXISTING_DIR, default=None,
              help="Images to verify on: the checkpoint's dataset (digits, fashion-mnist: not "
                   "needed), or an image folder (test/) for --factory.")
@click.option("--calib-dir", type=EXISTING_DIR, default=None,
              help="INT8 calibration images (the train split) [default: --data-dir].")
@click.option("--verify-samples", type=SampleCount(), default="all", show_default=True,
              help="Test images to verify on.")
@click.option("--calib-samples", type=SampleCount(), default=str(CALIB_SAMPLES),
              show_default=True, help="Training images to calibrate INT8 on.")
@click.option("--trt-profile", default=None, metavar="MIN,OPT,MAX",
              callback=_parsed(_profile),
              help=f"--format trt: the batch profile [default: {PROFILE_TEXT}; with "
                   "--static-batch N: N,N,N].")
@click.option("--workspace-mb", type=click.IntRange(1, None), default=None,
              help=f"--format trt: the builder's workspace limit [default: {WORKSPACE_MB}].")
@click.option("--timing-cache", type=FILE, default=None,
              help="--format trt: a timing cache file, read if present, updated after.")
@click.option("--factory", default=None, metavar="PACKAGE.MODULE:FACTORY",
              help="Export your own nn.Module instead of a CHECKPOINT: a callable returning "
                   "it, or the module object.")
@click.option("--weights", type=EXISTING_FILE, default=None,
              help="--factory: a state dict, loaded with weights_only=True.")
@click.option("--input-shape", default=None, metavar="CxHxW", callback=_parsed(_input_shape),
              help="--factory: the input shape without the batch, e.g. 1x28x28.")
@click.option("--mean", default=None, callback=_parsed(_floats),
              help="--factory: per-channel mean of pixel/255, comma-separated [default: 0].")
@click.option("--std", default=None, callback=_parsed(_floats),
              help="--factory: per-channel std [default: 1].")
@click.option("--class-names", default=None, callback=_parsed(_names),
              help="--factory: comma-separated class names [default: 0..N-1].")
@click.option("--extra-output", "extra_outputs", multiple=True, metavar="NAME",
              help="--factory: name the model's next output: exported and compared.")
def export(**options: Any) -> None:
    """Export CHECKPOINT (or your own module, --factory) at an exact opset and verify it
    against PyTorch before writing.

    CHECKPOINT defaults to the last training run's, runs/train/last.pt (train's default --out-dir);
    the file goes into export/ unless --out says otherwise. --format openvino writes an
    OpenVINO IR (FILE.xml + FILE.bin), verified on OpenVINO.

    Verification runs ONNX Runtime on real test images: logit difference, top-1 agreement,
    theta difference and accuracy, each PASSED/FAILED against a stated tolerance. A failed
    check fails the command and writes nothing."""
    from stn_deploy.export.pipeline import run_export
    from stn_deploy.export.request import ExportRequest, OptionError

    req = ExportRequest(**options)
    if req.checkpoint is None and req.factory is None and req.pretrained is None:
        from stn_deploy.defaults import default_checkpoint

        req.checkpoint = default_checkpoint("CHECKPOINT")
        click.echo(f"export: {req.checkpoint} (the last training run; name a checkpoint for "
                   "another)", err=True)
    try:
        run_export(req, echo=click.echo)
    except OptionError as e:
        raise click.UsageError(str(e)) from None
