"""C++ (runtimes/cpp stn_classify, OpenVINO backend) vs the Python OpenVINO runner, batch 1,
in one run on the same ONNX and the same image.

Both sides are timed the same way: warm-up, then N runs, nearest-rank p50/p99, two modes:
- end-to-end: uint8 image -> normalisation -> inference -> softmax (C++: Classifier::classify;
  Python: numpy normalisation + runner.infer + numpy softmax);
- inference only: input already preprocessed (C++: Classifier::infer_raw; Python: runner.infer).
Rounds alternate C++ and Python so that load from other processes hits both alike; the
reported value per side is the median over rounds.

    python benchmarks/cpp_vs_python.py [--onnx MODEL.onnx] [--runs 2000] [--rounds 3]
    python benchmarks/cpp_vs_python.py --quick     # proves it works in a few seconds

Without --onnx it exports a random-init digits model (1x32x32; latency does not depend on
the weights). Writes benchmarks/results/cpp_vs_python.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from functools import partial
from typing import Any, Callable

import numpy as np

from _provenance import CHECKOUT, RESULTS, write_results

CPP = CHECKOUT / "runtimes" / "cpp"


def percentile(sorted_ms: list[float], p: float) -> float:
    """Nearest rank, the rule stn_classify uses."""
    rank = math.ceil(p / 100.0 * len(sorted_ms))
    return sorted_ms[min(len(sorted_ms) - 1, max(rank, 1) - 1)]


def time_runs(n: int, f: Callable[[], object]) -> dict[str, float]:
    for _ in range(max(5, n // 10)):  # same warm-up rule as stn_classify
        f()
    clock = time.perf_counter_ns
    ms = []
    for _ in range(n):
        t0 = clock()
        f()
        ms.append((clock() - t0) / 1e6)
    ms.sort()
    return {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "mean": sum(ms) / len(ms)}


def build_cpp(build_dir: Path) -> Path:
    import openvino

    ov_dir = Path(openvino.__file__).parent / "cmake"
    cmds = [["cmake", "-S", str(CPP), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
             f"-DOpenVINO_DIR={ov_dir}", "-DSTN_WITH_OPENVINO=ON"],
            ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)]]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"Error: {' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return build_dir / "stn_classify"


def python_runner(model: Path, threads: int) -> tuple[Any, str]:
    """The product's OpenVINO runner if it imports; else a plain openvino.Core loop (said so)."""
    try:
        from stn_deploy.backends import create_runner

        runner = create_runner("openvino", model, threads=threads)
        runner.activate()
        return runner, "stn_deploy.backends create_runner('openvino') (hint LATENCY, f32)"
    except ImportError as e:
        import openvino as ov

        class Plain:
            def __init__(self) -> None:
                core = ov.Core()
                cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                       "INFERENCE_PRECISION_HINT": "f32"}
                self.request = core.compile_model(core.read_model(str(model)), "CPU",
                                                  cfg).create_infer_request()

            def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
                self.request.infer({0: x}, share_inputs=True)
                return {"logits": self.request.get_output_tensor(0).data.copy()}

            def deactivate(self) -> None:
                self.request = None

        return Plain(), f"plain openvino.Core loop (stn_deploy.backends unavailable: {e})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; --quick shrinks runs and rounds so the script proves it works in seconds."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", type=Path, help="model (default: export a random-init digits model)")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="[default: available CPUs]")
    ap.add_argument("--quick", action="store_true", help="200 runs, 1 round")
    ap.add_argument("--build-dir", type=Path, default=CPP / "build" / "bench")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpp_vs_python")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.rounds = 200, 1
    return args


def random_digits_onnx(folder: Path) -> Path:
    """A random-init digits model (seed 0) as ONNX: latency does not depend on the weights, so
    the script runs without a trained checkpoint."""
    import torch

    from stn_deploy.data import load_dataset
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx
    from stn_deploy.model import build_model

    torch.manual_seed(0)
    return export_onnx(build_model(load_dataset("digits").config).eval(),
                       folder / "digits_random.onnx", OnnxOptions(opset=17))


def write_test_image(model: Path, folder: Path) -> tuple[Any, np.ndarray, Path]:
    """(config, image, file): one random uint8 image (seed 0) at the model's input size, also
    written as PGM/PPM, so both sides classify the same pixels."""
    from stn_deploy.artifacts import config_from_onnx
    from stn_deploy.pnm import write_pnm

    config = config_from_onnx(model)
    c, h, w = config.input_shape
    img = np.random.default_rng(0).integers(0, 256, (h, w, c), dtype=np.uint8)
    return config, img, write_pnm(folder / ("x.ppm" if c == 3 else "x.pgm"), img)


def preprocessor(model: Path, config: Any) -> tuple[bool, Callable[[np.ndarray], np.ndarray]]:
    """(embedded, preprocess): the Python side's HWC uint8 -> NCHW input, the same work the
    C++ side does (nothing but a batch axis when the model embeds its preprocessing)."""
    from stn_deploy.artifacts import read_metadata

    embedded = read_metadata(model).get("preprocess") == "embedded"
    mean = np.asarray(config.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config.std, np.float32).reshape(1, -1, 1, 1)

    def preprocess(x: np.ndarray) -> np.ndarray:
        if embedded:
            return x[None]
        return ((x.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255.0) - mean)
                / std).astype(np.float32)

    return embedded, preprocess


