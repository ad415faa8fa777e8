"""Is there a partial NNCF scope that keeps theta within INT8's bound on the shipped CIFAR-10
model, and how far does a bf16 STN path move theta?

Why it exists: NNCF's STN-aware scope quantizes all the localization convolutions, and on the
shipped CIFAR-10 model that moves theta past INT8's verification bound (0.1 px), so the export
falls back to the whole STN path float (``nncf_quant``). This measures the scopes in between,
each localization convolution quantized alone (the others float), and, for the other way to
spend less precision on the STN, the localization net in bfloat16.

Rows: (a) each localization convolution alone quantized (``keep_float`` = the others, scope
"stn-aware"); (b) all of them quantized ("stn-aware"); (c) the whole STN path float
("stn-float"): theta's shift from the FP32 graph (``nncf_quant.theta_shift``, both on ONNX
Runtime, the largest over the images) and theta's own spread. (d) bf16 emulated in PyTorch
on this CPU (not OpenVINO's kernels): the localization net in bfloat16 with the regressor in
f32, then both in bfloat16; theta's shift from the f32 model's (``health.displacement_px``).
NNCF as the export runs it (full bias correction, ``nncf_quant.FAST_BIAS_CORRECTION``),
calibrated on a seeded draw of the train split (the export's own, ``verify.verification_data``).
Writes benchmarks/results/nncf_scope.{json,md} (or --results-dir).
Usage: python benchmarks/nncf_scope.py [--checkpoint stn_deploy/pretrained/cifar10-stn.pt]
       [--onnx FP32.onnx] [--data-dir ~/.cache/stn-deploy/cifar10-jpeg] [--calib-samples 500]
       [--eval-samples all] [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from _provenance import RESULTS, write_results
from precision_targets import sample_count
from stn_deploy.checkpoint import load_checkpoint
from stn_deploy.config import ModelConfig
from stn_deploy.data import normalize
from stn_deploy.export import nncf_quant
from stn_deploy.export.verify import BF16, INT8, verification_data
from stn_deploy.health import displacement_px, theta_spread_px

PRETRAINED = Path(__file__).resolve().parents[1] / "stn_deploy" / "pretrained"
DATA_NOTE = "CIFAR-10 (JPEG copy)"
BF16_NOTE = "PyTorch bf16 emulation on this CPU, not OpenVINO's kernels"
SPREAD_MATCH = 1e-3  # relative: the ONNX graph's theta spread against the checkpoint's


# ------------------------------------------------------------------------------ NNCF rows

def localization_convs(fp32: Path) -> list[str]:
    """The localization net's convolutions, in order (names as ``precision.name_nodes``)."""
    from stn_deploy.debug.stages import assign_stages

    stages = assign_stages(onnx.load(str(fp32)))
    return [n for n in stages.nodes_in("localization") if stages.op_type[n] == "Conv"]


def nncf_variants(convs: list[str]) -> list[dict[str, Any]]:
    """(label, scope, keep_float) of every NNCF row: each convolution alone, all, none."""
    short = [c.strip("/").split("/")[-2] for c in convs]
    rows = [{"label": f"{s} alone quantized", "scope": "stn-aware",
             "keep_float": [c for c in convs if c != conv]} for s, conv in zip(short, convs)]
    rows.append({"label": "all localization convs quantized", "scope": "stn-aware",
                 "keep_float": []})
    rows.append({"label": "whole STN path float", "scope": "stn-float", "keep_float": []})
    return rows


def nncf_rows(fp32: Path, calib: np.ndarray, images: np.ndarray, config: ModelConfig,
              work: Path) -> list[dict[str, Any]]:
    rows = []
    for i, variant in enumerate(nncf_variants(localization_convs(fp32))):
        dst = work / f"q{i}.onnx"
        nncf_quant.quantize_nncf(fp32, dst, calib, config, keep_float=variant["keep_float"],
                                 scope=variant["scope"])
        shift = nncf_quant.theta_shift(fp32, dst, images, config)
        if shift is None:
            raise SystemExit(f"{fp32} has no theta feeding a sampler: nothing to measure")
        rows.append({**variant, "theta_shift_max_px": shift.moved_px,
                     "theta_spread_px": shift.spread_px, "images": shift.images,
                     "within_bound": shift.moved_px <= INT8.theta_px})
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------ bf16 rows

