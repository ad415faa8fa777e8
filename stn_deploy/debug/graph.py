"""One read of an ONNX graph's lookup tables (nodes by name, producers, consumers,
initializers), shared by compare, precision and profile so each looks a name up the same way.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx


class GraphIndex:
    def __init__(self, proto: "onnx.ModelProto") -> None:
        self.proto = proto
        graph = proto.graph
        self.nodes = {n.name: n for n in graph.node}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in graph.node:
            for t in n.input:
                if t:
                    self.consumers[t].append(n)
        self.inits = {i.name: i for i in graph.initializer}
        self.outputs = [o.name for o in graph.output]

    def array(self, name: str) -> np.ndarray | None:
        """An initializer's value, or a Constant node's (None: neither)."""
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def dequantized(self, dq: "onnx.NodeProto") -> tuple[np.ndarray, np.ndarray] | None:
        """(float value, per-element step) of a DequantizeLinear that reads a constant
        (a quantized weight); None for one that reads an activation."""
        q = self.array(dq.input[0])
        scale = self.array(dq.input[1])
        if q is None or scale is None:
            return None
        zp = self.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        step = scale.astype(np.float64).reshape(shape if scale.size > 1 else ())
        zero = 0.0 if zp is None else zp.astype(np.float64).reshape(
            shape if zp.size > 1 else ())
        return (q.astype(np.float64) - zero) * step, np.broadcast_to(step, q.shape)
