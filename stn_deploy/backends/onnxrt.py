"""ONNX Runtime runners: the CPU execution provider, and the CUDA and TensorRT providers of
onnxruntime-gpu.

Provider lists, most preferred first: CUDA then CPU; TensorRT then CUDA then CPU (ONNX
Runtime hands a node TensorRT cannot take to the next provider in the list, and CUDA is a far
better home for it than the CPU). Which provider ran each node is read from ONNX Runtime's
own profile of one run at activation and reported with the row (``runtime.node_providers``),
so a row never claims a GPU for work the CPU did.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from collections import Counter
from typing import Any, ClassVar

import numpy as np

from stn_deploy.backends.base import cpu_name, cuda_device_name
from stn_deploy.backends.onnx_file import OnnxFileRunner
from stn_deploy.errors import MissingDependencyError, StnDeployError, error_line, require

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def import_onnxruntime() -> Any:
    return require("onnxruntime", "pip install onnxruntime")


def conflicting_wheels() -> str | None:
    """onnxruntime and onnxruntime-gpu install the same ``onnxruntime`` module; with both
    present, whichever was installed last wins, and a GPU provider silently goes missing."""
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    if len(installed) < 2:
        return None
    return (f"both {' and '.join(installed)} are installed and share one module; uninstall "
            "both, then install onnxruntime-gpu alone for GPU providers (or onnxruntime alone)")


class OnnxRuntimeRunner(OnnxFileRunner):
    name = "onnxruntime"
    supports_compute_only = True
    provider: ClassVar[str] = CPU
    fallbacks: ClassVar[tuple[str, ...]] = ()  # providers after ``provider``, before the CPU
    install: ClassVar[str] = "pip install onnxruntime"

    def __init__(self, model_path: str | os.PathLike[str], **opts: Any) -> None:
        super().__init__(model_path, **opts)
        self._session: Any = None
        self.node_providers: dict[str, int] = {}

    @classmethod
    def probe(cls) -> str | None:
        try:
            ort = import_onnxruntime()
        except MissingDependencyError as e:
            return str(e)
        if cls.provider == CPU:
            return None
        if cls.provider not in ort.get_available_providers():
            clash = conflicting_wheels()
            return clash or (f"{cls.provider} is not in this onnxruntime build "
                             f"({ort.__version__}); {cls.install}")
        return None

    @property
    def version(self) -> str:
        return str(import_onnxruntime().__version__)

    @property
    def device_name(self) -> str:
        return cpu_name() if self.provider == CPU else (cuda_device_name() or "no CUDA device")

    def describe(self) -> dict[str, Any]:
        return {"threads": self.threads, "providers": list(self.providers()),
                "provider_options": self.provider_options(),
                "graph_optimization": "ORT_ENABLE_ALL", "node_providers": self.node_providers}

    def providers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.provider, *self.fallbacks, CPU)))

    def provider_options(self) -> dict[str, Any]:
        return {}

    def _session_options(self, ort: Any) -> Any:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        return so

    def activate_impl(self) -> None:
        ort = import_onnxruntime()
        reason = self.probe()
        if reason is not None:
            raise StnDeployError(f"{self.name}: {reason}")
        so = self._session_options(ort)
        so.enable_profiling = True  # one profiled run below says where every node ran
        so.profile_file_prefix = os.path.join(tempfile.gettempdir(), "stn-ort")
        options = {self.provider: self.provider_options()}
        providers = [(p, options.get(p, {})) for p in self.providers()]
        try:
            self._session = ort.InferenceSession(str(self.model_path), so, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise StnDeployError(f"onnxruntime cannot load {self.model_path}: "
                                 f"{error_line(e)}") from None
        used = self._session.get_providers()
        if used[0] != self.provider:
            raise StnDeployError(f"{self.name}: onnxruntime fell back to {used[0]}")
        inp = self._session.get_inputs()[0]
        batch = inp.shape[0] if isinstance(inp.shape[0], int) else -1
        self.input_spec = self.graph_input_spec(inp.name, batch, "uint8" in inp.type)
        self.output_names = tuple(o.name for o in self._session.get_outputs())
        self._ort = ort
        self._device_type = "cpu" if self.provider == CPU else "cuda"
        self.node_providers = self._profile_once()

    def _profile_once(self) -> dict[str, int]:
        """Run one input, end profiling (later runs are not profiled) and count the nodes
        each provider ran."""
        x = np.zeros((max(1, self.input_spec.static_batch or 1), *self.input_spec.shape[1:]),
                     dtype=self.input_spec.dtype)
        self._session.run(self.output_names, {self.input_spec.name: x})
        path = self._session.end_profiling()
        try:
            with open(path, encoding="utf-8") as f:
                events = json.load(f)
        finally:
            os.unlink(path)
        return node_providers(events)

    def infer_impl(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self._session.run(self.output_names, {self.input_spec.name: x})
        return dict(zip(self.output_names, outs))

    def bind_impl(self, x: np.ndarray) -> None:
        value = self._ort.OrtValue.ortvalue_from_numpy(x, self._device_type, 0)
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(self.input_spec.name, value)
        for name in self.output_names:
            binding.bind_output(name, self._device_type, 0)
        self._bound = (binding, value)

    def infer_bound_impl(self) -> None:
        # run_with_iobinding waits for the providers by default: the clock sees finished work.
        self._session.run_with_iobinding(self._bound[0])

    def deactivate_impl(self) -> None:
        self._session = None
        self._bound = None


def node_providers(events: list[dict[str, Any]]) -> dict[str, int]:
    """Nodes per execution provider, from an ONNX Runtime profile (its "Node" events carry
    ``args.provider``; a node appears once per run, so distinct names are counted)."""
    seen: dict[str, str] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args:
            seen[str(e.get("name", "")).rsplit("_kernel_time", 1)[0]] = str(args["provider"])
    return dict(sorted(Counter(seen.values()).items()))


class OnnxRuntimeCudaRunner(OnnxRuntimeRunner):
    name = "onnxruntime-cuda"
    provider = CUDA
    install = "pip uninstall onnxruntime && pip install onnxruntime-gpu"

    def provider_options(self) -> dict[str, Any]:
        return {"device_id": 0}


class OnnxRuntimeTensorRTRunner(OnnxRuntimeRunner):
    name = "onnxruntime-trt"
    provider = TENSORRT
    fallbacks = (CUDA,)
    install = "pip uninstall onnxruntime && pip install onnxruntime-gpu tensorrt"

    def provider_options(self) -> dict[str, Any]:
        # The file carries its precision. FP16: no trt_fp16_enable, which would let
        # TensorRT pick FP16 kernels for the STN path the file keeps in FP32. INT8: the QDQ
        # graph carries its own scales; the INT8 flag lets TensorRT 10 run its Q/DQ layers
        # in INT8, with no calibration table.
        opts: dict[str, Any] = {"device_id": 0}
        if self.stored_precision == "int8":
            opts["trt_int8_enable"] = True
        return opts
