"""The C++ runtime (runtimes/cpp): build its OpenVINO backend, classify real digits images with
an exported ONNX and compare with ONNX Runtime in Python; feed it bad files.

Builds once per session into runtimes/cpp/build/pytest (gitignored, incremental: about 20 s
from scratch on 2 cores, a second on a rebuild). Skipped, with the reason, where cmake, a C++
compiler or the openvino wheel's CMake config is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stn_deploy.pnm import write_pnm

pytestmark = pytest.mark.cpp

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "runtimes" / "cpp"
BUILD = CPP / "build" / "pytest"
# Both sides compute in float32 (OpenVINO is pinned to f32); the rest is summation order.
ATOL = 1e-3
N_IMAGES = 120  # digits test images written as PGM and classified by both


def _openvino_cmake_dir() -> Path | None:
    try:
        import openvino
    except ImportError:
        return None
    d = Path(openvino.__file__).parent / "cmake"
    return d if (d / "OpenVINOConfig.cmake").is_file() else None


def _skip_reason() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake not found on PATH"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++ or clang++) on PATH"
    if _openvino_cmake_dir() is None:
        return "the openvino wheel (with openvino/cmake/OpenVINOConfig.cmake) is not installed"
    return None


@pytest.fixture(scope="session")
def stn_classify() -> Path:
    reason = _skip_reason()
    if reason:
        pytest.skip(f"C++ runtime not built: {reason}")
    configure = ["cmake", "-S", str(CPP), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DOpenVINO_DIR={_openvino_cmake_dir()}", "-DSTN_WITH_OPENVINO=ON",
                 "-DSTN_WARNINGS_AS_ERRORS=ON"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"] if not (BUILD / "CMakeCache.txt").exists() else []
    for cmd in (configure, ["cmake", "--build", str(BUILD), "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    exe = BUILD / "stn_classify"
    assert exe.is_file()
    return exe


def run(exe: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def exported(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained digits model as float-input ONNX and as uint8 NHWC (embedded) ONNX + theta."""
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx

    out = tmp_path_factory.mktemp("cpp-models")
    model = load_checkpoint(digits_checkpoint).model()
    return {
        "float": export_onnx(model, out / "digits.onnx", OnnxOptions(opset=17)),
        "embedded": export_onnx(model, out / "digits_u8.onnx",
                                OnnxOptions(opset=17, embed_preprocess=True, with_theta=True)),
    }


