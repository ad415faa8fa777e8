"""Which part of a spatial transformer each ONNX node belongs to.

Users of general tools get "node 143 diverges"; an STN user needs to know *which part of the
transformer* went wrong, because each part fails differently and has its own fix:

- ``localization``: the small CNN that looks at the image to regress theta (upstream of theta,
  feeding only the STN path);
- ``theta``: the regressor's last Gemm/MatMul and the reshape to the (N, 2, 3) affine matrix,
  with whatever still computes those six numbers (a multi-pass STN composes thetas here);
- ``grid``: from theta to GridSample's grid input (the base grid times theta, AffineGrid);
- ``sampler``: GridSample itself;
- ``classifier``: everything downstream of GridSample.

One more stage, ``input``, holds nodes that feed both the localization net and the image the
sampler reads (preprocessing embedded in the graph): a fault there moves both, so it belongs to
neither. QuantizeLinear/DequantizeLinear/Cast/Identity nodes that precision variants insert
take the stage of the node they come from (or, for weights and graph inputs, of the node they
feed), so a QDQ or FP16 graph maps exactly like its FP32 source.

Works on any ONNX graph with GridSample, not only ours: the STN path is found from
GridSample's grid input (``stn_deploy.export.precision.stn_path_nodes``, the same set the
precision variants keep in float) and theta by its shape, six numbers a sample, not by name.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stn_deploy.errors import StnDeployError

if TYPE_CHECKING:
    import onnx

STAGES = ("input", "localization", "theta", "grid", "sampler", "classifier")
PASS_THROUGH = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast", "CastLike",
                          "Identity"})
# Ops that only move theta's six numbers around; used where shapes are unknown.
_SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat",
                        "Slice", "Split", "Gather", "Add", "Mul", "Sub"}) | PASS_THROUGH
_LINEAR_OPS = frozenset({"Gemm", "MatMul"})
THETA_ELEMENTS = 6


@dataclass
class StageMap:
    """Node name -> stage, in topological order, with the tensors the stages meet at."""

    stage: dict[str, str]  # every node, topological order
    op_type: dict[str, str]
    theta_tensors: list[str] = field(default_factory=list)  # (N, 2, 3) tensors, one a sampler
    grid_tensors: list[str] = field(default_factory=list)  # GridSample grid inputs
    notes: list[str] = field(default_factory=list)  # what could not be told apart

    @property
    def order(self) -> list[str]:
        return list(self.stage)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STAGES}
        for s in self.stage.values():
            out[s] += 1
        return {s: n for s, n in out.items() if n}

    def nodes_in(self, *stages: str) -> list[str]:
        return [n for n, s in self.stage.items() if s in stages]


def ensure_node_names(model: "onnx.ModelProto") -> None:
    """Give unnamed and duplicate nodes the name ``<op>_<index>``, the rule the precision
    exporter applies before quantizing, so keep-float lists name the same nodes in both."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def topological(nodes: Iterable["onnx.NodeProto"]) -> list["onnx.NodeProto"]:
    """Nodes in an order where every producer comes before its consumers (stable: the file's
    order where it already is one, as ONNX requires)."""
    nodes = list(nodes)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    waiting = [0] * len(nodes)
    consumers: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        deps = {producer[t] for t in n.input if t in producer and producer[t] != i}
        waiting[i] = len(deps)
        for d in deps:
            consumers[d].append(i)
    ready = deque(i for i, w in enumerate(waiting) if w == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for c in sorted(consumers[i]):
            waiting[c] -= 1
            if waiting[c] == 0:
                ready.append(c)
    if len(order) != len(nodes):
        raise StnDeployError("the graph has a cycle: it is not a valid ONNX graph")
    return [nodes[i] for i in order]


def tensor_shapes(model: "onnx.ModelProto") -> dict[str, list[int | None]]:
    """Every tensor's shape as far as ONNX shape inference knows it (None: unknown dim)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a foreign graph with ops shape inference does not know
        inferred = model
    shapes: dict[str, list[int | None]] = {}
    graph = inferred.graph
    for v in [*graph.input, *graph.value_info, *graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None
                              for d in t.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def per_sample(shape: list[int | None] | None) -> int | None:
    """Elements per sample of a batched tensor (None when unknown or not batched)."""
    if not shape or len(shape) < 2 or any(d is None for d in shape[1:]):
        return None
    n = 1
    for d in shape[1:]:
        n *= int(d)  # type: ignore[arg-type]
    return n


def _is_theta_shape(shape: list[int | None] | None) -> bool:
    return bool(shape) and len(shape) == 3 and shape[1:] == [2, 3]  # type: ignore[index]


def _upstream(start: Iterable[str], producer: dict[str, "onnx.NodeProto"],
              stop: frozenset[str] | set[str] = frozenset()) -> list["onnx.NodeProto"]:
    """Nodes that produce ``start`` tensors, transitively, not walking past ``stop`` tensors."""
    seen: dict[str, onnx.NodeProto] = {}
    stack = [t for t in start if t not in stop]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen[node.name] = node
        stack.extend(t for t in node.input if t and t not in stop)
    return list(seen.values())


def _find_theta(grid_input: str, producer: dict[str, "onnx.NodeProto"],
                shapes: dict[str, list[int | None]], constant: set[str]) -> str | None:
    """The nearest (N, 2, 3) tensor upstream of a grid input, breadth first, through
    non-constant inputs only (the base grid is a constant, theta is not)."""
    queue, seen = deque([grid_input]), set()
    while queue:
        t = queue.popleft()
        if t in seen or t in constant:
            continue
        seen.add(t)
        if _is_theta_shape(shapes.get(t)):
            return t
        node = producer.get(t)
        if node is not None and node.op_type != "GridSample":
            queue.extend(i for i in node.input if i)
    return None


def _theta_nodes(theta: str, producer: dict[str, "onnx.NodeProto"],
                 shapes: dict[str, list[int | None]], constant: set[str]) -> set[str]:
    """Nodes computing theta's six numbers: walking back from theta while a node's output is
    at most six numbers a sample (the regressor's last Gemm is; its hidden layer is not).
    Where shapes are unknown, shape-moving ops and the first Gemm/MatMul count."""
    out: set[str] = set()
    stack = [(theta, False)]
    while stack:
        t, passed_linear = stack.pop()
        node = producer.get(t)
        if node is None or node.name in out:
            continue
        size = per_sample(shapes.get(t))
        if t in constant:
            ok = True
        elif size is not None:
            ok = size <= THETA_ELEMENTS
        else:
            ok = not passed_linear and (node.op_type in _SHAPE_OPS | _LINEAR_OPS)
        if not ok:
            continue
        out.add(node.name)
        linear = passed_linear or node.op_type in _LINEAR_OPS
        stack.extend((i, linear) for i in node.input if i)
    return out


def assign_stages(model: "onnx.ModelProto") -> StageMap:
    """The stage of every node of ``model`` (names are given to unnamed nodes first)."""
    from stn_deploy.export.precision import stn_path_nodes

    ensure_node_names(model)
    graph = model.graph
    nodes = topological(graph.node)
    samplers = [n for n in nodes if n.op_type == "GridSample"]
    if not samplers:
        raise StnDeployError("the graph has no GridSample node: it is not a spatial "
                             "transformer (nothing to map to STN stages)")
    producer = {out: n for n in nodes for out in n.output if out}
    shapes = tensor_shapes(model)
    constant = {i.name for i in graph.initializer} | {
        o for n in nodes if n.op_type == "Constant" for o in n.output}
    stn = set(stn_path_nodes(model))
    sampler_names = {n.name for n in samplers}
    grid_inputs = [n.input[1] for n in samplers]
    image_inputs = [n.input[0] for n in samplers]

    smap = StageMap(stage={}, op_type={n.name: n.op_type for n in nodes},
                    grid_tensors=grid_inputs)
    theta_nodes: set[str] = set()
    grid_nodes: set[str] = set()
    for g in grid_inputs:
        theta = _find_theta(g, producer, shapes, constant)
        if theta is None:
            smap.notes.append(f"no (N, 2, 3) theta tensor feeds the grid {g}: the nodes "
                              "before it count as localization")
            continue
        smap.theta_tensors.append(theta)
        theta_nodes |= _theta_nodes(theta, producer, shapes, constant)
        stop = {theta} | {o for n in samplers for o in n.output}
        grid_nodes |= {n.name for n in _upstream([g], producer, stop)}
    grid_nodes -= theta_nodes | sampler_names
    shared = {n.name for n in _upstream(image_inputs, producer)}

    for n in nodes:
        if n.name in sampler_names:
            stage = "sampler"
        elif n.name in theta_nodes:
            stage = "theta"
        elif n.name in grid_nodes:
            stage = "grid"
        elif n.name in shared:
            stage = "input"
        elif n.name in stn:
            stage = "localization"
        else:
            stage = "classifier"
        smap.stage[n.name] = stage
    _settle_pass_through(nodes, producer, constant, smap)
    return smap


def _settle_pass_through(nodes: list["onnx.NodeProto"], producer: dict[str, "onnx.NodeProto"],
                         constant: set[str], smap: StageMap) -> None:
    """Q/DQ/Cast/Identity (and Constant) nodes take the stage of the real node they come
    from; those that start at a weight, a constant or a graph input take the stage of the
    real nodes they feed (the earliest stage when those differ)."""
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in nodes:
        for t in n.input:
            consumers[t].append(n)
    movable = {n.name for n in nodes if n.op_type in PASS_THROUGH or n.op_type == "Constant"}

    def source(node: "onnx.NodeProto") -> str | None:
        seen = set()
        while node.name in movable and node.name not in seen:
            seen.add(node.name)
            first = next((t for t in node.input if t), None)
            up = producer.get(first) if first else None
            if up is None:
                return None
            node = up
        return None if node.name in movable else smap.stage[node.name]

    def sinks(node: "onnx.NodeProto") -> set[str]:
        found: set[str] = set()
        stack, seen = [node], set()
        while stack:
            cur = stack.pop()
            for out in cur.output:
                for c in consumers.get(out, []):
                    if c.name in seen:
                        continue
                    seen.add(c.name)
                    if c.name in movable:
                        stack.append(c)
                    else:
                        found.add(smap.stage[c.name])
        return found

    for n in nodes:
        if n.name not in movable:
            continue
        stage = source(n)
        if stage is None:
            fed = sinks(n)
            if fed:
                stage = min(fed, key=STAGES.index)
        if stage is not None:
            smap.stage[n.name] = stage
