"""A real Triton server here: PyTriton's tritonserver, any stn-deploy runner behind it.

Triton's dynamic batcher forms the batches; the runner (onnxruntime, openvino, trt, torch)
runs them in this process. Needs the ``[serve]`` extra (nvidia-pytriton, which pins
numpy<2).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stn_deploy.errors import StnDeployError, error_line, require

INSTALL = "pip install 'stn-deploy[serve]' (nvidia-pytriton needs numpy<2)"


@dataclass
class ServeOptions:
    model: Path
    backend: str | None = None  # None: the model kind's first default backend
    name: str | None = None  # None: the file's stem
    host: str = "127.0.0.1"
    port: int = 8000  # HTTP; gRPC on port + 1, metrics on port + 2 unless given
    grpc_port: int | None = None
    metrics_port: int | None = None
    max_batch: int = 32
    queue_delay_us: int = 500
    max_queue: int = 0  # requests waiting before Triton rejects (0: unbounded)
    threads: int | None = None  # per instance
    instances: int = 1  # model instances, each with its own runner

    @property
    def ports(self) -> dict[str, int]:
        return {"HTTP": self.port, "gRPC": self.grpc_port or self.port + 1,
                "metrics": self.metrics_port or self.port + 2}


def check_ports(host: str, ports: dict[str, int]) -> None:
    """One line naming a taken port, before tritonserver starts and dies with a page of log.

    The host's own address family (``::1`` is IPv6), and SO_REUSEADDR as servers bind: a port
    whose last connection is in TIME_WAIT is free to listen on, only a listener takes it."""
    for what, port in ports.items():
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as e:
            raise StnDeployError(f"--host {host} is not an address here ({e.strerror or e})") \
                from None
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as e:
                raise StnDeployError(f"{what} port {port} on {host} is not free "
                                     f"({e.strerror or e}); pass another --port") from None


def libpython_fix(env: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """Put this interpreter's own libpython first on LD_LIBRARY_PATH for the server process.

    PyTriton's Python-backend stub links ``libpython3.X.so.1.0``; where the system has another
    build of the same minor version (pyenv over Debian's), the stub picks up the system one and
    the model fails to load (``'_thread.RLock' object has no attribute '_recursion_count'``).
    Returns the folder added, or None when this interpreter has no shared libpython."""
    libdir = Path(sys.base_prefix) / "lib"
    lib = libdir / f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    if not lib.is_file():
        return None
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if str(libdir) not in paths:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libdir), *paths])
    return str(libdir)


def default_threads(instances: int) -> int:
    """Runner threads per instance: half the CPUs over the instances, at least 1. Triton's
    front end, the Python hop and the clients need the other half (on 2 cores one runner
    thread served more than two in quick loadtest runs)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // 2 // instances)


def make_infer(runner: Any) -> Callable[..., dict[str, np.ndarray]]:
    """The function Triton calls with each batch the dynamic batcher formed."""
    from pytriton.decorators import batch

    input_name = runner.input_spec.name

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        out = runner.infer(np.ascontiguousarray(inputs[input_name]))
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}

    return infer


