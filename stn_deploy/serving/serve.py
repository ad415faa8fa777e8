"""``stn-deploy serve``: tritonserver itself on a Python-backend repository, one hop.

The ``[serve]`` extra's nvidia-pytriton wheel ships a ``tritonserver`` binary with Triton's
Python backend and its stubs. We write a ``python-<runtime>`` repository (see
:mod:`stn_deploy.serving.triton_repo`) and start that binary on it: Triton's stub process
runs our runner on each batch the dynamic batcher formed. PyTriton's own path (stub -> proxy
-> our process) is not used: it added a second hop per batch and halved throughput; its one
advantage, serving any runner object from Python, stn-deploy does not need (checkpoints are
exported first; plans are served by Triton's containers with ``triton-repo --kind trt``).

The server runs in its own process group (its stubs with it), which is what stop and a
failure kill, and it dies with us (PR_SET_PDEATHSIG) if we are killed outright.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stn_deploy.errors import StnDeployError
from stn_deploy.serving.serve_repo import ServeOptions, prepare_repository

INSTALL = "pip install 'stn-deploy[serve]' (its nvidia-pytriton wheel ships tritonserver)"

# Triton's dynamic batcher with a queue policy (max_queue_size) does not prefetch batches: it
# waits for a free instance on a condition variable whose wake-up, sent when an execution
# ends, comes before the instance waits for work again, and it then sleeps out its 0.5 s
# timeout with the next batch queued. Requests that all arrive while the instance is busy (a
# closed-loop client answered at once) meet it; without a bound the batcher hands batches
# over while the instance is still busy and never waits for it.
MAX_QUEUE_STALL = ("with --max-queue, Triton's dynamic batcher can leave queued requests "
                   "waiting 0.5 s when they all arrived while the model instance was busy "
                   "(closed-loop clients at concurrency 8 or more meet it every second or so); "
                   "leave --max-queue at 0 where latency matters")

READY_TIMEOUT_S = 120.0  # model load in the stub: runtime import + session creation
STOP_GRACE_S = 8.0  # SIGTERM, then SIGKILL to the group


@dataclass(frozen=True)
class ServerFiles:
    """What the wheel ships that a plain tritonserver run needs."""

    binary: Path
    backend_files: tuple[Path, ...]  # libtriton_python.so, its utils, the stub for this Python
    libs: Path  # the wheel's bundled shared libraries (libcudart and friends)


def server_files() -> ServerFiles:
    """tritonserver, the Python backend and this Python's stub from the nvidia-pytriton wheel;
    one line naming the extra if it is not installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise StnDeployError(f"tritonserver is not installed here: {INSTALL}")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = ServerFiles(
        binary=root / "bin" / "tritonserver",
        backend_files=(root / "backends" / "python" / "libtriton_python.so",
                       root / "backends" / "python" / "triton_python_backend_utils.py",
                       root / "python_backend_stubs" / version / "triton_python_backend_stub"),
        libs=root.parent.parent / "nvidia_pytriton.libs")
    missing = [p for p in (files.binary, *files.backend_files) if not p.is_file()]
    if missing:
        raise StnDeployError(f"the nvidia-pytriton wheel lacks {missing[0]} (a stub for Python "
                             f"{version}?): {INSTALL}")
    return files


def backend_directory(files: ServerFiles, folder: Path) -> Path:
    """``folder/python`` holding the Python backend and the stub, as --backend-directory
    wants it (the wheel keeps the stubs elsewhere, one per Python version)."""
    python = folder / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in files.backend_files:
        (python / f.name).symlink_to(f)
    return folder


def server_env(files: ServerFiles, env: dict[str, str] | None = None) -> dict[str, str]:
    """The stub links libpython3.X: this interpreter's own first (a system Python of the same
    minor version is another build, and the model then fails to load), then the wheel's
    libraries. The stub's Python, the base interpreter, imports stn-deploy and its runtimes
    from this installation's folders, named in PATH_ENV (the repository names none)."""
    from stn_deploy.serving.python_model import PATH_ENV, python_path

    env = dict(os.environ if env is None else env)
    libdir = str(Path(sys.base_prefix) / "lib")
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        dict.fromkeys([libdir, str(files.libs), *paths]))
    env[PATH_ENV] = os.pathsep.join(python_path())
    return env


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


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop_server and the signal handlers still stop the group


