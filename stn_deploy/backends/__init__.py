"""Backend registry: name -> runner class, the model kinds it runs, whether it needs a GPU.

Nothing heavy is imported here; ``available_backends()`` asks each runner class to probe its
runtime and reports the reason when one cannot run (package missing, provider missing, no GPU).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from stn_deploy.errors import StnDeployError


@dataclass(frozen=True)
class BackendInfo:
    module: str
    cls: str
    kinds: tuple[str, ...]  # model kinds it runs: "checkpoint", "onnx", "plan"
    needs_gpu: bool = False


BACKENDS: dict[str, BackendInfo] = {
    "torch": BackendInfo("stn_deploy.backends.pyt", "TorchRunner", ("checkpoint",)),
    "torch-compile": BackendInfo("stn_deploy.backends.pyt", "TorchCompileRunner",
                                 ("checkpoint",)),
    "onnxruntime": BackendInfo("stn_deploy.backends.onnxrt", "OnnxRuntimeRunner", ("onnx",)),
    "onnxruntime-cuda": BackendInfo("stn_deploy.backends.onnxrt", "OnnxRuntimeCudaRunner",
                                    ("onnx",), needs_gpu=True),
    "onnxruntime-trt": BackendInfo("stn_deploy.backends.onnxrt", "OnnxRuntimeTensorRTRunner",
                                   ("onnx",), needs_gpu=True),
    "openvino": BackendInfo("stn_deploy.backends.ov", "OpenVinoRunner", ("onnx", "openvino")),
    "trt": BackendInfo("stn_deploy.backends.trt", "TensorRTRunner", ("plan",), needs_gpu=True),
}

# What a model runs on when --backend is not given.
DEFAULT_BACKENDS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("torch",),
    "onnx": ("onnxruntime", "openvino"),
    "openvino": ("openvino",),
    "plan": ("trt",),
}


def _gpu_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "no CUDA check possible: torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def unavailable_reason(name: str) -> str | None:
    """None when ``name`` can run here, else one line saying why not (the GPU check here, the
    rest by the runner's own ``probe``)."""
    if name not in BACKENDS:
        return f"unknown backend {name!r} (known: {', '.join(BACKENDS)})"
    if BACKENDS[name].needs_gpu:
        reason = _gpu_reason()
        if reason:
            return f"{reason} ({name} needs one)"
    return _runner_module_class(name).probe()


def _runner_module_class(name: str) -> type[Any]:
    """The runner class; its module imports no runtime at the top, so this is cheap."""
    info = BACKENDS[name]
    return getattr(importlib.import_module(info.module), info.cls)


def available_backends() -> dict[str, str | None]:
    """Every registered backend -> None if it can run here, else the reason it cannot."""
    return {name: unavailable_reason(name) for name in BACKENDS}


def runner_class(name: str) -> type[Any]:
    reason = unavailable_reason(name)
    if reason is not None:
        raise StnDeployError(f"backend {name}: {reason}")
    return _runner_module_class(name)


def create_runner(name: str, model_path: str | os.PathLike[str], **opts: Any) -> Any:
    """A (not yet activated) runner. ``opts`` may hold options for any backend (device,
    threads, precision, hint, memory_format, checkpoint, ...): the runner gets those it
    declares that are not None, so one option set serves every backend of a run."""
    from stn_deploy.artifacts import model_kind

    kind = model_kind(model_path)
    if name in BACKENDS and kind not in BACKENDS[name].kinds:
        raise StnDeployError(f"backend {name} cannot run {kind} files ({model_path}); it runs "
                             f"{' or '.join(BACKENDS[name].kinds)} files")
    cls = runner_class(name)
    known = (*cls.COMMON_OPTIONS, *cls.OPTIONS)
    return cls(model_path, **{k: v for k, v in opts.items() if k in known and v is not None})


__all__ = ["BACKENDS", "DEFAULT_BACKENDS", "BackendInfo", "available_backends",
           "create_runner", "runner_class", "unavailable_reason"]
