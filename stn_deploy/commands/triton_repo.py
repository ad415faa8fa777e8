"""``stn-deploy triton-repo``: a Triton model repository from a verified export."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from stn_deploy.serving.triton_repo import KINDS


@click.command("triton-repo")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Repository folder (created, or added to: existing models are refused).")
@click.option("--kind", "kinds", type=click.Choice(KINDS), multiple=True,
              help="Triton backend(s) to write a model for (repeat for several) [default: "
                   "onnxruntime for ONNX files, tensorrt for plans].")
@click.option("--name", default=None, help="Model name prefix; each model is <name>-<kind> "
                                           "[default: the file's stem].")
@click.option("--max-batch", type=click.IntRange(1, None), default=32, show_default=True,
              help="max_batch_size: the largest batch the dynamic batcher forms.")
@click.option("--preferred-batch", type=click.IntRange(1, None), multiple=True,
              help="dynamic_batching preferred_batch_size (repeat) [default: 4, 8, 16 ... "
                   "up to --max-batch].")
@click.option("--queue-delay-us", type=click.IntRange(0, None), default=500, show_default=True,
              help="dynamic_batching max_queue_delay_microseconds.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="instance_group kind (tensorrt: always GPU).")
@click.option("--instances", type=click.IntRange(1, None), default=1, show_default=True,
              help="instance_group count.")
@click.option("--trt-fp16", is_flag=True,
              help="onnxruntime on GPUs: the TensorRT execution accelerator in FP16.")
def triton_repo(model: Path, out: Path, kinds: tuple[str, ...], name: str | None,
                max_batch: int, preferred_batch: tuple[int, ...], queue_delay_us: int,
                device: str, instances: int, trt_fp16: bool) -> None:
    """Write a Triton model repository serving MODEL, a verified .onnx or .plan export.

    Each model gets config.pbtxt, 1/<model file>, labels.txt (class names for Triton's
    classification extension) and stn_deploy.json (config, verification, STN health). A
    checkpoint is first exported with --embed-preprocess (verified as export does): a uint8
    NHWC input lets clients send raw pixels, with no normalisation to get wrong and a quarter
    of the bytes of float32."""
    from stn_deploy.artifacts import model_kind
    from stn_deploy.serving.triton_repo import RepoOptions, write_repository

    with tempfile.TemporaryDirectory(prefix="stn-triton-") as tmp:
        if model_kind(model) == "checkpoint":
            from stn_deploy.export.pipeline import ExportRequest, run_export

            onnx_path = Path(tmp) / f"{model.stem}.onnx"
            run_export(ExportRequest(checkpoint=model, embed_preprocess=True, out=onnx_path),
                       echo=click.echo)
            model = onnx_path
        kind = model_kind(model)
        opts = RepoOptions(kinds=kinds or (("tensorrt",) if kind == "plan" else ("onnxruntime",)),
                           name=name, max_batch=max_batch, preferred_batch=preferred_batch,
                           queue_delay_us=queue_delay_us,
                           device="gpu" if kind == "plan" else device,
                           instances=instances, trt_fp16=trt_fp16)
        for folder in write_repository(model, out, opts):
            click.echo(f"wrote {folder}")
