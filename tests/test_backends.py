"""Runners on the real digits model: same answers everywhere, lifecycle, unavailable backends."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from stn_deploy.backends import BACKENDS, available_backends, create_runner, unavailable_reason
from stn_deploy.data import DataBundle
from stn_deploy.errors import MissingDependencyError, StnDeployError
from stn_deploy.harness import normalize_np, run_batched, to_runner_input


@pytest.fixture(scope="module")
def digits_onnx_embedded(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx

    out = tmp_path_factory.mktemp("onnx") / "digits-u8.onnx"
    return export_onnx(load_checkpoint(digits_checkpoint).model(), out,
                       OnnxOptions(opset=17, embed_preprocess=True))


def test_registry_reports_every_backend() -> None:
    avail = available_backends()
    assert set(avail) == set(BACKENDS)
    assert avail["torch"] is None and avail["onnxruntime"] is None
    for name, reason in avail.items():
        assert reason is None or (isinstance(reason, str) and "\n" not in reason), name


def test_gpu_backends_without_gpu_say_so() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    for name in ("trt", "onnxruntime-cuda", "onnxruntime-trt"):
        assert "no CUDA GPU" in (unavailable_reason(name) or "")
    with pytest.raises(StnDeployError, match="backend trt: no CUDA GPU"):
        create_runner("trt", "model.plan")


def test_missing_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    reason = unavailable_reason("openvino")
    assert reason is not None and "pip install openvino" in reason
    from stn_deploy.backends.ov import import_openvino

    with pytest.raises(MissingDependencyError):
        import_openvino()


def test_unknown_backend_and_wrong_kind(digits_onnx: Path) -> None:
    assert "unknown backend" in (unavailable_reason("nope") or "")
    with pytest.raises(StnDeployError, match="cannot run onnx files"):
        create_runner("torch", digits_onnx)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_onnx_runners_match_torch(name: str, digits_checkpoint: Path, digits_onnx: Path,
                                  digits_onnx_embedded: Path, digits_bundle: DataBundle) -> None:
    if unavailable_reason(name):
        pytest.skip(unavailable_reason(name))
    images = digits_bundle.test.images[:40].numpy()
    with create_runner("torch", digits_checkpoint) as ref_runner:
        assert ref_runner.input_spec.layout == "NCHW"
        ref = run_batched(ref_runner, images, 16)
    with create_runner(name, digits_onnx) as r:
        assert r.precision == "fp32" and r.output_names == ("logits", "theta")
        assert r.input_spec.shape == (-1, 1, 32, 32) and r.version
        out = run_batched(r, images, 16)
        # Compute-only path gives the same work a home: bind, run, no host copies.
        r.bind(to_runner_input(r, images[:3]))
        r.infer_bound()
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["theta"], ref["theta"], atol=1e-5)
    with create_runner(name, digits_onnx_embedded) as r:
        assert r.input_spec.dtype == "uint8" and r.input_spec.layout == "NHWC"
        out = run_batched(r, images, 16)
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-4, rtol=1e-4)


def test_openvino_is_really_fp32(digits_onnx: Path) -> None:
    """On CPUs with AVX512_BF16 OpenVINO's default would be bf16; the runner pins f32."""
    if unavailable_reason("openvino"):
        pytest.skip(unavailable_reason("openvino"))
    with create_runner("openvino", digits_onnx, hint="latency", threads=1) as r:
        d = r.describe()
    assert d["inference_precision"] == "f32" and d["threads"] == 1 and d["streams"] == 1
    with pytest.raises(StnDeployError, match="hint"):
        create_runner("openvino", digits_onnx, hint="fastest")


def test_openvino_names_an_added_output_as_the_file_does(digits_onnx: Path, tmp_path: Path,
                                                        digits_bundle: DataBundle) -> None:
    """An output added through an Identity (verification's grid copies) keeps the name the file
    gives it, not the name of the tensor OpenVINO folded it into, and matches ONNX Runtime."""
    pytest.importorskip("openvino")
    from stn_deploy.export.verify import GRID_OUTPUT, with_grid_outputs

    copy = tmp_path / "grids.onnx"
    assert with_grid_outputs(digits_onnx, copy) == 1
    x = digits_bundle.test.images[:16].numpy()
    got = {}
    for name in ("onnxruntime", "openvino"):
        with create_runner(name, copy, threads=1) as runner:
            got[name] = run_batched(runner, x, 16)
    grid = GRID_OUTPUT.format(0)
    assert set(got["openvino"]) == set(got["onnxruntime"]) == {"logits", "theta", grid}
    np.testing.assert_allclose(got["openvino"][grid], got["onnxruntime"][grid], atol=1e-5)


