"""Served (tritonserver, one hop) against in-process throughput and latency, same runner, same
threads, same run; PyTriton (two hops) beside them.

Why it exists: serving is worth its cost only if the server adds little to the runner. Here,
on loopback only:
- ``stn-deploy serve`` starts the [serve] extra's tritonserver on a Python-backend model that
  runs the runner inside Triton's stub (one hop); ``loadtest`` drives it closed-loop at each
  concurrency and open-loop at request rates (Poisson arrivals, latency from the scheduled
  send time), over HTTP with JSON and with Triton's binary tensor extension, and gRPC;
  the closed-loop levels run in alternating rounds (see measure); Triton's metrics give the batch its dynamic batcher formed at each level, and
  each level records the load generator's own CPU per request (it shares the machine);
- the same runner with the same threads is timed in this process after each round, while the
  server idles, at batch 1 and at every batch size the batcher formed;
- the server is overloaded (far more in flight than --max-queue holds) and must lose nothing
  and be ready after; SIGTERM must stop it (exit 0, tritonserver's process group gone) within
  a few seconds; a second server is SIGKILLed mid-run and loadtest must say so in one line.
The targets are computed, not judged: each has its value, goal and met.

PyTriton's path (stub -> proxy -> our process) is no longer in stn-deploy. With
``--pytriton-python`` (an interpreter that has nvidia-pytriton 0.7, numpy<2 and onnxruntime)
``_pytriton_server.py`` serves the same model with the same ONNX Runtime settings and is
measured in the same rounds (binary); without it, an earlier run's PyTriton figures are read
from ``--pytriton-results`` (by default the results file this script writes, which carries
them forward) and shown with their date and machine.

Run it on a quiet machine (server, client and in-process timing share the CPUs), about 12
minutes with the defaults:

    .venv/bin/python benchmarks/triton_serving.py export/demo/stn-opset16-fp32.onnx \
        --pytriton-python /tmp/pyt/bin/python

and on the uint8-input model that ``serve CHECKPOINT`` and ``triton-repo`` make of a checkpoint
(JSON bodies of pixels, not of float32 text; results/triton_serving_u8.*):

    .venv/bin/stn-deploy export export/demo/train/last.pt --embed-preprocess --opset 16 \
        --out export/demo/stn-opset16-u8.onnx
    .venv/bin/python benchmarks/triton_serving.py export/demo/stn-opset16-u8.onnx --rounds 5 \
        --pytriton-python /tmp/pyt/bin/python --out benchmarks/results/triton_serving_u8

Writes benchmarks/results/triton_serving.{json,md} (--out elsewhere). ``--duration 1`` is a
smoke run of every step in about a minute, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from _provenance import RESULTS, write_results
from stn_deploy.serving.loadtest import LoadRequest, batcher_counts, run_loadtest
from stn_deploy.serving.python_model import default_threads
from stn_deploy.serving.serve import group_alive
from stn_deploy.serving.triton_repo import default_prefix

DEFAULT_MODEL = RESULTS.parents[1] / "export" / "demo" / "stn-opset16-fp32.onnx"
START_TIMEOUT_S = 180.0
SIGTERM_GOAL_S = 5.0  # "within a few seconds"
PYTRITON_PORT_OFFSET = 30


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, nargs="?", default=DEFAULT_MODEL,
                    help="ONNX file to serve [default: the demo's FP32 digits export]")
    ap.add_argument("--backend", choices=("onnxruntime", "openvino"), default="onnxruntime")
    ap.add_argument("--port", type=int, default=18100, help="HTTP port (+1 gRPC, +2 metrics); "
                    "the killed-server check uses port + 10, the overload check port + 20")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=64,
                    help="the overload check's queue bound (its own server: with a bound "
                         "Triton's batcher stalls 0.5 s at times, so the levels run unbounded)")
    ap.add_argument("--threads", type=int, default=None,
                    help="runner threads, served and in process [default: serve's]")
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--concurrency", default="1,8,32", help="closed-loop levels (1 and 32 "
                    "are the targets' levels)")
    ap.add_argument("--protocols", default="json,binary,grpc", help="json, binary, grpc")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of every "
                    "protocol and level, then the runner in process; figures are medians")
    ap.add_argument("--rates", default="auto", help="open-loop request rates/s, comma-separated;"
                    " auto: 50%% and 80%% of the best closed-loop rate; none: skip")
    ap.add_argument("--arrivals", choices=("constant", "poisson"), default="poisson")
    ap.add_argument("--overload-concurrency", type=int, default=256)
    ap.add_argument("--duration", type=float, default=8.0,
                    help="seconds per level and per in-process batch size")
    ap.add_argument("--pytriton-python", type=Path, default=None,
                    help="an interpreter with nvidia-pytriton 0.7, numpy<2 and onnxruntime: "
                         "PyTriton serves the same model in the same rounds (binary, port + 30;"
                         " see _pytriton_server.py); without it, --pytriton-results' figures")
    ap.add_argument("--pytriton-results", type=Path, default=RESULTS / "triton_serving.json",
                    help="results file holding an earlier PyTriton run's figures")
    ap.add_argument("--out", type=Path, default=RESULTS / "triton_serving")
    args = ap.parse_args()
    args.levels = tuple(int(v) for v in args.concurrency.split(","))
    args.protocol_list = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if not {1, 32} <= set(args.levels):
        ap.error("--concurrency must include 1 and 32: the targets are at those levels")
    if args.pytriton_python and args.backend != "onnxruntime":
        ap.error("--pytriton-python compares onnxruntime only (the baseline's runner)")
    if args.pytriton_python and not args.pytriton_python.is_file():
        ap.error(f"--pytriton-python {args.pytriton_python}: no such interpreter")
    if not args.model.is_file():
        ap.error(f"{args.model} not found (make demo writes the default)")
    args.threads = args.threads or default_threads(args.instances)
    args.name = default_prefix(args.model)
    return args


def pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    """Every line of ``stream`` into ``lines``, then "" at its end: in a thread, so waiting for
    a line can time out, and the server's output never fills its pipe."""
    for text in stream:
        lines.put(text)
    lines.put("")


