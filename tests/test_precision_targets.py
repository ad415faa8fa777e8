"""benchmarks/precision_targets.py: every precision variant exported through the product's
pipeline and verified, every speed row timed by the harness, every target judged for the CPU's
ISA. End to end on a small digits model (--quick: the timings prove nothing and are not
checked), and ``judge`` on given figures for an AVX2-only, a VNNI and an AMX CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "precision_targets.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("precision_targets", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pt = _load()


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600)


# ---------------------------------------------------------------------------- end to end

def test_quick_run_reports_every_variant_speed_row_and_target(digits_checkpoint: Path,
                                                              tmp_path: Path) -> None:
    done = _script("--checkpoint", str(digits_checkpoint), "--quick",
                   "--results-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "precision_targets.json").read_text())
    md = (tmp_path / "precision_targets.md").read_text()
    assert doc["provenance"]["cpu_isa"] == doc["isa"]

    variants = {v["key"]: v for v in doc["variants"]}
    assert list(variants) == [v.key for v in pt.VARIANTS] + [c.key for c in
                                                             pt.COMPUTED_VARIANTS]
    fp32 = variants["fp32-onnx"]
    assert fp32["status"] == "ok" and fp32["passed"]
    assert fp32["agreement_pct"] == 100.0 and fp32["samples"] == 256
    assert 50.0 < fp32["accuracy"] <= 100.0 and fp32["accuracy"] == fp32["accuracy_ref"]
    assert fp32["grid_px"] is not None and fp32["grid_px"] <= fp32["bound_px"] == 1e-3
    nncf = importlib.util.find_spec("nncf") is not None
    openvino = importlib.util.find_spec("openvino") is not None
    bf16 = "AVX512_BF16" in doc["isa"] or "AMX" in doc["isa"]
    checked = dict(variants)
    computed = checked.pop("ir-int8-bf16")
    whole = checked.pop("onnx-bf16")  # the STN path in bf16 too: judged, not expected to pass
    if openvino and nncf and not bf16:  # the runner refuses bf16 here, by name
        assert computed["status"] == "skipped" and "bf16" in computed["reason"]
    elif openvino and nncf:
        checked["ir-int8-bf16"] = computed  # held to the same checks below
    if openvino and not bf16:
        assert whole["status"] == "skipped" and "bf16" in whole["reason"]
    elif openvino:
        assert whole["status"] == "ok" and whole["computed"] == "bf16"
        assert whole["bound_px"] == 0.1 and whole["theta_px"] > 0  # bf16's bounds, bf16 ran
    for key, v in checked.items():
        needs = next((x.needs for x in pt.VARIANTS if x.key == key), ("openvino", "nncf"))
        if (("nncf" in needs and not nncf) or ("openvino" in needs and not openvino)):
            assert v["status"] == "skipped" and "not installed" in v["reason"]
            continue
        assert v["status"] == "ok", v.get("reason")
        assert v["samples"] == 256 and 0.0 < v["accuracy"] <= 100.0
        assert 95.0 <= v["agreement_pct"] <= 100.0  # the export's own INT8 bound
        assert v["theta_px"] <= v["bound_px"] and v["grid_px"] <= v["bound_px"]
        assert f"| {v['label']} |" in md
    assert "INT8 by onnxruntime's quantizer" in " ".join(variants["int8-ort"]["notes"])

    # Where INT8's time goes, stage by stage beside f32's, on each runtime's own profiler.
    profiles = {p["key"]: p for p in doc["profile"]}
    assert list(profiles) == [p.key for p in pt.PROFILED]
    assert profiles["openvino"]["batch"] == 256 and profiles["onnxruntime-b1"]["batch"] == 1
    for key, runs in (("openvino", openvino and nncf), ("onnxruntime-b1", True)):
        files = profiles[key]["files"]
        if not runs:
            assert all(f["status"] == "skipped" for f in files.values())
            continue
        for f in files.values():
            assert f["status"] == "ok", f
            assert f["stage_ms"]["classifier"] > 0 and f["stage_ms"]["localization"] > 0
            assert sum(f["stage_ms"].values()) == pytest.approx(f["kernel_ms"])
        top = files["int8"]["top"]
        assert len(top) == pt.TOP_KERNELS and top == sorted(top, key=lambda k: -k["ms"])
        runtime = profiles[key]["runtime"]
        assert f"## Where the time goes: {runtime}'s per-node profile" in md
    assert "| classifier |" in md

    speed = {r["key"]: r for r in doc["speed"]}
    assert list(speed) == [r.key for r in pt.SPEED_ROWS]
    assert speed["ov-f32"].get("computed") in ("f32", None)  # None: skipped (no OpenVINO)
    if openvino and nncf and not bf16:
        assert speed["ov-int8-bf16"]["status"] == "skipped"
        assert "bf16" in speed["ov-int8-bf16"]["reason"]
    for row in speed.values():
        if row["status"] == "ok":
            assert set(row["rounds"]) == {"1", "256"}
            assert row["b1_p50_ms"] > 0 and row["b256_ips"] > 0
        else:
            assert row["reason"]

    # The targets in the file are judge's verdicts on the file's own figures and ISA.
    figures = pt.Figures(speed, variants, doc["data"])
    assert doc["targets"] == json.loads(json.dumps(pt.judge(figures, doc["isa"])))
    assert len(doc["targets"]) == len(pt.SPEED_TARGETS) + 4 * len(pt.INT8_VARIANTS)
    for section in ("## Variants", "## Speed", "## Targets", "Quick run"):
        assert section in md
    assert doc["data"] == "digits test split"


def test_a_folder_for_a_digits_checkpoint_is_one_error_line(digits_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    done = _script("--checkpoint", str(digits_checkpoint), "--quick", "--data-dir",
                   str(tmp_path), "--results-dir", str(tmp_path / "results"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("Error: the FP32 export failed: ")
    assert "Traceback" not in done.stderr and not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------- judge

AVX2 = ["AVX2"]
VNNI = ["AVX2", "AVX-512", "VNNI"]
AMX = ["AVX2", "AVX-512", "VNNI", "AVX512_BF16", "AMX"]


def _figures(**changes: Any) -> Any:
    """ORT: INT8 b1 0.8x FP32's p50, 0.9x its img/s; OpenVINO: INT8 3.2x f32 and 1.07x bf16
    at b256, b1 p50 0.5x f32's. Accuracy: NNCF within every bound, ORT's INT8 not."""
    speed = {"ort-fp32": {"b1_p50_ms": 1.0, "b256_ips": 1000.0},
             "ort-int8": {"b1_p50_ms": 0.8, "b256_ips": 900.0},
             "ov-f32": {"b1_p50_ms": 1.0, "b256_ips": 1000.0},
             "ov-bf16": {"b1_p50_ms": 0.7, "b256_ips": 2500.0},
             "ov-bf16-all": {"b1_p50_ms": 0.6, "b256_ips": 3000.0},
             "ov-int8": {"b1_p50_ms": 0.5, "b256_ips": 3200.0},
             "ov-int8-bf16": {"b1_p50_ms": 0.4, "b256_ips": 4000.0}}
    good = {"accuracy_drop": 0.3, "agreement_pct": 98.5, "theta_px": 0.01, "grid_px": 0.1,
            "bound_px": 0.1}
    variants = {"int8-ort": {**good, "accuracy_drop": 0.31, "agreement_pct": 98.4,
                             "grid_px": 0.2},
                "int8-nncf": good, "ir-int8": good, "ir-int8-bf16": good}
    for key, value in changes.items():
        speed[key] = value
    return pt.Figures(speed, variants, "digits test split")


def _verdicts(figures: Any, isa: list[str]) -> dict[str, tuple[float | None, str]]:
    return {r["target"]: (r["value"], r["status"]) for r in pt.judge(figures, isa)}


def test_judge_on_avx2_only_judges_no_speed_target_but_shows_its_value() -> None:
    got = _verdicts(_figures(), AVX2)
    assert got["ov_int8_vs_f32_amx"] == (pytest.approx(3.2), "not judged here: needs AMX")
    assert got["ov_int8_vs_f32_vnni"][1] == "not judged here: needs VNNI"
    assert got["ort_int8_b1"] == (pytest.approx(0.8), "not judged here: needs VNNI/AMX")
    assert got["ov_int8_b1"][1] == "not judged here: needs VNNI/AMX"
    assert got["ort_int8_vs_fp32"][1] == "not judged here: needs VNNI"
    speed = [r for r in pt.judge(_figures(), AVX2) if r["kind"] == "speed"]
    assert len(speed) == len(pt.SPEED_TARGETS)
    assert all(r["status"].startswith("not judged here") for r in speed)
    # Accuracy needs no ISA: judged on every CPU, at the bounds inclusive.
    assert got["int8-nncf_accuracy_drop"] == (0.3, "met")
    assert got["int8-nncf_agreement_pct"] == (98.5, "met")
    assert got["int8-nncf_grid_px"] == (0.1, "met")
    assert got["int8-ort_accuracy_drop"] == (0.31, "missed")
    assert got["int8-ort_agreement_pct"] == (98.4, "missed")
    assert got["int8-ort_theta_px"] == (0.01, "met")
    assert got["int8-ort_grid_px"] == (0.2, "missed")


def test_judge_on_vnni_judges_the_vnni_targets_and_not_the_amx_ones() -> None:
    got = _verdicts(_figures(), VNNI)
    assert got["ov_int8_vs_f32_vnni"] == (pytest.approx(3.2), "met")
    assert got["ov_int8_vs_f32_amx"][1] == "not judged here: needs AMX"
    assert got["ov_int8_vs_bf16_amx"][1] == "not judged here: needs AMX"
    assert got["ort_int8_b1"] == (pytest.approx(0.8), "missed")  # goal <= 0.75
    assert got["ov_int8_b1"] == (pytest.approx(0.5), "met")
    assert got["ort_int8_vs_fp32"] == (pytest.approx(0.9), "missed")
    # A row that could not run is "not measured", with its reason.
    skipped = _figures(**{"ort-int8": {"reason": "INT8 ONNX not exported: failed"}})
    assert _verdicts(skipped, VNNI)["ort_int8_vs_fp32"] == (
        None, "not measured: INT8 ONNX not exported: failed")


def test_judge_on_amx_holds_int8_to_f32_and_bf16() -> None:
    got = _verdicts(_figures(), AMX)
    assert got["ov_int8_vs_f32_amx"] == (pytest.approx(3.2), "missed")  # goal >= 3.5
    assert got["ov_int8_vs_bf16_amx"] == (pytest.approx(3200 / 3000), "met")  # never slower
    assert got["ov_int8_vs_bf16_amx_goal"] == (pytest.approx(3200 / 3000), "missed")  # 1.25
    assert got["ov_int8_vs_f32_vnni"][1].startswith("not judged here: this CPU has AMX")
    assert got["ort_int8_vs_fp32"][1] == "missed"
    faster = _figures(**{"ov-int8": {"b1_p50_ms": 0.5, "b256_ips": 4000.0}})
    got = _verdicts(faster, AMX)
    assert got["ov_int8_vs_f32_amx"] == (pytest.approx(4.0), "met")
    assert got["ov_int8_vs_bf16_amx_goal"] == (pytest.approx(4000 / 3000), "met")


def test_judge_holds_int8_with_bf16_float_parts_to_the_amx_targets_too() -> None:
    """The INT8 IR with its float parts in bf16 is judged beside the f32-float-parts row:
    on AMX against f32 and bf16, and on its own accuracy; where bf16 does not run, its
    rows are "not measured" with the runner's reason."""
    got = _verdicts(_figures(), AMX)
    assert got["ov_int8_bf16_vs_f32_amx"] == (pytest.approx(4.0), "met")
    assert got["ov_int8_bf16_vs_bf16_amx_goal"] == (pytest.approx(4000 / 3000), "met")
    assert got["ov_int8_bf16_b1"] == (pytest.approx(0.4), "met")
    assert got["ir-int8-bf16_theta_px"] == (0.01, "met")
    assert _verdicts(_figures(), AVX2)["ov_int8_bf16_vs_f32_amx"][1] == (
        "not judged here: needs AMX")
    refused = _figures(**{"ov-int8-bf16": {"reason": "openvino bf16: no bf16 on this CPU"}})
    assert _verdicts(refused, VNNI)["ov_int8_bf16_b1"] == (
        None, "not measured: openvino bf16: no bf16 on this CPU")


