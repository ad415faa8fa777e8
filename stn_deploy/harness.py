"""The one measurement harness: latency, throughput, accuracy/agreement, memory, machine facts.

Latency rules (the same for every backend):
- warm-up runs are excluded; then a fixed number of iterations, or as many as fit in a duration;
- the device is synchronised (``runner.synchronize()``) before every clock read;
- clock: ``time.perf_counter_ns``;
- end-to-end = host numpy input -> host numpy output, with a different input array each
  iteration (a pool of distinct host batches, built before timing);
- compute-only = the runtime's own buffers already hold the input and keep the output
  (``Runner.bind`` / ``infer_bound``), only for runners that can separate it;
- throughput (images/s) = batch size / mean latency of the same mode.

The timed loop is kept lean (local names, no per-iteration allocation beyond what the runtime
does) so that the harness adds next to nothing over a bare ``session.run`` loop.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from stn_deploy.backends.base import Runner, available_cpus, cpu_name
from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError
from stn_deploy.health import NO_STN, NotMeasured, assess, displacement_px

END_TO_END = "end_to_end"
COMPUTE_ONLY = "compute_only"
POOL_SIZE = 8  # distinct host inputs cycled through in the end-to-end loop
# Images a batch for accuracy and agreement, in bench and in export's verification alike:
# the same file on the same images gives the same logits in both.
EVAL_BATCH = 256


@dataclass
class LatencyStats:
    batch_size: int
    mode: str  # END_TO_END or COMPUTE_ONLY
    iterations: int
    warmup: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    throughput_ips: float  # batch_size / mean latency
    samples_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        return d


def summarize(samples_ns: list[int] | np.ndarray, batch_size: int, mode: str,
              warmup: int) -> LatencyStats:
    """Percentiles (numpy's linear interpolation) of the raw per-iteration times."""
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if ms.size == 0:
        raise StnDeployError("no timed iterations")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return LatencyStats(
        batch_size=batch_size, mode=mode, iterations=int(ms.size), warmup=warmup,
        p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=mean,
        min_ms=float(ms.min()), max_ms=float(ms.max()),
        throughput_ips=float(batch_size / (mean / 1e3)) if mean > 0 else float("inf"),
        samples_ms=ms.tolist(),
    )


def input_pool(runner: Runner, batch_size: int, sample: np.ndarray | None = None,
               pool: int = POOL_SIZE, seed: int = 0) -> list[np.ndarray]:
    """Distinct host batches in the runner's input format, from ``sample`` (uint8 NCHW real
    images) when given, else random pixels; built before any clock is read."""
    config = runner.config
    c, h, w = config.input_shape
    rng = np.random.default_rng(seed)
    out = []
    for i in range(pool):
        if sample is not None and len(sample):
            idx = (np.arange(batch_size) + i * batch_size) % len(sample)
            images = np.ascontiguousarray(sample[idx])
        else:
            images = rng.integers(0, 256, (batch_size, c, h, w), dtype=np.uint8)
        out.append(to_runner_input(runner, images))
    return out


def to_runner_input(runner: Runner, images_nchw_u8: np.ndarray) -> np.ndarray:
    """uint8 NCHW images -> what ``runner.infer`` takes (normalised float NCHW or uint8 NHWC)."""
    if runner.input_spec.layout == "NHWC":
        return np.ascontiguousarray(images_nchw_u8.transpose(0, 2, 3, 1))
    return normalize_np(images_nchw_u8, runner.config)


def normalize_np(images_nchw_u8: np.ndarray, config: ModelConfig) -> np.ndarray:
    # Same arithmetic as data.normalize: (x / 255 - mean) / std in float32.
    mean = np.asarray(config.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((images_nchw_u8.astype(np.float32) / np.float32(255.0) - mean)
                                / std, dtype=np.float32)


def measure_latency(runner: Runner, batch_size: int, *, iterations: int | None = 200,
                    duration_s: float | None = None, warmup: int = 20,
                    sample: np.ndarray | None = None, mode: str = END_TO_END) -> LatencyStats:
    """Time ``runner`` (already active) at one batch size; see the module docstring."""
    if (iterations is None) == (duration_s is None):
        raise StnDeployError("give exactly one of iterations and duration")
    if iterations is not None and iterations < 1:
        raise StnDeployError("iterations must be at least 1")
    if warmup < 0:
        raise StnDeployError("warmup cannot be negative")
    spec_batch = runner.input_spec.static_batch
    if spec_batch is not None and spec_batch != batch_size:
        raise StnDeployError(f"{runner.name}: model has a static batch of {spec_batch}, "
                             f"cannot time batch {batch_size}")
    clock, sync = time.perf_counter_ns, runner.synchronize
    if mode == END_TO_END:
        inputs = input_pool(runner, batch_size, sample)
        n_pool = len(inputs)
        infer = runner.infer
        for i in range(warmup):
            infer(inputs[i % n_pool])
        sync()
        samples: list[int] = []
        append = samples.append
        if iterations is not None:
            for i in range(iterations):
                x = inputs[i % n_pool]
                sync()
                t0 = clock()
                infer(x)
                sync()
                append(clock() - t0)
        else:
            end = clock() + int(duration_s * 1e9)  # type: ignore[operator]
            i = 0
            while True:
                x = inputs[i % n_pool]
                sync()
                t0 = clock()
                infer(x)
                sync()
                t1 = clock()
                append(t1 - t0)
                i += 1
                if t1 >= end:
                    break
    elif mode == COMPUTE_ONLY:
        runner.bind(input_pool(runner, batch_size, sample, pool=1)[0])
        run = runner.infer_bound
        for _ in range(warmup):
            run()
        sync()
        samples = []
        append = samples.append
        count = iterations if iterations is not None else None
        end = clock() + int((duration_s or 0) * 1e9)
        i = 0
        while True:
            sync()
            t0 = clock()
            run()
            sync()
            t1 = clock()
            append(t1 - t0)
            i += 1
            if (count is not None and i >= count) or (count is None and t1 >= end):
                break
    else:
        raise StnDeployError(f"unknown latency mode {mode!r}")
    return summarize(samples, batch_size, mode, warmup)


# ----------------------------------------------------------------------------- accuracy

def run_batched(runner: Runner, images_nchw_u8: np.ndarray, batch_size: int = EVAL_BATCH,
                progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """All outputs for a set of uint8 NCHW images, batched; pads the last batch for models
    with a static batch dimension (the padding rows are dropped)."""
    static = runner.input_spec.static_batch
    step = static or batch_size
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images_nchw_u8), step):
        chunk = images_nchw_u8[start:start + step]
        n = len(chunk)
        if static is not None and n < static:
            pad = np.repeat(chunk[-1:], static - n, axis=0)
            chunk = np.concatenate([chunk, pad])
        out = runner.infer(to_runner_input(runner, chunk))
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v)[:n])
        if progress is not None:
            progress(n)
    return {k: np.concatenate(v) for k, v in parts.items()}


