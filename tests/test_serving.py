"""serve and loadtest: the parts that need no server, and a loopback round trip (slow, needs
the [serve] extra)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
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


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PYTRITON, reason="nvidia-pytriton is not installed (the [serve] "
                                             "extra, which needs numpy<2)")
def test_serve_and_loadtest_round_trip_on_loopback(digits_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    from stn_deploy.export.pipeline import ExportRequest, run_export
    from stn_deploy.serving.loadtest import LoadRequest, run_loadtest

    model = tmp_path / "digits.onnx"
    run_export(ExportRequest(checkpoint=digits_checkpoint, embed_preprocess=True,
                             verify_samples=64, out=model), echo=lambda _: None)
    port = _free_port()
    while any(socket.socket().connect_ex(("127.0.0.1", p)) == 0 for p in (port + 1, port + 2)):
        port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "stn_deploy", "serve", str(model),
                               "--port", str(port), "--max-batch", "16",
                               "--max-queue", "8"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + 120
        first = ""
        while time.monotonic() < deadline and "serving digits" not in first:
            first = server.stdout.readline()
            assert first or server.poll() is None, "serve exited before it was ready"
        assert f"at http://127.0.0.1:{port}/v2/models/digits" in first
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
        assert row["answered"] + row["rejected"] + row["errors"] == row["requests"]
        assert row["errors"] == 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert "stopping" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
