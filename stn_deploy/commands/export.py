"""``stn-deploy export``: a checkpoint to a verified ONNX file or TensorRT engine."""

from __future__ import annotations

from pathlib import Path

import click

from stn_deploy.artifacts import PRECISIONS


@click.command("export")
@click.argument("checkpoint", required=False, default=None,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "engine"]), default="onnx",
              show_default=True, help="engine: a TensorRT plan (needs tensorrt and a GPU).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32",
              show_default=True, help="fp16/int8 keep the STN path (theta, grid) in FP32.")
@click.option("--opset", type=click.IntRange(1, None), default=17, show_default=True,
              help="Exact ONNX opset to write (16 up to what torch and onnx support here).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file [default: export/<checkpoint>-opset<N>-<precision>.onnx|.plan].")
@click.option("--static-batch", type=click.IntRange(1, None), default=None,
              help="Fixed batch size instead of a dynamic batch dimension.")
@click.option("--with-theta", is_flag=True, help="Add the STN's theta as a second output.")
@click.option("--embed-preprocess", is_flag=True,
              help="Graph takes uint8 NHWC images and normalises inside.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default=None,
              help="torch exporter [default: torchscript while torch has it, else dynamo; "
                   "dynamo graphs below opset 18 are converted down by stn-deploy].")
@click.option("--affine-grid-op", is_flag=True,
              help="Use the ONNX AffineGrid op (opset 20+, torchscript exporter) instead of "
                   "the constant base grid and MatMul.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="The checkpoint's dataset, for verification (digits: none).")
@click.option("--calib-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Dataset folder for INT8 calibration [default: --data-dir].")
@click.option("--calib-samples", type=click.IntRange(1, None), default=500, show_default=True,
              help="Training images used to calibrate INT8.")
@click.option("--verify-samples", type=click.IntRange(0, None), default=0, show_default=True,
              help="Test images to verify on (0: the whole test split).")
@click.option("--min-batch", type=click.IntRange(1, None), default=1, show_default=True)
@click.option("--opt-batch", type=click.IntRange(1, None), default=32, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, None), default=256, show_default=True)
@click.option("--workspace-mb", type=click.IntRange(1, None), default=1024, show_default=True,
              help="TensorRT builder workspace limit.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT timing cache file, read if present and updated after the build.")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt", "openvino"]),
              default=None, help="Runtime to check the graph for [default: tensorrt for "
                                 "engines, else onnxruntime].")
@click.option("--model", "factory", default=None, metavar="PACKAGE.MODULE:FACTORY",
              help="Export your own nn.Module instead of a CHECKPOINT (see README 'Your own "
                   "STN'); F.affine_grid is exported as a constant grid.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="--model: a state dict, loaded with weights_only=True.")
@click.option("--input-shape", default=None, metavar="CxHxW",
              help="--model: the input shape without the batch, e.g. 1x28x28.")
@click.option("--mean", default=None, help="--model: per-channel mean of pixel/255, "
                                           "comma-separated [default: none, 0].")
@click.option("--std", default=None, help="--model: per-channel std [default: none, 1].")
@click.option("--class-names", default=None, help="--model: comma-separated class names.")
@click.option("--extra-output", "extra_outputs", multiple=True, metavar="NAME",
              help="--model: name the model's next output (e.g. theta): exported, compared.")
def export(checkpoint: Path | None, fmt: str, precision: str, opset: int, out: Path | None,
           static_batch: int | None, with_theta: bool, embed_preprocess: bool,
           exporter: str | None, affine_grid_op: bool, data_dir: Path | None,
           calib_data: Path | None, calib_samples: int, verify_samples: int, min_batch: int,
           opt_batch: int, max_batch: int, workspace_mb: int, timing_cache: Path | None,
           target: str | None, factory: str | None, weights: Path | None,
           input_shape: str | None, mean: str | None, std: str | None,
           class_names: str | None, extra_outputs: tuple[str, ...]) -> None:
    """Export CHECKPOINT at an exact opset and verify it against PyTorch before writing.

    CHECKPOINT defaults to the last training run's, runs/train/last.pt (train's default --out);
    the file goes into export/ unless --out says otherwise.

    Verification runs ONNX Runtime on real test images: logit difference, top-1 agreement,
    theta difference and accuracy, each PASSED/FAILED against a stated tolerance. A failed
    check fails the command and writes nothing."""
    from stn_deploy.export.pipeline import ExportRequest, run_export

    if factory is not None:
        _export_factory(factory, checkpoint, fmt, weights, input_shape, data_dir, out,
                        verify_samples, calib_samples, mean, std, class_names, extra_outputs,
                        opset=opset, precision=precision, exporter=exporter,
                        static_batch=static_batch, embed_preprocess=embed_preprocess)
        return
    if checkpoint is None:
        from stn_deploy.defaults import default_checkpoint

        checkpoint = default_checkpoint("CHECKPOINT")
        click.echo(f"export: {checkpoint} (the last training run; name a checkpoint for "
                   "another)", err=True)
    if static_batch is not None and fmt == "engine":
        min_batch = opt_batch = max_batch = static_batch
    req = ExportRequest(
        checkpoint=checkpoint, format=fmt, precision=precision, opset=opset, out=out,
        static_batch=static_batch, with_theta=with_theta, embed_preprocess=embed_preprocess,
        exporter=exporter, affine_grid_op=affine_grid_op, data_dir=data_dir,
        calib_data=calib_data, calib_samples=calib_samples, verify_samples=verify_samples,
        min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
        workspace_mb=workspace_mb, timing_cache=timing_cache, target=target,
    )
    run_export(req, echo=click.echo)


def _export_factory(factory: str, checkpoint: Path | None, fmt: str, weights: Path | None,
                    input_shape: str | None, data_dir: Path | None, out: Path | None,
                    verify_samples: int, calib_samples: int, mean: str | None, std: str | None,
                    class_names: str | None, extra_outputs: tuple[str, ...],
                    **options: object) -> None:
    from stn_deploy.custom import export_factory, parse_floats
    from stn_deploy.errors import StnDeployError

    if checkpoint is not None:
        raise StnDeployError("give a CHECKPOINT or --model, not both")
    if fmt != "onnx":
        raise StnDeployError("--model exports --format onnx")
    if input_shape is None:
        raise StnDeployError("--model needs --input-shape CxHxW, e.g. 1x28x28")
    names = tuple(n.strip() for n in class_names.split(",")) if class_names else None
    export_factory(factory, out, input_shape=input_shape, weights=weights, data_dir=data_dir,
                   verify_samples=verify_samples, calib_samples=calib_samples, echo=click.echo,
                   mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
                   class_names=names, extra_outputs=extra_outputs, **options)
