"""The repository ``stn-deploy serve`` starts tritonserver on: written from a model file into
a temporary folder, or a repository folder the user wrote with ``triton-repo``, checked.

Its own module so :mod:`stn_deploy.serving.serve` stays about the server process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stn_deploy.errors import StnDeployError
from stn_deploy.serving.triton_repo import QUEUE_DELAY_US


SERVE_BACKENDS = ("onnxruntime", "openvino")  # the runners a Python-backend model runs


@dataclass
class ServeOptions:
    model: Path  # an .onnx/.pt file, or a repository folder of python-* models
    backend: str | None = None  # onnxruntime (default) or openvino
    name: str | None = None  # None: the file's stem
    host: str = "127.0.0.1"
    port: int = 8000  # HTTP; gRPC on port + 1, metrics on port + 2 unless given
    grpc_port: int | None = None
    metrics_port: int | None = None
    max_batch: int = 32
    queue_delay_us: int = QUEUE_DELAY_US
    max_queue: int = 0  # requests waiting before Triton rejects (0: unbounded)
    threads: int | None = None  # per instance
    instances: int = 1

    @property
    def ports(self) -> dict[str, int]:
        return {"HTTP": self.port, "gRPC": self.grpc_port or self.port + 1,
                "metrics": self.metrics_port or self.port + 2}


def prepare_repository(opts: ServeOptions, out: Path,
                       echo: Callable[[str], None]) -> tuple[Path, list[str]]:
    """(repository folder, served model names). A folder is served as it is once it
    validates and holds only Python-backend models (the wheel's tritonserver has no other
    backend); a checkpoint is exported first (uint8 input, as triton-repo does)."""
    if opts.model.is_dir():
        return opts.model, check_repository(opts.model)
    from stn_deploy.artifacts import model_kind
    from stn_deploy.serving.triton_repo import RepoOptions, default_prefix, write_repository

    kind = model_kind(opts.model)
    if kind == "plan":
        raise StnDeployError(f"{opts.model.name} is a TensorRT plan: the [serve] extra's "
                             "tritonserver has only the Python backend on the CPU; serve plans "
                             "from Triton's container (stn-deploy triton-repo --kind trt)")
    backend = opts.backend or SERVE_BACKENDS[0]
    if backend not in SERVE_BACKENDS:
        raise StnDeployError(f"--backend {backend}: serve runs {' or '.join(SERVE_BACKENDS)}")
    model = opts.model
    if kind == "checkpoint":
        from stn_deploy.export.pipeline import ExportRequest, run_export

        model = out.parent / f"{opts.model.stem}.onnx"
        run_export(ExportRequest(checkpoint=opts.model, embed_preprocess=True, out=model),
                   echo=echo)
    name = opts.name or default_prefix(opts.model)
    write_repository(model, out, RepoOptions(
        kinds=(f"python-{backend}",), name=name, kind_suffix=False, max_batch=opts.max_batch,
        queue_delay_us=opts.queue_delay_us, max_queue=opts.max_queue, threads=opts.threads,
        instances=opts.instances))
    return out, [name]


def check_repository(repo: Path) -> list[str]:
    """The model names of a repository tritonserver here can serve; one line otherwise."""
    from stn_deploy.serving.validate import parse_config, schema_available, validate_repository

    if not schema_available():
        raise StnDeployError("checking a repository needs tritonclient: pip install "
                             "'stn-deploy[serve]'")
    problems = validate_repository(repo)
    if problems:
        raise StnDeployError(f"{repo} is not a servable repository: {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    names = []
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg = parse_config(folder / "config.pbtxt")
        if cfg.backend != "python":
            raise StnDeployError(f"{folder.name} uses {cfg.platform or cfg.backend}; the [serve] "
                                 "extra's tritonserver has only the Python backend: write the "
                                 "repository with triton-repo --kind python-onnxruntime")
        names.append(folder.name)
    return names