@dataclass
class EvalResult:
    n: int
    accuracy_pct: float | None
    agreement_pct: float | None = None  # top-1 agreement with the reference
    max_abs_logit_diff: float | None = None
    mean_abs_theta_diff: float | None = None  # mean |theta - theta_ref| over all elements
    accuracy_drop_pct: float | None = None  # reference accuracy - this accuracy (points)
    # The largest shift, over the images, of the sampling points theta's difference from the
    # reference's makes (health.displacement_px, pixels): the figure export's verification
    # holds to its theta bound (0.1 px for INT8), so a bench row reads against the same bound.
    max_theta_shift_px: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_outputs(outputs: dict[str, np.ndarray], labels: np.ndarray | None,
                    reference: dict[str, np.ndarray] | None = None,
                    reference_accuracy_pct: float | None = None,
                    image_size: int | None = None) -> EvalResult:
    """Accuracy against ``labels``, and against ``reference``'s outputs: agreement, logit and
    theta differences (theta's in pixels too when ``image_size`` is given)."""
    logits = np.asarray(outputs["logits"], dtype=np.float64)
    pred = logits.argmax(axis=1)
    n = int(len(pred))
    acc = None
    if labels is not None and n:
        acc = float((pred == np.asarray(labels)).mean() * 100.0)
    res = EvalResult(n=n, accuracy_pct=acc)
    if reference is not None and n:
        ref_logits = np.asarray(reference["logits"], dtype=np.float64)
        if ref_logits.shape != logits.shape:
            raise StnDeployError(f"reference logits {ref_logits.shape} vs {logits.shape}")
        res.agreement_pct = float((ref_logits.argmax(axis=1) == pred).mean() * 100.0)
        res.max_abs_logit_diff = float(np.abs(ref_logits - logits).max())
        if "theta" in outputs and "theta" in reference:
            delta = (np.asarray(reference["theta"], dtype=np.float64)
                     - np.asarray(outputs["theta"], dtype=np.float64))
            res.mean_abs_theta_diff = float(np.abs(delta).mean())
            if image_size is not None:
                res.max_theta_shift_px = float(displacement_px(delta, image_size).max())
    if reference_accuracy_pct is not None and acc is not None:
        res.accuracy_drop_pct = float(reference_accuracy_pct - acc)
    return res


