"""What a model file says about itself, as a Triton repository needs it: its tensors (names,
numpy dtypes, dims with the batch) and the stn-deploy metadata that travels beside it.

Read from an ONNX file with ``onnx`` alone (no runtime) or from a TensorRT plan's JSON sidecar
(the plan itself needs a GPU to open). Its own module because both the repository writer
(:mod:`stn_deploy.serving.triton_repo`) and the validator (:mod:`stn_deploy.serving.validate`)
read model files, and the writer validates what it wrote: with the facts here, imports run
writer -> validator -> facts, without a cycle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stn_deploy.artifacts import config_from_metadata, model_kind, read_sidecar
from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError

# numpy dtype name -> Triton data_type
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8",
                 "int8": "TYPE_INT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                 "bool": "TYPE_BOOL"}


@dataclass(frozen=True)
class TensorFacts:
    """One model input or output as the model file declares it; dims include the batch
    dimension, -1 where dynamic."""

    name: str
    dtype: str  # numpy dtype name
    dims: tuple[int, ...]


@dataclass
class ModelFacts:
    """What a model file says about itself: its tensors and stn-deploy's metadata."""

    path: Path
    kind: str  # "onnx" or "plan"
    inputs: list[TensorFacts]
    outputs: list[TensorFacts]
    config: ModelConfig
    meta: dict[str, Any] = field(default_factory=dict)  # travels beside the model
    max_batch: int | None = None  # a plan's profile maximum; None: unbounded


def model_facts(path: str | os.PathLike[str]) -> ModelFacts:
    """Tensors and metadata of an ONNX file (read with onnx, no runtime) or a TensorRT plan
    (read from its sidecar: the plan itself needs a GPU to open)."""
    path = Path(path)
    kind = model_kind(path)
    if not path.is_file():
        raise StnDeployError(f"model file not found: {path}")
    if kind == "onnx":
        return _onnx_facts(path)
    if kind == "plan":
        return _plan_facts(path)
    raise StnDeployError(f"{path} is a checkpoint; a repository serves an exported .onnx or "
                         ".plan file")


def _onnx_facts(path: Path) -> ModelFacts:
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    from stn_deploy.artifacts import load_onnx, metadata

    proto = load_onnx(path)
    meta = metadata(proto)
    config = config_from_metadata(meta, path)
    initializers = {t.name for t in proto.graph.initializer}

    def facts(v: onnx.ValueInfoProto) -> TensorFacts:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorFacts(v.name, str(tensor_dtype_to_np_dtype(t.elem_type)), dims)

    travel = {k: _maybe_json(meta[k]) for k in ("precision", "opset", "exporter",
                                                "source_sha256", "source_checkpoint",
                                                "verification", "stn_health", "preprocess")
              if k in meta}
    return ModelFacts(path, "onnx",
                      [facts(v) for v in proto.graph.input if v.name not in initializers],
                      [facts(v) for v in proto.graph.output], config, travel)


def _plan_facts(path: Path) -> ModelFacts:
    side = read_sidecar(path)
    config = ModelConfig.from_dict(side["config"]) if isinstance(side["config"], dict) \
        else ModelConfig.from_json(side["config"])
    c, h, w = config.input_shape
    embedded = bool(side["embed_preprocess"])
    x = TensorFacts(side["input_name"], "uint8" if embedded else "float32",
                    (-1, h, w, c) if embedded else (-1, c, h, w))
    out_dims = {"logits": (-1, config.num_classes), "theta": (-1, 2, 3)}
    outputs = [TensorFacts(n, "float32", out_dims.get(n, (-1,))) for n in side["output_names"]]
    profile = side["profile"]
    travel = {k: side[k] for k in ("precision", "tensorrt_version", "gpu_name",
                                   "compute_capability", "profile", "source_sha256",
                                   "plan_verification", "onnx_path") if k in side}
    return ModelFacts(path, "plan", [x], outputs, config, travel,
                      max_batch=int(profile["max"]) if isinstance(profile, dict) else None)


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


__all__ = ["TRITON_DTYPES", "ModelFacts", "TensorFacts", "model_facts"]
