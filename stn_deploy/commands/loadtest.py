"""``stn-deploy loadtest``: real test images against a Triton endpoint at rising concurrency."""

from __future__ import annotations

from pathlib import Path

import click

from stn_deploy.commands.options import DATASET_CHOICES


@click.command("loadtest")
@click.argument("url")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The model file the server serves, run locally for accuracy "
                                  "and top-1 agreement.")
@click.option("--model-name", default=None, help="Served model name [default: the file's stem].")
@click.option("--backend", default=None, help="Local runner [default: the model kind's first].")
@click.option("--concurrency", default="1,4,16,32", show_default=True,
              help="Comma-separated concurrencies (requests in flight).")
@click.option("--duration", type=click.FloatRange(0.1, 600), default=5.0, show_default=True,
              help="Seconds per concurrency.")
@click.option("--max-requests", type=click.IntRange(1, None), default=2000, show_default=True,
              help="Requests per concurrency at most.")
@click.option("--batch", type=click.IntRange(1, None), default=1, show_default=True,
              help="Images a request.")
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=10.0, show_default=True,
              help="Seconds a request may take.")
@click.option("--dataset", type=click.Choice(DATASET_CHOICES), default=None,
              help="Test images from [default: the model's own dataset].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Dataset folder (needed for cifar10 and imagefolder).")
@click.option("--samples", type=click.IntRange(1, None), default=None,
              help="Test images to use [default: the whole test split].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the report as JSON.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table as markdown.")
def loadtest(url: str, model: Path, model_name: str | None, backend: str | None,
             concurrency: str, duration: float, max_requests: int, batch: int, timeout: float,
             dataset: str | None, data_dir: str | None, samples: int | None,
             json_out: Path | None, markdown: Path | None) -> None:
    """Load-test the Triton endpoint URL (http://HOST:PORT or grpc://HOST:PORT).

    Per concurrency: throughput, p50/p90/p99 latency, errors and rejections, accuracy and
    top-1 agreement with MODEL run locally. A server that stops answering ends the run with
    one line and exit 1."""
    from stn_deploy.errors import StnDeployError
    from stn_deploy.fileio import write_text_atomic
    from stn_deploy.report import to_json
    from stn_deploy.serving.loadtest import LoadRequest, print_table, run_loadtest, to_markdown

    try:
        levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
    except ValueError:
        raise click.BadParameter(f"{concurrency!r} is not a list of integers",
                                 param_hint="--concurrency") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter("give positive integers", param_hint="--concurrency")
    report = run_loadtest(LoadRequest(
        url=url, model=model, model_name=model_name, backend=backend, concurrency=levels,
        duration_s=duration, max_requests=max_requests, batch=batch, timeout_s=timeout,
        samples=samples, dataset=dataset, data_dir=data_dir), echo=lambda line: click.echo(line, err=True))
    print_table(report)
    if json_out:
        write_text_atomic(json_out, to_json(report))
    if markdown:
        write_text_atomic(markdown, to_markdown(report))
    bad = [r for r in report["results"] if not r["answered"]]
    if bad:
        raise StnDeployError(f"no answers at concurrency {bad[0]['concurrency']}: "
                             f"{bad[0]['first_error']}")
