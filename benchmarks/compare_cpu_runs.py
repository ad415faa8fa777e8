"""Side by side: several benchmarks/cpu_backends.py results of the same checkpoint on one machine.

Why it exists: issue 13 asks whether the reshape (one verification path, the bench library)
moved any CPU figure. Only runs on the same CPU compare, and this machine drifts by 20-30%
over minutes, so the evidence is interleaved runs of the code before and after
(before, after, before, after), each row's spread within a version against the gap between them.

    python benchmarks/with_checkout.py ../before ../before/benchmarks/cpu_backends.py --out b1.json
    python benchmarks/cpu_backends.py --out a1.json     # and again: b2, a2
    python benchmarks/compare_cpu_runs.py --name reshape_ab before1=b1.json after1=a1.json ...
Writes benchmarks/results/cpu_backends_<name>.md (and copies nothing: the inputs stay where
they are; keep them beside it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from _provenance import write_markdown


def rows(path: Path) -> dict[str, dict[str, Any]]:
    """Row label -> accuracy, agreement, p50 at the smallest batch, img/s at the largest."""
    report = json.loads(path.read_text())
    out = {}
    for r in report["results"]:
        if r["status"] != "ok":
            continue
        label = " ".join([r["backend"], r["precision"], *r.get("notes", [])])
        lat = sorted(r["latency"], key=lambda x: x["batch_size"])
        out[label] = {"accuracy": r["eval"]["accuracy_pct"],
                      "agreement": r["eval"]["agreement_pct"],
                      "p50_b1": lat[0]["p50_ms"], "ips_max": lat[-1]["throughput_ips"],
                      "batches": (lat[0]["batch_size"], lat[-1]["batch_size"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("runs", nargs="+", help="TAG=cpu_backends.json; the tag's letters before "
                                            "its digits name the version (before1 -> before)")
    args = ap.parse_args()
    runs = {}
    for item in args.runs:
        tag, _, path = item.partition("=")
        runs[tag] = rows(Path(path))
    versions: dict[str, list[str]] = {}
    for tag in runs:
        versions.setdefault(tag.rstrip("0123456789"), []).append(tag)
    labels = [lab for lab in next(iter(runs.values())) if all(lab in r for r in runs.values())]
    head = ["Row", "Accuracy", "Agreement"]
    for metric in ("p50 ms b1", "img/s bmax"):
        head += [f"{metric} {t}" for t in runs]
        head += [f"{metric} {v} / {w}" for v, w in [tuple(versions)]] if len(versions) == 2 \
            else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for lab in labels:
        cells = [lab, " / ".join(sorted({f"{r[lab]['accuracy']:.2f}%" for r in runs.values()})),
                 " / ".join(sorted({f"{r[lab]['agreement']:.2f}%" for r in runs.values()}))]
        for key, fmt in (("p50_b1", "{:.3f}"), ("ips_max", "{:,.0f}")):
            cells += [fmt.format(runs[t][lab][key]) for t in runs]
            if len(versions) == 2:
                a, b = (statistics.median(runs[t][lab][key] for t in tags)
                        for tags in versions.values())
                cells.append(f"{a / b:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(runs.values()))[labels[0]]["batches"]
    note = (f"\nBatch sizes {first[0]} and {first[1]}. Accuracy and agreement list every "
            f"distinct value across the runs. The ratio column divides the medians of the two "
            f"versions ({' / '.join(versions)}); 1.00 = unchanged.\n")
    out = write_markdown(f"cpu_backends_{args.name}", "\n".join(lines) + "\n" + note)
    print(out.read_text())


if __name__ == "__main__":
    main()
