"""``stn-deploy bench`` end to end on the digits model: files, schemas, gate, skipped backends."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from stn_deploy import report
from stn_deploy.cli import cli
from stn_deploy.data import DataBundle

FAST = ["--batch-sizes", "1,4", "--iterations", "3", "--warmup", "1", "--eval-samples", "64",
        "--quiet"]
RESULT_KEYS = {"model", "model_kind", "source_model", "backend", "precision", "status", "reason",
               "device", "library_version", "runtime", "input", "size_mb", "peak_rss_mb", "eval",
               "latency", "gate_failures", "notes", "requested", "not_accelerated"}
LATENCY_KEYS = set(report.LATENCY_KEYS) | {"warmup"}


@pytest.fixture(scope="module")
def untrained_onnx(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same config as the digits model, random weights: disagrees with it on most images."""
    import torch

    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.model import build_model

    config = load_checkpoint(digits_checkpoint).config
    torch.manual_seed(1)
    model = build_model(config)
    path = tmp_path_factory.mktemp("bench") / "untrained.onnx"
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx

    return export_onnx(model.eval(), path, OnnxOptions(opset=17))


def test_bench_writes_every_output_with_stable_schema(digits_checkpoint: Path, digits_onnx: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, [
        "bench", str(digits_checkpoint), str(digits_onnx), "--backend", "torch,onnxruntime",
        *FAST, "--json", str(out / "b.json"), "--csv", str(out / "b.csv"),
        "--markdown", str(out / "b.md"), "--plot", str(out / "b.png"), "--min-agreement", "99",
    ])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "b.json").read_text())
    assert doc["schema_version"] == report.SCHEMA_VERSION == 1
    assert {"tool", "tool_version", "created", "system", "settings", "reference", "eval_data",
            "skipped_backends", "results", "gate"} <= set(doc)
    assert doc["reference"]["backend"] == "torch"
    assert doc["reference"]["model"] == str(digits_checkpoint)
    assert doc["eval_data"]["n"] == 64 and doc["gate"]["passed"] is True
    # checkpoint x {torch, onnxruntime (via a temporary export)}, onnx x onnxruntime only.
    pairs = sorted((Path(r["model"]).suffix, r["backend"]) for r in doc["results"])
    assert pairs == [(".onnx", "onnxruntime"), (".pt", "onnxruntime"), (".pt", "torch")]
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert len(ok) == 3
    for r in doc["results"]:
        assert set(r) == RESULT_KEYS
    for r in ok:
        assert r["eval"]["agreement_pct"] == 100.0 and r["eval"]["n"] == 64
        assert r["eval"]["max_abs_logit_diff"] < 1e-3
        # Every row has theta (the checkpoint's ONNX row through its temporary export with
        # theta); the reference against itself is exactly 0, ONNX Runtime within float error.
        theta_diff, shift_px = r["eval"]["mean_abs_theta_diff"], r["eval"]["max_theta_shift_px"]
        if r["backend"] == "torch":
            assert theta_diff == 0.0 and shift_px == 0.0
        else:
            assert 0.0 <= theta_diff < 1e-5
            assert 0.0 <= shift_px < 1e-3  # FP32's verification bound, in pixels
        assert r["size_mb"] > 0 and r["device"] and r["library_version"]
        modes = {(lat["batch_size"], lat["mode"]) for lat in r["latency"]}
        assert modes == {(1, "end_to_end"), (1, "compute_only"), (4, "end_to_end"),
                         (4, "compute_only")}
        for lat in r["latency"]:
            assert set(lat) == LATENCY_KEYS and lat["iterations"] == 3
            assert lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    with open(out / "b.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == report.CSV_COLUMNS
        lines = list(reader)
    assert len(lines) == 3 * 4  # one line per row, batch size and mode
    md = (out / "b.md").read_text()
    assert md.startswith("| Backend |") and "Reference for agreement" in md
    # The theta shift is in the table a user reads, not only in the JSON: 0 for the reference.
    head, _, *rows = md.splitlines()
    column = head.split(" | ").index("Theta shift")
    torch_row = next(r for r in rows if r.startswith("| torch |"))
    assert torch_row.split(" | ")[column] == "0 px"
    assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_fails_with_one_line_per_backend(digits_checkpoint: Path,
                                              untrained_onnx: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, [
        "bench", str(digits_checkpoint), str(untrained_onnx), "--backend", "onnxruntime",
        "--no-compute-only", *FAST, "--min-agreement", "90", "--max-accuracy-drop", "5",
        "--json", str(tmp_path / "g.json"),
    ])
    assert res.exit_code == 1, res.output
    failed = [ln for ln in res.output.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1 and "untrained.onnx" in failed[0] and "agreement" in failed[0]
    doc = json.loads((tmp_path / "g.json").read_text())
    statuses = {Path(r["model"]).name: r["status"] for r in doc["results"]}
    assert statuses["untrained.onnx"] == "failed" and doc["gate"]["passed"] is False
    assert statuses[digits_checkpoint.name] == "ok"


def test_apply_gate_unit() -> None:
    rows = [report.new_result("a.onnx", "onnx", "onnxruntime", "int8",
                              eval={"agreement_pct": 98.0, "accuracy_drop_pct": 0.2}),
            report.new_result("b.onnx", "onnx", "openvino", "fp32",
                              eval={"agreement_pct": 100.0, "accuracy_drop_pct": 0.0}),
            report.new_result("c.onnx", "onnx", "openvino", "fp32", status="skipped"),
            report.new_result("d.onnx", "onnx", "openvino", "fp32", status="error",
                              reason="cannot compile")]
    lines = report.apply_gate(rows, 99.0, 0.5)
    assert len(lines) == 2 and "98.00% < 99%" in lines[0]
    assert lines[1] == "FAILED openvino fp32 (d.onnx): error: cannot compile"
    assert [r["status"] for r in rows] == ["failed", "ok", "skipped", "error"]
    assert report.apply_gate(rows, None, None) == []


@pytest.mark.parametrize("backends", [[], ["--backend", "all"]], ids=["default", "all"])
def test_gate_fails_when_a_backend_not_named_errors(backends: list[str],
                                                    digits_checkpoint: Path, digits_onnx: Path,
                                                    tmp_path: Path) -> None:
    """A truncated ONNX among good models: onnxruntime and openvino error on it. Neither was
    named (defaults, or 'all'), and the gate must still fail: the error is what CI is for."""
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(digits_onnx.read_bytes()[:2000])
    good = [str(digits_checkpoint)] if not backends else [str(digits_onnx)]
    res = CliRunner().invoke(cli, [
        "bench", *good, str(broken), *backends, "--no-compute-only", *FAST,
        "--min-agreement", "99", "--json", str(tmp_path / "g.json")])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    doc = json.loads((tmp_path / "g.json").read_text())
    bad = [r for r in doc["results"] if r["model"] == str(broken)]
    assert bad and all(r["status"] == "error" and not r["requested"] for r in bad)
    assert all(r["status"] == "ok" for r in doc["results"] if r["model"] != str(broken))
    failed = [ln for ln in res.output.splitlines() if ln.startswith("FAILED")]
    assert sorted(failed) == sorted(f"FAILED {report.label(r)}: error: {r['reason']}"
                                    for r in bad)
    assert doc["gate"] == {"passed": False, "failures": failed}
    # Without the gate, an error of a backend nobody named stays a row in the table.
    res = CliRunner().invoke(cli, ["bench", *good, str(broken), *backends,
                                   "--no-compute-only", *FAST])
    assert res.exit_code == 0, res.output


def test_unavailable_backend_is_one_line_not_a_crash(digits_checkpoint: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    res = CliRunner().invoke(cli, ["bench", str(digits_checkpoint), "--backend",
                                   "onnxruntime-cuda", *FAST])
    assert res.exit_code == 1
    assert "no CUDA GPU is visible" in res.output and "Traceback" not in res.output


def test_backend_all_lists_skipped_with_reasons(digits_onnx: Path, tmp_path: Path) -> None:
    """Gated: the skipped backends (no GPU, not installed) are listed and do not fail it."""
    from stn_deploy.backends import available_backends

    res = CliRunner().invoke(cli, ["bench", str(digits_onnx), "--backend", "all",
                                   "--no-compute-only", *FAST, "--json", str(tmp_path / "a.json"),
                                   "--min-agreement", "99"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "a.json").read_text())
    ran = {r["backend"] for r in doc["results"]}
    expect = {n for n, reason in available_backends().items() if reason is None
              and n in ("onnxruntime", "openvino", "onnxruntime-cuda", "onnxruntime-trt")}
    assert ran == expect
    for name, reason in available_backends().items():
        if reason is not None:
            assert doc["skipped_backends"][name] == reason
            assert f"not gated: skipped {name}: {reason}" in res.output
    assert "torch" in doc["skipped_backends"]  # available, but no checkpoint was given
    assert doc["gate"]["passed"] is True


def test_openvino_bf16_row_is_labelled(digits_onnx: Path, tmp_path: Path) -> None:
    from stn_deploy.backends import unavailable_reason

    if unavailable_reason("openvino"):
        pytest.skip(unavailable_reason("openvino"))
    res = CliRunner().invoke(cli, ["bench", str(digits_onnx), "--backend", "openvino",
                                   "--ov-precision", "bf16", "--ov-hint", "throughput",
                                   "--no-compute-only", *FAST, "--json", str(tmp_path / "b.json")])
    (row,) = json.loads((tmp_path / "b.json").read_text())["results"]
    if row["status"] == "ok":
        assert row["precision"] == "bf16" and row["runtime"]["inference_precision"] == "bf16"
        assert row["runtime"]["requests"] == 2 * row["runtime"]["streams"]
        assert row["eval"]["agreement_pct"] >= 95
    else:  # a CPU without bf16: one line saying so, not a mislabelled f32 row
        assert "no bf16 support" in row["reason"] and res.exit_code == 1


def test_backend_that_fits_no_model_fails(digits_onnx: Path) -> None:
    res = CliRunner().invoke(cli, ["bench", str(digits_onnx), "--backend", "onnxruntime,torch",
                                   "--no-compute-only", *FAST])
    assert res.exit_code == 1
    assert "skipped torch: runs checkpoint files and none was given" in res.output


def test_json_to_standard_output_and_sample_counts(digits_onnx: Path,
                                                   digits_bundle: DataBundle) -> None:
    """--json - is the one document on standard output (the table goes to stderr);
    --eval-samples all is the whole test split and 0 is no evaluation at all."""
    quick = ["bench", str(digits_onnx), "--backend", "onnxruntime", "--no-compute-only",
             "--batch-sizes", "1", "--iterations", "2", "--warmup", "0"]
    res = CliRunner().invoke(cli, [*quick, "--eval-samples", "all", "--json", "-"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert "stn-deploy bench" in res.stderr  # the table's title
    (row,) = doc["results"]
    assert doc["eval_data"]["n"] == len(digits_bundle.test.labels) == row["eval"]["n"]
    assert doc["settings"]["eval_samples"] is None
    res = CliRunner().invoke(cli, [*quick, "--eval-samples", "0", "--quiet", "--json", "-"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["eval_data"] is None and doc["results"][0]["eval"] is None
    assert doc["settings"]["eval_samples"] == 0


def test_tensorrt_is_trt(digits_onnx: Path) -> None:
    """The old spellings of TensorRT's runner are quiet aliases of trt (which runs plans)."""
    for typed in ("tensorrt", "trt"):
        res = CliRunner().invoke(cli, ["bench", str(digits_onnx), "--backend", typed, *FAST])
        assert res.exit_code == 1, res.output
        assert "trt: runs plan files and none was given" in res.output


def test_usage_errors_exit_2(digits_onnx: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for args in (["--backend", "nope"], ["--batch-sizes", "1,x"], ["--batch-sizes", "0"],
                 ["--iterations", "3", "--duration", "1"], ["--ov-precision", "f32"],
                 ["--eval-samples", "-1"], ["--eval-samples", "some"], ["--device", "gpu"]):
        res = runner.invoke(cli, ["bench", str(digits_onnx), *args])
        assert res.exit_code == 2, (args, res.output)
    res = runner.invoke(cli, ["bench", str(tmp_path / "missing.onnx")])
    assert res.exit_code == 2


def test_help_lists_options() -> None:
    res = CliRunner().invoke(cli, ["bench", "--help"])
    assert res.exit_code == 0
    for opt in ("--backend", "--batch-sizes", "--min-agreement", "--max-accuracy-drop", "--plot",
                "--csv", "--markdown", "--quiet", "--duration", "--ov-precision"):
        assert opt in res.output


def test_busy_machine_is_warned_and_recorded(digits_onnx: Path, tmp_path: Path,
                                             spin_cpus: Callable[[int], None]) -> None:
    from stn_deploy.backends.base import available_cpus

    spin_cpus(min(available_cpus(), 8))
    res = CliRunner().invoke(cli, ["bench", str(digits_onnx), "--backend", "onnxruntime",
                                   "--batch-sizes", "1", "--iterations", "2", "--warmup", "0",
                                   "--eval-samples", "0", "--quiet",
                                   "--json", str(tmp_path / "b.json"),
                                   "--markdown", str(tmp_path / "b.md")])
    assert res.exit_code == 0, res.output
    busy = json.loads((tmp_path / "b.json").read_text())["system"]["cpu_busy_pct_at_start"]
    if busy is None:
        pytest.skip("no /proc/stat on this system")
    assert busy >= 25
    assert f"other processes kept {busy:.0f}% of the CPUs busy" in res.output
    assert f"other processes used {busy:.0f}% of the CPUs" in (tmp_path / "b.md").read_text()


def test_bench_flags_a_collapsed_stn(tmp_path: Path) -> None:
    """An identity STN (as initialised) is collapsed: bench says so in table and JSON."""
    from stn_deploy.checkpoint import Checkpoint, save_checkpoint
    from stn_deploy.data import load_dataset
    from stn_deploy.model import build_model

    bundle = load_dataset("digits")
    model = build_model(bundle.config)
    ckpt = tmp_path / "identity.pt"
    save_checkpoint(ckpt, Checkpoint(config=bundle.config, state_dict=model.state_dict()))
    js = tmp_path / "b.json"
    md = tmp_path / "b.md"
    r = CliRunner().invoke(cli, ["bench", str(ckpt), "--backend", "torch", "--batch-sizes", "4",
                                 "--iterations", "2", "--warmup", "0", "--eval-samples", "64",
                                 "--json", str(js), "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    health = json.loads(js.read_text())["results"][0]["eval"]["stn_health"]
    assert health["collapsed"] is True and health["theta_spread_px"] == 0.0
    assert "COLLAPSED (0.00 px)" in md.read_text() and "COLLAPSED STN" in md.read_text()


def test_a_precision_the_cpu_cannot_speed_up_is_labelled() -> None:
    """INT8 without VNNI/AMX and bf16 without AVX512_BF16/AMX are marked, with the ISA named;
    the runtime's own compute precision is shown when it differs from the file's."""
    from stn_deploy.report import footnotes, not_accelerated, precision_text

    int8 = {"backend": "openvino", "precision": "int8", "runtime": {}, "device": "cpu"}
    fp32_in_bf16 = {"backend": "openvino", "precision": "fp32",
                    "runtime": {"inference_precision": "bf16"}, "device": "cpu"}
    fp32 = {"backend": "onnxruntime", "precision": "fp32", "runtime": {}, "device": "cpu"}
    avx2, amx = ["AVX2"], ["AVX2", "AVX-512", "VNNI", "AVX512_BF16", "AMX"]
    assert [not_accelerated(r, avx2) for r in (int8, fp32_in_bf16, fp32)] == ["int8", "bf16", None]
    assert [not_accelerated(r, amx) for r in (int8, fp32_in_bf16, fp32)] == [None, None, None]
    assert precision_text(int8, avx2) == "int8*" and precision_text(int8, amx) == "int8"
    assert precision_text(fp32_in_bf16, amx) == "fp32 (computes bf16)"
    report = {"results": [int8, fp32], "system": {"cpu_isa": avx2}}
    note = next(n for n in footnotes(report) if n.startswith("*"))
    assert "int8: not accelerated on this CPU (AVX2)" in note and "VNNI or AMX" in note
