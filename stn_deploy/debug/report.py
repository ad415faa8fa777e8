"""How the debug tools' results read: terminal lines and pictures.

The plots shade the STN stages along the graph, so "where" is the first thing a reader sees.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stn_deploy.debug.comparison import CompareReport, Row
    from stn_deploy.debug.profiling import ProfileReport

STAGE_COLORS = {"input": "#dddddd", "localization": "#cfe2f3", "theta": "#f4cccc",
                "grid": "#fce5cd", "sampler": "#d9ead3", "classifier": "#ead1dc"}
NAME_WIDTH = 46


def short(name: str, width: int = NAME_WIDTH) -> str:
    """A node name cut from the left (the end of a path-like name is its most specific)."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _num(v: float | None, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def row_line(r: "Row") -> str:
    status = "DIVERGES" if r.diverged else "ok"
    return (f"  {short(r.node):<{NAME_WIDTH}} {r.op_type[:12]:<12} {r.stage:<12} "
            f"{_num(r.max_abs):>9} {_num(r.rel_l2):>9} {r.cosine:>8.5f} "
            f"{_num(r.displacement_px):>8}  {status}")


def compare_lines(report: "CompareReport", top: int) -> list[str]:
    first = report.first
    out = [f"{report.suspect} ({report.precision}) against {report.reference} on "
           f"{report.inputs}",
           f"bounds: {report.bounds.text()}"]
    for note in report.notes:
        out.append(f"note: {note}")
    out.append(f"  {'node':<{NAME_WIDTH}} {'op':<12} {'stage':<12} {'max abs':>9} "
               f"{'rel L2':>9} {'cosine':>8} {'px':>8}  status")
    shown = [r for r in report.rows if r.diverged][:top] or sorted(
        report.rows, key=lambda r: -r.rel_l2)[:top]
    order = {id(r): i for i, r in enumerate(report.rows)}
    out += [row_line(r) for r in sorted(shown, key=lambda r: order[id(r)])]
    hidden = sum(r.diverged for r in report.rows) - sum(r.diverged for r in shown)
    if hidden > 0:
        out.append(f"  ... {hidden} more divergent nodes (--json has them all)")
    out.append("stages: " + "; ".join(
        f"{s} {v['diverged']}/{v['nodes']} diverge"
        + (f", max {v['max_px']:.3g} px" if v["max_px"] is not None else "")
        for s, v in report.stages().items()))
    if report.end_to_end:
        e = report.end_to_end
        out.append(f"end to end ({e['output']}, as deployed): max |d| {e['max_abs']:.3g}, "
                   f"top-1 agreement {100 * e['top1_agreement']:.2f}%")
    if report.unmatched:
        out.append(f"no counterpart in SUSPECT: {', '.join(report.unmatched[:5])}"
                   + (f" (+{len(report.unmatched) - 5})" if len(report.unmatched) > 5 else ""))
    if report.only_in_suspect:
        out.append(f"only in SUSPECT: {', '.join(report.only_in_suspect[:5])}"
                   + (f" (+{len(report.only_in_suspect) - 5})"
                      if len(report.only_in_suspect) > 5 else ""))
    if first is None:
        out.append(f"PASSED: no node diverges ({len(report.rows)} compared)")
    else:
        px = (f", points moved {first.displacement_px:.4g} px" if first.displacement_px
              is not None and "points moved" not in first.reason else "")
        out.append(f"FAILED: first divergent node {first.node} ({first.op_type}) in the "
                   f"{first.stage} stage{px}: {first.reason}")
        if report.fix:
            out.append(f"fix: {report.fix}")
        worst = max((r for r in report.rows if r.diverged), key=lambda r: r.jump)
        if worst is not first and worst.jump > max(first.jump, 0.0) * 2:
            out.append(f"largest error added further on: {worst.node} ({worst.op_type}, "
                       f"{worst.stage}), ||d||/||ref|| +{worst.jump:.3g} over its inputs "
                       f"({worst.reason}); compare again once the first is fixed")
    return out


