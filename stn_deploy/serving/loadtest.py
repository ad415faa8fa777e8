"""Load test against any Triton endpoint (KServe v2 over HTTP or gRPC, with tritonclient).

Real test images at a sweep of concurrencies (closed loop: each of N clients sends its next
request when the last is answered) or of request rates (open loop, ``rates``: requests leave at
scheduled times, constant or Poisson, whether or not earlier ones were answered, and latency is
measured from the scheduled time, so a server falling behind shows its queue instead of
slowing the clients down), each level bounded in time and request count; over HTTP with JSON
or Triton's binary tensor extension, or over gRPC. With the server's metrics endpoint, each
level also reports the mean batch Triton's dynamic batcher formed and the served/in-process
ratio against the same runner at that batch, measured in the same run.
Per level: throughput, p50/p90/p99 latency (harness.summarize, as bench), errors and
rejections, accuracy and top-1 agreement of the served answers with the same model run
locally, and the load generator's own CPU time (per request and as a share of the level's
wall time): on a shared machine that CPU is taken from the server. tritonclient only finds
the server and its model; the requests themselves are encoded once and sent by
:mod:`stn_deploy.serving.wire`. A server that stops answering ends the run with one line,
never a hang: every request has a timeout and every level a deadline.
"""

from __future__ import annotations

import contextlib
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stn_deploy.errors import StnDeployError, error_line, require
from stn_deploy.serving.wire import WIRES, Served, Wire

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
    protocols: tuple[str, ...] = ()  # json, binary, grpc [default: binary for http://,
    # grpc for grpc://]; the other transport is found on serve's ports (gRPC = HTTP + 1)
    rates: tuple[float, ...] = ()  # open loop: requests/s per level (replaces concurrency)
    arrivals: str = "constant"  # open loop: constant or poisson
    open_loop_threads: int = 64  # open loop: requests in flight at most
    metrics_url: str | None = None  # [default: serve's, HTTP port + 2]; "" skips
    threads: int | None = None  # in-process reference runner [default: as serve's]


PROTOCOLS = ("json", "binary", "grpc")
ARRIVALS = ("constant", "poisson")


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
    cpu_s: float = 0.0  # the load generator's CPU time (all its threads) during the level


def _client(url: str, timeout_s: float) -> tuple[Any, Any, str]:
    """(client module, tritonclient client, protocol) for an http:// or grpc:// URL: the
    probe that finds the server and reads the model's metadata."""
    proto, _, address = url.partition("://")
    if not address:
        proto, address = "http", url
    if proto not in ("http", "grpc"):
        raise StnDeployError(f"URL must start with http:// or grpc://, got {url}")
    if proto == "grpc":
        require("grpc", INSTALL, "grpcio")  # tritonclient.grpc raises RuntimeError without it
    mod = require(f"tritonclient.{proto}", INSTALL, "tritonclient")
    address = address.rstrip("/")
    if proto == "http":
        client = mod.InferenceServerClient(address, connection_timeout=timeout_s,
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
    from stn_deploy.harness import (compare_outputs, run_batched, system_info,
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
    # the images a level can reach (it starts again at the first): no more are encoded
    inputs = inputs[:req.max_requests * req.batch]

    protocols = req.protocols or (("grpc",) if req.url.startswith("grpc://") else ("binary",))
    metrics = req.metrics_url if req.metrics_url is not None else metrics_url(req.url)
    levels = [("rate", r) for r in req.rates] or [("concurrency", c) for c in req.concurrency]
    rows = []
    cpu0 = time.process_time()
    for protocol in protocols:
        url = protocol_url(req.url, protocol)
        wire = WIRES[protocol](_connect(url, req, name, spec, inputs))
        for what, value in levels:
            before = batcher_counts(metrics, name)
            if what == "rate":
                n = max(1, int(value * req.duration_s))
                level = _run_level(wire, req, req.open_loop_threads,
                                   schedule=arrival_times(value, n, req.arrivals))
            else:
                level = _run_level(wire, req, int(value))
            row = _row(level, req, data.labels, local_top1, url)
            row.update(protocol=protocol, rate=value if what == "rate" else None,
                       mean_batch=mean_batch(before, batcher_counts(metrics, name)))
            rows.append(row)
            echo(line(row))
    _add_inprocess(rows, req, backend, inputs)
    return {"tool": "stn-deploy loadtest", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime()),
            "system": system_info(),
            "settings": {"url": req.url, "protocols": list(protocols), "model_name": name,
                         "rates": list(req.rates), "arrivals": req.arrivals,
                         "metrics_url": metrics,
                         "batch": req.batch, "duration_s": req.duration_s,
                         "max_requests": req.max_requests, "timeout_s": req.timeout_s,
                         "concurrency": list(req.concurrency)},
            "reference": {"model": str(req.model), "backend": backend, "n": len(data.labels),
                          "accuracy_pct": local_eval.accuracy_pct},
            "client_cpu_s": time.process_time() - cpu0,
            "results": rows}


def arrival_times(rate: float, n: int, arrivals: str, seed: int = 0) -> np.ndarray:
    """Seconds from the start at which each of ``n`` requests is due: every 1/rate, or with
    exponential gaps of mean 1/rate (Poisson arrivals, as independent users make)."""
    if arrivals == "poisson":
        return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n)) - 1.0 / rate
    return np.arange(n) / rate