def test_openvino_throughput_splits_a_batch_and_keeps_order(digits_onnx: Path,
                                                          digits_bundle: DataBundle) -> None:
    """THROUGHPUT runs slices of a batch concurrently, reusing requests when there are more
    slices than requests; the joined outputs equal one request's, in order."""
    if unavailable_reason("openvino"):
        pytest.skip(unavailable_reason("openvino"))
    from stn_deploy.backends.ov import REQUESTS_PER_STREAM, SLICE

    # 7 slices on 2 x streams requests (4 with 2 threads): every request runs more than once.
    n = 6 * SLICE + 5
    images = normalize_np(digits_bundle.test.images[:n].numpy(), digits_bundle.config)
    assert len(images) == n
    with create_runner("openvino", digits_onnx, hint="latency", threads=2) as r:
        one = r.infer(images)
        assert r.describe()["requests"] == 1
    with create_runner("openvino", digits_onnx, hint="throughput", threads=2) as r:
        d = r.describe()
        assert d["requests"] == REQUESTS_PER_STREAM * d["streams"] == r._n_requests
        assert d["slice"] == SLICE and len(r._slices(images)) == 7 > d["requests"]
        many = r.infer(images)
        single = r.infer(images[:1])  # fewer images than requests
        r.bind(images)
        r.infer_bound()
        assert set(r._static) == {SLICE, 5, 1}  # one static compile per slice size seen
    for name in ("logits", "theta"):
        assert many[name].shape == one[name].shape
        np.testing.assert_allclose(many[name], one[name], atol=1e-5)
    np.testing.assert_allclose(single["logits"], one["logits"][:1], atol=1e-5)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_openvino_bf16_is_labelled_and_close(digits_onnx: Path, digits_bundle: DataBundle) -> None:
    """bf16 is a row of its own: labelled bf16, computed in bf16, close to f32, or refused."""
    if unavailable_reason("openvino"):
        pytest.skip(unavailable_reason("openvino"))
    images = normalize_np(digits_bundle.test.images[:64].numpy(), digits_bundle.config)
    with create_runner("openvino", digits_onnx, threads=2) as r:
        f32 = r.infer(images)["logits"]
    runner = create_runner("openvino", digits_onnx, threads=2, precision="bf16")
    if not (sys.platform == "linux" and _cpu_has_bf16()):
        with pytest.raises(StnDeployError, match="no bf16 support"):
            runner.activate()
        return
    with runner as r:
        assert r.precision == "bf16" and r.describe()["inference_precision"] == "bf16"
        bf16 = r.infer(images)["logits"]
    diff = np.abs(bf16 - f32).max()
    assert 0 < diff < 0.5  # bf16 keeps 8 bits of mantissa: different, but not far
    assert (bf16.argmax(1) == f32.argmax(1)).mean() >= 0.95
    with pytest.raises(StnDeployError, match="not as int8"):
        create_runner("openvino", digits_onnx, precision="int8")


def test_corrupt_model_files_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(StnDeployError, match="not a readable ONNX"):
        create_runner("onnxruntime", bad)
    ckpt = tmp_path / "bad.pt"
    ckpt.write_bytes(b"garbage")
    with pytest.raises(StnDeployError, match="checkpoint"):
        create_runner("torch", ckpt)


def test_torch_memory_formats_agree(digits_checkpoint: Path, digits_bundle: DataBundle) -> None:
    """channels_last (the default) is a layout, not a different model."""
    images = digits_bundle.test.images[:40].numpy()
    with create_runner("torch", digits_checkpoint) as r:
        assert r.describe()["memory_format"] == "channels_last"
        nhwc = run_batched(r, images, 16)
    with create_runner("torch", digits_checkpoint, memory_format="contiguous") as r:
        nchw = run_batched(r, images, 16)
        r.bind(normalize_np(images[:3], r.config))
        r.infer_bound()
    np.testing.assert_allclose(nhwc["logits"], nchw["logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(nhwc["theta"], nchw["theta"], atol=1e-5)
    with pytest.raises(StnDeployError, match="memory_format"):
        create_runner("torch", digits_checkpoint, memory_format="nhwc")


def test_device_auto_is_each_runners_own_choice(digits_checkpoint: Path,
                                                digits_onnx: Path) -> None:
    """device="auto" (every command's default): torch picks CUDA when it sees one, else the
    CPU; a runner that places itself takes auto as no preference. Anything else is checked
    by name."""
    import torch

    expect = "cuda" if torch.cuda.is_available() else "cpu"
    with create_runner("torch", digits_checkpoint, device="auto") as r:
        assert r.device == expect and r.describe()["device"] == expect
        out = r.infer(np.zeros((2, *r.config.input_shape), np.float32))
        assert out["logits"].shape == (2, r.config.num_classes)
    assert create_runner("torch", digits_checkpoint).device == "cpu"  # the library's default
    from stn_deploy.backends.onnxrt import OnnxRuntimeRunner

    assert OnnxRuntimeRunner(digits_onnx, device="auto").device is None
    with pytest.raises(StnDeployError, match="onnxruntime takes no option device"):
        OnnxRuntimeRunner(digits_onnx, device="cpu")
    with pytest.raises(StnDeployError, match="unknown device 'gpu'; use auto, cpu or cuda"):
        create_runner("torch", digits_checkpoint, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(StnDeployError, match="no CUDA device is visible"):
            create_runner("torch", digits_checkpoint, device="cuda:1")


def test_torch_runner_restores_thread_count(digits_checkpoint: Path) -> None:
    """The thread count is process-wide: a runner must not leave training on its setting."""
    import torch

    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with create_runner("torch", digits_checkpoint, threads=other) as r:
        assert torch.get_num_threads() == other
        r.infer(np.zeros((1, *r.config.input_shape), np.float32))
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_torch_compile_matches_eager(digits_checkpoint: Path, digits_bundle: DataBundle) -> None:
    images = digits_bundle.test.images[:8].numpy()
    with create_runner("torch", digits_checkpoint) as r:
        ref = run_batched(r, images, 8)
    try:
        with create_runner("torch-compile", digits_checkpoint) as r:
            out = run_batched(r, images, 8)
    except StnDeployError as e:
        pytest.skip(f"torch.compile not usable here: {e}")
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-4)
