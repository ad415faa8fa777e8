"""What export starts from: an stn-deploy checkpoint, or a user's ``nn.Module``.

Both are *sources* of the one pipeline in ``pipeline.run_export``: each knows its model's
config, how to write the FP32 graph, how to run the PyTorch reference, where its verification
and calibration images come from, and which options it cannot honour (and why). Everything
after that (verification, precision variants, target checks, metadata, the atomic move, the
TensorRT build) is the same code for both, so an option means the same for both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from stn_deploy.checkpoint import Checkpoint
from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError
from stn_deploy.export.onnx_export import OnnxOptions
from stn_deploy.export.user_module import Probe, theta_names
from stn_deploy.export.verify import Images, Reference

if TYPE_CHECKING:
    from stn_deploy.export.request import ExportRequest

RANDOM_WARNING = ("warning: verified on random inputs (no --data-dir): this proves the ONNX "
                  "graph computes what PyTorch computes on those inputs, not that it is "
                  "accurate on your data, nor that INT8 calibrated on noise keeps accuracy")
NO_GRID_NOTE = ("note: the model has no grid_sample: exported and verified as a plain network; "
                "the STN checks (grid parity, FP32 sampling path) do not apply")


@dataclass
class Written:
    """What writing the FP32 graph said (lines) and recorded about it (metadata keys)."""

    lines: list[str]
    metadata: dict[str, str]


class Source(Protocol):
    """One model to export; see the module docstring."""

    config: ModelConfig

    @property
    def default_name(self) -> str:
        """The stem of the default output file name."""

    def unsupported(self, req: "ExportRequest") -> dict[str, str]:
        """Request fields this model cannot honour -> why (the pipeline names the option)."""

    def write_fp32(self, path: Path, options: OnnxOptions) -> Written:
        """The FP32 ONNX graph at ``path``, exactly at ``options.opset``."""

    def reference(self, images: np.ndarray, options: OnnxOptions) -> Reference:
        """PyTorch's outputs on uint8 NCHW ``images``, named as the graph's outputs."""

    def test_images(self, data_dir: Path | None, samples: int | None) -> Images:
        """The images to verify on when none are given."""

    def calib_images(self, calib_dir: Path | None, samples: int | None,
                     verification: Images) -> Images:
        """INT8 calibration images when none are given."""

    def health(self, data: Images) -> Written:
        """The STN's health on the verification images (lines, metadata)."""


# ------------------------------------------------------------------------- a checkpoint

@dataclass
class CheckpointSource:
    """An stn-deploy training checkpoint: it carries its config, weights and dataset."""

    path: Path
    checkpoint: Checkpoint
    model: nn.Module

    @classmethod
    def load(cls, path: Path) -> "CheckpointSource":
        from stn_deploy.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        return cls(Path(path), ckpt, ckpt.model())

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    @property
    def default_name(self) -> str:
        return self.path.stem

    def unsupported(self, req: "ExportRequest") -> dict[str, str]:
        why: dict[str, str] = {}
        if req.affine_grid_op and not self.config.use_stn:
            why["affine_grid_op"] = "the checkpoint's model has no STN, so no affine grid"
        if self.config.dataset == "digits":  # scikit-learn's, bundled: no folder to read
            for name in ("data_dir", "calib_dir"):
                if getattr(req, name) is not None:
                    why[name] = ("a digits checkpoint verifies and calibrates on the digits "
                                 "bundled with scikit-learn; there is no folder to read")
        return why

    def write_fp32(self, path: Path, options: OnnxOptions) -> Written:
        from stn_deploy.artifacts import read_metadata
        from stn_deploy.export.onnx_export import export_onnx

        meta = {"source_sha256": self.checkpoint.sha256(), "source_checkpoint": self.path.name,
                "precision": "fp32"}
        export_onnx(self.model, path, options, meta)
        exporter = read_metadata(path).get("exporter", "?")
        return Written([f"exported {self.path.name} at opset {options.opset} with the "
                        f"{exporter} exporter"], {})

    def reference(self, images: np.ndarray, options: OnnxOptions) -> Reference:
        from stn_deploy.export.verify import torch_reference

        return Reference(torch_reference(self.path, images, self.checkpoint))

    def test_images(self, data_dir: Path | None, samples: int | None) -> Images:
        return self._split("test", data_dir, samples)

    def calib_images(self, calib_dir: Path | None, samples: int | None,
                     verification: Images) -> Images:
        return self._split("train", calib_dir, samples)

    def _split(self, split: str, data_dir: Path | None, samples: int | None) -> Images:
        from stn_deploy.export.verify import verification_data

        data, note = verification_data(self.config, split, data_dir, samples)
        applied = None if data.applied is None else data.applied.numpy()
        where = f"the {note}" + (f" ({data_dir})" if data_dir is not None else "")
        return Images(data.images.numpy(), data.labels.numpy(), where, applied)

    def health(self, data: Images) -> Written:
        from stn_deploy.health import measure

        applied = None if data.applied is None else torch.from_numpy(data.applied)
        health = measure(self.model, torch.from_numpy(data.images), applied=applied,
                         labels=data.labels)
        lines = [f"STN health on {data.note}: {health.summary()}"]
        lines += [f"warning: {w}" for w in getattr(health, "warnings", [])]
        return Written(lines, {"stn_health": json.dumps(health.to_dict(), sort_keys=True)})


