"""Served (PyTriton, dynamic batching) against in-process throughput, same backend, same run.

Why it exists: issue 12's targets compare Triton-served answers, throughput and latency with
bench's in-process numbers for the same backend, and ask how the server and the client fail.
This script, on loopback only:
- starts ``stn-deploy serve`` on 127.0.0.1 and load-tests it (HTTP, batch-1 requests) at a
  sweep of concurrencies; Triton's own metrics give the batch size its dynamic batcher formed
  at each level (successful requests / model executions);
- times the same runner in process (harness.measure_latency) at batch 1 and at each batch
  size the batcher formed, while the server idles;
- overloads the server (concurrency 256 against --max-queue) and checks it is ready after;
- sends SIGTERM and checks the server stops with exit 0;
- starts it again, runs ``stn-deploy loadtest`` against it and kills the server's whole
  process group mid-run: the client must say so in one line and exit non-zero, no hang.
Run it with the [serve] extra's interpreter (nvidia-pytriton needs numpy<2), on a quiet machine:

    /work/venv-serve/bin/python benchmarks/triton_serving.py --model export/digits-u8.onnx
Writes benchmarks/results/triton_serving.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from stn_deploy.backends import create_runner
from stn_deploy.fileio import write_text_atomic
from stn_deploy.harness import measure_latency, system_info
from stn_deploy.serving.loadtest import LoadRequest, run_loadtest, to_markdown
from stn_deploy.serving.triton_repo import default_prefix

RESULTS = Path(__file__).resolve().parent / "results"


def pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    """Every line of ``stream`` into ``lines``, then "" at its end: in a thread, so waiting for
    a line can time out (readline blocks), and the server's output never fills its pipe."""
    for line in stream:
        lines.put(line)
    lines.put("")


