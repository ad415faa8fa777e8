"""The product's vocabulary: how TensorRT and the precisions are spelled, defined once.

Why a module of its own: the commands (``stn_deploy.commands``) may import the library, but the
library (``stn_deploy.export``, the runners, ``stn_deploy.artifacts``) may not import the
commands, so a name defined beside the CLI options had to be copied into the library, and the
copies drifted (one alias table knew ``engine``, another did not). This module sits below every
layer: it imports only the standard library and nothing from the package, so every module may
take its names from here. docs/vocabulary.md is the table these implement.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

# TensorRT's one name in every value a user types (--format, --target, --backend, --kind).
TRT: Final = "trt"
# Its old spellings, still read quietly (never listed in --help). Read-only, so no caller can
# add an alias for itself alone.
TRT_ALIASES: Final = MappingProxyType({"tensorrt": TRT, "engine": TRT})
# Every precision a model is exported, run or reported in; each command and runner accepts the
# ones it can honour, spelled like this.
PRECISIONS: Final = ("fp32", "fp16", "bf16", "int8")
# What OpenVINO may compute a file's float parts in when asked (bench --ov-precision).
OV_PRECISIONS: Final = ("fp32", "bf16")
# What a model without a recorded precision is, and what a runner computes in unless told.
DEFAULT_PRECISION: Final = "fp32"


def canonical(name: str) -> str:
    """``name`` as the library spells it: lower-cased, TensorRT's old spellings resolved
    (``TensorRT`` -> ``trt``). A name that is no alias comes back lower-cased, not checked:
    the caller knows which names it takes and refuses the rest in its own words."""
    key = name.lower()
    return TRT_ALIASES.get(key, key)