def serve(opts: ServeOptions, echo: Callable[[str], None] = print,
          stop: threading.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set), then shut tritonserver down."""
    from stn_deploy.artifacts import model_kind
    from stn_deploy.backends import DEFAULT_BACKENDS, create_runner
    from stn_deploy.serving.triton_repo import default_prefix

    require("pytriton", INSTALL, "nvidia-pytriton")
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
    from pytriton.model_config.common import TimeoutAction
    from pytriton.triton import Triton, TritonConfig

    if opts.host not in ("127.0.0.1", "localhost", "::1"):
        echo(f"warning: --host {opts.host} exposes the server beyond this machine")
    check_ports(opts.host, opts.ports)
    backend = opts.backend or DEFAULT_BACKENDS[model_kind(opts.model)][0]
    threads = opts.threads or default_threads(opts.instances)
    name = opts.name or default_prefix(opts.model)
    stop = stop or threading.Event()
    runners: list[Any] = []
    previous: dict[int, Any] = {}
    triton: Any = None
    # From the first runner on, one finally: whatever fails, handlers go back, runners close.
    try:
        runners += [create_runner(backend, opts.model, threads=threads)
                    for _ in range(opts.instances)]
        runner = runners[0]
        try:
            for r in runners:
                r.activate()
            spec = runner.input_spec
            if spec.static_batch is not None:  # as triton_repo.check_options refuses it
                raise StnDeployError(f"{opts.model.name} has a static batch ({spec.static_batch});"
                                     " Triton's dynamic batcher needs one exported without "
                                     "--static-batch")
            probe = np.zeros((1, *spec.shape[1:]), dtype=spec.dtype)
            outputs = runner.infer(probe)  # a bad model fails here, in one line, not in Triton
        except StnDeployError:
            raise
        except Exception as e:  # runtimes raise their own types
            raise StnDeployError(f"{opts.model} does not run on {backend}: {error_line(e)}") \
                from None
        added = libpython_fix()
        ports = opts.ports
        # tritonserver's log (a page at start, PyTriton's stub chatter at stop) goes to a file.
        log = Path(tempfile.mkdtemp(prefix="stn-serve-")) / "tritonserver.log"
        config = TritonConfig(http_address=opts.host, http_port=ports["HTTP"],
                              grpc_address=opts.host, grpc_port=ports["gRPC"],
                              metrics_address=opts.host, metrics_port=ports["metrics"],
                              log_verbose=0, log_file=log, exit_on_error=True)
        policy = (QueuePolicy(max_queue_size=opts.max_queue,
                              timeout_action=TimeoutAction.REJECT)
                  if opts.max_queue else None)
        batcher = DynamicBatcher(max_queue_delay_microseconds=opts.queue_delay_us,
                                 default_queue_policy=policy)
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, lambda *_: stop.set())
                        for s in (signal.SIGINT, signal.SIGTERM)}
        triton = Triton(config=config)
        triton.bind(
            model_name=name, infer_func=[make_infer(r) for r in runners],  # one per instance
            inputs=[Tensor(name=spec.name, dtype=np.dtype(spec.dtype), shape=spec.shape[1:])],
            outputs=[Tensor(name=k, dtype=np.float32, shape=tuple(v.shape[1:]))
                     for k, v in outputs.items()],
            config=ModelConfig(max_batch_size=opts.max_batch, batcher=batcher),
            strict=True)
        try:
            triton.run()
        except Exception as e:  # PyTriton raises its own types for a server that did not start
            raise StnDeployError(f"tritonserver did not start: {error_line(e)} (log: {log})"
                                 + ("" if added else "; if the log shows '_recursion_count', "
                                    "put this Python's libpython folder on LD_LIBRARY_PATH"))\
                from None
        host = f"[{opts.host}]" if ":" in opts.host else opts.host  # an IPv6 address in a URL
        url = f"http://{host}:{ports['HTTP']}"
        echo(f"serving {name} ({backend} on {runner.device_name}, {spec.dtype} "
             f"{spec.layout} input, max batch {opts.max_batch}, {opts.instances} "
             f"instance{'s' if opts.instances > 1 else ''} of {threads} thread"
             f"{'s' if threads > 1 else ''}) at {url}/v2/models/{name}")
        echo(f"gRPC {host}:{ports['gRPC']}; ready {url}/v2/health/ready; live "
             f"{url}/v2/health/live; metrics http://{host}:{ports['metrics']}/metrics; "
             f"server log {log}; Ctrl-C or SIGTERM stops")
        while not stop.wait(0.5):
            if not triton.is_alive():
                raise StnDeployError(f"tritonserver exited (log: {log})")
        echo("stopping")
    finally:
        if triton is not None:
            triton.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        for r in runners:
            if r.is_active:
                r.deactivate()
