"""``debug compare``: run a deployed form (SUSPECT) and its reference (REF) on the same inputs
with every intermediate tensor exposed, and name the first node that diverges, its STN stage,
and the likely fix.

Tensors are matched by node name first (the FP16 converter and the QDQ quantizer keep node
names and insert their own Cast/QuantizeLinear/DequantizeLinear nodes), then by tensor name
with the renames those tools make stripped. Per node: max absolute and relative error, cosine
similarity, and for theta, the grid and the sampler the displacement in pixels of the points
the sampler reads: the quantity an STN's error is felt in (a grid off by 0.5 px blurs every
image, whatever the logits' tolerance says).

A node diverges when it is beyond the bound for its kind, in topological order:
- theta, grid and sampler tensors: displacement above the precision's ``theta_px`` bound
  (``stn_deploy.export.verify.TOLERANCES``), the bound export's own theta check uses;
- every tensor: elementwise ``|d| <= atol + rtol * |ref|`` (the precision's atol/rtol, or
  ``--atol/--rtol``), or, where the precision has no elementwise bound (INT8), the relative
  L2 error ``||d|| / ||ref||`` above ``INT8_MAX_REL_L2`` (not the cosine similarity, which
  is blind to a tensor scaled as a whole: a weight 1.5x too large leaves its output's cosine
  at 0.9986).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stn_deploy.debug.graph import GraphIndex
from stn_deploy.debug.stages import PASS_THROUGH, StageMap, assign_stages, per_sample
from stn_deploy.errors import StnDeployError

if TYPE_CHECKING:
    import onnx

    from stn_deploy.debug.inputs import DebugInputs

# Measured on a digits model (3 epochs, 128 test images): every node of a correct INT8 QDQ
# graph stays below 0.058 relative L2 error to FP32 (fully quantized; 0.043 with the STN in
# float); a classifier weight scale 1.5x too large gives 0.50 at that node.
INT8_MAX_REL_L2 = 0.2
MIN_MATCHED = 0.5  # below this share of REF's nodes matched, the graphs are different networks
WEIGHT_REL = 1e-3  # FP16 rounds weights by <= 4.9e-4 of their value; more is another weight
COARSE_LEVELS = 32  # an INT8 activation scale giving fewer levels than this is suspicious
_RENAMES = [  # what QDQ and FP16 tools append to a tensor name, and what it was
    (re.compile(r"_(?:Dequantize|Quantize)Linear_(?:Output|Input)$"), ""),
    (re.compile(r"_quantized$"), ""),
    (re.compile(r"_output_cast_?(\d+)$"), r"_output_\1"),
    (re.compile(r"_input_cast_?(\d+)$"), r"_input_\1"),
    (re.compile(r"_cast$"), ""),
]
_MODES = {"bilinear": "linear", "linear": "linear", "bicubic": "cubic", "cubic": "cubic",
          "nearest": "nearest"}


def canonical(name: str) -> str:
    """A tensor name with the renames of QDQ quantizers and FP16 converters stripped."""
    prev = None
    while prev != name:
        prev = name
        for pattern, repl in _RENAMES:
            name = pattern.sub(repl, name)
    return name


@dataclass(frozen=True)
class Bounds:
    atol: float | None
    rtol: float | None
    max_rel_l2: float | None
    px: float
    source: str  # where they come from, printed with the result

    def text(self) -> str:
        parts = [f"|d| <= {self.atol:g} + {self.rtol or 0:g}*|ref|" if self.atol is not None
                 else f"||d||/||ref|| <= {self.max_rel_l2:g}",
                 f"theta/grid/sampler <= {self.px:g} px"]
        return f"{', '.join(parts)} ({self.source})"


def bounds_for(precision: str, atol: float | None, rtol: float | None) -> Bounds:
    from stn_deploy.export.verify import TOLERANCES

    tol = TOLERANCES.get(precision, TOLERANCES["fp32"])
    px = tol.theta_px if tol.theta_px is not None else 0.1
    if atol is not None or rtol is not None:
        return Bounds(atol or 0.0, rtol or 0.0, None, px, "--atol/--rtol")
    if tol.atol is not None:
        return Bounds(tol.atol, tol.rtol or 0.0, None, px, f"{precision} tolerances")
    return Bounds(None, None, INT8_MAX_REL_L2, px, f"{precision} tolerances")


@dataclass
class Pair:
    node: str
    op_type: str
    stage: str
    ref: str  # REF tensor
    sus: str  # SUSPECT tensor
    sus_node: str | None  # SUSPECT node of the same name (None: matched by tensor name)


@dataclass
class Row:
    node: str
    op_type: str
    stage: str
    tensor: str
    suspect_tensor: str
    max_abs: float
    max_rel: float  # elementwise |d| / max(|ref|, 1e-6)
    rel_l2: float  # ||d|| / ||ref|| over the whole tensor
    cosine: float
    displacement_px: float | None
    ref_absmax: float
    diverged: bool
    reason: str = ""
    jump: float = 0.0  # rel_l2 minus the largest rel_l2 among the node's inputs
    attributes: list[str] = field(default_factory=list)  # attributes that differ from REF's
    weights: list[str] = field(default_factory=list)  # weights that differ from REF's

    def to_dict(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ------------------------------------------------------------------------------ matching

def match_tensors(ref: "onnx.ModelProto", sus: "onnx.ModelProto", stages: StageMap
                  ) -> tuple[list[Pair], list[str], list[str]]:
    """(pairs in REF's topological order, REF nodes with no counterpart, SUSPECT nodes with
    none) -- inserted Q/DQ/Cast/Identity nodes are not counted as unmatched."""
    ref_nodes = {n.name: n for n in ref.graph.node}
    sus_nodes = {n.name: n for n in sus.graph.node}
    sus_producer = {o: n for n in sus.graph.node for o in n.output if o}
    by_canonical: dict[str, str] = {}
    for t, n in sus_producer.items():
        key = canonical(t)
        if key not in by_canonical or sus_producer[by_canonical[key]].op_type in PASS_THROUGH:
            by_canonical[key] = t
    pairs: list[Pair] = []
    unmatched: list[str] = []
    used: set[str] = set()
    for name in stages.order:
        node = ref_nodes[name]
        if node.op_type in PASS_THROUGH or node.op_type == "Constant":
            continue
        twin = sus_nodes.get(name)
        if twin is not None and twin.op_type != node.op_type:
            twin = None
        found = False
        for k, t in enumerate(node.output):
            if not t:
                continue
            s = twin.output[k] if twin is not None and k < len(twin.output) else None
            s = s or by_canonical.get(canonical(t))
            if s is None:
                continue
            pairs.append(Pair(name, node.op_type, stages.stage[name], t, s,
                              twin.name if twin is not None else None))
            used.add(sus_producer[s].name)
            found = True
        if not found:
            unmatched.append(f"{name} ({node.op_type})")
    extra = [f"{n.name} ({n.op_type})" for n in sus.graph.node
             if n.name not in used and n.name not in ref_nodes
             and n.op_type not in PASS_THROUGH and n.op_type != "Constant"]
    return pairs, unmatched, extra


def check_same_network(pairs: list[Pair], unmatched: list[str]) -> None:
    total = len({p.node for p in pairs}) + len(unmatched)
    if total == 0 or len({p.node for p in pairs}) < MIN_MATCHED * total:
        first = unmatched[0] if unmatched else "none"
        raise StnDeployError(f"SUSPECT and REF are different networks: only "
                             f"{len({p.node for p in pairs})} of {total} REF nodes have a "
                             f"counterpart by name (first missing: {first})")


# -------------------------------------------------------------------- attributes, weights

def attribute_differences(ref_node: "onnx.NodeProto", sus_node: "onnx.NodeProto") -> list[str]:
    """Plain attributes whose values differ (GridSample's opset-16 and opset-20 mode names
    count as the same)."""
    import onnx

    def values(node: onnx.NodeProto) -> dict[str, Any]:
        out = {}
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.GRAPH):
                continue
            v = onnx.helper.get_attribute_value(a)
            out[a.name] = v.decode() if isinstance(v, bytes) else v
        if node.op_type == "GridSample":
            out["mode"] = _MODES.get(str(out.get("mode", "linear")), out.get("mode"))
            out.setdefault("align_corners", 0)
            out.setdefault("padding_mode", "zeros")
        return out

    r, s = values(ref_node), values(sus_node)
    return [f"{k}={s[k]!r} (REF {r[k]!r})" for k in sorted(set(r) & set(s)) if r[k] != s[k]]


def weight_differences(ref: GraphIndex, sus: GraphIndex, ref_node: "onnx.NodeProto",
                       sus_node: "onnx.NodeProto") -> list[str]:
    """Weights of a matched node that are not REF's: beyond FP16 rounding for a float weight,
    beyond half a quantization step for an INT8 one."""
    out = []
    for i, name in enumerate(ref_node.input[:len(sus_node.input)]):
        w = ref.array(name) if name in ref.inits else None
        if w is None or not np.issubdtype(w.dtype, np.floating):
            continue
        w = w.astype(np.float64)
        s_name = sus_node.input[i]
        s = sus.array(s_name) if s_name in sus.inits else None
        dq = sus.producer.get(s_name)
        if s is not None and s.shape == w.shape:
            err = float(np.abs(s.astype(np.float64) - w).max())
            top = max(float(np.abs(w).max()), 1e-12)
            if err > WEIGHT_REL * top:
                out.append(f"{name}: max |d| {err:.3g} ({err / top:.2g} of its largest value)")
        elif dq is not None and dq.op_type == "DequantizeLinear":
            got = sus.dequantized(dq)
            if got is not None and got[0].shape == w.shape:
                steps = float((np.abs(got[0] - w) / np.maximum(got[1], 1e-30)).max())
                if steps > 0.51:
                    out.append(f"{name}: off by up to {steps:.3g} quantization steps")
    return out


def input_levels(ref_absmax: dict[str, float], sus: GraphIndex, sus_node: "onnx.NodeProto"
                 ) -> list[tuple[str, float, float]]:
    """(tensor, scale, levels) for each activation input of ``sus_node`` read through a
    QDQ pair: levels = REF's largest |value| of that tensor / the scale."""
    out = []
    for t in sus_node.input:
        dq = sus.producer.get(t)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in sus.producer:
            continue
        scale = sus.array(dq.input[1])
        source = canonical(t)
        if scale is None or source not in ref_absmax:
            continue
        step = float(np.max(scale))
        out.append((source, step, ref_absmax[source] / step if step > 0 else math.inf))
    return out


