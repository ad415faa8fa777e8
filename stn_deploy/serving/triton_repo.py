"""A Triton model repository from a verified stn-deploy export.

Per model: ``<name>/config.pbtxt``, ``<name>/1/<model file>``, ``<name>/labels.txt`` (class
names, one a line, so Triton's classification extension answers with names) and
``<name>/stn_deploy.json`` (model config, verification and STN health from the export, which
Triton ignores and people and ``inspect`` read). The text of each config is written here by
hand and parsed back with Triton's own schema by :mod:`stn_deploy.serving.validate`; what a
model file says about itself is read by :mod:`stn_deploy.serving.model_facts`, which both use.

Kinds: ``onnxruntime`` (platform onnxruntime_onnx, CPU or GPU instances, optionally the
TensorRT execution accelerator in FP16 on GPUs), ``openvino`` (backend openvino reading the
ONNX file) and ``trt`` (platform tensorrt_plan, with cc_model_filenames from the plan's
sidecar, since a plan runs only on the compute capability it was built for): the native
backends of Triton's containers. ``python-onnxruntime`` and ``python-openvino`` are the CPU
flavour the ``tritonserver`` of the ``[serve]`` extra runs (it ships only the Python backend):
Triton's Python backend runs ``1/model.py``, which runs stn-deploy's runner on ``1/model.onnx``
inside Triton's stub process (:mod:`stn_deploy.serving.python_model`). One kind per runtime,
rather than one ``python`` kind and a runtime option, so several can be written side by side
and each model's name says what runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stn_deploy.artifacts import sidecar_path
from stn_deploy.errors import StnDeployError
from stn_deploy.names import canonical
from stn_deploy.serving.model_facts import TRITON_DTYPES, ModelFacts, TensorFacts, model_facts
from stn_deploy.serving.validate import schema_available, validate_repository

# How long the dynamic batcher waits for a batch to fill. A lone request waits it out in
# full: at concurrency 1 on a 2-core Zen 3 (benchmarks/results/triton_serving.md) 500 us
# gave p50 1.92 / p99 2.65 ms, 100 us 1.33 / 2.08 ms, while at concurrency 32 both formed
# batches of 17 (1,229 and 1,221 img/s) and 0 us only 8.7 (1,168 img/s).
QUEUE_DELAY_US = 100

PYTHON_KINDS = ("python-onnxruntime", "python-openvino")
KINDS = ("onnxruntime", "openvino", "trt", *PYTHON_KINDS)
# What each kind serves, its config's platform/backend line, and its file in the version folder.
KIND_FILE_KIND = {"onnxruntime": "onnx", "openvino": "onnx", "trt": "plan",
                  "python-onnxruntime": "onnx", "python-openvino": "onnx"}
PLATFORM_LINE = {"onnxruntime": 'platform: "onnxruntime_onnx"',
                 "openvino": 'backend: "openvino"',
                 "trt": 'platform: "tensorrt_plan"',
                 "python-onnxruntime": 'backend: "python"',
                 "python-openvino": 'backend: "python"'}
MODEL_FILENAME = {"onnxruntime": "model.onnx", "openvino": "model.onnx", "trt": "model.plan",
                  "python-onnxruntime": "model.onnx", "python-openvino": "model.onnx"}
PYTHON_MODEL_FILE = "model.py"  # what Triton's Python backend loads
LABELS_FILE = "labels.txt"
METADATA_FILE = "stn_deploy.json"
VERSION = "1"


@dataclass
class RepoOptions:
    """How each model is served; one option set for every kind written."""

    kinds: tuple[str, ...] = ("onnxruntime",)
    name: str | None = None  # model name prefix [default: the file's stem]
    max_batch: int = 32
    preferred_batch: tuple[int, ...] = ()  # [default: powers of two from 4 to max_batch]
    queue_delay_us: int = QUEUE_DELAY_US
    device: str = "cpu"  # "cpu" or "gpu" (trt: always gpu; python kinds: always cpu)
    instances: int = 1
    trt_fp16: bool = False  # onnxruntime on GPUs: the TensorRT execution accelerator, FP16
    threads: int | None = None  # python kinds: runner threads per instance [default: half
    # the CPUs over the instances]
    max_queue: int = 0  # requests queued before Triton rejects more (0: unbounded)
    kind_suffix: bool = True  # names <prefix>-<kind>; False: <prefix> itself (one kind)


def kind_name(kind: str) -> str:
    """A kind with TensorRT's old spellings read (``tensorrt``, ``engine`` -> ``trt``)."""
    return canonical(kind)


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
        raise StnDeployError(f"--instance-kind must be cpu or gpu, got {opts.device!r}")
    python = [k for k in opts.kinds if k in PYTHON_KINDS]
    if python and opts.device != "cpu":
        raise StnDeployError(f"--kind {python[0]} runs on cpu instances only "
                             "(--instance-kind cpu)")
    if opts.threads is not None and (opts.threads < 1 or not python):
        raise StnDeployError("--threads sets the runner threads of the python-* kinds only "
                             "(Triton's native backends take theirs from config.pbtxt)")
    if opts.max_batch < 1 or opts.instances < 1 or opts.queue_delay_us < 0 or \
            opts.max_queue < 0:
        raise StnDeployError("--max-batch-size and --instances must be positive and "
                             "--queue-delay-us and --max-queue not negative")
    bad = [b for b in preferred_sizes(opts) if not 1 <= b <= opts.max_batch]
    if bad:
        raise StnDeployError(f"--preferred-batch-size {bad[0]} is outside "
                             f"1..--max-batch-size {opts.max_batch}")
    if facts.max_batch is not None and opts.max_batch > facts.max_batch:
        raise StnDeployError(f"--max-batch-size {opts.max_batch} exceeds the plan's profile "
                             f"maximum {facts.max_batch}; rebuild it with a larger maximum "
                             "(export --trt-profile MIN,OPT,MAX)")
    static = [t for t in facts.inputs if t.dims and t.dims[0] > 0]
    if static:
        raise StnDeployError(f"{facts.path.name} has a static batch ({static[0].dims[0]}); "
                             "Triton's dynamic batcher needs one exported without "
                             "--static-batch")
    if opts.trt_fp16 and (opts.device != "gpu" or "onnxruntime" not in opts.kinds):
        raise StnDeployError("--trt-fp16 is the TensorRT accelerator of onnxruntime on GPUs: "
                             "it needs --kind onnxruntime --instance-kind gpu")


