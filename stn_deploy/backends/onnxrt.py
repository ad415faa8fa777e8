"""ONNX Runtime runners: the CPU execution provider, and the CUDA and TensorRT providers of
onnxruntime-gpu. Each session uses exactly one accelerating provider (plus the CPU fallback
ORT always keeps), so a row in the results names what actually ran."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from stn_deploy.backends.base import Runner, cpu_name, cuda_device_name, onnx_precision, spec_for
from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError, require


def import_onnxruntime() -> Any:
    return require("onnxruntime", "pip install onnxruntime")


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"
    supports_compute_only = True
    provider = "CPUExecutionProvider"
    install = "pip install onnxruntime"

    def __init__(self, model_path: str | os.PathLike[str], **opts: Any) -> None:
        super().__init__(model_path, **opts)
        if opts.get("precision") is None:
            self.precision = onnx_precision(self.model_path)
        self._session: Any = None

    def load_config(self) -> ModelConfig:
        from stn_deploy.export.onnx_export import read_metadata

        meta = read_metadata(self.model_path)
        if "stn_deploy.config" not in meta:
            raise StnDeployError(f"{self.model_path} has no stn-deploy metadata (was it written "
                                 "by stn-deploy export?)")
        self._meta = meta
        return ModelConfig.from_json(meta["stn_deploy.config"])

    @property
    def version(self) -> str:
        return str(import_onnxruntime().__version__)

    @property
    def device_name(self) -> str:
        return cpu_name() if self.provider == "CPUExecutionProvider" else (
            cuda_device_name() or "no CUDA device")

    def describe(self) -> dict[str, Any]:
        return {"threads": self.threads, "provider": self.provider,
                "graph_optimization": "ORT_ENABLE_ALL"}

    def provider_options(self) -> dict[str, Any]:
        return {}

    def activate_impl(self) -> None:
        ort = import_onnxruntime()
        if self.provider not in ort.get_available_providers():
            raise StnDeployError(f"{self.name}: {self.provider} is not in this onnxruntime "
                                 f"build ({self.install})")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers: list[Any] = [(self.provider, self.provider_options())]
        if self.provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")
        try:
            self._session = ort.InferenceSession(str(self.model_path), so, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise StnDeployError(f"onnxruntime cannot load {self.model_path}: "
                                 f"{str(e).strip().splitlines()[0]}") from None
        used = self._session.get_providers()
        if used[0] != self.provider:
            raise StnDeployError(f"{self.name}: onnxruntime fell back to {used[0]}")
        inp = self._session.get_inputs()[0]
        embedded = self._meta.get("preprocess") == "embedded" or "uint8" in inp.type
        batch = inp.shape[0] if isinstance(inp.shape[0], int) else -1
        self.input_spec = spec_for(self.config, name=inp.name, embedded=embedded, batch=batch)
        self.output_names = tuple(o.name for o in self._session.get_outputs())
        self._ort = ort
        self._device_type = "cpu" if self.provider == "CPUExecutionProvider" else "cuda"

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


class OnnxRuntimeCudaRunner(OnnxRuntimeRunner):
    name = "onnxruntime-cuda"
    provider = "CUDAExecutionProvider"
    install = "pip install onnxruntime-gpu (instead of onnxruntime)"

    def provider_options(self) -> dict[str, Any]:
        return {"device_id": 0}


class OnnxRuntimeTensorRTRunner(OnnxRuntimeRunner):
    name = "onnxruntime-trt"
    provider = "TensorrtExecutionProvider"
    install = "pip install onnxruntime-gpu tensorrt"

    def provider_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"device_id": 0}
        if self.precision == "fp16":
            opts["trt_fp16_enable"] = True
        if self.precision == "int8":
            opts["trt_int8_enable"] = True  # the QDQ graph carries its own scales
        return opts
