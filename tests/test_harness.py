"""The measurement harness on a tiny fake runner whose timings and calls are known."""

from __future__ import annotations

import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from stn_deploy import harness as H
from stn_deploy.backends.base import Runner, spec_for
from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError

CONFIG = ModelConfig(in_channels=1, image_size=22, num_classes=3, class_names=("a", "b", "c"),
                     mean=(0.5,), std=(0.25,), dataset="digits")


class FakeRunner(Runner):
    """Logits = per-image mean pixel times fixed weights; sleeps ``slow_s`` on warm-up calls."""

    name = "fake"
    supports_compute_only = True

    def __init__(self, path: Path, *, static_batch: int | None = None, slow_calls: int = 0,
                 slow_s: float = 0.0, **opts: Any) -> None:
        super().__init__(path, **opts)
        self.input_spec = spec_for(self.config, batch=static_batch or -1)
        self.calls = 0
        self.syncs = 0
        self.seen: list[int] = []
        self.slow_calls, self.slow_s = slow_calls, slow_s
        self.weights = np.array([1.0, -1.0, 0.5], dtype=np.float32)

    def load_config(self) -> ModelConfig:
        return CONFIG

    @property
    def version(self) -> str:
        return "0"

    def activate_impl(self) -> None:
        pass

    def deactivate_impl(self) -> None:
        pass

    def _work(self) -> None:
        self.calls += 1
        if self.calls <= self.slow_calls:
            time.sleep(self.slow_s)

    def infer_impl(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self._work()
        self.seen.append(id(x))
        m = x.reshape(len(x), -1).mean(axis=1, keepdims=True)
        return {"logits": m * self.weights, "theta": np.zeros((len(x), 2, 3), np.float32) + m[:, :, None]}

    def bind_impl(self, x: np.ndarray) -> None:
        self.bound = x

    def infer_bound_impl(self) -> None:
        self._work()

    def synchronize(self) -> None:
        self.syncs += 1


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    p = tmp_path / "fake.bin"
    p.write_bytes(b"x")
    return p


def test_percentiles_ordered_and_match_raw_samples(model_file: Path) -> None:
    with FakeRunner(model_file) as r:
        s = H.measure_latency(r, 4, iterations=50, warmup=3)
    ms = np.asarray(s.samples_ms)
    assert len(ms) == s.iterations == 50
    assert s.min_ms <= s.p50_ms <= s.p90_ms <= s.p99_ms <= s.max_ms
    assert s.min_ms == ms.min() and s.max_ms == ms.max()
    np.testing.assert_allclose([s.p50_ms, s.p90_ms, s.p99_ms], np.percentile(ms, [50, 90, 99]))
    assert s.mean_ms == pytest.approx(ms.mean())
    assert s.throughput_ips == pytest.approx(4 / (ms.mean() / 1e3))
    assert "samples_ms" not in s.to_dict() and len(s.to_dict(samples=True)["samples_ms"]) == 50


def test_summarize_known_values() -> None:
    s = H.summarize([1_000_000, 2_000_000, 3_000_000, 4_000_000], 8, H.END_TO_END, 0)
    assert (s.min_ms, s.max_ms, s.mean_ms, s.p50_ms) == (1.0, 4.0, 2.5, 2.5)
    assert s.throughput_ips == pytest.approx(8 / 0.0025)


@pytest.mark.parametrize("mode", [H.END_TO_END, H.COMPUTE_ONLY])
def test_warmup_excluded_and_device_synchronised(model_file: Path, mode: str) -> None:
    # Warm-up calls sleep 30 ms; timed ones do not, so a leaked warm-up shows in max_ms.
    with FakeRunner(model_file, slow_calls=4, slow_s=0.03) as r:
        s = H.measure_latency(r, 2, iterations=10, warmup=4, mode=mode)
        assert r.calls == 14
        # One sync after warm-up, then one before and one after each timed call.
        assert r.syncs == 1 + 2 * 10
    assert s.iterations == 10 and s.warmup == 4
    assert s.max_ms < 30.0


def test_fresh_input_each_iteration(model_file: Path) -> None:
    with FakeRunner(model_file) as r:
        H.measure_latency(r, 2, iterations=H.POOL_SIZE, warmup=0)
        assert len(set(r.seen)) == H.POOL_SIZE


def test_duration_mode_runs_until_time_is_up(model_file: Path) -> None:
    with FakeRunner(model_file) as r:
        t0 = time.perf_counter()
        s = H.measure_latency(r, 1, iterations=None, duration_s=0.05, warmup=1)
        assert time.perf_counter() - t0 >= 0.05
    assert s.iterations >= 2


def test_bad_timing_arguments(model_file: Path) -> None:
    with FakeRunner(model_file) as r:
        with pytest.raises(StnDeployError):
            H.measure_latency(r, 1, iterations=None, duration_s=None)
        with pytest.raises(StnDeployError):
            H.measure_latency(r, 1, iterations=0)
    with FakeRunner(model_file, static_batch=4) as r, pytest.raises(StnDeployError, match="static"):
        H.measure_latency(r, 2, iterations=1)


def test_compare_outputs_accuracy_agreement_diffs() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1, 2])  # right, right, wrong, wrong: 50%
    ref = logits.copy()
    ref[3] = [0.0, 0.5, 0.0]  # reference disagrees on the last image; diff there is 1.0
    theta = np.zeros((4, 2, 3))
    ref_theta = theta.copy()
    ref_theta[0, 0, 0] = 0.6  # mean |diff| over 24 elements = 0.025
    ev = H.compare_outputs({"logits": logits, "theta": theta}, labels,
                           {"logits": ref, "theta": ref_theta}, reference_accuracy_pct=75.0)
    assert ev.n == 4
    assert ev.accuracy_pct == pytest.approx(50.0)
    assert ev.agreement_pct == pytest.approx(75.0)
    assert ev.max_abs_logit_diff == pytest.approx(1.0)
    assert ev.mean_abs_theta_diff == pytest.approx(0.025)
    assert ev.max_theta_shift_px is None  # no image size: no pixels
    assert ev.accuracy_drop_pct == pytest.approx(25.0)
    # In pixels: a 0.6 change of theta's x-scale moves the 28-px frame's sampling points by
    # RMS sqrt(0.6^2 / 3) half-widths = 0.346 x 14 px, on that image only.
    px = H.compare_outputs({"logits": logits, "theta": theta}, labels,
                           {"logits": ref, "theta": ref_theta}, image_size=28)
    assert px.max_theta_shift_px == pytest.approx(0.6 / 3 ** 0.5 * 14)
    plain = H.compare_outputs({"logits": logits}, labels)
    assert plain.agreement_pct is None and plain.mean_abs_theta_diff is None


