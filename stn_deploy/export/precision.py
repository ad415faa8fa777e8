"""FP16 and INT8 (QDQ) variants of a verified FP32 ONNX graph.

The STN path (every node feeding GridSample's grid input, and GridSample) stays FP32 in both:
theta decides where every output pixel samples from, so a small theta error moves the whole
image. Measured on CIFAR-10 (JPEG copy) before this module was written: INT8 with the STN
path in float gave 98.9% top-1 agreement with FP32 against 97.7% fully quantized, and ran
faster on ONNX Runtime and OpenVINO.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError, require
from stn_deploy.fileio import atomic_path


def name_nodes(model: onnx.ModelProto) -> None:
    """Block lists work by node name; the exporters leave some empty. The same rule as
    ``debug.stages.ensure_node_names``, so a ``debug precision`` list names these nodes."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def stn_path_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of GridSample nodes and every node upstream of their grid input."""
    producer = {out: node for node in model.graph.node for out in node.output}
    keep: list[str] = []
    seen: set[str] = set()
    stack = [n.input[1] for n in model.graph.node if n.op_type == "GridSample"]
    keep.extend(n.name for n in model.graph.node if n.op_type == "GridSample")
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        keep.append(node.name)
        stack.extend(i for i in node.input if i)
    return keep


# OpenVINO's key for "keep this node out of reduced float precision" (disable_fp16_compression;
# save_model writes it as the IR attribute DisablePrecisionConversion). Its CPU plugin honours it
# for bf16 as well as f16: measured with OpenVINO 2026.4.1 on an AMD EPYC Zen 4 (AVX512_BF16).
OV_PRECISE = "precise_0"


def mark_stn_path_precise(model: Any) -> int:
    """Mark the STN path of an OpenVINO model (GridSample and every node upstream of its grid
    input: the rule of ``stn_path_nodes``, on OpenVINO's graph) as precision-sensitive, so a
    CPU that computes the IR in bf16 computes the classifier in bf16 and the STN path, like
    FP16 and INT8 files do, in f32. Returns how many nodes were marked.

    Why: bf16 keeps 8 significant bits, and unmarked OpenVINO also rounds the grid itself to
    bf16 before sampling. On ``cifar10-stn`` (CIFAR-10 (JPEG copy) test split, Zen 4) that moved
    the worst image's sampling points by 0.13 px, against 0.044 px with the STN path in f32.
    The plugin still runs the regressor's fully connected layers and the max pools in bf16
    (it drops the mark where it fuses them), hence the 0.044 px."""
    marked = [op for op in model.get_ordered_ops() if op.get_type_name() == "GridSample"]
    stack = [op.input_value(1).get_node() for op in marked]
    seen = {op.get_friendly_name() for op in marked}
    while stack:
        op = stack.pop()
        if op.get_friendly_name() in seen or op.get_type_name() in ("Parameter", "Constant"):
            continue
        seen.add(op.get_friendly_name())
        marked.append(op)
        stack.extend(v.get_node() for v in op.input_values())
    for op in marked:
        op.get_rt_info()[OV_PRECISE] = ""
    return len(marked)


def _copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto, precision: str) -> None:
    from stn_deploy.artifacts import metadata, set_metadata

    set_metadata(dst, {**metadata(src), "precision": precision})


def convert_fp16(src: Path, dst: Path, keep_float: Sequence[str] = ()) -> Path:
    """FP16 graph with float32 inputs/outputs and the STN path, and ``keep_float``'s nodes
    (named as ``name_nodes`` names them), in FP32."""
    float16 = require("onnxconverter_common.float16", "pip install onnxconverter-common",
                      package="onnxconverter-common")
    model = onnx.load(str(src))
    name_nodes(model)
    check_keep_float(model, keep_float)
    block = sorted({*stn_path_nodes(model), *keep_float})
    # Stale intermediate types confuse the converter at the FP32/FP16 borders; re-infer after.
    del model.graph.value_info[:]
    io_types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    half = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=block)
    fix_blocked_casts(half, set(block))
    for out in half.graph.output:  # keep_io_types: every output stays as it was
        out.type.tensor_type.elem_type = io_types[out.name]
    del half.graph.value_info[:]
    half = onnx.shape_inference.infer_shapes(half, check_type=True, strict_mode=True)
    _copy_metadata(model, half, "fp16")
    onnx.checker.check_model(half, full_check=True)
    with atomic_path(dst) as tmp:
        onnx.save(half, str(tmp))
    return Path(dst)


