"""What a target runtime will mishandle in an ONNX graph, found before building for it.

The rules are about silent failures first: TensorRT's ONNX parser reads opset-20 GridSample
``mode="linear"`` as nearest-neighbour without a word (NVIDIA/TensorRT#4646), which would
ship a model whose every warped pixel is wrong. Each finding says whether export can rewrite
the graph safely (``fixable``) or must refuse it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from stn_deploy.errors import StnDeployError
from stn_deploy.names import TRT, canonical

TARGETS = ("onnxruntime", "openvino", TRT)  # TensorRT's old spellings: stn_deploy.names
TENSORRT_MAX_OPSET = 20  # onnx-tensorrt operators.md: TensorRT 10.0 parses opsets 9..20
# Ops onnx-tensorrt's operators.md (TensorRT 10.x) marks "N".
TENSORRT_UNSUPPORTED = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr",
    "BitwiseXor", "CenterCropPad", "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger",
    "DFT", "Det", "DynamicQuantizeLinear", "ImageDecoder", "MatMulInteger", "MaxRoiPool",
    "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
    "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul",
    "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})
_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class Finding:
    severity: str  # "error": the runtime fails or silently computes something else
    rule: str  # short id, stable for tests and scripts
    node: str
    message: str
    fixable: bool = False  # export can rewrite the graph (to opset 19) to avoid it

    def line(self) -> str:
        fix = " [export rewrites this to opset 19]" if self.fixable else ""
        where = f" ({self.node})" if self.node else ""
        return f"{self.severity.upper()}: {self.rule}{where}: {self.message}{fix}"


def _opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an uninferable graph still gets the other rules
        inferred = model
    g = inferred.graph
    out: dict[str, int] = {}
    for v in [*g.input, *g.output, *g.value_info]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = len(t.shape.dim)
    return out


def _elem_type(model: onnx.ModelProto, name: str,
               inits: dict[str, onnx.TensorProto]) -> int | None:
    """The element type of a tensor fed by an initializer or a graph input (else None)."""
    if name in inits:
        return int(inits[name].data_type)
    for v in model.graph.input:
        if v.name == name:
            return int(v.type.tensor_type.elem_type)
    return None


def check_tensorrt(model: onnx.ModelProto) -> list[Finding]:
    findings: list[Finding] = []
    opset = _opset(model)
    if opset > TENSORRT_MAX_OPSET:
        findings.append(Finding("error", "opset", "", f"opset {opset} is above TensorRT 10's "
                                f"parser range (up to {TENSORRT_MAX_OPSET})"))
    ranks = _ranks(model)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            findings.append(Finding("error", "custom-op", node.name,
                                    f"{node.domain}::{node.op_type} needs a TensorRT plugin"))
            continue
        if node.op_type in TENSORRT_UNSUPPORTED:
            hint = " (export without --affine-grid-op)" if node.op_type == "AffineGrid" else ""
            findings.append(Finding("error", "unsupported-op", node.name,
                                    f"{node.op_type} is not supported by TensorRT's ONNX "
                                    f"parser{hint}"))
        if node.op_type.startswith("Reduce") and len(node.input) > 1 and node.input[1] \
                and node.input[1] not in inits:
            findings.append(Finding("error", "reduce-axes", node.name,
                                    f"{node.op_type} axes must be an initializer for TensorRT"))
        if node.op_type == "DequantizeLinear" and _elem_type(model, node.input[0], inits) == \
                onnx.TensorProto.INT32:
            findings.append(Finding("error", "int32-dequantize", node.name,
                                    "DequantizeLinear of an INT32 tensor (a quantized bias); "
                                    "TensorRT dequantizes INT8 (and FP8/INT4) only: quantize "
                                    "with biases left in float (QuantizeBias False)"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is not None and np.any(numpy_helper.to_array(zp) != 0):
                findings.append(Finding("error", "qdq-zero-point", node.name,
                                        "TensorRT needs symmetric quantization (zero point 0)"))
        if node.op_type == "GridSample":
            rank = ranks.get(node.input[0])
            if rank is not None and rank != 4:
                findings.append(Finding("error", "gridsample-rank", node.name,
                                        f"GridSample on a {rank}-D input; TensorRT supports "
                                        "4-D only"))
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"),
                        "linear" if opset >= 20 else "bilinear")
            if opset >= 20 and mode in ("linear", "cubic"):
                findings.append(Finding(
                    "error", "gridsample-mode", node.name,
                    f"opset-{opset} GridSample mode '{mode}' is read as nearest by TensorRT "
                    "(NVIDIA/TensorRT#4646)", fixable=rank in (None, 4)))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT64:
            values = numpy_helper.to_array(init)
            if values.size and (values.min() < _INT32.min or values.max() > _INT32.max):
                findings.append(Finding("error", "int64-range", init.name,
                                        "INT64 weights outside the INT32 range; TensorRT casts "
                                        "them down and would clamp"))
    n64 = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64)
    if n64:
        findings.append(Finding("warning", "int64-weights", "",
                                f"{n64} INT64 initializer(s) (shapes/axes) that TensorRT may "
                                "cast down to INT32; all fit"))
    return findings


def check_generic(model: onnx.ModelProto, target: str) -> list[Finding]:
    findings: list[Finding] = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx", "com.microsoft") or (
                node.domain == "com.microsoft" and target != "onnxruntime"):
            findings.append(Finding("error", "custom-op", node.name,
                                    f"{node.domain}::{node.op_type} is not a standard op"))
    return findings


def canonical_target(target: str) -> str:
    """``target`` as TARGETS spells it (``tensorrt`` -> ``trt``), or one line naming them."""
    name = canonical(target)
    if name not in TARGETS:
        raise StnDeployError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    return name


def check_target(model: onnx.ModelProto | str | os.PathLike[str], target: str) -> list[Finding]:
    """Findings for ``target``; errors first."""
    target = canonical_target(target)
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception as e:  # protobuf decode errors have no common base
            raise StnDeployError(f"{model} is not a readable ONNX file ({e})") from None
    found = check_tensorrt(model) if target == "trt" else check_generic(model, target)
    return sorted(found, key=lambda f: f.severity != "error")


def make_safe(model: onnx.ModelProto, target: str) -> tuple[onnx.ModelProto, list[str]]:
    """Rewrite what can be rewritten (opset-20 GridSample -> opset 19), refuse the rest.

    Returns the graph to build from and a line per change made. Messages name the target as
    the caller spelled it."""
    from stn_deploy.export.downconvert import downconvert

    findings = check_target(model, target)
    errors = [f for f in findings if f.severity == "error"]
    if not errors:
        return model, []
    if all(f.fixable for f in errors):
        opset = _opset(model)
        safe = downconvert(model, 19)
        left = [f for f in check_target(safe, target) if f.severity == "error"]
        if left:
            raise StnDeployError(f"refusing the graph for {target}: {left[0].line()}")
        return safe, [f"rewrote opset {opset} -> 19 for {target}: GridSample mode "
                      "linear/cubic became bilinear/bicubic, which TensorRT reads correctly"]
    first = next(f for f in errors if not f.fixable)
    raise StnDeployError(f"refusing the graph for {target}: {first.line()}")
