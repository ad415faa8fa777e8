"""serve and loadtest: the parts that need no server, and a loopback round trip (slow, needs
the [serve] extra)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stn_deploy.errors import StnDeployError
from stn_deploy.serving.serve import check_ports, libpython_fix

HAS_PYTRITON = importlib.util.find_spec("pytriton") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_taken_port_is_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(StnDeployError, match=f"gRPC port {port} on 127.0.0.1 is not free"):
            check_ports("127.0.0.1", {"HTTP": _free_port(), "gRPC": port})


def test_serve_leaves_half_the_cpus_to_triton() -> None:
    from stn_deploy.serving.serve import default_threads

    cpus = len(os.sched_getaffinity(0))
    assert default_threads(1) == max(1, cpus // 2)
    assert default_threads(cpus) == 1  # never zero


def test_libpython_folder_goes_first_once() -> None:
    env = {"LD_LIBRARY_PATH": "/opt/x"}
    added = libpython_fix(env)
    if added is None:
        pytest.skip("this interpreter has no shared libpython")
    assert env["LD_LIBRARY_PATH"] == f"{added}{os.pathsep}/opt/x"
    libpython_fix(env)
    assert env["LD_LIBRARY_PATH"].count(added) == 1


@pytest.mark.skipif(importlib.util.find_spec("geventhttpclient") is None,
                    reason="tritonclient's HTTP client is not installed (the [serve] extra)")
def test_loadtest_without_a_server_is_one_line(digits_onnx: Path) -> None:
    from stn_deploy.serving.loadtest import LoadRequest, run_loadtest

    port = _free_port()
    with pytest.raises(StnDeployError, match=f"no Triton server answers at "
                                             f"http://127.0.0.1:{port}"):
        run_loadtest(LoadRequest(url=f"http://127.0.0.1:{port}", model=digits_onnx,
                                 samples=8, timeout_s=2))


NEEDS_PYTRITON = pytest.mark.skipif(not HAS_PYTRITON, reason="nvidia-pytriton is not installed "
                                    "(the [serve] extra, which needs numpy<2)")


def _serving(checkpoint: Path, tmp_path: Path, *options: str) -> tuple[Path, int,
                                                                      subprocess.Popen[str]]:
    """(the served u8 ONNX, its HTTP port, ``stn-deploy serve`` once it says it is serving).
    The server has its own process group, so a kill takes tritonserver with it, as a
    container kill would."""
    from stn_deploy.export.pipeline import ExportRequest, run_export

    model = tmp_path / "digits.onnx"
    run_export(ExportRequest(checkpoint=checkpoint, embed_preprocess=True, verify_samples=64,
                             out=model), echo=lambda _: None)
    port = _free_port()
    while any(socket.socket().connect_ex(("127.0.0.1", p)) == 0 for p in (port + 1, port + 2)):
        port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "stn_deploy", "serve", str(model),
                               "--port", str(port), *options], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert server.stdout is not None
    deadline = time.monotonic() + 120
    first = ""
    while time.monotonic() < deadline and "serving digits" not in first:
        first = server.stdout.readline()
        if not first and server.poll() is not None:
            pytest.fail("serve exited before it was ready")
    assert f"at http://127.0.0.1:{port}/v2/models/digits" in first
    return model, port, server


def _kill(server: subprocess.Popen[str]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.mark.slow
@NEEDS_PYTRITON
def test_serve_and_loadtest_round_trip_on_loopback(digits_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    from stn_deploy.serving.loadtest import LoadRequest, run_loadtest

    model, port, server = _serving(digits_checkpoint, tmp_path, "--max-batch", "16",
                                   "--max-queue", "8")
    try:
        for url in (f"http://127.0.0.1:{port}", f"grpc://127.0.0.1:{port + 1}"):
            report = run_loadtest(LoadRequest(url=url, model=model, concurrency=(1, 4),
                                              duration_s=1.5, max_requests=300, samples=100),
                                  echo=lambda _: None)
            for row in report["results"]:
                assert row["answered"] > 0 and row["errors"] == 0
                assert row["agreement_pct"] == 100.0
        # overload against a queue of 8: every request answered or rejected, none lost
        report = run_loadtest(LoadRequest(url=f"http://127.0.0.1:{port}", model=model,
                                          concurrency=(64,), duration_s=2, max_requests=400,
                                          samples=100), echo=lambda _: None)
        row = report["results"][0]
        assert row["lost"] == 0 and row["errors"] == 0
        assert row["answered"] + row["rejected"] == row["requests"] > 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert server.stdout is not None and "stopping" in server.stdout.read()
    finally:
        _kill(server)


@pytest.mark.slow
@NEEDS_PYTRITON
def test_loadtest_names_a_server_killed_mid_run(digits_checkpoint: Path,
                                                tmp_path: Path) -> None:
    model, port, server = _serving(digits_checkpoint, tmp_path)
    try:
        client = subprocess.Popen([sys.executable, "-m", "stn_deploy", "loadtest",
                                   f"http://127.0.0.1:{port}", "--model", str(model),
                                   "--concurrency", "4", "--duration", "60", "--samples", "64",
                                   "--timeout", "5"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = f"http://127.0.0.1:{port + 2}/metrics"
        deadline = time.monotonic() + 60  # the client loads its local reference first
        while time.monotonic() < deadline and client.poll() is None and not re.search(
                r'^nv_inference_request_success{[^}]*} [1-9]',
                urllib.request.urlopen(metrics, timeout=5).read().decode(), re.M):
            time.sleep(0.2)
        _kill(server)
        _, err = client.communicate(timeout=40)  # a hang fails here, well inside the 60 s
        assert client.returncode == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "stopped answering at concurrency 4" in lines[0], err
    finally:
        _kill(server)