class InDtype(nn.Module):
    """``module`` run in ``dtype``: its input cast in, its output cast back to f32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype)).float()


def thetas(model: nn.Module, images: np.ndarray, config: ModelConfig,
           bf16: tuple[str, ...] = (), batch: int = 500) -> np.ndarray:
    """theta (N, 2, 3, float64) with the STN's submodules named in ``bf16`` in bfloat16."""
    stn = copy.deepcopy(model.stn)
    for name in bf16:
        setattr(stn, name, InDtype(getattr(stn, name), torch.bfloat16))
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = normalize(torch.from_numpy(images[start:start + batch]), config)
            out.append(stn.theta(x).double().numpy())
    return np.concatenate(out)


def bf16_rows(checkpoint: Path, images: np.ndarray
              ) -> tuple[list[dict[str, Any]], float]:
    """Theta's shift from f32 with the localization net, then the regressor too, in bf16;
    and the f32 theta's spread (to match the ONNX graph's against)."""
    ckpt = load_checkpoint(checkpoint)
    model, size = ckpt.model(), ckpt.config.image_size
    want = thetas(model, images, ckpt.config)
    rows = []
    for label, parts in (("localization bf16, regressor f32", ("localization",)),
                         ("localization + regressor bf16", ("localization", "regressor"))):
        moved = displacement_px(thetas(model, images, ckpt.config, parts) - want, size)
        rows.append({"label": label, "bf16": list(parts), "images": len(moved),
                     "theta_shift_max_px": float(moved.max()),
                     "theta_shift_p99_px": float(np.percentile(moved, 99)),
                     "theta_shift_median_px": float(np.median(moved)),
                     "unchanged_share": float(np.mean(moved == 0.0)),
                     "within_bound": float(moved.max()) <= INT8.theta_px})
        print(rows[-1], flush=True)
    return rows, theta_spread_px(want, size)


# ------------------------------------------------------------------------------ the record

def fp32_graph(args: argparse.Namespace, work: Path) -> Path:
    """--onnx, else the ONNX file beside the checkpoint, else one exported to ``work``."""
    if args.onnx is not None:
        return args.onnx
    beside = args.checkpoint.with_suffix(".onnx")
    if beside.is_file():
        return beside
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx

    return export_onnx(load_checkpoint(args.checkpoint).model(), work / "fp32.onnx",
                       OnnxOptions(opset=17))


def conclusion(nncf: list[dict[str, Any]], bf16: list[dict[str, Any]], bound: float) -> str:
    """What the numbers say, in words built from them."""
    partial = nncf[:-1]  # all but the whole STN path float
    best = min(partial, key=lambda r: r["theta_shift_max_px"])
    whole = nncf[-1]
    if any(r["within_bound"] for r in partial):
        ok = ", ".join(r["label"] for r in partial if r["within_bound"])
        first = f"A partial NNCF scope keeps theta within {bound:g} px: {ok}."
    else:
        first = (f"No partial NNCF scope keeps theta within {bound:g} px: the least shift, "
                 f"{best['label']}, is {best['theta_shift_max_px']:.3f} px "
                 f"({best['theta_shift_max_px'] / bound:.1f}x the bound); only the whole STN "
                 f"path float does ({whole['theta_shift_max_px']:.3g} px).")
    worst = max(r["theta_shift_max_px"] for r in bf16)
    verdict = "within" if worst <= bound else "past"
    second = (f"A bf16 STN path moves theta by at most {worst:.3f} px over these images, "
              f"{verdict} the {bound:g} px bound ({BF16_NOTE}).")
    return f"{first} {second}"