def fix_blocked_casts(model: onnx.ModelProto, blocked: set[str]) -> None:
    """Undo two converter slips at FP32 nodes (onnxconverter-common 1.14-1.16): it casts a
    graph output made by a blocked node to FP16 (ONNX Runtime then refuses to load the
    file, with ``--with-theta``), and round-trips blocked constants through FP16 (losing grid precision).
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    outputs = {o.name for o in model.graph.output}
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def to(node: onnx.NodeProto) -> onnx.AttributeProto:
        return next(a for a in node.attribute if a.name == "to")

    def from_blocked(name: str) -> bool:
        src = producer.get(name)
        return src is not None and src.name in blocked

    for node in model.graph.node:
        if node.op_type != "Cast":
            continue
        if node.output[0] in outputs and to(node).i == fp16 and from_blocked(node.input[0]):
            to(node).i = fp32
        first = producer.get(node.input[0])
        if (to(node).i == fp32 and first is not None and first.op_type == "Cast"
                and to(first).i == fp16 and from_blocked(first.input[0])):
            node.op_type = "Identity"
            node.input[0] = first.input[0]
            del node.attribute[:]
    used = {i for n in model.graph.node for i in n.input} | outputs
    dead = [n for n in model.graph.node if n.op_type == "Cast" and n.output[0] not in used]
    for n in dead:
        model.graph.node.remove(n)


def _input_is_uint8(model: onnx.ModelProto) -> bool:
    return model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def weights_need_7_bits(isa: Sequence[str] | None = None) -> bool:
    """True on x86 CPUs without VNNI (``harness.cpu_isa``). Without VNNI, ONNX Runtime's
    INT8 convolutions multiply pairs of 8-bit values into a saturating 16-bit sum
    (VPMADDUBSW); with full-range weights a digits model trained here lost 40 points of
    accuracy to that saturation once ONNX Runtime fused the QDQ graph (unfused: 98.9%
    agreement), and 7 bits gave 99.1%. VNNI (VPDPBUSD) sums into 32 bits and cannot
    saturate, so there the eighth bit is free precision. Decided on the exporting CPU: a file
    for a VNNI server exported on an older laptop keeps 7 bits (safe everywhere)."""
    from stn_deploy.harness import cpu_isa

    return "VNNI" not in (cpu_isa() if isa is None else isa)


# Activation ranges: this percentile of |activation| over the calibration images, not the
# maximum (MinMax). Measured on the shipped cifar10-stn, 7-bit weights (no VNNI), STN path
# float, per-channel, 500 calibration images: over six disjoint draws of training images,
# top-1 agreement with FP32 on 5,000 other training images was 98.36-98.82% (mean 98.59) with
# MinMax and 98.68-99.00% (mean 98.83) with this percentile, never lower on the same draw
# (+0.24 points on average); on the 10,000 test images 98.37-98.68% against 98.63-98.75%,
# accuracy drop 0.06-0.19 points. MinMax sets each range from the one largest activation the
# draw happens to contain; 99.99 gave less (98.76 where 99.999 gave 99.00), entropy nothing.
CALIB_PERCENTILE = 99.999


def quantize_int8(src: Path, dst: Path, calib_images: torch.Tensor, config: ModelConfig, *,
                  per_channel: bool = True, keep_stn_float: bool = True,
                  reduce_range: bool | None = None, keep_float: Sequence[str] = ()) -> Path:
    """Static QDQ INT8, calibrated on real images (``CALIB_PERCENTILE``); symmetric (zero point
    0) as TensorRT needs.

    Weights use 7 bits (``reduce_range``) where the CPU lacks VNNI, 8 where it has it
    (None: decided here by ``weights_need_7_bits``). ``keep_float``: more nodes left in
    float, named as ``name_nodes`` names them.

    ``calib_images`` are uint8 NCHW; a graph with embedded preprocessing gets them as uint8
    NHWC, otherwise normalised exactly as in training."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if calib_images.dtype != torch.uint8 or calib_images.dim() != 4:
        raise StnDeployError("calibration images must be uint8 NCHW")
    if len(calib_images) == 0:
        raise StnDeployError("no calibration images")
    model = onnx.load(str(src))
    name_nodes(model)
    check_keep_float(model, keep_float)
    exclude = sorted({*(stn_path_nodes(model) if keep_stn_float else []), *keep_float})
    seven = weights_need_7_bits() if reduce_range is None else reduce_range

    with tempfile.TemporaryDirectory() as work, atomic_path(dst) as tmp:
        named = Path(work) / "named.onnx"
        onnx.save(model, str(named))
        # The percentile calibrator prints its progress on stdout: the export's is its own
        # (and may be --json -).
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(named), str(tmp), _calibration_reader(model, calib_images, config),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                per_channel=per_channel, reduce_range=seven,
                calibrate_method=CalibrationMethod.Percentile,
                nodes_to_exclude=exclude,
                # Biases stay float: TensorRT's DequantizeLinear takes no INT32 input.
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "QuantizeBias": False, "CalibPercentile": CALIB_PERCENTILE},
            )
        q = onnx.load(str(tmp))
        if keep_float:  # an excluded node still reads a QDQ'd tensor another node needs
            float_inputs(q, keep_float, model)
        _copy_metadata(model, q, "int8")
        onnx.save(q, str(tmp))
    return Path(dst)


