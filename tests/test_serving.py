"""serve and loadtest: the parts that need no server, and a loopback round trip (slow, needs
the [serve] extra)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from stn_deploy.errors import StnDeployError
from stn_deploy.serving import loadtest
from stn_deploy.serving.loadtest import LoadRequest, classify
from stn_deploy.serving.serve import check_ports
from stn_deploy.serving.wire import (BinaryWire, GrpcWire, HttpConnection, JsonWire, Served,
                                     ServerError)

HAS_PYTRITON = importlib.util.find_spec("pytriton") is not None
HAS_HTTP_CLIENT = importlib.util.find_spec("geventhttpclient") is not None
HAS_GRPC = importlib.util.find_spec("grpc") is not None
# gRPC where tritonclient's gRPC client (grpcio) is installed
PROTOCOLS = ("json", "binary", *(("grpc",) if HAS_GRPC else ()))


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
    from stn_deploy.serving.python_model import default_threads

    cpus = len(os.sched_getaffinity(0))
    assert default_threads(1) == max(1, cpus // 2)
    assert default_threads(cpus) == 1  # never zero


def test_the_stub_library_path_puts_this_libpython_first() -> None:
    from stn_deploy.serving.serve import ServerFiles, server_env

    files = ServerFiles(Path("/x/tritonserver"), (), Path("/wheel/libs"))
    env = server_env(files, {"LD_LIBRARY_PATH": "/opt/x"})
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [
        str(Path(sys.base_prefix) / "lib"), "/wheel/libs", "/opt/x"]


def test_a_batch_is_cut_back_into_its_requests() -> None:
    from stn_deploy.serving.python_model import split_batch

    out = {"logits": np.arange(12, dtype=np.float32).reshape(6, 2), "theta": np.zeros((6, 1))}
    parts = split_batch(out, ["logits"], [1, 3, 2])
    assert [p["logits"].tolist() for p in parts] == [[[0, 1]], [[2, 3], [4, 5], [6, 7]],
                                                     [[8, 9], [10, 11]]]
    assert all(list(p) == ["logits"] for p in parts)


def test_the_serve_extra_missing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from stn_deploy.serving import serve as serve_mod

    find = importlib.util.find_spec
    monkeypatch.setattr(serve_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytriton" else find(name, *a))
    with pytest.raises(StnDeployError, match=r"tritonserver is not installed here: pip "
                                             r"install 'stn-deploy\[serve\]'"):
        serve_mod.server_files()


def test_the_stub_error_is_read_from_the_log(tmp_path: Path) -> None:
    from stn_deploy.serving.serve import log_error

    log = tmp_path / "log"
    log.write_text('I1204 23:30:41.36 1 server.cc:1] "started"\n'
                   'E1204 23:30:42.10 27 model_lifecycle.cc:654] "failed to load \'m\' '
                   'version 1: Internal: StnDeployError: unknown backend \'x\'"\n'
                   'E1204 23:30:42.20 27 server.cc:1] "failed to load all models"\n')
    assert log_error(log) == ("failed to load 'm' version 1: Internal: StnDeployError: "
                              "unknown backend 'x'")


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


def _served(url: str, inputs: np.ndarray, batch: int = 1, timeout_s: float = 10.0) -> Served:
    return Served(url=url, model_name="m", input_name="input", input_datatype="UINT8",
                  logits_datatype="FP32", inputs=inputs, batch=batch, timeout_s=timeout_s)


def test_a_timed_out_http_request_is_lost_not_a_dead_server() -> None:
    """A server that accepts connections but answers slower than --timeout: each request
    counts as lost, and the run goes on (it used to end as "stopped answering")."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the connections; nothing ever answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        req = LoadRequest(url=url, model=Path("m.onnx"), duration_s=0.2, timeout_s=0.5,
                          max_requests=2)
        wire = BinaryWire(_served(url, np.zeros((4, 2), np.uint8), timeout_s=0.5))
        level = loadtest._run_level(wire, req, 2)
    assert not level.down and level.sent == 2 and level.first_error == "timed out"
    assert level.errors == level.rejected == len(level.latencies_ns) == 0  # all 2 lost


