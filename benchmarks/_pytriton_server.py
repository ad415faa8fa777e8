"""PyTriton serving an ONNX model through ONNX Runtime: the two-hop path, kept only as the
baseline ``triton_serving.py`` compares ``stn-deploy serve`` against in the same run.

Why it is a benchmark file and not part of stn-deploy: PyTriton puts a proxy between Triton's
Python-backend stub and the process that runs the model (stub -> proxy -> our process and
back), which cost 4-5x the one-hop server's latency at concurrency 1; ``stn-deploy serve``
runs the runner inside the stub instead. PyTriton 0.7 also pins numpy<2, so this file runs in
an interpreter of its own (``--pytriton-python`` of triton_serving.py), e.g.

    python3 -m venv /tmp/pyt && /tmp/pyt/bin/pip install "nvidia-pytriton>=0.7,<0.8" \\
        "numpy<2" onnxruntime

It imports nothing from stn_deploy (that environment does not have it): the ONNX Runtime
session takes the options of ``stn_deploy/backends/onnxrt.py`` (all graph optimisations,
``--threads`` intra-op threads, one inter-op thread, sequential), so the runner is the same.

    python _pytriton_server.py MODEL.onnx --name NAME --port 18130 --threads 1

prints "serving" once Triton is ready, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np


def session(model: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def libpython_first() -> None:
    """This interpreter's libpython first on LD_LIBRARY_PATH for tritonserver: the stub links
    ``libpython3.X.so.1.0`` and picks up another build of the same minor version otherwise."""
    libdir = Path(sys.base_prefix) / "lib"
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([str(libdir), *paths])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--name", required=True, help="served model name")
    ap.add_argument("--port", type=int, default=18130, help="HTTP; gRPC +1, metrics +2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--queue-delay-us", type=int, default=100, help="as stn-deploy serve's")
    args = ap.parse_args()

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    sess = session(args.model, args.threads)
    inp = sess.get_inputs()[0]
    dtype = np.uint8 if inp.type == "tensor(uint8)" else np.float32
    outputs = [o.name for o in sess.get_outputs()]
    probe = sess.run(None, {inp.name: np.zeros((1, *inp.shape[1:]), dtype=dtype)})

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        got = sess.run(None, {inp.name: np.ascontiguousarray(inputs[inp.name])})
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in zip(outputs, got)}

    libpython_first()
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    config = TritonConfig(http_address="127.0.0.1", http_port=args.port,
                          grpc_address="127.0.0.1", grpc_port=args.port + 1,
                          metrics_address="127.0.0.1", metrics_port=args.port + 2,
                          log_verbose=0, exit_on_error=True)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name, infer_func=infer,
            inputs=[Tensor(name=inp.name, dtype=np.dtype(dtype), shape=tuple(inp.shape[1:]))],
            outputs=[Tensor(name=k, dtype=np.float32, shape=tuple(v.shape[1:]))
                     for k, v in zip(outputs, probe)],
            config=ModelConfig(max_batch_size=args.max_batch_size, batcher=DynamicBatcher(
                max_queue_delay_microseconds=args.queue_delay_us)),
            strict=True)
        triton.run()
        print("serving", flush=True)
        while not stop.wait(0.5):
            if not triton.is_alive():
                sys.exit("Error: tritonserver exited")


if __name__ == "__main__":
    main()