def _calibration_reader(model: onnx.ModelProto, calib_images: torch.Tensor,
                        config: ModelConfig) -> Any:
    """ONNX Runtime's calibration input: ``calib_images`` (uint8 NCHW) in the graph's static
    batch, else one image a batch (the percentile calibrator stacks every batch's activations
    into one array, so the batches must be of one size), as uint8 NHWC for a graph with
    embedded preprocessing, else normalised exactly as in training."""
    from onnxruntime.quantization import CalibrationDataReader

    from stn_deploy.data import normalize

    embed = _input_is_uint8(model)
    input_name = model.graph.input[0].name
    static = model.graph.input[0].type.tensor_type.shape.dim[0]
    step = static.dim_value if static.HasField("dim_value") else 1
    last = len(calib_images) - step + 1 if static.HasField("dim_value") else len(calib_images)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, last, step))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            if start is None:
                return None
            chunk = calib_images[start:start + step]
            x = chunk.permute(0, 2, 3, 1).contiguous() if embed else normalize(chunk, config)
            return {input_name: x.numpy()}

    return Reader()


def count_qdq(path: str | os.PathLike[str]) -> int:
    model = onnx.load(str(path))
    return sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")


# ------------------------------------------------------------------------- keep-float lists

def read_keep_float(source: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Node names to keep in float: the JSON ``debug precision --json`` writes (its
    ``keep_float`` list), a JSON list of names, or the names themselves."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise StnDeployError(f"cannot read {path}: {e.strerror or e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StnDeployError(f"{path} is not valid JSON ({e})") from None
        names = data.get("keep_float") if isinstance(data, dict) else data
        where = str(path)
    else:
        names, where = list(source), "the keep-float list"
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise StnDeployError(f"{where}: expected a list of node names, or the JSON "
                             "'debug precision' writes ({\"keep_float\": [...]})")
    return list(dict.fromkeys(names))


def unknown_nodes(model: onnx.ModelProto, names: Sequence[str]) -> list[str]:
    """The names in ``names`` that no node of ``model`` has (after ``name_nodes``)."""
    have = {n.name for n in model.graph.node}
    return [n for n in names if n not in have]


def check_keep_float(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """One line naming the nodes a keep-float list names that the graph does not have."""
    unknown = unknown_nodes(model, names)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8
                                          else "")
        raise StnDeployError(f"not in the graph: {shown} (was the list made for this model, "
                             "at this opset and exporter?)")


def float_inputs(q: onnx.ModelProto, keep: Sequence[str], fp32: onnx.ModelProto) -> None:
    """Make the ``keep`` nodes of the QDQ graph ``q`` read float: an input from a
    QuantizeLinear/DequantizeLinear pair reads the tensor before the pair, a quantized weight
    is replaced by the FP32 graph's (the same node's same input there). A quantizer leaves
    its excluded nodes reading a tensor it quantized for another consumer."""
    from onnx import numpy_helper

    producer = {o: n for n in q.graph.node for o in n.output}
    source = {n.name: n for n in fp32.graph.node}
    weights = {t.name: t for t in fp32.graph.initializer}
    have = {t.name for t in q.graph.initializer}
    for node in q.graph.node:
        if node.name not in keep or node.name not in source:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            qnode = producer.get(dq.input[0])
            original = source[node.name].input[i] if i < len(source[node.name].input) else ""
            if qnode is not None and qnode.op_type == "QuantizeLinear":
                node.input[i] = qnode.input[0]
            elif original in weights:
                if original not in have:
                    q.graph.initializer.append(numpy_helper.from_array(
                        numpy_helper.to_array(weights[original]), original))
                    have.add(original)
                node.input[i] = original
    prune_dead(q)


def prune_dead(model: onnx.ModelProto) -> None:
    """Nodes whose outputs nobody reads, and initializers nobody uses, removed."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {t for n in model.graph.node for t in n.input} | outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {t for n in model.graph.node for t in n.input} | outputs
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