def _shade(ax: Any, stages: list[str]) -> None:
    """Shade contiguous runs of one stage along the x axis, labelled once each."""
    labelled: set[str] = set()
    start = 0
    for i in range(1, len(stages) + 1):
        if i == len(stages) or stages[i] != stages[start]:
            s = stages[start]
            ax.axvspan(start - 0.5, i - 0.5, color=STAGE_COLORS.get(s, "#eeeeee"), alpha=0.8,
                       label=None if s in labelled else s, lw=0)
            labelled.add(s)
            start = i


def compare_plot(report: "CompareReport", path: str | os.PathLike[str]) -> None:
    """1 - cosine similarity and the relative L2 error along the graph, the points' shift in
    pixels on the right, stages shaded, the first divergent node marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stn_deploy.fileio import atomic_path

    rows = report.rows
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(8.0, len(rows) * 0.16), 4.8))
    _shade(ax, [r.stage for r in rows])
    floor = 1e-12
    ax.plot(x, [max(1.0 - r.cosine, floor) for r in rows], "o-", ms=3, color="#1f4e79",
            label="1 - cosine")
    ax.plot(x, [max(r.rel_l2, floor) for r in rows], "s--", ms=3, color="#7f6000",
            label="||d|| / ||ref||")
    px = [(i, r.displacement_px) for i, r in enumerate(rows) if r.displacement_px is not None]
    if px:
        right = ax.twinx()
        right.plot([i for i, _ in px], [v for _, v in px], "D", ms=5, color="#990000",
                   label="points moved (px)")
        right.axhline(report.bounds.px, color="#990000", lw=0.8, ls=":")
        right.set_ylabel("points moved (px)", color="#990000")
        right.set_ylim(bottom=0)
        right.legend(fontsize=7, loc="upper right")
    first = report.first
    if first is not None:
        i = rows.index(first)
        ax.axvline(i, color="#cc0000", lw=1.5, label=f"first divergent: {short(first.node, 40)}")
    ax.set_yscale("log")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_xlabel("node (topological order)")
    ax.set_ylabel("error against REF")
    ax.set_title(f"{report.suspect} against {report.reference}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def profile_lines(report: "ProfileReport", top: int) -> list[str]:
    out = [f"{report.model}: {report.threads} threads, {report.inputs}"]
    out += [f"note: {n}" for n in report.notes]
    for run in report.runs:
        out.append(f"{run.backend} {run.version}, batch {run.batch_size}, {run.iterations} runs: "
                   f"{run.wall_ms:.3g} ms a run (wall), {run.kernel_ms:.3g} ms in kernels")
        out.append("  " + "  ".join(f"{s} {100 * v:.1f}%" for s, v in run.shares.items()))
        out.append(f"  the spatial transformer (localization, theta, grid, sampler) takes "
                   f"{100 * run.stn_share:.1f}% of the kernel time")
        for k in run.kernels[:top]:
            name = k.nodes[0] if k.nodes else k.name
            fused = f" (+{len(k.nodes) - 1} fused)" if len(k.nodes) > 1 else ""
            out.append(f"    {short(name + fused):<{NAME_WIDTH}} {k.op_type[:18]:<18} "
                       f"{k.stage:<12} {k.ms:8.3f} ms")
        if run.unmapped:
            out.append(f"  {len(run.unmapped)} runtime-inserted kernels (layout reorders) "
                       "counted with the kernel before them")
    return out


def profile_plot(report: "ProfileReport", path: str | os.PathLike[str]) -> None:
    """Each batch size's kernel time as one bar split by stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stn_deploy.debug.stages import STAGES
    from stn_deploy.fileio import atomic_path

    runs = report.runs
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(runs) + 3), 4.0))
    labels = [f"{r.backend}\nbatch {r.batch_size}" for r in runs]
    bottom = [0.0] * len(runs)
    for stage in STAGES:
        values = [100 * r.shares.get(stage, 0.0) for r in runs]
        if not any(values):
            continue
        ax.bar(labels, values, bottom=bottom, color=STAGE_COLORS[stage], edgecolor="#555555",
               label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("share of kernel time (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Where {os.path.basename(report.model)} spends its time")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