def test_a_missing_package_skips_its_variant_and_the_rows_that_run_it(tmp_path: Path) -> None:
    """Without NNCF or OpenVINO the run goes on: the variant says why it was skipped, and so
    does every speed row that would have run it."""
    import argparse

    lacking = pt.Variant("ir-int8", "OpenVINO IR INT8 (NNCF)",
                         {"format": "openvino", "precision": "int8"}, ("no_such_package_xyz",))
    row = pt.export_variant(lacking, argparse.Namespace(), tmp_path)
    assert row["status"] == "skipped" and row["reason"].startswith("no_such_package_xyz not "
                                                                   "installed")
    variants = {v.key: {"key": v.key, "label": v.label, "status": "ok", "path": f"{v.key}.x"}
                for v in pt.VARIANTS}
    for key in ("int8-nncf", "ir-int8"):
        variants[key] = {"key": key, "label": key, "status": "skipped",
                         "reason": "nncf not installed"}
    plan = {r["key"]: r for r in pt.speed_plan(variants)}
    assert plan["ov-int8"]["status"] == "skipped"
    assert plan["ov-int8"]["reason"] == "ir-int8 not exported: nncf not installed"
    assert plan["ov-f32"]["status"] == "ok" and plan["ov-f32"]["variant"] == "ir-fp32"
    # No INT8 IR but the NNCF ONNX: OpenVINO's INT8 row runs that.
    variants["int8-nncf"] = {"key": "int8-nncf", "label": "x", "status": "ok", "path": "n.onnx"}
    assert {r["key"]: r for r in pt.speed_plan(variants)}["ov-int8"]["variant"] == "int8-nncf"
