"""bf16 as an export precision: ``export --format openvino --precision bf16`` writes an
OpenVINO IR with FP32 weights whose metadata says bf16, so the openvino runner compiles it
with bf16 as the inference precision without being told. OpenVINO computes it in bf16 on CPUs
with AVX512_BF16 or AMX and in f32 elsewhere (the file is the same); export's verification,
bench's Precision column and the JSON say which it was on this CPU.

The tests that judge bf16 itself need a CPU on which OpenVINO computes bf16 and are skipped,
naming the CPU's ISA, where it has none; the ones about a CPU without bf16 are skipped on one
that has it.

The openvino runner's ``compute`` option (``bench --ov-precision bf16``) asks OpenVINO to
compute the float parts of FP16 and INT8 files in bf16, their rows keeping the file's label;
a CPU without bf16 refuses it in one line rather than running f32 under a bf16 request."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from stn_deploy.cli import cli
from stn_deploy.data import DataBundle

ov = pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")


def _openvino_has_bf16() -> bool:
    """OpenVINO's own answer (its CPU plugin lists BF16 among its capabilities where it can
    compute in bf16), rather than a guess from the CPU flags."""
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _isa() -> str:
    from stn_deploy.harness import cpu_isa

    return ", ".join(cpu_isa()) or "no AVX2"


HAS_BF16 = _openvino_has_bf16()
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason=f"OpenVINO computes bf16 only on CPUs "
                                f"with AVX512_BF16 or AMX; this one has {_isa()}")
needs_no_bf16 = pytest.mark.skipif(HAS_BF16, reason="this CPU computes bf16: the f32 "
                                   "fallback cannot be seen here")


def _export(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["export", *map(str, args)])
    assert "Traceback" not in r.output, r.output
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def irs(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> dict[str, tuple[Path, str]]:
    """The untrained digits model as a bf16 IR and an FP32 IR: (path, what export printed)."""
    out = tmp_path_factory.mktemp("bf16")
    written = {}
    for precision in ("bf16", "fp32"):
        path = out / f"m-{precision}.xml"
        code, text = _export(tiny_checkpoint, "--format", "openvino", "--precision", precision,
                             "--with-theta", "--out", path, "--verify-samples", 64)
        assert code == 0, text
        written[precision] = (path, text)
    return written


def _verification(path: Path) -> dict[str, Any]:
    from stn_deploy.artifacts import read_ir_metadata

    return json.loads(read_ir_metadata(path)["verification"])


@pytest.fixture
def asked_hints(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The INFERENCE_PRECISION_HINT of every compile the openvino runner makes, in order."""
    import stn_deploy.backends.ov as ov_runner

    hints: list[str] = []
    real = ov_runner.compile_config

    def spy(hint: str, threads: int, precision: str, compute: str | None = None
            ) -> dict[str, Any]:
        config = real(hint, threads, precision, compute)
        hints.append(config["INFERENCE_PRECISION_HINT"])
        return config

    monkeypatch.setattr(ov_runner, "compile_config", spy)
    return hints


def test_the_ir_keeps_fp32_weights_and_says_bf16(irs: dict[str, tuple[Path, str]]) -> None:
    from stn_deploy.artifacts import read_ir_metadata

    bf16, fp32 = irs["bf16"][0], irs["fp32"][0]
    meta = read_ir_metadata(bf16)
    assert meta["precision"] == "bf16" and meta["target"] == "openvino"
    assert bf16.with_suffix(".bin").read_bytes() == fp32.with_suffix(".bin").read_bytes()
    graph = bf16.read_text()
    assert 'element_type="f32"' in graph
    assert 'element_type="bf16"' not in graph and 'element_type="f16"' not in graph


def _precise(path: Path) -> dict[str, str]:
    """The IR's nodes that OpenVINO keeps out of reduced float precision: name -> type."""
    model = ov.Core().read_model(path)
    return {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()
            if "DisablePrecisionConversion_0" in op.get_rt_info()}


