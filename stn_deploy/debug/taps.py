"""Every intermediate tensor of a graph, read out of the runtime that runs it.

ONNX Runtime: a copy of the graph with every node output added as a graph output (Polygraphy's
``--onnx-outputs mark all``). TensorRT: a debug engine built from the plan's source ONNX with
every layer output marked (``--trt-outputs mark all``); a built plan cannot expose tensors it
fused away, so the plan itself is never opened for this.

Marking a tensor as an output keeps the runtime from fusing it away, so the marked run can
differ from the deployed one (an INT8 QDQ graph runs unfused). ``compare`` therefore also runs
the untouched graph and says when its outputs differ from the marked run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stn_deploy.errors import StnDeployError, error_line

if TYPE_CHECKING:
    import onnx


def tapped_model(proto: "onnx.ModelProto", names: list[str]) -> "onnx.ModelProto":
    """A copy of ``proto`` whose graph outputs also include ``names`` (typed where shape
    inference knows the type)."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    try:
        known = onnx.shape_inference.infer_shapes(model).graph.value_info
    except Exception:  # foreign ops: outputs go untyped, ONNX Runtime infers them
        known = []
    types = {v.name: v.type.tensor_type.elem_type for v in known}
    present = {o.name for o in model.graph.output}
    for name in names:
        if name in present:
            continue
        present.add(name)
        if types.get(name):
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
        else:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    return model


class OrtTaps:
    """An ONNX Runtime CPU session that returns ``names`` besides the graph's own outputs,
    with the same graph optimisations as the ``onnxruntime`` runner."""

    def __init__(self, proto: "onnx.ModelProto", names: list[str], label: str,
                 threads: int | None = None) -> None:
        from stn_deploy.backends.onnxrt import import_onnxruntime

        ort = import_onnxruntime()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        model = tapped_model(proto, names) if names else proto
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), so,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's Fail/InvalidGraph/NotImplemented share no base
            raise StnDeployError(f"onnxruntime cannot load {label}: {error_line(e)}") from None
        self.names = [o.name for o in self.session.get_outputs()]
        self.label = label

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(self.names, feed)
        except Exception as e:  # shape errors, kernel failures: one line, naming the file
            raise StnDeployError(f"onnxruntime failed to run {self.label}: "
                                 f"{error_line(e)}") from None
        return dict(zip(self.names, outs))


# ----------------------------------------------------------------------------------- TensorRT

def plan_source_onnx(plan: Path, candidates: list[Path]) -> Path:
    """The ONNX file a plan was built from (its sidecar records the sha256), among
    ``candidates`` and ``<plan>.onnx`` beside it; TensorRT needs it to mark layer outputs."""
    from stn_deploy.artifacts import read_sidecar
    from stn_deploy.fileio import sha256_file

    want = read_sidecar(plan)["onnx_sha256"]
    for path in [plan.with_suffix(".onnx"), *candidates]:
        if path.is_file() and path.suffix == ".onnx" and sha256_file(path) == want:
            return path
    raise StnDeployError(f"to mark layer outputs TensorRT rebuilds {plan.name} from its source "
                         f"ONNX (sha256 {want[:12]}...); put that file beside it as "
                         f"{plan.with_suffix('.onnx').name}")


class TrtTaps:
    """A TensorRT debug engine built from ``onnx_path`` at ``precision`` with every layer
    output in ``names`` marked as an engine output; ``run`` as ``OrtTaps.run``.

    Written against the TensorRT 10/11 Python API (``INetworkDefinition.mark_output``,
    ``build_serialized_network``, ``set_input_shape``, ``set_tensor_address``,
    ``execute_async_v3``); NOT RUN here (no GPU, no TensorRT). Buffers are torch CUDA tensors,
    as in the ``trt`` runner."""

    def __init__(self, onnx_path: Path, precision: str, names: list[str], label: str) -> None:
        import torch

        from stn_deploy.tensorrt_env import cuda_device, import_tensorrt, trt_major

        self.trt = import_tensorrt()
        cuda_device()
        self.torch = torch
        self.engine, self.input_name = _debug_engine(self.trt, trt_major(self.trt), onnx_path,
                                                     precision, set(names))
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.label = label

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, trt, engine, context = self.torch, self.trt, self.engine, self.context
        x = torch.from_numpy(feed[self.input_name]).cuda()
        context.set_input_shape(self.input_name, tuple(x.shape))
        buffers: dict[str, Any] = {self.input_name: x}
        for name in self.io:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(context.get_tensor_shape(name))
                dtype = _torch_dtype(torch, trt, engine.get_tensor_dtype(name))
                buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
        for name, buf in buffers.items():
            context.set_tensor_address(name, buf.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise StnDeployError(f"TensorRT failed to run the debug engine of {self.label}")
        self.stream.synchronize()
        return {k: v.float().cpu().numpy() for k, v in buffers.items() if k != self.input_name}


def _debug_engine(trt: Any, major: int, onnx_path: Path, precision: str,
                  names: set[str]) -> tuple[Any, str]:
    """Parse, mark every wanted layer output, build at the plan's precision, deserialize."""
    from stn_deploy.export.tensorrt import builder_config, parse_network

    builder, network, parser, settings = parse_network(trt, major, onnx_path=onnx_path,
                                                       precision=precision)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            tensor = layer.get_output(j)
            if tensor.name in names and not tensor.is_network_output:
                network.mark_output(tensor)
    config = builder_config(trt, builder, settings)
    inp = network.get_input(0)
    shape = tuple(inp.shape)
    if shape[0] == -1:
        from stn_deploy.debug.inputs import BATCH

        rest = shape[1:]
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (1, *rest), (BATCH, *rest), (BATCH, *rest))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    del parser  # it owns the weights the network points to: alive until the build is done
    if serialized is None:
        raise StnDeployError("TensorRT failed to build the debug engine (see its log above)")
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(serialized)
    return engine, inp.name


def _torch_dtype(torch: Any, trt: Any, dtype: Any) -> Any:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise StnDeployError(f"TensorRT output type {dtype} has no torch equivalent here")
    return table[dtype]


def require_plan_runtime() -> None:
    """One line when a plan cannot be debugged here (TensorRT or the GPU missing)."""
    from stn_deploy.tensorrt_env import cuda_device, import_tensorrt

    import_tensorrt()
    cuda_device()


__all__ = ["OrtTaps", "plan_source_onnx", "require_plan_runtime", "tapped_model",
           "TrtTaps"]
