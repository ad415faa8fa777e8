"""Backend registry: name -> runner class, the model kinds it runs and what to install.

Nothing heavy is imported here; ``available_backends()`` tries each backend's imports and
reports the reason when one cannot run (package missing, provider missing, no GPU).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from stn_deploy.errors import MissingDependencyError, StnDeployError


@dataclass(frozen=True)
class BackendInfo:
    module: str
    cls: str
    kinds: tuple[str, ...]  # model kinds it runs: "checkpoint", "onnx", "plan"
    install: str
    needs_gpu: bool = False
    provider: str | None = None  # ONNX Runtime execution provider it needs


BACKENDS: dict[str, BackendInfo] = {
    "torch": BackendInfo("stn_deploy.backends.pyt", "TorchRunner", ("checkpoint",),
                         "pip install torch"),
    "torch-compile": BackendInfo("stn_deploy.backends.pyt", "TorchCompileRunner",
                                 ("checkpoint",), "pip install torch (and a C++ compiler)"),
    "onnxruntime": BackendInfo("stn_deploy.backends.onnxrt", "OnnxRuntimeRunner", ("onnx",),
                               "pip install onnxruntime", provider="CPUExecutionProvider"),
    "onnxruntime-cuda": BackendInfo("stn_deploy.backends.onnxrt", "OnnxRuntimeCudaRunner",
                                    ("onnx",), "pip install onnxruntime-gpu", needs_gpu=True,
                                    provider="CUDAExecutionProvider"),
    "onnxruntime-trt": BackendInfo("stn_deploy.backends.onnxrt", "OnnxRuntimeTensorRTRunner",
                                   ("onnx",), "pip install onnxruntime-gpu tensorrt",
                                   needs_gpu=True, provider="TensorrtExecutionProvider"),
    "openvino": BackendInfo("stn_deploy.backends.ov", "OpenVinoRunner", ("onnx",),
                            "pip install openvino"),
    "trt": BackendInfo("stn_deploy.backends.trt", "TensorRTRunner", ("plan",),
                       "pip install tensorrt", needs_gpu=True),
}

# What a model runs on when --backend is not given.
DEFAULT_BACKENDS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("torch",),
    "onnx": ("onnxruntime", "openvino"),
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
    """None when ``name`` can run here, else one line saying why not."""
    if name not in BACKENDS:
        return f"unknown backend {name!r} (known: {', '.join(BACKENDS)})"
    info = BACKENDS[name]
    if info.needs_gpu:
        reason = _gpu_reason()
        if reason:
            return f"{reason} ({name} needs one)"
    try:
        if name.startswith("onnxruntime"):
            from stn_deploy.backends.onnxrt import import_onnxruntime

            ort = import_onnxruntime()
            if info.provider not in ort.get_available_providers():
                return (f"{info.provider} is not in this onnxruntime build "
                        f"({ort.__version__}); {info.install}")
        elif name == "openvino":
            from stn_deploy.backends.ov import import_openvino

            import_openvino()
        elif name == "trt":
            from stn_deploy.export.tensorrt import import_tensorrt

            import_tensorrt()
        else:
            importlib.import_module("torch")
    except MissingDependencyError as e:
        return str(e)
    except ImportError as e:
        return f"{e}; install with: {info.install}"
    return None


def available_backends() -> dict[str, str | None]:
    """Every registered backend -> None if it can run here, else the reason it cannot."""
    return {name: unavailable_reason(name) for name in BACKENDS}


def runner_class(name: str) -> type[Any]:
    reason = unavailable_reason(name)
    if reason is not None:
        raise StnDeployError(f"backend {name}: {reason}")
    info = BACKENDS[name]
    return getattr(importlib.import_module(info.module), info.cls)


def create_runner(name: str, model_path: str | os.PathLike[str], **opts: Any) -> Any:
    """A (not yet activated) runner; options: device, threads, precision, hint (openvino)."""
    from stn_deploy.backends.base import model_kind

    kind = model_kind(model_path)
    if name in BACKENDS and kind not in BACKENDS[name].kinds:
        raise StnDeployError(f"backend {name} cannot run {kind} files ({model_path}); it runs "
                             f"{' or '.join(BACKENDS[name].kinds)} files")
    return runner_class(name)(model_path, **opts)


__all__ = ["BACKENDS", "DEFAULT_BACKENDS", "BackendInfo", "available_backends",
           "create_runner", "runner_class", "unavailable_reason"]
