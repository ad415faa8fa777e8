"""The one runner interface every backend implements (Polygraphy-style template methods).

Public ``activate/infer/deactivate`` check state and inputs; subclasses write only the
``*_impl`` methods. A runner is also a context manager, so buffers, sessions and streams are
released even when a benchmark fails half-way.

Inputs are host numpy arrays and outputs are host numpy arrays ("logits", and "theta" where the
model exposes it): that is the end-to-end path the harness times. Runners that can keep inputs
and outputs on the device set ``supports_compute_only`` and implement ``bind_impl`` (copy one
input into device-side buffers, untimed) and ``infer_bound_impl`` (run on those buffers and
leave the outputs there), which the harness times as compute-only latency.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError
from stn_deploy.names import DEFAULT_PRECISION

# ``device="auto"``: each runner says what it means (Runner.auto_device); the CLI's default.
AUTO_DEVICE = "auto"


@dataclass(frozen=True)
class InputSpec:
    """What ``infer`` accepts: batch dimension -1 when dynamic."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" (normalised) or "uint8" (preprocessing embedded in the graph)
    layout: str  # "NCHW" or "NHWC"

    @property
    def static_batch(self) -> int | None:
        return None if self.shape[0] < 0 else int(self.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "layout": self.layout}


def spec_for(config: ModelConfig, *, name: str = "input", embedded: bool = False,
             batch: int = -1) -> InputSpec:
    c, h, w = config.input_shape
    if embedded:
        return InputSpec(name, (batch, h, w, c), "uint8", "NHWC")
    return InputSpec(name, (batch, c, h, w), "float32", "NCHW")


class Runner(abc.ABC):
    """Loads one model file, runs host batches through one runtime, releases it."""

    name: ClassVar[str] = "base"
    supports_compute_only: ClassVar[bool] = False
    # Options beyond threads/precision this runner understands ("device" among them);
    # create_runner hands a runner only these, so a caller can pass one option set to every
    # backend.
    OPTIONS: ClassVar[tuple[str, ...]] = ()
    COMMON_OPTIONS: ClassVar[tuple[str, ...]] = ("threads", "precision")

    @classmethod
    def probe(cls) -> str | None:
        """None when this runner can run here, else one line saying why not (imports the
        runtime, never loads a model). The registry adds the GPU check."""
        return None

    @classmethod
    def auto_device(cls) -> str | None:
        """What ``device="auto"`` means here; None: the runner's own default. One option set
        (``--device auto``) then serves every runner of a run, each choosing its device."""
        return None

    def __init__(self, model_path: str | os.PathLike[str], *, device: str | None = None,
                 threads: int | None = None, precision: str | None = None,
                 **options: Any) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise StnDeployError(f"model file not found: {self.model_path}")
        if device == AUTO_DEVICE:
            device = self.auto_device()
        self.device = device
        # None means "all CPUs this process may use", resolved once here and reported as is.
        self.threads = threads if threads is not None else available_cpus()
        if self.threads < 1:
            raise StnDeployError(f"threads must be positive, got {self.threads}")
        self.precision = precision or DEFAULT_PRECISION
        unknown = sorted(set(options) - set(self.OPTIONS)) + (
            ["device"] if device is not None and "device" not in self.OPTIONS else [])
        if unknown:
            raise StnDeployError(f"{self.name} takes no option {', '.join(unknown)}")
        self.options = options
        self.is_active = False
        self.config: ModelConfig = self.load_config()
        self.input_spec: InputSpec = spec_for(self.config)
        self.output_names: tuple[str, ...] = ("logits",)

    # -- facts a subclass provides ---------------------------------------------------------
    @abc.abstractmethod
    def load_config(self) -> ModelConfig:
        """The ModelConfig stored with the model (checkpoint, ONNX metadata, plan sidecar)."""

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """Version of the runtime library."""

    @property
    def device_name(self) -> str:
        return cpu_name()

    # -- template methods ------------------------------------------------------------------
    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, x: np.ndarray) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def deactivate_impl(self) -> None: ...

    def bind_impl(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def infer_bound_impl(self) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work; a no-op for synchronous CPU runtimes."""

    def describe(self) -> dict[str, Any]:
        """Runtime settings worth reporting beside the numbers (threads, hints, providers)."""
        return {"threads": self.threads}

    # -- public API --------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if self.is_active:
            raise StnDeployError(f"{self.name} runner is already active")
        self.activate_impl()
        self.is_active = True
        return self

    def deactivate(self) -> None:
        if not self.is_active:
            raise StnDeployError(f"{self.name} runner is not active")
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def check_input(self, x: np.ndarray) -> None:
        spec = self.input_spec
        if not isinstance(x, np.ndarray) or x.dtype != spec.dtype or x.ndim != len(spec.shape):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
            raise StnDeployError(f"{self.name}: input must be {spec.dtype} {spec.layout} "
                                 f"{tuple(spec.shape)}, got {got}")
        if tuple(x.shape[1:]) != tuple(spec.shape[1:]) or (
                spec.shape[0] >= 0 and x.shape[0] != spec.shape[0]):
            raise StnDeployError(f"{self.name}: input shape {tuple(x.shape)} does not fit "
                                 f"{tuple(spec.shape)} (-1: any batch size)")

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Host array in, host arrays out: {"logits": (N, classes)[, "theta": (N, 2, 3)]}."""
        if not self.is_active:
            raise StnDeployError(f"{self.name} runner must be activated before infer()")
        self.check_input(x)
        return self.infer_impl(x)

    def bind(self, x: np.ndarray) -> None:
        """Place ``x`` in the runtime's own buffers for compute-only timing (not timed)."""
        if not self.supports_compute_only:
            raise StnDeployError(f"{self.name} cannot separate compute from transfers")
        if not self.is_active:
            raise StnDeployError(f"{self.name} runner must be activated before bind()")
        self.check_input(x)
        self.bind_impl(x)

    def infer_bound(self) -> None:
        """Run on the bound input; outputs stay in the runtime's buffers."""
        self.infer_bound_impl()

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.is_active:
            self.deactivate()


# ------------------------------------------------------------------------------- machine facts

def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def cuda_device_name() -> str | None:
    """The first CUDA device's name, or None when torch sees no GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name(0))
