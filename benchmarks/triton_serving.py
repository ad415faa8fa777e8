"""Served (PyTriton, dynamic batching) against in-process throughput, same backend, same run.

Why it exists: issue 12's targets compare Triton-served answers and throughput with bench's
in-process numbers for the same backend. This script, on loopback only:
- times the runner in process (harness.measure_latency) at batch 1 and at --max-batch;
- starts ``stn-deploy serve`` on 127.0.0.1 and load-tests it (HTTP, batch-1 requests) at a
  sweep of concurrencies, then overloads it (concurrency 256 against --max-queue);
- sends SIGTERM and checks the server stops with exit 0.
Run it with the [serve] extra's interpreter (nvidia-pytriton needs numpy<2):

    /work/venv-serve/bin/python benchmarks/triton_serving.py --model export/digits-u8.onnx
Writes benchmarks/results/triton_serving.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from stn_deploy.backends import create_runner
from stn_deploy.harness import measure_latency, system_info
from stn_deploy.serving.loadtest import LoadRequest, run_loadtest, to_markdown

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--port", type=int, default=18100)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args()

    with create_runner(args.backend, args.model) as runner:
        inproc = {b: measure_latency(runner, b, iterations=None, duration_s=args.duration).to_dict()
                  for b in (1, args.max_batch)}
    server = subprocess.Popen([sys.executable, "-m", "stn_deploy", "serve", str(args.model),
                               "--backend", args.backend, "--port", str(args.port),
                               "--max-batch", str(args.max_batch),
                               "--max-queue", str(args.max_queue)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if "serving" in line or not line and server.poll() is not None:
                break
        url = f"http://127.0.0.1:{args.port}"
        sweep = run_loadtest(LoadRequest(url=url, model=args.model, backend=args.backend,
                                         concurrency=(1, 8, 32), duration_s=args.duration,
                                         max_requests=5000))
        overload = run_loadtest(LoadRequest(url=url, model=args.model, backend=args.backend,
                                            concurrency=(256,), duration_s=args.duration,
                                            max_requests=5000, timeout_s=30))
        ready = run_loadtest(LoadRequest(url=url, model=args.model, backend=args.backend,
                                         concurrency=(1,), duration_s=1, max_requests=20))
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    best = max(sweep["results"], key=lambda r: r.get("throughput_ips") or 0)
    summary = {
        "date": datetime.date.today().isoformat(), "system": system_info(),
        "model": str(args.model), "backend": args.backend, "in_process": inproc,
        "served_sweep": sweep["results"], "overload": overload["results"],
        "ready_after_overload": ready["results"][0]["answered"] > 0,
        "sigterm_exit_code": exit_code,
        "best_served_over_in_process_pct": 100 * best["throughput_ips"]
        / inproc[args.max_batch]["throughput_ips"],
        "p99_c1_vs_in_process_p99_b1": [sweep["results"][0]["p99_ms"], inproc[1]["p99_ms"]],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "triton_serving.json").write_text(json.dumps(summary, indent=2, default=str))
    md = [f"# Triton serving (PyTriton, {args.backend}, CPU), {summary['date']}", "",
          f"In process: batch 1 p99 {inproc[1]['p99_ms']:.2f} ms; batch {args.max_batch} "
          f"{inproc[args.max_batch]['throughput_ips']:.0f} img/s.", "",
          "Served, batch-1 HTTP requests:", "", to_markdown(sweep),
          f"Overload (concurrency 256, max queue {args.max_queue}):", "", to_markdown(overload),
          f"Best served throughput: {summary['best_served_over_in_process_pct']:.0f}% of "
          f"in-process at batch {args.max_batch}. Ready after overload: "
          f"{summary['ready_after_overload']}. SIGTERM exit code: {exit_code}."]
    (RESULTS / "triton_serving.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
