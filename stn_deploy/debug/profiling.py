"""``profile``: where inference time goes, per ONNX node and per STN stage, from the runtime's
own profiler.

- ONNX Runtime: the profiling JSON (``SessionOptions.enable_profiling``); each kernel event
  names the node it ran, after ONNX Runtime's own renames (``fused X``, ``X_token_7``,
  ``<tensor>_nchwc``), mapped back here.
- OpenVINO: the performance counters (``PERF_COUNT``, ``request.get_profiling_info()``); a
  fused node's original ONNX nodes come from the runtime model's ``originalLayersNames``.
- TensorRT: an ``IProfiler`` on the plan's execution context (layer names ``A + B`` for fused
  layers); written against the TensorRT API, NOT RUN here (no GPU, no TensorRT).

A fused kernel's time is split evenly among the ONNX nodes it ran; kernels a runtime inserts
(layout reorders) count toward the stage of the kernel run just before them. Shares are of the
summed kernel time, which the report sets beside the wall time of the same runs.

Inputs are seeded random values of the graph's input shape: kernel time does not depend on the
pixel values (GridSample reads the same number of points wherever theta sends them).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stn_deploy.debug.graph import GraphIndex
from stn_deploy.debug.stages import STAGES, StageMap, assign_stages
from stn_deploy.errors import StnDeployError, error_line

if TYPE_CHECKING:
    import onnx

PROFILERS = ("onnxruntime", "openvino", "trt")
STN_STAGES = ("localization", "theta", "grid", "sampler")  # "input": preprocessing, shared
RUNTIME_INSERTED = "(runtime-inserted)"
_ORT_SUFFIXES = [re.compile(p) for p in (r"_kernel_time$", r"^fused ", r"_token_\d+$",
                                          r"_nchwc$", r"/\w*Fusion/?$")]


@dataclass
class KernelTime:
    """One kernel of the runtime, its mean time per run and the ONNX nodes it ran."""

    name: str
    op_type: str
    ms: float
    nodes: list[str]
    stage: str = "-"  # the stage of its first ONNX node ("-": runtime-inserted)


@dataclass
class NodeTime:
    node: str
    op_type: str
    stage: str
    ms: float


@dataclass
class ProfileRun:
    backend: str
    version: str
    batch_size: int
    iterations: int
    wall_ms: float  # mean wall time of one profiled run
    kernel_ms: float  # mean summed kernel time of one run
    stage_ms: dict[str, float]
    nodes: list[NodeTime]  # per ONNX node, a fused kernel's time split evenly
    kernels: list[KernelTime]  # the runtime's own units, slowest first
    unmapped: list[str] = field(default_factory=list)

    @property
    def shares(self) -> dict[str, float]:
        total = sum(self.stage_ms.values())
        return {s: (ms / total if total else 0.0) for s, ms in self.stage_ms.items()}

    @property
    def stn_share(self) -> float:
        return sum(v for s, v in self.shares.items() if s in STN_STAGES)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(shares=self.shares, stn_share=self.stn_share)
        return d


@dataclass
class ProfileReport:
    model: str
    threads: int
    inputs: str
    runs: list[ProfileRun]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "threads": self.threads, "inputs": self.inputs,
                "notes": self.notes, "runs": [r.to_dict() for r in self.runs]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def lines(self, top: int = 8) -> list[str]:
        from stn_deploy.debug.report import profile_lines

        return profile_lines(self, top)


# ---------------------------------------------------------------------- names -> ONNX nodes

def onnx_nodes_for(name: str, idx: GraphIndex, by_length: list[str]) -> list[str]:
    """The ONNX node a runtime's kernel or layer name stands for ([] when none): the name
    itself, with a runtime's renames stripped, a tensor's producer, or the longest node name
    the runtime name starts with (OpenVINO's ``X/WithoutBiases``)."""
    variants = [name]
    for pattern in _ORT_SUFFIXES:
        variants.append(pattern.sub("", variants[-1]))
    for v in variants:
        if v in idx.nodes:
            return [v]
        if v in idx.producer:
            return [idx.producer[v].name]
    for v in variants:
        for node in by_length:
            if v.startswith(node) and (len(v) == len(node) or v[len(node)] in "/_:"):
                return [node]
    return []


def attribute(kernels: list[KernelTime], stages: StageMap, idx: GraphIndex
              ) -> tuple[dict[str, float], list[NodeTime], list[str]]:
    """Kernel times -> (ms per stage, ms per ONNX node, kernels that map to no node), in
    execution order; an unmapped kernel counts toward the stage of the one before it."""
    stage_ms = {s: 0.0 for s in STAGES}
    node_ms: dict[str, float] = defaultdict(float)
    unmapped: list[str] = []
    last = None
    for k in kernels:
        nodes = [n for n in k.nodes if n in stages.stage]
        if not nodes:
            unmapped.append(k.name)
            stage = last or next((stages.stage[n] for n in stages.order), "classifier")
            stage_ms[stage] += k.ms
            node_ms[f"{RUNTIME_INSERTED} {k.op_type}"] += k.ms
            continue
        for n in nodes:
            node_ms[n] += k.ms / len(nodes)
            stage_ms[stages.stage[n]] += k.ms / len(nodes)
        last = stages.stage[nodes[-1]]
    rows = [NodeTime(n, idx.nodes[n].op_type if n in idx.nodes else "-",
                     stages.stage.get(n, "-"), ms) for n, ms in node_ms.items()]
    rows.sort(key=lambda r: -r.ms)
    return {s: v for s, v in stage_ms.items() if v > 0 or s != "input"}, rows, unmapped


# ------------------------------------------------------------------------------- runtimes

def _feed(proto: "onnx.ModelProto", batch: int) -> dict[str, np.ndarray]:
    from stn_deploy.debug.inputs import graph_inputs

    rng = np.random.default_rng(0)
    feed = {}
    for inp in graph_inputs(proto):
        if any(d is None for d in inp.shape[1:]):
            raise StnDeployError(f"input {inp.name} has a dynamic non-batch dimension "
                                 f"{inp.shape}: no shape to time")
        if inp.shape and inp.shape[0] not in (None, batch):
            raise StnDeployError(f"the graph's batch is fixed at {inp.shape[0]}; profile it "
                                 f"with --batch-sizes {inp.shape[0]}")
        shape = (batch, *inp.shape[1:])
        feed[inp.name] = (rng.integers(0, 256, shape, dtype=np.uint8) if inp.dtype == np.uint8
                          else rng.standard_normal(shape).astype(inp.dtype))
    return feed


def ort_kernels(path: Path, proto: "onnx.ModelProto", idx: GraphIndex, batch: int,
                iterations: int, warmup: int, threads: int) -> tuple[list[KernelTime], float, str]:
    """(kernels in execution order with mean ms per run, mean wall ms, version)."""
    from stn_deploy.backends.onnxrt import import_onnxruntime

    ort = import_onnxruntime()
    feed = _feed(proto, batch)
    with tempfile.TemporaryDirectory(prefix="stn-profile-") as work:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(work, "ort")
        try:
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's own error types
            raise StnDeployError(f"onnxruntime cannot load {path}: {error_line(e)}") from None
        for _ in range(warmup):
            session.run(None, feed)
        start = time.perf_counter()
        for _ in range(iterations):
            session.run(None, feed)
        wall = (time.perf_counter() - start) * 1000 / iterations
        with open(session.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    return _ort_events(events, warmup, iterations, idx), wall, str(ort.__version__)


def _ort_events(events: list[dict[str, Any]], warmup: int, iterations: int,
                idx: GraphIndex) -> list[KernelTime]:
    """Kernel events of the timed runs (after the warm-up ones), summed per kernel."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) < warmup + iterations:
        raise StnDeployError("onnxruntime's profile lacks the timed runs")
    start = runs[warmup][0]
    by_length = sorted(idx.nodes, key=len, reverse=True)
    total: dict[str, float] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if e["ts"] < start:
            continue
        name = e["name"][:-len("_kernel_time")]
        total[name] = total.get(name, 0.0) + e["dur"] / 1000.0
        ops[name] = str((e.get("args") or {}).get("op_name", "?"))
    return [KernelTime(n, ops[n], ms / iterations, onnx_nodes_for(n, idx, by_length))
            for n, ms in total.items()]


def ov_kernels(path: Path, proto: "onnx.ModelProto", idx: GraphIndex, batch: int,
               iterations: int, warmup: int, threads: int) -> tuple[list[KernelTime], float, str]:
    """OpenVINO's CPU plugin, compiled as the ``openvino`` runner compiles (latency hint,
    the file's precision), with PERF_COUNT on."""
    from stn_deploy.artifacts import graph_precision
    from stn_deploy.backends.ov import compile_config, import_openvino

    ov = import_openvino()
    feed = _feed(proto, batch)
    core = ov.Core()
    try:
        model = core.read_model(str(path))
        model.reshape({k: list(v.shape) for k, v in feed.items()})
        config = {**compile_config("latency", threads, graph_precision(proto)), "PERF_COUNT": True}
        compiled = core.compile_model(model, "CPU", config)
    except Exception as e:  # OpenVINO raises RuntimeError subclasses with pages of text
        raise StnDeployError(f"openvino cannot compile {path}: {error_line(e)}") from None
    originals = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        originals[op.get_friendly_name()] = [n for n in names.split(",") if n]
    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer(feed)
    by_length = sorted(idx.nodes, key=len, reverse=True)
    total: dict[str, float] = {}
    ops: dict[str, str] = {}
    wall = 0.0
    for _ in range(iterations):
        start = time.perf_counter()
        request.infer(feed)
        wall += time.perf_counter() - start
        for p in request.get_profiling_info():
            if p.status != p.Status.EXECUTED:
                continue
            total[p.node_name] = total.get(p.node_name, 0.0) + p.real_time.total_seconds() * 1e3
            ops[p.node_name] = f"{p.node_type}:{p.exec_type}"
    kernels = []
    for name, ms in total.items():
        nodes: list[str] = []
        for original in originals.get(name, [name]):
            nodes += [n for n in onnx_nodes_for(original, idx, by_length) if n not in nodes]
        kernels.append(KernelTime(name, ops[name], ms / iterations, nodes))
    return kernels, wall * 1000 / iterations, str(ov.get_version())


def trt_kernels(plan: Path, proto: "onnx.ModelProto", idx: GraphIndex, batch: int,
                iterations: int, warmup: int, threads: int) -> tuple[list[KernelTime], float, str]:
    """TensorRT's per-layer times through an ``IProfiler``; layer names map to ONNX nodes
    (``A + B`` for fused layers). Written against the TensorRT 10/11 Python API, NOT RUN
    here (no GPU, no TensorRT)."""
    import torch

    from stn_deploy.tensorrt_env import check_plan_compatible, cuda_device, import_tensorrt

    trt = import_tensorrt()
    gpu, capability = cuda_device()
    check_plan_compatible(plan, trt, gpu, capability)
    times: dict[str, float] = defaultdict(float)

    class LayerTimes(trt.IProfiler):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.record = False

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            if self.record:
                times[layer_name] += ms

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    profiler = LayerTimes()
    context.profiler = profiler
    feed = _feed(proto, batch)
    buffers = _trt_buffers(trt, torch, engine, context, feed)
    stream = torch.cuda.Stream()
    wall = 0.0
    for i in range(warmup + iterations):
        profiler.record = i >= warmup
        start = time.perf_counter()
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        wall += (time.perf_counter() - start) if i >= warmup else 0.0
    del buffers
    by_length = sorted(idx.nodes, key=len, reverse=True)
    kernels = []
    for layer, ms in times.items():
        nodes: list[str] = []
        for part in layer.split(" + "):
            nodes += [n for n in onnx_nodes_for(part.strip(), idx, by_length) if n not in nodes]
        kernels.append(KernelTime(layer, "trt", ms / iterations, nodes))
    return kernels, wall * 1000 / iterations, str(trt.__version__)


def _trt_buffers(trt: Any, torch: Any, engine: Any, context: Any,
                 feed: dict[str, np.ndarray]) -> dict[str, Any]:
    from stn_deploy.debug.taps import _torch_dtype

    buffers: dict[str, Any] = {}
    for name, x in feed.items():
        buffers[name] = torch.from_numpy(x).cuda()
        context.set_input_shape(name, tuple(x.shape))
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = _torch_dtype(torch, trt, engine.get_tensor_dtype(name))
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype,
                                        device="cuda")
    for name, buf in buffers.items():
        context.set_tensor_address(name, buf.data_ptr())
    return buffers


KERNELS = {"onnxruntime": ort_kernels, "openvino": ov_kernels, "trt": trt_kernels}


def profile_model(path: str | os.PathLike[str], backend: str, batch_sizes: tuple[int, ...],
                  *, iterations: int = 20, warmup: int = 5, threads: int | None = None
                  ) -> ProfileReport:
    """Per-node and per-stage time of ``path`` on ``backend`` at each batch size."""
    from stn_deploy.artifacts import model_kind
    from stn_deploy.backends.base import available_cpus
    from stn_deploy.debug.inputs import load_model

    if backend not in KERNELS:
        raise StnDeployError(f"profile reads the profilers of {', '.join(PROFILERS)}; "
                             f"{backend} has none here")
    model = Path(path)
    kind = model_kind(model)
    if (kind == "plan") != (backend == "trt"):
        raise StnDeployError(f"backend {backend} cannot run {kind} files ({model})")
    if kind == "plan":
        from stn_deploy.debug.taps import plan_source_onnx, require_plan_runtime

        require_plan_runtime()
        source = plan_source_onnx(model, [])
    else:
        source = model
    proto = load_model(source)
    stages = assign_stages(proto)
    idx = GraphIndex(proto)
    threads = threads or available_cpus()
    report = ProfileReport(str(model), threads, "seeded random inputs of the graph's input "
                           "shape", [])
    for batch in batch_sizes:
        kernels, wall, version = KERNELS[backend](model, proto, idx, batch, iterations, warmup,
                                                  threads)
        stage_ms, nodes, unmapped = attribute(kernels, stages, idx)
        for k in kernels:
            k.stage = next((stages.stage[n] for n in k.nodes if n in stages.stage), "-")
        report.runs.append(ProfileRun(
            backend, version, batch, iterations, wall, sum(k.ms for k in kernels), stage_ms,
            nodes, sorted(kernels, key=lambda k: -k.ms), unmapped))
    return report
