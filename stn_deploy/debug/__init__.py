"""When a deployed form disagrees: name the node, the STN stage, and the fix.

The Python API of ``stn-deploy debug compare``, ``debug precision`` and ``profile``. Nothing
heavy is imported until a function runs.

- ``compare(suspect, reference)``: every intermediate tensor of SUSPECT (ONNX file or
  TensorRT plan) against REF (checkpoint or FP32 ONNX), per node with its STN stage; the
  first divergent node and the likely fix (``stn_deploy.debug.comparison``).
- ``find_keep_float(fp32, precision)``: the nodes an FP16/INT8 variant must keep in float to
  meet its gates (``stn_deploy.debug.precision``).
- ``profile(model, backend)``: per-node and per-stage time from the runtime's own profiler
  (``stn_deploy.debug.profiling``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stn_deploy.debug.comparison import CompareReport
    from stn_deploy.debug.precision import PrecisionResult
    from stn_deploy.debug.profiling import ProfileReport

PathLike = str | os.PathLike[str]


def compare(suspect: PathLike, reference: PathLike | None = None, *, samples: int | None = 256,
            data_dir: str | None = None, atol: float | None = None, rtol: float | None = None,
            threads: int | None = None) -> "CompareReport":
    """SUSPECT against REF on the model's own test images (``samples`` of them, None: all);
    ``report.first`` is the first divergent node, ``report.fix`` what to do about it."""
    from stn_deploy.debug.comparison import compare_files

    return compare_files(suspect, reference, samples=samples, data_dir=data_dir, atol=atol,
                         rtol=rtol, threads=threads)


def find_keep_float(fp32: PathLike, precision: str, *, variant: PathLike | None = None,
                    samples: int | None = None, data_dir: str | None = None,
                    calib_dir: str | None = None, calib_samples: int = 500,
                    threads: int | None = None) -> "PrecisionResult":
    """The nodes to keep in float (``result.keep_float``) for the ``precision`` variant of
    the FP32 graph to meet its gates; ``variant`` repairs an existing INT8 QDQ graph."""
    from stn_deploy.debug.precision import find_keep_float as find

    return find(fp32, precision, variant=variant, samples=samples, data_dir=data_dir,
                calib_dir=calib_dir, calib_samples=calib_samples, threads=threads)


def profile(model: PathLike, backend: str = "onnxruntime",
            batch_sizes: tuple[int, ...] = (1, 64), *, iterations: int = 20, warmup: int = 5,
            threads: int | None = None) -> "ProfileReport":
    """Per-node and per-STN-stage kernel time of ``model`` on ``backend`` (onnxruntime,
    openvino or trt) at each batch size."""
    from stn_deploy.debug.profiling import profile_model

    return profile_model(model, backend, batch_sizes, iterations=iterations, warmup=warmup,
                         threads=threads)


__all__ = ["compare", "find_keep_float", "profile"]
