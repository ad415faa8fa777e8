"""A Triton model repository from a verified stn-deploy export.

Per model: ``<name>/config.pbtxt``, ``<name>/1/<model file>``, ``<name>/labels.txt`` (class
names, one a line, so Triton's classification extension answers with names) and
``<name>/stn_deploy.json`` (model config, verification and STN health from the export, which
Triton ignores and people and ``inspect`` read). The text of each config is written here by
hand and parsed back with Triton's own schema by :mod:`stn_deploy.serving.validate`.

Kinds: ``onnxruntime`` (platform onnxruntime_onnx, CPU or GPU instances, optionally the
TensorRT execution accelerator in FP16 on GPUs), ``openvino`` (backend openvino reading the
ONNX file) and ``tensorrt`` (platform tensorrt_plan, with cc_model_filenames from the plan's
sidecar, since a plan runs only on the compute capability it was built for).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stn_deploy.artifacts import config_from_metadata, model_kind, read_sidecar, sidecar_path
from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError

KINDS = ("onnxruntime", "openvino", "tensorrt")
# What each kind serves, its config's platform/backend line, and its file in the version folder.
KIND_FILE_KIND = {"onnxruntime": "onnx", "openvino": "onnx", "tensorrt": "plan"}
PLATFORM_LINE = {"onnxruntime": 'platform: "onnxruntime_onnx"',
                 "openvino": 'backend: "openvino"',
                 "tensorrt": 'platform: "tensorrt_plan"'}
MODEL_FILENAME = {"onnxruntime": "model.onnx", "openvino": "model.onnx", "tensorrt": "model.plan"}
LABELS_FILE = "labels.txt"
METADATA_FILE = "stn_deploy.json"
VERSION = "1"
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


@dataclass
class RepoOptions:
    """How each model is served; one option set for every kind written."""

    kinds: tuple[str, ...] = ("onnxruntime",)
    name: str | None = None  # model name prefix [default: the file's stem]
    max_batch: int = 32
    preferred_batch: tuple[int, ...] = ()  # [default: powers of two from 4 to max_batch]
    queue_delay_us: int = 500
    device: str = "cpu"  # "cpu" or "gpu" (tensorrt: always gpu)
    instances: int = 1
    trt_fp16: bool = False  # onnxruntime on GPUs: the TensorRT execution accelerator, FP16


def preferred_sizes(opts: RepoOptions) -> tuple[int, ...]:
    if opts.preferred_batch:
        return tuple(sorted(set(opts.preferred_batch)))
    sizes = [b for b in (4, 8, 16, 32, 64, 128, 256) if b < opts.max_batch]
    return (*sizes, opts.max_batch)


def model_name(prefix: str, kind: str) -> str:
    return f"{prefix}-{kind}"


def default_prefix(path: Path) -> str:
    """The file's stem with what Triton and URLs dislike replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)


def check_options(facts: ModelFacts, opts: RepoOptions) -> None:
    """Refuse, by option, a repository that Triton would refuse or serve wrong."""
    for kind in opts.kinds:
        if kind not in KINDS:
            raise StnDeployError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
        if KIND_FILE_KIND[kind] != facts.kind:
            raise StnDeployError(f"--kind {kind} serves .{KIND_FILE_KIND[kind]} files; "
                                 f"{facts.path.name} is a {facts.kind} file")
    if opts.device not in ("cpu", "gpu"):
        raise StnDeployError(f"--device must be cpu or gpu, got {opts.device!r}")
    if opts.max_batch < 1 or opts.instances < 1 or opts.queue_delay_us < 0:
        raise StnDeployError("--max-batch and --instances must be positive and "
                             "--queue-delay-us not negative")
    bad = [b for b in preferred_sizes(opts) if not 1 <= b <= opts.max_batch]
    if bad:
        raise StnDeployError(f"--preferred-batch {bad[0]} is outside 1..--max-batch "
                             f"{opts.max_batch}")
    if facts.max_batch is not None and opts.max_batch > facts.max_batch:
        raise StnDeployError(f"--max-batch {opts.max_batch} exceeds the plan's profile "
                             f"maximum {facts.max_batch}; rebuild it with a larger --max-batch")
    static = [t for t in facts.inputs if t.dims and t.dims[0] > 0]
    if static:
        raise StnDeployError(f"{facts.path.name} has a static batch ({static[0].dims[0]}); "
                             "Triton's dynamic batcher needs one exported without "
                             "--static-batch")
    if opts.trt_fp16 and (opts.device != "gpu" or "onnxruntime" not in opts.kinds):
        raise StnDeployError("--trt-fp16 is the TensorRT accelerator of onnxruntime on GPUs: "
                             "it needs --kind onnxruntime --device gpu")