def test_run_batched_pads_static_batch_and_matches_single(model_file: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 1, 22, 22), dtype=np.uint8)
    with FakeRunner(model_file, static_batch=4) as r:
        out = H.run_batched(r, images)
        assert r.calls == 3  # 4 + 4 + 2 padded to 4
    with FakeRunner(model_file) as r:
        ref = H.run_batched(r, images, batch_size=3)
    assert out["logits"].shape == (10, 3)
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-6)
    # Normalisation is (x/255 - mean) / std.
    x = H.normalize_np(images[:1], CONFIG)
    np.testing.assert_allclose(x, (images[:1] / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-6)


def test_runner_state_and_input_checks(model_file: Path) -> None:
    r = FakeRunner(model_file)
    x = np.zeros((2, 1, 22, 22), np.float32)
    with pytest.raises(StnDeployError, match="activated"):
        r.infer(x)
    with r:
        with pytest.raises(StnDeployError, match="already active"):
            r.activate()
        with pytest.raises(StnDeployError, match="float32"):
            r.infer(x.astype(np.float64))
        with pytest.raises(StnDeployError, match="does not fit"):
            r.infer(np.zeros((2, 1, 23, 22), np.float32))
        assert r.infer(x)["logits"].shape == (2, 3)
    assert not r.is_active
    with pytest.raises(StnDeployError, match="not found"):
        FakeRunner(model_file.with_name("missing.bin"))


def test_bench_runner_fills_schema_row(model_file: Path) -> None:
    from stn_deploy import report

    images = np.random.default_rng(1).integers(0, 256, (9, 1, 22, 22), dtype=np.uint8)
    data = H.EvalData(images, np.zeros(9, dtype=np.int64), "digits")
    row = report.new_result(str(model_file), "onnx", "fake")
    settings = H.BenchSettings(batch_sizes=(1, 4), iterations=3, warmup=1, eval_batch=4)
    H.bench_runner(FakeRunner(model_file), row, settings, data, None)
    assert [(r["batch_size"], r["mode"]) for r in row["latency"]] == [
        (1, "end_to_end"), (1, "compute_only"), (4, "end_to_end"), (4, "compute_only")]
    assert row["eval"]["n"] == 9 and row["eval"]["agreement_pct"] is None
    assert row["peak_rss_mb"] is None or row["peak_rss_mb"] >= 0


def test_system_info_names_cpu() -> None:
    info = H.system_info()
    assert info["cpu"] and info["cpus_available"] >= 1
    assert "numpy" in info["libraries"]


def test_cpu_busy_pct_sees_other_processes(spin_cpus: Callable[[int], None]) -> None:
    from stn_deploy.backends.base import available_cpus

    spin_cpus(1)
    busy = H.cpu_busy_pct()
    if busy is None:
        pytest.skip("no /proc/stat on this system")
    # One spinning process keeps one CPU of all of them busy (the machine may add more).
    assert 0.6 * 100 / (os.cpu_count() or available_cpus()) <= busy <= 100


def test_busy_warning_only_above_threshold() -> None:
    assert H.busy_warning(None) is None
    assert H.busy_warning(H.BUSY_WARN_PCT - 1) is None
    line = H.busy_warning(80.0)
    assert line is not None and "80%" in line and "\n" not in line
