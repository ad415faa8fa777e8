"""Where a benchmark result came from, and the one way every script here writes its results.

A figure without its machine, code and libraries cannot be compared with another: these CPUs
differ by AVX-512, VNNI, AVX512_BF16 and AMX, which decide the kernels OpenVINO and ONNX
Runtime pick (OpenVINO runs bf16 by default where AMX is), and a checkout with uncommitted
changes is not the commit it names. So every script writes ``provenance()`` into its JSON and
heads its markdown with ``provenance_line()``, through ``write_results``.

The machine facts come from the package's own readers (``stn_deploy.harness``, the same that
fill ``stn-deploy bench``'s "system"), so there is one place for each; what only a checkout
has (the git commit) is read here.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CHECKOUT = RESULTS.parents[1]


def git_state(root: Path = CHECKOUT) -> dict[str, Any]:
    """{"commit": full hash or None, "dirty": tracked files changed (None: unknown)}."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                 text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def torch_threads() -> int | None:
    """torch's intra-op threads, if the script has imported torch (importing it here would
    cost seconds for scripts that never use it)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def provenance() -> dict[str, Any]:
    """Time (UTC), checkout, CPU and its ISA, threads and library versions of this run."""
    from stn_deploy.backends.base import available_cpus, cpu_name
    from stn_deploy.harness import cpu_isa, library_versions

    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "cpu": cpu_name(),
        "cpu_isa": cpu_isa(),
        "cpus_available": available_cpus(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
    }


def provenance_line(prov: dict[str, Any], verb: str = "Measured") -> str:
    """The markdown's first fact line: date, CPU and its ISA, CPUs and threads, commit."""
    git = prov.get("git") or {}
    commit = (git.get("commit") or "unknown")[:9] + (" with local changes" if git.get("dirty")
                                                      else "")
    threads = (f", torch {prov['torch_threads']} threads"
               if prov.get("torch_threads") is not None else "")
    isa = ", ".join(prov.get("cpu_isa") or []) or "no AVX2"
    when = prov["time"].replace("T", " ").replace("+00:00", " UTC")
    return (f"_{verb} {when} on {prov['cpu']} ({isa}), {prov['cpus_available']} of "
            f"{prov['cpu_count']} CPUs{threads}; commit {commit}_")


def _headed(markdown: str, line: str) -> str:
    """``line`` under the markdown's "# title" if it starts with one, else on top."""
    lines = markdown.strip("\n").split("\n")
    title = lines[:1] if lines[0].startswith("# ") else []
    body = lines[len(title):]
    while body and not body[0].strip():
        body.pop(0)
    return "\n".join([*title, *([""] if title else []), line, "", *body]).rstrip() + "\n"


def write_results(name: str, doc: dict[str, Any], markdown: str,
                  folder: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``folder/name.json`` (``doc`` with "provenance" first) and ``folder/name.md``
    (``markdown`` headed by the provenance line), each atomically; return both paths.

    ``name`` may carry a ".json" or ".md" suffix (a script's ``--out``); it is dropped."""
    from stn_deploy.fileio import write_text_atomic

    stem = name.removesuffix(".json").removesuffix(".md")
    prov = provenance()
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    write_text_atomic(json_path, json.dumps({"provenance": prov, **doc}, indent=2,
                                            default=str) + "\n")
    write_text_atomic(md_path, _headed(markdown, provenance_line(prov)))
    return json_path, md_path


def write_markdown(name: str, markdown: str, folder: Path = RESULTS) -> Path:
    """A markdown-only summary of other result files (which carry the measurements' own
    provenance), headed by when, where and from which commit it was summarised."""
    from stn_deploy.fileio import write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.removesuffix('.md')}.md"
    write_text_atomic(path, _headed(markdown, provenance_line(provenance(), "Summarised")))
    return path


if __name__ == "__main__":  # for shell scripts: python benchmarks/_provenance.py [FILE]
    text = json.dumps(provenance(), indent=2) + "\n"
    if len(sys.argv) > 1:
        from stn_deploy.fileio import write_text_atomic

        write_text_atomic(sys.argv[1], text)
    else:
        print(text, end="")