def test_the_ir_marks_its_stn_path_and_nothing_else(irs: dict[str, tuple[Path, str]]) -> None:
    """Every float IR carries the mark on the STN path (the localization convolutions through
    GridSample), none on the classifier, so any OpenVINO app that computes it in bf16 keeps
    theta and the grid in f32; export says so."""
    for precision in ("bf16", "fp32"):
        path, text = irs[precision]
        marked = _precise(path)
        model = ov.Core().read_model(path)
        localization = {op.get_friendly_name() for op in model.get_ordered_ops()
                        if op.get_type_name() == "Convolution"
                        and op.get_friendly_name().startswith("/stn/")}
        assert localization and localization <= set(marked)
        assert "GridSample" in marked.values() and "MatMul" in marked.values()  # the grid
        assert not [name for name in marked if "classifier" in name]
        assert f"the STN path ({len(marked)} nodes) marked precision-sensitive" in text


@needs_bf16
def test_computed_in_bf16_the_stn_path_stays_f32(irs: dict[str, tuple[Path, str]]) -> None:
    """What the mark is for, read from OpenVINO's compiled graph: the classifier's convolutions
    in bf16, the localization convolutions, the grid and the sampler in f32."""
    compiled = ov.Core().compile_model(irs["bf16"][0], "CPU",
                                       {"INFERENCE_PRECISION_HINT": "bf16"})
    ran: dict[str, set[str]] = {"stn": set(), "classifier": set()}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info, name = op.get_rt_info(), op.get_friendly_name()
        kind = info["layerType"].astype(str)
        if kind in ("Convolution", "GridSample", "MatMul"):
            part = "stn" if name.startswith("/stn/") else "classifier"
            ran[part].add(info["runtimePrecision"].astype(str))
    assert ran == {"stn": {"f32"}, "classifier": {"bf16"}}


def test_the_runner_takes_bf16_from_the_file(irs: dict[str, tuple[Path, str]],
                                             asked_hints: list[str]) -> None:
    """No option: the file's metadata makes the runner compile with bf16, and it reports what
    OpenVINO computed in (bf16 where the CPU has it, f32 elsewhere)."""
    import numpy as np

    from stn_deploy.backends import runner_class

    computed = {}
    for precision in ("bf16", "fp32"):
        with runner_class("openvino")(irs[precision][0]) as runner:
            assert runner.precision == precision
            computed[precision] = runner.describe()["inference_precision"]
            out = runner.infer(np.zeros((2, *runner.input_spec.shape[1:]), np.float32))
        assert out["logits"].shape[0] == 2
    assert asked_hints == ["bf16", "f32"]
    assert computed == {"bf16": "bf16" if HAS_BF16 else "f32", "fp32": "f32"}


@needs_no_bf16
def test_without_bf16_export_verifies_what_the_cpu_computes(
        irs: dict[str, tuple[Path, str]]) -> None:
    """The IR is written (it is the same on any CPU); its verification is of the f32 that
    OpenVINO computed, held to FP32's bounds, and says bf16 was not judged on this CPU."""
    from stn_deploy.export.verify import FP32

    path, text = irs["bf16"]
    assert "OpenVINO IR (BF16)" in text and "(computed in fp32)" in text
    note = (f"bf16 not judged on this CPU ({_isa()}; bf16 needs AVX512_BF16 or AMX): "
            "openvino computed in fp32, held to FP32's bounds")
    assert note in text
    verification = _verification(path)
    assert verification["computed"] == "fp32" and verification["notes"] == [note]
    assert verification["tolerances"] == dataclasses.asdict(FP32) and verification["passed"]


@needs_bf16
def test_on_a_bf16_cpu_export_judges_bf16(digits_checkpoint: Path, tmp_path: Path) -> None:
    """On a trained model and every test image: computed in bf16, held to bf16's bounds,
    and not FP32's result (bf16 rounds)."""
    from stn_deploy.export.verify import BF16

    path = tmp_path / "m.xml"
    code, text = _export(digits_checkpoint, "--format", "openvino", "--precision", "bf16",
                         "--with-theta", "--out", path)
    assert code == 0, text
    assert "(computed in bf16)" in text and "not judged" not in text
    verification = _verification(path)
    assert verification["computed"] == "bf16" and verification["notes"] == []
    assert verification["tolerances"] == dataclasses.asdict(BF16) and verification["passed"]
    assert verification["max_abs"] > 1e-4  # bf16 really ran: FP32 matches to 1e-6