Server = tuple[subprocess.Popen[str], int, queue.Queue[str]]


def spawn(cmd: list[str]) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    """``cmd`` in a process group of its own, its output lines pumped into a queue."""
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    assert server.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=pump, args=(server.stdout, lines), daemon=True).start()
    return server, lines


def read_until(lines: queue.Queue[str], done: Callable[[str], bool],
               timeout_s: float) -> list[str]:
    """A server's output lines (newlines stripped) up to the first that is ``done``, its end
    (the pump's ""), or the timeout."""
    said: list[str] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            text = lines.get(timeout=left)
        except queue.Empty:
            break
        if not text:
            break
        said.append(text.rstrip("\n"))
        if done(said[-1]):
            break
    return said


def start_server(args: argparse.Namespace, port: int, max_queue: int = 0) -> Server:
    """``stn-deploy serve`` once it says it is serving, tritonserver's pid (its own process
    group) and serve's further output lines; the script ends with serve's last lines if it
    does not start. ``max_queue`` 0: no queue bound (see measure)."""
    server, lines = spawn(
        [sys.executable, "-m", "stn_deploy", "serve", str(args.model), "--backend", args.backend,
         "--port", str(port), "--max-batch-size", str(args.max_batch_size),
         "--max-queue", str(max_queue), "--instances", str(args.instances),
         "--threads", str(args.threads)])
    said = read_until(lines, lambda text: "tritonserver pid " in text, START_TIMEOUT_S)
    if said and "tritonserver pid " in said[-1]:
        return server, int(said[-1].split("tritonserver pid ")[1].split(";")[0]), lines
    stop_group(server, server.pid)
    sys.exit(f"serve did not start (exit {server.returncode}): {' '.join(said[-5:])}")


