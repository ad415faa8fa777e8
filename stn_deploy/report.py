"""Bench results: the gate, the terminal table, and the JSON / CSV / markdown / PNG outputs.

JSON schema (``schema_version`` 1; keys are only ever added, a removal or a change of meaning
bumps the version)::

    {
      "schema_version": 1,
      "tool": "stn-deploy", "tool_version": str, "created": ISO-8601 UTC time,
      "system": {"cpu", "cpu_isa": [str] (harness.ISA_FLAGS names: "AVX2", "AVX-512", ...),
                 "cpus_available", "cpu_count", "gpu" (null), "platform", "python",
                 "libraries": {package: version}, "cpu_busy_pct_at_start": float|null
                 (percent of all CPUs that other processes used just before the runs)},
      "settings": {"batch_sizes": [int], "iterations": int|null, "duration_s": float|null,
                   "warmup": int, "threads": int|null, "compute_only": bool,
                   "eval_samples": int|null, "dataset": str|null,
                   "min_agreement_pct": float|null, "max_accuracy_drop_pct": float|null,
                   "throughput_definition": "batch_size / mean latency"},
      "reference": {"model", "backend", "precision", "accuracy_pct"|null, "note"} | null,
      "eval_data": {"dataset", "split", "n"} | null,
      "skipped_backends": {backend: reason},
      "results": [{
          "model": str, "model_kind": "checkpoint"|"onnx"|"plan"|"openvino", "source_model":
          str|null (the checkpoint an ONNX was exported from for this row), "backend": str,
          "precision": "fp32"|"fp16"|"bf16"|"int8" (the file's; an FP32 file's under
          --ov-precision bf16 is bf16, an INT8 or FP16 file's stays its own),
          "status": "ok"|"skipped"|"error"|"failed",
          "reason": str|null, "device": str|null, "library_version": str|null,
          "runtime": {threads, provider/hint/streams/..., "inference_precision" (openvino: what
          it computed in)}, "input": {name, shape, dtype, layout},
          "not_accelerated": null | the precision this row computes in, or its file asks for,
          that the CPU has no instructions to speed up (int8 without VNNI/AMX, bf16 without
          AVX512_BF16/AMX: a bf16 IR that OpenVINO computed in f32 there is "bf16"),
          "size_mb": float|null (size of the model file this row ran),
          "peak_rss_mb": float|null (peak resident memory over the RSS before the runner was
          created; null = not measurable),
          "eval": {"n", "accuracy_pct", "agreement_pct", "max_abs_logit_diff",
                   "mean_abs_theta_diff", "max_theta_shift_px" (pixels, the largest
                   sampling-point shift theta's difference from the reference's makes),
                   "accuracy_drop_pct",
                   "stn_health": null (no theta output) | {"measured": false, "stn": bool,
                                 "reason": str} | stn_deploy.health.StnHealth as a dict
                                 (theta_spread_px, spread, mean_pose, undone,
                                 canonical_pose, collapsed, warnings, ...)}
                  | null,
          "latency": [{"batch_size", "mode": "end_to_end"|"compute_only", "iterations",
                       "warmup", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms",
                       "throughput_ips"}],
          "gate_failures": [str], "notes": [str],
          "requested": bool (named in --backend, so a skip or error fails the command)}],
      "gate": {"passed": bool, "failures": [str] (a gated run also fails on every row with
               status "error", requested or not; "skipped" rows do not fail it)}
    }

CSV: one line per (result, batch size, latency mode) with the columns in ``CSV_COLUMNS``;
a result without latency (skipped, error) has one line with empty latency columns.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any

from stn_deploy.fileio import atomic_path, write_text_atomic
from stn_deploy.harness import BUSY_WARN_PCT, machine_text
from stn_deploy.health import pct

SCHEMA_VERSION = 1

CSV_COLUMNS = (
    "schema_version", "model", "model_kind", "backend", "precision", "status", "reason",
    "device", "library_version", "threads", "size_mb", "peak_rss_mb", "eval_n", "accuracy_pct",
    "agreement_pct", "accuracy_drop_pct", "max_abs_logit_diff", "mean_abs_theta_diff",
    "max_theta_shift_px", "batch_size", "mode", "iterations", "warmup", "p50_ms", "p90_ms",
    "p99_ms", "mean_ms", "min_ms", "max_ms", "throughput_ips", "stn_theta_spread_px",
    "stn_collapsed", "not_accelerated",
)
LATENCY_KEYS = ("batch_size", "mode", "iterations", "warmup", "p50_ms", "p90_ms", "p99_ms",
                "mean_ms", "min_ms", "max_ms", "throughput_ips")
EVAL_KEYS = ("accuracy_pct", "agreement_pct", "accuracy_drop_pct", "max_abs_logit_diff",
             "mean_abs_theta_diff", "max_theta_shift_px")


def new_result(model: str, model_kind: str, backend: str, precision: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """A result row with every key of the schema present."""
    row: dict[str, Any] = {
        "model": model, "model_kind": model_kind, "source_model": None, "backend": backend,
        "precision": precision, "status": "ok", "reason": None, "device": None,
        "library_version": None, "runtime": {}, "input": None, "size_mb": None,
        "not_accelerated": None,
        "peak_rss_mb": None, "eval": None, "latency": [], "gate_failures": [], "notes": [],
    }
    row.update(extra)
    return row


def label(row: dict[str, Any]) -> str:
    precision = f" {row['precision']}" if row.get("precision") else ""
    return f"{row['backend']}{precision} ({os.path.basename(row['model'])})"


# ---------------------------------------------------------------------------------- gate

def apply_gate(results: list[dict[str, Any]], min_agreement_pct: float | None,
               max_accuracy_drop_pct: float | None) -> list[str]:
    """Marks failing rows ``failed`` and returns one line per failure. A backend that errored
    fails the gate too, named on the command line or not (it may have been the one that
    broke); a skipped one (not installed, no GPU) does not: it measured nothing wrong."""
    lines: list[str] = []
    if min_agreement_pct is None and max_accuracy_drop_pct is None:
        return lines
    for row in results:
        if row["status"] == "error":
            lines.append(f"FAILED {label(row)}: error: {row.get('reason')}")
            continue
        if row["status"] != "ok":
            continue
        ev = row.get("eval") or {}
        fails = []
        agree = ev.get("agreement_pct")
        if min_agreement_pct is not None:
            if agree is None:
                fails.append("agreement not measured")
            elif agree < min_agreement_pct:
                fails.append(f"top-1 agreement {agree:.2f}% < {min_agreement_pct:g}%")
        drop = ev.get("accuracy_drop_pct")
        if max_accuracy_drop_pct is not None:
            if drop is None:
                fails.append("accuracy drop not measured")
            elif drop > max_accuracy_drop_pct:
                fails.append(f"accuracy drop {drop:.2f} points > {max_accuracy_drop_pct:g}")
        if fails:
            row["status"] = "failed"
            row["gate_failures"] = fails
            lines.append(f"FAILED {label(row)}: {'; '.join(fails)}")
    return lines


# ------------------------------------------------------------------------------ summaries

def latency_at(row: dict[str, Any], batch: int | None = None, mode: str = "end_to_end",
               first: bool = True) -> dict[str, Any] | None:
    rows = [r for r in row.get("latency") or [] if r["mode"] == mode]
    if batch is not None:
        rows = [r for r in rows if r["batch_size"] == batch]
    if not rows:
        return None
    rows.sort(key=lambda r: r["batch_size"])
    return rows[0] if first else rows[-1]


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:{spec}}{suffix}"


def status_text(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return "ok"
    if row["status"] == "failed":
        return "FAILED gate"
    return f"{row['status']}: {row.get('reason') or ''}".strip()


def stn_text(health: dict[str, Any] | None) -> str:
    """The STN column: what theta does across the images, or that it does nothing."""
    if health is None:
        return "-"
    if health.get("measured") is False:
        return "no STN" if health.get("stn") is False else "not measured"
    text = f"{health['theta_spread_px']:.2f} px"
    rotation = (health.get("undone") or {}).get("rotation")
    if rotation is not None:
        text += f", rot {pct(rotation)} undone"
    return f"COLLAPSED ({text})" if health.get("collapsed") else text


# What a precision needs from the CPU to run faster than fp32 (harness.ISA_FLAGS names): on
# an AVX2 laptop INT8 runs on 16-bit multiply-adds that saturate and are no faster.
ACCELERATED_BY = {"int8": ("VNNI", "AMX"), "bf16": ("AVX512_BF16", "AMX")}
_OV_TYPES = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "i8": "int8", "u8": "int8"}


def computes_in(runtime: dict[str, Any], precision: str | None) -> str | None:
    """The precision a runner's ``describe()`` says the runtime computed a ``precision`` file
    in, spelled as ours (OpenVINO's ``inference_precision`` "f32" is "fp32"); None where the
    runtime does not say, and for an INT8 graph computing its float parts in fp32 (its
    hint)."""
    raw = runtime.get("inference_precision")
    computed = str(_OV_TYPES.get(str(raw), raw)) if raw else None
    return None if computed == "fp32" and precision == "int8" else computed


def computed_precision(row: dict[str, Any]) -> str | None:
    """The precision the runtime says it computed in (OpenVINO's inference precision), when
    it differs from the file's: an fp32 file may run in bf16 by the runtime's choice, a bf16
    IR in fp32 on a CPU without bf16."""
    computed = computes_in(row.get("runtime") or {}, row.get("precision"))
    return computed if computed and computed != row.get("precision") else None


def not_accelerated(row: dict[str, Any], isa: list[str]) -> str | None:
    """The precision this row computes in, or its file asks for, that the CPU has no
    instructions to speed up: a bf16 IR that OpenVINO computed in fp32 on an AVX2 CPU is
    "bf16" here, since bf16 is what the file is for."""
    if (row.get("device") or "cpu").startswith("cuda"):
        return None
    for precision in (computed_precision(row), row.get("precision")):
        need = ACCELERATED_BY.get(str(precision))
        if need is not None and not any(n in isa for n in need):
            return str(precision)
    return None


def precision_text(row: dict[str, Any], isa: list[str]) -> str:
    text = row.get("precision") or "-"
    computed = computed_precision(row)
    if computed:
        text += f" (computes {computed})"
    return text + ("*" if not_accelerated(row, isa) else "")


def summary_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """The headline columns: p50 at the smallest batch, throughput at the largest."""
    out = []
    isa = list((report.get("system") or {}).get("cpu_isa") or [])
    for row in report["results"]:
        ev = row.get("eval") or {}
        small = latency_at(row, first=True)
        large = latency_at(row, first=False)
        out.append({
            "backend": row["backend"],
            "model": os.path.basename(row["model"]),
            "precision": precision_text(row, isa),
            "status": status_text(row),
            "size_mb": _fmt(row.get("size_mb"), ".2f"),
            "accuracy": _fmt(ev.get("accuracy_pct"), ".2f", "%"),
            "agreement": _fmt(ev.get("agreement_pct"), ".2f", "%"),
            "theta_shift": _fmt(ev.get("max_theta_shift_px"), ".2g", " px"),
            "stn": stn_text(ev.get("stn_health")),
            "p50": (_fmt(small["p50_ms"], ".3f") + f" (b{small['batch_size']})") if small else "-",
            "throughput": (_fmt(large["throughput_ips"], ",.0f") + f" (b{large['batch_size']})")
            if large else "-",
        })
    return out


HEADERS = (("backend", "Backend"), ("model", "Model"), ("precision", "Precision"),
           ("status", "Status"), ("size_mb", "Size (MB)"), ("accuracy", "Accuracy"),
           ("agreement", "Agreement"), ("theta_shift", "Theta shift"),
           ("stn", "STN theta spread"), ("p50", "p50 ms e2e"),
           ("throughput", "img/s e2e"))


def print_table(report: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console(stderr=False)
        if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
            console = Console(width=140)
    table = Table(title="stn-deploy bench", title_justify="left")
    for key, head in HEADERS:
        justify = "left" if key in ("backend", "model", "precision", "status") else "right"
        table.add_column(head, justify=justify, overflow="fold")
    for r in summary_rows(report):
        style = "red" if r["status"].startswith(("FAILED", "error")) \
            or r["stn"].startswith("COLLAPSED") else (
            "dim" if r["status"].startswith("skipped") else None)
        table.add_row(*(r[k] for k, _ in HEADERS), style=style)
    console.print(table)
    for line in footnotes(report):
        console.print(line, highlight=False)


def footnotes(report: dict[str, Any]) -> list[str]:
    notes = []
    ref = report.get("reference")
    if ref:
        notes.append(f"Reference for agreement: {ref['backend']} {ref['precision']} on "
                     f"{os.path.basename(ref['model'])}" + (f" ({ref['note']})" if ref.get("note")
                                                            else ""))
    data = report.get("eval_data")
    if data:
        notes.append(f"Accuracy on {data['dataset']} {data['split']} split, {data['n']} images.")
    isa = list((report.get("system") or {}).get("cpu_isa") or [])
    slow = sorted({p for r in report["results"] if (p := not_accelerated(r, isa))})
    if slow:
        notes.append(f"* {' and '.join(slow)}: not accelerated on this CPU "
                     f"({', '.join(isa) or 'no AVX2'}): "
                     + "; ".join(f"{p} needs {' or '.join(ACCELERATED_BY[p])}" for p in slow)
                     + ", so expect no speed-up over fp32 here.")
    notes.append("p50: end-to-end (host input to host output) median latency at the smallest "
                 "batch; img/s: batch / mean end-to-end latency at the largest batch.")
    if any((r.get("eval") or {}).get("max_theta_shift_px") is not None
           for r in report["results"]):
        notes.append("Theta shift: the largest move, over the images, of a sampling point "
                     "between this row's theta and the reference's, in pixels (the figure "
                     "export's verification bounds).")
    if any(((r.get("eval") or {}).get("stn_health") or {}).get("theta_spread_px") is not None
           for r in report["results"]):
        notes.append("STN theta spread: how far, RMS over the images and the frame, each "
                     "image's sampling points lie from the average theta's, in pixels; below "
                     "0.5 px theta does not depend on the input (COLLAPSED). '% undone': the "
                     "share of the known distortion's rotation spread the STN removes.")
    collapsed = [label(r) for r in report["results"]
                 if ((r.get("eval") or {}).get("stn_health") or {}).get("collapsed")]
    if collapsed:
        notes.append("COLLAPSED STN (theta is the same for every image, so the grid_sample path "
                     "carries no information): " + ", ".join(collapsed))
    sysinfo = report.get("system") or {}
    notes.append(f"Machine: {machine_text(sysinfo)}")
    busy = sysinfo.get("cpu_busy_pct_at_start")
    if busy is not None and busy >= BUSY_WARN_PCT:
        notes.append(f"The machine was busy when the runs started: other processes used "
                     f"{busy:.0f}% of the CPUs; latencies are inflated.")
    for name, reason in (report.get("skipped_backends") or {}).items():
        notes.append(f"skipped {name}: {reason}")
    return notes


# --------------------------------------------------------------------------------- files

def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, allow_nan=False, default=str) + "\n"


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    write_text_atomic(path, to_json(report))


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for row in report["results"]:
        ev = row.get("eval") or {}
        base = {
            "schema_version": report["schema_version"], "model": row["model"],
            "model_kind": row["model_kind"], "backend": row["backend"],
            "precision": row.get("precision"), "status": row["status"],
            "reason": row.get("reason") or ("; ".join(row.get("gate_failures") or []) or None),
            "device": row.get("device"), "library_version": row.get("library_version"),
            "threads": (row.get("runtime") or {}).get("threads"),
            "size_mb": row.get("size_mb"), "peak_rss_mb": row.get("peak_rss_mb"),
            "eval_n": ev.get("n"),
            **{k: ev.get(k) for k in EVAL_KEYS},
            "stn_theta_spread_px": (ev.get("stn_health") or {}).get("theta_spread_px"),
            "stn_collapsed": (ev.get("stn_health") or {}).get("collapsed"),
            "not_accelerated": row.get("not_accelerated"),
        }
        lats = row.get("latency") or [{}]
        for lat in lats:
            rows.append({**base, **{k: lat.get(k) for k in LATENCY_KEYS}})
    return rows


def to_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in csv_rows(report):
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def write_csv(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    write_text_atomic(path, to_csv(report))


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(h for _, h in HEADERS) + " |",
             "|" + "|".join("---" if k in ("backend", "model", "precision", "status") else "---:"
                            for k, _ in HEADERS) + "|"]
    for r in summary_rows(report):
        lines.append("| " + " | ".join(r[k].replace("|", "\\|") for k, _ in HEADERS) + " |")
    lines.append("")
    lines.extend(f"- {n}" for n in footnotes(report))
    lines.append(f"- Created {report.get('created')} with stn-deploy "
                 f"{report.get('tool_version')}.")
    return "\n".join(lines) + "\n"


def write_markdown(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    write_text_atomic(path, to_markdown(report))


def write_plot(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """p50 latency and throughput against batch size, one line per result (end-to-end solid,
    compute-only dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(11, 4.2))
    # One colour per result (the default cycle repeats after 10); its two modes share it.
    cmap = plt.get_cmap("tab20" if len(report["results"]) > 10 else "tab10")
    for i, row in enumerate(report["results"]):
        color = cmap(i % cmap.N)
        for mode, style in (("end_to_end", "-"), ("compute_only", "--")):
            pts = sorted((r["batch_size"], r["p50_ms"], r["throughput_ips"])
                         for r in row.get("latency") or [] if r["mode"] == mode)
            if not pts:
                continue
            name = label(row) + ("" if mode == "end_to_end" else " compute-only")
            bs = [p[0] for p in pts]
            ax_lat.plot(bs, [p[1] for p in pts], style, marker="o", color=color, label=name)
            ax_tp.plot(bs, [p[2] for p in pts], style, marker="o", color=color)
    for ax, title, ylabel in ((ax_lat, "p50 latency", "ms"),
                              (ax_tp, "Throughput (batch / mean latency)", "images/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax_lat.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    system = report.get("system") or {}
    fig.suptitle(f"stn-deploy bench on {system.get('gpu') or system.get('cpu')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.03 * math.ceil(len(handles) / 2), 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
