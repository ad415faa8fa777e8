"""Reading what stn-deploy wrote: model kinds, ONNX metadata, plan sidecars.

Torch-free on purpose: a service that only runs an exported ONNX file or a TensorRT plan needs
``onnx`` (or nothing at all, for a plan's JSON sidecar), not torch. Every runner and command
that reads an artifact reads it through here, so each fact has one reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError, error_line
from stn_deploy.names import PRECISIONS as _PRECISIONS  # a plan's are PLAN_PRECISIONS

if TYPE_CHECKING:
    import onnx

# What a TensorRT plan is built in: every precision but bf16, which is OpenVINO's CPU
# precision (see stn_deploy.export.request.BF16_FORMAT).
PLAN_PRECISIONS = tuple(p for p in _PRECISIONS if p != "bf16")
PLAN_SUFFIXES = (".plan", ".engine", ".trt")
IR_SUFFIX = ".xml"  # OpenVINO IR: the graph; its weights are the .bin beside it
IR_SECTION = "stn_deploy"  # rt_info section holding the same keys as the ONNX metadata
CONFIG_KEY = "stn_deploy.config"
SIDECAR_KEYS = ("config", "input_name", "output_names", "precision", "tensorrt_version",
                "gpu_name", "compute_capability", "profile", "onnx_sha256", "embed_preprocess")


def model_kind(path: str | os.PathLike[str]) -> str:
    """"checkpoint", "onnx", "plan" or "openvino" (IR), from the file name (checked again
    when loaded)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == IR_SUFFIX:
        return "openvino"
    if suffix in PLAN_SUFFIXES:
        return "plan"
    return "checkpoint"


# ----------------------------------------------------------------------------------- ONNX

def load_onnx(path: str | os.PathLike[str]) -> "onnx.ModelProto":
    """The graph without external data, or one line saying the file is not ONNX."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf decode errors have no common base
        raise StnDeployError(f"{path} is not a readable ONNX file ({error_line(e)})") from None


def metadata(proto: "onnx.ModelProto") -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def set_metadata(proto: "onnx.ModelProto", meta: dict[str, str]) -> None:
    """Replace all metadata_props with ``meta`` (sorted, so files diff cleanly)."""
    del proto.metadata_props[:]
    for k, v in sorted(meta.items()):
        proto.metadata_props.add(key=k, value=v)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    return metadata(load_onnx(path))


def config_from_metadata(meta: dict[str, str], path: str | os.PathLike[str]) -> ModelConfig:
    if CONFIG_KEY not in meta:
        raise StnDeployError(f"{path} has no stn-deploy metadata (was it written by "
                             "stn-deploy export?)")
    return ModelConfig.from_json(meta[CONFIG_KEY])


def config_from_onnx(path: str | os.PathLike[str]) -> ModelConfig:
    return config_from_metadata(read_metadata(path), path)


def onnx_opset(proto: "onnx.ModelProto") -> int:
    """The default domain's opset (0 when the graph imports none)."""
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def graph_precision(proto: "onnx.ModelProto") -> str:
    """"int8" for a QDQ graph, "fp16" for half weights, else "fp32" (metadata wins if set)."""
    import onnx

    meta = metadata(proto)
    for key in ("precision", "stn_deploy.precision"):
        if meta.get(key):
            return meta[key].lower()
    ops = {n.op_type for n in proto.graph.node}
    if {"QuantizeLinear", "DequantizeLinear"} & ops or "QLinearConv" in ops:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
        return "fp16"
    return "fp32"


def onnx_precision(path: str | os.PathLike[str]) -> str:
    return graph_precision(load_onnx(path))


# ----------------------------------------------------------------------------- OpenVINO IR

def ir_bin_path(xml: str | os.PathLike[str]) -> Path:
    return Path(xml).with_suffix(".bin")


def read_ir_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata an IR written by ``stn-deploy export --format openvino`` carries in its
    rt_info (``<rt_info><stn_deploy><KEY value=.../>``), read from the XML itself: no
    OpenVINO needed to tell what a file is. A missing ``.bin`` is one line here, before any
    runtime reports it in its own words."""
    import xml.etree.ElementTree as ET

    path = Path(path)
    if not ir_bin_path(path).is_file():
        raise StnDeployError(f"{path} has no weights file {ir_bin_path(path).name} beside it "
                             "(an OpenVINO IR is the .xml and its .bin together)")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise StnDeployError(f"{path} is not a readable OpenVINO IR ({e})") from None
    section = root.find(f"rt_info/{IR_SECTION}")
    if section is None:
        return {}
    return {child.tag: child.get("value", "") for child in section}


# ------------------------------------------------------------------------ TensorRT plans

def sidecar_path(plan: str | os.PathLike[str]) -> Path:
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def read_sidecar(plan: str | os.PathLike[str]) -> dict[str, Any]:
    path = sidecar_path(plan)
    if not path.is_file():
        raise StnDeployError(f"{plan} has no sidecar {path.name}; rebuild it with "
                             "stn-deploy export --format trt")
    try:
        side = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StnDeployError(f"{path} is not valid JSON ({e})") from None
    missing = [k for k in SIDECAR_KEYS if not isinstance(side, dict) or k not in side]
    if missing:
        raise StnDeployError(f"{path} lacks {', '.join(missing)}")
    return side


# ---------------------------------------------------------------------------- any artifact

def recorded_source(path: str | os.PathLike[str]) -> str | None:
    """The checkpoint sha256 an ONNX file or plan says it was exported from (None: unknown,
    unreadable, or not a model file)."""
    kind = model_kind(path)
    try:
        if kind == "onnx":
            return read_metadata(path).get("source_sha256")
        if kind == "openvino":
            return read_ir_metadata(path).get("source_sha256")
        if kind == "plan":
            value = read_sidecar(path).get("source_sha256")
            return str(value) if value is not None else None
    except StnDeployError:  # a broken file is nobody's export
        return None
    return None
