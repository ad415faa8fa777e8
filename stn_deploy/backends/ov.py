"""OpenVINO on the CPU, reading the same ONNX files (FP32, FP16 and the INT8 QDQ graph).

Two settings are made explicit because the defaults are not what a results table implies:
- ``INFERENCE_PRECISION_HINT``: f32 unless precision "bf16" is asked for. On CPUs with
  AVX512_BF16 or AMX OpenVINO's own default computes an "FP32" model in bfloat16; here that
  is a row of its own, labelled bf16, with its accuracy and agreement measured like any other.
- ``PERFORMANCE_HINT``: LATENCY (one stream using every thread) or THROUGHPUT (several
  streams). Streams only pay off with requests in flight at once, so under THROUGHPUT a batch
  is split into one slice per request, the slices run concurrently, and the outputs are joined
  in order: the clock still sees one batch in and its outputs out.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from stn_deploy.backends.base import onnx_precision, spec_for
from stn_deploy.backends.onnxrt import OnnxRuntimeRunner
from stn_deploy.errors import StnDeployError, require

HINTS = ("latency", "throughput")
# The runner's precision label -> OpenVINO's inference precision for the file's float parts.
COMPUTE = {"fp32": "f32", "fp16": "f32", "int8": "f32", "bf16": "bf16"}


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
        stored = onnx_precision(self.model_path)
        if self.precision != stored and not (self.precision == "bf16" and stored == "fp32"):
            raise StnDeployError(f"openvino runs {self.model_path.name} as {stored} (or as bf16 "
                                 f"when the file is fp32), not as {self.precision}")
        self.device = self.device or "CPU"
        self._requests: list[Any] = []

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
            "INFERENCE_PRECISION_HINT": COMPUTE[self.precision],
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
        computed = _type_name(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        if COMPUTE[self.precision] == "bf16" and computed != "bf16":
            raise StnDeployError(f"openvino bf16: this CPU has no bf16 support (OpenVINO computes"
                                 f" in {computed}); run the file as fp32")
        # One request per stream; a static-batch graph cannot be sliced, so it keeps one.
        n = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        n = 1 if self.hint == "latency" or batch != -1 else max(1, n)
        self._requests = [self._compiled.create_infer_request() for _ in range(n)]
        self._ov = ov
        self._described = {
            "threads": self.threads, "hint": self.hint,
            "streams": int(self._compiled.get_property("NUM_STREAMS")),
            "requests": n, "inference_precision": computed,
        }

    def _slices(self, x: np.ndarray) -> list[np.ndarray]:
        return np.array_split(x, min(len(self._requests), len(x)))

    def _run_all(self, requests: list[Any], inputs: list[np.ndarray] | None) -> None:
        if len(requests) == 1:
            # share_inputs: host memory is the CPU plugin's memory; no copy in.
            requests[0].infer(None if inputs is None else {0: inputs[0]}, share_inputs=True)
            return
        for i, request in enumerate(requests):
            request.start_async(None if inputs is None else {0: inputs[i]}, share_inputs=True)
        for request in requests:
            request.wait()

    def infer_impl(self, x: np.ndarray) -> dict[str, np.ndarray]:
        parts = self._slices(x)
        requests = self._requests[:len(parts)]
        self._run_all(requests, parts)
        return {name: np.concatenate([r.get_output_tensor(i).data for r in requests])
                for i, name in enumerate(self.output_names)}

    def bind_impl(self, x: np.ndarray) -> None:
        # Slices along the batch axis of a C-contiguous array are themselves contiguous.
        parts = self._slices(np.ascontiguousarray(x))
        self._bound = self._requests[:len(parts)]
        for request, part in zip(self._bound, parts):
            request.set_input_tensor(self._ov.Tensor(part))

    def infer_bound_impl(self) -> None:
        self._run_all(self._bound, None)

    def deactivate_impl(self) -> None:
        self._requests = []
        self._bound = None
        self._compiled = None


def _type_name(t: Any) -> str:
    return str(t.to_string()) if hasattr(t, "to_string") else str(t)
