"""Load test against any Triton endpoint (KServe v2 over HTTP or gRPC, with tritonclient).

Real test images at a sweep of concurrencies, each level bounded in time and request count.
Per level: throughput, p50/p90/p99 latency (harness.summarize, as bench), errors and
rejections, and accuracy and top-1 agreement of the served answers with the same model run
locally. A server that stops answering ends the run with one line, never a hang: every
request has a timeout and every level a deadline.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stn_deploy.errors import StnDeployError, error_line, require

INSTALL = "pip install 'stn-deploy[serve]' (or: pip install 'tritonclient[http,grpc]')"
# Words Triton uses when its queue policy turns a request away (HTTP 503 / gRPC UNAVAILABLE).
REJECT_MARKERS = ("exceeds maximum queue size", "queue", "unavailable", "503")
# A transport failure: the server is gone, no point sending more.
DOWN_MARKERS = ("connection refused", "failed to connect", "connection reset",
                "broken pipe", "remotedisconnected", "connect failed", "socket closed",
                "server disconnected", "statuscode.unavailable")
# A request past its timeout (geventhttpclient: TimeoutError "timed out"; gRPC:
# DEADLINE_EXCEEDED): the server may only be slow, so the request is lost, the run goes on.
TIMEOUT_MARKERS = ("timed out", "deadline exceeded", "deadline_exceeded",
                   "failed to obtain inference response")
# Seconds a level waits, beyond a request's timeout, for its threads to come back.
JOIN_GRACE_S = 5.0


@dataclass
class LoadRequest:
    url: str  # http://host:port or grpc://host:port
    model: Path  # the same model file, run locally for agreement
    model_name: str | None = None  # served name [default: the file's stem]
    backend: str | None = None  # local runner [default: the model kind's first]
    concurrency: tuple[int, ...] = (1, 4, 16, 32)
    duration_s: float = 5.0
    max_requests: int = 2000  # per level
    batch: int = 1  # images per request
    timeout_s: float = 10.0  # per request
    samples: int | None = None  # test images used [default: the whole test split]
    dataset: str | None = None  # test images from [default: the model's own dataset]
    data_dir: str | None = None  # dataset folder (needed for cifar10 and imagefolder)


@dataclass
class Level:
    concurrency: int
    sent: int = 0  # requests handed to the client, counted before each is sent
    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0
    rejected: int = 0
    answers: dict[int, int] = field(default_factory=dict)  # image index -> served top-1
    first_error: str | None = None
    down: bool = False  # the server stopped answering
    seconds: float = 0.0
    cpu_pct: float | None = None  # the load generator's CPU time over wall time


def _client(url: str, concurrency: int, timeout_s: float) -> tuple[Any, Any, str]:
    """(client module, client, protocol) for an http:// or grpc:// URL."""
    proto, _, address = url.partition("://")
    if not address:
        proto, address = "http", url
    if proto not in ("http", "grpc"):
        raise StnDeployError(f"URL must start with http:// or grpc://, got {url}")
    mod = require(f"tritonclient.{proto}", INSTALL, "tritonclient")
    address = address.rstrip("/")
    if proto == "http":
        client = mod.InferenceServerClient(address, concurrency=max(1, concurrency),
                                           connection_timeout=timeout_s,
                                           network_timeout=timeout_s)
    else:
        client = mod.InferenceServerClient(address)
    return mod, client, proto


def classify(e: BaseException) -> str:
    """What a failed request counts as: "lost" (timed out: the server may only be slow),
    "down" (connection refused or reset: the server is gone), "rejected" (Triton's queue
    policy turned it away) or "error" (anything else the server answered)."""
    text = f"{type(e).__name__} {e}".lower()
    if isinstance(e, TimeoutError) or any(m in text for m in TIMEOUT_MARKERS):
        return "lost"
    if "queue" not in text and (isinstance(e, ConnectionError)
                                or any(m in text for m in DOWN_MARKERS)):
        return "down"
    if any(m in text for m in REJECT_MARKERS):
        return "rejected"
    return "error"