@pytest.fixture(scope="session")
def images(digits_bundle: Any, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[list[Path], np.ndarray]:
    out = tmp_path_factory.mktemp("cpp-images")
    nchw = digits_bundle.test.images[:N_IMAGES].numpy()
    paths = [write_pnm(out / f"digit_{i:03d}.pgm", img.transpose(1, 2, 0))
             for i, img in enumerate(nchw)]
    return paths, nchw


def onnxruntime_logits(model: Path, nchw_u8: np.ndarray, embedded: bool) -> np.ndarray:
    import onnxruntime as ort

    from stn_deploy.artifacts import config_from_onnx

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    if embedded:
        x = np.ascontiguousarray(nchw_u8.transpose(0, 2, 3, 1))
    else:
        config = config_from_onnx(model)
        mean = np.asarray(config.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(config.std, np.float32).reshape(1, -1, 1, 1)
        x = ((nchw_u8.astype(np.float32) / np.float32(255.0) - mean) / std).astype(np.float32)
    return sess.run(["logits"], {"input": x})[0]


def cpp_json(exe: Path, model: Path, paths: list[Path], *extra: object) -> dict[str, Any]:
    r = run(exe, model, *paths, "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("kind", ["float", "embedded"])
def test_logits_match_onnxruntime(stn_classify: Path, exported: dict[str, Path],
                                  images: tuple[list[Path], np.ndarray], kind: str) -> None:
    paths, nchw = images
    doc = cpp_json(stn_classify, exported[kind], paths, "--top-k", 3, "--batch", 50)
    assert doc["backend"] == "openvino"
    assert doc["embedded_preprocess"] is (kind == "embedded")
    assert doc["class_names"] == [str(i) for i in range(10)]
    cpp = np.array([r["logits"] for r in doc["results"]], dtype=np.float32)
    ref = onnxruntime_logits(exported[kind], nchw, embedded=kind == "embedded")
    assert cpp.shape == ref.shape == (N_IMAGES, 10)
    assert float(np.abs(ref).max()) > 1.0  # a trained model: logits are not all near zero
    np.testing.assert_allclose(cpp, ref, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(cpp.argmax(1), ref.argmax(1))
    # top-k: best first, softmax scores, names from the metadata.
    ex = np.exp(ref - ref.max(1, keepdims=True))
    prob = ex / ex.sum(1, keepdims=True)
    for i, r in enumerate(doc["results"]):
        assert r["image"] == str(paths[i])
        idx = [t["index"] for t in r["top_k"]]
        assert idx == list(np.argsort(-cpp[i], kind="stable")[:3])
        assert [t["name"] for t in r["top_k"]] == [str(j) for j in idx]
        np.testing.assert_allclose([t["score"] for t in r["top_k"]], prob[i, idx], atol=1e-4)


def test_batch_size_does_not_change_results(stn_classify: Path, exported: dict[str, Path],
                                            images: tuple[list[Path], np.ndarray]) -> None:
    paths = images[0][:11]
    one = cpp_json(stn_classify, exported["float"], paths, "--batch", 1)
    four = cpp_json(stn_classify, exported["float"], paths, "--batch", 4)
    a = np.array([r["logits"] for r in one["results"]])
    b = np.array([r["logits"] for r in four["results"]])
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_text_output_and_bench(stn_classify: Path, exported: dict[str, Path],
                               images: tuple[list[Path], np.ndarray]) -> None:
    paths = images[0][:2]
    r = run(stn_classify, exported["float"], *paths, "--top-k", 2, "--bench", 20)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, p in zip(lines, paths):
        name, rest = line.split(":", 1)
        assert name == str(p) and len(rest.split()) == 4  # two (class, score) pairs
    assert "end-to-end p50" in lines[2] and "p99" in lines[2] and "inference only" in lines[2]
    doc = cpp_json(stn_classify, exported["float"], paths[:1], "--bench", 20)
    bench = doc["bench"]
    assert bench["runs"] == 20 and bench["batch"] == 1
    for mode in ("end_to_end_ms", "inference_ms"):
        assert 0 < bench[mode]["p50"] <= bench[mode]["p99"]


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="session")
def bad_files(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    import onnx

    out = tmp_path_factory.mktemp("cpp-bad")
    good = exported["float"].read_bytes()
    files = {
        "random.onnx": np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes(),
        "truncated.onnx": good[: len(good) // 2],
        "empty.onnx": b"",
        "not_image.ppm": b"this is not an image\n",
        "truncated.pgm": b"P5\n32 32\n255\n" + bytes(100),
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    proto = onnx.load(str(exported["float"]))
    del proto.metadata_props[:]
    onnx.save(proto, str(out / "no_metadata.onnx"))
    write_pnm(out / "big.pgm", np.zeros((40, 40), np.uint8))
    write_pnm(out / "rgb.ppm", np.zeros((32, 32, 3), np.uint8))
    (out / "model.plan").write_bytes(b"\x00" * 64)
    return {p.name: p for p in out.iterdir()}


@pytest.mark.parametrize("model, image, message", [
    ("missing.onnx", "good", "model not found"),
    ("random.onnx", "good", "is not an ONNX model"),
    ("truncated.onnx", "good", "truncated"),
    ("empty.onnx", "good", "empty"),
    ("no_metadata.onnx", "good", "has no 'input_shape' metadata"),
    ("model.plan", "good", "built without TensorRT"),
    ("model.txt", "good", "unknown model extension"),
    ("float", "big.pgm", "is 40x40 with 1 channel(s); the model takes 32x32"),
    ("float", "rgb.ppm", "with 3 channel(s); the model takes 32x32 with 1"),
    ("float", "not_image.ppm", "not a binary PGM/PPM"),
    ("float", "truncated.pgm", "truncated image data"),
    ("float", "missing.pgm", "image not found"),
])
def test_bad_input_is_one_clear_line(stn_classify: Path, exported: dict[str, Path],
                                     bad_files: dict[str, Path],
                                     images: tuple[list[Path], np.ndarray],
                                     model: str, image: str, message: str) -> None:
    model_path = exported[model] if model in exported else bad_files.get(
        model, bad_files["empty.onnx"].parent / model)
    image_path = images[0][0] if image == "good" else bad_files.get(
        image, bad_files["empty.onnx"].parent / image)
    r = run(stn_classify, model_path, image_path)
    assert r.returncode == 1, (r.returncode, r.stderr)  # a normal exit, not a signal (< 0)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert message in lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("args", [[], ["m.onnx"], ["m.onnx", "a.pgm", "--top-k", "0"],
                                  ["m.onnx", "a.pgm", "--bench"], ["m.onnx", "a.pgm", "--nope"]])
def test_usage_errors_exit_2(stn_classify: Path, args: list[str]) -> None:
    r = run(stn_classify, *args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_help(stn_classify: Path) -> None:
    r = run(stn_classify, "--help")
    assert r.returncode == 0 and "--bench N" in r.stdout and "--json" in r.stdout


def test_an_openvino_ir_export_runs_like_its_onnx(stn_classify: Path, digits_checkpoint: Path,
                                                  exported: dict[str, Path],
                                                  images: tuple[list[Path], np.ndarray],
                                                  tmp_path: Path) -> None:
    """`export --format openvino` writes .xml + .bin carrying the model config; the C++ runtime
    reads it from the IR's rt_info and classifies as the ONNX does."""
    from click.testing import CliRunner

    from stn_deploy.cli import cli

    xml = tmp_path / "digits.xml"
    r = CliRunner().invoke(cli, ["export", str(digits_checkpoint), "--format", "openvino",
                                 "--opset", "17", "--out", str(xml), "--verify-samples", "64"])
    assert r.exit_code == 0, r.output
    paths, nchw = images
    doc = cpp_json(stn_classify, xml, paths, "--batch", 50)
    assert doc["backend"] == "openvino" and doc["class_names"] == [str(i) for i in range(10)]
    cpp = np.array([row["logits"] for row in doc["results"]], dtype=np.float32)
    ref = onnxruntime_logits(exported["float"], nchw, embedded=False)
    np.testing.assert_allclose(cpp, ref, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(cpp.argmax(1), ref.argmax(1))
