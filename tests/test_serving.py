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
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from stn_deploy.errors import StnDeployError
from stn_deploy.serving import loadtest
from stn_deploy.serving.loadtest import LoadRequest, classify
from stn_deploy.serving.serve import check_ports, libpython_fix

HAS_PYTRITON = importlib.util.find_spec("pytriton") is not None
HAS_HTTP_CLIENT = importlib.util.find_spec("geventhttpclient") is not None


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


def test_an_ipv6_loopback_port_is_checked_as_ipv6() -> None:
    with socket.socket(socket.AF_INET6) as s:
        try:
            s.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(StnDeployError, match=f"HTTP port {port} on ::1 is not free"):
            check_ports("::1", {"HTTP": port})
    check_ports("::1", {"HTTP": port})  # closed: free again


def test_a_port_in_time_wait_is_free() -> None:
    """tritonserver binds with SO_REUSEADDR, so a port whose last connection waits in
    TIME_WAIT (a server restarted at once) is free to it: the check must agree."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver's do
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server's end closes first: it is the one left in TIME_WAIT
        assert client.recv(1) == b""
        client.close()
    time.sleep(0.1)
    check_ports("127.0.0.1", {"HTTP": port})


def test_a_host_that_does_not_resolve_is_one_line() -> None:
    with pytest.raises(StnDeployError, match="--host no.such.host.invalid is not an address"):
        check_ports("no.such.host.invalid", {"HTTP": 8000})


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


class _Error(Exception):
    """What tritonclient raises for an answer: InferenceServerException's str."""


@pytest.mark.parametrize("error,expected", [
    (TimeoutError("timed out"), "lost"),  # geventhttpclient at network_timeout
    (_Error("[StatusCode.DEADLINE_EXCEEDED] Deadline Exceeded"), "lost"),  # gRPC client_timeout
    (ConnectionRefusedError(111, "Connection refused"), "down"),
    (ConnectionResetError(104, "Connection reset by peer"), "down"),
    (_Error("[StatusCode.UNAVAILABLE] failed to connect to all addresses"), "down"),
    (_Error("[StatusCode.UNAVAILABLE] Exceeds maximum queue size"), "rejected"),
    (_Error("Request for unknown model: 'x' is not found"), "error"),
    (OSError(24, "Too many open files"), "error"),
])
def test_failed_requests_are_classified(error: BaseException, expected: str) -> None:
    assert classify(error) == expected


@pytest.mark.skipif(not HAS_HTTP_CLIENT, reason="tritonclient's HTTP client is not installed")
def test_a_timed_out_http_request_is_lost_not_a_dead_server() -> None:
    """A server that accepts connections but answers slower than --timeout: each request
    counts as lost, and the run goes on (it used to end as "stopped answering")."""
    import tritonclient.http as http

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the connections; nothing ever answers
        req = LoadRequest(url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                          model=Path("m.onnx"), duration_s=0.2, timeout_s=0.5, max_requests=2)
        level = loadtest._run_level(http, "http", req, 2, np.zeros((4, 2), np.uint8),
                                    "input", "UINT8", "m")
    assert not level.down and level.sent == 2 and level.first_error == "timed out"
    assert level.errors == level.rejected == len(level.latencies_ns) == 0  # all 2 lost