def test_hung_requests_end_a_level_at_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads still stuck in a request are waited for once, not one allowance each."""
    release = threading.Event()

    class Hung:
        def infer(self, request: bytes) -> tuple[dict[str, str], bytes]:
            release.wait()
            raise TimeoutError("timed out")

        def close(self) -> None:
            pass

    wire = JsonWire(_served("http://127.0.0.1:1", np.zeros((4, 2), np.uint8)))
    monkeypatch.setattr(wire, "connect", Hung)
    monkeypatch.setattr(loadtest, "JOIN_GRACE_S", 0.3)
    req = LoadRequest(url="http://127.0.0.1:1", model=Path("m.onnx"), duration_s=0.1,
                      timeout_s=0.1)
    t0 = time.perf_counter()
    try:
        level = loadtest._run_level(wire, req, 8)
    finally:
        release.set()
    assert time.perf_counter() - t0 < 2.0  # one deadline: 0.5 s; one each: 8 x 0.5 s
    assert level.down and level.first_error == "requests hung past their timeout"


@pytest.mark.skipif(not HAS_HTTP_CLIENT, reason="tritonclient's HTTP client is not installed")
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_requests_are_what_tritonclient_sends(dtype: str) -> None:
    """Each image is encoded once, yet every request (two images, wrapping round the end of
    the set) carries the body tritonclient would build for those images."""
    import tritonclient.http as http

    rng = np.random.default_rng(0)
    images = (rng.integers(0, 256, (3, 2, 4)) if dtype == "uint8"
              else rng.normal(size=(3, 2, 4))).astype(dtype)
    datatype = {"uint8": "UINT8", "float32": "FP32"}[dtype]
    served = Served(url="http://h:8000", model_name="m", input_name="input",
                    input_datatype=datatype, logits_datatype="FP32", inputs=images, batch=2,
                    timeout_s=1.0)
    pair = images[[2, 0]]
    for wire, binary in ((JsonWire(served), False), (BinaryWire(served), True)):
        x = http.InferInput("input", [2, 2, 4], datatype)
        x.set_data_from_numpy(pair, binary_data=binary)
        body, json_size = http.InferenceServerClient.generate_request_body(
            [x], outputs=[http.InferRequestedOutput("logits", binary_data=binary)])
        head, _, ours = wire.request(2).partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: h:8000\r\n")
        assert f"Content-Length: {len(ours)}".encode() in head
        if binary:
            assert ours[json_size:] == body[json_size:] == pair.tobytes()
            assert json.loads(ours[:json_size]) == json.loads(body[:json_size])
            assert f"Inference-Header-Content-Length: {json_size}".encode() in head
        else:
            assert json.loads(ours) == json.loads(body)  # the same numbers, read back exactly


def test_answers_are_read_to_their_top1() -> None:
    logits = np.array([[0.1, 0.9, 0.0], [2.0, -1.0, 1.0]], np.float32)
    served = _served("http://h:1", np.zeros((4, 2), np.uint8), batch=2)
    header = json.dumps({"outputs": [{"name": "logits", "datatype": "FP32", "shape": [2, 3],
                                      "parameters": {"binary_data_size": 24}}]}).encode()
    binary = BinaryWire(served).top1({"inference-header-content-length": str(len(header))},
                                     header + logits.tobytes())
    text = json.dumps({"outputs": [{"name": "theta", "data": [0] * 12},
                                   {"name": "logits", "data": logits.ravel().tolist()}]})
    assert binary.tolist() == JsonWire(served).top1({}, text.encode()).tolist() == [1, 0]
    with pytest.raises(ServerError, match="carries no logits"):
        JsonWire(served).top1({}, b'{"outputs": [{"name": "theta", "data": [0]}]}')


@pytest.mark.skipif(not HAS_GRPC, reason="tritonclient's gRPC client (grpcio) is not installed")
def test_grpc_requests_and_answers_are_tritonclients_messages() -> None:
    from tritonclient.grpc import service_pb2 as pb

    images = np.arange(24, dtype=np.uint8).reshape(3, 2, 4)
    wire = GrpcWire(Served(url="grpc://h:8001", model_name="m", input_name="input",
                           input_datatype="UINT8", logits_datatype="FP32", inputs=images,
                           batch=2, timeout_s=1.0))
    sent = pb.ModelInferRequest.FromString(wire.request(2))
    assert sent.model_name == "m" and [o.name for o in sent.outputs] == ["logits"]
    assert sent.inputs[0].name == "input" and list(sent.inputs[0].shape) == [2, 2, 4]
    assert list(sent.raw_input_contents) == [images[[2, 0]].tobytes()]
    logits = np.array([[0.0, 1.0], [3.0, 2.0]], np.float32)
    answer = pb.ModelInferResponse(outputs=[pb.ModelInferResponse.InferOutputTensor(
        name="logits", datatype="FP32", shape=[2, 2])], raw_output_contents=[logits.tobytes()])
    assert wire.top1({}, answer.SerializeToString()).tolist() == [1, 0]


class _OneShotServer:
    """A loopback HTTP server that answers each connection's first request with ``answer``
    and then closes it, as a server closing an idle keep-alive connection does."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(self.answer)

    def stop(self) -> None:
        """No more connections (shutdown wakes the thread blocked in accept)."""
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def test_a_keep_alive_connection_closed_while_idle_is_opened_again() -> None:
    body = b'{"outputs":[{"name":"logits","data":[0.0,1.0]}]}'
    server = _OneShotServer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body)
    conn = HttpConnection(server.url, 2.0)
    try:
        for _ in range(3):  # each on a new connection: the server closed the last one
            headers, answer = conn.infer(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            assert answer == body and headers["content-type"] == "application/json"
    finally:
        conn.close()
        server.stop()
    assert server.connections == 3


def test_an_error_answer_reads_as_tritonclients() -> None:
    body = b'{"error":"Exceeds maximum queue size"}'
    server = _OneShotServer(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n"
                            % len(body) + body)
    conn = HttpConnection(server.url, 2.0)
    try:
        with pytest.raises(ServerError) as e:
            conn.infer(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    finally:
        conn.close()
        server.stop()
    assert str(e.value) == "[503] Exceeds maximum queue size" and classify(e.value) == "rejected"
    with pytest.raises(ConnectionRefusedError):
        HttpConnection(server.url, 2.0).infer(b"x")  # nobody listens now: the server is down


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
                outputs=[SimpleNamespace(name=n, datatype="FP32") for n in outputs])

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


def _has_tritonserver() -> bool:
    from stn_deploy.serving.serve import server_files

    try:
        server_files()
    except StnDeployError:
        return False
    return True


NEEDS_SERVER = pytest.mark.skipif(
    not _has_tritonserver(), reason="the tritonserver binary is not installed (the [serve] "
    "extra's nvidia-pytriton wheel: pip install --no-deps nvidia-pytriton)")


@pytest.fixture(scope="module")
def served_onnx(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The verified uint8 NHWC export serve writes for a checkpoint."""
    from stn_deploy.export.pipeline import ExportRequest, run_export

    model = tmp_path_factory.mktemp("served") / "digits.onnx"
    run_export(ExportRequest(checkpoint=digits_checkpoint, embed_preprocess=True,
                             verify_samples=64, out=model), echo=lambda _: None)
    return model


def _free_ports() -> int:
    port = _free_port()
    while not _ports_free_from(port):
        port = _free_port()
    return port


def _ports_free_from(port: int) -> bool:
    return not any(socket.socket().connect_ex(("127.0.0.1", p)) == 0
                   for p in (port, port + 1, port + 2))


def _serving(model: Path, *options: str) -> tuple[int, int, subprocess.Popen[str], list[str]]:
    """(HTTP port, tritonserver's pid = its process group, ``stn-deploy serve`` once ready,
    the lines it printed until then)."""
    port = _free_ports()
    server = subprocess.Popen([sys.executable, "-m", "stn_deploy", "serve", str(model),
                               "--port", str(port), *options], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert server.stdout is not None
    lines = []
    while not lines or "tritonserver pid" not in lines[-1]:
        lines.append(server.stdout.readline())
        if not lines[-1] and server.poll() is not None:
            pytest.fail("serve exited before it was ready: " + "".join(lines))
    assert any(f"at http://127.0.0.1:{port}/v2/models/digits" in line for line in lines), lines
    pid = int(re.search(r"tritonserver pid (\d+)", lines[-1]).group(1))  # type: ignore[union-attr]
    return port, pid, server, lines


def _kill(server: subprocess.Popen[str]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _group_gone(pgid: int, within_s: float = 5.0) -> bool:
    from stn_deploy.serving.serve import group_alive

    deadline = time.monotonic() + within_s
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not group_alive(pgid)


def _infer(port: int, images: np.ndarray, binary: bool = True) -> np.ndarray:
    import tritonclient.http as http

    client = http.InferenceServerClient(f"127.0.0.1:{port}")
    x = http.InferInput("input", list(images.shape), "UINT8")
    x.set_data_from_numpy(images, binary_data=binary)
    out = http.InferRequestedOutput("logits", binary_data=binary)
    return np.asarray(client.infer("digits", [x], outputs=[out]).as_numpy("logits"))


@NEEDS_SERVER
def test_served_top1_equals_the_local_runner_and_sigterm_stops_the_group(
        served_onnx: Path) -> None:
    """One hop: tritonserver's Python-backend stub runs ONNX Runtime on the digits test
    images and answers the local runner's top-1 on every one; overload loses nothing; SIGTERM
    exits 0 within seconds and takes tritonserver's whole process group with it."""
    from stn_deploy.backends import create_runner
    from stn_deploy.bench import load_eval_data
    from stn_deploy.harness import to_runner_input
    from stn_deploy.serving.loadtest import LoadRequest, run_loadtest

    port, pgid, server, said = _serving(served_onnx, "--max-queue", "8", "--threads", "1")
    assert "warning: with --max-queue" in said[0]  # the batcher's stall with a queue bound
    try:
        with create_runner("onnxruntime", served_onnx) as runner:
            data, _ = load_eval_data(runner.config, None, None, 96)
            assert data is not None
            images = to_runner_input(runner, data.images)
            local = runner.infer(images)["logits"].argmax(axis=1)
        served = np.concatenate([_infer(port, images[i:i + 32], binary=i % 64 == 0)
                                 for i in range(0, len(images), 32)]).argmax(axis=1)
        assert len(served) == 96 and (served == local).all()
        # overload: far more in flight than the queue of 8 holds
        report = run_loadtest(LoadRequest(url=f"http://127.0.0.1:{port}", model=served_onnx,
                                          concurrency=(48,), duration_s=1.5, max_requests=300,
                                          samples=64), echo=lambda _: None)
        row = report["results"][0]
        assert row["lost"] == 0 and row["errors"] == 0
        assert row["answered"] + row["rejected"] == row["requests"] > 0
        # open loop over the three transports; the batcher's mean batch and the
        # served/in-process ratio come from the same run
        report = run_loadtest(LoadRequest(url=f"http://127.0.0.1:{port}", model=served_onnx,
                                          protocols=PROTOCOLS, rates=(100,),
                                          arrivals="poisson", duration_s=1.0, samples=64),
                              echo=lambda _: None)
        assert [r["protocol"] for r in report["results"]] == list(PROTOCOLS)
        for row in report["results"]:
            assert row["answered"] == row["requests"] > 50 and row["agreement_pct"] == 100.0
            assert row["mean_batch"] >= 1.0 and row["served_ratio"] > 0
            assert row["client_cpu_us"] > 0 and row["client_cpu_pct"] > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready") as r:
            assert r.status == 200
        t0 = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 10
        assert server.stdout is not None and "stopping" in server.stdout.read()
        assert _group_gone(pgid)
        # the stub's outputs leave by DLPack without numpy's capsule destructor writing
        # an error per output to the log
        log = Path(re.search(r"log (\S+);", said[-1]).group(1))  # type: ignore[union-attr]
        assert "PyCapsule" not in log.read_text()
    finally:
        _kill(server)


@NEEDS_SERVER
def test_a_repository_copied_elsewhere_serves(served_onnx: Path, tmp_path: Path) -> None:
    """A python-* repository names no folder of the installation that wrote it (serve tells
    the stub where stn-deploy is), so a copy in another folder, the original gone, serves
    the local runner's answers."""
    import shutil

    from stn_deploy.backends import create_runner
    from stn_deploy.bench import load_eval_data
    from stn_deploy.harness import to_runner_input
    from stn_deploy.serving.triton_repo import RepoOptions, write_repository

    write_repository(served_onnx, tmp_path / "written", RepoOptions(
        kinds=("python-onnxruntime",), name="digits", kind_suffix=False))
    copy = shutil.copytree(tmp_path / "written", tmp_path / "elsewhere" / "repo")
    shutil.rmtree(tmp_path / "written")
    with create_runner("onnxruntime", served_onnx) as runner:
        data, _ = load_eval_data(runner.config, None, None, 32)
        assert data is not None
        images = to_runner_input(runner, data.images)
        local = runner.infer(images)["logits"].argmax(axis=1)
    port, pgid, server, said = _serving(copy)
    assert not any("warning" in line for line in said)
    try:
        assert (_infer(port, images).argmax(axis=1) == local).all()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0 and _group_gone(pgid)
    finally:
        _kill(server)


@NEEDS_SERVER
def test_a_model_failing_in_the_stub_is_its_own_error_in_one_line(
        served_onnx: Path, tmp_path: Path) -> None:
    from stn_deploy.serving.triton_repo import RepoOptions, write_repository

    repo = tmp_path / "repo"
    write_repository(served_onnx, repo, RepoOptions(kinds=("python-onnxruntime",), name="m"))
    config = repo / "m-python-onnxruntime" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "onnxruntime"',
                                                 'string_value: "nosuch"'))
    port = _free_ports()
    result = subprocess.run([sys.executable, "-m", "stn_deploy", "serve", str(repo), "--port",
                             str(port)], capture_output=True, text=True, timeout=90)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: tritonserver exited: "), lines
    assert "unknown backend 'nosuch'" in lines[0]
    assert _ports_free_from(port)  # nothing left listening
    out = subprocess.run(["pgrep", "-f", f"--http-port {port}"], capture_output=True,
                         text=True)
    assert out.stdout == ""  # no orphan server


