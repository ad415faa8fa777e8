"""The TensorRT installation and GPU a plan is built and run on: one module below both.

The exporter (``stn_deploy.export.tensorrt``, which builds plans) and the runner
(``stn_deploy.backends.trt``, which runs them) ask the same questions: is TensorRT installed
and for the CUDA torch uses, is its major one we build with, which GPU is this, and was this
plan built by this TensorRT for this GPU. Answering them here keeps the runner free of the
exporter, so imports run one way (runners never import exporters).

Everything here except ``import_tensorrt``'s import itself is plain Python and tested without
TensorRT; the TensorRT calls elsewhere are written against NVIDIA's documented Python API and
have NOT run on this project's machines (no GPU, no TensorRT wheel).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from stn_deploy.artifacts import read_sidecar
from stn_deploy.errors import StnDeployError, require

INSTALL = ("pip install 'stn-deploy[trt]' ('stn-deploy[trt-cu12]' with a CUDA 12 torch) on a "
           "machine with an NVIDIA GPU and driver")
SUPPORTED_MAJORS = (10, 11)


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or one line naming the extra to install; also refuses a
    TensorRT built for another CUDA major than torch's (see ``check_cuda_major``)."""
    trt = require("tensorrt", INSTALL)
    import torch

    check_cuda_major(installed_trt_cuda_majors(), torch.version.cuda)
    return trt


def installed_trt_cuda_majors() -> set[str]:
    """CUDA majors of the installed TensorRT wheels: NVIDIA names them tensorrt-cu12-* and
    tensorrt-cu13-* (the bare ``tensorrt`` package pulls the cu13 ones)."""
    import importlib.metadata as md

    majors = set()
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("tensorrt-cu"):
            majors.add(name.removeprefix("tensorrt-cu").split("-")[0])
    return majors


def check_cuda_major(trt_majors: set[str], torch_cuda: str | None) -> None:
    """TensorRT and torch (whose CUDA runtime and streams the runner uses) must share a CUDA
    major; a cu12 TensorRT beside a cu13 torch fails later, far from the cause."""
    if not torch_cuda or not trt_majors:
        return  # a CPU-only torch is caught by cuda_device(); a tar install has no wheel names
    want = torch_cuda.split(".")[0]
    if want not in trt_majors:
        have = ", ".join(f"tensorrt-cu{m}" for m in sorted(trt_majors))
        raise StnDeployError(f"TensorRT is built for another CUDA ({have}) than torch (CUDA "
                             f"{torch_cuda}); install stn-deploy[trt] for CUDA 13 torch or "
                             f"stn-deploy[trt-cu12] for CUDA 12 torch")


def trt_major(trt_module: Any) -> int:
    """Major version from ``tensorrt.__version__`` ("10.13.0.35" -> 10)."""
    version = str(getattr(trt_module, "__version__", ""))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise StnDeployError(f"cannot read the TensorRT version from {version!r}") from None
    if major not in SUPPORTED_MAJORS:
        raise StnDeployError(f"TensorRT {version} is not supported; stn-deploy builds with "
                             f"TensorRT {' or '.join(map(str, SUPPORTED_MAJORS))}")
    return major


def cuda_device(device: Any = 0) -> tuple[str, str]:
    """(GPU name, compute capability "8.9") of a CUDA device (index, "cuda:N" or a
    ``torch.device``; default the first), or StnDeployError when torch sees no GPU."""
    import torch

    if not torch.cuda.is_available():
        raise StnDeployError("no CUDA device: TensorRT engines need an NVIDIA GPU with its "
                             "driver (torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def check_plan_compatible(plan: Path, trt_module: Any, gpu_name: str,
                          compute_capability: str) -> dict[str, Any]:
    """The sidecar, if the plan was built by this TensorRT for this GPU; else a clear error
    (TensorRT itself would fail with a deserialization message or, worse, crash)."""
    side = read_sidecar(plan)
    have = str(getattr(trt_module, "__version__", ""))
    if side["tensorrt_version"] != have:
        raise StnDeployError(f"{plan} was built with TensorRT {side['tensorrt_version']}, this "
                             f"is TensorRT {have}; rebuild it with stn-deploy export "
                             "--format trt")
    if side["compute_capability"] != compute_capability or side["gpu_name"] != gpu_name:
        raise StnDeployError(f"{plan} was built for {side['gpu_name']} (compute capability "
                             f"{side['compute_capability']}), this GPU is {gpu_name} "
                             f"({compute_capability}); rebuild it here")
    return side
