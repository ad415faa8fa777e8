"""Exact-opset ONNX export of the STN classifier.

The model's affine grid is a constant and a MatMul, so the graph needs only GridSample from
the STN family; GridSample exists from opset 16. The written file's opset is checked after
writing: asking for N and getting anything else is an error, never a silent substitution.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from stn_deploy import __version__
from stn_deploy.config import ModelConfig, flat_metadata
from stn_deploy.errors import StnDeployError
from stn_deploy.fileio import atomic_path
from stn_deploy.model import Normalize, STNClassifier

MIN_OPSET = 16
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
THETA_NAME = "theta"


@dataclass(frozen=True)
class OnnxOptions:
    opset: int = 17
    static_batch: int | None = None  # None: dynamic batch dimension
    with_theta: bool = False
    embed_preprocess: bool = False  # graph takes uint8 NHWC and normalises inside


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


def export_onnx(model: STNClassifier, path: str | os.PathLike[str], options: OnnxOptions,
                extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a single self-contained ONNX file at exactly ``options.opset``."""
    import onnx

    top = max_opset()
    if not MIN_OPSET <= options.opset <= top:
        raise StnDeployError(f"opset {options.opset} is not supported: GridSample needs "
                             f"opset {MIN_OPSET} or later, and this torch/onnx write up to {top}")
    model = model.eval().cpu()
    config = model.config
    wrapper = _ExportWrapper(model, options).eval()
    batch = options.static_batch or 2
    x = example_input(config, batch, options.embed_preprocess)
    outputs = [OUTPUT_NAME, THETA_NAME] if options.with_theta else [OUTPUT_NAME]
    dynamic = None
    if options.static_batch is None:
        dynamic = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
    target = Path(path)
    with atomic_path(target) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter writes the asked opset exactly (dynamo writes 18 for 16).
        torch.onnx.export(
            wrapper, (x,), str(tmp), opset_version=options.opset, dynamo=False,
            input_names=[INPUT_NAME], output_names=outputs, dynamic_axes=dynamic,
            do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        written = {op.domain or "ai.onnx": op.version for op in proto.opset_import}
        if written.get("ai.onnx") != options.opset:
            raise StnDeployError(f"asked for opset {options.opset}, the exporter wrote "
                                 f"{written.get('ai.onnx')}; nothing was written")
        meta = flat_metadata(config)
        meta.update({
            "opset": str(options.opset),
            "input_layout": "NHWC" if options.embed_preprocess else "NCHW",
            "input_dtype": "uint8" if options.embed_preprocess else "float32",
            "preprocess": "embedded" if options.embed_preprocess else "none",
            "outputs": ",".join(outputs),
            "stn_deploy.version": __version__,
        })
        meta.update(extra_metadata or {})
        del proto.metadata_props[:]
        for k, v in sorted(meta.items()):
            proto.metadata_props.add(key=k, value=v)
        proto.producer_name = "stn-deploy"
        proto.producer_version = __version__
        onnx.checker.check_model(proto, full_check=True)
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        onnx.save(proto, str(tmp))
    return target


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf decode errors have no common base
        raise StnDeployError(f"{path} is not a readable ONNX file ({e})") from None
    return {p.key: p.value for p in proto.metadata_props}


def config_from_onnx(path: str | os.PathLike[str]) -> ModelConfig:
    meta = read_metadata(path)
    if "stn_deploy.config" not in meta:
        raise StnDeployError(f"{path} has no stn-deploy metadata (was it written by "
                             "stn-deploy export?)")
    return ModelConfig.from_json(meta["stn_deploy.config"])
