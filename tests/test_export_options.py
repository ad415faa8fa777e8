"""Every export option, for both sources (a checkpoint and a user's ``nn.Module``) and both
callers (``stn-deploy export`` and ``stn_deploy.export_model``): honoured, with its effect
seen in the written file, or refused by name (one error line, no file).

The options are a table. Honoured ones are exported together in bundles (one export shows
the effect of each option in it), so the whole table costs a dozen small exports of untrained
models; accuracy is other tests' business. TensorRT cannot run here, so ``--format trt`` is
exported through a stand-in for its two calls into TensorRT (``import_tensorrt``,
``build_engine``): everything up to them is the real pipeline, and the test sees exactly what
would reach the builder.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import stn_deploy
from stn_deploy.artifacts import metadata, onnx_opset, sidecar_path
from stn_deploy.cli import cli
from stn_deploy.data import load_dataset
from stn_deploy.errors import StnDeployError
from stn_deploy.export.pipeline import ExportRequest

pytest.importorskip("onnxruntime")

SOURCES = ("checkpoint", "module")
CALLERS = ("cli", "api")
MODELS_PY = '''
import torch
from stn_deploy import examples

def tutorial():
    """The tutorial STN returning (log-probabilities, theta), seeded."""
    torch.manual_seed(0)
    return examples.tutorial_mnist_stn(return_theta=True)

plain = examples.plain_cnn  # no grid_sample, no affine_grid
flow = examples.flow_warp  # grid_sample from a flow field, no affine_grid
'''


@dataclass
class Written:
    """What one export wrote, as the checks read it."""

    source: str
    onnx_path: Path
    out: Path
    output: str
    proto: onnx.ModelProto
    meta: dict[str, str]
    builds: list[dict[str, Any]]
    env: dict[str, Any]

    @property
    def outputs(self) -> list[str]:
        return [o.name for o in self.proto.graph.output]

    @property
    def verification(self) -> dict[str, Any]:
        return json.loads(self.meta["verification"])

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(self.onnx_path), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})


Check = Callable[[Written], None]


@dataclass(frozen=True)
class Option:
    """One option as both callers spell it; ``"{key}"`` values come from the test's
    environment (folders, files, images)."""

    name: str  # the ExportRequest field
    cli: tuple[str, ...] | None  # None: Python only
    api: dict[str, Any] | None  # None: command line only
    check: Check
    sources: tuple[str, ...] = SOURCES


# ------------------------------------------------------------------------------- checks

def opset_is(n: int) -> Check:
    def check(w: Written) -> None:
        assert onnx_opset(w.proto) == n and w.meta["opset"] == str(n)
    return check


def precision_is(p: str) -> Check:
    def check(w: Written) -> None:
        assert w.meta["precision"] == p
        ops = {n.op_type for n in w.proto.graph.node}
        halves = [t for t in w.proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
        assert ("QuantizeLinear" in ops) == (p == "int8") and bool(halves) == (p == "fp16")
    return check


def has_affine_grid_op(w: Written) -> None:
    assert "AffineGrid" in {n.op_type for n in w.proto.graph.node}
    assert w.meta["affine_grid"].startswith(("AffineGrid op", "F.affine_grid written as the"))


def has_theta(w: Written) -> None:
    assert w.outputs[-1] == "theta" and w.verification["theta_max_px"] is not None


def batch_is_4(w: Written) -> None:
    dims = [v.type.tensor_type.shape.dim[0].dim_value
            for v in [*w.proto.graph.input, *w.proto.graph.output]]
    assert dims == [4] * len(dims)


def target_is(t: str) -> Check:
    def check(w: Written) -> None:
        assert w.meta["target"] == t
    return check


def exporter_is(e: str) -> Check:
    def check(w: Written) -> None:
        assert w.meta["exporter"] == e
    return check


def samples_are(n: int) -> Check:
    def check(w: Written) -> None:
        assert w.verification["samples"] == n
    return check


def written_at_out(w: Written) -> None:
    assert w.out.is_file() and w.out.parent == w.env["out_dir"]


def uint8_nhwc(w: Written) -> None:
    t = w.proto.graph.input[0].type.tensor_type
    c, h, width = (int(v) for v in w.meta["input_shape"].split(","))
    assert t.elem_type == onnx.TensorProto.UINT8 and w.meta["input_layout"] == "NHWC"
    assert [d.dim_value for d in t.shape.dim][1:] == [h, width, c]


def verified_on_data_dir(w: Written) -> None:
    assert str(w.env["data"]) in w.meta["verified_on"] and "test split" in w.meta["verified_on"]


def calibrated_on_calib_dir(w: Written) -> None:
    assert str(w.env["calib"]) in w.meta["calibration"] and "train split" in w.meta["calibration"]


def calibrated_on(n: int) -> Check:
    def check(w: Written) -> None:
        assert w.meta["calibration"].startswith(f"{n} images")
        assert f"INT8 calibration on {n} images" in w.output
    return check


def plan_built(w: Written) -> None:
    assert w.out.suffix == ".plan" and w.out.is_file() and w.onnx_path.is_file()
    side = json.loads(sidecar_path(w.out).read_text())
    assert side["onnx_path"] == w.onnx_path.name and "built, not run" in side["plan_verification"]
    assert len(w.builds) == 1 and w.builds[0]["precision"] == w.meta["precision"]


def build_arg(key: str, want: Any) -> Check:
    def check(w: Written) -> None:
        assert w.builds[0][key] == (w.env[want[1:-1]] if isinstance(want, str) else want)
    return check


def weights_loaded(w: Written) -> None:
    """The file computes the weighted model (its logits are 1 apart per class from the
    factory's), within INT8's error."""
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want = w.env["weighted"](x)[0].numpy()
        factory = w.env["models"].tutorial().eval()(x)[0].numpy()
    got = w.run(x.numpy())[0]
    assert np.abs(got - want).max() < 0.25 < np.abs(got - factory).max()


def meta_is(key: str, value: str) -> Check:
    def check(w: Written) -> None:
        assert w.meta[key] == value, (key, w.meta[key])
    return check


def has_output(name: str) -> Check:
    def check(w: Written) -> None:
        assert name in w.outputs and json.loads(w.meta["verification"])["passed"]
    return check


def dataset_is(name: str) -> Check:
    def check(w: Written) -> None:
        assert json.loads(w.meta["stn_deploy.config"])["dataset"] == name
    return check


def verified_on_given(w: Written) -> None:
    assert w.meta["verified_on"] == "the given images"


def accuracy_measured(w: Written) -> None:
    assert w.verification["accuracy_ref"] is not None


def kept_float(w: Written) -> None:
    """The node --keep-float names reads no DequantizeLinear output: it computes in float."""
    listed = json.loads(Path(w.env["keep"][w.source]).read_text())
    name = (listed["keep_float"] if isinstance(listed, dict) else listed)[0]
    producer = {o: n for n in w.proto.graph.node for o in n.output}
    node = next(n for n in w.proto.graph.node if n.name == name)
    assert all(getattr(producer.get(i), "op_type", "") != "DequantizeLinear" for i in node.input)
    assert w.meta["keep_float"] == name


def calibrated_on_given(w: Written) -> None:
    assert w.meta["calibration"].endswith("from the given calibration images")


# ------------------------------------------------------------------------------- bundles

MODULE = ("module",)
# Bundle 1: INT8 with the AffineGrid op, theta, a static batch, for OpenVINO; the module is
# described with every user-module option; Python also gives its own images.
B1 = [
    Option("precision", ("--precision", "int8"), {"precision": "int8"}, precision_is("int8")),
    Option("opset", ("--opset", "20"), {"opset": 20}, opset_is(20)),
    Option("affine_grid_op", ("--affine-grid-op",), {"affine_grid_op": True},
           has_affine_grid_op),
    Option("with_theta", ("--with-theta",), {"with_theta": True}, has_theta),
    Option("static_batch", ("--static-batch", "4"), {"static_batch": 4}, batch_is_4),
    Option("target", ("--target", "openvino"), {"target": "openvino"}, target_is("openvino")),
    # openvino's default quantizer is nncf (test_int8.py); this bundle runs without it.
    Option("quantizer", ("--quantizer", "onnxruntime"), {"quantizer": "onnxruntime"},
           meta_is("quantizer", "onnxruntime")),
    Option("keep_float", ("--keep-float", "{keep}"), {"keep_float": "{keep}"}, kept_float),
    Option("verify_samples", ("--verify-samples", "32"), {"verify_samples": 32},
           samples_are(32)),
    Option("out", ("--out", "{out}"), {"out": "{out}"}, written_at_out),
    Option("calib_samples", ("--calib-samples", "24"), {"calib_samples": 24}, calibrated_on(24)),
    Option("input_shape", ("--input-shape", "1x28x28"), {"input_shape": (1, 28, 28)},
           meta_is("input_shape", "1,28,28"), MODULE),
    Option("weights", ("--weights", "{weights}"), {"weights": "{weights}"}, weights_loaded,
           MODULE),
    Option("mean", ("--mean", "0.1"), {"mean": (0.1,)}, meta_is("mean", "0.1"), MODULE),
    Option("std", ("--std", "0.3"), {"std": (0.3,)}, meta_is("std", "0.3"), MODULE),
    Option("class_names", ("--class-names", "a,b,c,d,e,f,g,h,i,j"),
           {"class_names": tuple("abcdefghij")}, meta_is("class_names", "\n".join("abcdefghij")),
           MODULE),
    Option("extra_outputs", ("--extra-output", "pose"), {"extra_outputs": ("pose",)},
           has_output("pose"), MODULE),
    Option("dataset", None, {"dataset": "mine"}, dataset_is("mine"), MODULE),
    Option("images", None, {"images": "{images}"}, verified_on_given),
    Option("labels", None, {"labels": "{labels}"}, accuracy_measured),
    Option("calib_images", None, {"calib_images": "{images}"}, calibrated_on_given),
]
# Bundle 2: a TensorRT plan of INT8 with preprocessing inside, from image folders.
B2 = [
    Option("format", ("--format", "trt"), {"format": "trt"}, plan_built),
    Option("precision", ("--precision", "int8"), {"precision": "int8"}, precision_is("int8")),
    Option("opset", ("--opset", "16"), {"opset": 16}, opset_is(16)),
    Option("embed_preprocess", ("--embed-preprocess",), {"embed_preprocess": True}, uint8_nhwc),
    Option("data_dir", ("--data-dir", "{data}"), {"data_dir": "{data}"}, verified_on_data_dir),
    Option("calib_dir", ("--calib-dir", "{calib}"), {"calib_dir": "{calib}"},
           calibrated_on_calib_dir),
    Option("calib_samples", ("--calib-samples", "40"), {"calib_samples": 40}, calibrated_on(40)),
    Option("verify_samples", ("--verify-samples", "32"), {"verify_samples": 32},
           samples_are(32)),
    Option("exporter", ("--exporter", "torchscript"), {"exporter": "torchscript"},
           exporter_is("torchscript")),
    Option("trt_profile", ("--trt-profile", "2,8,16"), {"trt_profile": (2, 8, 16)},
           build_arg("profile", (2, 8, 16))),
    Option("workspace_mb", ("--workspace-mb", "256"), {"workspace_mb": 256},
           build_arg("workspace_mb", 256)),
    Option("timing_cache", ("--timing-cache", "{cache}"), {"timing_cache": "{cache}"},
           build_arg("timing_cache", "{cache}")),
    Option("target", ("--target", "tensorrt"), {"target": "tensorrt"}, target_is("trt")),
]
# Bundle 3: FP16 from the dynamo exporter (slow, so once per source: see HONOURED).
B3 = [
    Option("exporter", ("--exporter", "dynamo"), {"exporter": "dynamo"}, exporter_is("dynamo")),
    Option("precision", ("--precision", "fp16"), {"precision": "fp16"}, precision_is("fp16")),
    Option("opset", ("--opset", "18"), {"opset": 18}, opset_is(18)),
    Option("verify_samples", ("--verify-samples", "32"), {"verify_samples": 32},
           samples_are(32)),
]
BUNDLES = {"b1": B1, "b2": B2, "b3": B3}
HONOURED = [(b, s, c) for b in ("b1", "b2") for s in SOURCES for c in CALLERS] + [
    ("b3", "checkpoint", "cli"), ("b3", "module", "api")]


# -------------------------------------------------------------------------------- refusals

@dataclass(frozen=True)
class Refusal:
    name: str  # the option the error line must name
    cli: tuple[str, ...] | None
    api: dict[str, Any] | None
    why: str  # a fragment of the reason
    sources: tuple[str, ...] = SOURCES
    factory: str = "tutorial"
    exit_code: int = 2


CHECKPOINT = ("checkpoint",)
REFUSALS = [
    # A checkpoint carries what a user's module is told with.
    Refusal("input_shape", ("--input-shape", "1x32x32"), {"input_shape": (1, 32, 32)},
            "carries its input shape", CHECKPOINT),
    Refusal("mean", ("--mean", "0.5"), {"mean": (0.5,)}, "carries its normalisation",
            CHECKPOINT),
    Refusal("std", ("--std", "0.5"), {"std": (0.5,)}, "carries its normalisation", CHECKPOINT),
    Refusal("class_names", ("--class-names", "a,b"), {"class_names": ("a", "b")},
            "carries its class names", CHECKPOINT),
    Refusal("extra_outputs", ("--extra-output", "theta"), {"extra_outputs": ("theta",)},
            "carries its outputs", CHECKPOINT),
    Refusal("weights", ("--weights", "{weights}"), {"weights": "{weights}"},
            "carries its weights", CHECKPOINT),
    Refusal("dataset", None, {"dataset": "mine"}, "carries its dataset", CHECKPOINT),
    Refusal("data_dir", ("--data-dir", "{data}"), {"data_dir": "{data}"},
            "bundled with scikit-learn", CHECKPOINT),
    # What a user's module lacks.
    Refusal("with_theta", ("--with-theta",), {"with_theta": True}, "no F.affine_grid call",
            MODULE, factory="plain"),
    Refusal("affine_grid_op", ("--affine-grid-op", "--opset", "20"),
            {"affine_grid_op": True, "opset": 20}, "no F.affine_grid call", MODULE,
            factory="flow"),
    Refusal("with_theta", ("--with-theta", "--extra-output", "theta"),
            {"with_theta": True, "extra_outputs": ("theta",)}, "already has that name", MODULE),
    # Options that mean nothing with the others, for both.
    Refusal("calib_dir", ("--calib-dir", "{calib}"), {"calib_dir": "{calib}"}, "read only with"),
    Refusal("calib_samples", ("--calib-samples", "10"), {"calib_samples": 10}, "read only with"),
    Refusal("calib_images", None, {"calib_images": "{images}"}, "read only with"),
    Refusal("calib_dir", None, {"calib_dir": "{calib}", "calib_images": "{images}",
                                "precision": "int8"}, "calibrate on one or the other"),
    Refusal("trt_profile", ("--trt-profile", "1,8,64"), {"trt_profile": (1, 8, 64)},
            "builds a TensorRT engine"),
    Refusal("trt_profile", ("--format", "trt", "--trt-profile", "8,4,64"),
            {"format": "trt", "trt_profile": (8, 4, 64)}, "MIN <= OPT <= MAX"),
    Refusal("trt_profile", ("--format", "trt", "--static-batch", "4", "--trt-profile", "1,4,8"),
            {"format": "trt", "static_batch": 4, "trt_profile": (1, 4, 8)},
            "does not fit the static batch"),
    Refusal("workspace_mb", ("--workspace-mb", "64"), {"workspace_mb": 64},
            "builds a TensorRT engine"),
    Refusal("timing_cache", ("--timing-cache", "{cache}"), {"timing_cache": "{cache}"},
            "builds a TensorRT engine"),
    Refusal("target", ("--target", "trt", "--opset", "20"), {"target": "trt", "opset": 20},
            "as nearest"),
    Refusal("target", ("--format", "trt", "--target", "openvino"),
            {"format": "trt", "target": "openvino"}, "builds for trt only"),
    Refusal("affine_grid_op", ("--affine-grid-op", "--opset", "19"),
            {"affine_grid_op": True, "opset": 19}, "exists from opset 20"),
    Refusal("affine_grid_op", ("--affine-grid-op", "--opset", "20", "--format", "trt"),
            {"affine_grid_op": True, "opset": 20, "format": "trt"}, "no AffineGrid op"),
    # bf16 is an OpenVINO IR's precision: an ONNX file or a TensorRT plan has no bf16 CPU path.
    Refusal("precision", ("--precision", "bf16"), {"precision": "bf16"},
            "bf16 is OpenVINO's CPU precision"),
    Refusal("precision", ("--format", "trt", "--precision", "bf16"),
            {"format": "trt", "precision": "bf16"}, "bf16 is OpenVINO's CPU precision"),
    Refusal("keep_float", ("--format", "openvino", "--precision", "bf16", "--keep-float",
                           "{keep}"),
            {"format": "openvino", "precision": "bf16", "keep_float": "{keep}"},
            "no node to keep"),
    Refusal("keep_float", ("--keep-float", "{keep}"), {"keep_float": "{keep}"},
            "FP32 graph is all float"),
    Refusal("quantizer", ("--quantizer", "onnxruntime"), {"quantizer": "onnxruntime"},
            "is quantized"),
    Refusal("max_accuracy_drop", ("--max-accuracy-drop", "0.5"), {"max_accuracy_drop": 0.5},
            "accuracy-controlled quantization is NNCF's"),
    Refusal("max_accuracy_drop", ("--precision", "int8", "--quantizer", "onnxruntime",
                                  "--max-accuracy-drop", "0.5"),
            {"precision": "int8", "quantizer": "onnxruntime", "max_accuracy_drop": 0.5},
            "accuracy-controlled quantization is NNCF's"),
    Refusal("target", ("--format", "openvino", "--target", "onnxruntime"),
            {"format": "openvino", "target": "onnxruntime"}, "only openvino runs"),
    Refusal("verify_samples", ("--verify-samples", "0"), {"verify_samples": 0},
            "positive number"),
    Refusal("calib_samples", ("--precision", "int8", "--calib-samples", "0"),
            {"precision": "int8", "calib_samples": 0}, "positive number"),
    Refusal("static_batch", ("--static-batch", "0"), {"static_batch": 0}, "0"),
    Refusal("format", ("--format", "plan"), {"format": "plan"}, "plan"),
    Refusal("target", ("--target", "coreml"), {"target": "coreml"}, "coreml"),
    Refusal("labels", None, {"labels": "{labels}"}, "go with images="),
    Refusal("data_dir", None, {"data_dir": "{data}", "images": "{images}"},
            "verify on one or the other"),
]


def _have_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


if not _have_tensorrt():  # here: the build itself is refused, naming --format trt
    REFUSALS.append(Refusal("format", ("--format", "trt"), {"format": "trt"},
                            "tensorrt is not available", exit_code=1))


# ----------------------------------------------------------------------------- harness

@pytest.fixture(scope="module")
def digits28() -> Any:
    return load_dataset("digits", image_size=28)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path,
        tiny_folder_checkpoint: Path, digits_folders: dict[str, Path], digits_bundle: Any,
        digits28: Any) -> dict[str, Any]:
    """Files, folders and images the table's "{key}" values name, and the user's models."""
    (tmp_path / "option_models.py").write_text(MODELS_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import option_models  # type: ignore[import-not-found]

    importlib.reload(option_models)
    torch.manual_seed(1)
    weighted = option_models.tutorial().eval()
    with torch.no_grad():
        weighted.fc2.bias.add_(torch.arange(10.0))  # not what the factory makes
    torch.save(weighted.state_dict(), tmp_path / "w.pt")
    keep = {"checkpoint": tmp_path / "keep-checkpoint.json", "module": tmp_path / "keep.json"}
    keep["checkpoint"].write_text(json.dumps(  # as debug precision writes it
        {"keep_float": ["/classifier/features/features.4/features.4.0/Conv"]}))
    keep["module"].write_text(json.dumps(["/model/conv2/Conv"]))  # a plain list of names
    return {"keep": keep,"tmp": tmp_path, "out_dir": tmp_path / "out", "data": digits_folders["data"],
            "calib": digits_folders["calib"], "cache": tmp_path / "timing.cache",
            "weights": tmp_path / "w.pt", "weighted": weighted, "models": option_models,
            "checkpoint": tiny_checkpoint, "folder_checkpoint": tiny_folder_checkpoint,
            "images": {"checkpoint": digits_bundle.test.images[:40],
                       "module": digits28.test.images[:40]},
            "labels": {"checkpoint": digits_bundle.test.labels[:40],
                       "module": digits28.test.labels[:40]}}


def _fill(value: Any, env: dict[str, Any], source: str) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        found = env[value[1:-1]]
        return found[source] if isinstance(found, dict) else found
    return value


@pytest.fixture
def int8_any_agreement(monkeypatch: pytest.MonkeyPatch) -> None:
    """INT8's agreement and accuracy bounds lifted, its theta and grid bounds kept: these
    untrained models have near-tied logits that INT8 reorders, and what is tested here is the
    options. test_precision and test_export_sources hold INT8's bounds on trained models."""
    from stn_deploy.export import verify

    lifted = dataclasses.replace(verify.INT8, min_agreement=0.0, max_accuracy_drop=None)
    monkeypatch.setitem(verify.TOLERANCES, "int8", lifted)


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """TensorRT's two entry points, stood in for: the builder gets what the pipeline hands it,
    recorded, and writes a placeholder plan."""
    import stn_deploy.export.tensorrt as trt

    builds: list[dict[str, Any]] = []

    def build_engine(onnx_path: Path, plan_path: Path, precision: str,
                     profile: tuple[int, int, int], workspace_mb: int,
                     timing_cache: Path | None) -> dict[str, Any]:
        builds.append({"onnx": Path(onnx_path).name, "precision": precision,
                       "profile": tuple(profile), "workspace_mb": workspace_mb,
                       "timing_cache": timing_cache})
        Path(plan_path).write_bytes(b"not a plan")
        return {"profile": list(profile)}

    monkeypatch.setattr(trt, "import_tensorrt", lambda: SimpleNamespace(__version__="10.0.0"))
    monkeypatch.setattr(trt, "cuda_device", lambda: ("Stand-in GPU", "8.9"))
    monkeypatch.setattr(trt, "build_engine", build_engine)
    return builds


def _call(source: str, caller: str, cli_args: list[str], api: dict[str, Any],
          env: dict[str, Any], checkpoint: Path, factory: str = "tutorial") -> tuple[int, str]:
    """Export through ``caller``: (exit code, what it printed or raised)."""
    if caller == "cli":
        base = [str(checkpoint)] if source == "checkpoint" else [
            "--factory", f"option_models:{factory}"]
        if source == "module" and "--input-shape" not in cli_args:
            base += ["--input-shape", "1x28x28"]
        r = CliRunner().invoke(cli, ["export", *base, *cli_args])
        assert "Traceback" not in r.output, r.output
        return r.exit_code, r.output
    model: Any = checkpoint
    if source == "module":
        model = getattr(env["models"], factory)()
        api = {"input_shape": (1, 28, 28), **api}
    try:
        result = stn_deploy.export_model(model, **api)
    except StnDeployError as e:
        return 1, f"Error: {e}"
    return 0, "\n".join(result.lines)


def _cli_args(options: list[Any], env: dict[str, Any], source: str) -> list[str]:
    args: list[str] = []
    for opt in options:
        args += [str(_fill(a, env, source)) for a in opt.cli]
    return args


def _api_kwargs(options: list[Any], env: dict[str, Any], source: str) -> dict[str, Any]:
    return {k: _fill(v, env, source) for opt in options for k, v in (opt.api or {}).items()}


def _spelled(name: str, caller: str) -> str:
    if caller == "api":
        return f"{name}="
    return {"extra_outputs": "--extra-output"}.get(name, "--" + name.replace("_", "-"))


# ---------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("bundle,source,caller", HONOURED,
                         ids=["-".join(t) for t in HONOURED])
