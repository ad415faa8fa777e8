"""TensorRT plans (from ``stn-deploy export --format trt``): deserialize, set the dynamic
batch shape, run ``execute_async_v3`` on a CUDA stream.

Written against the TensorRT 10/11 Python API (name-based I/O tensors: ``num_io_tensors``,
``get_tensor_name``, ``get_tensor_mode``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). NOT RUN on the machine this was written on (no GPU, no TensorRT):
device buffers and the stream are torch CUDA tensors and a ``torch.cuda.Stream``, so the only
extra dependency is ``tensorrt``. The plan's sidecar (``<plan>.json``) supplies the model config
and is checked against this TensorRT and GPU before deserializing (``stn_deploy.tensorrt_env``,
shared with the exporter, so this runner never imports the exporter).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from stn_deploy.artifacts import read_sidecar
from stn_deploy.backends.base import Runner, spec_for
from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError


class TensorRTRunner(Runner):
    name = "trt"
    supports_compute_only = True
    OPTIONS = ("device",)

    def __init__(self, model_path: str | os.PathLike[str], **opts: Any) -> None:
        import torch

        if not torch.cuda.is_available():
            raise StnDeployError("trt needs a CUDA GPU and none is visible")
        from stn_deploy.tensorrt_env import import_tensorrt

        self._trt = import_tensorrt()
        super().__init__(model_path, **opts)
        self.device = self.device or "cuda:0"
        self.precision = opts.get("precision") or str(self._sidecar.get("precision", "fp32"))
        self._torch = torch

    def load_config(self) -> ModelConfig:
        self._sidecar = read_sidecar(self.model_path)
        return ModelConfig.from_dict(self._sidecar["config"])

    @property
    def version(self) -> str:
        return str(self._trt.__version__)

    @property
    def device_name(self) -> str:
        return str(self._torch.cuda.get_device_name(self._torch.device(self.device)))

    def describe(self) -> dict[str, Any]:
        return {"threads": self.threads, "device": self.device,
                "profile": self._sidecar.get("profile")}

    def activate_impl(self) -> None:
        from stn_deploy.tensorrt_env import check_plan_compatible, cuda_device

        trt, torch = self._trt, self._torch
        dev = torch.device(self.device)
        check_plan_compatible(self.model_path, trt, *cuda_device(dev))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.model_path.read_bytes())
        if engine is None:
            raise StnDeployError(f"TensorRT could not deserialize {self.model_path}")
        self._engine = engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise StnDeployError(f"{self.model_path}: expected one input tensor, found {inputs}")
        self._input = inputs[0]
        self.output_names = tuple(n for n in names if n != self._input)
        self._dtypes = {n: torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(n))))
                        .dtype for n in names}
        profile = self._sidecar.get("profile") or {}
        max_batch = int(profile.get("max") or 1)  # the sidecar stores batch sizes
        self._max_batch = max_batch
        embedded = bool(self._sidecar.get("embed_preprocess")) or \
            self._dtypes[self._input] == torch.uint8
        static = tuple(engine.get_tensor_shape(self._input))
        batch = static[0] if static[0] >= 0 else -1
        self.input_spec = spec_for(self.config, name=self._input, embedded=embedded, batch=batch)
        self._stream = torch.cuda.Stream(device=dev)
        # Buffers for the largest batch the profile allows; smaller batches use the front.
        self._buffers: dict[str, Any] = {}
        self._alloc(self._input, (max_batch, *self.input_spec.shape[1:]))
        for name in self.output_names:
            self._context.set_input_shape(self._input, (max_batch, *self.input_spec.shape[1:]))
            self._alloc(name, tuple(self._context.get_tensor_shape(name)))
        self._batch = -1

    def _alloc(self, name: str, shape: tuple[int, ...]) -> None:
        self._buffers[name] = self._torch.empty(shape, dtype=self._dtypes[name],
                                                device=self.device)

    def _set_batch(self, n: int) -> None:
        if n > self._max_batch:
            raise StnDeployError(f"batch {n} exceeds the plan's profile maximum {self._max_batch}")
        if n == self._batch:
            return
        shape = (n, *self.input_spec.shape[1:])
        if not self._context.set_input_shape(self._input, shape):
            raise StnDeployError(f"TensorRT rejected input shape {shape}")
        for name, buf in self._buffers.items():
            self._context.set_tensor_address(name, buf.data_ptr())
        self._batch = n

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise StnDeployError("TensorRT execute_async_v3 failed")

    def infer_impl(self, x: np.ndarray) -> dict[str, np.ndarray]:
        torch, n = self._torch, x.shape[0]
        self._set_batch(n)
        with torch.cuda.stream(self._stream):
            self._buffers[self._input][:n].copy_(torch.from_numpy(x), non_blocking=False)
            self._enqueue()
            outs = {name: self._buffers[name][:n].float().cpu().numpy()
                    for name in self.output_names}
        self._stream.synchronize()
        return outs

    def bind_impl(self, x: np.ndarray) -> None:
        self._set_batch(x.shape[0])
        with self._torch.cuda.stream(self._stream):
            self._buffers[self._input][:x.shape[0]].copy_(self._torch.from_numpy(x))
        self._stream.synchronize()

    def infer_bound_impl(self) -> None:
        self._enqueue()

    def synchronize(self) -> None:
        if self.is_active:
            self._stream.synchronize()

    def deactivate_impl(self) -> None:
        self._buffers.clear()
        self._context = None
        self._engine = None
        self._runtime = None
        self._torch.cuda.empty_cache()
