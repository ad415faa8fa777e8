"""Run a script against the stn_deploy of another checkout of this repository.

Why it exists: before/after comparisons (benchmarks/compare_cpu_runs.py) need the old code in
the same environment, and the venv's editable install finds this checkout's package ahead of
PYTHONPATH. This drops that finder and puts CHECKOUT first.

    git worktree add ../before 85c72e9
    python benchmarks/with_checkout.py ../before ../before/benchmarks/cpu_backends.py --out b.json
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: with_checkout.py CHECKOUT SCRIPT [ARGS...]")
    root = str(Path(sys.argv[1]).resolve())
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, root)
    import stn_deploy

    if not stn_deploy.__file__ or not stn_deploy.__file__.startswith(root):
        sys.exit(f"stn_deploy still comes from {stn_deploy.__file__}, not {root}")
    sys.argv = sys.argv[2:]
    # As `python SCRIPT` would: the script's folder first, for its own helpers (_provenance).
    sys.path.insert(0, str(Path(sys.argv[0]).resolve().parent))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
