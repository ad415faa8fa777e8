"""Validate a Triton model repository without Triton, Docker or a GPU.

Each ``config.pbtxt`` is parsed with Triton's own schema (``model_config.proto`` as compiled
in the ``tritonclient`` package) and cross-checked with the model file it serves: names,
dtypes, dims, the batch dimension, the file each platform loads, the label file. Every problem
is one line naming the model, the file and the field, so a hand-edited repository can be
mended from the list.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from stn_deploy.artifacts import PLAN_SUFFIXES
from stn_deploy.errors import MissingDependencyError, StnDeployError
from stn_deploy.serving.model_facts import TRITON_DTYPES, ModelFacts, TensorFacts, model_facts

INSTALL = "pip install 'stn-deploy[serve]' (or: pip install tritonclient)"
# platform or backend -> (model kind, the file Triton loads when default_model_filename is unset)
PLATFORMS: dict[str, tuple[str, str]] = {
    "onnxruntime_onnx": ("onnx", "model.onnx"),
    "onnxruntime": ("onnx", "model.onnx"),
    "openvino": ("onnx", "model.xml"),
    "tensorrt_plan": ("plan", "model.plan"),
    "tensorrt": ("plan", "model.plan"),
    # stn-deploy's Python-backend model: model.py runs the ONNX file its parameters name
    "python": ("onnx", "model.py"),
}
# The model files each platform or backend loads (OpenVINO: ONNX or its own IR, .xml + .bin).
SUFFIXES: dict[str, tuple[str, ...]] = {
    "onnxruntime_onnx": (".onnx",), "onnxruntime": (".onnx",), "openvino": (".onnx", ".xml"),
    "tensorrt_plan": PLAN_SUFFIXES, "tensorrt": PLAN_SUFFIXES, "python": (".onnx",)}
# How a check reports a problem: bad(field, message), one line naming the config field.
Report = Callable[[str, str], None]


def schema_module() -> ModuleType:
    """tritonclient's compiled model_config.proto, loaded from its file: importing it through
    ``tritonclient.grpc`` would import grpcio, which the schema does not need."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("tritonclient", INSTALL)
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise MissingDependencyError("tritonclient's model_config_pb2", INSTALL)
    mod_spec = importlib.util.spec_from_file_location("stn_deploy_triton_model_config", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # protobuf runtime too old/new for the generated code
        raise MissingDependencyError("tritonclient's model_config_pb2", INSTALL, e) from None
    return module


def schema_available() -> bool:
    try:
        schema_module()
    except MissingDependencyError:
        return False
    return True


def parse_config(path: Path) -> Any:
    """The parsed ModelConfig message, or one line naming the field protobuf refused."""
    from google.protobuf import text_format

    schema = schema_module()
    message = schema.ModelConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), message)
    except text_format.ParseError as e:
        raise StnDeployError(f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StnDeployError(f"{path}: unreadable ({e})") from None
    return message


def validate_repository(repo: str | os.PathLike[str]) -> list[str]:
    """Every problem in the repository, one line each (empty: valid)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise StnDeployError(f"{repo} is not a folder")
    models = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        return [f"{repo}: no model folders"]
    problems: list[str] = []
    for folder in models:
        problems += validate_model(folder)
    return problems


def validate_model(folder: Path) -> list[str]:
    """The problems of one model folder (its config.pbtxt against its files)."""
    where = f"{folder.name}/config.pbtxt"
    cfg_path = folder / "config.pbtxt"
    if not cfg_path.is_file():
        return [f"{folder.name}: no config.pbtxt"]
    try:
        cfg = parse_config(cfg_path)
    except StnDeployError as e:
        return [f"{where}: {str(e).split(': ', 1)[-1]}"]
    problems: list[str] = []

    def bad(field: str, message: str) -> None:
        problems.append(f"{where}: {field}: {message}")

    if cfg.name and cfg.name != folder.name:
        bad("name", f'"{cfg.name}" differs from its folder "{folder.name}" (Triton refuses it)')
    key = cfg.platform or cfg.backend
    if key not in PLATFORMS:
        bad("platform" if cfg.platform else "backend",
            f'"{key}" is none of {", ".join(sorted(PLATFORMS))}')
        return problems
    versions = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        problems.append(f"{folder.name}: no version folder (1/)")
        return problems
    found = _model_file(cfg, key, versions, bad)
    if found is None:
        return problems
    filename, facts = found
    _check_max_batch_size(cfg, facts, bad)
    _check_tensors(cfg, "input", cfg.input, facts.inputs, filename, folder, bad,
                   must_cover=True)
    _check_tensors(cfg, "output", cfg.output, facts.outputs, filename, folder, bad,
                   must_cover=False)
    if not cfg.output:
        bad("output", "none declared")
    _check_batching_and_instances(cfg, facts, PLATFORMS[key][0], filename, bad)
    return problems


def _model_file(cfg: Any, key: str, versions: list[Path],
                bad: Report) -> tuple[str, ModelFacts] | None:
    """The file the config serves and what it holds, read from the first version that has it;
    None when it cannot be read, so the tensor checks never run against a guess. Every
    version must hold every file the config names."""
    kind, default_file = PLATFORMS[key]
    filename = cfg.default_model_filename or default_file
    field = ("default_model_filename" if cfg.default_model_filename
             else "platform" if cfg.platform else "backend")
    files = [filename, *cfg.cc_model_filenames.values()]
    if key == "python":  # model.py loads; the file it runs is cross-checked below
        runs = cfg.parameters["model_file"].string_value if "model_file" in cfg.parameters \
            else ""
        if not runs:
            bad("parameters", 'no "model_file" (the ONNX file model.py runs)')
            return None
        files, filename, field = [filename, runs], runs, 'parameters "model_file"'
    facts = None
    for version in versions:
        for name in files:
            if not (version / name).is_file():
                bad("cc_model_filenames" if name in cfg.cc_model_filenames.values()
                    and name != filename else field,
                    f"{version.name}/{name} is missing")
        model_path = version / filename
        if model_path.is_file() and facts is None:
            suffix = Path(filename).suffix.lower()
            if suffix not in SUFFIXES[key]:
                bad(field, f"{filename} is not a {kind} file, which {key} loads")
                return None
            if suffix == ".xml":  # OpenVINO IR (its default file): nothing here reads it, so
                # its tensors are not cross-checked; its weights must lie beside it
                weights = model_path.with_suffix(".bin")
                if not weights.is_file():
                    bad(field, f"{version.name}/{weights.name} (the weights of {filename}) "
                        "is missing")
                continue
            try:
                facts = model_facts(model_path)
            except StnDeployError as e:
                bad(field, str(e))
    return None if facts is None else (filename, facts)


def _check_max_batch_size(cfg: Any, facts: ModelFacts, bad: Report) -> None:
    """max_batch_size > 0 makes Triton add the batch dimension, so the model's own must be
    dynamic and (for a plan) within its profile."""
    if cfg.max_batch_size <= 0:
        return
    static = [t.name for t in facts.inputs if t.dims and t.dims[0] > 0]
    if static:
        bad("max_batch_size", f"{cfg.max_batch_size} but input \"{static[0]}\" has a static "
            "batch dimension; use 0 and give the batch in dims")
    if facts.max_batch is not None and cfg.max_batch_size > facts.max_batch:
        bad("max_batch_size", f"{cfg.max_batch_size} exceeds the plan's profile maximum "
            f"{facts.max_batch}")


def _check_tensors(cfg: Any, section: str, declared: Any, actual: list[TensorFacts],
                   filename: str, folder: Path, bad: Report, *, must_cover: bool) -> None:
    """The declared inputs or outputs against the model's: names, dtypes, dims (without the
    batch dimension when Triton batches), label files. Every input must be declared; an
    output may be left out."""
    batched = cfg.max_batch_size > 0
    dtype_names = {v: k for k, v in TRITON_DTYPES.items()}
    enum = type(cfg).DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name[
        "data_type"].enum_type
    have = {t.name: t for t in actual}
    seen = set()
    for t in declared:
        seen.add(t.name)
        label = f'{section} "{t.name}"'
        if t.name not in have:
            bad(section, f'"{t.name}" is not {"an input" if section == "input" else "an output"}'
                f" of {filename} (it has: {', '.join(have)})")
            continue
        real = have[t.name]
        dtype = enum.values_by_number[t.data_type].name
        if dtype_names.get(dtype) != real.dtype:
            bad(f"{label} data_type", f"{dtype}, the model's is "
                f"{TRITON_DTYPES.get(real.dtype, real.dtype)}")
        want = list(real.dims[1:] if batched else real.dims)
        got = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        if got != want:
            bad(f"{label} dims", f"{list(t.dims)}, the model's are {want}"
                + (" (batch dimension excluded: max_batch_size > 0)" if batched else ""))
        if section == "output" and t.label_filename:
            _check_labels(folder / t.label_filename, want, f"{label} label_filename", bad)
    missing = [n for n in have if n not in seen]
    if must_cover and missing:
        bad(section, f'"{missing[0]}" of {filename} is not declared')


def _check_batching_and_instances(cfg: Any, facts: ModelFacts, kind: str, filename: str,
                                  bad: Report) -> None:
    """Dynamic batching, instance kinds and per-GPU plans: settings Triton accepts at load
    and only fails on (or silently ignores) when it serves."""
    if cfg.HasField("dynamic_batching"):
        if cfg.max_batch_size <= 0:
            bad("dynamic_batching", "needs max_batch_size > 0")
        over = [b for b in cfg.dynamic_batching.preferred_batch_size
                if b < 1 or b > cfg.max_batch_size]
        if over:
            bad("dynamic_batching.preferred_batch_size",
                f"{over[0]} is outside 1..max_batch_size {cfg.max_batch_size}")
    kinds = {type(cfg).DESCRIPTOR.fields_by_name["instance_group"].message_type
             .fields_by_name["kind"].enum_type.values_by_number[g.kind].name
             for g in cfg.instance_group}
    if kind == "plan" and "KIND_CPU" in kinds:
        bad("instance_group kind", "KIND_CPU, but a TensorRT plan runs only on a GPU")
    accelerators = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    if accelerators and "KIND_GPU" not in kinds:
        bad("optimization.execution_accelerators.gpu_execution_accelerator",
            "set, but no instance_group has kind KIND_GPU")
    if kind == "plan" and cfg.cc_model_filenames:
        cc = facts.meta.get("compute_capability")
        for capability, name in cfg.cc_model_filenames.items():
            if name == filename and cc and capability != cc:
                bad("cc_model_filenames", f'"{capability}" maps {name}, which was built for '
                    f"compute capability {cc}")


def _check_labels(path: Path, dims: list[int], field: str, bad: Report) -> None:
    if not path.is_file():
        bad(field, f"{path.name} is missing")
        return
    labels = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    count = dims[-1] if dims else 0
    if len(labels) != count:
        bad(field, f"{path.name} has {len(labels)} labels for {count} classes")


def summary(folder: Path) -> str:
    """One line per model for inspect: what it serves and how."""
    cfg = parse_config(folder / "config.pbtxt")
    enum = type(cfg).DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name[
        "data_type"].enum_type

    def sig(tensors: Any) -> str:
        return "; ".join(f"{t.name} {enum.values_by_number[t.data_type].name[5:].lower()}"
                         f"[{','.join(str(d) for d in t.dims)}]" for t in tensors)

    batching = (f", dynamic batching {list(cfg.dynamic_batching.preferred_batch_size)} within "
                f"{cfg.dynamic_batching.max_queue_delay_microseconds} us"
                if cfg.HasField("dynamic_batching") else "")
    return (f"{folder.name}: {cfg.platform or cfg.backend}, max_batch_size "
            f"{cfg.max_batch_size}{batching}; in {sig(cfg.input)}; out {sig(cfg.output)}")


def inspect_repository(repo: Path, echo: Any = print) -> None:
    """``stn-deploy inspect REPO``: a line per model, a line per problem, an error if any."""
    problems = validate_repository(repo)
    bad_models = {p.split("/", 1)[0].split(":", 1)[0] for p in problems}
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in bad_models:
            echo(summary(folder))
    for line in problems:
        echo(line)
    if problems:
        raise StnDeployError(f"{len(problems)} problem(s) in the Triton repository {repo}")
    echo(f"{repo}: valid (Triton's model_config schema, cross-checked with the model files)")
