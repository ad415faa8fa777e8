"""``debug compare`` and ``debug precision`` on real graphs with real planted faults.

The digits model is trained by the real training code (conftest's ``tiny_checkpoint``) and
exported at opset 17; every fault is planted in a copy of that export (or of its INT8 QDQ
variant) the way it happens in deployment: a weight that is not the checkpoint's, a runtime
reading GridSample as nearest (TensorRT with opset-20 "linear"), an activation scale a bad
calibration made too coarse. Each test checks that the first divergent node, its STN stage and
the fix line point at the fault, not just that something failed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from stn_deploy.commands.debug import debug

SAMPLES = "64"


def run(*args: str) -> Result:
    return CliRunner().invoke(debug, [str(a) for a in args])


def error_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def plant(src: Path, dst: Path, edit: Callable[[onnx.ModelProto], None]) -> Path:
    model = onnx.load(str(src))
    edit(model)
    onnx.save(model, str(dst))
    return dst


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def scale_initializer(model: onnx.ModelProto, name: str, factor: float) -> None:
    init = next(i for i in model.graph.initializer if i.name == name)
    value = numpy_helper.to_array(init) * np.float32(factor)
    init.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(init).dtype), name))


def foreign_stn(path: Path, prefix: str = "", size: int = 16) -> Path:
    """A spatial transformer built by hand, not by stn-deploy: no metadata, unnamed nodes
    (``prefix`` names them, so two copies can differ only in names)."""
    rng = np.random.default_rng(1)
    p = prefix

    def init(name: str, value: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(value.astype(np.float32), p + name)

    xs = np.linspace(-1, 1, size) * (size - 1) / size
    gy, gx = np.meshgrid(xs, xs, indexing="ij")
    base = np.stack([gx, gy, np.ones_like(gx)], -1).reshape(-1, 3)
    bias = np.array([0.9, 0.1, 0.05, -0.1, 1.1, -0.03])
    inits = [init("w1", rng.normal(0, 0.5, (4, 1, 3, 3))), init("b1", np.zeros(4)),
             init("fc", rng.normal(0, 0.05, (4, 6))), init("fcb", bias),
             init("base", base), init("w2", rng.normal(0, 0.5, (5, 1, 3, 3))),
             numpy_helper.from_array(np.array([-1, 2, 3], np.int64), p + "shape3"),
             numpy_helper.from_array(np.array([-1, size, size, 2], np.int64), p + "gshape")]
    name = (lambda n: p + n) if prefix else (lambda n: "")
    nodes = [
        helper.make_node("Conv", ["x", p + "w1", p + "b1"], [p + "c1"], name=name("conv1"),
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", [p + "c1"], [p + "r1"], name=name("relu1")),
        helper.make_node("GlobalAveragePool", [p + "r1"], [p + "g1"], name=name("gap1")),
        helper.make_node("Flatten", [p + "g1"], [p + "f1"], name=name("flat1")),
        helper.make_node("Gemm", [p + "f1", p + "fc", p + "fcb"], [p + "t6"], name=name("fc")),
        helper.make_node("Reshape", [p + "t6", p + "shape3"], [p + "theta"], name=name("th")),
        helper.make_node("Transpose", [p + "theta"], [p + "tt"], name=name("tr"), perm=[0, 2, 1]),
        helper.make_node("MatMul", [p + "base", p + "tt"], [p + "pts"], name=name("mm")),
        helper.make_node("Reshape", [p + "pts", p + "gshape"], [p + "grid"], name=name("gr")),
        helper.make_node("GridSample", ["x", p + "grid"], [p + "warped"], name=name("gs"),
                         align_corners=0),
        helper.make_node("Conv", [p + "warped", p + "w2"], [p + "c2"], name=name("conv2")),
        helper.make_node("GlobalAveragePool", [p + "c2"], [p + "g2"], name=name("gap2")),
        helper.make_node("Flatten", [p + "g2"], ["y"], name=name("flat2")),
    ]
    graph = helper.make_graph(
        nodes, "foreign-stn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("debug")


@pytest.fixture(scope="module")
def digits_export(tiny_checkpoint: Path, work: Path) -> Path:
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx

    return export_onnx(load_checkpoint(tiny_checkpoint).model(), work / "digits.onnx",
                       OnnxOptions(opset=17, with_theta=True))


@pytest.fixture(scope="module")
def int8_all(digits_export: Path, work: Path) -> Path:
    """The digits export fully quantized (the STN path too), calibrated as export does."""
    from stn_deploy.artifacts import config_from_onnx
    from stn_deploy.export.precision import quantize_int8
    from stn_deploy.export.verify import verification_data

    config = config_from_onnx(digits_export)
    calib, _ = verification_data(config, "train", None, 200)
    return quantize_int8(digits_export, work / "int8-all.onnx", calib.images, config,
                         keep_stn_float=False)


@pytest.fixture(scope="module")
def coarse_theta(int8_all: Path, work: Path) -> Path:
    """The INT8 variant with the theta regressor's output scale made 20x too coarse."""
    def edit(model: onnx.ModelProto) -> None:
        gemm = node(model, "/stn/regressor/regressor.2/Gemm")
        q = next(n for n in model.graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] == gemm.output[0])
        scale_initializer(model, q.input[1], 20.0)

    return plant(int8_all, work / "int8-coarse-theta.onnx", edit)


