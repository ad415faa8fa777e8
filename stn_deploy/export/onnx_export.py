"""Exact-opset ONNX export of the STN classifier.

The model's affine grid is a constant and a MatMul, so the graph needs only GridSample from
the STN family; GridSample exists from opset 16. The written file's opset is checked after
writing: asking for N and getting anything else is an error, never a silent substitution.

Two exporters: TorchScript (``dynamo=False``, deprecated by torch but writes 16-20 exactly) and
dynamo, which writes 18-20 itself; for 16 and 17 its opset-18 graph is brought down by
``downconvert`` (our own adapters, since onnx.version_converter fails on these graphs).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from stn_deploy.artifacts import set_metadata
from stn_deploy.config import ModelConfig, flat_metadata
from stn_deploy.errors import StnDeployError, error_line
from stn_deploy.fileio import atomic_path
from stn_deploy.model import Normalize, STNClassifier
from stn_deploy.version import __version__

if TYPE_CHECKING:
    import onnx

MIN_OPSET = 16
DYNAMO_MIN_OPSET = 18  # lower opsets come from downconvert
EXPORTERS = ("torchscript", "dynamo")
AFFINE_GRID_OP_MIN_OPSET = 20
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
THETA_NAME = "theta"


@dataclass(frozen=True)
class OnnxOptions:
    opset: int = 17
    static_batch: int | None = None  # None: dynamic batch dimension
    with_theta: bool = False
    embed_preprocess: bool = False  # graph takes uint8 NHWC and normalises inside
    exporter: str | None = None  # None: torchscript while torch has it, else dynamo
    affine_grid_op: bool = False  # F.affine_grid -> the AffineGrid op (opset 20+)


class _TorchAffineGrid(nn.Module):
    """The STN's grid through ``F.affine_grid``, so the exporters write the AffineGrid op."""

    def __init__(self, height: int, width: int, align_corners: bool) -> None:
        super().__init__()
        self.height, self.width, self.align_corners = height, width, align_corners

    def forward(self, theta: Tensor) -> Tensor:
        size = [theta.shape[0], 1, self.height, self.width]
        return torch.nn.functional.affine_grid(theta, size, align_corners=self.align_corners)


def with_affine_grid_op(model: STNClassifier) -> STNClassifier:
    """A copy of ``model`` whose STN calls F.affine_grid; the weights are shared, not copied."""
    import copy

    variant = copy.copy(model)  # shallow: submodules dict is copied below
    variant._modules = dict(model._modules)
    if model.stn is not None:
        stn = copy.copy(model.stn)
        stn._modules = dict(model.stn._modules)
        stn.grid = _TorchAffineGrid(model.stn.grid.height, model.stn.grid.width,
                                    model.config.align_corners)
        variant.stn = stn
    return variant


def torchscript_available() -> bool:
    """Whether the installed torch still ships the TorchScript ONNX exporter."""
    import inspect

    try:
        import torch.onnx.utils  # noqa: F401  (the TorchScript exporter's home)
    except ImportError:
        return False
    return "dynamo" in inspect.signature(torch.onnx.export).parameters


def resolve_exporter(name: str | None) -> str:
    if name is None:
        return "torchscript" if torchscript_available() else "dynamo"
    if name not in EXPORTERS:
        raise StnDeployError(f"unknown exporter {name!r}; choose from {', '.join(EXPORTERS)}")
    if name == "torchscript" and not torchscript_available():
        raise StnDeployError(f"torch {torch.__version__} has no TorchScript ONNX exporter; "
                             "use --exporter dynamo")
    return name


class _ExportWrapper(nn.Module):
    def __init__(self, model: STNClassifier, options: OnnxOptions) -> None:
        super().__init__()
        self.model = model
        self.with_theta = options.with_theta
        self.pre = Normalize(model.config) if options.embed_preprocess else None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.pre is not None:
            x = self.pre(x)
        logits, theta = self.model.forward_with_theta(x)
        return (logits, theta) if self.with_theta else logits


def max_opset() -> int:
    """Highest opset both the installed onnx and torch's TorchScript exporter write."""
    import onnx.defs

    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as torch_max
    except ImportError:  # older/newer torch layouts
        torch_max = 20
    return min(int(onnx.defs.onnx_opset_version()), int(torch_max))


def example_input(config: ModelConfig, batch: int, embed_preprocess: bool) -> Tensor:
    c, h, w = config.input_shape
    if embed_preprocess:
        return torch.randint(0, 256, (batch, h, w, c), dtype=torch.uint8)
    return torch.randn(batch, c, h, w)