# -------------------------------------------------------------------------- a user's module

@dataclass
class ModuleSource:
    """Any ``nn.Module`` that warps with ``F.affine_grid`` / ``F.grid_sample`` (see
    ``user_module``), with the config built from its input shape and what the user told us."""

    model: nn.Module
    config: ModelConfig
    found: Probe
    name: str  # the factory spec or the class name: the metadata's model_source
    extra_outputs: tuple[str, ...] = ()
    normalization_given: bool = False

    @classmethod
    def build(cls, model: nn.Module, input_shape: tuple[int, int, int], *, name: str,
              mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
              class_names: tuple[str, ...] | None = None, dataset: str = "custom",
              extra_outputs: tuple[str, ...] = ()) -> "ModuleSource":
        from stn_deploy.export.user_module import module_config

        if not isinstance(model, nn.Module):
            raise StnDeployError(f"expected a torch.nn.Module, got a {type(model).__name__}")
        model = model.eval().cpu()
        config, found = module_config(model, input_shape, mean=mean, std=std,
                                      class_names=class_names, dataset=dataset,
                                      extra_outputs=extra_outputs)
        return cls(model, config, found, name, tuple(extra_outputs), bool(mean or std))

    @property
    def default_name(self) -> str:
        return self.name.rpartition(":")[2]

    def unsupported(self, req: "ExportRequest") -> dict[str, str]:
        calls = self.found.affine_grids
        why: dict[str, str] = {}
        if req.with_theta and calls == 0:
            why["with_theta"] = ("the model makes no F.affine_grid call; theta outputs are the "
                                 "theta of each F.affine_grid call")
        clash = set(theta_names(calls)) & set(self.extra_outputs)
        if req.with_theta and clash:
            why["with_theta"] = (f"the model's own output {sorted(clash)[0]} already has that "
                                 "name; drop it from the extra outputs or the flag")
        if req.affine_grid_op and calls == 0:
            why["affine_grid_op"] = "the model makes no F.affine_grid call to write as the op"
        return why

    def output_names(self, options: OnnxOptions) -> list[str]:
        thetas = theta_names(self.found.affine_grids) if options.with_theta else []
        return ["logits", *self.extra_outputs, *thetas]

    def write_fp32(self, path: Path, options: OnnxOptions) -> Written:
        from stn_deploy.export.onnx_export import write_onnx
        from stn_deploy.export.user_module import (ModuleWrapper, exact_affine_grid,
                                                   recorded_affine_grids)

        outputs = self.output_names(options)
        patch = recorded_affine_grids() if options.affine_grid_op else exact_affine_grid()
        with patch as calls:
            wrapper = ModuleWrapper(self.model, self.config, 1 + len(self.extra_outputs),
                                    options.embed_preprocess,
                                    calls if options.with_theta else None).eval()
            write_onnx(wrapper, self.config, path, options, outputs,
                       {"model_source": self.name, "precision": "fp32"})
        sizes = ", ".join(f"{h}x{w}" for h, w in sorted(set(calls.sizes)))
        form = "the AffineGrid op" if options.affine_grid_op else "a constant grid and MatMul"
        affine = f"F.affine_grid written as {form} at {sizes}" if sizes else "none"
        lines = [f"exported {self.name} at opset {options.opset} ({self.found.grid_samples} "
                 f"grid_sample call(s); affine grids: {affine})"]
        if not self.found.grid_samples:
            lines.append(NO_GRID_NOTE)
        return Written(lines, {
            "affine_grid": affine, "grid_samples": str(self.found.grid_samples),
            "normalization": "given" if self.normalization_given else "none given: pixel / 255",
            "stn_checks": ("grid parity and FP32 sampling path" if self.found.grid_samples
                           else "not applicable: no grid_sample")})

    def reference(self, images: np.ndarray, options: OnnxOptions) -> Reference:
        from stn_deploy.export.user_module import torch_outputs

        return torch_outputs(self.model, images, self.config, self.extra_outputs,
                             options.with_theta)

    def test_images(self, data_dir: Path | None, samples: int | None) -> Images:
        from stn_deploy.export.user_module import imagefolder_images, random_images

        if data_dir is None:
            found = random_images(self.config, samples)
            return Images(found.images, None, found.note, warning=RANDOM_WARNING)
        return imagefolder_images(data_dir, "test", self.config.input_shape, samples)

    def calib_images(self, calib_dir: Path | None, samples: int | None,
                     verification: Images) -> Images:
        """The ``train/`` split of ``calib_dir``; without one, the verification images."""
        from stn_deploy.export.user_module import imagefolder_images
        from stn_deploy.export.verify import subset

        if calib_dir is None:
            return subset(verification, samples)
        return imagefolder_images(calib_dir, "train", self.config.input_shape, samples)

    def health(self, data: Images) -> Written:
        return Written([], {})  # STN health reads our STN's theta; a user's model has its own
