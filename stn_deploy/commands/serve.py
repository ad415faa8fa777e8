"""``stn-deploy serve``: a model on a real Triton server (PyTriton), dynamic batching."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("serve")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--backend", default=None,
              help="stn-deploy runner behind Triton: onnxruntime, openvino, trt, torch ... "
                   "[default: the model kind's first, onnxruntime for ONNX].")
@click.option("--name", default=None, help="Served model name [default: the file's stem].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (HTTP, gRPC, metrics); tritonserver's own default "
                   "would be 0.0.0.0.")
@click.option("--port", type=click.IntRange(1, 65533), default=8000, show_default=True,
              help="HTTP port; gRPC listens on port+1 and metrics on port+2.")
@click.option("--max-batch", type=click.IntRange(1, None), default=32, show_default=True,
              help="Largest batch Triton's dynamic batcher forms.")
@click.option("--queue-delay-us", type=click.IntRange(0, None), default=500, show_default=True,
              help="How long the batcher waits to fill a batch.")
@click.option("--max-queue", type=click.IntRange(0, None), default=0, show_default=True,
              help="Queued requests beyond which Triton rejects (0: unbounded).")
@click.option("--threads", type=click.IntRange(1, None), default=None,
              help="Runner threads per instance [default: half the CPUs over the instances, at "
                   "least 1: Triton and its clients need the rest].")
@click.option("--instances", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Model instances, each with its own runner: one can compute while another "
                   "waits on Triton.")
def serve(model: Path, backend: str | None, name: str | None, host: str, port: int,
          max_batch: int, queue_delay_us: int, max_queue: int, threads: int | None,
          instances: int) -> None:
    """Serve MODEL (.onnx, .plan or checkpoint) on Triton Inference Server via PyTriton.

    KServe v2 protocol over HTTP and gRPC, readiness and liveness at /v2/health/ready and
    /live, Prometheus metrics at :port+2/metrics. Stops cleanly on Ctrl-C or SIGTERM. Needs
    the [serve] extra."""
    from stn_deploy.serving.serve import ServeOptions
    from stn_deploy.serving.serve import serve as run

    run(ServeOptions(model=model, backend=backend, name=name, host=host, port=port,
                     max_batch=max_batch, queue_delay_us=queue_delay_us, max_queue=max_queue,
                     threads=threads, instances=instances), echo=lambda line: click.echo(line, err=False))