def protocol_url(url: str, protocol: str) -> str:
    """The URL a protocol talks to: the one given, or serve's other port (gRPC = HTTP + 1)."""
    scheme, _, address = url.partition("://")
    if not address:
        scheme, address = "http", url
    want = "grpc" if protocol == "grpc" else "http"
    if scheme == want:
        return f"{scheme}://{address}"
    host, _, port = address.rstrip("/").rpartition(":")
    shift = 1 if want == "grpc" else -1
    return f"{want}://{host}:{int(port) + shift}"


def metrics_url(url: str) -> str:
    """serve's metrics endpoint for its HTTP (port + 2) or gRPC (port + 1) URL."""
    http = protocol_url(url, "binary")
    host, _, port = http.partition("://")[2].rstrip("/").rpartition(":")
    return f"http://{host}:{int(port) + 2}/metrics"


def batcher_counts(url: str, name: str) -> dict[str, float] | None:
    """Triton's counters for ``name`` (requests, executions = batches run, inferences =
    images); None when the endpoint does not answer (then no mean batch is reported)."""
    import re
    import urllib.request

    if not url:
        return None
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    counts = {}
    for key in ("request_success", "exec_count", "count"):
        m = re.search(rf'^nv_inference_{key}{{model="{re.escape(name)}",[^}}]*}} (\S+)', text,
                      re.M)
        if m:
            counts[key] = float(m.group(1))
    return counts or None