# ---------------------------------------------------------------------------------- stages

def test_every_node_of_the_export_gets_its_stn_stage(digits_export: Path) -> None:
    from stn_deploy.debug.stages import assign_stages

    stages = assign_stages(onnx.load(str(digits_export)))
    s = stages.stage
    assert s["/stn/GridSample"] == "sampler"
    assert s["/stn/regressor/regressor.2/Gemm"] == s["/stn/Reshape"] == "theta"
    assert s["/stn/regressor/regressor.0/Gemm"] == "localization"  # the hidden layer
    assert s["/stn/grid/MatMul"] == s["/stn/grid/Transpose"] == "grid"
    assert s["/stn/localization/localization.0/Conv"] == "localization"
    assert s["/classifier/features/features.0/features.0.0/Conv"] == "classifier"
    assert s["/classifier/Flatten"] == "classifier"
    assert stages.theta_tensors == ["theta"]
    assert set(s.values()) == {"localization", "theta", "grid", "sampler", "classifier"}
    assert len(s) == len(onnx.load(str(digits_export)).graph.node)


def test_qdq_and_cast_nodes_take_the_stage_of_their_neighbour(int8_all: Path,
                                                              digits_export: Path,
                                                              work: Path) -> None:
    from stn_deploy.debug.stages import assign_stages
    from stn_deploy.export.precision import convert_fp16

    s = assign_stages(onnx.load(str(int8_all))).stage
    assert s["/stn/regressor/regressor.2/Gemm_output_0_QuantizeLinear"] == "theta"
    assert s["model.stn.regressor.2.weight_DequantizeLinear"] == "theta"  # a weight: its user
    assert s["/stn/grid/MatMul_output_0_DequantizeLinear"] == "grid"
    assert s["model.stn.localization.0.weight_DequantizeLinear"] == "localization"
    assert s["logits_DequantizeLinear"] == "classifier"
    half = assign_stages(onnx.load(str(convert_fp16(digits_export, work / "fp16.onnx")))).stage
    casts = [n for n in half if n.startswith("/stn/GridSample") and n != "/stn/GridSample"]
    assert casts and all(half[n] == "sampler" for n in casts)


def test_stages_of_a_graph_not_made_by_stn_deploy(work: Path) -> None:
    from stn_deploy.debug.stages import assign_stages

    model = onnx.load(str(foreign_stn(work / "foreign.onnx")))
    stages = assign_stages(model)
    by_op = {}
    for n in model.graph.node:
        by_op.setdefault(n.op_type, []).append(stages.stage[n.name])
    assert all(n.name for n in model.graph.node)  # unnamed nodes were named
    assert by_op["GridSample"] == ["sampler"]
    assert by_op["Gemm"] == ["theta"] and by_op["Transpose"] == ["grid"]
    assert by_op["Conv"] == ["localization", "classifier"]
    assert stages.theta_tensors == ["theta"]


