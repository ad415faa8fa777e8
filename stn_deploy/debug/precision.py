"""``debug precision``: the few nodes an FP16 or INT8 variant must keep in float to meet its
gates, found by bisection as Polygraphy's ``debug precision`` does, but judged on the STN too.

The gates are the precision's own (``stn_deploy.export.verify.TOLERANCES``): top-1 agreement
with the FP32 graph, and the shift of the sampling grid in pixels (theta's error as the sampler
feels it). Candidates are ordered STN first (theta, grid, sampler, localization, then the
classifier), topologically within a stage: a theta error moves every sampled pixel, so the
nodes that compute it are the cheapest to keep in float and the likeliest to need it.
Bisection finds the shortest passing prefix of that order; a pruning pass then drops every
node of the prefix the gates do not need.

A candidate variant keeps a node in float by:
- INT8: removing the QuantizeLinear/DequantizeLinear pairs on the node's inputs (float
  weights come back from the FP32 graph) and, for a graph output, on its output; works on any
  QDQ graph, ours or another quantizer's (``keep_float_int8``);
- FP16: leaving the node off the converter's list (``fp16_variant``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stn_deploy.debug.graph import GraphIndex
from stn_deploy.debug.stages import PASS_THROUGH, StageMap, assign_stages
from stn_deploy.errors import StnDeployError, error_line

if TYPE_CHECKING:
    import onnx

    from stn_deploy.debug.inputs import DebugInputs

PRIORITY = ("theta", "grid", "sampler", "localization", "input", "classifier")
MAX_PRUNE = 24  # a longer prefix is returned as found (each pruning step is one evaluation)


# ----------------------------------------------------------------------- building variants

def keep_float_int8(qdq: "onnx.ModelProto", keep: list[str] | set[str],
                    fp32: "onnx.ModelProto | None" = None) -> "onnx.ModelProto":
    """A copy of the QDQ graph ``qdq`` in which the nodes named in ``keep`` compute in float:
    their inputs bypass QuantizeLinear/DequantizeLinear pairs, their quantized weights are
    replaced by the float ones (``fp32``'s initializer of the same name, else the dequantized
    value), and a graph output they make leaves without a QDQ round trip."""
    import onnx
    from onnx import numpy_helper

    from stn_deploy.debug.comparison import canonical

    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    keep = set(keep)
    idx = GraphIndex(model)
    source = GraphIndex(fp32) if fp32 is not None else None
    added: dict[str, str] = {}
    for node in model.graph.node:
        if node.name not in keep:
            continue
        for i, t in enumerate(node.input):
            dq = idx.producer.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = idx.producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                continue
            name = canonical(t)
            if name not in added:
                value = source.array(name) if source is not None else None
                if value is None:
                    got = idx.dequantized(dq)
                    if got is None:
                        continue
                    value = got[0].astype(np.float32)
                added[name] = f"{name}_float"
                model.graph.initializer.append(numpy_helper.from_array(
                    np.asarray(value, dtype=np.float32), added[name]))
            node.input[i] = added[name]
    for out in idx.outputs:
        dq = idx.producer.get(out)
        q = idx.producer.get(dq.input[0]) if dq is not None and dq.op_type == \
            "DequantizeLinear" else None
        maker = idx.producer.get(q.input[0]) if q is not None and q.op_type == \
            "QuantizeLinear" else None
        if maker is not None and maker.name in keep:
            dq.op_type = "Identity"
            dq.domain = ""
            del dq.input[:]
            dq.input.append(q.input[0])
            del dq.attribute[:]
    from stn_deploy.export.precision import prune_dead

    prune_dead(model)
    return model


def fp16_variant(fp32: "onnx.ModelProto", keep: list[str] | set[str]) -> "onnx.ModelProto":
    """FP16 with float32 inputs/outputs and the nodes in ``keep`` left in float32, as
    ``stn_deploy.export.precision.convert_fp16`` does for the STN path."""
    import onnx

    from stn_deploy.errors import require
    from stn_deploy.export.precision import fix_blocked_casts

    float16 = require("onnxconverter_common.float16", "pip install onnxconverter-common",
                      package="onnxconverter-common")
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    del model.graph.value_info[:]
    io_types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    half = float16.convert_float_to_float16(model, keep_io_types=True,
                                            node_block_list=sorted(keep))
    fix_blocked_casts(half, set(keep))
    for out in half.graph.output:
        out.type.tensor_type.elem_type = io_types[out.name]
    del half.graph.value_info[:]
    return half


def int8_candidates(qdq: "onnx.ModelProto") -> set[str]:
    """Nodes of a QDQ graph that read a dequantized tensor: those that compute in INT8."""
    idx = GraphIndex(qdq)
    return {n.name for n in qdq.graph.node if n.op_type not in PASS_THROUGH
            and any(idx.producer.get(t) is not None and idx.producer[t].op_type ==
                    "DequantizeLinear" for t in n.input)}


def ordered(stages: StageMap, names: set[str]) -> list[str]:
    """``names`` STN first (``PRIORITY``), topological within a stage."""
    pos = {n: i for i, n in enumerate(stages.order)}
    return sorted((n for n in names if n in pos),
                  key=lambda n: (PRIORITY.index(stages.stage[n]), pos[n]))


# --------------------------------------------------------------------------------- judging

@dataclass
class Verdict:
    keep_float: int
    agreement: float | None
    grid_px: float | None
    passed: bool
    error: str | None = None

    def text(self) -> str:
        if self.error:
            return f"does not run ({self.error})"
        agree = "-" if self.agreement is None else f"{100 * self.agreement:.2f}%"
        px = "-" if self.grid_px is None else f"{self.grid_px:.3g} px"
        return f"agreement {agree}, grid shift {px}: {'PASSED' if self.passed else 'FAILED'}"


class Judge:
    """Runs a candidate on the inputs and holds it to the gates, against FP32 run once."""

    def __init__(self, fp32: "onnx.ModelProto", stages: StageMap, inputs: "DebugInputs",
                 min_agreement: float, max_px: float, threads: int | None = None) -> None:
        from stn_deploy.debug.taps import OrtTaps

        self.inputs, self.threads = inputs, threads
        self.min_agreement, self.max_px = min_agreement, max_px
        self.samplers = [n.name for n in fp32.graph.node if n.op_type == "GridSample"]
        self.image_hw = _image_hw(fp32)
        self.output = fp32.graph.output[0].name
        self.ref = self._run(OrtTaps(fp32, list(stages.grid_tensors), "FP32", threads), fp32,
                             list(stages.grid_tensors))
        self.evaluations = 0

    def _run(self, taps: Any, proto: "onnx.ModelProto", grids: list[str]
             ) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for feed, n in self.inputs.batches(proto):
            out = taps.run(feed)
            for i, name in enumerate([self.output, *grids]):
                parts.setdefault(str(i), []).append(out[name][:n])
        return {k: np.concatenate(v) for k, v in parts.items()}

    def __call__(self, candidate: "onnx.ModelProto", keep: int) -> Verdict:
        from stn_deploy.debug.comparison import points_px, sample_points
        from stn_deploy.debug.taps import OrtTaps

        self.evaluations += 1
        nodes = {n.name: n for n in candidate.graph.node}
        grids = [nodes[s].input[1] for s in self.samplers if s in nodes]
        try:
            got = self._run(OrtTaps(candidate, grids, "the candidate", self.threads),
                            candidate, grids)
        except StnDeployError as e:
            return Verdict(keep, None, None, False, error_line(e))
        ref_logits, logits = self.ref["0"], got["0"]
        agreement = float((ref_logits.argmax(1) == logits.argmax(1)).mean()) \
            if ref_logits.ndim == 2 else None
        px = None
        for i in range(1, len(grids) + 1):
            r, s = self.ref[str(i)], got[str(i)]
            hw = self.image_hw or (r.shape[1], r.shape[2])
            shift = points_px(sample_points(r, hw, False, "linear"),
                              sample_points(s, hw, False, "linear"))
            px = max(px or 0.0, float(shift.max()))
        passed = (agreement is None or agreement >= self.min_agreement) and (
            px is None or px <= self.max_px)
        return Verdict(keep, agreement, px, passed)


def _image_hw(fp32: "onnx.ModelProto") -> tuple[int, int] | None:
    """(H, W) of the image the first GridSample reads, where shape inference knows it."""
    from stn_deploy.debug.stages import tensor_shapes

    sampler = next(n for n in fp32.graph.node if n.op_type == "GridSample")
    shape = tensor_shapes(fp32).get(sampler.input[0])
    if shape and len(shape) == 4 and shape[2] and shape[3]:
        return int(shape[2]), int(shape[3])
    return None


# ------------------------------------------------------------------------------- bisection

@dataclass
class PrecisionResult:
    precision: str
    fp32: str
    variant: str
    inputs: str
    keep_float: list[str]
    stages: dict[str, str]
    candidates: int
    baseline: Verdict
    result: Verdict
    evaluations: int
    gates: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = {n: self.stages[n] for n in self.keep_float}
        return d

    def lines(self) -> list[str]:
        out = [f"{self.variant} against {self.fp32} on {self.inputs}",
               f"gates: top-1 agreement >= {100 * self.gates['min_agreement']:.0f}%, grid "
               f"shift <= {self.gates['max_px']:g} px; {self.candidates} candidate nodes",
               f"as built: {self.baseline.text()}"]
        out += [f"note: {n}" for n in self.notes]
        if not self.keep_float:
            out.append("nothing needs to stay in float")
        else:
            out.append(f"keep in float ({len(self.keep_float)} nodes, {self.evaluations} "
                       "evaluations):")
            out += [f"  {n}  [{self.stages[n]}]" for n in self.keep_float]
            out.append(f"with them in float: {self.result.text()}")
        return out


def bisect(candidates: list[str], passes: Callable[[list[str]], Verdict]
           ) -> tuple[list[str], Verdict]:
    """The shortest passing prefix of ``candidates``, then pruned node by node.
    ``passes(all candidates)`` must pass (the caller checks)."""
    lo, hi = 0, len(candidates)
    best = passes(candidates)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        verdict = passes(candidates[:mid])
        if verdict.passed:
            hi, best = mid, verdict
        else:
            lo = mid
    keep = candidates[:hi]
    if len(keep) <= MAX_PRUNE:
        for name in reversed(list(keep)):
            trial = [k for k in keep if k != name]
            verdict = passes(trial)
            if verdict.passed:
                keep, best = trial, verdict
    return keep, best


def find_keep_float(fp32_path: str | os.PathLike[str], precision: str, *,
                    variant: str | os.PathLike[str] | None = None, samples: int | None = None,
                    data_dir: str | None = None, calib_dir: str | None = None,
                    calib_samples: int = 500, threads: int | None = None) -> PrecisionResult:
    """The nodes ``precision`` (fp16 or int8) must keep in float for the variant of the FP32
    graph at ``fp32_path`` to meet its gates. ``variant``: an existing INT8 QDQ graph of it to
    repair (default: quantize everything here, calibrated on the model's training images)."""
    from stn_deploy.debug.inputs import load_inputs, load_model
    from stn_deploy.export.verify import TOLERANCES

    if precision not in ("fp16", "int8"):
        raise StnDeployError(f"precision must be fp16 or int8, got {precision!r}")
    if variant is not None and precision != "int8":
        raise StnDeployError("--variant takes an INT8 QDQ graph; FP16 candidates are converted "
                             "from the FP32 graph")
    fp32 = load_model(fp32_path)
    stages = assign_stages(fp32)
    tol = TOLERANCES[precision]
    inputs = load_inputs(fp32, samples, data_dir, name=str(fp32_path))
    judge = Judge(fp32, stages, inputs, tol.min_agreement, tol.theta_px or 0.1, threads)
    notes = [inputs.note] if inputs.config is None else []
    if precision == "int8":
        base = load_model(variant) if variant is not None else _quantize_all(
            fp32_path, fp32, calib_dir or data_dir, calib_samples)
        names = int8_candidates(base)
        if not names:
            raise StnDeployError(f"{variant or 'the INT8 variant'} has no node reading a "
                                 "DequantizeLinear output: it is not an INT8 QDQ graph")

        def build(keep: list[str]) -> "onnx.ModelProto":
            return keep_float_int8(base, keep, fp32)
    else:
        names = {n for n in stages.order if stages.op_type[n] not in PASS_THROUGH
                 and stages.op_type[n] != "Constant"}

        def build(keep: list[str]) -> "onnx.ModelProto":
            return fp16_variant(fp32, keep)
    candidates = ordered(stages, names)
    if names and not candidates:
        raise StnDeployError(f"the {precision} variant's nodes do not match {fp32_path}'s by "
                             "name: it is not a variant of that graph")
    baseline = judge(build([]), 0)
    keep: list[str] = []
    result = baseline
    if not baseline.passed:
        everything = judge(build(candidates), len(candidates))
        if not everything.passed:
            raise StnDeployError(f"even with all {len(candidates)} candidate nodes in float the "
                                 f"variant fails its gates ({everything.text()})")
        keep, result = bisect(candidates, lambda k: judge(build(k), len(k)))
    return PrecisionResult(precision, str(fp32_path), str(variant or f"{precision} (built here)"),
                           inputs.note, keep, dict(stages.stage), len(candidates), baseline,
                           result, judge.evaluations,
                           {"min_agreement": tol.min_agreement, "max_px": tol.theta_px or 0.1},
                           notes)


def _quantize_all(path: str | os.PathLike[str], fp32: "onnx.ModelProto",
                  calib_dir: str | None, calib_samples: int) -> "onnx.ModelProto":
    """Every node quantized (the STN path too), calibrated as export calibrates."""
    from stn_deploy.debug.inputs import load_model, model_config
    from stn_deploy.export.precision import quantize_int8
    from stn_deploy.export.verify import verification_data

    config = model_config(fp32)
    if config is None:
        raise StnDeployError(f"{path} has no stn-deploy metadata, so there is no training data "
                             "to calibrate INT8 on: quantize it yourself and pass --variant")
    calib, _ = verification_data(config, "train", calib_dir, calib_samples)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" hint, twice
    try:
        with tempfile.TemporaryDirectory(prefix="stn-debug-") as work:
            out = Path(work) / "int8.onnx"
            quantize_int8(Path(path), out, calib.images, config, keep_stn_float=False)
            return load_model(out)
    finally:
        root.setLevel(level)


def to_json(result: PrecisionResult) -> str:
    """The JSON ``export --keep-float`` reads: ``keep_float`` is the list of node names."""
    return json.dumps(result.to_dict(), indent=2, sort_keys=True)