@contextlib.contextmanager
def _silent_stdout_fd() -> Iterator[None]:
    """On failure the TorchScript exporter's C++ side prints the whole graph to file
    descriptor 1; the user gets our one error line instead."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def _export_torchscript(wrapper: nn.Module, x: Tensor, tmp: Path, opset: int,
                        outputs: list[str], dynamic: bool) -> "onnx.ModelProto":
    import onnx

    axes = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]} if dynamic else None
    with warnings.catch_warnings(), _silent_stdout_fd():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper, (x,), str(tmp), opset_version=opset, dynamo=False,
                input_names=[INPUT_NAME], output_names=outputs, dynamic_axes=axes,
                do_constant_folding=True,
            )
        except Exception as e:  # unsupported ops, tracing failures: all mean "did not export"
            raise StnDeployError(f"the torchscript exporter failed: {error_line(e)}") from None
    return onnx.load(str(tmp))


def _export_dynamo(wrapper: nn.Module, x: Tensor, opset: int, outputs: list[str],
                   dynamic: bool) -> "onnx.ModelProto":
    import contextlib
    import io
    import logging

    from stn_deploy.export.downconvert import downconvert

    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper, (x,), dynamo=True, opset_version=max(opset, DYNAMO_MIN_OPSET),
                input_names=[INPUT_NAME], output_names=outputs, dynamic_shapes=shapes,
                external_data=False, verbose=False,
            )
        except Exception as e:  # torch.export raises many types; all mean "did not export"
            raise StnDeployError(f"the dynamo exporter failed: {error_line(e)}") from None
    proto = program.model_proto
    if dynamic:  # name the batch dimension the same way as the TorchScript path does
        for value in [*proto.graph.input, *proto.graph.output]:
            dims = value.type.tensor_type.shape.dim
            if dims and not dims[0].HasField("dim_value"):
                dims[0].dim_param = "batch"
    if opset < DYNAMO_MIN_OPSET:
        proto = downconvert(proto, opset)
    return proto


def check_opset(opset: int) -> None:
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise StnDeployError(f"opset {opset} is not supported: GridSample needs "
                             f"opset {MIN_OPSET} or later, and this torch/onnx write up to {top}")


def affine_grid_op_problem(opset: int) -> str | None:
    """Why the AffineGrid op cannot be written at ``opset`` (None: it can)."""
    if opset < AFFINE_GRID_OP_MIN_OPSET:
        return f"the AffineGrid op exists from opset {AFFINE_GRID_OP_MIN_OPSET}"
    return None


def export_onnx(model: STNClassifier, path: str | os.PathLike[str], options: OnnxOptions,
                extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a single self-contained ONNX file at exactly ``options.opset``."""
    model = model.eval().cpu()
    config = model.config
    source = with_affine_grid_op(model) if options.affine_grid_op else model
    wrapper = _ExportWrapper(source, options).eval()
    outputs = [OUTPUT_NAME, THETA_NAME] if options.with_theta else [OUTPUT_NAME]
    meta = {"affine_grid": "AffineGrid op" if options.affine_grid_op else "constant+MatMul",
            **(extra_metadata or {})}
    return write_onnx(wrapper, config, path, options, outputs, meta)


def write_onnx(wrapper: nn.Module, config: ModelConfig, path: str | os.PathLike[str],
               options: OnnxOptions, outputs: list[str],
               extra_metadata: dict[str, str]) -> Path:
    """Export ``wrapper`` (input -> ``outputs``) at exactly ``options.opset``, with ``config``
    and ``extra_metadata`` in its metadata. Shared by our model and any user's module, so
    both get the same opset guarantee and the same refusal of a graph that lacks the
    AffineGrid op ``options.affine_grid_op`` asked for."""
    import onnx

    check_opset(options.opset)
    problem = affine_grid_op_problem(options.opset) if options.affine_grid_op else None
    if problem:
        raise StnDeployError(f"--affine-grid-op: {problem}; pass --opset "
                             f"{AFFINE_GRID_OP_MIN_OPSET} or drop it")
    if options.static_batch is not None and options.static_batch < 1:
        raise StnDeployError(f"static batch must be positive, got {options.static_batch}")
    exporter = resolve_exporter(options.exporter)
    batch = options.static_batch or 2
    x = example_input(config, batch, options.embed_preprocess)
    dynamic = options.static_batch is None
    target = Path(path)
    with atomic_path(target) as tmp:
        if exporter == "torchscript":
            proto = _export_torchscript(wrapper, x, tmp, options.opset, outputs, dynamic)
        else:
            proto = _export_dynamo(wrapper, x, options.opset, outputs, dynamic)
        if options.affine_grid_op and not any(n.op_type == "AffineGrid"
                                              for n in proto.graph.node):
            raise StnDeployError(f"the {exporter} exporter decomposed F.affine_grid instead of "
                                 "writing the AffineGrid op; use --exporter torchscript")
        if len(proto.graph.output) != len(outputs):
            raise StnDeployError(f"the {exporter} exporter wrote {len(proto.graph.output)} "
                                 f"outputs, expected {len(outputs)} ({', '.join(outputs)})")
        written = {op.domain or "ai.onnx": op.version for op in proto.opset_import}
        if written.get("ai.onnx") != options.opset:
            raise StnDeployError(f"asked for opset {options.opset}, the {exporter} exporter "
                                 f"wrote {written.get('ai.onnx')}; nothing was written")
        meta = flat_metadata(config)
        meta.update({
            "opset": str(options.opset),
            "input_layout": "NHWC" if options.embed_preprocess else "NCHW",
            "input_dtype": "uint8" if options.embed_preprocess else "float32",
            "preprocess": "embedded" if options.embed_preprocess else "none",
            "outputs": ",".join(outputs),
            "exporter": exporter,
            "stn_deploy.version": __version__,
        })
        meta.update(extra_metadata)
        set_metadata(proto, meta)
        proto.producer_name = "stn-deploy"
        proto.producer_version = __version__
        onnx.checker.check_model(proto, full_check=True)
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        onnx.save(proto, str(tmp))  # < 2 GB: one self-contained file, no external data
    return target