def load(args: argparse.Namespace, port: int, **kw: Any) -> list[dict[str, Any]]:
    """loadtest's rows (the library's run_loadtest, as the command runs it), quietly."""
    settings: dict[str, Any] = {"duration_s": args.duration, "max_requests": 1_000_000,
                                "threads": args.threads, **kw}
    req = LoadRequest(url=f"http://127.0.0.1:{port}", model=args.model, backend=args.backend,
                      **settings)
    return run_loadtest(req, echo=lambda _: None)["results"]


def rest(lines: queue.Queue[str], timeout_s: float = 10.0) -> list[str]:
    """serve's output lines up to its end, or what came within the timeout."""
    return read_until(lines, lambda _: False, timeout_s)


def in_process(args: argparse.Namespace, sizes: list[int]) -> dict[int, dict[str, Any]]:
    """The runner with the server's threads, timed end to end at each batch size."""
    from stn_deploy.backends import create_runner
    from stn_deploy.harness import measure_latency

    with create_runner(args.backend, args.model, threads=args.threads) as runner:
        return {b: measure_latency(runner, b, iterations=None,
                                   duration_s=args.duration).to_dict() for b in sizes}


def sigterm(server: subprocess.Popen[str], pgid: int) -> dict[str, Any]:
    """SIGTERM to serve: its exit code, the seconds it took, and whether tritonserver's group
    is gone."""
    t0 = time.monotonic()
    server.send_signal(signal.SIGTERM)
    try:
        code: int | None = server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.monotonic() - t0
    return {"exit_code": code, "seconds": round(seconds, 2), "group_gone": not group_alive(pgid)}


