"""benchmarks/triton_serving.py's bookkeeping: rounds combined into medians, served / in
process taken within each round, the targets judged on the one-hop rows only, and PyTriton's
rows compared from this run or an earlier one. The measuring itself (servers, load) is what
tests/test_serving.py covers on real servers."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # its `from _provenance import ...`
    try:
        spec = importlib.util.spec_from_file_location("triton_serving", BENCH / "triton_serving.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


ts = _load()


def _row(server: str, protocol: str, c: int, ips: float, p99: float, batch: float,
         agreement: float = 100.0) -> dict[str, Any]:
    return {"server": server, "protocol": protocol, "concurrency": c, "throughput_ips": ips,
            "p50_ms": p99 / 2, "p90_ms": p99 * 0.9, "p99_ms": p99, "mean_batch": batch,
            "requests": 10, "answered": 9, "errors": 0, "rejected": 1, "lost": 0,
            "agreement_pct": agreement, "client_cpu_pct": 10.0, "client_cpu_us": 100.0}


def _round(i: int, ips: dict[int, float], rows: list[dict[str, Any]]) -> dict[str, Any]:
    inproc = {b: {"throughput_ips": v, "p50_ms": 1.0, "p99_ms": 1.0 + i} for b, v in ips.items()}
    ts.attach(rows, inproc)
    for r in rows:
        r["round"] = i
    return {"closed_loop": rows, "in_process": inproc}


def _three_rounds() -> list[dict[str, Any]]:
    return [
        _round(0, {1: 1000.0, 16: 1500.0}, [_row("one-hop", "json", 1, 500.0, 2.0, 1.0),
                                             _row("one-hop", "json", 32, 1200.0, 40.0, 15.8),
                                             _row("pytriton", "binary", 32, 600.0, 80.0, 16.2)]),
        _round(1, {1: 800.0, 16: 1000.0}, [_row("one-hop", "json", 1, 300.0, 9.0, 1.0),
                                            _row("one-hop", "json", 32, 900.0, 50.0, 16.0),
                                            _row("pytriton", "binary", 32, 400.0, 90.0, 16.0,
                                                 agreement=99.0)]),
        _round(2, {1: 900.0, 16: 1200.0}, [_row("one-hop", "json", 1, 400.0, 3.0, 1.0),
                                            _row("one-hop", "json", 32, 1000.0, 45.0, 16.1),
                                            _row("pytriton", "binary", 32, 500.0, 85.0, 15.9)]),
    ]


def test_attach_takes_each_round_in_process_figure_at_the_batch_formed() -> None:
    rows = _three_rounds()[1]["closed_loop"]
    assert rows[1]["in_process_batch"] == 16
    assert rows[1]["served_over_in_process"] == 900.0 / 1000.0
    assert rows[0]["served_over_in_process"] == 300.0 / 800.0


def test_combine_gives_medians_sums_and_the_lowest_agreement_per_server_and_level() -> None:
    rounds = _three_rounds()
    rows = ts.combine([r["closed_loop"] for r in rounds], "concurrency")
    assert [(r["server"], r["protocol"], r["concurrency"]) for r in rows] == [
        ("one-hop", "json", 1), ("one-hop", "json", 32), ("pytriton", "binary", 32)]
    c1, c32, py = rows
    assert c1["p99_ms"] == 3.0  # median of 2, 9, 3: one slow round does not decide
    assert c32["throughput_ips"] == 1000.0
    # the median of the per-round ratios (0.8, 0.9, 0.833), not a ratio of medians
    assert abs(c32["served_over_in_process"] - 1000.0 / 1200.0) < 1e-9
    assert c32["in_process_batch"] == 16
    assert (c32["answered"], c32["rejected"], c32["requests"]) == (27, 3, 30)
    assert py["agreement_pct"] == 99.0
    assert [r["round"] for r in py["per_round"]] == [0, 1, 2]


def test_combine_in_process_counts_the_rounds_behind_each_median() -> None:
    rounds = [{1: {"throughput_ips": 10.0, "p50_ms": 1.0, "p99_ms": 2.0}},
              {1: {"throughput_ips": 30.0, "p50_ms": 3.0, "p99_ms": 4.0},
               5: {"throughput_ips": 50.0, "p50_ms": 5.0, "p99_ms": 6.0}}]
    got = ts.combine_in_process(rounds)
    assert got[1] == {"throughput_ips": 20.0, "p50_ms": 2.0, "p99_ms": 3.0, "rounds": 2}
    assert got[5]["rounds"] == 1


def _measured() -> dict[str, Any]:
    rounds = _three_rounds()
    return {"closed_loop": ts.combine([r["closed_loop"] for r in rounds], "concurrency"),
            "open_loop": [], "in_process": ts.combine_in_process([r["in_process"] for r in
                                                                  rounds]),
            "in_process_rounds": [r["in_process"] for r in rounds],
            "overload": {"answered": 5, "rejected": 50, "errors": 0, "lost": 0, "requests": 55,
                         "ready_after": True},
            "sigterm": {"exit_code": 0, "seconds": 2.0, "group_gone": True},
            "killed_mid_run": {"hung": False, "client_exit_code": 1, "seconds_after_kill": 1.0,
                               "client_error_lines": ["Error: gone"]}}


def test_targets_judge_the_one_hop_medians_only() -> None:
    args = argparse.Namespace(protocol_list=("json",))
    goals = ts.targets(args, _measured())
    # batch-1 p99 in process: median of 1, 2, 3 = 2 ms; goal 2 x 2 + 1 = 5 ms; served 3 ms
    assert goals["c1_p99_ms_json"]["met"] and goals["c1_p99_ms_json"]["value"] == 3.0
    assert "2.00, 9.00, 3.00" in goals["c1_p99_ms_json"]["at"]
    assert goals["c32_served_over_in_process_json"]["value"] == 83.3
    assert goals["c32_served_over_in_process_json"]["met"]
    assert goals["served_agrees_with_local"]["met"]  # PyTriton's 99 % is not ours to judge
    m = _measured()
    m["closed_loop"][0]["agreement_pct"] = 99.5
    assert not ts.targets(args, m)["served_agrees_with_local"]["met"]


def test_comparison_says_whether_pytriton_was_measured_in_this_run() -> None:
    args = argparse.Namespace(model=Path("m.onnx"), backend="onnxruntime")
    m = _measured()
    ref = ts.this_run_pytriton(args, m)
    assert ref is not None and ref["same_run"] and ref["rows"][0]["throughput_ips"] == 500.0
    text = "\n".join(ts.comparison(ref, m["closed_loop"]))
    assert "measured in this run" in text
    old = {**ref, "same_run": False, "source": "old.json", "date": "2026-11-25"}
    assert "not re-measured: 2026-11-25" in "\n".join(ts.comparison(old, m["closed_loop"]))
    m["closed_loop"] = [r for r in m["closed_loop"] if r["server"] != "pytriton"]
    assert ts.this_run_pytriton(args, m) is None
