"""The TensorRT step's logic that needs no TensorRT (profiles, build settings, version
detection, sidecars), and a real build that skips without TensorRT and a GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stn_deploy import artifacts
from stn_deploy.config import ModelConfig
from stn_deploy.errors import MissingDependencyError, StnDeployError
from stn_deploy import tensorrt_env
from stn_deploy.export import tensorrt as trt_mod

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profile_shapes() -> None:
    shapes = trt_mod.profile_shapes((3, 32, 32), (1, 8, 64))
    assert shapes == {"min": (1, 3, 32, 32), "opt": (8, 3, 32, 32), "max": (64, 3, 32, 32)}
    for bad in ((0, 1, 2), (4, 2, 8), (1, 9, 8)):
        with pytest.raises(StnDeployError, match="1 <= min <= opt <= max"):
            trt_mod.profile_shapes((3, 32, 32), bad)
    with pytest.raises(StnDeployError, match="static batch of 4"):
        trt_mod.profile_shapes((32, 32, 3), (1, 4, 8), static_batch=4)
    assert trt_mod.profile_shapes((32, 32, 3), (4, 4, 4), 4)["max"] == (4, 32, 32, 3)


def test_version_detection_and_settings() -> None:
    assert tensorrt_env.trt_major(SimpleNamespace(__version__="10.13.0.35")) == 10
    assert tensorrt_env.trt_major(SimpleNamespace(__version__="11.4.1")) == 11
    with pytest.raises(StnDeployError, match="not supported"):
        tensorrt_env.trt_major(SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(StnDeployError, match="cannot read"):
        tensorrt_env.trt_major(SimpleNamespace(__version__="dev"))
    # FP16 is strongly typed on both, so the FP16 graph's FP32 STN path stays FP32.
    for major in (10, 11):
        assert trt_mod.build_settings(major, "fp16") == {
            "strongly_typed": True, "flags": [], "clear": ["TF32"]}
    assert trt_mod.build_settings(10, "int8") == {
        "strongly_typed": False, "flags": ["INT8"], "clear": ["TF32"]}
    assert trt_mod.build_settings(10, "fp32")["flags"] == []
    assert trt_mod.build_settings(11, "int8") == {
        "strongly_typed": True, "flags": [], "clear": ["TF32"]}
    with pytest.raises(StnDeployError, match="unknown precision"):
        trt_mod.build_settings(10, "bf16")


def _sidecar(tmp_path: Path) -> Path:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    side = trt_mod.make_sidecar(
        config=ModelConfig(), input_name="input", output_names=["logits"], precision="fp16",
        tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100", compute_capability="9.0",
        profile=(1, 32, 256), onnx_sha256="0" * 64, embed_preprocess=True,
        onnx_metadata={"opset": "17", "source_sha256": "f" * 64})
    artifacts.sidecar_path(plan).write_text(json.dumps(side))
    return plan


def test_sidecar_round_trip_and_compatibility(tmp_path: Path) -> None:
    plan = _sidecar(tmp_path)
    assert artifacts.sidecar_path(plan).name == "m.plan.json"
    side = artifacts.read_sidecar(plan)
    assert ModelConfig.from_dict(side["config"]) == ModelConfig()
    assert side["profile"] == {"min": 1, "opt": 32, "max": 256}
    assert side["input_layout"] == "NHWC" and side["input_dtype"] == "uint8"
    assert side["num_classes"] == "10" and side["opset"] == "17"  # flat keys for C++
    trt10 = SimpleNamespace(__version__="10.13.0.35")
    assert tensorrt_env.check_plan_compatible(plan, trt10, "NVIDIA H100", "9.0") == side
    with pytest.raises(StnDeployError, match="built with TensorRT 10.13.0.35, this is "
                                             "TensorRT 11.0"):
        tensorrt_env.check_plan_compatible(plan, SimpleNamespace(__version__="11.0"), "NVIDIA H100",
                                      "9.0")
    with pytest.raises(StnDeployError, match="built for NVIDIA H100 .* this GPU is NVIDIA L4"):
        tensorrt_env.check_plan_compatible(plan, trt10, "NVIDIA L4", "8.9")


def test_bad_sidecars(tmp_path: Path) -> None:
    plan = tmp_path / "x.plan"
    with pytest.raises(StnDeployError, match="has no sidecar"):
        artifacts.read_sidecar(plan)
    artifacts.sidecar_path(plan).write_text("{not json")
    with pytest.raises(StnDeployError, match="not valid JSON"):
        artifacts.read_sidecar(plan)
    artifacts.sidecar_path(plan).write_text(json.dumps({"config": {}}))
    with pytest.raises(StnDeployError, match="lacks input_name"):
        artifacts.read_sidecar(plan)


def test_tensorrt_must_match_torchs_cuda_major() -> None:
    tensorrt_env.check_cuda_major({"13"}, "13.0")
    tensorrt_env.check_cuda_major(set(), "13.0")  # a tar install: nothing to compare
    tensorrt_env.check_cuda_major({"12"}, None)  # CPU-only torch: cuda_device() says so
    with pytest.raises(StnDeployError, match=r"tensorrt-cu12\) than torch \(CUDA 13.0\); "
                                             r"install stn-deploy\[trt\]"):
        tensorrt_env.check_cuda_major({"12"}, "13.0")
    if importlib.util.find_spec("tensorrt") is None:  # read from the installed wheels' names
        assert tensorrt_env.installed_trt_cuda_majors() == set()


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed; the missing-package path cannot run")
def test_import_tensorrt_missing() -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install 'stn-deploy\[trt\]'.*NVIDIA GPU"):
        tensorrt_env.import_tensorrt()


@pytest.mark.tensorrt
@pytest.mark.skipif(not (HAVE_TRT and torch.cuda.is_available()),
                    reason=("needs the tensorrt package (pip install 'stn-deploy[trt]') and a "
                            "CUDA device; " + ("tensorrt is installed" if HAVE_TRT else
                                               "tensorrt is not installed") + ", " +
                            ("a CUDA device is present" if torch.cuda.is_available() else
                             "no CUDA device")))
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_engine_real(digits_checkpoint: Path, tmp_path: Path, precision: str) -> None:
    from stn_deploy.export.pipeline import ExportRequest, run_export

    cache = tmp_path / "timing.cache"
    res = run_export(ExportRequest(checkpoint=digits_checkpoint, format="engine",
                                   precision=precision, opset=17, out=tmp_path / "m.plan",
                                   max_batch=64, opt_batch=16, timing_cache=cache,
                                   verify_samples=128, calib_samples=200))
    trt = tensorrt_env.import_tensorrt()
    name, cc = tensorrt_env.cuda_device()
    side = tensorrt_env.check_plan_compatible(res.path, trt, name, cc)
    assert side["precision"] == precision and cache.is_file() and res.onnx_path.is_file()