# ------------------------------------------------------------------------------ metrics

class _Acc:
    """Running per-tensor statistics over batches: elementwise work in float32 (both sides
    are float32 or narrower), sums accumulated in float64."""

    def __init__(self) -> None:
        self.max_abs = self.max_rel = self.ref_absmax = 0.0
        self.dot = self.ss = self.rr = self.dd = 0.0
        self.exceed = 0
        self.px: float | None = None
        self.nonfinite = False
        self.shape: str | None = None

    def add(self, r: np.ndarray, s: np.ndarray, bounds: Bounds) -> None:
        if r.shape != s.shape:
            self.shape = f"shape {list(s.shape)} (REF {list(r.shape)})"
            return
        rf = np.asarray(r, dtype=np.float32).ravel()
        sf = np.asarray(s, dtype=np.float32).ravel()
        if not rf.size:
            return
        finite = np.isfinite(sf)
        if not finite.all():
            if np.isfinite(rf[~finite]).any():
                self.nonfinite = True
            sf = np.where(finite, sf, np.float32(0.0))
        d = np.abs(sf - rf)
        ar = np.abs(rf)
        self.max_abs = max(self.max_abs, float(d.max()))
        self.max_rel = max(self.max_rel, float((d / np.maximum(ar, np.float32(1e-6))).max()))
        self.ref_absmax = max(self.ref_absmax, float(ar.max()))

        def total(x: np.ndarray) -> float:
            return float(np.add.reduce(x, dtype=np.float64))

        self.dot += total(rf * sf)
        self.ss += total(sf * sf)
        self.rr += total(rf * rf)
        self.dd += total(d * d)
        if bounds.atol is not None:
            self.exceed += int(np.count_nonzero(d > bounds.atol + (bounds.rtol or 0.0) * ar))

    def add_px(self, px: np.ndarray) -> None:
        if px.size:
            self.px = max(self.px or 0.0, float(px.max()))

    @property
    def rel_l2(self) -> float:
        """||s - r|| / ||r||: unlike the cosine, it sees a tensor scaled as a whole."""
        if self.rr == 0.0:
            return 0.0 if self.dd == 0.0 else math.inf
        return math.sqrt(self.dd / self.rr)

    @property
    def cosine(self) -> float:
        if self.rr == 0.0 and self.ss == 0.0:
            return 1.0
        if self.rr == 0.0 or self.ss == 0.0:
            return 0.0
        return self.dot / math.sqrt(self.rr * self.ss)