@NEEDS_SERVER
def test_a_repository_without_its_model_and_a_port_in_use_are_one_line(
        served_onnx: Path, tmp_path: Path) -> None:
    from stn_deploy.serving.triton_repo import RepoOptions, write_repository

    repo = tmp_path / "repo"
    write_repository(served_onnx, repo, RepoOptions(kinds=("python-onnxruntime",), name="m"))
    (repo / "m-python-onnxruntime" / "1" / "model.onnx").unlink()
    result = subprocess.run([sys.executable, "-m", "stn_deploy", "serve", str(repo), "--port",
                             str(_free_ports())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: {repo} is not a servable repository: m-python-onnxruntime/config.pbtxt: "
        'parameters "model_file": 1/model.onnx is missing']
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "stn_deploy", "serve", str(served_onnx),
                                 "--port", str(port)], capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: HTTP port {port} on 127.0.0.1 is not free (Address already in use); pass "
        "another --port"]


@NEEDS_SERVER
def _metrics_text(url: str) -> str:
    """Triton's metrics page, or "" while its listener is not up yet (it may open after the
    HTTP endpoint reports ready: a refused connection then is not the server failing)."""
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except (urllib.error.URLError, ConnectionError):
        return ""


def test_loadtest_names_a_server_killed_mid_run(served_onnx: Path) -> None:
    port, pgid, server, _ = _serving(served_onnx)
    try:
        client = subprocess.Popen([sys.executable, "-m", "stn_deploy", "loadtest",
                                   f"http://127.0.0.1:{port}", "--model", str(served_onnx),
                                   "--concurrency", "4", "--duration", "60", "--samples", "64",
                                   "--timeout", "5", "--max-requests", "1000000"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = f"http://127.0.0.1:{port + 2}/metrics"
        deadline = time.monotonic() + 60  # the client loads its local reference first
        while time.monotonic() < deadline and client.poll() is None and not re.search(
                r'^nv_inference_request_success{[^}]*} [1-9]', _metrics_text(metrics), re.M):
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)  # tritonserver crashes
        _, err = client.communicate(timeout=40)
        assert client.returncode == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "stopped answering at concurrency 4" in lines[0], err
        assert server.wait(timeout=10) == 1  # serve says so too, and exits
        assert _group_gone(pgid)
    finally:
        _kill(server)
