"""OpenVINO on the CPU, reading the same ONNX files (FP32, FP16 and the INT8 QDQ graph) and
the IR ``export --format openvino`` writes (those and bf16).

Two settings are made explicit because the defaults are not what a results table implies:
- ``INFERENCE_PRECISION_HINT``, the precision OpenVINO computes the file's float parts in:
  f32 unless bf16 is asked for. On CPUs with AVX512_BF16 or AMX OpenVINO's own default
  computes an "FP32" model in bfloat16; here that is a row of its own, labelled bf16, with its
  accuracy and agreement measured like any other. bf16 comes from the file (a bf16 IR, whose
  metadata says bf16: it runs on any CPU, OpenVINO computing it in f32 where there is no
  bf16, and ``describe()["inference_precision"]`` says which) or from the caller:
  ``precision="bf16"`` on an FP32 file (the bf16 row), or ``compute="bf16"`` on a file of any
  precision: the float parts of an FP16 file, and of an INT8 file whose STN path was kept
  float, then compute in bf16 while the file keeps its label (an INT8 file's row stays int8).
  A caller's bf16 is refused on a CPU without bf16: it asked for a compute precision this CPU
  cannot give. bf16 is never chosen for the caller: theta's shift from a bf16 STN path has to
  be measured on such a CPU first.
- ``PERFORMANCE_HINT``: LATENCY (one stream using every thread) or THROUGHPUT (several
  streams). Streams only pay off with requests in flight at once, so under THROUGHPUT a batch
  is cut into slices of at most ``SLICE`` images that run on two requests per stream, and the
  outputs are joined in order: the clock still sees one batch in and its outputs out.
  Measured here (2 cores, batch 256, the 145k model): slices of 32 on 4 requests ran ~4%
  faster than one slice per stream (activations of 32 images stay in cache, and a stream
  never waits for Python to hand it the next slice).

A file with a dynamic batch axis is also compiled once per batch size it is run at (static
shapes, the few most recent kept): at batch 1 that ran ~7% faster here than the dynamic
graph, and each compile (~0.1 s) falls in the harness's warm-up.
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from typing import Any

import numpy as np

from stn_deploy.artifacts import config_from_metadata, model_kind, read_ir_metadata
from stn_deploy.backends.base import cpu_name
from stn_deploy.backends.onnx_file import OnnxFileRunner
from stn_deploy.config import ModelConfig
from stn_deploy.errors import MissingDependencyError, StnDeployError, error_line, require
from stn_deploy.names import DEFAULT_PRECISION

HINTS = ("latency", "throughput")
# The runner's precision label -> OpenVINO's inference precision for the file's float parts,
# unless the runner's ``compute`` option says otherwise: FP16 weights are decompressed and
# computed in f32, and an INT8 file's float parts (an STN path kept float) are f32 too.
COMPUTE = {"fp32": "f32", "fp16": "f32", "int8": "f32", "bf16": "bf16"}
COMPUTES = ("f32", "bf16")  # what ``compute`` may ask for
SLICE = 32  # images per request under THROUGHPUT
REQUESTS_PER_STREAM = 2
KEEP_SHAPES = 4  # static compiles kept per runner


def compile_config(hint: str, threads: int, precision: str,
                   compute: str | None = None) -> dict[str, Any]:
    """The one spelling of how stn-deploy compiles for OpenVINO's CPU plugin (benchmarks that
    profile OpenVINO add to it). ``compute``: the float parts' precision, None: COMPUTE's."""
    return {
        "PERFORMANCE_HINT": hint.upper(),
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": compute or COMPUTE[precision],
    }


def import_openvino() -> Any:
    return require("openvino", "pip install openvino")


class OpenVinoRunner(OnnxFileRunner):
    """Options beyond threads and precision: ``hint`` (latency or throughput) and ``compute``,
    the precision OpenVINO computes the file's float parts in ("f32" or "bf16"; None: the
    file's own, COMPUTE). The row keeps the file's precision label, with one exception that
    keeps one name for one thing: an FP32 file computed in bf16 is the bf16 row, so
    ``compute="bf16"`` on an FP32 file is ``precision="bf16"`` (and ``precision="bf16"``
    with ``compute="f32"`` is refused as a contradiction). ``compute="f32"`` on a bf16 IR is
    allowed: it forces f32 (the row says bf16, computed in fp32), which is how one IR's bf16
    is compared with its f32 on a CPU that has bf16. A caller's bf16 is refused at
    activation on a CPU without bf16 (never silently run in f32)."""

    name = "openvino"
    supports_compute_only = True
    OPTIONS = ("hint", "compute")

    @classmethod
    def probe(cls) -> str | None:
        try:
            import_openvino()
        except MissingDependencyError as e:
            return str(e)
        return None

    def __init__(self, model_path: str | os.PathLike[str], **opts: Any) -> None:
        super().__init__(model_path, **opts)
        self.hint = (self.options.get("hint") or "latency").lower()
        if self.hint not in HINTS:
            raise StnDeployError(f"openvino hint must be one of {', '.join(HINTS)}, "
                                 f"not {self.hint!r}")
        stored = self.stored_precision
        if self.precision != stored and not (self.precision == "bf16" and stored == "fp32"):
            raise StnDeployError(f"openvino runs {self.model_path.name} as {stored} (or as bf16 "
                                 f"when the file is fp32), not as {self.precision}")
        self.compute = self._asked_compute(self.options.get("compute"))
        self.device = self.device or "CPU"
        self._n_requests = 1

    def _asked_compute(self, compute: str | None) -> str | None:
        """The compute precision the caller asked for (None: the file's own), and the bf16
        label where an FP32 file is asked to compute in bf16."""
        compute = str(compute).lower() if compute is not None else None
        if compute is not None and compute not in COMPUTES:
            raise StnDeployError(f"openvino compute must be one of {', '.join(COMPUTES)}, "
                                 f"not {compute!r}")
        if self.precision != self.stored_precision:  # precision="bf16" over an FP32 file
            if compute == "f32":
                raise StnDeployError("openvino: precision='bf16' computes in bf16 and "
                                     "compute='f32' in f32: ask for one")
            return "bf16"
        if compute == "bf16" and self.stored_precision == "fp32":
            self.precision = "bf16"  # an FP32 file computed in bf16 is the bf16 row
        return compute

    def load_config(self) -> ModelConfig:
        """An ONNX file's metadata, or an IR's (.xml): the same keys, in its rt_info."""
        if model_kind(self.model_path) != "openvino":
            return super().load_config()
        self.meta = read_ir_metadata(self.model_path)
        self._precision = self.meta.get("precision") or DEFAULT_PRECISION
        return config_from_metadata(self.meta, self.model_path)

    @property
    def version(self) -> str:
        return str(import_openvino().__version__).split("-")[0]

    @property
    def device_name(self) -> str:
        return cpu_name()

    def describe(self) -> dict[str, Any]:
        return dict(self._described) if hasattr(self, "_described") else {
            "threads": self.threads, "hint": self.hint}

    def activate_impl(self) -> None:
        ov = import_openvino()
        core = ov.Core()
        config = compile_config(self.hint, self.threads, self.precision, self.compute)
        self._core, self._config, self._ov = core, config, ov
        try:
            self._model = core.read_model(str(self.model_path))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with long texts
            raise StnDeployError(f"openvino cannot read {self.model_path}: "
                                 f"{error_line(e)}") from None
        # The file's own graph, compiled once: it validates the file and tells the input,
        # streams and precision; runs use static copies per batch size (_requests_for).
        compiled = self._compile(self._model)
        inp = compiled.inputs[0]
        pshape = inp.get_partial_shape()
        batch = pshape[0].get_length() if pshape[0].is_static else -1
        self.input_spec = self.graph_input_spec(inp.get_any_name(), batch,
                                                 inp.get_element_type() == ov.Type.u8)
        # A tensor may carry several names once OpenVINO folds a node (FP16 graphs end in a
        # Cast; an output added through an Identity): keep the one the graph declares as its
        # output, from the metadata or, where the file names it alone, the file itself.
        declared = set(self.meta.get("outputs", "").split(",")) | {
            next(iter(o.get_names())) for o in self._model.outputs if len(o.get_names()) == 1}
        self.output_names = tuple(next((n for n in sorted(o.get_names()) if n in declared),
                                       o.get_any_name()) for o in compiled.outputs)
        computed = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if self.compute == "bf16" and computed != "bf16":  # the caller's bf16, not the file's
            raise StnDeployError(f"openvino bf16: this CPU has no bf16 support (OpenVINO computes"
                                 f" in {computed}); run the {self.stored_precision} file "
                                 f"without bf16")
        # A static-batch graph cannot be sliced, so it keeps one request, as LATENCY does.
        streams = int(compiled.get_property("NUM_STREAMS"))
        n = 1 if self.hint == "latency" or batch != -1 else max(1, REQUESTS_PER_STREAM * streams)
        self._n_requests = n
        self._static: OrderedDict[int, list[Any]] = OrderedDict()
        if batch != -1:
            self._static[batch] = [compiled.create_infer_request() for _ in range(n)]
        self._described = {
            "threads": self.threads, "hint": self.hint,
            "streams": streams, "requests": n, "slice": SLICE if n > 1 else None,
            "shapes": "static per batch size" if batch == -1 else "static (file)",
            "inference_precision": computed,
        }

    def _compile(self, model: Any) -> Any:
        try:
            return self._core.compile_model(model, self.device, self._config)
        except Exception as e:
            raise StnDeployError(f"openvino cannot compile {self.model_path}: "
                                 f"{error_line(e)}") from None

    def _requests_for(self, batch: int) -> list[Any]:
        """The requests of a model compiled for exactly ``batch`` images."""
        if batch in self._static:
            self._static.move_to_end(batch)
            return self._static[batch]
        model = self._model.clone()
        model.reshape({0: [batch, *self.input_spec.shape[1:]]})
        compiled = self._compile(model)
        self._static[batch] = [compiled.create_infer_request() for _ in range(self._n_requests)]
        while len(self._static) > KEEP_SHAPES:
            self._static.popitem(last=False)
        return self._static[batch]

    def _slices(self, x: np.ndarray) -> list[Any]:
        """Input tensors over the host memory of ``x`` (no copy in), one per request run:
        the whole batch, or under THROUGHPUT slices of SLICE images and one remainder."""
        x = np.ascontiguousarray(x)  # batch-axis slices of it are contiguous too
        cuts = range(SLICE, len(x), SLICE) if self._n_requests > 1 else []
        return [self._ov.Tensor(part, shared_memory=True) for part in np.split(x, cuts)]

    def _run(self, tensors: list[Any], collect: bool) -> list[list[np.ndarray]]:
        """Runs slice k on request k mod R of its shape's model, at most R in flight, oldest
        collected first; returns each slice's outputs in order (copied: a request's output
        buffers are overwritten by its next run)."""
        if len(tensors) == 1:  # LATENCY: the synchronous call beats start_async + wait
            request = self._requests_for(tensors[0].shape[0])[0]
            request.set_input_tensor(tensors[0])
            request.infer()
            return [self._outputs(request)] if collect else []
        r, outputs, in_flight = self._n_requests, [], deque()
        for k, tensor in enumerate(tensors):
            if len(in_flight) == r:
                self._finish(in_flight.popleft(), collect, outputs)
            request = self._requests_for(tensor.shape[0])[k % r]
            request.set_input_tensor(tensor)
            request.start_async()
            in_flight.append(request)
        while in_flight:
            self._finish(in_flight.popleft(), collect, outputs)
        return outputs

    def _finish(self, request: Any, collect: bool, outputs: list[list[np.ndarray]]) -> None:
        request.wait()
        if collect:
            outputs.append(self._outputs(request))

    def _outputs(self, request: Any) -> list[np.ndarray]:
        return [request.get_output_tensor(i).data.copy() for i in range(len(self.output_names))]

    def infer_impl(self, x: np.ndarray) -> dict[str, np.ndarray]:
        parts = self._run(self._slices(x), collect=True)
        if len(parts) == 1:
            return dict(zip(self.output_names, parts[0]))
        return {name: np.concatenate([p[i] for p in parts])
                for i, name in enumerate(self.output_names)}

    def bind_impl(self, x: np.ndarray) -> None:
        self._bound_input = np.ascontiguousarray(x)  # kept alive: the tensors share its memory
        self._bound = self._slices(self._bound_input)

    def infer_bound_impl(self) -> None:
        self._run(self._bound, collect=False)

    def deactivate_impl(self) -> None:
        self._static.clear()
        self._bound = None
        self._bound_input = None
        self._model = None


def _type_name(t: Any) -> str:
    return str(t.to_string()) if hasattr(t, "to_string") else str(t)