def test_honoured(bundle: str, source: str, caller: str, env: dict[str, Any],
                  fake_tensorrt: list[dict[str, Any]], int8_any_agreement: None) -> None:
    options = [o for o in BUNDLES[bundle] if source in o.sources
               and (o.cli if caller == "cli" else o.api) is not None]
    out = env["out_dir"] / ("m.plan" if bundle == "b2" else "m.onnx")
    env["out"] = out
    checkpoint = env["folder_checkpoint" if bundle == "b2" else "checkpoint"]
    if caller == "cli":
        args = _cli_args(options, env, source)
        args += [] if "--out" in args else ["--out", str(out)]
        code, output = _call(source, "cli", args, {}, env, checkpoint)
    else:
        kwargs = {"out": out, **_api_kwargs(options, env, source)}
        code, output = _call(source, "api", [], kwargs, env, checkpoint)
    assert code == 0, output
    onnx_path = out.with_suffix(".onnx")
    proto = onnx.load(str(onnx_path))
    written = Written(source, onnx_path, out, output, proto, metadata(proto), fake_tensorrt, env)
    for opt in options:
        try:
            opt.check(written)
        except AssertionError as e:
            raise AssertionError(f"{opt.name} not honoured ({source}, {caller}): {e}") from None


REFUSED = [(r, s, c) for r in REFUSALS for s in r.sources for c in CALLERS
           if (r.cli if c == "cli" else r.api) is not None]