def theta_px(delta: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Per-image RMS shift of the sampling points a theta difference makes, in pixels
    (``health.displacement_px`` per axis, so non-square images scale x and y apart)."""
    from stn_deploy.health import displacement_px

    d = np.asarray(delta, dtype=np.float64).reshape(-1, 2, 3)
    x, y = d.copy(), d.copy()
    x[:, 1] = 0.0
    y[:, 0] = 0.0
    return np.hypot(displacement_px(x, hw[1]), displacement_px(y, hw[0]))


def sample_points(grid: np.ndarray, hw: tuple[int, int], align_corners: bool,
                  mode: str) -> np.ndarray:
    """Where a GridSample reads, in input pixels (N, points, 2); nearest rounds."""
    g = np.asarray(grid, dtype=np.float64).reshape(len(grid), -1, 2)
    size = np.array([hw[1], hw[0]], dtype=np.float64)
    p = (g + 1.0) / 2.0 * (size - 1.0) if align_corners else ((g + 1.0) * size - 1.0) / 2.0
    return np.rint(p) if mode == "nearest" else p


def points_px(ref_pts: np.ndarray, sus_pts: np.ndarray) -> np.ndarray:
    """Per-image RMS distance between two sets of sampling points."""
    return np.sqrt(((sus_pts - ref_pts) ** 2).sum(axis=2).mean(axis=1))


# ---------------------------------------------------------------------------- the report

@dataclass
class CompareReport:
    suspect: str
    reference: str
    precision: str
    inputs: str
    samples: int
    bounds: Bounds
    rows: list[Row]
    unmatched: list[str]
    only_in_suspect: list[str]
    notes: list[str] = field(default_factory=list)
    end_to_end: dict[str, Any] = field(default_factory=dict)
    fix: str | None = None

    @property
    def first(self) -> Row | None:
        return next((r for r in self.rows if r.diverged), None)

    @property
    def passed(self) -> bool:
        return self.first is None

    def stages(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in self.rows:
            s = out.setdefault(r.stage, {"nodes": 0, "diverged": 0, "min_cosine": 1.0,
                                         "max_rel_l2": 0.0, "max_px": None})
            s["nodes"] += 1
            s["diverged"] += int(r.diverged)
            s["min_cosine"] = min(s["min_cosine"], r.cosine)
            s["max_rel_l2"] = max(s["max_rel_l2"], _finite(r.rel_l2) or 0.0)
            if r.displacement_px is not None:
                s["max_px"] = max(s["max_px"] or 0.0, r.displacement_px)
        return out

    def to_dict(self) -> dict[str, Any]:
        first = self.first
        return {
            "suspect": self.suspect, "reference": self.reference, "precision": self.precision,
            "inputs": self.inputs, "samples": self.samples, "passed": self.passed,
            "tolerances": {**asdict(self.bounds), "text": self.bounds.text()},
            "first_divergent": None if first is None else {**first.to_dict(), "fix": self.fix},
            "stages": self.stages(), "end_to_end": self.end_to_end,
            "nodes": [r.to_dict() for r in self.rows],
            "unmatched": self.unmatched, "only_in_suspect": self.only_in_suspect,
            "notes": self.notes,
        }

    def lines(self, top: int = 12) -> list[str]:
        from stn_deploy.debug.report import compare_lines

        return compare_lines(self, top)


# ----------------------------------------------------------------------------- running

class Runs:
    """What runs SUSPECT: ``taps`` (marked run, ``OrtTaps`` or ``TrtTaps``) and ``plain``
    (the untouched graph as deployed; None where it cannot run here)."""

    def __init__(self, taps: Any, plain: Any) -> None:
        self.taps, self.plain = taps, plain


def compare_graphs(ref: "onnx.ModelProto", sus: "onnx.ModelProto", inputs: "DebugInputs",
                   bounds: Bounds, *, labels: tuple[str, str], precision: str,
                   runs: Callable[[list[str]], Runs] | None = None,
                   threads: int | None = None) -> CompareReport:
    """Compare ``sus`` against ``ref`` on ``inputs``. ``runs(names) -> Runs`` replaces ONNX
    Runtime for SUSPECT (a TensorRT debug engine)."""
    from stn_deploy.debug.stages import ensure_node_names
    from stn_deploy.debug.taps import OrtTaps

    stages = assign_stages(ref)
    ensure_node_names(sus)
    pairs, unmatched, extra = match_tensors(ref, sus, stages)
    check_same_network(pairs, unmatched)
    ref_taps = OrtTaps(ref, [p.ref for p in pairs], labels[1], threads)
    names = sorted({p.sus for p in pairs})
    sus_runs = runs(names) if runs is not None else Runs(
        OrtTaps(sus, names, labels[0], threads), OrtTaps(sus, [], labels[0], threads))
    walk = _Walk(ref, sus, pairs, bounds)
    end = _EndToEnd(ref, sus)
    for (ref_feed, n), (sus_feed, _) in zip(inputs.batches(ref), inputs.batches(sus)):
        ref_out = {k: v[:n] for k, v in {**ref_feed, **ref_taps.run(ref_feed)}.items()}
        sus_out = {k: v[:n] for k, v in sus_runs.taps.run(sus_feed).items()}
        walk.add(ref_out, sus_out)
        if sus_runs.plain is not None:
            end.add(ref_out, sus_out, {k: v[:n] for k, v in sus_runs.plain.run(sus_feed).items()})
    rows = [_row(p, walk.accs[i], bounds, walk.ref, walk.sus) for i, p in enumerate(pairs)]
    set_jumps(rows, walk.ref)
    report = CompareReport(labels[0], labels[1], precision, inputs.note, walk.count, bounds,
                           rows, unmatched, extra, notes=list(stages.notes))
    report.end_to_end, note = end.result()
    if note:
        report.notes.append(note)
    report.fix = suggest_fix(report, walk.sus)
    return report


class _Walk:
    """The statistics of every matched pair, batch by batch (nothing kept but the sums)."""

    def __init__(self, ref: "onnx.ModelProto", sus: "onnx.ModelProto", pairs: list[Pair],
                 bounds: Bounds) -> None:
        self.ref, self.sus = GraphIndex(ref), GraphIndex(sus)
        self.pairs, self.bounds = pairs, bounds
        self.accs = [_Acc() for _ in pairs]
        self.samplers = [n for n in ref.graph.node if n.op_type == "GridSample"]
        self.grid_pair = {p.ref: p.sus for p in pairs}
        self.count = 0

    def add(self, ref_out: dict[str, np.ndarray], sus_out: dict[str, np.ndarray]) -> None:
        hw = _image_hw(self.samplers[0], ref_out)
        for p, acc in zip(self.pairs, self.accs):
            if p.ref not in ref_out or p.sus not in sus_out:
                continue
            acc.add(ref_out[p.ref], sus_out[p.sus], self.bounds)
            px = _row_px(p, ref_out, sus_out, hw, self.samplers, self.sus.nodes, self.grid_pair)
            if px is not None:
                acc.add_px(px)
        self.count += len(next(iter(ref_out.values())))


def _image_hw(sampler: "onnx.NodeProto", tensors: dict[str, np.ndarray]) -> tuple[int, int]:
    image = tensors.get(sampler.input[0])
    if image is None or image.ndim != 4:
        raise StnDeployError(f"cannot read the image size GridSample {sampler.name} samples")
    return int(image.shape[2]), int(image.shape[3])


def _sampler_settings(node: "onnx.NodeProto") -> tuple[str, bool]:
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("mode", b"linear")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    return _MODES.get(mode, mode), bool(attrs.get("align_corners", 0))


def _row_px(p: Pair, ref_out: dict[str, np.ndarray], sus_out: dict[str, np.ndarray],
            hw: tuple[int, int], samplers: list["onnx.NodeProto"],
            sus_nodes: dict[str, "onnx.NodeProto"], grid_pair: dict[str, str]
            ) -> np.ndarray | None:
    """The pixel displacement a theta, grid or sampler tensor stands for (None: not one)."""
    r, s = ref_out[p.ref], sus_out[p.sus]
    if r.shape != s.shape or not r.size:
        return None
    if p.stage == "theta" and per_sample(list(r.shape)) == 6:
        return theta_px(s.astype(np.float64) - r, hw)
    if p.stage == "grid" and r.shape[-1] == 2 and (per_sample(list(r.shape)) or 0) > 6:
        _, align = _sampler_settings(samplers[0])
        return points_px(sample_points(r, hw, align, "linear"),
                         sample_points(s, hw, align, "linear"))
    if p.stage == "sampler" and p.op_type == "GridSample":
        ref_node = next(n for n in samplers if n.name == p.node)
        sus_node = sus_nodes.get(p.sus_node or "", ref_node)
        g_ref = ref_out.get(ref_node.input[1])
        g_sus = sus_out.get(grid_pair.get(ref_node.input[1], ""), g_ref)
        if g_ref is None or g_sus is None or g_ref.shape != g_sus.shape:
            return None
        mode_r, align_r = _sampler_settings(ref_node)
        mode_s, align_s = _sampler_settings(sus_node)
        return points_px(sample_points(g_ref, hw, align_r, mode_r),
                         sample_points(g_sus, hw, align_s, mode_s))
    return None


def _row(p: Pair, acc: _Acc, bounds: Bounds, ref: GraphIndex, sus: GraphIndex) -> Row:
    ref_node = ref.nodes[p.node]
    sus_node = sus.nodes.get(p.sus_node or "")
    attrs = attribute_differences(ref_node, sus_node) if sus_node is not None else []
    weights = weight_differences(ref, sus, ref_node, sus_node) if sus_node is not None else []
    reasons = []
    if acc.shape:
        reasons.append(acc.shape)
    if acc.nonfinite:
        reasons.append("NaN/Inf where REF is finite")
    if acc.px is not None and acc.px > bounds.px:
        reasons.append(f"points moved {acc.px:.4g} px > {bounds.px:g}")
    by_px = p.stage in ("theta", "grid") and acc.px is not None  # what the sampler reads
    if not by_px and bounds.atol is not None and acc.exceed:
        reasons.append(f"{acc.exceed} values beyond {bounds.atol:g} + {bounds.rtol or 0:g}*|ref|")
    elif not by_px and bounds.max_rel_l2 is not None and acc.rel_l2 > bounds.max_rel_l2:
        reasons.append(f"||d||/||ref|| {acc.rel_l2:.3g} > {bounds.max_rel_l2:g}")
    return Row(p.node, p.op_type, p.stage, p.ref, p.sus, acc.max_abs, acc.max_rel, acc.rel_l2,
               acc.cosine, acc.px, acc.ref_absmax, bool(reasons), "; ".join(reasons),
               attributes=attrs, weights=weights)


def set_jumps(rows: list[Row], ref: GraphIndex) -> None:
    """How much relative error each node adds to what its inputs already carry: where an
    error is made, not where it has grown largest (which is always further down)."""
    error = {r.tensor: r.rel_l2 for r in rows}

    def carried(tensor: str, seen: set[str]) -> float:
        if tensor in error:
            return error[tensor]
        node = ref.producer.get(tensor)
        if node is None or node.name in seen:
            return 0.0
        seen.add(node.name)  # a pass-through or unmatched node: look through it
        return max((carried(t, seen) for t in node.input if t), default=0.0)

    for r in rows:
        node = ref.nodes[r.node]
        before = max((carried(t, set()) for t in node.input if t), default=0.0)
        r.jump = r.rel_l2 - before if math.isfinite(r.rel_l2) else math.inf


class _EndToEnd:
    """SUSPECT's first shared graph output from the untouched graph (as deployed, fused
    kernels and all) against REF's, and against the marked run's."""

    def __init__(self, ref: "onnx.ModelProto", sus: "onnx.ModelProto") -> None:
        ref_outputs = {o.name for o in ref.graph.output}
        self.outputs = [o.name for o in sus.graph.output if o.name in ref_outputs]
        self.agree = self.n = 0
        self.max_abs = self.marking = 0.0

    def add(self, ref_out: dict[str, np.ndarray], sus_out: dict[str, np.ndarray],
            plain: dict[str, np.ndarray]) -> None:
        if not self.outputs:
            return
        r = ref_out[self.outputs[0]].astype(np.float64)
        s = plain[self.outputs[0]].astype(np.float64)
        if r.shape != s.shape:
            return
        self.max_abs = max(self.max_abs, float(np.abs(s - r).max()))
        if r.ndim == 2:
            self.agree += int((r.argmax(1) == s.argmax(1)).sum())
        self.n += len(r)
        for name in self.outputs:
            if name in sus_out and sus_out[name].shape == plain[name].shape:
                diff = np.abs(plain[name].astype(np.float64) - sus_out[name]).max()
                self.marking = max(self.marking, float(diff))

    def result(self) -> tuple[dict[str, Any], str | None]:
        if not self.n:
            return {}, None
        out = {"output": self.outputs[0], "max_abs": self.max_abs,
               "top1_agreement": self.agree / self.n, "marked_vs_deployed_max_abs": self.marking}
        note = None
        if self.marking > 1e-4 * max(1.0, self.max_abs):
            note = (f"marking every tensor changed SUSPECT's own outputs by up to "
                    f"{self.marking:.3g} (the runtime fuses less): the per-node numbers describe "
                    "the unfused graph, the end-to-end line the deployed one")
        return out, note


# --------------------------------------------------------------------------------- fixes

def suggest_fix(report: CompareReport, sus: GraphIndex) -> str | None:
    """One line: the likeliest cause of the first divergence and what to do about it."""
    first = report.first
    if first is None:
        return None
    if first.attributes:
        if first.op_type == "GridSample" and any(a.startswith("mode=") for a in first.attributes):
            return (f"{first.node} samples with {first.attributes[0]}: every sampling point "
                    f"snaps to a pixel centre ({first.displacement_px or 0:.2f} px RMS here). "
                    "Restore REF's mode; TensorRT reads opset-20 GridSample 'linear' as "
                    "nearest, so export at opset 19 or lower for TensorRT")
        return (f"{first.node} runs with {', '.join(first.attributes)}: restore REF's "
                "attributes (re-export from REF)")
    if first.weights:
        return (f"the weights of {first.node} are not REF's ({first.weights[0]}): SUSPECT was "
                "not exported from REF or was edited afterwards; re-export it from REF")
    sus_node = sus.nodes.get(first.node)
    absmax = {r.tensor: r.ref_absmax for r in report.rows}
    coarse = [lv for lv in (input_levels(absmax, sus, sus_node) if sus_node else [])
              if lv[2] < COARSE_LEVELS]
    keep = ("find the nodes to keep in float with `stn-deploy debug precision REF.onnx "
            f"--precision {report.precision}` and export with --keep-float")
    if coarse:
        t, scale, levels = coarse[0]
        return (f"{t} enters {first.node} quantized to only +-{levels:.0f} levels (scale "
                f"{scale:.3g}): its quantization scale is too coarse; recalibrate, or {keep}")
    if report.precision in ("int8", "fp16") and first.stage != "classifier":
        return (f"the {first.stage} stage loses precision in {report.precision.upper()}, and "
                f"theta errors move every sampled pixel: keep the STN path in float; {keep}")
    if report.precision in ("int8", "fp16"):
        return (f"{report.precision.upper()} error in the classifier exceeds the bound at "
                f"{first.node}: {keep}, or check the end metrics with `stn-deploy bench` "
                "before loosening --atol/--rtol")
    return (f"an FP32 graph should match REF: the runtime computes {first.op_type} "
            f"differently at {first.node}; compare opsets (`stn-deploy inspect`) and runtime "
            "versions")


def plan_precision(path: Path) -> str:
    from stn_deploy.artifacts import read_sidecar

    return str(read_sidecar(path).get("precision", "fp32"))


# ------------------------------------------------------------------------------- files

def resolve_reference(reference: Path | None, suspect: Path,
                      sus_proto: "onnx.ModelProto | None") -> Path:
    """REF as given, else the checkpoint SUSPECT's metadata records (found by its sha256
    beside SUSPECT, in the working folder or in the training output folder)."""
    from stn_deploy.artifacts import metadata, model_kind
    from stn_deploy.defaults import TRAIN_OUT
    from stn_deploy.fileio import sha256_file

    if reference is not None:
        if model_kind(reference) == "plan":
            raise StnDeployError("REF must be the checkpoint or the FP32 ONNX file; a TensorRT "
                                 "plan is the thing being debugged, give it as SUSPECT")
        return reference
    meta = metadata(sus_proto) if sus_proto is not None else {}
    name, sha = meta.get("source_checkpoint"), meta.get("source_sha256")
    if not name or not sha:
        raise StnDeployError(f"{suspect.name} records no source checkpoint: pass --reference "
                             "(the checkpoint or the FP32 ONNX file)")
    for path in (suspect.parent / name, Path(name), TRAIN_OUT / name):
        if path.is_file() and sha256_file(path) == sha:
            return path
    raise StnDeployError(f"{suspect.name} was exported from {name} (sha256 {sha[:12]}...), "
                         f"which is not beside it, in ., or in {TRAIN_OUT}/: pass --reference")


def export_reference(checkpoint: Path, sus_proto: "onnx.ModelProto", out: Path) -> Path:
    """The checkpoint as an FP32 ONNX graph written the way SUSPECT was (opset, exporter,
    outputs, preprocessing), so node names line up; through the export pipeline's own
    exporter."""
    from stn_deploy.artifacts import metadata, onnx_opset
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.debug.inputs import graph_inputs
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx

    meta = metadata(sus_proto)
    inputs = graph_inputs(sus_proto)
    batch = inputs[0].shape[0] if inputs and inputs[0].shape else None
    options = OnnxOptions(
        opset=int(meta.get("opset") or onnx_opset(sus_proto) or 17),
        static_batch=batch,
        with_theta="theta" in meta.get("outputs", "").split(","),
        embed_preprocess=meta.get("preprocess") == "embedded",
        exporter=meta.get("exporter") or None,
        affine_grid_op=meta.get("affine_grid") == "AffineGrid op")
    return export_onnx(load_checkpoint(checkpoint).model(), out, options)


def check_same_inputs(ref: "onnx.ModelProto", sus: "onnx.ModelProto") -> None:
    from stn_deploy.debug.inputs import graph_inputs

    r, s = graph_inputs(ref), graph_inputs(sus)
    if len(r) != len(s):
        raise StnDeployError(f"SUSPECT takes {len(s)} inputs, REF {len(r)}: different networks")
    for a, b in zip(r, s):
        if a.dtype == b.dtype and a.shape[1:] != b.shape[1:]:
            raise StnDeployError(f"SUSPECT's input {b.name} is {b.shape[1:]} a sample, REF's "
                                 f"{a.name} {a.shape[1:]}: different networks")


def compare_files(suspect: str | Path, reference: str | Path | None = None, *,
                  samples: int | None = 256, data_dir: str | None = None,
                  atol: float | None = None, rtol: float | None = None,
                  threads: int | None = None) -> CompareReport:
    """``debug compare`` on files: SUSPECT an ONNX file or TensorRT plan, REF a checkpoint or
    FP32 ONNX file (default: the checkpoint SUSPECT records)."""
    import tempfile

    from stn_deploy.artifacts import graph_precision, model_kind
    from stn_deploy.debug.inputs import load_inputs, load_model, model_config

    suspect = Path(suspect)
    kind = model_kind(suspect)
    if kind == "checkpoint":
        raise StnDeployError(f"SUSPECT must be an ONNX file or a TensorRT plan, not "
                             f"{suspect.name}: a checkpoint is a reference")
    if not suspect.is_file():
        raise StnDeployError(f"{suspect} does not exist")
    runs: Callable[[list[str]], Runs] | None = None  # None: ONNX Runtime runs SUSPECT
    if kind == "plan":
        from stn_deploy.debug.taps import TrtTaps, plan_source_onnx, require_plan_runtime

        require_plan_runtime()
        ref_hint = [Path(reference)] if reference is not None else []
        source = plan_source_onnx(suspect, ref_hint)
        sus, precision = load_model(source), plan_precision(suspect)

        def trt_runs(names: list[str]) -> Runs:
            return Runs(TrtTaps(source, precision, names, str(suspect)), None)

        runs = trt_runs
    else:
        sus = load_model(suspect)
        precision = graph_precision(sus)
    ref_path = resolve_reference(Path(reference) if reference is not None else None, suspect,
                                 sus)
    with tempfile.TemporaryDirectory(prefix="stn-debug-") as work:
        if model_kind(ref_path) == "checkpoint":
            ref = load_model(export_reference(ref_path, sus, Path(work) / "reference.onnx"))
        else:
            ref = load_model(ref_path)
    check_same_inputs(ref, sus)
    inputs = load_inputs(sus if model_config(sus) is not None else ref, samples, data_dir,
                         name=suspect.name)
    return compare_graphs(ref, sus, inputs, bounds_for(precision, atol, rtol),
                          labels=(str(suspect), str(ref_path)), precision=precision,
                          runs=runs, threads=threads)