# ------------------------------------------------------------------------------ memory

def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class PeakMemory:
    """Peak resident memory while a backend runs, over the RSS before it was created.

    Linux only: resets the kernel's high-water mark (``/proc/self/clear_refs`` "5") and reads
    ``VmHWM``; ``peak_mb`` is None ("n/a") where that is not possible.
    """

    def __init__(self) -> None:
        self.before_kb = _status_kb("VmRSS")
        self.ok = False
        if self.before_kb is None:
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self.ok = True
        except OSError:
            self.ok = False

    def peak_mb(self) -> float | None:
        hwm = _status_kb("VmHWM")
        if not self.ok or hwm is None or self.before_kb is None:
            return None
        return max(0.0, (hwm - self.before_kb) / 1024.0)


# ------------------------------------------------------------------------------ machine

LIBRARIES = ("numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf",
             "tensorrt", "stn-deploy")
# The CPU extensions that decide which kernels the runtimes pick (OpenVINO's bf16 default and
# fast INT8 need AVX512_BF16/AMX and VNNI), by the names people know, with the /proc/cpuinfo
# flags that show each; a name is listed when any of its flags is there.
ISA_FLAGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("AVX2", ("avx2",)),
    ("AVX-512", ("avx512f",)),
    ("VNNI", ("avx512_vnni", "avx_vnni")),
    ("AVX512_BF16", ("avx512_bf16",)),
    ("AMX", ("amx_tile", "amx_bf16", "amx_int8")),
)


def library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (imports nothing)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


BUSY_WARN_PCT = 25.0  # others' CPU use before timing starts that makes latencies suspect


def cpu_busy_pct(window_s: float = 0.3) -> float | None:
    """Percent of all CPUs kept busy by other processes while this one sleeps ``window_s``.

    On a loaded machine the runtimes whose thread pools wait for every worker slow down many
    times over (beside a training run here, PyTorch eager at batch 1 went from ~1.5 ms to
    ~390 ms), so the figure goes in the report beside the numbers.
    None where /proc/stat is not there (not Linux).
    """

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = sum(fields[3:5])  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])  # busy, total (no guest double count)

    first = sample()
    time.sleep(window_s)
    second = sample()
    if first is None or second is None or second[1] <= first[1]:
        return None
    return 100.0 * (second[0] - first[0]) / (second[1] - first[1])


def busy_warning(busy_pct: float | None) -> str | None:
    """The line to print when the machine was busy before timing, else None."""
    if busy_pct is None or busy_pct < BUSY_WARN_PCT:
        return None
    return (f"warning: other processes kept {busy_pct:.0f}% of the CPUs busy before timing "
            "started; latencies will be inflated, some many times over. Bench on an idle "
            "machine or pass --threads below the CPU count.")