def run_loadtest(req: LoadRequest, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The report: settings, the local reference, one row per concurrency."""
    from stn_deploy.artifacts import model_kind
    from stn_deploy.backends import DEFAULT_BACKENDS, create_runner
    from stn_deploy.bench import load_eval_data
    from stn_deploy.harness import (compare_outputs, run_batched, summarize, system_info,
                                    to_runner_input)
    from stn_deploy.serving.triton_repo import default_prefix

    name = req.model_name or default_prefix(req.model)
    backend = req.backend or DEFAULT_BACKENDS[model_kind(req.model)][0]
    with create_runner(backend, req.model) as runner:
        data, why = load_eval_data(runner.config, req.dataset, req.data_dir, req.samples)
        if data is None:
            raise StnDeployError(f"no test images for {req.model}: {why}")
        local = run_batched(runner, data.images)
        local_eval = compare_outputs(local, data.labels)
        inputs = to_runner_input(runner, data.images)
        spec = runner.input_spec
    local_top1 = np.asarray(local["logits"]).argmax(axis=1)

    mod, probe, proto = _client(req.url, 1, req.timeout_s)
    # HTTP clients carry their timeouts; gRPC calls take one each, else they wait forever.
    timeout = {"client_timeout": req.timeout_s} if proto == "grpc" else {}
    try:
        if not probe.is_server_ready(**timeout):
            raise StnDeployError(f"{req.url} is up but not ready")
        meta = probe.get_model_metadata(name, **timeout)
    except StnDeployError:
        raise
    except Exception as e:
        raise StnDeployError(f"no Triton server answers at {req.url} for model {name}: "
                             f"{error_line(e)}") from None
    served = meta["inputs"][0] if isinstance(meta, dict) else {
        "name": meta.inputs[0].name, "datatype": meta.inputs[0].datatype,
        "shape": list(meta.inputs[0].shape)}
    outputs = [o["name"] for o in meta["outputs"]] if isinstance(meta, dict) else [
        o.name for o in meta.outputs]
    if "logits" not in outputs:
        raise StnDeployError(f"{name} at {req.url} has no logits output (it has: "
                             f"{', '.join(outputs) or 'none'}); loadtest compares served "
                             f"logits with {req.model.name}'s")
    want_dtype = {"uint8": "UINT8", "float32": "FP32"}[spec.dtype]
    if served["datatype"] != want_dtype or [int(d) for d in served["shape"][1:]] != \
            list(spec.shape[1:]):
        raise StnDeployError(f"{name} at {req.url} takes {served['datatype']} "
                             f"{served['shape']}, {req.model.name} takes {want_dtype} "
                             f"{list(spec.shape)}: not the same model")
    input_name = served["name"]

    rows = []
    cpu0 = time.process_time()
    for c in req.concurrency:
        level = _run_level(mod, proto, req, c, inputs, input_name, want_dtype, name)
        n = len(level.latencies_ns)
        # lost: sent but neither answered nor refused (timed out, or hung past the level)
        row: dict[str, Any] = {"concurrency": c, "requests": level.sent, "answered": n,
                               "errors": level.errors, "rejected": level.rejected,
                               "lost": level.sent - n - level.errors - level.rejected}
        if level.down:
            raise StnDeployError(f"the server at {req.url} stopped answering at concurrency "
                                 f"{c} ({row['requests']} sent, {n} answered, {row['lost']} "
                                 f"unanswered): {level.first_error}")
        if n:
            stats = summarize(level.latencies_ns, req.batch, "end_to_end", 0)
            idx = np.fromiter(level.answers, dtype=np.int64)
            top1 = np.fromiter(level.answers.values(), dtype=np.int64)
            row.update(
                seconds=level.seconds, throughput_ips=n * req.batch / level.seconds,
                p50_ms=stats.p50_ms, p90_ms=stats.p90_ms, p99_ms=stats.p99_ms,
                accuracy_pct=float((top1 == data.labels[idx]).mean() * 100),
                agreement_pct=float((top1 == local_top1[idx]).mean() * 100),
                images_checked=int(len(idx)))
        row["client_cpu_pct"] = level.cpu_pct
        row["first_error"] = level.first_error
        rows.append(row)
        echo(line(row))
    return {"tool": "stn-deploy loadtest", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime()),
            "system": system_info(),
            "settings": {"url": req.url, "protocol": proto, "model_name": name,
                         "batch": req.batch, "duration_s": req.duration_s,
                         "max_requests": req.max_requests, "timeout_s": req.timeout_s,
                         "concurrency": list(req.concurrency)},
            "reference": {"model": str(req.model), "backend": backend, "n": len(data.labels),
                          "accuracy_pct": local_eval.accuracy_pct},
            "client_cpu_s": time.process_time() - cpu0,
            "results": rows}


def _run_level(mod: Any, proto: str, req: LoadRequest, concurrency: int, inputs: np.ndarray,
               input_name: str, dtype: str, name: str) -> Level:
    """``concurrency`` threads, each sending one request at a time until the deadline or the
    request budget; each thread has its own client (tritonclient clients are not shared)."""
    level = Level(concurrency)
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(req.max_requests))
    n_images = len(inputs)

    def worker() -> None:
        _, client, _ = _client(req.url, 1, req.timeout_s)
        while not stop.is_set() and time.perf_counter() < deadline:
            with lock:
                k = next(counter, None)
                level.sent += k is not None
            if k is None:
                return
            idx = [(k * req.batch + j) % n_images for j in range(req.batch)]
            x = mod.InferInput(input_name, [req.batch, *inputs.shape[1:]], dtype)
            x.set_data_from_numpy(inputs[idx])
            t0 = time.perf_counter_ns()
            try:
                kwargs = {"client_timeout": req.timeout_s} if proto == "grpc" else {}
                result = client.infer(name, [x], **kwargs)
                dt = time.perf_counter_ns() - t0
                top1 = np.asarray(result.as_numpy("logits")).argmax(axis=1)
            except Exception as e:  # tritonclient raises InferenceServerException and socket errors
                what = classify(e)
                with lock:
                    level.first_error = level.first_error or error_line(e)
                    if what == "down":
                        level.down = True
                        stop.set()
                    elif what == "rejected":
                        level.rejected += 1
                    elif what == "error":
                        level.errors += 1
                    # "lost": counted as sent and not answered, nothing more
                continue
            with lock:
                level.latencies_ns.append(dt)
                for i, p in zip(idx, top1):
                    level.answers[int(i)] = int(p)
        try:
            client.close()
        except Exception:  # closing a client of a dead server
            pass

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    deadline = start + req.duration_s
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    # One deadline for all: a request outlives the level by at most its timeout.
    join_by = deadline + req.timeout_s + JOIN_GRACE_S
    for t in threads:
        t.join(max(0.0, join_by - time.perf_counter()))
    stop.set()
    level.seconds = time.perf_counter() - start
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    level.cpu_pct = 100.0 * cpu / level.seconds if level.seconds > 0 else None
    if any(t.is_alive() for t in threads):
        level.down = True
        level.first_error = level.first_error or "requests hung past their timeout"
    return level


def line(row: dict[str, Any]) -> str:
    if not row["answered"]:
        return (f"concurrency {row['concurrency']}: no answers ({row['errors']} errors, "
                f"{row['rejected']} rejected, {row['lost']} lost; {row['first_error']})")
    return (f"concurrency {row['concurrency']}: {row['throughput_ips']:.0f} img/s, p50 "
            f"{row['p50_ms']:.2f} ms, p90 {row['p90_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
            f"{row['answered']} answered, {row['errors']} errors, {row['rejected']} rejected, "
            f"{row['lost']} lost, "
            f"accuracy {row['accuracy_pct']:.2f}%, agreement {row['agreement_pct']:.2f}%, "
            f"client CPU {row['client_cpu_pct']:.0f}%")


COLUMNS = (("concurrency", "Concurrency", "{}"), ("throughput_ips", "img/s", "{:.0f}"),
           ("p50_ms", "p50 ms", "{:.2f}"), ("p90_ms", "p90 ms", "{:.2f}"),
           ("p99_ms", "p99 ms", "{:.2f}"), ("answered", "Answered", "{}"),
           ("errors", "Errors", "{}"), ("rejected", "Rejected", "{}"), ("lost", "Lost", "{}"),
           ("accuracy_pct", "Accuracy %", "{:.2f}"), ("agreement_pct", "Agreement %", "{:.2f}"),
           ("client_cpu_pct", "Client CPU %", "{:.0f}"))


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in COLUMNS]
            for r in report["results"]]


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"stn-deploy loadtest: {s['model_name']} at {s['url']}",
                  title_justify="left")
    for _, head, _ in COLUMNS:
        table.add_column(head, justify="right")
    for r in table_rows(report):
        table.add_row(*r)
    Console(width=140).print(table)
    for note in notes(report):
        print(note)


def notes(report: dict[str, Any]) -> list[str]:
    s, ref = report["settings"], report["reference"]
    return [f"{s['batch']} image(s) a request, each level up to {s['duration_s']} s and "
            f"{s['max_requests']} requests; img/s: answered images / level wall time.",
            f"Agreement: served top-1 vs {ref['backend']} on {Path(ref['model']).name} run "
            f"locally ({ref['n']} test images, accuracy {ref['accuracy_pct']:.2f}%).",
            "Client CPU %: the load generator's own CPU time over the level's wall time "
            "(100% = one core).",
            f"Machine: {report['system'].get('cpu')} "
            f"({report['system'].get('cpus_available')} CPUs)."]


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += ["", *(f"- {n}" for n in notes(report)), f"- Created {report['created']}."]
    return "\n".join(lines) + "\n"