def test_bench_says_what_the_runtime_computed(irs: dict[str, tuple[Path, str]],
                                              tmp_path: Path) -> None:
    """A bf16 IR runs on any CPU, its Precision saying what OpenVINO computed in (and `*`
    where the CPU cannot speed bf16 up); --ov-precision bf16 over an FP32 file asks for a
    compute precision, so on a CPU without bf16 its row is one error line."""
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    r = CliRunner().invoke(cli, ["bench", str(irs["bf16"][0]), str(irs["fp32"][0]),
                                 "--backend", "openvino", "--ov-precision", "bf16",
                                 "--batch-sizes", "2", "--iterations", "2", "--warmup", "0",
                                 "--eval-samples", "32", "--json", str(js), "--markdown",
                                 str(md)])
    assert "Traceback" not in r.output, r.output
    ir_row, flag_row = json.loads(js.read_text())["results"]
    assert ir_row["status"] == "ok" and ir_row["precision"] == "bf16"
    if HAS_BF16:
        assert r.exit_code == 0, r.output
        assert ir_row["runtime"]["inference_precision"] == "bf16"
        assert ir_row["not_accelerated"] is None and "| bf16 |" in md.read_text()
        assert flag_row["status"] == "ok" and flag_row["precision"] == "bf16"
    else:
        assert r.exit_code == 1
        assert ir_row["runtime"]["inference_precision"] == "f32"
        assert ir_row["not_accelerated"] == "bf16"
        assert "| bf16 (computes fp32)* |" in md.read_text()
        assert flag_row["status"] == "error" and "no bf16 support" in flag_row["reason"]


def test_the_precision_column_and_the_bounds_for_bf16() -> None:
    """The label and the bounds from what the runtime computed in, on a CPU with and
    without bf16."""
    from stn_deploy.export.verify import BF16, FP16, FP32, held_to
    from stn_deploy.report import not_accelerated, precision_text

    avx2, amx = ["AVX2"], ["AVX2", "AVX-512", "VNNI", "AVX512_BF16", "AMX"]
    in_f32 = {"precision": "bf16", "runtime": {"inference_precision": "f32"}, "device": "cpu"}
    in_bf16 = {"precision": "bf16", "runtime": {"inference_precision": "bf16"}, "device": "cpu"}
    assert precision_text(in_f32, avx2) == "bf16 (computes fp32)*"
    assert not_accelerated(in_f32, avx2) == "bf16"
    assert precision_text(in_bf16, amx) == "bf16" and not_accelerated(in_bf16, amx) is None
    assert held_to(BF16, "bf16", "bf16", "openvino") == (BF16, [])
    tol, notes = held_to(BF16, "bf16", "fp32", "openvino")
    assert tol == FP32 and len(notes) == 1 and "bf16 not judged on this CPU" in notes[0]
    assert held_to(FP16, "fp16", "fp32", "openvino") == (FP16, [])  # FP16 IRs compute f32


@pytest.mark.parametrize("fmt", ["onnx", "trt"])
def test_bf16_elsewhere_is_refused_saying_what_to_use(fmt: str, tiny_checkpoint: Path,
                                                      tmp_path: Path) -> None:
    import stn_deploy
    from stn_deploy.export.request import OptionError

    out = tmp_path / "m.onnx"
    code, text = _export(tiny_checkpoint, "--format", fmt, "--precision", "bf16", "--out", out)
    errors = [line for line in text.splitlines() if line.startswith("Error: ")]
    assert code == 2 and len(errors) == 1, text
    assert errors[0].startswith("Error: --precision: bf16 is OpenVINO's CPU precision")
    assert f"--format {fmt} does not write: use --format openvino" in errors[0]
    with pytest.raises(OptionError, match=r"^precision=: .*use format='openvino'$"):
        stn_deploy.export_model(tiny_checkpoint, format=fmt, precision="bf16", out=out)
    assert not out.exists()


# --- compute="bf16": the float parts of FP16 and INT8 files ---------------------------------