def markdown(doc: dict[str, Any]) -> str:
    note, bound = doc["data"], doc["bound_px"]
    md = ["# NNCF scope and bf16: theta's shift on the shipped CIFAR-10 model", "",
          f"{doc['checkpoint']} ({doc['onnx']}); {note}. NNCF {doc['nncf']}, full bias "
          f"correction, {doc['calib_images']} calibration images (seeded draw of the train "
          f"split); theta on ONNX Runtime over {doc['eval_images']} test images. INT8's "
          f"theta bound: {bound:g} px.", "",
          f"## NNCF INT8: theta's shift from FP32, {note} test images", "",
          "| quantized | scope | float besides the scope | theta shift, max (px) |"
          " theta spread (px) | within the bound |", "|---|---|---|---:|---:|---|"]
    for r in doc["nncf_rows"]:
        extra = ", ".join(c.strip("/").split("/")[-2] for c in r["keep_float"]) or "-"
        md.append(f"| {r['label']} | {r['scope']} | {extra} | {r['theta_shift_max_px']:.3f} |"
                  f" {r['theta_spread_px']:.3f} | {'yes' if r['within_bound'] else 'no'} |")
    md += ["", f"## bf16 STN path: theta's shift from f32, {note} test images", "",
           f"{BF16_NOTE}.", "",
           "| in bf16 | images | max (px) | p99 (px) | median (px) | theta unchanged |"
           " within the bound |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in doc["bf16_rows"]:
        md.append(f"| {r['label']} | {r['images']} | {r['theta_shift_max_px']:.3f} | "
                  f"{r['theta_shift_p99_px']:.3f} | {r['theta_shift_median_px']:.3f} | "
                  f"{100 * r['unchanged_share']:.0f}% | {'yes' if r['within_bound'] else 'no'} |")
    md += ["", "theta unchanged: the images whose bf16 theta is bit-identical to f32's. "
           f"bf16's own verification bound is {doc['bf16_bound_px']:g} px; the question here "
           f"is INT8's {bound:g} px.", "", f"**Conclusion, {note}:** {doc['conclusion']}"]
    return "\n".join(md)


def _shown(path: Path) -> str:
    """A path inside this checkout as a relative one (the record reads the same anywhere)."""
    root = PRETRAINED.parents[1]
    full = path.resolve()
    return str(full.relative_to(root)) if full.is_relative_to(root) else str(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=PRETRAINED / "cifar10-stn.pt")
    p.add_argument("--onnx", type=Path, default=None,
                   help="its FP32 graph [default: the .onnx beside the checkpoint, else "
                   "exported to a temp folder]")
    p.add_argument("--data-dir", type=Path,
                   default=Path.home() / ".cache" / "stn-deploy" / "cifar10-jpeg")
    p.add_argument("--data-note", default=DATA_NOTE, help="what the data is, beside every "
                   f"figure [default: {DATA_NOTE!r}]")
    p.add_argument("--calib-samples", type=sample_count, default=500)
    p.add_argument("--eval-samples", type=sample_count, default=None,
                   help="test images theta is measured on: N or all [default: all]")
    p.add_argument("--out", default="nncf_scope", help="results name under --results-dir")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_checkpoint(args.checkpoint).config
    calib = verification_data(config, "train", args.data_dir, args.calib_samples)[0]
    test = verification_data(config, "test", args.data_dir, args.eval_samples)[0]
    images = test.images.numpy()
    bf16, spread = bf16_rows(args.checkpoint, images)
    with tempfile.TemporaryDirectory(prefix="nncf-scope-") as tmp:
        fp32 = fp32_graph(args, Path(tmp))
        nncf = nncf_rows(fp32, calib.images.numpy(), images, config, Path(tmp))
        graph = ("exported from the checkpoint, opset 17" if fp32.is_relative_to(tmp)
                 else _shown(fp32))
    graph_spread = nncf[0]["theta_spread_px"]
    if abs(graph_spread - spread) > SPREAD_MATCH * max(spread, 1e-9):
        raise SystemExit(f"{graph}: theta spread {graph_spread:.5f} px is not the checkpoint's "
                         f"{spread:.5f} px: pass the checkpoint's own FP32 graph with --onnx")
    import nncf as nncf_module

    doc = {"data": args.data_note, "checkpoint": _shown(args.checkpoint), "onnx": graph,
           "nncf": nncf_module.__version__,
           "fast_bias_correction": nncf_quant.FAST_BIAS_CORRECTION,
           "calib_images": len(calib.images),
           "calib_draw": "seeded, as the export draws (verify.verification_data)",
           "eval_images": len(images), "bound_px": INT8.theta_px,
           "bf16_bound_px": BF16.theta_px, "theta_spread_px_pytorch": spread,
           "nncf_rows": nncf, "bf16_rows": bf16, "bf16_note": BF16_NOTE,
           "conclusion": conclusion(nncf, bf16, float(INT8.theta_px))}
    text = markdown(doc)
    write_results(args.out, doc, text, args.results_dir)
    print(text)


if __name__ == "__main__":
    main()