@pytest.mark.parametrize("refusal,source,caller", REFUSED,
                         ids=[f"{r.name}-{r.why[:18]}-{s}-{c}" for r, s, c in REFUSED])
def test_refused_by_name(refusal: Refusal, source: str, caller: str,
                         env: dict[str, Any]) -> None:
    out = env["out_dir"] / "m.onnx"
    if caller == "cli":
        args = ["--out", str(out), "--verify-samples", "32", *_cli_args([refusal], env, source)]
        code, output = _call(source, "cli", args, {}, env, env["checkpoint"], refusal.factory)
    else:
        kwargs = {"out": out, "verify_samples": 32, **_api_kwargs([refusal], env, source)}
        code, output = _call(source, "api", [], kwargs, env, env["checkpoint"],
                             refusal.factory)
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert code == (refusal.exit_code if caller == "cli" else 1), output
    assert len(errors) == 1, output
    assert _spelled(refusal.name, caller) in errors[0] and refusal.why in errors[0], errors[0]
    assert not env["out_dir"].exists()


def test_cli_and_api_fill_the_same_request(env: dict[str, Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Both callers are one mapping onto ExportRequest: for every option given both ways, the
    two requests are equal (how errors are spelled aside)."""
    import stn_deploy.export.pipeline as pipeline

    seen: list[ExportRequest] = []
    def run_export(req: ExportRequest, echo: Any = print) -> Any:
        seen.append(req)
        return SimpleNamespace(lines=[])

    monkeypatch.setattr(pipeline, "run_export", run_export)
    for bundle in BUNDLES.values():
        both = [o for o in bundle if o.cli is not None and o.api is not None]
        env["out"] = env["out_dir"] / "m.onnx"
        for source in SOURCES:
            options = [o for o in both if source in o.sources]
            _call(source, "cli", _cli_args(options, env, source), {}, env, env["checkpoint"])
            _call(source, "api", [], _api_kwargs(options, env, source), env,
                  env["checkpoint"])
            cli_req, api_req = seen[-2:]
            skip = {"caller", "module", "factory"}
            cli_d = {k: v for k, v in dataclasses.asdict(cli_req).items() if k not in skip}
            api_d = {k: v for k, v in dataclasses.asdict(api_req).items() if k not in skip}
            assert cli_d == api_d, {k: (cli_d[k], api_d[k]) for k in cli_d if cli_d[k] != api_d[k]}
    assert len(seen) == 2 * len(BUNDLES) * len(SOURCES)


def test_the_table_covers_every_option() -> None:
    """A new ExportRequest field fails here until it is honoured or refused above, for both
    sources."""
    fields = {f.name for f in dataclasses.fields(ExportRequest)} - {
        "checkpoint", "pretrained", "factory", "module", "caller"}
    for source in SOURCES:
        honoured = {o.name for b in BUNDLES.values() for o in b if source in o.sources}
        refused = {r.name for r in REFUSALS if source in r.sources}
        assert fields <= honoured | refused, (source, fields - honoured - refused)
    import inspect

    from stn_deploy.commands.export import export

    api_only = {"images", "labels", "calib_images", "dataset"}
    assert {p.name for p in export.params} == (fields - api_only) | {"checkpoint", "factory",
                                                                     "pretrained"}
    api = set(inspect.signature(stn_deploy.export_model).parameters)
    assert api == fields | {"model", "quiet", "pretrained"}