def start_server(args: argparse.Namespace, port: int | None = None) -> subprocess.Popen[str]:
    """``stn-deploy serve`` in its own process group (so a kill takes tritonserver too),
    returned once it says it is serving, or the script ends within 180 s."""
    server = subprocess.Popen([sys.executable, "-m", "stn_deploy", "serve", str(args.model),
                               "--backend", args.backend, "--port", str(port or args.port),
                               "--max-batch", str(args.max_batch),
                               "--max-queue", str(args.max_queue),
                               "--instances", str(args.instances),
                               *(["--threads", str(args.threads)] if args.threads else [])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    assert server.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=pump, args=(server.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + 180
    said = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        said.append(line)
        if "serving" in line:
            return server
        if not line:  # its output ended: it exited
            break
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    sys.exit(f"serve did not start (exit {server.returncode}): {''.join(said[-5:])}")


def counters(metrics_url: str, model: str) -> dict[str, float]:
    """Triton's per-model request and execution counters from its Prometheus endpoint."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    out = {}
    for key in ("nv_inference_request_success", "nv_inference_exec_count",
                "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                "nv_inference_compute_infer_duration_us"):
        m = re.search(rf'^{key}{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$', text, re.M)
        out[key] = float(m.group(1)) if m else 0.0
    return out


def kill_mid_run(args: argparse.Namespace) -> dict[str, Any]:
    """The server's process group SIGKILLed once 100 requests of a 60 s load test are answered
    (on ports of its own:
    the first server's may still be closing)."""
    port = args.port + 10
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    client = subprocess.Popen([sys.executable, "-m", "stn_deploy", "loadtest", url, "--model",
                               str(args.model), "--backend", args.backend, "--concurrency", "8",
                               "--duration", "60", "--timeout", "10"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # the client first loads its local reference
    while time.monotonic() < deadline and client.poll() is None and counters(
            f"http://127.0.0.1:{port + 2}/metrics", default_prefix(args.model))[
            "nv_inference_request_success"] < 100:
        time.sleep(0.2)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    killed = time.monotonic()
    try:
        out, err = client.communicate(timeout=90)
        hung = False
    except subprocess.TimeoutExpired:
        client.kill()
        out, err = client.communicate()
        hung = True
    lines = [ln for ln in err.splitlines() if not ln.startswith("concurrency ")]
    return {"client_exit_code": client.returncode, "hung": hung,
            "seconds_after_kill": round(time.monotonic() - killed, 2),
            "client_error_lines": lines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--port", type=int, default=18100)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--instances", type=int, default=1, help="serve --instances")
    ap.add_argument("--threads", type=int, default=None, help="serve --threads (per instance)")
    args = ap.parse_args()
    levels = [int(v) for v in args.concurrency.split(",")]
    if 1 not in levels:
        ap.error("--concurrency must include 1: the p99 target is at concurrency 1")
    name = default_prefix(args.model)
    url = f"http://127.0.0.1:{args.port}"
    metrics_url = f"http://127.0.0.1:{args.port + 2}/metrics"

    server = start_server(args)
    try:
        sweep: list[dict[str, Any]] = []
        for c in levels:
            before = counters(metrics_url, name)
            report = run_loadtest(LoadRequest(url=url, model=args.model, backend=args.backend,
                                              concurrency=(c,), duration_s=args.duration,
                                              max_requests=100_000))
            after = counters(metrics_url, name)
            row = report["results"][0]
            execs = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
            done = after["nv_inference_request_success"] - before["nv_inference_request_success"]
            row["batch_formed"] = round(done / execs, 2) if execs else None
            # Where a request's time goes, from Triton's own cumulative durations.
            for key, label in (("nv_inference_request_duration_us", "server_ms"),
                               ("nv_inference_queue_duration_us", "queue_ms"),
                               ("nv_inference_compute_infer_duration_us", "compute_ms")):
                row[label] = round((after[key] - before[key]) / 1000 / done, 3) if done else None
            sweep.append(report)
        overload = run_loadtest(LoadRequest(url=url, model=args.model, backend=args.backend,
                                            concurrency=(256,), duration_s=args.duration,
                                            max_requests=100_000, timeout_s=30))
        ready = run_loadtest(LoadRequest(url=url, model=args.model, backend=args.backend,
                                         concurrency=(1,), duration_s=1, max_requests=20))
        # In process while the server idles: batch 1 and every batch size the batcher formed.
        rows = [r["results"][0] for r in sweep]
        sizes = sorted({1, *(max(1, round(r["batch_formed"] or 1)) for r in rows)})
        with create_runner(args.backend, args.model) as runner:
            inproc = {b: measure_latency(runner, b, iterations=None,
                                         duration_s=args.duration).to_dict() for b in sizes}
        t0 = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        exit_code = server.wait(timeout=60)
        stop_s = time.monotonic() - t0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    killed = kill_mid_run(args)

    for r in rows:
        b = max(1, round(r["batch_formed"] or 1))
        r["in_process_ips_at_batch_formed"] = inproc[b]["throughput_ips"]
        r["served_over_in_process_pct"] = 100 * r["throughput_ips"] / inproc[b]["throughput_ips"]
    best = max(rows, key=lambda r: r["throughput_ips"])
    over = overload["results"][0]
    p99_c1 = next(r for r in rows if r["concurrency"] == 1)["p99_ms"]
    p99_b1 = inproc[1]["p99_ms"]
    targets = {
        "agreement_100pct": {"value": min(r["agreement_pct"] for r in rows), "goal": "== 100",
                             "met": all(r["agreement_pct"] == 100.0 for r in rows)},
        "best_served_over_in_process": {
            "value": round(best["served_over_in_process_pct"], 1), "goal": ">= 50 %",
            "met": best["served_over_in_process_pct"] >= 50,
            "at": f"concurrency {best['concurrency']}, batch formed {best['batch_formed']}"},
        "p99_c1_ms": {"value": round(p99_c1, 3), "goal": f"<= 2 x {p99_b1:.3f} + 1 ms",
                      "met": p99_c1 <= 2 * p99_b1 + 1},
        "overload_none_lost": {"value": f"{over['answered']} answered, {over['rejected']} "
                                        f"rejected, {over['errors']} errors, {over['lost']} "
                                        f"lost of {over['requests']}",
                               "goal": "0 lost, ready after",
                               "met": over["lost"] == 0 and ready["results"][0]["answered"] > 0},
        "sigterm_clean": {"value": f"exit {exit_code} in {stop_s:.1f} s", "goal": "exit 0",
                          "met": exit_code == 0},
        "killed_mid_run": {"value": f"client exit {killed['client_exit_code']} "
                                    f"{killed['seconds_after_kill']} s after the kill, "
                                    f"{len(killed['client_error_lines'])} line(s)",
                           "goal": "one line, non-zero, no hang",
                           "met": not killed["hung"] and killed["client_exit_code"] != 0
                           and len(killed["client_error_lines"]) == 1},
    }
    summary = {"date": datetime.date.today().isoformat(), "system": system_info(),
               "model": str(args.model), "backend": args.backend, "instances": args.instances,
               "threads": args.threads, "in_process": inproc,
               "served_sweep": rows, "overload": over,
               "ready_after_overload": ready["results"][0]["answered"] > 0,
               "sigterm_exit_code": exit_code, "killed_mid_run": killed, "targets": targets}
    write_text_atomic(RESULTS / "triton_serving.json",
                      json.dumps(summary, indent=2, default=str) + "\n")
    inproc_md = ["| Batch | img/s | p50 ms | p99 ms |", "|---:|---:|---:|---:|"] + [
        f"| {b} | {s['throughput_ips']:.0f} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} |"
        for b, s in inproc.items()]
    formed = ", ".join(f"concurrency {r['concurrency']}: {r['batch_formed']} "
                       f"({r['served_over_in_process_pct']:.0f}% of in-process at that batch)"
                       for r in rows)
    target_md = ["| Target | Value | Goal | Met |", "|---|---|---|---|"] + [
        f"| {k} | {t['value']}{' (' + t['at'] + ')' if 'at' in t else ''} | {t['goal']} | "
        f"{'yes' if t['met'] else 'NO'} |" for k, t in targets.items()]
    md = [f"# Triton serving (PyTriton, {args.backend}, CPU), {summary['date']}", "",
          f"serve --max-batch {args.max_batch} --max-queue {args.max_queue} --instances "
          f"{args.instances} --threads {args.threads or 'default'}", "",
          f"Machine: {summary['system'].get('cpu')} ({summary['system'].get('cpus_available')} "
          f"CPUs); server and load generator on the same machine, loopback HTTP.", "",
          "In process, same runner, timed while the server idled:", "", *inproc_md, "",
          "Served, batch-1 HTTP requests:", "",
          to_markdown({**sweep[0], "results": rows}).rstrip(), "",
          f"Batch size the dynamic batcher formed (Triton's metrics): {formed}.", "",
          "Where a request's time goes (means per request; server = Triton's request duration,"
          " of it queue and compute = the PyTriton hop to the runner and back plus the runner;"
          " the rest of the client's mean is HTTP and the client):", "",
          "| Concurrency | client mean ms | server ms | queue ms | compute ms |",
          "|---:|---:|---:|---:|---:|",
          *(f"| {r['concurrency']} | {1000 * r['seconds'] * r['concurrency'] / r['answered']:.3f}"
            f" | {r['server_ms']} | {r['queue_ms']} | {r['compute_ms']} |" for r in rows), "",
          f"Overload (concurrency 256, max queue {args.max_queue}):", "",
          to_markdown(overload).rstrip(), "",
          f"Server killed (SIGKILL to its process group) after 100 answers of a loadtest: "
          f"{killed['client_error_lines']}", "", *target_md]
    write_text_atomic(RESULTS / "triton_serving.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
