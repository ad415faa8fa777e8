"""``stn-deploy serve``: a model on tritonserver itself (one hop), dynamic batching."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from stn_deploy.serving.serve_repo import SERVE_BACKENDS
from stn_deploy.serving.triton_repo import QUEUE_DELAY_US

# Written into a repository folder's config.pbtxt: not taken beside one.
WRITTEN_OPTIONS = ("backend", "model_name", "max_batch_size", "queue_delay_us", "max_queue",
                   "threads", "instances")


@click.command("serve")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--backend", type=click.Choice(SERVE_BACKENDS), default=None,
              help="Runtime run in Triton's Python-backend stub [default: onnxruntime].")
@click.option("--model-name", default=None,
              help="Served model name [default: the file's stem].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (HTTP, gRPC, metrics); tritonserver's own default "
                   "would be 0.0.0.0.")
@click.option("--port", type=click.IntRange(1, 65533), default=8000, show_default=True,
              help="HTTP port; gRPC listens on port+1 and metrics on port+2.")
@click.option("--max-batch-size", type=click.IntRange(1, None), default=32, show_default=True,
              help="Largest batch Triton's dynamic batcher forms.")
@click.option("--queue-delay-us", type=click.IntRange(0, None), default=QUEUE_DELAY_US,
              show_default=True,
              help="How long the batcher waits to fill a batch.")
@click.option("--max-queue", type=click.IntRange(0, None), default=0, show_default=True,
              help="Queued requests beyond which Triton rejects (0: unbounded). A bound "
                   "makes Triton's batcher stall 0.5 s at times under closed-loop load.")
@click.option("--threads", type=click.IntRange(1, None), default=None,
              help="Runner threads per instance [default: half the CPUs over the instances, at "
                   "least 1: Triton and its clients need the rest].")
@click.option("--instances", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Model instances (stub processes), each with its own runner.")
@click.pass_context
def serve(ctx: click.Context, model: Path, backend: str | None, model_name: str | None,
          host: str, port: int, max_batch_size: int, queue_delay_us: int, max_queue: int,
          threads: int | None, instances: int) -> None:
    """Serve MODEL on Triton Inference Server: an .onnx file or checkpoint, or a repository
    folder written by `triton-repo --kind python-onnxruntime` (or python-openvino).

    Runs the [serve] extra's tritonserver on a Python-backend model that runs the runner inside
    Triton's own stub process. KServe v2 over HTTP and gRPC, readiness at /v2/health/ready,
    Prometheus metrics at :port+2/metrics. Stops cleanly on Ctrl-C or SIGTERM."""
    from stn_deploy.serving.serve import ServeOptions
    from stn_deploy.serving.serve import serve as run

    if model.is_dir():
        given = [p for p in WRITTEN_OPTIONS
                 if ctx.get_parameter_source(p) is not ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} is written in the "
                                   "repository's config.pbtxt; it is not taken with a "
                                   "repository folder")
    run(ServeOptions(model=model, backend=backend, name=model_name, host=host, port=port,
                     max_batch=max_batch_size, queue_delay_us=queue_delay_us,
                     max_queue=max_queue, threads=threads, instances=instances),
        echo=click.echo)