@pytest.fixture(scope="module")
def files(irs: dict[str, tuple[Path, str]], tiny_checkpoint: Path,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The untrained digits model as INT8 ONNX and INT8 IR (onnxruntime's quantizer, the STN
    path kept float), FP16 ONNX, and the FP32 and bf16 IRs."""
    out = tmp_path_factory.mktemp("compute")
    written = {"fp32-ir": irs["fp32"][0], "bf16-ir": irs["bf16"][0]}
    int8 = ("--precision", "int8", "--quantizer", "onnxruntime", "--calib-samples", 64)
    for name, args in (("int8-onnx", ("--format", "onnx", *int8)),
                       ("int8-ir", ("--format", "openvino", *int8)),
                       ("fp16-onnx", ("--format", "onnx", "--precision", "fp16"))):
        path = out / (f"{name}.xml" if name.endswith("-ir") else f"{name}.onnx")
        code, text = _export(tiny_checkpoint, *args, "--with-theta", "--out", path,
                             "--verify-samples", 32)
        assert code == 0, text
        written[name] = path
    return written


def _images(bundle: DataBundle, n: int = 64) -> Any:
    from stn_deploy.harness import normalize_np

    return normalize_np(bundle.test.images[:n].numpy(), bundle.config)


def test_the_compute_option_is_refused_by_name(files: dict[str, Path]) -> None:
    from stn_deploy.backends import create_runner, runner_class
    from stn_deploy.errors import StnDeployError

    with pytest.raises(StnDeployError,
                       match=r"^openvino compute must be one of f32, bf16, not 'fp16'$"):
        create_runner("openvino", files["int8-onnx"], compute="fp16")
    with pytest.raises(StnDeployError, match=r"^openvino: precision='bf16' computes in bf16 and "
                       r"compute='f32' in f32: ask for one$"):
        create_runner("openvino", files["fp32-ir"], precision="bf16", compute="f32")
    # compute is OpenVINO's option: another runner given it directly refuses it by name.
    with pytest.raises(StnDeployError, match=r"^onnxruntime takes no option compute$"):
        runner_class("onnxruntime")(files["int8-onnx"], compute="bf16")


def test_bench_request_refuses_an_unknown_ov_precision(files: dict[str, Path]) -> None:
    from stn_deploy.bench import BenchRequest, ov_compute
    from stn_deploy.errors import StnDeployError

    with pytest.raises(StnDeployError, match=r"^ov_precision must be one of fp32, bf16, "
                       r"not 'f16'$"):
        BenchRequest(models=[files["int8-onnx"]], ov_precision="f16")
    assert ov_compute("openvino", files["int8-onnx"], "bf16") == "bf16"
    assert ov_compute("openvino", files["fp16-onnx"], "bf16") == "bf16"
    assert ov_compute("openvino", files["bf16-ir"], "bf16") is None  # bf16 by its metadata
    assert ov_compute("openvino", files["int8-ir"], "fp32") is None
    assert ov_compute("onnxruntime", files["int8-onnx"], "bf16") is None


@pytest.mark.parametrize("name", ["int8-onnx", "int8-ir", "fp16-onnx"])
def test_compute_f32_is_the_files_own_and_says_f32(name: str, files: dict[str, Path],
                                                    asked_hints: list[str],
                                                    digits_bundle: DataBundle) -> None:
    """f32 is what FP16 and INT8 files compute their float parts in anyway: asking for it
    gives the same outputs as not asking, and the row keeps the file's label."""
    import numpy as np

    from stn_deploy.backends import create_runner

    x, outputs = _images(digits_bundle), []
    for compute in (None, "f32"):
        with create_runner("openvino", files[name], compute=compute, threads=1) as runner:
            assert runner.precision == name.split("-")[0]
            assert runner.describe()["inference_precision"] == "f32"
            outputs.append(runner.infer(x))
    assert asked_hints == ["f32", "f32"]
    for key in ("logits", "theta"):
        np.testing.assert_array_equal(outputs[0][key], outputs[1][key])


def test_compute_f32_forces_f32_on_a_bf16_ir(files: dict[str, Path],
                                            asked_hints: list[str]) -> None:
    """The IR stays labelled bf16 and says it computed in f32 (what bench's Precision column
    then shows as "bf16 (computes fp32)")."""
    from stn_deploy.backends import create_runner

    with create_runner("openvino", files["bf16-ir"], compute="f32", threads=1) as runner:
        assert runner.precision == "bf16"
        assert runner.describe()["inference_precision"] == "f32"
    assert asked_hints == ["f32"]


@needs_no_bf16
@pytest.mark.parametrize("name, label", [("int8-onnx", "int8"), ("int8-ir", "int8"),
                                         ("fp16-onnx", "fp16"), ("fp32-ir", "bf16")])
def test_without_bf16_a_callers_bf16_is_one_line(name: str, label: str,
                                                 files: dict[str, Path],
                                                 asked_hints: list[str]) -> None:
    """compute="bf16" is asked of OpenVINO (not guessed from the CPU), and when OpenVINO
    computes f32 instead the runner refuses rather than running f32 under a bf16 request. On
    an FP32 file it is the bf16 row (precision="bf16"), refused the same way."""
    from stn_deploy.backends import create_runner
    from stn_deploy.errors import StnDeployError

    runner = create_runner("openvino", files[name], compute="bf16", threads=1)
    assert runner.precision == label
    stored = name.split("-")[0]
    line = (f"openvino bf16: this CPU has no bf16 support (OpenVINO computes in f32); run the "
            f"{stored} file without bf16")
    with pytest.raises(StnDeployError) as refused:
        runner.activate()
    assert str(refused.value) == line and not runner.is_active
    assert asked_hints == ["bf16"]


@needs_bf16
@pytest.mark.parametrize("name", ["int8-onnx", "int8-ir"])
def test_on_a_bf16_cpu_int8_computes_its_float_parts_in_bf16(name: str,
                                                            files: dict[str, Path],
                                                            digits_bundle: DataBundle) -> None:
    """The row stays int8, OpenVINO says it computed in bf16, and the result is close to
    the f32 run but not the same (bf16 keeps 8 bits of mantissa)."""
    import numpy as np

    from stn_deploy.backends import create_runner

    x, outputs = _images(digits_bundle), {}
    for compute in ("f32", "bf16"):
        with create_runner("openvino", files[name], compute=compute, threads=1) as runner:
            assert runner.precision == "int8"
            assert runner.describe()["inference_precision"] == compute
            outputs[compute] = runner.infer(x)
    f32, bf16 = outputs["f32"], outputs["bf16"]
    assert (f32["logits"].argmax(1) == bf16["logits"].argmax(1)).mean() >= 0.9
    assert max(np.abs(f32[k] - bf16[k]).max() for k in ("logits", "theta")) > 0


def test_bench_ov_precision_bf16_reaches_int8_and_fp16_files(files: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """--ov-precision bf16 is no longer dropped for INT8 and FP16 files: their rows keep
    their label and compute in bf16, or, on a CPU without bf16, are one error line each, as
    an FP32 file's bf16 row is."""
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    names = ("int8-onnx", "int8-ir", "fp16-onnx")
    r = CliRunner().invoke(cli, ["bench", *(str(files[n]) for n in names),
                                 "--backend", "openvino", "--ov-precision", "bf16",
                                 "--batch-sizes", "2", "--iterations", "2", "--warmup", "0",
                                 "--eval-samples", "32", "--json", str(js), "--markdown",
                                 str(md)])
    assert "Traceback" not in r.output, r.output
    rows = json.loads(js.read_text())["results"]
    assert [row["precision"] for row in rows] == ["int8", "int8", "fp16"]
    if HAS_BF16:
        assert r.exit_code == 0, r.output
        assert all(row["status"] == "ok" for row in rows), rows
        assert [row["runtime"]["inference_precision"] for row in rows] == ["bf16"] * 3
        assert "int8 (computes bf16)" in md.read_text()
        assert "fp16 (computes bf16)" in md.read_text()
        return
    assert r.exit_code == 1
    for name, row in zip(names, rows):
        stored = name.split("-")[0]
        line = (f"openvino bf16: this CPU has no bf16 support (OpenVINO computes in f32); "
                f"run the {stored} file without bf16")
        assert row["status"] == "error" and row["reason"] == line
        assert f"error openvino {stored} ({files[name].name}): {line}" in r.output


def test_the_python_api_takes_ov_precision_as_bench_does(files: dict[str, Path]) -> None:
    """``bench_models(..., ov_precision=)`` is bench's --ov-precision: honoured for an INT8
    file (bf16 where the CPU has it, else that row's one-line refusal), refused by name when
    unknown."""
    import stn_deploy
    from stn_deploy.errors import StnDeployError

    report = stn_deploy.bench_models([files["int8-onnx"]], ["openvino"], batch_sizes=(2,),
                                     iterations=2, warmup=0, eval_samples=16,
                                     ov_precision="bf16")
    (row,) = report["results"]
    assert row["precision"] == "int8"
    if HAS_BF16:
        assert row["status"] == "ok" and row["runtime"]["inference_precision"] == "bf16"
    else:
        assert row["status"] == "error" and row["reason"].startswith(
            "openvino bf16: this CPU has no bf16 support")
    with pytest.raises(StnDeployError, match=r"^ov_precision must be one of fp32, bf16"):
        stn_deploy.bench_models([files["int8-onnx"]], ["openvino"], ov_precision="f16")
