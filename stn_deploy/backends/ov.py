"""OpenVINO on the CPU, reading the same ONNX files (FP32, FP16 and the INT8 QDQ graph).

Two settings are made explicit because the defaults are not what a results table implies:
- ``INFERENCE_PRECISION_HINT`` is set to f32: on CPUs with AVX512_BF16 (this Zen 5 machine)
  OpenVINO otherwise computes an "FP32" model in bfloat16.
- ``PERFORMANCE_HINT``: LATENCY (one stream using every thread; the default here, because the
  harness runs one synchronous request at a time) or THROUGHPUT (several streams, which only
  pay off with parallel requests). ``hint`` picks one; both are reported.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from stn_deploy.backends.base import spec_for
from stn_deploy.backends.onnxrt import OnnxRuntimeRunner
from stn_deploy.errors import StnDeployError, require

HINTS = ("latency", "throughput")


def import_openvino() -> Any:
    return require("openvino", "pip install openvino")


class OpenVinoRunner(OnnxRuntimeRunner):
    """Shares metadata/precision reading with the ONNX Runtime runner; runs on OpenVINO."""

    name = "openvino"
    supports_compute_only = True

    def __init__(self, model_path: str | os.PathLike[str], **opts: Any) -> None:
        super().__init__(model_path, **opts)
        self.hint = (self.options.get("hint") or "latency").lower()
        if self.hint not in HINTS:
            raise StnDeployError(f"openvino hint must be one of {', '.join(HINTS)}, "
                                 f"not {self.hint!r}")
        self.device = self.device or "CPU"

    @property
    def version(self) -> str:
        return str(import_openvino().__version__).split("-")[0]

    @property
    def device_name(self) -> str:
        from stn_deploy.backends.base import cpu_name

        return cpu_name()

    def describe(self) -> dict[str, Any]:
        return dict(self._described) if hasattr(self, "_described") else {
            "threads": self.threads, "hint": self.hint}

    def activate_impl(self) -> None:
        ov = import_openvino()
        core = ov.Core()
        config = {
            "PERFORMANCE_HINT": self.hint.upper(),
            "INFERENCE_NUM_THREADS": self.threads,
            # fp16 models: OpenVINO decompresses FP16 weights; compute stays f32 on the CPU.
            "INFERENCE_PRECISION_HINT": "f32",
        }
        try:
            model = core.read_model(str(self.model_path))
            self._compiled = core.compile_model(model, self.device, config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with long texts
            raise StnDeployError(f"openvino cannot compile {self.model_path}: "
                                 f"{str(e).strip().splitlines()[0]}") from None
        inp = self._compiled.inputs[0]
        pshape = inp.get_partial_shape()
        batch = pshape[0].get_length() if pshape[0].is_static else -1
        embedded = self._meta.get("preprocess") == "embedded" or inp.get_element_type() == ov.Type.u8
        self.input_spec = spec_for(self.config, name=inp.get_any_name(), embedded=embedded,
                                   batch=batch)
        self.output_names = tuple(o.get_any_name() for o in self._compiled.outputs)
        self._request = self._compiled.create_infer_request()
        self._ov = ov
        self._described = {
            "threads": self.threads, "hint": self.hint,
            "streams": int(self._compiled.get_property("NUM_STREAMS")),
            "inference_precision": _type_name(
                self._compiled.get_property("INFERENCE_PRECISION_HINT")),
        }

    def infer_impl(self, x: np.ndarray) -> dict[str, np.ndarray]:
        request = self._request
        # share_inputs: host memory is the CPU plugin's memory; outputs are copied out.
        request.infer({0: x}, share_inputs=True)
        return {name: request.get_output_tensor(i).data.copy()
                for i, name in enumerate(self.output_names)}

    def bind_impl(self, x: np.ndarray) -> None:
        self._request.set_input_tensor(self._ov.Tensor(np.ascontiguousarray(x)))

    def infer_bound_impl(self) -> None:
        self._request.infer()

    def deactivate_impl(self) -> None:
        self._request = None
        self._compiled = None


def _type_name(t: Any) -> str:
    return str(t.to_string()) if hasattr(t, "to_string") else str(t)
