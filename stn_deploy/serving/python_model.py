"""The model Triton's Python backend runs: stn-deploy's runner inside Triton's own stub process.

Triton's Python backend starts one stub process per model instance and hands it every batch
the dynamic batcher formed. Running the runner (ONNX Runtime or OpenVINO) right there is one
hop: PyTriton's proxy added a second (stub -> proxy -> our process and back), which cost about
a batch's compute time again on a CPU.

The ``model.py`` a repository carries (:data:`MODEL_PY`) stays tiny and fixed: it puts the
folders stn-deploy runs from on ``sys.path`` and hands everything to :class:`StubModel`, which
is ordinary, tested package code. The stub's Python is the interpreter's base installation,
not the virtualenv stn-deploy lives in, so something must say where stn-deploy is: ``serve``
names this installation's folders (:func:`python_path`) in the environment variable
:data:`PATH_ENV` when it starts tritonserver, and the stub inherits it. A repository thus
holds no path of the machine or environment that wrote it and serves wherever it is copied;
a variable of its own rather than PYTHONPATH, because model.py reads each folder with
``site.addsitedir`` (the ``.pth`` files of editable installs). This module imports nothing
of Triton at the top, so it can be imported (and its pure parts tested) without a server.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

# config.pbtxt parameters the stub reads (string values, as Triton's parameters are).
PARAM_RUNNER = "runner"  # stn-deploy backend name: onnxruntime or openvino
PARAM_MODEL_FILE = "model_file"  # in the version folder, beside model.py
PARAM_THREADS = "threads"  # runner threads per instance; absent: default_threads()

# The environment variable naming the folders the stub imports stn-deploy from (set by serve).
PATH_ENV = "STN_DEPLOY_STUB_PATH"

MODEL_PY = '''\
"""Triton's Python backend loads this file: stn-deploy's runner, run in Triton's stub process.

Written by `stn-deploy triton-repo`; the runner and the model file are parameters in
../config.pbtxt. The stub's Python is the base interpreter, not the environment stn-deploy is
installed in: `stn-deploy serve` names that environment's folders in @PATH_ENV@
when it starts tritonserver, so this repository holds no path of the machine that wrote it.
"""

import json
import os
import site
import sys

PATH_ENV = "@PATH_ENV@"


def _put_first(paths):
    """The folders in PATH_ENV first on sys.path, their .pth files read (editable installs)."""
    for path in reversed([p for p in paths.split(os.pathsep) if os.path.isdir(p)]):
        before = list(sys.path)
        site.addsitedir(path)
        added = [p for p in sys.path if p not in before]
        sys.path[:] = added + before


class TritonPythonModel:
    def initialize(self, args):
        _put_first(os.environ.get(PATH_ENV, ""))
        try:
            from stn_deploy.serving.python_model import StubModel
        except ImportError as e:
            raise ImportError(f"{e} (the stub imports stn-deploy from the folders in {PATH_ENV}, "
                              "which stn-deploy serve sets: serve this repository with it)") from e
        self.model = StubModel(args, json.loads(args["model_config"]))

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
'''.replace("@PATH_ENV@", PATH_ENV)


def default_threads(instances: int) -> int:
    """Runner threads per instance: half the CPUs over the instances, at least 1. Triton's
    front end and the clients need the other half (on 2 cores one runner thread served more
    than two)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // 2 // max(1, instances))


def parameters(config: dict[str, Any]) -> dict[str, str]:
    """config.pbtxt's parameters as plain strings (Triton hands them as JSON objects)."""
    return {k: str(v.get("string_value", "")) for k, v in config.get("parameters", {}).items()}


def instance_count(config: dict[str, Any]) -> int:
    return sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1


def split_batch(outputs: dict[str, np.ndarray], names: list[str],
                sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """One batch's outputs cut back into the requests it was made of (in order)."""
    parts, start = [], 0
    for n in sizes:
        parts.append({k: np.ascontiguousarray(outputs[k][start:start + n]) for k in names})
        start += n
    return parts


class StubModel:
    """One model instance in Triton's stub: a runner, activated once, fed each batch."""

    def __init__(self, args: dict[str, Any], config: dict[str, Any]) -> None:
        from stn_deploy.backends import create_runner

        params = parameters(config)
        folder = Path(args["model_repository"]) / str(args["model_version"])
        threads = (int(params[PARAM_THREADS]) if params.get(PARAM_THREADS)
                   else default_threads(instance_count(config)))
        self.runner = create_runner(params[PARAM_RUNNER], folder / params[PARAM_MODEL_FILE],
                                    threads=threads)
        self.runner.activate()
        self.input_name: str = config["input"][0]["name"]
        self.output_names: list[str] = [o["name"] for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        """All requests of a batch run as one array; a failure answers each request with
        the error (Triton then returns it to the client) instead of killing the stub.

        Tensors cross by DLPack, not ``as_numpy()``/``Tensor(name, array)``: the wheel's stub
        is built against numpy 1, whose array-descriptor layout numpy 2 changed, and with
        numpy 2 its numpy path returns outputs of the wrong byte size ("output tensor shape
        does not match size of output"). DLPack carries no numpy struct."""
        import triton_python_backend_utils as pb_utils

        try:
            xs = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input_name))
                  for r in requests]
            # one request: its read-only DLPack view, copied (OpenVINO writes into inputs)
            x = np.array(xs[0]) if len(xs) == 1 else np.concatenate(xs)
            out = self.runner.infer(x)
            parts = split_batch(out, self.output_names, [len(a) for a in xs])
        except Exception as e:  # runtimes raise their own types; the client gets the text
            error = pb_utils.TritonError(f"{type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error)
                    for _ in requests]
        return [pb_utils.InferenceResponse(
            output_tensors=[output_tensor(pb_utils, k, v) for k, v in part.items()])
            for part in parts]

    def finalize(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()


# The name DLPack gives a consumed capsule. Kept alive here: a capsule keeps only a pointer
# to its name.
USED_CAPSULE = b"used_dltensor"


def output_tensor(pb_utils: Any, name: str, array: np.ndarray) -> Any:
    """A Triton tensor over ``array`` by DLPack, its capsule marked consumed as DLPack says.

    The Python backend marks a capsule it took ``used_dlpack`` rather than DLPack's
    ``used_dltensor``, so numpy's capsule destructor does not see it consumed and writes
    "PyCapsule_GetPointer called with incorrect name" with a traceback to the server log for
    every output of every request (it frees nothing: the backend's tensor frees the array).
    Renaming the capsule after the backend took it ends that."""
    capsule = array.__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    set_name = ctypes.pythonapi.PyCapsule_SetName
    set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
    set_name(capsule, USED_CAPSULE)
    return tensor


def python_path() -> list[str]:
    """The folders the stub must import stn-deploy and its runtimes from, as serve finds
    them when it starts: this interpreter's site-packages (where onnxruntime, openvino and
    numpy are) and the folder holding the stn_deploy package (an editable install or a
    checkout)."""
    import site
    import sysconfig

    package_root = Path(__file__).resolve().parents[2]  # the folder holding stn_deploy/
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             *site.getsitepackages(), str(package_root)]
    return list(dict.fromkeys(paths))


__all__ = ["MODEL_PY", "PATH_ENV", "StubModel", "default_threads", "python_path", "split_batch"]
