"""``stn-deploy loadtest``: real test images against a Triton endpoint at rising concurrency."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from stn_deploy.commands.options import (DATASET_CHOICES, SampleCount, backend_option,
                                         is_stdout, json_option, write_json_text)


@click.command("loadtest")
@click.argument("url")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The model file the server serves, run locally for accuracy "
                                  "and top-1 agreement.")
@click.option("--model-name", default=None, help="Served model name [default: the file's stem].")
@backend_option(default_help="the model kind's first")
@click.option("--concurrency", default=None,
              help="Closed loop: comma-separated concurrencies (requests in flight) "
                   "[default: 1,4,16,32 unless --rate].")
@click.option("--rate", default=None,
              help="Open loop instead: comma-separated request rates (requests/s); requests "
                   "leave on schedule and latency counts from the scheduled time.")
@click.option("--arrivals", type=click.Choice(("constant", "poisson")), default=None,
              help="With --rate: evenly spaced or Poisson arrivals [default: constant].")
@click.option("--protocol", default=None,
              help="Comma-separated: json, binary (HTTP, Triton's binary tensor extension), "
                   "grpc [default: binary for http://, grpc for grpc:// URLs]; the other "
                   "transport is found on serve's ports (gRPC = HTTP port + 1).")
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
@click.option("--samples", type=SampleCount(), default=None,
              help="Test images to use, N or all [default: all].")
@json_option("the report")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table as markdown.")
def loadtest(url: str, model: Path, model_name: str | None, backend: str | None,
             concurrency: str | None, rate: str | None, arrivals: str | None,
             protocol: str | None,
             duration: float, max_requests: int, batch: int, timeout: float,
             dataset: str | None, data_dir: str | None, samples: int | None,
             json_path: Path | None, markdown: Path | None) -> None:
    """Load-test the Triton endpoint URL (http://HOST:PORT or grpc://HOST:PORT).

    Per concurrency (closed loop) or --rate (open loop) and per --protocol: throughput,
    p50/p90/p99 latency, errors and rejections, accuracy and top-1 agreement with MODEL run
    locally, the mean batch Triton formed (from its metrics, HTTP port + 2), the served
    throughput over the same runner's in this process at that batch, and this client's own
    CPU (% of a core, and microseconds per request: CPU a server on this machine did not
    get). A server that stops answering ends the run with one line and exit 1."""
    from stn_deploy.errors import StnDeployError
    from stn_deploy.fileio import write_text_atomic
    from stn_deploy.report import to_json
    from stn_deploy.serving.loadtest import LoadRequest, print_table, run_loadtest, to_markdown

    if rate is not None and concurrency is not None:
        raise click.UsageError("--concurrency (closed loop) and --rate (open loop) exclude each "
                               "other: give one")
    if arrivals is not None and rate is None:
        raise click.UsageError("--arrivals shapes the open loop: it needs --rate")
    arrivals = arrivals or "constant"
    concurrency = concurrency or "1,4,16,32"
    try:
        levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
    except ValueError:
        raise click.BadParameter(f"{concurrency!r} is not a list of integers",
                                 param_hint="--concurrency") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter("give positive integers", param_hint="--concurrency")
    protocols = tuple(p.strip() for p in (protocol or "").split(",") if p.strip())
    unknown = [p for p in protocols if p not in ("json", "binary", "grpc")]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r} is none of json, binary, grpc",
                                 param_hint="--protocol")
    try:
        rates = tuple(float(r) for r in (rate or "").split(",") if r.strip())
    except ValueError:
        raise click.BadParameter(f"{rate!r} is not a list of numbers", param_hint="--rate") \
            from None
    if rate is not None and (not rates or min(rates) <= 0):
        raise click.BadParameter("give positive request rates", param_hint="--rate")
    report = run_loadtest(LoadRequest(
        protocols=protocols, rates=rates, arrivals=arrivals,
        url=url, model=model, model_name=model_name, backend=backend, concurrency=levels,
        duration_s=duration, max_requests=max_requests, batch=batch, timeout_s=timeout,
        samples=samples, dataset=dataset, data_dir=data_dir),
        echo=lambda line: click.echo(line, err=True))
    if is_stdout(json_path):  # standard output is the JSON's: the table goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            print_table(report)
    else:
        print_table(report)
    if json_path is not None:
        write_json_text(json_path, to_json(report))
    if markdown:
        write_text_atomic(markdown, to_markdown(report))
    bad = [r for r in report["results"] if not r["answered"]]
    if bad:
        raise StnDeployError(f"no answers at concurrency {bad[0]['concurrency']}: "
                             f"{bad[0]['first_error']}")