def mean_batch(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    """Images per batch the dynamic batcher formed during a level (inferences over
    executions; requests over executions where the image count is missing)."""
    if not before or not after or "exec_count" not in after:
        return None
    runs = after["exec_count"] - before.get("exec_count", 0.0)
    key = "count" if "count" in after else "request_success"
    return (after[key] - before.get(key, 0.0)) / runs if runs > 0 else None


def _add_inprocess(rows: list[dict[str, Any]], req: LoadRequest, backend: str,
                   inputs: np.ndarray) -> None:
    """The same runner in this process at each batch size Triton formed, and the served
    throughput as a share of it (the client shares the CPU: run on a quiet machine)."""
    from stn_deploy.backends import create_runner
    from stn_deploy.serving.python_model import default_threads

    sizes = sorted({max(1, round(r["mean_batch"])) for r in rows
                    if r.get("mean_batch") and r.get("throughput_ips")})
    if not sizes:
        return
    threads = req.threads or default_threads(1)
    speed = {}
    with create_runner(backend, req.model, threads=threads) as runner:
        for b in sizes:
            x = np.ascontiguousarray(inputs[np.arange(b) % len(inputs)])
            runner.infer(x)  # warm-up
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.5:
                runner.infer(x)
                n += 1
            speed[b] = n * b / (time.perf_counter() - t0)
    for r in rows:
        if r.get("mean_batch") and r.get("throughput_ips"):
            b = max(1, round(r["mean_batch"]))
            r.update(inprocess_ips=speed[b], inprocess_threads=threads,
                     served_ratio=r["throughput_ips"] / speed[b])


def _connect(url: str, req: LoadRequest, name: str, spec: Any, inputs: np.ndarray) -> Served:
    """What a wire needs to send ``inputs`` to ``url``, once the server is ready and serves a
    model taking what ``req.model`` takes and answering logits."""
    _, probe, proto = _client(url, req.timeout_s)
    # HTTP clients carry their timeouts; gRPC calls take one each, else they wait forever.
    timeout = {"client_timeout": req.timeout_s} if proto == "grpc" else {}
    try:
        if not probe.is_server_ready(**timeout):
            raise StnDeployError(f"{url} is up but not ready")
        meta = probe.get_model_metadata(name, **timeout)
    except StnDeployError:
        raise
    except Exception as e:
        raise StnDeployError(f"no Triton server answers at {url} for model {name}: "
                             f"{error_line(e)}") from None
    served = meta["inputs"][0] if isinstance(meta, dict) else {
        "name": meta.inputs[0].name, "datatype": meta.inputs[0].datatype,
        "shape": list(meta.inputs[0].shape)}
    outputs = {o["name"]: o["datatype"] for o in meta["outputs"]} if isinstance(meta, dict) \
        else {o.name: o.datatype for o in meta.outputs}
    if "logits" not in outputs:
        raise StnDeployError(f"{name} at {url} has no logits output (it has: "
                             f"{', '.join(outputs) or 'none'}); loadtest compares served "
                             f"logits with {req.model.name}'s")
    want_dtype = {"uint8": "UINT8", "float32": "FP32"}[spec.dtype]
    if served["datatype"] != want_dtype or [int(d) for d in served["shape"][1:]] != \
            list(spec.shape[1:]):
        raise StnDeployError(f"{name} at {url} takes {served['datatype']} "
                             f"{served['shape']}, {req.model.name} takes {want_dtype} "
                             f"{list(spec.shape)}: not the same model")
    return Served(url=url, model_name=name, input_name=served["name"], input_datatype=want_dtype,
                  logits_datatype=outputs["logits"], inputs=inputs, batch=req.batch,
                  timeout_s=req.timeout_s)


def _row(level: Level, req: LoadRequest, labels: np.ndarray, local_top1: np.ndarray,
         url: str) -> dict[str, Any]:
    """One level's results; a server gone is one line."""
    from stn_deploy.harness import summarize

    c = level.concurrency
    n = len(level.latencies_ns)
    # lost: sent but neither answered nor refused (timed out, or hung past the level)
    row: dict[str, Any] = {"concurrency": c, "requests": level.sent, "answered": n,
                           "errors": level.errors, "rejected": level.rejected,
                           "lost": level.sent - n - level.errors - level.rejected}
    if level.down:
        raise StnDeployError(f"the server at {url} stopped answering at concurrency "
                             f"{c} ({row['requests']} sent, {n} answered, {row['lost']} "
                             f"unanswered): {level.first_error}")
    if n:
        stats = summarize(level.latencies_ns, req.batch, "end_to_end", 0)
        idx = np.fromiter(level.answers, dtype=np.int64)
        top1 = np.fromiter(level.answers.values(), dtype=np.int64)
        row.update(
            seconds=level.seconds, throughput_ips=n * req.batch / level.seconds,
            p50_ms=stats.p50_ms, p90_ms=stats.p90_ms, p99_ms=stats.p99_ms,
            accuracy_pct=float((top1 == labels[idx]).mean() * 100),
            agreement_pct=float((top1 == local_top1[idx]).mean() * 100),
            images_checked=int(len(idx)))
    row["client_cpu_pct"] = 100.0 * level.cpu_s / level.seconds if level.seconds > 0 else None
    row["client_cpu_us"] = 1e6 * level.cpu_s / level.sent if level.sent else None
    row["first_error"] = level.first_error
    return row


def _run_level(wire: Wire, req: LoadRequest, concurrency: int, *,
               schedule: np.ndarray | None = None) -> Level:
    """``concurrency`` threads, each with its own connection, each sending one request at a
    time until the deadline or the request budget.

    With ``schedule`` (open loop) request k leaves at start + schedule[k] and its latency
    counts from then: a request that waited for a free thread waited in the server's queue
    as far as its user is concerned. The level's CPU time is the whole process's (the
    client's threads, and gRPC's own)."""
    level = Level(concurrency)
    budget = req.max_requests if schedule is None else min(req.max_requests, len(schedule))
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(budget))
    n_images = len(wire.served.inputs)

    def worker() -> None:
        conn = wire.connect()
        try:
            while not stop.is_set() and time.perf_counter() < deadline:
                with lock:
                    k = next(counter, None)
                    level.sent += k is not None
                if k is None:
                    return
                first = k * req.batch % n_images
                request = wire.request(first)
                if schedule is not None:
                    t0 = start_ns + int(schedule[k] * 1e9)
                    time.sleep(max(0.0, (t0 - time.perf_counter_ns()) / 1e9))
                else:
                    t0 = time.perf_counter_ns()
                try:
                    headers, body = conn.infer(request)
                    dt = time.perf_counter_ns() - t0
                    top1 = wire.top1(headers, body).tolist()
                except Exception as e:  # socket, gRPC and server errors, answers not read
                    _count_failure(level, lock, stop, e)
                    continue
                with lock:
                    level.latencies_ns.append(dt)
                    for j, p in enumerate(top1):
                        level.answers[(first + j) % n_images] = p
        finally:
            with contextlib.suppress(Exception):  # closing a connection to a dead server
                conn.close()

    cpu0 = _cpu_s()
    start = time.perf_counter()
    start_ns = time.perf_counter_ns()
    deadline = start + req.duration_s + (0.0 if schedule is None else 1e-3)
    # One deadline for all: a request outlives the level by at most its timeout.
    hung = _run_threads(worker, concurrency, join_by=deadline + req.timeout_s + JOIN_GRACE_S)
    stop.set()
    level.seconds = time.perf_counter() - start
    level.cpu_s = _cpu_s() - cpu0
    if hung:
        level.down = True
        level.first_error = level.first_error or "requests hung past their timeout"
    return level


