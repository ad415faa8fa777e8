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

from stn_deploy.errors import StnDeployError

if TYPE_CHECKING:
    from torch import nn

    from stn_deploy.backends.base import Runner
    from stn_deploy.checkpoint import Checkpoint
    from stn_deploy.export.pipeline import ExportResult
    from stn_deploy.export.verify import VerifyReport

PathLike = str | os.PathLike[str]


def load_checkpoint(path: PathLike) -> "Checkpoint":
    """An stn-deploy training checkpoint (config, weights, history); ``.model()`` builds it."""
    from stn_deploy.checkpoint import load_checkpoint as load

    return load(path)


def export_model(model: "PathLike | nn.Module", out: PathLike, *,
           input_shape: Sequence[int] | None = None, opset: int = 17, precision: str = "fp32",
           images: Any = None, labels: Any = None, calib_images: Any = None,
           extra_outputs: Sequence[str] = (), mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None, class_names: Sequence[str] | None = None,
           dataset: str = "custom", exporter: str | None = None,
           static_batch: int | None = None, quiet: bool = True) -> "ExportResult":
    """A verified ONNX file at exactly ``opset`` and ``precision``, written only if every
    check passed.

    ``model``: an stn-deploy checkpoint path (verified on its own dataset, as
    ``stn-deploy export CHECKPOINT``), or any ``nn.Module`` with ``input_shape`` (C, H, W):
    ``F.affine_grid`` becomes a constant grid, the sampling path stays FP32 in FP16/INT8, and
    outputs and every GridSample's grid are checked against PyTorch on ``images`` (uint8
    NCHW; None: random inputs, with a warning). ``extra_outputs`` names the model's outputs
    after the logits (e.g. ("theta",)); each is exported and compared too."""
    from torch import nn

    echo = (lambda _line: None) if quiet else print
    if isinstance(model, nn.Module):
        from stn_deploy.custom import export_module

        if input_shape is None:
            raise StnDeployError("export of an nn.Module needs input_shape=(C, H, W)")
        return export_module(model, out, input_shape=input_shape, opset=opset,
                             precision=precision, images=images, labels=labels,
                             calib_images=calib_images, extra_outputs=extra_outputs, mean=mean,
                             std=std, class_names=class_names, dataset=dataset,
                             exporter=exporter, static_batch=static_batch, echo=echo)
    from stn_deploy.export.pipeline import ExportRequest, run_export

    req = ExportRequest(checkpoint=Path(model), precision=precision, opset=opset,
                        out=Path(out), exporter=exporter, static_batch=static_batch,
                        with_theta="theta" in extra_outputs)
    return run_export(req, echo=echo)


def verify(artifact: PathLike, model: "PathLike | nn.Module", images: Any,
           labels: Any = None, *, extra_outputs: Sequence[str] = (),
           backend: str = "onnxruntime") -> "VerifyReport":
    """Hold an exported ONNX file to PyTorch on ``images`` (uint8 NCHW), at the tolerances of
    the file's precision: logits, theta (if both have it), named ``extra_outputs`` and, for an
    ``nn.Module``, every GridSample's grid."""
    import numpy as np
    from torch import nn

    from stn_deploy.artifacts import config_from_onnx, onnx_precision
    from stn_deploy.custom import as_images, torch_outputs, verify_module
    from stn_deploy.export.verify import TOLERANCES, torch_reference, verify_file

    config = config_from_onnx(artifact)
    tol = TOLERANCES[onnx_precision(artifact)]
    arr = as_images(images, config)
    lab = None if labels is None else np.asarray(labels)
    if isinstance(model, nn.Module):
        reference = torch_outputs(model, arr, config, extra_outputs)
        return verify_module(artifact, reference, arr, lab, config, tol, backend)
    return verify_file(artifact, torch_reference(model, arr), arr, lab, config, tol, backend)


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
          data_dir: PathLike | None = None) -> dict[str, Any]:
    """Every model on every backend (None: the defaults of each model's kind; "all"): the
    report dict ``stn-deploy bench --json`` writes (schema in ``stn_deploy.report``)."""
    from stn_deploy.bench import BenchRequest, run_bench
    from stn_deploy.harness import BenchSettings

    settings = BenchSettings(batch_sizes=tuple(batch_sizes), iterations=iterations,
                             warmup=warmup, threads=threads)
    chosen = backends if backends is None or isinstance(backends, str) else tuple(backends)
    return run_bench(BenchRequest(models=[Path(m) for m in models], backends=chosen,
                                  settings=settings, eval_samples=eval_samples,
                                  data_dir=None if data_dir is None else str(data_dir)))


__all__ = ["bench_models", "export_model", "load_checkpoint", "open_runner", "verify"]
