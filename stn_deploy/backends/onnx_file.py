"""What the two runners of ONNX files (ONNX Runtime, OpenVINO) share: the model config and
precision from the file's own metadata, and the input spec from the graph's input."""

from __future__ import annotations

import os
from typing import Any

from stn_deploy.artifacts import config_from_metadata, graph_precision, load_onnx, metadata
from stn_deploy.backends.base import InputSpec, Runner, spec_for
from stn_deploy.config import ModelConfig


class OnnxFileRunner(Runner):
    """A runner over a file written by ``stn-deploy export``; subclasses run it."""

    def __init__(self, model_path: str | os.PathLike[str], **opts: Any) -> None:
        super().__init__(model_path, **opts)
        # The file's own precision unless the caller asked for a compute precision (bf16).
        self.stored_precision = self._precision
        if opts.get("precision") is None:
            self.precision = self.stored_precision

    def load_config(self) -> ModelConfig:
        proto = load_onnx(self.model_path)  # one read: metadata and precision together
        self.meta: dict[str, str] = metadata(proto)
        self._precision = graph_precision(proto)
        return config_from_metadata(self.meta, self.model_path)

    def graph_input_spec(self, name: str, batch: int, uint8_input: bool) -> InputSpec:
        """The spec of what the runtime reports for the graph's input (batch -1: dynamic)."""
        embedded = self.meta.get("preprocess") == "embedded" or uint8_input
        return spec_for(self.config, name=name, embedded=embedded, batch=batch)