def _run_threads(target: Callable[[], None], n: int, join_by: float) -> bool:
    """``n`` daemon threads running ``target``, waited for until ``join_by`` (perf_counter
    time); whether any is still running then."""
    threads = [threading.Thread(target=target, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, join_by - time.perf_counter()))
    return any(t.is_alive() for t in threads)


def _count_failure(level: Level, lock: threading.Lock, stop: threading.Event,
                   e: BaseException) -> None:
    """A failed request, counted by what it means (:func:`classify`); a server gone stops
    the level."""
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


def _cpu_s() -> float:
    """This process's user + system CPU seconds, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def line(row: dict[str, Any]) -> str:
    if not row["answered"]:
        return (f"concurrency {row['concurrency']}: no answers ({row['errors']} errors, "
                f"{row['rejected']} rejected, {row['lost']} lost; {row['first_error']})")
    return (f"concurrency {row['concurrency']}: {row['throughput_ips']:.0f} img/s, p50 "
            f"{row['p50_ms']:.2f} ms, p90 {row['p90_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
            f"{row['answered']} answered, {row['errors']} errors, {row['rejected']} rejected, "
            f"{row['lost']} lost, "
            f"accuracy {row['accuracy_pct']:.2f}%, agreement {row['agreement_pct']:.2f}%, "
            f"client CPU {row['client_cpu_pct']:.0f}% ({row['client_cpu_us']:.0f} us/request)"
            + (f", {row['protocol']}" if row.get("protocol") else "")
            + (f", rate {row['rate']:.0f}/s" if row.get("rate") else "")
            + (f", mean batch {row['mean_batch']:.1f}" if row.get("mean_batch") else ""))


COLUMNS = (("protocol", "Protocol", "{}"), ("concurrency", "Concurrency", "{}"),
           ("rate", "Rate/s", "{:.0f}"), ("mean_batch", "Batch", "{:.1f}"),
           ("served_ratio", "Served/in-process", "{:.2f}"), ("throughput_ips", "img/s", "{:.0f}"),
           ("p50_ms", "p50 ms", "{:.2f}"), ("p90_ms", "p90 ms", "{:.2f}"),
           ("p99_ms", "p99 ms", "{:.2f}"), ("answered", "Answered", "{}"),
           ("errors", "Errors", "{}"), ("rejected", "Rejected", "{}"), ("lost", "Lost", "{}"),
           ("accuracy_pct", "Accuracy %", "{:.2f}"), ("agreement_pct", "Agreement %", "{:.2f}"),
           ("client_cpu_pct", "Client CPU %", "{:.0f}"),
           ("client_cpu_us", "Client CPU us/req", "{:.0f}"))


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
    Console(width=160).print(table)
    for note in notes(report):
        print(note)


def notes(report: dict[str, Any]) -> list[str]:
    from stn_deploy.harness import machine_text

    s, ref = report["settings"], report["reference"]
    return [f"{s['batch']} image(s) a request, each level up to {s['duration_s']} s and "
            f"{s['max_requests']} requests; img/s: answered images / level wall time.",
            f"Agreement: served top-1 vs {ref['backend']} on {Path(ref['model']).name} run "
            f"locally ({ref['n']} test images, accuracy {ref['accuracy_pct']:.2f}%).",
            "Client CPU: the load generator's own CPU time (all its threads) over the level's "
            "wall time (100% = one core), and per request sent; on a machine it shares with "
            "the server, that CPU is taken from the server.",
            f"Machine: {machine_text(report['system'])}."]


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += ["", *(f"- {n}" for n in notes(report)), f"- Created {report['created']}."]
    return "\n".join(lines) + "\n"
