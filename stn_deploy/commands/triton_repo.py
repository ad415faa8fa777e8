"""``stn-deploy triton-repo``: a Triton model repository from a verified export."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from stn_deploy.commands.options import TRT, AliasChoice, canonical_backend, library_name
from stn_deploy.serving.triton_repo import KINDS, QUEUE_DELAY_US

# The kinds as a user types them (TensorRT is ``trt``, whatever the library calls it).
KIND_CHOICES = tuple(dict.fromkeys(canonical_backend(k) for k in KINDS))
INSTANCE_KINDS = ("cpu", "gpu")


@click.command("triton-repo")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Repository folder (created, or added to: existing models are refused).")
@click.option("--kind", "kinds", type=AliasChoice(KIND_CHOICES), multiple=True,
              help=f"Triton backend(s) to write a model for (repeat for several) [default: "
                   f"onnxruntime for ONNX files, {TRT} for plans].")
@click.option("--model-name", default=None,
              help="Model name prefix; each model is <name>-<kind> [default: the file's stem].")
@click.option("--max-batch-size", type=click.IntRange(1, None), default=32, show_default=True,
              help="max_batch_size: the largest batch the dynamic batcher forms.")
@click.option("--preferred-batch-size", type=click.IntRange(1, None), multiple=True,
              help="dynamic_batching preferred_batch_size (repeat) [default: 4, 8, 16 ... "
                   "up to --max-batch-size].")
@click.option("--queue-delay-us", type=click.IntRange(0, None), default=QUEUE_DELAY_US,
              show_default=True,
              help="dynamic_batching max_queue_delay_microseconds.")
@click.option("--instance-kind", type=click.Choice(INSTANCE_KINDS), default=None,
              help=f"instance_group kind [default: cpu; a plan ({TRT}) runs on gpu only].")
@click.option("--instances", type=click.IntRange(1, None), default=1, show_default=True,
              help="instance_group count.")
@click.option("--threads", type=click.IntRange(1, None), default=None,
              help="python-* kinds: the runner's threads per instance [default: the "
                   "runtime's own].")
@click.option("--trt-fp16", is_flag=True,
              help="onnxruntime on GPUs: the TensorRT execution accelerator in FP16.")
def triton_repo(model: Path, out_dir: Path, kinds: tuple[str, ...], model_name: str | None,
                max_batch_size: int, preferred_batch_size: tuple[int, ...],
                queue_delay_us: int, instance_kind: str | None, instances: int,
                threads: int | None, trt_fp16: bool) -> None:
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
        plan = model_kind(model) == "plan"
        if plan and instance_kind == "cpu":
            raise click.BadParameter("a TensorRT plan runs on gpu instances only",
                                     param_hint="--instance-kind")
        asked = kinds or ((TRT,) if plan else ("onnxruntime",))
        opts = RepoOptions(kinds=tuple(library_name(k, KINDS) for k in dict.fromkeys(asked)),
                           name=model_name, max_batch=max_batch_size,
                           preferred_batch=preferred_batch_size,
                           queue_delay_us=queue_delay_us,
                           device="gpu" if plan else instance_kind or "cpu",
                           instances=instances, threads=threads, trt_fp16=trt_fp16)
        for folder in write_repository(model, out_dir, opts):
            click.echo(f"wrote {folder}")