# --------------------------------------------------------------------------------- compare

def test_fp32_export_against_its_checkpoint_passes(digits_export: Path,
                                                   tiny_checkpoint: Path,
                                                   work: Path) -> None:
    out = work / "fp32.json"
    result = run("compare", digits_export, "--reference", tiny_checkpoint, "--samples", "32",
                 "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["first_divergent"] is None
    assert report["samples"] == 32 and "digits test split" in report["inputs"]
    assert {r["stage"] for r in report["nodes"]} == {"localization", "theta", "grid",
                                                     "sampler", "classifier"}
    assert max(r["max_abs"] for r in report["nodes"]) < 1e-4
    assert report["end_to_end"]["top1_agreement"] == 1.0


def test_fp16_variant_matches_through_the_converters_renames(digits_export: Path,
                                                             work: Path) -> None:
    from stn_deploy.debug import compare
    from stn_deploy.export.precision import convert_fp16

    half = convert_fp16(digits_export, work / "fp16-cmp.onnx")
    report = compare(half, digits_export, samples=32)
    assert report.passed, report.lines()
    assert report.precision == "fp16" and not report.unmatched
    by = {r.node: r for r in report.rows}
    assert by["/stn/GridSample"].suspect_tensor != by["/stn/GridSample"].tensor  # a rename
    assert by["/stn/grid/Reshape"].displacement_px == 0.0  # the STN path stayed FP32
    assert 0 < by["/classifier/Flatten"].max_abs < 0.05


def test_a_scaled_classifier_weight_is_named_first(digits_export: Path, work: Path) -> None:
    target = "/classifier/features/features.7/Conv"

    def edit(model: onnx.ModelProto) -> None:
        scale_initializer(model, node(model, target).input[1], 1.5)

    bad = plant(digits_export, work / "scaled-weight.onnx", edit)
    out = work / "scaled.json"
    result = run("compare", bad, "--reference", digits_export, "--samples", SAMPLES,
                 "--json", out)
    assert result.exit_code == 1, result.output
    first = json.loads(out.read_text())["first_divergent"]
    assert (first["node"], first["op_type"], first["stage"]) == (target, "Conv", "classifier")
    assert "weights of" in first["fix"] and "re-export" in first["fix"]
    assert f"first divergent node {target}" in result.output


def test_gridsample_read_as_nearest_is_named_with_its_displacement(digits_export: Path,
                                                                   work: Path) -> None:
    def edit(model: onnx.ModelProto) -> None:
        mode = next(a for a in node(model, "/stn/GridSample").attribute if a.name == "mode")
        mode.s = b"nearest"

    bad = plant(digits_export, work / "nearest.onnx", edit)
    out, png = work / "nearest.json", work / "nearest.png"
    result = run("compare", bad, "--reference", digits_export, "--samples", SAMPLES,
                 "--json", out, "--plot", png)
    assert result.exit_code == 1, result.output
    report = json.loads(out.read_text())
    first = report["first_divergent"]
    assert (first["node"], first["stage"]) == ("/stn/GridSample", "sampler")
    # Nearest snaps every point to a pixel centre: uniform offsets give ~0.41 px RMS.
    assert 0.1 < first["displacement_px"] < 0.71
    assert "mode='nearest'" in first["fix"] and "opset 19" in first["fix"]
    stn = [r for r in report["nodes"] if r["stage"] in ("localization", "theta", "grid")]
    assert stn and not any(r["diverged"] for r in stn)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_coarse_theta_scale_in_int8_is_named_in_the_stn(coarse_theta: Path,
                                                          int8_all: Path,
                                                          digits_export: Path) -> None:
    from stn_deploy.debug import compare

    report = compare(coarse_theta, digits_export, samples=int(SAMPLES))
    first = report.first
    assert first is not None and first.stage in ("theta", "localization"), report.lines()
    assert first.displacement_px is not None and first.displacement_px > 0.5
    assert report.fix is not None and "levels" in report.fix and "too coarse" in report.fix
    # The same graph without the planted scale moves the points a fraction of that.
    healthy = compare(int8_all, digits_export, samples=int(SAMPLES))
    theta_px = max(r.displacement_px or 0 for r in healthy.rows if r.stage == "theta")
    assert theta_px < first.displacement_px / 4
    assert "levels" not in (healthy.fix or "")


def test_a_scaled_weight_in_int8_is_named_despite_quantization_noise(digits_export: Path,
                                                                     work: Path) -> None:
    """INT8 values are not held elementwise; a scale fault is still told from quantization
    noise (relative L2 error, blind spot of the cosine), and the weight check counts steps."""
    from stn_deploy.artifacts import config_from_onnx
    from stn_deploy.debug import compare
    from stn_deploy.export.precision import quantize_int8
    from stn_deploy.export.verify import verification_data

    config = config_from_onnx(digits_export)
    calib, _ = verification_data(config, "train", None, 200)
    int8 = quantize_int8(digits_export, work / "int8.onnx", calib.images, config)
    target = "/classifier/features/features.7/Conv"

    def edit(model: onnx.ModelProto) -> None:
        scale_initializer(model, "model.classifier.features.7.weight_scale", 1.5)

    bad = plant(int8, work / "int8-scaled.onnx", edit)
    report = compare(bad, digits_export, samples=int(SAMPLES))
    first = report.first
    assert first is not None and (first.node, first.stage) == (target, "classifier")
    assert first.cosine > 0.99 and first.rel_l2 > 0.3  # the cosine alone would miss it
    assert max(report.rows, key=lambda r: r.jump).node == target  # where the error is made
    assert report.fix is not None and "quantization steps" in report.fix
    assert compare(int8, digits_export, samples=int(SAMPLES)).passed


# ------------------------------------------------------------------------------- precision

def test_precision_recovers_an_int8_variant_a_bad_scale_broke(coarse_theta: Path,
                                                              digits_export: Path,
                                                              work: Path) -> None:
    from stn_deploy.debug import compare
    from stn_deploy.debug.precision import keep_float_int8

    out = work / "keep.json"
    result = run("precision", digits_export, "--precision", "int8", "--variant", coarse_theta,
                 "--samples", "128", "--json", out)
    assert result.exit_code == 0, result.output
    found = json.loads(out.read_text())
    keep = found["keep_float"]
    assert not found["baseline"]["passed"] and found["result"]["passed"]
    assert found["baseline"]["grid_px"] > 0.5 > 0.1 >= found["result"]["grid_px"]
    assert "/stn/Reshape" in keep  # reads the coarsely quantized regressor output
    assert len(keep) < found["candidates"] / 4
    assert all(found["stages"][n] != "classifier" for n in keep)
    # The repaired graph, held to INT8's own gates node by node in the STN:
    fixed = work / "repaired.onnx"
    onnx.save(keep_float_int8(onnx.load(str(coarse_theta)), keep, onnx.load(str(digits_export))),
              str(fixed))
    report = compare(fixed, digits_export, samples=int(SAMPLES))
    assert all(not r.diverged for r in report.rows if r.stage in ("theta", "grid", "sampler"))


def test_precision_fp16_finds_what_the_converter_cannot_convert(digits_export: Path) -> None:
    from stn_deploy.debug import find_keep_float

    result = find_keep_float(digits_export, "fp16", samples=64)
    assert result.result.passed
    assert result.keep_float  # everything in FP16 does not load (FACTS.md: a converter slip)
    assert result.baseline.error is not None or not result.baseline.passed
    assert all(result.stages[n] in ("theta", "grid", "sampler") for n in result.keep_float)


# ------------------------------------------------------------------------------- bad input

def test_a_graph_without_metadata_runs_on_random_inputs_and_says_so(work: Path) -> None:
    a = foreign_stn(work / "plain-a.onnx")
    result = run("compare", a, "--reference", a, "--samples", "16")
    assert result.exit_code == 0, result.output
    assert sum("no stn-deploy metadata" in line for line in result.output.splitlines()) == 1
    assert "16 seeded random inputs" in result.output and "PASSED" in result.output
    missing = run("compare", a)
    assert missing.exit_code == 2 and "records no source checkpoint" in missing.output
    calib = run("precision", a, "--precision", "int8")
    assert calib.exit_code == 1
    assert error_lines(calib) == [error_lines(calib)[0]] and "--variant" in calib.output


def test_mismatched_graphs_get_one_line(digits_export: Path, work: Path) -> None:
    small = foreign_stn(work / "small.onnx")
    shapes = run("compare", small, "--reference", digits_export)
    assert shapes.exit_code == 1 and len(error_lines(shapes)) == 1
    assert "different networks" in shapes.output
    renamed = foreign_stn(work / "renamed.onnx", prefix="other/")
    names = run("compare", renamed, "--reference", foreign_stn(work / "named.onnx", "mine/"))
    assert names.exit_code == 1 and len(error_lines(names)) == 1
    assert "different networks: only 1 of 13" in names.output  # the graph output "y"


def test_other_bad_input_gets_one_line(digits_export: Path, tiny_checkpoint: Path,
                                       work: Path) -> None:
    junk = work / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    bad = run("compare", junk, "--reference", digits_export)
    assert bad.exit_code == 1 and "not a readable ONNX file" in bad.output
    ckpt = run("compare", tiny_checkpoint, "--reference", digits_export)
    assert ckpt.exit_code == 2 and "checkpoint is a reference" in ckpt.output
    no_grid = work / "no-grid.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(no_grid))
    none = run("compare", no_grid, "--reference", no_grid)
    assert none.exit_code == 1 and "no GridSample" in none.output
    fp16_variant = run("precision", digits_export, "--precision", "fp16", "--variant", junk)
    assert fp16_variant.exit_code == 2 and "--precision int8" in fp16_variant.output


def test_a_missing_runtime_gets_one_line(digits_export: Path, work: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    result = run("compare", digits_export, "--reference", digits_export, "--samples", "8")
    assert result.exit_code == 1 and len(error_lines(result)) == 1
    assert "onnxruntime is not available" in result.output and "pip install" in result.output


def test_a_plan_without_tensorrt_gets_one_line(work: Path, digits_export: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the plan path is exercised on a GPU")
    plan = work / "model.plan"
    plan.write_bytes(b"\0" * 64)
    result = run("compare", plan, "--reference", digits_export)
    assert result.exit_code == 1 and len(error_lines(result)) == 1
    assert "tensorrt is not available" in result.output


@pytest.mark.tensorrt
def test_a_plan_compares_through_a_tensorrt_debug_engine(digits_export: Path,
                                                         work: Path) -> None:
    """Runs only where TensorRT and a GPU are: builds a plan, then compares it."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: TensorRT cannot run")
    from stn_deploy.debug import compare
    from stn_deploy.export.tensorrt import build_engine

    plan = work / "fp32.plan"
    source = work / "fp32.onnx"
    source.write_bytes(digits_export.read_bytes())
    build_engine(source, plan, "fp32", (1, 32, 32), 512, None)
    report = compare(plan, digits_export, samples=32)
    assert report.rows and report.passed, report.lines()


@pytest.mark.parametrize("args", [[], ["compare"], ["precision"]])
def test_help(args: list[str]) -> None:
    result = run(*args, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_the_package_root_offers_the_debug_api() -> None:
    """`stn_deploy.compare` & co. are the functions the commands run, loaded on first use."""
    import stn_deploy
    import stn_deploy.debug as debug_api

    for name in ("compare", "find_keep_float", "profile"):
        assert getattr(stn_deploy, name) is getattr(debug_api, name)
        assert name in stn_deploy.__all__