def start_server(files: ServerFiles, repo: Path, backends: Path, host: str,
                 ports: dict[str, int], log: Path) -> subprocess.Popen[bytes]:
    """tritonserver in its own process group (new session), its output in ``log``."""
    command = [str(files.binary), "--model-repository", str(repo),
               "--backend-directory", str(backends),
               "--http-address", host, "--http-port", str(ports["HTTP"]),
               "--grpc-address", host, "--grpc-port", str(ports["gRPC"]),
               "--metrics-address", host, "--metrics-port", str(ports["metrics"]),
               "--allow-metrics", "true", "--allow-gpu-metrics", "false",
               "--exit-on-error", "true", "--exit-timeout-secs", "5",
               "--strict-readiness", "true"]
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=server_env(files),
                                start_new_session=True, preexec_fn=_die_with_parent)


def stop_server(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the server's whole group (stubs included), SIGKILL what is left after
    ``grace_s``; returns once the group is gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and group_alive(proc.pid):
            proc.poll()  # reap the leader, else it lingers as a zombie in the group
            time.sleep(0.05)
        if not group_alive(proc.pid):
            break
    proc.poll()


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def log_error(log: Path) -> str:
    """The line of tritonserver's log that says why it stopped: the stub's own error for a
    model that failed to load, else the first error line."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "no log"
    errors = [line for line in text.splitlines() if re.match(r"E\d{4} ", line)]
    load = [e for e in errors if "failed to load" in e]
    line = (load or errors or [text.strip().splitlines()[-1] if text.strip() else "no output"])[0]
    message = re.sub(r"^E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ", "", line).strip().strip('"')
    return message.replace("\\n", " ").strip()


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path,
               timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll ``/v2/health/ready`` until the server and every model are ready; one line with
    tritonserver's own error if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StnDeployError(f"tritonserver exited: {log_error(log)} (log: {log})")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise StnDeployError(f"tritonserver was not ready after {timeout_s:.0f} s (log: {log})")


def exit_line(code: int, log: Path) -> str:
    """Why a running tritonserver stopped: a signal is named (its last log line is then only
    start-up chatter), else the log's error line."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"tritonserver was killed by {name} (log: {log})"
    return f"tritonserver exited ({code}): {log_error(log)} (log: {log})"


def serve(opts: ServeOptions, echo: Callable[[str], None] = print,
          stop: threading.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set), then stop tritonserver's group."""

    files = server_files()
    if opts.host not in ("127.0.0.1", "localhost", "::1"):
        echo(f"warning: --host {opts.host} exposes the server beyond this machine")
    if opts.max_queue:
        echo(f"warning: {MAX_QUEUE_STALL}")
    stop = stop or threading.Event()
    previous: dict[int, object] = {}
    proc: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="stn-serve-") as tmp:
        work = Path(tmp)
        try:
            repo, names = prepare_repository(opts, work / "repo", echo)
            check_ports(opts.host, opts.ports)  # just before the start, the repository first
            log = Path(tempfile.mkdtemp(prefix="stn-serve-log-")) / "tritonserver.log"
            if threading.current_thread() is threading.main_thread():
                previous = {s: signal.signal(s, lambda *_: stop.set())
                            for s in (signal.SIGINT, signal.SIGTERM)}
            proc = start_server(files, repo, backend_directory(files, work / "backends"),
                                opts.host, opts.ports, log)
            host = f"[{opts.host}]" if ":" in opts.host else opts.host
            url = f"http://{host}:{opts.ports['HTTP']}"
            wait_ready(proc, url, log)
            for name in names:
                echo(f"serving {name} at {url}/v2/models/{name}")
            echo(f"gRPC {host}:{opts.ports['gRPC']}; ready {url}/v2/health/ready; metrics "
                 f"http://{host}:{opts.ports['metrics']}/metrics; log {log}; tritonserver "
                 f"pid {proc.pid}; Ctrl-C or SIGTERM stops")
            while not stop.wait(0.25):
                if proc.poll() is not None:
                    raise StnDeployError(exit_line(proc.returncode, log))
            echo("stopping")
        finally:
            if proc is not None:
                stop_server(proc)
            for s, handler in previous.items():
                signal.signal(s, handler)  # type: ignore[arg-type]