def config_text(facts: ModelFacts, kind: str, name: str, opts: RepoOptions) -> str:
    """config.pbtxt for one model: dims without the batch dimension, which max_batch_size
    stands for."""
    gpu = kind == "tensorrt" or opts.device == "gpu"

    def tensors(items: list[TensorFacts], labels: bool) -> str:
        rows = []
        for t in items:
            dims = ", ".join(str(d) for d in t.dims[1:])
            label = (f'\n    label_filename: "{LABELS_FILE}"'
                     if labels and t.name == "logits" else "")
            rows.append(f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_DTYPES[t.dtype]}\n'
                        f"    dims: [ {dims} ]{label}\n  }}")
        return ",\n".join(rows)

    sizes = ", ".join(str(b) for b in preferred_sizes(opts))
    lines = [
        f'name: "{name}"',
        PLATFORM_LINE[kind],
        f"max_batch_size: {opts.max_batch}",
        f"input [\n{tensors(facts.inputs, False)}\n]",
        f"output [\n{tensors(facts.outputs, True)}\n]",
        f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n"
        f"  max_queue_delay_microseconds: {opts.queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {opts.instances}\n"
        f"    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}\n  }}\n]",
    ]
    if kind == "openvino":
        lines.append(f'default_model_filename: "{MODEL_FILENAME[kind]}"')
    if kind == "tensorrt":
        cc = str(facts.meta.get("compute_capability", ""))
        lines.append(f'cc_model_filenames {{\n  key: "{cc}"\n'
                     f'  value: "{MODEL_FILENAME[kind]}"\n}}')
    if kind == "onnxruntime" and opts.trt_fp16:
        lines.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
            '      {\n        name: "tensorrt"\n'
            '        parameters { key: "precision_mode" value: "FP16" }\n'
            '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
            "      }\n    ]\n  }\n}")
    return "\n".join(lines) + "\n"


def write_repository(model: str | os.PathLike[str], out: str | os.PathLike[str],
                     opts: RepoOptions) -> list[Path]:
    """Write one model folder per kind into ``out`` (created if absent) and return them.

    Every folder is built and validated in a temporary folder beside ``out`` and renamed
    into place; if a rename fails, the folders already renamed are removed again (and ``out``
    too if this call created it), so a failure leaves ``out`` as it was. An existing model
    folder is refused, not overwritten; a kind given twice is written once."""
    facts = model_facts(model)
    if "verification" not in facts.meta and "plan_verification" not in facts.meta:
        raise StnDeployError(f"{facts.path} carries no verification record; write it with "
                             "stn-deploy export, which verifies before writing")
    opts = dataclasses.replace(opts, kinds=tuple(dict.fromkeys(opts.kinds)))
    check_options(facts, opts)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StnDeployError(f"--out {out} is a file; give a folder")
    prefix = opts.name or default_prefix(facts.path)
    names = [model_name(prefix, kind) for kind in opts.kinds]
    taken = [n for n in names if (out / n).exists()]
    if taken:
        raise StnDeployError(f"{out / taken[0]} exists; remove it or pass another --name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise StnDeployError(f"cannot write {out}: {e.strerror or e}") from None
    created = not out.exists()
    moved: list[Path] = []
    try:
        for kind, name in zip(opts.kinds, names):
            _write_model(facts, kind, name, opts, work / name)
        _validate_written(work)
        out.mkdir(exist_ok=True)
        for name in names:
            os.replace(work / name, out / name)
            moved.append(out / name)
    except BaseException as e:
        for folder in moved:  # written by this call: out is left as it was
            shutil.rmtree(folder, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
                out.rmdir()
        if isinstance(e, OSError):
            raise StnDeployError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [out / n for n in names]


def _write_model(facts: ModelFacts, kind: str, name: str, opts: RepoOptions,
                 folder: Path) -> None:
    (folder / VERSION).mkdir(parents=True)
    shutil.copyfile(facts.path, folder / VERSION / MODEL_FILENAME[kind])
    if kind == "tensorrt":
        shutil.copyfile(sidecar_path(facts.path),
                        sidecar_path(folder / VERSION / MODEL_FILENAME[kind]))
    (folder / "config.pbtxt").write_text(config_text(facts, kind, name, opts),
                                         encoding="utf-8")
    (folder / LABELS_FILE).write_text("\n".join(facts.config.class_names) + "\n",
                                      encoding="utf-8")
    record = {"source": facts.path.name, "kind": kind, "config": facts.config.to_dict(),
              **facts.meta}
    (folder / METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")


def _validate_written(repo: Path) -> None:
    """Parse back what was written with Triton's schema where tritonclient is installed."""
    from stn_deploy.serving.validate import schema_available, validate_repository

    if not schema_available():
        return
    problems = validate_repository(repo)
    if problems:
        raise StnDeployError("the repository written does not validate (a bug):\n"
                             + "\n".join(problems))


__all__ = ["KINDS", "ModelFacts", "RepoOptions", "TensorFacts", "config_text", "model_facts",
           "write_repository"]