def test_hung_requests_end_a_level_at_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads still stuck in a request are waited for once, not one allowance each."""
    release = threading.Event()

    class Hung:
        def infer(self, *args: Any, **kwargs: Any) -> None:
            release.wait()
            raise TimeoutError("timed out")

        def close(self) -> None:
            pass

    class Input:
        def __init__(self, *args: Any) -> None:
            pass

        def set_data_from_numpy(self, x: np.ndarray) -> None:
            pass

    mod = SimpleNamespace(InferInput=Input)
    monkeypatch.setattr(loadtest, "_client", lambda *args: (mod, Hung(), "http"))
    monkeypatch.setattr(loadtest, "JOIN_GRACE_S", 0.3)
    req = LoadRequest(url="http://127.0.0.1:1", model=Path("m.onnx"), duration_s=0.1,
                      timeout_s=0.1)
    t0 = time.perf_counter()
    try:
        level = loadtest._run_level(mod, "http", req, 8, np.zeros((4, 2), np.uint8), "input",
                                    "UINT8", "m")
    finally:
        release.set()
    assert time.perf_counter() - t0 < 2.0  # one deadline: 0.5 s; one each: 8 x 0.5 s
    assert level.down and level.first_error == "requests hung past their timeout"


def _probe(outputs: list[str], seen: dict[str, Any]) -> Any:
    """A gRPC-like client for the readiness probe, serving a float32 NCHW digits model."""

    class Probe:
        def is_server_ready(self, **kwargs: Any) -> bool:
            seen["ready"] = kwargs
            return True

        def get_model_metadata(self, name: str, **kwargs: Any) -> Any:
            seen["metadata"] = kwargs
            return SimpleNamespace(
                inputs=[SimpleNamespace(name="input", datatype="FP32", shape=[-1, 1, 32, 32])],
                outputs=[SimpleNamespace(name=n) for n in outputs])

    return Probe()


def test_a_model_without_logits_is_one_line_and_grpc_probes_time_out(
        digits_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(loadtest, "_client",
                        lambda *args: (None, _probe(["scores"], seen), "grpc"))
    with pytest.raises(StnDeployError, match=r"digits at grpc://h:1 has no logits output "
                                             r"\(it has: scores\)"):
        loadtest.run_loadtest(LoadRequest(url="grpc://h:1", model=digits_onnx, samples=8),
                              echo=lambda _: None)
    assert seen == {"ready": {"client_timeout": 10.0}, "metadata": {"client_timeout": 10.0}}


def test_loadtest_passes_its_dataset_and_folder_on(digits_onnx: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import stn_deploy.bench

    asked = []

    def no_data(config: Any, dataset: str | None, data_dir: str | None,
                samples: int | None) -> tuple[None, str]:
        asked.append((dataset, data_dir, samples))
        return None, "none here"

    monkeypatch.setattr(stn_deploy.bench, "load_eval_data", no_data)
    with pytest.raises(StnDeployError, match="no test images for .*digits.onnx: none here"):
        loadtest.run_loadtest(LoadRequest(url="http://h:1", model=digits_onnx, samples=8,
                                          dataset="imagefolder", data_dir="/data/x"))
    assert asked == [("imagefolder", "/data/x", 8)]


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


def _ports_free_from(port: int) -> bool:
    return not any(socket.socket().connect_ex(("127.0.0.1", p)) == 0
                   for p in (port, port + 1, port + 2))


@pytest.mark.slow
@NEEDS_PYTRITON
def test_serve_refuses_a_static_batch_and_closes_its_runners(
        digits_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stn_deploy.backends
    from stn_deploy.export.pipeline import ExportRequest, run_export
    from stn_deploy.serving.serve import ServeOptions, serve

    static = tmp_path / "static.onnx"
    run_export(ExportRequest(checkpoint=digits_checkpoint, embed_preprocess=True, static_batch=4,
                             verify_samples=16, out=static), echo=lambda _: None)
    made: list[Any] = []
    create = stn_deploy.backends.create_runner

    def recorded(*args: Any, **kwargs: Any) -> Any:
        made.append(create(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(stn_deploy.backends, "create_runner", recorded)
    port = _free_port()
    while not _ports_free_from(port):
        port = _free_port()
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(StnDeployError, match=r"static.onnx has a static batch \(4\); Triton's "
                                             "dynamic batcher needs one exported without "
                                             "--static-batch"):
        serve(ServeOptions(model=static, port=port, instances=2), echo=lambda _: None)
    assert len(made) == 2 and not any(r.is_active for r in made)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers


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