def python_paths(runner: Any, img: np.ndarray, preprocess: Callable[[np.ndarray], np.ndarray]
                 ) -> tuple[Callable[[], None], Callable[[], object]]:
    """(end_to_end, inference_only) on the Python side, matching Classifier::classify
    (normalise, infer, softmax) and Classifier::infer_raw (infer on a preprocessed input)."""
    pre = preprocess(img)

    def end_to_end() -> None:
        logits = runner.infer(preprocess(img))["logits"]
        e = np.exp(logits - logits.max(1, keepdims=True))
        e / e.sum(1, keepdims=True)

    return end_to_end, lambda: runner.infer(pre)


def alternating_rounds(cpp_cmd: list[str], runs: int, n_rounds: int,
                       end_to_end: Callable[[], None],
                       inference_only: Callable[[], object]) -> dict[str, list[dict[str, float]]]:
    """Per round, the C++ bench then the Python timings, so load from other processes hits
    both sides alike; a failing stn_classify ends the script with its own message."""
    rounds: dict[str, list[dict[str, float]]] = {k: [] for k in
                                                 ("cpp_e2e", "cpp_infer", "py_e2e", "py_infer")}
    for _ in range(n_rounds):
        r = subprocess.run(cpp_cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr.strip())
        bench = json.loads(r.stdout)["bench"]
        rounds["cpp_e2e"].append(bench["end_to_end_ms"])
        rounds["cpp_infer"].append(bench["inference_ms"])
        rounds["py_e2e"].append(time_runs(runs, end_to_end))
        rounds["py_infer"].append(time_runs(runs, inference_only))
    return rounds


def median_over_rounds(rounds: dict[str, list[dict[str, float]]], key: str) -> dict[str, float]:
    """p50, p99 and mean of one path, each the median over the rounds (see the module doc)."""
    return {s: statistics.median(r[s] for r in rounds[key]) for s in ("p50", "p99", "mean")}


def result_doc(args: argparse.Namespace, model: Path, input_shape: tuple[int, ...],
               embedded: bool, threads: int, python_kind: str,
               rounds: dict[str, list[dict[str, float]]],
               load_average: tuple[float, float, float]) -> dict[str, Any]:
    """The JSON: settings, the median figures per side and mode, and every round's figures."""
    c, h, w = input_shape
    med = partial(median_over_rounds, rounds)
    return {
        "load_average_start": load_average,
        "model": str(args.onnx) if args.onnx is not None
        else "a random-init digits model (seed 0), written and removed by the script",
        "input": [c, h, w], "embedded_preprocess": embedded, "batch": 1,
        "runs": args.runs, "rounds": args.rounds, "threads": threads,
        "python_runner": python_kind,
        "ms": {"cpp": {"end_to_end": med("cpp_e2e"), "inference_only": med("cpp_infer")},
               "python": {"end_to_end": med("py_e2e"), "inference_only": med("py_infer")}},
        "per_round": rounds,
    }


def markdown(result: dict[str, Any]) -> str:
    """The markdown: how it was measured, then one table line per side."""
    import openvino

    c, h, w = result["input"]
    ms = result["ms"]
    md = [
        "# C++ vs Python, OpenVINO CPU, batch 1",
        "",
        f"Load average at start {result['load_average_start'][0]:.1f}. "
        f"OpenVINO {openvino.__version__}, {result['threads']} inference threads, hint LATENCY, "
        "f32.",
        f"Model: {Path(result['model']).name}, input {c}x{h}x{w}"
        f"{' (uint8, preprocessing embedded)' if result['embedded_preprocess'] else ''}. "
        f"{result['runs']} runs after warm-up, median of {result['rounds']} alternating rounds; "
        "nearest-rank percentiles.",
        f"Python side: {result['python_runner']}.",
        "",
        "| path | end-to-end p50 (ms) | end-to-end p99 (ms) | inference-only p50 (ms) "
        "| inference-only p99 (ms) |",
        "|---|---|---|---|---|",
    ]
    for side, label in (("cpp", "C++ stn_classify"), ("python", "Python runner")):
        e, i = ms[side]["end_to_end"], ms[side]["inference_only"]
        md.append(f"| {label} | {e['p50']:.4f} | {e['p99']:.4f} | {i['p50']:.4f} "
                  f"| {i['p99']:.4f} |")
    md += ["", "End-to-end: uint8 image -> normalise -> infer -> softmax. Inference only: "
           "preprocessed input, inference call alone.", ""]
    return "\n".join(md)


def main() -> None:
    """Build stn_classify, time both sides in alternating rounds, write and print the results."""
    args = parse_args()
    if shutil.which("cmake") is None:
        sys.exit("Error: cmake not found")
    threads = args.threads or len(os.sched_getaffinity(0))
    load_average = os.getloadavg()  # before the build and the rounds load the machine
    exe = build_cpp(args.build_dir)
    tmp = Path(tempfile.mkdtemp(prefix="cpp-vs-python-"))
    runner = None
    try:  # a failing stn_classify exits mid-round: the runner and the folder go either way
        model = args.onnx if args.onnx is not None else random_digits_onnx(tmp)
        config, img, image_path = write_test_image(model, tmp)
        embedded, preprocess = preprocessor(model, config)
        runner, python_kind = python_runner(model, threads)
        end_to_end, inference_only = python_paths(runner, img, preprocess)
        cpp_cmd = [str(exe), str(model), str(image_path), "--json", "--bench", str(args.runs),
                   "--threads", str(threads)]
        rounds = alternating_rounds(cpp_cmd, args.runs, args.rounds, end_to_end,
                                    inference_only)
    finally:
        if runner is not None:
            runner.deactivate()
        shutil.rmtree(tmp, ignore_errors=True)
    result = result_doc(args, model, config.input_shape, embedded, threads, python_kind, rounds,
                        load_average)
    md = markdown(result)
    write_results(args.out.name, result, md, folder=args.out.parent)
    print(md)


if __name__ == "__main__":
    main()