def config_text(facts: ModelFacts, kind: str, name: str, opts: RepoOptions) -> str:
    """config.pbtxt for one model: dims without the batch dimension, which max_batch_size
    stands for."""
    gpu = kind == "trt" or (opts.device == "gpu" and kind not in PYTHON_KINDS)

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
    queue = (f"  default_queue_policy {{\n    max_queue_size: {opts.max_queue}\n  }}\n"
             if opts.max_queue else "")
    lines = [
        f'name: "{name}"',
        PLATFORM_LINE[kind],
        f"max_batch_size: {opts.max_batch}",
        f"input [\n{tensors(facts.inputs, False)}\n]",
        f"output [\n{tensors(facts.outputs, True)}\n]",
        f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n"
        f"  max_queue_delay_microseconds: {opts.queue_delay_us}\n{queue}}}",
        f"instance_group [\n  {{\n    count: {opts.instances}\n"
        f"    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}\n  }}\n]",
    ]
    if kind == "openvino":
        lines.append(f'default_model_filename: "{MODEL_FILENAME[kind]}"')
    if kind in PYTHON_KINDS:
        lines.append(python_parameters(kind, opts))
    if kind == "trt":
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


def python_parameters(kind: str, opts: RepoOptions) -> str:
    """The parameters model.py reads: which runner, on which file, with how many threads.
    Where stn-deploy is imported from is not among them: serve says so when it starts the
    server (:data:`stn_deploy.serving.python_model.PATH_ENV`), so the repository holds no
    path of this machine."""
    from stn_deploy.serving.python_model import PARAM_MODEL_FILE, PARAM_RUNNER, PARAM_THREADS

    values = {PARAM_RUNNER: kind.removeprefix("python-"),
              PARAM_MODEL_FILE: MODEL_FILENAME[kind]}
    if opts.threads is not None:
        values[PARAM_THREADS] = str(opts.threads)
    return "\n".join(f'parameters {{\n  key: "{k}"\n  value {{ string_value: {json.dumps(v)} }}\n}}'
                     for k, v in values.items())


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
    opts = dataclasses.replace(opts, kinds=tuple(dict.fromkeys(kind_name(k)
                                                               for k in opts.kinds)))
    check_options(facts, opts)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StnDeployError(f"--out-dir {out} is a file; give a folder")
    prefix = opts.name or default_prefix(facts.path)
    if not opts.kind_suffix and len(opts.kinds) != 1:
        raise StnDeployError("a model name without its kind serves one kind only")
    names = [model_name(prefix, kind) if opts.kind_suffix else prefix for kind in opts.kinds]
    taken = [n for n in names if (out / n).exists()]
    if taken:
        raise StnDeployError(f"{out / taken[0]} exists; remove it or pass another --model-name")
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
    if kind == "trt":
        shutil.copyfile(sidecar_path(facts.path),
                        sidecar_path(folder / VERSION / MODEL_FILENAME[kind]))
    if kind in PYTHON_KINDS:
        from stn_deploy.serving.python_model import MODEL_PY

        (folder / VERSION / PYTHON_MODEL_FILE).write_text(MODEL_PY, encoding="utf-8")
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
    if not schema_available():
        return
    problems = validate_repository(repo)
    if problems:
        raise StnDeployError("the repository written does not validate (a bug):\n"
                             + "\n".join(problems))


__all__ = ["KINDS", "PYTHON_KINDS", "RepoOptions", "kind_name", "config_text", "write_repository"]
