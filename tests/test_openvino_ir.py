"""``export --format openvino``: OpenVINO IR (.xml + .bin) in FP32, FP16-compressed, bf16
and INT8, carrying the model config and its own verification in its rt_info, verified
through the openvino runner; a missing .bin is one line. (bf16 on its own: test_bf16.py.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from stn_deploy.cli import cli

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")


def _export(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["export", *map(str, args)])
    assert "Traceback" not in r.output, r.output
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def irs(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ir")
    written = {}
    precisions = ["fp32", "fp16", "bf16"] + (["int8"] if importlib.util.find_spec("nncf")
                                             else [])
    for precision in precisions:
        path = out / f"m-{precision}.xml"
        calib = ["--calib-samples", 64] if precision == "int8" else []
        code, text = _export(tiny_checkpoint, "--format", "openvino", "--precision", precision,
                             "--with-theta", "--out", path, "--verify-samples", 64, *calib)
        assert code == 0, text
        assert f"OpenVINO IR ({precision.upper()})" in text and "verified on openvino" in text
        written[precision] = path
    return written


def test_ir_carries_the_config_and_runs_on_the_openvino_runner(irs: dict[str, Path],
                                                               tiny_checkpoint: Path) -> None:
    from stn_deploy.artifacts import config_from_metadata, model_kind, read_ir_metadata
    from stn_deploy.backends import runner_class
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.data import load_dataset, normalize

    config = load_checkpoint(tiny_checkpoint).config
    images = load_dataset("digits").test.images[:16]
    for precision, path in irs.items():
        assert model_kind(path) == "openvino" and path.with_suffix(".bin").is_file()
        meta = read_ir_metadata(path)
        assert meta["precision"] == precision and meta["target"] == "openvino"
        assert config_from_metadata(meta, path) == config
        verification = json.loads(meta["verification"])  # the IR's own, not its ONNX graph's
        assert verification["backend"] == "openvino" and verification["passed"]
        # What OpenVINO computed in (an INT8 graph's float parts' f32 is not the file's).
        assert verification["computed"] in ((None,) if precision == "int8" else ("fp32", "bf16"))
        with runner_class("openvino")(path) as runner:
            assert runner.precision == precision
            got = runner.infer(normalize(images, runner.config).numpy())
        assert got["logits"].shape == (16, config.num_classes) and got["theta"].shape == (16, 2, 3)
    fp32, fp16 = (irs[p].with_suffix(".bin").stat().st_size for p in ("fp32", "fp16"))
    assert fp16 < 0.6 * fp32  # compress_to_fp16 halves the weights
    # bf16 keeps FP32's weights: OpenVINO converts them when it compiles on a bf16 CPU.
    weights = {p: irs[p].with_suffix(".bin").read_bytes() for p in ("fp32", "bf16")}
    assert weights["bf16"] == weights["fp32"]


def test_int8_ir_is_nncf_quantized(irs: dict[str, Path]) -> None:
    if "int8" not in irs:
        pytest.skip("nncf is not installed (pip install 'stn-deploy[int8]')")
    from stn_deploy.artifacts import read_ir_metadata

    meta = read_ir_metadata(irs["int8"])
    assert meta["quantizer"] == "nncf"  # --format openvino targets openvino: NNCF's default
    assert 'type="FakeQuantize"' in irs["int8"].read_text()  # OpenVINO's INT8 form of QDQ
    assert 'type="FakeQuantize"' not in irs["fp32"].read_text()
    # Its float parts are the STN path; computing them in bf16 is bench --ov-precision's
    # choice, so unlike the float IRs it carries no mark keeping them in f32.
    assert "DisablePrecisionConversion" not in irs["int8"].read_text()
    assert "DisablePrecisionConversion" in irs["fp32"].read_text()


def test_missing_bin_and_bad_out_are_one_line(irs: dict[str, Path], tmp_path: Path,
                                              tiny_checkpoint: Path) -> None:
    from stn_deploy.artifacts import read_ir_metadata
    from stn_deploy.errors import StnDeployError

    lone = tmp_path / "lone.xml"
    lone.write_text(irs["fp32"].read_text())
    with pytest.raises(StnDeployError, match=r"no weights file lone\.bin beside it"):
        read_ir_metadata(lone)
    code, text = _export(tiny_checkpoint, "--format", "openvino", "--out", tmp_path / "m.onnx")
    assert code == 2 and "--out" in text and "name the .xml" in text
    assert not (tmp_path / "m.onnx").exists()


def test_bench_runs_an_ir_and_finds_it_among_the_exports(irs: dict[str, Path],
                                                         tiny_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    """An IR is benched on openvino (its own reference when no checkpoint is given), and the
    plain flow's `bench` picks it up as an export of its checkpoint (by the recorded hash)."""
    import json

    from stn_deploy.defaults import exports_of

    js = tmp_path / "b.json"
    r = CliRunner().invoke(cli, ["bench", str(irs["fp32"]), "--batch-sizes", "2", "--iterations",
                                 "2", "--warmup", "0", "--eval-samples", "32", "--json", str(js)])
    assert r.exit_code == 0, r.output
    doc = json.loads(js.read_text())
    assert doc["reference"]["backend"] == "openvino"
    assert [row["backend"] for row in doc["results"]] == ["openvino"]
    mine, _ = exports_of(tiny_checkpoint, irs["fp32"].parent)
    assert set(irs.values()) <= set(mine)
