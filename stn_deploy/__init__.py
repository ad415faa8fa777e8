"""stn-deploy: train a Spatial Transformer Network classifier and ship it, verified.

The Python API (``stn_deploy.api``) is imported on first use, so ``import stn_deploy`` loads
neither torch nor onnx: ``load_checkpoint``, ``export_model``, ``verify``, ``open_runner``,
``bench_models``, ``serve``, ``pretrained_model`` (the models stn-deploy ships trained); and
from ``stn_deploy.debug``: ``compare``, ``find_keep_float``,
``profile`` (what ``stn-deploy debug compare``, ``debug precision`` and ``profile`` run).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stn_deploy.version import __version__

API = ("bench_models", "export_model", "load_checkpoint", "open_runner", "pretrained_model",
       "serve", "verify")
DEBUG_API = ("compare", "find_keep_float", "profile")

if TYPE_CHECKING:
    from stn_deploy.api import (bench_models, export_model, load_checkpoint, open_runner,
                                pretrained_model, serve, verify)
    from stn_deploy.debug import compare, find_keep_float, profile


def __getattr__(name: str) -> Any:
    if name in API:
        return getattr(importlib.import_module("stn_deploy.api"), name)
    if name in DEBUG_API:
        return getattr(importlib.import_module("stn_deploy.debug"), name)
    raise AttributeError(f"module 'stn_deploy' has no attribute {name!r}")


__all__ = ["__version__", *API, *DEBUG_API]