def cpu_flags() -> set[str]:
    """The first CPU's flags from /proc/cpuinfo (empty where there is none: not Linux x86)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa(flags: set[str] | None = None) -> list[str]:
    """The names of ``ISA_FLAGS`` this CPU has, in that order (``flags``: for tests)."""
    have = cpu_flags() if flags is None else flags
    return [name for name, wanted in ISA_FLAGS if have.intersection(wanted)]


def machine_text(system: dict[str, Any]) -> str:
    """One line for a report's reader: "CPU (N CPUs; AVX2, AVX-512), GPU name"."""
    isa = system.get("cpu_isa")
    return (f"{system.get('cpu')} ({system.get('cpus_available')} CPUs"
            + (f"; {', '.join(isa)}" if isa else "") + ")"
            + (f", GPU {system['gpu']}" if system.get("gpu") else ""))


def system_info() -> dict[str, Any]:
    from stn_deploy.backends.base import cuda_device_name

    return {
        "cpu": cpu_name(),
        "cpu_isa": cpu_isa(),
        "cpus_available": available_cpus(),
        "cpu_busy_pct_at_start": cpu_busy_pct(),
        "cpu_count": os.cpu_count(),
        "gpu": cuda_device_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
    }


# ------------------------------------------------------------------------------- one row

@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    iterations: int | None = 100
    duration_s: float | None = None
    warmup: int = 10
    threads: int | None = None
    compute_only: bool = True
    eval_batch: int = EVAL_BATCH

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        d["throughput_definition"] = "batch_size / mean latency"
        return d


@dataclass
class EvalData:
    images: np.ndarray  # uint8 NCHW
    labels: np.ndarray | None
    dataset: str
    split: str = "test"
    applied: np.ndarray | None = None  # per image, the distortion's sampling theta (N, 2, 3)


@dataclass
class Reference:
    model: str
    backend: str
    precision: str
    outputs: dict[str, np.ndarray]
    accuracy_pct: float | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "backend": self.backend, "precision": self.precision,
                "accuracy_pct": self.accuracy_pct, "note": self.note}


def stn_health(config: ModelConfig, outputs: dict[str, np.ndarray],
               applied: np.ndarray | None) -> dict[str, Any] | None:
    """The STN's health from this runner's own thetas (None: the graph has no theta output)."""
    if not config.use_stn:
        return NotMeasured(NO_STN).to_dict()
    theta = outputs.get("theta")
    if theta is None:
        return None
    return assess(theta, config.image_size, applied=applied).to_dict()


def bench_runner(runner: Runner, row: dict[str, Any], settings: BenchSettings,
                 data: EvalData | None, reference: Reference | None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fill ``row`` (see report.py's schema) for one not-yet-active runner: accuracy and
    agreement first, then latency per batch size and mode. Memory is watched from activation
    to release."""
    memory = PeakMemory()
    tick = progress or (lambda _s: None)
    row["library_version"] = runner.version
    row["device"] = runner.device_name
    row["precision"] = runner.precision
    with runner:
        row["runtime"] = runner.describe()
        row["input"] = runner.input_spec.to_dict()
        if data is not None and len(data.images):
            outputs = run_batched(runner, data.images, settings.eval_batch)
            row["eval"] = compare_outputs(
                outputs, data.labels, reference.outputs if reference else None,
                reference.accuracy_pct if reference else None,
                runner.config.image_size).to_dict()
            row["eval"]["stn_health"] = stn_health(runner.config, outputs, data.applied)
            tick("eval")
        sample = data.images if data is not None else None
        modes = [END_TO_END] + ([COMPUTE_ONLY] if settings.compute_only
                                and runner.supports_compute_only else [])
        static = runner.input_spec.static_batch
        for batch in settings.batch_sizes:
            if static is not None and batch != static:
                row.setdefault("notes", []).append(
                    f"batch {batch} skipped: the model's batch dimension is fixed at {static}")
                tick(f"b{batch}")
                continue
            for mode in modes:
                stats = measure_latency(runner, batch, iterations=settings.iterations,
                                        duration_s=settings.duration_s, warmup=settings.warmup,
                                        sample=sample, mode=mode)
                row["latency"].append(stats.to_dict())
            tick(f"b{batch}")
    row["peak_rss_mb"] = memory.peak_mb()
    return row
