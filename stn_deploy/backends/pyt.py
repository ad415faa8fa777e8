"""PyTorch runners: eager (the reference) and ``torch.compile``, on the CPU or a CUDA device."""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from stn_deploy.backends.base import Runner, cpu_name
from stn_deploy.config import ModelConfig
from stn_deploy.errors import MissingDependencyError, StnDeployError, error_line, require


MEMORY_FORMATS = ("channels_last", "contiguous")
TORCH_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


class TorchRunner(Runner):
    """Eager PyTorch on a checkpoint; always returns theta (``forward_with_theta``).

    Activations default to channels_last (NHWC): oneDNN's convolutions are about 1.5x faster
    in it on the CPU, so the PyTorch baseline is PyTorch at its plain best, not a straw man.
    ``memory_format="contiguous"`` gives the NCHW default of a freshly built model.
    ``checkpoint``: the already loaded Checkpoint of ``model_path`` (read once by the caller).

    FP32 on CUDA runs with TF32 off (cuDNN allows it by default): it is the reference other
    backends are held to, so it computes in true FP32, as the tolerances assume.
    """

    name = "torch"
    supports_compute_only = True
    OPTIONS = ("device", "memory_format", "checkpoint")

    @classmethod
    def probe(cls) -> str | None:
        try:
            require("torch", "pip install torch")
        except MissingDependencyError as e:
            return str(e)
        return None

    @classmethod
    def auto_device(cls) -> str:
        """``auto``: the current CUDA device when torch sees one, else the CPU (as train's)."""
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def __init__(self, model_path: str | os.PathLike[str], **opts: Any) -> None:
        import torch

        super().__init__(model_path, **opts)
        self.device = self.device or "cpu"  # None: the CPU, the library's plain default
        if not TORCH_DEVICE.fullmatch(self.device):
            raise StnDeployError(f"{self.name}: unknown device {self.device!r}; use auto, cpu "
                                 "or cuda[:N]")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise StnDeployError(f"{self.name} on {self.device}: no CUDA device is visible")
        if self.precision not in ("fp32", "fp16"):
            raise StnDeployError(f"{self.name} runs fp32 (or fp16 on CUDA), not {self.precision}")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise StnDeployError(f"{self.name} fp16 needs a CUDA device")
        self.memory_format = self.options.get("memory_format") or "channels_last"
        if self.memory_format not in MEMORY_FORMATS:
            raise StnDeployError(f"{self.name} memory_format must be one of "
                                 f"{', '.join(MEMORY_FORMATS)}, not {self.memory_format!r}")
        self.output_names = ("logits", "theta")
        self._model: Any = None
        self._bound: Any = None

    def load_config(self) -> ModelConfig:
        from stn_deploy.checkpoint import load_checkpoint

        self._checkpoint = self.options.get("checkpoint") or load_checkpoint(self.model_path)
        return self._checkpoint.config

    @property
    def version(self) -> str:
        import torch

        return str(torch.__version__)

    @property
    def device_name(self) -> str:
        import torch

        if self.device.startswith("cuda"):
            return str(torch.cuda.get_device_name(torch.device(self.device)))
        return cpu_name()

    def describe(self) -> dict[str, Any]:
        return {"threads": self.threads, "device": self.device,
                "memory_format": self.memory_format}

    def _forward(self, model: Any) -> Any:
        return model.forward_with_theta

    def activate_impl(self) -> None:
        import torch

        if not self.device.startswith("cuda"):
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        elif self.precision == "fp32":
            self._tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self._format = {"channels_last": torch.channels_last,
                        "contiguous": torch.contiguous_format}[self.memory_format]
        model = self._checkpoint.model().to(self.device, memory_format=self._format)
        if self.precision == "fp16":
            model = model.half()
        self._dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self._model = self._forward(model)
        self._torch = torch

    def _run(self, t: Any) -> Any:
        with self._torch.inference_mode():
            return self._model(t)

    def _tensor(self, x: np.ndarray) -> Any:
        t = self._torch.from_numpy(x).to(self.device, self._dtype)
        return t.contiguous(memory_format=self._format)

    def infer_impl(self, x: np.ndarray) -> dict[str, np.ndarray]:
        logits, theta = self._run(self._tensor(x))
        return {"logits": logits.float().cpu().numpy(), "theta": theta.float().cpu().numpy()}

    def bind_impl(self, x: np.ndarray) -> None:
        self._bound = self._tensor(x).clone(memory_format=self._format)

    def infer_bound_impl(self) -> None:
        self._outputs = self._run(self._bound)

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self._torch.cuda.synchronize(self.device)

    def deactivate_impl(self) -> None:
        self._model = self._bound = None
        self._outputs = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
        if getattr(self, "_tf32", None) is not None:  # process-wide switches: restore them
            backends = self._torch.backends
            backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = self._tf32
            self._tf32 = None
        if getattr(self, "_threads_before", None) is not None:
            self._torch.set_num_threads(self._threads_before)
            self._threads_before = None


class TorchCompileRunner(TorchRunner):
    """``torch.compile`` (inductor); compilation happens during the harness's warm-up runs."""

    name = "torch-compile"
    OPTIONS = ("device", "memory_format", "checkpoint", "compile_mode")

    def _forward(self, model: Any) -> Any:
        import torch

        try:
            return torch.compile(model.forward_with_theta,
                                 mode=self.options.get("compile_mode") or "default")
        except Exception as e:  # torch.compile raises many types (backend, platform)
            raise StnDeployError("torch.compile is not usable here: "
                                 f"{error_line(e, with_type=True)}") from None

    def _run(self, t: Any) -> Any:
        try:
            return super()._run(t)
        except StnDeployError:
            raise
        except Exception as e:  # compilation errors surface on the first call
            raise StnDeployError(f"torch.compile failed: {error_line(e, with_type=True)}") from None
