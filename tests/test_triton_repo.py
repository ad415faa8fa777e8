"""Triton model repositories: written from a verified export, validated with Triton's schema."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from stn_deploy import artifacts
from stn_deploy.cli import cli
from stn_deploy.config import ModelConfig
from stn_deploy.errors import StnDeployError
from stn_deploy.serving.triton_repo import RepoOptions, write_repository
from stn_deploy.serving.validate import schema_available, validate_repository

needs_schema = pytest.mark.skipif(
    not schema_available(),
    reason="tritonclient (its model_config schema) is not installed: pip install "
           "'stn-deploy[serve]' or pip install --no-deps tritonclient")


@pytest.fixture(scope="session")
def served_onnx(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified uint8 NHWC export of the digits checkpoint, as triton-repo serves by default."""
    from stn_deploy.export.pipeline import ExportRequest, run_export

    out = tmp_path_factory.mktemp("served") / "digits.onnx"
    run_export(ExportRequest(checkpoint=digits_checkpoint, embed_preprocess=True,
                             verify_samples=64, out=out), echo=lambda _: None)
    return out


def _plan(tmp_path: Path, config: ModelConfig) -> Path:
    """A plan file and its sidecar as export --format engine writes them (the bytes are not a
    real engine: nothing here opens a plan, only its sidecar, as without a GPU)."""
    from stn_deploy.export import tensorrt as trt_mod

    plan = tmp_path / "digits.plan"
    plan.write_bytes(b"plan")
    side = trt_mod.make_sidecar(
        config=config, input_name="input", output_names=["logits"], precision="fp16",
        tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100", compute_capability="9.0",
        profile=(1, 32, 64), onnx_sha256="0" * 64, embed_preprocess=True,
        onnx_metadata={"opset": "17"})
    side["plan_verification"] = {"passed": True}
    artifacts.sidecar_path(plan).write_text(json.dumps(side))
    return plan


