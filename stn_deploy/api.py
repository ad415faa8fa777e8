"""The Python API: the same functions the CLI runs, for scripts and notebooks.

Re-exported lazily by ``stn_deploy``, so ``import stn_deploy`` stays light. The names are
``export_model`` and ``bench_models``, not ``export`` and ``bench``: those are the
``stn_deploy.export`` and ``stn_deploy.bench`` modules. Your own model, end to end, on the
bundled digits:

>>> import tempfile
>>> from pathlib import Path
>>> import torch
>>> import stn_deploy
>>> from stn_deploy.data import load_dataset, normalize
>>> from stn_deploy.examples import tutorial_mnist_stn
>>> digits = load_dataset("digits", image_size=28)
>>> _ = torch.manual_seed(0)
>>> model = tutorial_mnist_stn()
>>> out = Path(tempfile.mkdtemp()) / "tutorial.onnx"
>>> result = stn_deploy.export_model(model, out, input_shape=(1, 28, 28), opset=16,
...                                  images=digits.test.images[:64],
...                                  labels=digits.test.labels[:64])
>>> result.report.passed, [name for name, _, ok in result.report.checks if ok]
(True, ['logits', 'agreement', 'grid0'])
>>> with stn_deploy.open_runner(out) as runner:
...     runner.infer(normalize(digits.test.images[:4], runner.config).numpy())["logits"].shape
(4, 10)
>>> report = stn_deploy.bench_models([out], ["onnxruntime"], batch_sizes=(1,), iterations=3,
...                                  eval_samples=64)
>>> [(row["backend"], row["status"]) for row in report["results"]]
[('onnxruntime', 'ok')]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stn_deploy.export.request import CALIB_SAMPLES

if TYPE_CHECKING:
    from torch import nn

    from stn_deploy.backends.base import Runner
    from stn_deploy.checkpoint import Checkpoint
    from stn_deploy.pretrained import Pretrained
    from stn_deploy.export.pipeline import ExportResult
    from stn_deploy.export.verify import VerifyReport

PathLike = str | os.PathLike[str]


def load_checkpoint(path: PathLike) -> "Checkpoint":
    """An stn-deploy training checkpoint (config, weights, history); ``.model()`` builds it."""
    from stn_deploy.checkpoint import load_checkpoint as load

    return load(path)


def pretrained_model(name: str) -> "Pretrained":
    """A model stn-deploy ships trained (``cifar10-stn``): its checkpoint and verified FP32
    ONNX paths (checked against its record's hashes), its model card and record;
    ``.model()`` builds the torch module. ``export_model(pretrained_model(name).checkpoint)``
    exports it as ``stn-deploy export --pretrained NAME`` does."""
    from stn_deploy.pretrained import pretrained

    return pretrained(name)


def export_model(model: "PathLike | nn.Module | None" = None, out: PathLike | None = None,
                 *, pretrained: str | None = None, input_shape: Sequence[int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 class_names: Sequence[str] | None = None, extra_outputs: Sequence[str] = (),
                 weights: PathLike | None = None, dataset: str | None = None,
                 format: str = "onnx", precision: str = "fp32", opset: int = 17,
                 static_batch: int | None = None, with_theta: bool = False,
                 embed_preprocess: bool = False, exporter: str | None = None,
                 affine_grid_op: bool = False, target: str | None = None,
                 keep_float: "PathLike | Sequence[str] | None" = None,
                 quantizer: str | None = None, max_accuracy_drop: float | None = None,
                 images: Any = None, labels: Any = None, calib_images: Any = None,
                 data_dir: PathLike | None = None, calib_dir: PathLike | None = None,
                 verify_samples: int | str | None = None,
                 calib_samples: int | str | None = CALIB_SAMPLES,
                 trt_profile: Sequence[int] | None = None, workspace_mb: int | None = None,
                 timing_cache: PathLike | None = None, quiet: bool = True) -> "ExportResult":
    """A verified ONNX file (or TensorRT plan, ``format="trt"``) at exactly ``opset`` and
    ``precision``, written only if every check passed: ``stn-deploy export`` in Python, with
    the same options under the same names (``--calib-dir`` is ``calib_dir=``), and each
    refused by name (StnDeployError) where it cannot mean anything.

    ``pretrained``: a shipped model's name (``pretrained_model``) instead of ``model``.
    ``model``: an stn-deploy checkpoint path (verified on its own dataset), or any
    ``nn.Module`` with ``input_shape`` (C, H, W): ``F.affine_grid`` becomes a constant grid,
    the sampling path stays FP32 in FP16/INT8, and outputs and every GridSample's grid are
    checked against PyTorch. ``mean``, ``std``, ``class_names``, ``extra_outputs`` (the
    module's outputs after the logits, each exported and compared), ``weights`` and
    ``dataset`` describe a module; a checkpoint carries them and refuses them.

    ``images`` (uint8 NCHW) and ``labels``: verify on these instead of the test split (a
    module without them: random inputs, with a warning); ``calib_images``: INT8 calibration
    images instead of the train split. ``keep_float``: nodes FP16/INT8 leave in float too
    (``debug precision``'s JSON file, or the names); ``quantizer``: ``"onnxruntime"`` or
    ``"nncf"`` for INT8; ``max_accuracy_drop``: NNCF's accuracy control, in points.
    ``format="openvino"``: OpenVINO IR (``.xml`` + ``.bin``). ``verify_samples`` /
    ``calib_samples``: a number or "all" (None: all). ``out``: None: ``export/<name>-opset<N>-<precision>.onnx``."""
    from stn_deploy.export.pipeline import run_export
    from stn_deploy.export.request import ExportRequest

    path = isinstance(model, (str, os.PathLike))
    req = ExportRequest(
        checkpoint=Path(model) if path else None, module=None if path else model,
        pretrained=pretrained,
        weights=weights, input_shape=input_shape, mean=mean, std=std,
        class_names=class_names, extra_outputs=tuple(extra_outputs), dataset=dataset,
        format=format, precision=precision, opset=opset, out=out, static_batch=static_batch,
        with_theta=with_theta, embed_preprocess=embed_preprocess, exporter=exporter,
        affine_grid_op=affine_grid_op, target=target, keep_float=keep_float,
        quantizer=quantizer, max_accuracy_drop=max_accuracy_drop, data_dir=data_dir,
        calib_dir=calib_dir,
        verify_samples=verify_samples, calib_samples=calib_samples, images=images,
        labels=labels, calib_images=calib_images, trt_profile=trt_profile,
        workspace_mb=workspace_mb, timing_cache=timing_cache, caller="api")
    return run_export(req, echo=(lambda _line: None) if quiet else print)


def verify(artifact: PathLike, model: "PathLike | nn.Module", images: Any,
           labels: Any = None, *, extra_outputs: Sequence[str] = (),
           backend: str = "onnxruntime") -> "VerifyReport":
    """Hold an exported ONNX file to PyTorch on ``images`` (uint8 NCHW), at the tolerances of
    the file's precision: logits, theta (if both have it), named ``extra_outputs`` and, for an
    ``nn.Module``, every GridSample's grid."""
    import numpy as np
    from torch import nn

    from stn_deploy.artifacts import config_from_onnx, onnx_precision
    from stn_deploy.export.user_module import torch_outputs
    from stn_deploy.export.verify import (TOLERANCES, Images, Reference, as_images,
                                          torch_reference, verify_export)

    config = config_from_onnx(artifact)
    tol = TOLERANCES[onnx_precision(artifact)]
    arr = as_images(images, config)
    data = Images(arr, None if labels is None else np.asarray(labels), "the given images")
    if isinstance(model, nn.Module):
        reference = torch_outputs(model, arr, config, extra_outputs)
    else:
        reference = Reference(torch_reference(model, arr))
    return verify_export(artifact, reference, data, config, tol, backend)


def open_runner(artifact: PathLike, backend: str | None = None, **options: Any) -> "Runner":
    """Any artifact (checkpoint, ONNX, TensorRT plan) as a runner of ``backend`` [default:
    the first default backend of its kind]; use it as a context manager, then ``infer``."""
    from stn_deploy.artifacts import model_kind
    from stn_deploy.backends import DEFAULT_BACKENDS, create_runner

    name = backend or DEFAULT_BACKENDS[model_kind(artifact)][0]
    return create_runner(name, artifact, **options)


def bench_models(models: Sequence[PathLike], backends: Sequence[str] | str | None = None, *,
          batch_sizes: Sequence[int] = (1, 8, 64, 256), iterations: int | None = 100,
          warmup: int = 10, threads: int | None = None, eval_samples: int | None = None,
          data_dir: PathLike | None = None, ov_hint: str = "latency",
          ov_precision: str = "fp32") -> dict[str, Any]:
    """Every model on every backend (None: the defaults of each model's kind; "all"): the
    report dict ``stn-deploy bench --json`` writes (schema in ``stn_deploy.report``).
    ``ov_hint`` and ``ov_precision``: bench's ``--ov-hint`` and ``--ov-precision``."""
    from stn_deploy.bench import BenchRequest, run_bench
    from stn_deploy.harness import BenchSettings

    settings = BenchSettings(batch_sizes=tuple(batch_sizes), iterations=iterations,
                             warmup=warmup, threads=threads)
    chosen = backends if backends is None or isinstance(backends, str) else tuple(backends)
    return run_bench(BenchRequest(models=[Path(m) for m in models], backends=chosen,
                                  settings=settings, eval_samples=eval_samples,
                                  data_dir=None if data_dir is None else str(data_dir),
                                  ov_hint=ov_hint, ov_precision=ov_precision))


if TYPE_CHECKING:
    from threading import Event


def serve(model: PathLike, *, backend: str | None = None, model_name: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 32,
          queue_delay_us: int | None = None, max_queue: int = 0, threads: int | None = None,
          instances: int = 1, stop: "Event | None" = None) -> None:
    """Serve ``model`` (an .onnx file, a checkpoint, or a ``python-*`` repository folder) on
    the ``[serve]`` extra's tritonserver, as ``stn-deploy serve`` does, until SIGINT/SIGTERM
    or, from another thread, until ``stop`` is set; tritonserver's whole process group is
    stopped before this returns. ``backend``: "onnxruntime" (None) or "openvino", run inside
    Triton's Python-backend stub; gRPC listens on ``port + 1``, metrics on ``port + 2``;
    ``queue_delay_us`` None: the batcher's default (QUEUE_DELAY_US)."""
    from stn_deploy.errors import StnDeployError
    from stn_deploy.serving.serve import ServeOptions
    from stn_deploy.serving.serve import serve as run
    from stn_deploy.serving.triton_repo import QUEUE_DELAY_US

    queue_delay_us = QUEUE_DELAY_US if queue_delay_us is None else queue_delay_us
    # The CLI's option types check these; a script gets the same refusals by name.
    for name, value, low, high in (("port", port, 1, 65533), ("instances", instances, 1, 16),
                                   ("max_batch_size", max_batch_size, 1, None),
                                   ("queue_delay_us", queue_delay_us, 0, None),
                                   ("max_queue", max_queue, 0, None),
                                   ("threads", 1 if threads is None else threads, 1, None)):
        if value < low or (high is not None and value > high):
            raise StnDeployError(f"{name}={value}: give {low}"
                                 + (f" to {high}" if high is not None else " or more"))
    run(ServeOptions(model=Path(model), backend=backend, name=model_name, host=host, port=port,
                     max_batch=max_batch_size, queue_delay_us=queue_delay_us,
                     max_queue=max_queue, threads=threads, instances=instances), stop=stop)


__all__ = ["bench_models", "export_model", "load_checkpoint", "open_runner", "pretrained_model",
           "serve", "verify"]
