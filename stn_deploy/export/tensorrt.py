"""TensorRT engines from the verified ONNX, with a JSON sidecar that says what a plan is for.

A plan only runs on the TensorRT version and GPU that built it, so every plan gets
``<plan>.json`` (TensorRT version, GPU, compute capability, precision, batch profile, ONNX hash,
model config, and the flat keys the C++ runtime reads) and loading checks it first.

FP16 builds a strongly typed network on TensorRT 10 and 11: the precision comes from the FP16
ONNX itself, whose STN path is FP32 (the weakly typed FP16 flag would let TensorRT 10 pick FP16
kernels for theta and the grid too). INT8 on TensorRT 10 is the QDQ graph with the INT8 flag;
TensorRT 11 removed the flags and reads the QDQ nodes in strongly typed mode. TF32 is turned
off in every build, so FP32 layers compute in FP32, as the verification tolerances assume.
What the exporter and the runner both ask of the TensorRT installation and the GPU (version,
CUDA major, device, plan compatibility) lives in :mod:`stn_deploy.tensorrt_env`.
Everything here except ``build_engine`` is plain Python and tested without TensorRT;
``build_engine`` is written against NVIDIA's documented Python API and has NOT run on this
project's machines (no GPU, no TensorRT wheel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stn_deploy.artifacts import PLAN_PRECISIONS, sidecar_path
from stn_deploy.errors import StnDeployError
from stn_deploy.fileio import atomic_path, sha256_file, write_bytes_atomic, write_text_atomic
from stn_deploy.tensorrt_env import cuda_device, import_tensorrt, trt_major


def profile_shapes(input_shape: tuple[int, ...], profile: tuple[int, int, int],
                   static_batch: int | None = None) -> dict[str, tuple[int, ...]]:
    """min/opt/max input shapes for the batch profile; ``input_shape`` excludes the batch."""
    lo, opt, hi = (int(v) for v in profile)
    if not 1 <= lo <= opt <= hi:
        raise StnDeployError(f"batch profile must satisfy 1 <= min <= opt <= max, got "
                             f"{lo}/{opt}/{hi}")
    if static_batch is not None and (lo, opt, hi) != (static_batch,) * 3:
        raise StnDeployError(f"the ONNX has a static batch of {static_batch}; use "
                             f"--min-batch/--opt-batch/--max-batch {static_batch}")
    return {name: (b, *input_shape) for name, b in (("min", lo), ("opt", opt), ("max", hi))}


def build_settings(major: int, precision: str) -> dict[str, Any]:
    """Network typing, builder flags to set and flags to clear, per TensorRT major/precision
    (see the module docstring for why)."""
    if precision not in PLAN_PRECISIONS:
        raise StnDeployError(f"unknown precision {precision!r}")
    if major >= 11 or precision == "fp16":
        return {"strongly_typed": True, "flags": [], "clear": ["TF32"]}
    flags = {"fp32": [], "int8": ["INT8"]}[precision]
    return {"strongly_typed": False, "flags": flags, "clear": ["TF32"]}


def make_sidecar(*, config: Any, input_name: str, output_names: list[str], precision: str,
                 tensorrt_version: str, gpu_name: str, compute_capability: str,
                 profile: tuple[int, int, int], onnx_sha256: str, embed_preprocess: bool,
                 onnx_metadata: dict[str, str] | None = None) -> dict[str, Any]:
    from stn_deploy.config import flat_metadata

    lo, opt, hi = profile
    side: dict[str, Any] = {
        "format": "stn-deploy-engine/1",
        "config": config.to_dict(),
        "input_name": input_name,
        "output_names": list(output_names),
        "precision": precision,
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "profile": {"min": lo, "opt": opt, "max": hi},
        "onnx_sha256": onnx_sha256,
        "embed_preprocess": bool(embed_preprocess),
    }
    # Flat string keys for the C++ runtime, as in the ONNX metadata_props.
    side.update(flat_metadata(config))
    side["input_layout"] = "NHWC" if embed_preprocess else "NCHW"
    side["input_dtype"] = "uint8" if embed_preprocess else "float32"
    for key in ("source_sha256", "opset", "exporter", "verification"):
        if onnx_metadata and key in onnx_metadata:
            side[key] = onnx_metadata[key]
    return side


def parse_network(trt: Any, major: int, precision: str,
                  onnx_path: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(builder, network, parser, build settings): the network TensorRT's ONNX parser made of
    ``onnx_path``, strongly typed where the settings say so. The parser owns the weights the
    network points to, so callers keep it until the engine is built. Its first error is one
    line. Written against the TensorRT 10/11 Python API; not run here (no GPU)."""
    settings = build_settings(major, precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if settings["strongly_typed"] and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise StnDeployError(f"TensorRT's ONNX parser rejected {onnx_path}: "
                             f"{errors[0] if errors else 'no error message'}")
    return builder, network, parser, settings


def builder_config(trt: Any, builder: Any, settings: dict[str, Any]) -> Any:
    """A builder config with the precision flags the settings set and clear."""
    config = builder.create_builder_config()
    for flag in settings["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in settings["clear"]:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    return config


def build_engine(onnx_path: Path, plan_path: Path, precision: str,
                 profile: tuple[int, int, int], workspace_mb: int,
                 timing_cache: Path | None) -> dict[str, Any]:
    """Parse the ONNX with TensorRT's parser, build, write plan + sidecar; return the sidecar.

    Written against the TensorRT 10/11 Python API documentation; not run here (no GPU)."""
    from stn_deploy.artifacts import config_from_metadata, load_onnx, metadata

    trt = import_tensorrt()
    major = trt_major(trt)
    gpu_name, capability = cuda_device()
    if workspace_mb < 1:
        raise StnDeployError(f"workspace must be at least 1 MB, got {workspace_mb}")
    proto = load_onnx(onnx_path)
    meta = metadata(proto)
    config = config_from_metadata(meta, onnx_path)
    inp = proto.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    static = dims[0].dim_value if dims[0].HasField("dim_value") else None
    shapes = profile_shapes(tuple(d.dim_value for d in dims[1:]), profile, static)
    builder, network, parser, settings = parse_network(trt, major, precision, onnx_path)
    bconfig = builder_config(trt, builder, settings)
    bconfig.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
    bconfig.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = bconfig.create_timing_cache(cache_bytes)
    # False when TensorRT refuses the cache (built by another TensorRT or for another GPU):
    # say so instead of silently building without it and overwriting the file afterwards.
    if not bconfig.set_timing_cache(cache, ignore_mismatch=False):
        raise StnDeployError(f"TensorRT refused the timing cache {timing_cache}: it was made by "
                             "another TensorRT version or GPU; delete it or pass another path")

    serialized = builder.build_serialized_network(network, bconfig)
    del parser  # it owns the weights the network points to: alive until the build is done
    if serialized is None:
        raise StnDeployError("TensorRT failed to build the engine (see its log above)")
    side = make_sidecar(
        config=config, input_name=inp.name, output_names=[o.name for o in proto.graph.output],
        precision=precision, tensorrt_version=str(trt.__version__), gpu_name=gpu_name,
        compute_capability=capability, profile=profile, onnx_sha256=sha256_file(onnx_path),
        embed_preprocess=meta.get("input_dtype") == "uint8", onnx_metadata=meta,
    )
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(serialized))
        write_text_atomic(sidecar_path(plan_path), json.dumps(side, indent=2, sort_keys=True))
    if timing_cache is not None:
        write_bytes_atomic(timing_cache, bytes(cache.serialize()))
    return side