def test_onnx_repository_for_onnxruntime_and_openvino(served_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    folders = write_repository(served_onnx, repo, RepoOptions(
        kinds=("onnxruntime", "openvino"), name="digits", max_batch=16, instances=2))
    assert [f.name for f in folders] == ["digits-onnxruntime", "digits-openvino"]
    ort = repo / "digits-onnxruntime"
    assert (ort / "1" / "model.onnx").read_bytes() == served_onnx.read_bytes()
    text = (ort / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 16" in text
    assert "data_type: TYPE_UINT8" in text and "dims: [ 32, 32, 1 ]" in text  # no batch dim
    assert "preferred_batch_size: [ 4, 8, 16 ]" in text and "count: 2" in text
    assert "KIND_CPU" in text and 'label_filename: "labels.txt"' in text
    assert (ort / "labels.txt").read_text().splitlines() == [str(d) for d in range(10)]
    record = json.loads((ort / "stn_deploy.json").read_text())
    assert record["verification"]["passed"] and "stn_health" in record
    assert record["config"]["dataset"] == "digits"
    ov = (repo / "digits-openvino" / "config.pbtxt").read_text()
    assert 'backend: "openvino"' in ov and 'default_model_filename: "model.onnx"' in ov
    if schema_available():
        assert validate_repository(repo) == []
    # the same names again are refused, and the repository is left as it was
    with pytest.raises(StnDeployError, match="digits-onnxruntime exists"):
        write_repository(served_onnx, repo, RepoOptions(name="digits"))
    assert sorted(p.name for p in repo.iterdir()) == ["digits-onnxruntime", "digits-openvino"]
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temporary folder left


@needs_schema
def test_gpu_onnxruntime_with_tensorrt_fp16_and_a_plan(served_onnx: Path,
                                                       tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_repository(served_onnx, repo, RepoOptions(name="d", device="gpu", trt_fp16=True))
    text = (repo / "d-onnxruntime" / "config.pbtxt").read_text()
    assert "KIND_GPU" in text and 'value: "FP16"' in text and 'name: "tensorrt"' in text
    plan = _plan(tmp_path, artifacts.config_from_onnx(served_onnx))
    write_repository(plan, repo, RepoOptions(kinds=("tensorrt",), name="d", device="gpu"))
    text = (repo / "d-trt" / "config.pbtxt").read_text()  # the old spelling, read quietly
    assert 'platform: "tensorrt_plan"' in text and 'key: "9.0"' in text
    assert (repo / "d-trt" / "1" / "model.plan.json").is_file()
    assert validate_repository(repo) == []
    with pytest.raises(StnDeployError, match="exceeds the plan's profile maximum 64"):
        write_repository(plan, tmp_path / "r2", RepoOptions(kinds=("trt",), max_batch=128))
    with pytest.raises(StnDeployError, match="--kind trt serves .plan files"):
        write_repository(served_onnx, tmp_path / "r2", RepoOptions(kinds=("trt",)))
    assert not (tmp_path / "r2").exists()


def test_python_flavour_runs_our_runner_in_the_stub(served_onnx: Path, tmp_path: Path) -> None:
    """python-onnxruntime / python-openvino: the same config, labels and metadata as the
    native kinds, backend python, model.py beside the ONNX file, and parameters naming the
    runner and where stn-deploy is imported from."""
    from stn_deploy.serving.python_model import MODEL_PY

    repo = tmp_path / "repo"
    write_repository(served_onnx, repo, RepoOptions(
        kinds=("onnxruntime", "python-onnxruntime", "python-openvino"), name="d", max_batch=16,
        threads=1, max_queue=8))
    native = (repo / "d-onnxruntime" / "config.pbtxt").read_text()
    for kind in ("onnxruntime", "openvino"):
        folder = repo / f"d-python-{kind}"
        text = (folder / "config.pbtxt").read_text()
        assert 'backend: "python"' in text and f'string_value: "{kind}"' in text
        assert 'key: "threads"' in text and "max_queue_size: 8" in text
        # tensors and batching exactly as the native flavour's
        assert text.split("max_batch_size")[1].split("instance_group")[0] == \
            native.split("max_batch_size")[1].split("instance_group")[0]
        assert (folder / "1" / "model.py").read_text() == MODEL_PY
        assert (folder / "1" / "model.onnx").read_bytes() == served_onnx.read_bytes()
        assert (folder / "labels.txt").read_text() == (repo / "d-onnxruntime" /
                                                       "labels.txt").read_text()
        assert json.loads((folder / "stn_deploy.json").read_text())["kind"] == f"python-{kind}"
    # nothing of this machine or environment in it: serve tells the stub where stn-deploy is
    written = [f.read_bytes() for f in repo.rglob("*") if f.is_file()]
    for path in _install_paths():
        assert not any(path.encode() in data for data in written), path
    if schema_available():
        assert validate_repository(repo) == []
        (repo / "d-python-openvino" / "1" / "model.onnx").unlink()
        assert validate_repository(repo) == ['d-python-openvino/config.pbtxt: parameters '
                                             '"model_file": 1/model.onnx is missing']
    with pytest.raises(StnDeployError, match="--kind python-onnxruntime runs on cpu instances "
                                             "only"):
        write_repository(served_onnx, tmp_path / "r2", RepoOptions(
            kinds=("python-onnxruntime",), device="gpu"))
    with pytest.raises(StnDeployError, match="--threads sets the runner threads of the "
                                             "python-\\* kinds"):
        write_repository(served_onnx, tmp_path / "r2", RepoOptions(threads=2))
    assert not (tmp_path / "r2").exists()


def _install_paths() -> list[str]:
    """The folders a repository written here must not name: the folder holding stn_deploy,
    the environment's prefix and the interpreter's, and every folder serve hands the stub."""
    from stn_deploy.serving import python_model

    return sorted({str(Path(python_model.__file__).resolve().parents[2]), sys.prefix,
                   sys.base_prefix, *python_model.python_path()})


@needs_schema
def test_the_stub_finds_stn_deploy_through_serves_environment(served_onnx: Path,
                                                              tmp_path: Path) -> None:
    """model.py as Triton's stub runs it, in the base interpreter with no site-packages at
    all: with the folders serve names in PATH_ENV it loads the runner; without them it fails
    naming the variable."""
    from google.protobuf import json_format

    from stn_deploy.serving.python_model import PATH_ENV, python_path
    from stn_deploy.serving.validate import parse_config

    repo = tmp_path / "repo"
    write_repository(served_onnx, repo, RepoOptions(kinds=("python-onnxruntime",), name="d",
                                                    threads=1))
    folder = repo / "d-python-onnxruntime"
    args = {"model_repository": str(folder), "model_version": "1",
            "model_config": json_format.MessageToJson(parse_config(folder / "config.pbtxt"),
                                                      preserving_proto_field_name=True)}
    script = ("import json, runpy, sys\n"
              f"model = runpy.run_path({str(folder / '1' / 'model.py')!r})['TritonPythonModel']()\n"
              "model.initialize(json.loads(sys.stdin.read()))\n"
              "print(type(model.model.runner).__name__, model.model.runner.is_active)\n"
              "model.finalize()\n")
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", PATH_ENV)}
    run = [str(base), "-I", "-S", "-c", script]  # -S: not even the base's own site-packages
    served = subprocess.run(run, input=json.dumps(args), capture_output=True, text=True,
                            timeout=120, env={**env, PATH_ENV: os.pathsep.join(python_path())})
    assert served.returncode == 0, served.stderr
    assert served.stdout.split() == ["OnnxRuntimeRunner", "True"]
    alone = subprocess.run(run, input=json.dumps(args), capture_output=True, text=True,
                           timeout=120, env=env)
    assert alone.returncode != 0
    assert f"the stub imports stn-deploy from the folders in {PATH_ENV}" in alone.stderr


def test_unverified_and_static_batch_exports_are_refused(digits_onnx: Path,
                                                         digits_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    from stn_deploy.export.pipeline import ExportRequest, run_export

    with pytest.raises(StnDeployError, match="carries no verification record"):
        write_repository(digits_onnx, tmp_path / "repo", RepoOptions())
    assert not (tmp_path / "repo").exists()
    static = tmp_path / "static.onnx"  # verified, but with a batch of 4 fixed in the graph
    run_export(ExportRequest(checkpoint=digits_checkpoint, embed_preprocess=True, static_batch=4,
                             verify_samples=16, out=static), echo=lambda _: None)
    with pytest.raises(StnDeployError, match=r"static.onnx has a static batch \(4\); Triton's "
                                             "dynamic batcher needs one exported without "
                                             "--static-batch"):
        write_repository(static, tmp_path / "repo", RepoOptions())
    assert not (tmp_path / "repo").exists()


def test_a_kind_twice_is_written_once(served_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    folders = write_repository(served_onnx, repo,
                               RepoOptions(kinds=("onnxruntime", "onnxruntime"), name="m"))
    assert folders == [repo / "m-onnxruntime"]
    assert [p.name for p in repo.iterdir()] == ["m-onnxruntime"]


def test_a_failed_rename_leaves_the_repository_as_it_was(served_onnx: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    write_repository(served_onnx, repo, RepoOptions(name="a"))
    rename = os.replace

    def second_fails(src: Path, dst: Path) -> None:  # the first kind is already in place
        if Path(dst).name.endswith("-openvino"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(StnDeployError, match="cannot write .*repo: Invalid cross-device link"):
        write_repository(served_onnx, repo, RepoOptions(kinds=("onnxruntime", "openvino"),
                                                        name="b"))
    assert [p.name for p in repo.iterdir()] == ["a-onnxruntime"]
    # a repository folder this call created goes too
    with pytest.raises(StnDeployError, match="Invalid cross-device link"):
        write_repository(served_onnx, tmp_path / "new", RepoOptions(
            kinds=("onnxruntime", "openvino"), name="b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no temporary folder left


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@needs_schema
@pytest.mark.parametrize("old,new,expected", [
    ("max_batch_size: 8", "max_batch: 8", 'no field named "max_batch"'),
    ('name: "m-onnxruntime"', 'name: "other"', 'name: "other" differs from its folder'),
    ("data_type: TYPE_UINT8", "data_type: TYPE_FP32",
     'input "input" data_type: TYPE_FP32, the model\'s is TYPE_UINT8'),
    ("dims: [ 32, 32, 1 ]", "dims: [ 1, 32, 32 ]", 'input "input" dims: [1, 32, 32], the model\'s '
                                               "are [32, 32, 1]"),
    ("dims: [ 32, 32, 1 ]", "dims: [ -1, 32, 32, 1 ]", "batch dimension excluded"),
    ('name: "logits"', 'name: "scores"', '"scores" is not an output of model.onnx'),
    ('name: "input"', 'name: "image"', '"image" is not an input of model.onnx'),
    ("preferred_batch_size: [ 4, 8 ]", "preferred_batch_size: [ 4, 16 ]",
     "preferred_batch_size: 16 is outside 1..max_batch_size 8"),
    ('platform: "onnxruntime_onnx"', 'platform: "tensorrt_plan"',
     "platform: 1/model.plan is missing"),
    ('platform: "onnxruntime_onnx"', 'platform: "pytorch"', 'platform: "pytorch" is none of'),
    ("kind: KIND_CPU", "kind: KIND_GPPU", '"inference.ModelInstanceGroup.Kind" has no value named KIND_GPPU'),
])
def test_bad_configs_are_refused_by_name(served_onnx: Path, tmp_path: Path, old: str,
                                         new: str, expected: str) -> None:
    repo = tmp_path / "repo"
    write_repository(served_onnx, repo, RepoOptions(name="m", max_batch=8))
    _edit(repo / "m-onnxruntime" / "config.pbtxt", old, new)
    problems = validate_repository(repo)
    assert len(problems) >= 1 and all(p.startswith("m-onnxruntime") for p in problems)
    assert any(expected in p for p in problems), problems


@needs_schema
def test_mismatched_repository_is_refused_by_name(served_onnx: Path, digits_onnx: Path,
                                                  tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_repository(served_onnx, repo, RepoOptions(name="m"))
    model = repo / "m-onnxruntime"
    # the float32 NCHW export (with theta) dropped in place of the uint8 NHWC one
    shutil.copyfile(digits_onnx, model / "1" / "model.onnx")
    problems = validate_repository(repo)
    assert any("data_type: TYPE_UINT8, the model's is TYPE_FP32" in p for p in problems)
    # an output the config leaves out (theta) is not served, which is no problem
    assert not any("theta" in p for p in problems), problems
    (model / "labels.txt").write_text("a\nb\n")
    shutil.rmtree(model / "1")
    problems = validate_repository(repo)
    assert problems == ["m-onnxruntime: no version folder (1/)"]
    (model / "1").mkdir()
    assert validate_repository(repo) == ["m-onnxruntime/config.pbtxt: platform: 1/model.onnx "
                                         "is missing"]


@needs_schema
def test_openvino_loads_its_ir_by_default(served_onnx: Path, tmp_path: Path) -> None:
    """Without default_model_filename, Triton's openvino backend loads 1/model.xml (an IR, with
    its weights in model.bin): a valid model, whose tensors validate does not read."""
    repo = tmp_path / "repo"
    write_repository(served_onnx, repo, RepoOptions(kinds=("openvino",), name="m"))
    model = repo / "m-openvino"
    _edit(model / "config.pbtxt", 'default_model_filename: "model.onnx"\n', "")
    (model / "1" / "model.onnx").rename(model / "1" / "model.xml")
    assert validate_repository(repo) == ["m-openvino/config.pbtxt: backend: 1/model.bin (the "
                                         "weights of model.xml) is missing"]
    (model / "1" / "model.bin").write_bytes(b"")
    assert validate_repository(repo) == []


@needs_schema
def test_inspect_validates_a_repository(served_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    result = CliRunner().invoke(cli, ["triton-repo", str(served_onnx), "--out-dir", str(repo),
                                      "--kind", "onnxruntime", "--kind", "openvino",
                                      "--model-name", "m", "--max-batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (repo / "m-openvino" / "1" / "model.onnx").is_file()
    ok = CliRunner().invoke(cli, ["inspect", str(repo)])
    assert ok.exit_code == 0, ok.output
    assert "m-onnxruntime: onnxruntime_onnx, max_batch_size 8" in ok.output
    assert "valid" in ok.output.splitlines()[-1]
    (repo / "m-openvino" / "labels.txt").write_text("zero\n")
    bad = CliRunner().invoke(cli, ["inspect", str(repo)])
    assert bad.exit_code == 1
    assert ('m-openvino/config.pbtxt: output "logits" label_filename: labels.txt has 1 labels '
            "for 10 classes") in bad.output
    assert "Error: 1 problem(s)" in bad.output and "Traceback" not in bad.output
