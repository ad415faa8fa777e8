"""Bring an ONNX graph down to a lower opset, one version at a time, for the ops we meet.

``onnx.version_converter`` fails on the dynamo exporter's graphs ("No Adapter To Version $17
for Pad") and the dynamo exporter itself writes opset 18 when asked for 16 (torch 2.14, measured). This
converter handles exactly the version changes that the STN's graphs can contain and refuses
everything else by name, so a converted file is either right or not written.

For each step ``s -> s-1`` a node needs attention only when its op's schema changed at ``s``
(``since_version == s``). Those nodes go through an adapter; a missing adapter is an error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx.defs
from onnx import helper, numpy_helper

from stn_deploy.errors import StnDeployError

_REDUCE_18 = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
              "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare")
# Version bumps that only widened type lists (float8, int4, bool...) the STN never uses.
_TYPES_ONLY = {
    19: ("Cast", "CastLike", "Constant", "Equal", "Identity", "Reshape", "Shape", "Size"),
    20: ("ConstantOfShape", "ReduceMax", "ReduceMin", "IsInf", "IsNaN"),
}

Adapter = Callable[[onnx.NodeProto, "_Graph"], None]


class _Graph:
    """Constant lookup for adapters that turn inputs into attributes."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.const_nodes.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_ints":
                    return np.asarray(list(a.ints), dtype=np.int64)
        return None


def _fail(node: onnx.NodeProto, step: int, why: str) -> StnDeployError:
    return StnDeployError(f"cannot convert {node.op_type} node '{node.name}' from opset {step} "
                          f"to {step - 1}: {why}")


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def _reduce_axes_to_attribute(node: onnx.NodeProto, g: _Graph) -> None:
    """Opset 18 moved Reduce* axes from an attribute to an optional input."""
    noop = _attr(node, "noop_with_empty_axes")
    if len(node.input) > 1 and node.input[1]:
        axes = g.constant(node.input[1])
        if axes is None:
            raise _fail(node, 18, "its axes are computed at run time, not a constant")
        if axes.size == 0 and noop is not None and noop.i:
            raise _fail(node, 18, "noop_with_empty_axes=1 with empty axes has no older form")
        del node.input[1:]
        if axes.size:
            node.attribute.append(helper.make_attribute("axes", [int(v) for v in axes.ravel()]))
    elif noop is not None and noop.i:
        raise _fail(node, 18, "noop_with_empty_axes=1 has no older form")
    if noop is not None:
        node.attribute.remove(noop)


def _pad_18(node: onnx.NodeProto, g: _Graph) -> None:
    """Opset 18 added Pad's optional ``axes`` input; without it the op is unchanged."""
    if len(node.input) > 3 and node.input[3]:
        raise _fail(node, 18, "it uses the axes input, which opset 17 lacks")
    del node.input[3:]


def _pad_19(node: onnx.NodeProto, g: _Graph) -> None:
    mode = _attr(node, "mode")
    if mode is not None and mode.s == b"wrap":
        raise _fail(node, 19, "mode 'wrap' does not exist before opset 19")


def _split_18(node: onnx.NodeProto, g: _Graph) -> None:
    if _attr(node, "num_outputs") is not None:
        raise _fail(node, 18, "num_outputs needs static split sizes to convert")


def _resize_18(node: onnx.NodeProto, g: _Graph) -> None:
    anti = _attr(node, "antialias")
    if anti is not None and anti.i:
        raise _fail(node, 18, "antialias=1 does not exist before opset 18")
    if _attr(node, "axes") is not None:
        raise _fail(node, 18, "the axes attribute does not exist before opset 18")
    policy = _attr(node, "keep_aspect_ratio_policy")
    if policy is not None and policy.s != b"stretch":
        raise _fail(node, 18, "keep_aspect_ratio_policy does not exist before opset 18")
    for a in (anti, policy):
        if a is not None:
            node.attribute.remove(a)


def _resize_19(node: onnx.NodeProto, g: _Graph) -> None:
    mode = _attr(node, "coordinate_transformation_mode")
    if mode is not None and mode.s == b"half_pixel_symmetric":
        raise _fail(node, 19, "half_pixel_symmetric does not exist before opset 19")


def _average_pool_19(node: onnx.NodeProto, g: _Graph) -> None:
    dil = _attr(node, "dilations")
    if dil is not None:
        if any(v != 1 for v in dil.ints):
            raise _fail(node, 19, "dilations do not exist before opset 19")
        node.attribute.remove(dil)


def _grid_sample_20(node: onnx.NodeProto, g: _Graph) -> None:
    """Opset 20 renamed the modes (bilinear -> linear, bicubic -> cubic) and allowed N-D."""
    mode = _attr(node, "mode")
    if mode is not None:
        mode.s = {b"linear": b"bilinear", b"cubic": b"bicubic"}.get(mode.s, mode.s)


def _no_change(node: onnx.NodeProto, g: _Graph) -> None:
    return None


ADAPTERS: dict[tuple[str, int], Adapter] = {
    **{(op, 18): _reduce_axes_to_attribute for op in _REDUCE_18},
    ("Pad", 18): _pad_18,
    ("Pad", 19): _pad_19,
    ("Split", 18): _split_18,
    ("Resize", 18): _resize_18,
    ("Resize", 19): _resize_19,
    ("AveragePool", 19): _average_pool_19,
    ("GridSample", 20): _grid_sample_20,
    **{(op, step): _no_change for step, ops in _TYPES_ONLY.items() for op in ops},
}


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    raise StnDeployError("the graph imports no default-domain opset")


def downconvert(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """A copy of ``model`` at opset ``target`` (at most its own), or StnDeployError naming the
    first node that cannot go down. GridSample 4-D graphs from opset 20 come out with the
    opset-16 mode names, which is what TensorRT's parser reads correctly."""
    source = default_opset(model)
    if target > source:
        raise StnDeployError(f"downconvert goes down only: the graph is opset {source}, "
                             f"asked for {target}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if out.functions:
        raise StnDeployError("cannot convert a graph with local functions; inline them first")
    g = _Graph(out.graph)
    for node in out.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute) and target < source:
            raise StnDeployError(f"cannot convert {node.op_type} node '{node.name}': "
                                 "subgraphs are not handled")
    for step in range(source, target, -1):
        for node in out.graph.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                since = onnx.defs.get_schema(node.op_type, step, "").since_version
            except onnx.defs.SchemaError:
                raise StnDeployError(f"unknown op {node.op_type} at opset {step}") from None
            if since != step:
                continue
            try:
                onnx.defs.get_schema(node.op_type, step - 1, "")
            except onnx.defs.SchemaError:
                raise _fail(node, step, f"{node.op_type} does not exist before opset "
                                        f"{step}") from None
            adapter = ADAPTERS.get((node.op_type, step))
            if adapter is None:
                raise _fail(node, step, "no adapter for this version change")
            adapter(node, g)
    for op in out.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = target
    _drop_unused_constants(out.graph)
    return out


def _drop_unused_constants(graph: onnx.GraphProto) -> None:
    """Axes that became attributes leave their constants behind; ORT warns about them."""
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for n in dead:
        graph.node.remove(n)