def kill_mid_run(args: argparse.Namespace) -> dict[str, Any]:
    """tritonserver's process group SIGKILLed once 100 requests of a 60 s loadtest (run as
    the command) are answered, on ports of its own; what the client and serve then say."""
    port = args.port + 10
    server, pgid, lines = start_server(args, port)
    client = subprocess.Popen(
        [sys.executable, "-m", "stn_deploy", "loadtest", f"http://127.0.0.1:{port}", "--model",
         str(args.model), "--backend", args.backend, "--concurrency", "8", "--duration", "60",
         "--timeout", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = f"http://127.0.0.1:{port + 2}/metrics"
    deadline = time.monotonic() + 120  # the client first runs its local reference
    while time.monotonic() < deadline and client.poll() is None and (
            batcher_counts(metrics, args.name) or {}).get("request_success", 0) < 100:
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    killed = time.monotonic()
    try:
        _, err = client.communicate(timeout=90)
        hung = False
    except subprocess.TimeoutExpired:
        client.kill()
        _, err = client.communicate()
        hung = True
    after = round(time.monotonic() - killed, 2)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    serve_out = rest(lines)
    return {"client_exit_code": client.returncode, "hung": hung, "seconds_after_kill": after,
            "client_error_lines": [ln for ln in err.splitlines()
                                   if ln.strip() and not ln.startswith("concurrency ")],
            "serve_exit_code": server.returncode,
            "serve_error_lines": [ln for ln in serve_out if ln.startswith("Error")]}


def open_rates(args: argparse.Namespace, closed: list[dict[str, Any]]) -> list[float]:
    if args.rates == "none":
        return []
    if args.rates != "auto":
        return [float(r) for r in args.rates.split(",")]
    best = max(r.get("throughput_ips") or 0.0 for r in closed if r["server"] == "one-hop")
    return [round(f * best) for f in (0.5, 0.8) if round(f * best) > 0]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The closed-loop levels in ``--rounds`` alternating rounds on one server without a queue
    bound, the in-process figures of each round timed right after it while the server idles;
    then the open-loop rates, SIGTERM, and the overload and killed-server checks on servers of
    their own.

    Rounds: this 2-core VM's speed drifts by tens of percent over minutes, so one pass per
    protocol compares phases, not protocols (one run's binary c1 p99 was 4.2 ms; alternating
    A/B rounds on the same server gave 2.2-2.6 ms). Each round runs every protocol (in a
    rotated order) and then the runner in process; a figure is the median over rounds, and
    each served / in process ratio is taken within its round.

    Unbounded because a bound (max_queue_size) turns off the dynamic batcher's prefetching,
    and its wait for a free instance then misses its wake-up now and then and sits out a
    0.5 s timeout with a full batch queued (tritonserver 2.51): every closed-loop level from
    concurrency 8 on had 0.5 s stalls; the overload check needs the bound to reject."""
    server, pgid, _ = start_server(args, args.port)
    pytriton = None
    try:  # a PyTriton that does not start must not leave the one-hop server running
        pytriton = start_pytriton(args) if args.pytriton_python else None
        rounds = [one_round(args, i, pytriton is not None) for i in range(args.rounds)]
        closed = combine([r["closed_loop"] for r in rounds], "concurrency")
        inproc = combine_in_process([r["in_process"] for r in rounds])
        rates = open_rates(args, closed)
        opened = load(args, args.port, rates=tuple(rates), arrivals=args.arrivals,
                      protocols=args.protocol_list) if rates else []
        for r in opened:
            r["server"] = "one-hop"
        if opened:
            attach(opened, in_process(args, sorted({batch_of(r) or 1 for r in opened})))
        stop = sigterm(server, pgid)
    finally:
        stop_group(server, pgid)
        if pytriton is not None:
            stop_group(pytriton, pytriton.pid)
    return {"rounds": args.rounds, "closed_loop": closed, "open_loop": opened,
            "in_process": inproc, "in_process_rounds": [r["in_process"] for r in rounds],
            "overload": overload(args), "sigterm": stop, "killed_mid_run": kill_mid_run(args)}


def one_round(args: argparse.Namespace, i: int, pytriton: bool) -> dict[str, Any]:
    """Every protocol at every closed-loop level (round i starts at protocol i), PyTriton's
    binary levels if it runs, then the runner in process at batch 1 and at each batch the
    batchers formed in this round."""
    k = i % len(args.protocol_list)
    protocols = args.protocol_list[k:] + args.protocol_list[:k]
    closed = load(args, args.port, concurrency=args.levels, protocols=protocols)
    for r in closed:
        r["server"] = "one-hop"
    if pytriton:
        for r in load(args, args.port + PYTRITON_PORT_OFFSET, concurrency=args.levels,
                      protocols=("binary",)):
            closed.append({**r, "server": "pytriton"})
    inproc = in_process(args, sorted({1, *(b for r in closed if (b := batch_of(r)))}))
    attach(closed, inproc)
    for r in closed:
        r["round"] = i
    return {"closed_loop": closed, "in_process": inproc}


def start_pytriton(args: argparse.Namespace) -> subprocess.Popen[str]:
    """_pytriton_server.py under --pytriton-python, in a process group of its own, once it
    says it is serving; the script ends with its last line (the error) if it does not start."""
    server, lines = spawn(
        [str(args.pytriton_python), str(Path(__file__).with_name("_pytriton_server.py")),
         str(args.model), "--name", args.name, "--port",
         str(args.port + PYTRITON_PORT_OFFSET), "--threads", str(args.threads),
         "--max-batch-size", str(args.max_batch_size)])
    said = read_until(lines, lambda text: text.strip() == "serving", START_TIMEOUT_S)
    if said and said[-1].strip() == "serving":
        return server
    stop_group(server, server.pid)
    sys.exit(f"PyTriton did not start: {said[-1].strip() if said else 'no output'}")


def batch_of(row: dict[str, Any]) -> int | None:
    """The batch the batcher formed for a row, rounded to a size the runner can be timed at."""
    return max(1, round(row["mean_batch"])) if row.get("mean_batch") else None


def attach(rows: list[dict[str, Any]], inproc: dict[int, dict[str, Any]]) -> None:
    """Each row's in-process img/s at the batch it formed, and served over that."""
    for r in rows:
        b = batch_of(r)
        ref = inproc[b]["throughput_ips"] if b else None
        r["in_process_batch"], r["in_process_ips"] = b, ref
        r["served_over_in_process"] = (r["throughput_ips"] / ref
                                       if ref and r.get("throughput_ips") else None)


MEDIANS = ("throughput_ips", "p50_ms", "p90_ms", "p99_ms", "mean_batch", "in_process_ips",
           "served_over_in_process", "client_cpu_pct", "client_cpu_us")
SUMS = ("requests", "answered", "errors", "rejected", "lost")


def combine(rounds: list[list[dict[str, Any]]], key: str) -> list[dict[str, Any]]:
    """One row per protocol and level: the median of each figure over the rounds, counts
    summed, the lowest agreement; each round's own figures kept under "per_round"."""
    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for rows in rounds:
        for r in rows:
            groups.setdefault((r["server"], r["protocol"], r[key]), []).append(r)
    out = []
    for (server, protocol, value), rows in groups.items():  # round 0's order
        row: dict[str, Any] = {"server": server, "protocol": protocol, key: value}
        for name in MEDIANS:
            xs = [r[name] for r in rows if r.get(name) is not None]
            row[name] = float(statistics.median(xs)) if xs else None
        row.update({name: sum(r.get(name) or 0 for r in rows) for name in SUMS})
        agree = [r["agreement_pct"] for r in rows if r.get("agreement_pct") is not None]
        row["agreement_pct"] = min(agree) if agree else None
        row["in_process_batch"] = batch_of(row)
        row["per_round"] = [{n: r.get(n) for n in ("round", "throughput_ips", "p99_ms",
                                                     "mean_batch", "served_over_in_process")}
                            for r in rows]
        out.append(row)
    return out


def combine_in_process(rounds: list[dict[int, dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """Per batch size, the median of each timing over the rounds that measured it."""
    sizes = sorted({b for r in rounds for b in r})
    return {b: {name: float(statistics.median([r[b][name] for r in rounds if b in r]))
                for name in ("throughput_ips", "p50_ms", "p99_ms")} | {
                "rounds": sum(b in r for r in rounds)} for b in sizes}


def overload(args: argparse.Namespace) -> dict[str, Any]:
    """Far more in flight than --max-queue holds, on a server with that bound: nothing lost,
    the rest rejected, and the server ready afterwards."""
    port = args.port + 20
    server, pgid, _ = start_server(args, port, max_queue=args.max_queue)
    try:
        over = load(args, port, concurrency=(args.overload_concurrency,),
                    protocols=("binary",), timeout_s=30)[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready",
                                    timeout=5) as r:
            ready = r.status == 200
        after = load(args, port, concurrency=(1,), protocols=("binary",), duration_s=1.0,
                     max_requests=20)[0]
        sigterm(server, pgid)
    finally:
        stop_group(server, pgid)
    return {**over, "ready_after": ready and after["answered"] > 0}


def stop_group(server: subprocess.Popen[str], pgid: int) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)


def target(value: Any, goal: str, met: bool, **more: Any) -> dict[str, Any]:
    return {"value": value, "goal": goal, "met": bool(met), **more}


def targets(args: argparse.Namespace, m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The served-throughput, latency, overload, stop and accuracy targets, per protocol
    where they depend on it."""
    out: dict[str, dict[str, Any]] = {}
    p99_b1 = m["in_process"][1]["p99_ms"]
    b1_rounds = ", ".join(f"{r[1]['p99_ms']:.2f}" for r in m["in_process_rounds"])
    for proto in args.protocol_list:
        rows = {r["concurrency"]: r for r in m["closed_loop"]
                if r["protocol"] == proto and r["server"] == "one-hop"}
        c32, c1 = rows[32], rows[1]
        ratio = c32.get("served_over_in_process")
        out[f"c32_served_over_in_process_{proto}"] = target(
            None if ratio is None else round(100 * ratio, 1), ">= 75 %",
            ratio is not None and ratio >= 0.75,
            at=f"median of rounds {rounds_of(c32, 'served_over_in_process', 100, '.1f')}; "
               f"batch formed {c32.get('mean_batch') or 0:.2f}, in process at batch "
               f"{c32.get('in_process_batch')}")
        p99 = c1.get("p99_ms")
        out[f"c1_p99_ms_{proto}"] = target(
            None if p99 is None else round(p99, 3), f"<= 2 x {p99_b1:.3f} + 1 ms",
            p99 is not None and p99 <= 2 * p99_b1 + 1,
            at=f"median of rounds {rounds_of(c1, 'p99_ms', 1, '.2f')}; in process: median "
               f"of rounds {b1_rounds}")
    over = m["overload"]
    out["overload_none_lost"] = target(
        f"{over['answered']} answered, {over['rejected']} rejected, {over['errors']} errors, "
        f"{over['lost']} lost of {over['requests']}; ready after: {over['ready_after']}",
        "0 lost, ready after", over["lost"] == 0 and over["ready_after"])
    s = m["sigterm"]
    out["sigterm_clean"] = target(
        f"exit {s['exit_code']} in {s['seconds']} s, group gone: {s['group_gone']}",
        f"exit 0 within {SIGTERM_GOAL_S:.0f} s, no process left",
        s["exit_code"] == 0 and s["seconds"] <= SIGTERM_GOAL_S and s["group_gone"])
    k = m["killed_mid_run"]
    out["killed_mid_run"] = target(
        f"client exit {k['client_exit_code']} {k['seconds_after_kill']} s after the kill, "
        f"{len(k['client_error_lines'])} line(s)", "one line, non-zero, no hang",
        not k["hung"] and k["client_exit_code"] not in (0, None)
        and len(k["client_error_lines"]) == 1)
    rows = [r for r in m["closed_loop"] + m["open_loop"]
            if r.get("answered") and r["server"] == "one-hop"]
    out["served_agrees_with_local"] = target(
        min(r["agreement_pct"] for r in rows), "100 % top-1 agreement on every level (so the "
        "served accuracy is the local runner's on the same images)",
        all(r["agreement_pct"] == 100.0 for r in rows))
    return out


def rounds_of(row: dict[str, Any], name: str, scale: float, spec: str) -> str:
    """A combined row's per-round values of one figure, as the results show them."""
    return ", ".join("-" if r.get(name) is None else format(scale * r[name], spec)
                     for r in row["per_round"])


def pytriton_reference(path: Path) -> dict[str, Any] | None:
    """The PyTriton run's figures: from its own results file (no provenance block, a
    "served_sweep"), or carried forward in a later file of this script; None if neither."""
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if "pytriton_reference" in doc:
        return doc["pytriton_reference"]
    if "served_sweep" not in doc or "provenance" in doc:
        return None
    system = doc.get("system", {})
    root = RESULTS.parents[1]
    return {"source": str(path.relative_to(root) if path.is_relative_to(root) else path),
            "date": doc.get("date"), "cpu": system.get("cpu"),
            "cpus": system.get("cpus_available"), "model": doc.get("model"),
            "backend": doc.get("backend"),
            "protocol": "binary (HTTP, tritonclient's default)",
            "in_process_b1_p99_ms": doc["in_process"]["1"]["p99_ms"],
            "rows": [{k: r.get(k) for k in ("concurrency", "throughput_ips", "p50_ms", "p99_ms",
                                            "batch_formed", "served_over_in_process_pct")}
                     for r in doc["served_sweep"]]}


def fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def served_table(rows: list[dict[str, Any]], key: str) -> list[str]:
    head = "Rate/s" if key == "rate" else "Concurrency"
    out = [f"| Protocol | {head} | img/s | p50 ms | p99 ms | Batch formed | In process at "
           "that batch, img/s | Served / in process | Answered | Rejected | Lost | "
           "Agreement % | Client CPU % | Client CPU us/req |", "|---|" + "---:|" * 13]
    for r in rows:
        out.append(
            f"| {r['protocol']} | {fmt(r[key], '.0f')} | {fmt(r.get('throughput_ips'), '.0f')}"
            f" | {fmt(r.get('p50_ms'))} | {fmt(r.get('p99_ms'))} | {fmt(r.get('mean_batch'))} |"
            f" {fmt(r.get('in_process_ips'), '.0f')} | "
            f"{fmt(r.get('served_over_in_process'))} | {r['answered']} | {r['rejected']} | "
            f"{r['lost']} | {fmt(r.get('agreement_pct'))} | {fmt(r.get('client_cpu_pct'), '.0f')}"
            f" | {fmt(r.get('client_cpu_us'), '.0f')} |")
    return out


def this_run_pytriton(args: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any] | None:
    """This run's PyTriton rows in the form pytriton_reference reads, so that a later run
    without --pytriton-python carries them forward with their date and machine."""
    rows = [r for r in m["closed_loop"] if r["server"] == "pytriton"]
    if not rows:
        return None
    from stn_deploy.harness import system_info

    system = system_info()
    return {"source": "this run", "same_run": True,
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "cpu": f"{system['cpu']} ({system['cpu_isa']})", "cpus": system["cpus_available"],
            "model": args.model.name, "backend": args.backend,
            "protocol": "binary (HTTP), the same rounds as the one-hop rows",
            "in_process_b1_p99_ms": m["in_process"][1]["p99_ms"],
            "rows": [{"concurrency": r["concurrency"], "throughput_ips": r["throughput_ips"],
                      "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                      "batch_formed": r["mean_batch"],
                      "served_over_in_process_pct": None if r["served_over_in_process"] is None
                      else 100 * r["served_over_in_process"]} for r in rows]}


def comparison(ref: dict[str, Any] | None, closed: list[dict[str, Any]]) -> list[str]:
    """PyTriton's rows (this run's, or an earlier run's) beside this run's one-hop binary
    rows, at the same concurrencies."""
    if ref is None:
        return ["No PyTriton figures (--pytriton-python to measure them, --pytriton-results "
                "to read an earlier run's): nothing to compare."]
    ours = {r["concurrency"]: r for r in closed
            if r["protocol"] == "binary" and r["server"] == "one-hop"}
    when = ("measured in this run, in the same rounds, same runner and threads (its own "
            "interpreter: PyTriton 0.7 needs numpy<2)" if ref.get("same_run") else
            f"not re-measured: {ref['date']} on {ref['cpu']} ({ref['cpus']} CPUs), "
            f"{ref['model']}, {ref['backend']}, {ref['protocol']}; from {ref['source']}. "
            "Another day and possibly another machine: compare the ratios to in process, "
            "not the raw img/s")
    out = [f"PyTriton (stub -> proxy -> runner process), {when}.", "",
           "| Concurrency | PyTriton img/s | p50 ms | p99 ms | served / in process | "
           "one hop (binary) img/s | p50 ms | p99 ms | served / in process |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in ref["rows"]:
        o = ours.get(p["concurrency"], {})
        pct = p.get("served_over_in_process_pct")
        out.append(f"| {p['concurrency']} | {fmt(p['throughput_ips'], '.0f')} | "
                   f"{fmt(p['p50_ms'])} | {fmt(p['p99_ms'])} | "
                   f"{fmt(None if pct is None else pct / 100)} | "
                   f"{fmt(o.get('throughput_ips'), '.0f')} | {fmt(o.get('p50_ms'))} | "
                   f"{fmt(o.get('p99_ms'))} | {fmt(o.get('served_over_in_process'))} |")
    return out


def markdown(args: argparse.Namespace, m: dict[str, Any], goals: dict[str, Any],
             ref: dict[str, Any] | None) -> str:
    inproc = ["| Batch | img/s | p50 ms | p99 ms | Rounds |", "|---:|---:|---:|---:|---:|"] + [
        f"| {b} | {s['throughput_ips']:.0f} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | "
        f"{s['rounds']} |" for b, s in m["in_process"].items()]
    over, k = m["overload"], m["killed_mid_run"]
    goal_md = ["| Target | Value | Goal | Met |", "|---|---|---|---|"] + [
        f"| {name} | {t['value']}{' (' + t['at'] + ')' if 'at' in t else ''} | {t['goal']} | "
        f"{'yes' if t['met'] else 'NO'} |" for name, t in goals.items()]
    return "\n".join([
        f"# Triton serving, one hop ({args.backend}, CPU)", "",
        f"`stn-deploy serve {args.model.name} --backend {args.backend} --max-batch-size "
        f"{args.max_batch_size} --instances {args.instances} "
        f"--threads {args.threads}`: tritonserver from the nvidia-pytriton wheel, the runner "
        "inside its Python-backend stub. Server, load generator and in-process timing on the "
        f"same machine, loopback; {args.rounds} alternating rounds of {args.duration:g} s per "
        "level (each round: every protocol, PyTriton if measured, then the runner in process; "
        "a figure is the median over rounds, each round's own in the JSON); batch-1 "
        "requests. No queue "
        "bound for the levels (with one, Triton's batcher stalls 0.5 s at times); the "
        f"overload check runs on a server of its own with --max-queue {args.max_queue}.", "",
        *goal_md, "",
        "In process, the same runner with the same threads, end to end, timed after each "
        "round while the servers idled (medians over the rounds that formed that batch):", "",
        *inproc, "",
        "Closed loop (each client sends its next request when the last is answered). Batch "
        "formed: images per execution from Triton's metrics; served / in process: served img/s "
        "over the in-process img/s at that batch (rounded); client CPU: the load generator's "
        "own CPU time over the level (100% = one core) and per request sent: CPU the server "
        "did not get, since both share this machine:", "",
        *served_table([r for r in m["closed_loop"] if r["server"] == "one-hop"],
                      "concurrency"), "",
        *([f"Open loop ({args.arrivals} arrivals; latency from each request's scheduled send "
           "time, so time spent queueing counts; below the server's capacity, served / in "
           "process is the offered load over capacity, not the server's cost):", "",
           *served_table(m["open_loop"], "rate"), ""] if m["open_loop"] else []),
        f"Overload (its own server): concurrency {args.overload_concurrency} against "
        f"--max-queue {args.max_queue}, binary: {over['answered']} answered, "
        f"{over['rejected']} rejected, "
        f"{over['errors']} errors, {over['lost']} lost; ready afterwards: "
        f"{over['ready_after']}.", "",
        f"SIGTERM: exit {m['sigterm']['exit_code']} after {m['sigterm']['seconds']} s; "
        f"tritonserver's process group gone: {m['sigterm']['group_gone']}.", "",
        f"tritonserver SIGKILLed after 100 answers of a loadtest: the client said "
        f"{k['client_error_lines']} (exit {k['client_exit_code']}); serve said "
        f"{k['serve_error_lines']} (exit {k['serve_exit_code']}).", "",
        "## Against PyTriton", "", *comparison(ref, m["closed_loop"])])


def main() -> None:
    args = parse_args()
    ref = pytriton_reference(args.pytriton_results)  # read before the results are rewritten
    m = measure(args)
    ref = this_run_pytriton(args, m) or ref
    goals = targets(args, m)
    doc = {"model": str(args.model), "backend": args.backend, "threads": args.threads,
           "instances": args.instances, "max_batch_size": args.max_batch_size,
           "max_queue": args.max_queue, "duration_s": args.duration,
           "arrivals": args.arrivals, **m, "targets": goals, "pytriton_reference": ref}
    md = markdown(args, m, goals, ref)
    json_path, md_path = write_results(args.out.name, doc, md, folder=args.out.parent)
    print(md)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
