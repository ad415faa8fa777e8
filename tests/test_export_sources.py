"""The export pipeline's two sources on models we did not design: the Python API, user
modules (their affine grids, thetas and grids), the command line's --factory, and bad input.
Every option against both sources is tests/test_export_options.py."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

import stn_deploy
from stn_deploy import examples
from stn_deploy.artifacts import config_from_onnx, onnx_opset, read_metadata
from stn_deploy.cli import cli
from stn_deploy.data import DataBundle, load_dataset, normalize

OPSETS = (16, 17, 18, 19, 20)


@pytest.fixture(scope="module")
def digits28() -> DataBundle:
    return load_dataset("digits", image_size=28)


def train_briefly(model: nn.Module, bundle: DataBundle, epochs: int = 3) -> nn.Module:
    """A few epochs of Adam on the digits (as a user would train their own model)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_all = normalize(bundle.train.images, bundle.config)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x_all)).split(64):
            out = model(x_all[idx])
            logits = out[0] if isinstance(out, tuple) else out
            loss = F.cross_entropy(logits, bundle.train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def tutorial(digits28: DataBundle) -> nn.Module:
    torch.manual_seed(0)
    return train_briefly(examples.tutorial_mnist_stn(return_theta=True), digits28)


def _export(model: nn.Module, out: Path, bundle: DataBundle, precision: str = "fp32",
            **kw: object):  # type: ignore[no-untyped-def]
    calib = {"calib_images": bundle.train.images[:300]} if precision == "int8" else {}
    return stn_deploy.export_model(model, out, input_shape=(1, 28, 28), precision=precision,
                                   images=bundle.test.images, labels=bundle.test.labels,
                                   mean=bundle.config.mean, std=bundle.config.std,
                                   dataset="digits", **calib, **kw)


# ------------------------------------------------------------------------------- the API

def test_import_stays_light_and_names_resolve() -> None:
    code = ("import sys, stn_deploy; heavy = [m for m in ('torch', 'onnx', 'onnxruntime', "
            "'numpy', 'stn_deploy.api') if m in sys.modules]; print(heavy); "
            "print(stn_deploy.export_model.__module__, sorted(stn_deploy.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "[]"
    assert out[1].startswith("stn_deploy.api ")
    with pytest.raises(AttributeError):
        stn_deploy.no_such_name  # noqa: B018


def test_api_docstring_examples_run() -> None:
    import stn_deploy.api

    result = doctest.testmod(stn_deploy.api, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


# ------------------------------------------------------------------------- affine grid

@pytest.mark.parametrize("size", [(2, 1, 28, 28), (3, 2, 20, 20), (1, 3, 5, 7)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_exact_affine_grid_is_bit_identical(size: tuple[int, ...], align_corners: bool) -> None:
    from stn_deploy.export.user_module import exact_affine_grid

    original = torch.nn.functional.affine_grid
    theta = torch.randn(size[0], 2, 3, generator=torch.Generator().manual_seed(1))
    want = F.affine_grid(theta, list(size), align_corners=align_corners)
    with exact_affine_grid() as calls:
        assert torch.nn.functional.affine_grid is not original  # really patched
        got = F.affine_grid(theta, list(size), align_corners=align_corners)
    assert calls.sizes == [(size[2], size[3])] and calls.thetas[0] is theta
    assert torch.equal(got, want)
    assert torch.nn.functional.affine_grid is original  # restored, the very function


def test_patches_are_restored_when_the_model_raises() -> None:
    from stn_deploy.export.user_module import exact_affine_grid, recorded_grids

    affine, sample = torch.nn.functional.affine_grid, torch.nn.functional.grid_sample
    with pytest.raises(ValueError), exact_affine_grid(), recorded_grids():
        raise ValueError("the user's forward failed")
    assert torch.nn.functional.affine_grid is affine
    assert torch.nn.functional.grid_sample is sample


# ------------------------------------------------------------------------- --with-theta

def test_with_theta_exports_the_theta_of_the_affine_grid_call(digits28: DataBundle,
                                                              tmp_path: Path) -> None:
    """The theta output is the theta the model computed (here also its own second output),
    not a copy of anything else."""
    torch.manual_seed(0)
    model = examples.tutorial_mnist_stn(return_theta=True).eval()
    with torch.no_grad():  # a theta that varies with the image
        model.fc_loc[2].weight.normal_(0, 0.05)
    out = tmp_path / "t.onnx"
    result = stn_deploy.export_model(model, out, input_shape=(1, 28, 28), opset=16,
                                     with_theta=True, images=digits28.test.images[:64])
    assert read_metadata(out)["outputs"] == "logits,theta"
    checks = {name: ok for name, _, ok in result.report.checks}
    assert checks["theta"] and checks["grid0"]
    x = normalize(digits28.test.images[:8], config_from_onnx(out))
    with stn_deploy.open_runner(out) as runner:
        got = runner.infer(x.numpy())
    with torch.no_grad():
        own_theta = model(x)[1].numpy()
    assert got["theta"].shape == (8, 2, 3) and own_theta.std(0).max() > 1e-3
    np.testing.assert_allclose(got["theta"], own_theta, atol=1e-5)


def test_with_theta_of_two_affine_grids(tmp_path: Path) -> None:
    """Two F.affine_grid calls (28x28, then a 20x20 zoom): theta0 and theta1, each held to
    PyTorch's in pixels of its own grid."""
    torch.manual_seed(0)
    model = examples.two_stn().eval()
    with torch.no_grad():
        for stn in (model.first, model.second):
            stn.head[2].weight.normal_(0, 0.05)
    out = tmp_path / "two.onnx"
    result = stn_deploy.export_model(model, out, input_shape=(1, 28, 28), opset=17,
                                     with_theta=True)
    assert read_metadata(out)["outputs"] == "logits,theta0,theta1"
    checks = {name: (text, ok) for name, text, ok in result.report.checks}
    assert {"theta0", "theta1", "grid0", "grid1"} <= set(checks)
    assert all(ok for _, ok in checks.values()) and "px" in checks["theta1"][0]
    meta = read_metadata(out)
    assert meta["affine_grid"] == ("F.affine_grid written as a constant grid and MatMul at "
                                   "20x20, 28x28")


# ------------------------------------------------------------- the tutorial's STN, trained

def test_trained_tutorial_int8_keeps_sampling_path_float(tutorial: nn.Module,
                                                         digits28: DataBundle,
                                                         tmp_path: Path) -> None:
    import onnx

    from stn_deploy.export.precision import stn_path_nodes

    result = _export(tutorial, tmp_path / "t.onnx", digits28, opset=16, precision="int8",
                     extra_outputs=("theta",))
    report = result.report
    checks = {name: ok for name, _, ok in report.checks}
    assert report.passed and checks["theta"] and checks["grid0"]
    assert report.accuracy_ref is not None and report.accuracy_ref > 60
    proto = onnx.load(str(result.path))
    assert onnx_opset(proto) == 16
    assert not {"AffineGrid"} & {n.op_type for n in proto.graph.node}
    path = set(stn_path_nodes(proto))
    ops = {n.op_type for n in proto.graph.node if n.name in path}
    assert "GridSample" in ops and not ops & {"QuantizeLinear", "DequantizeLinear"}
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)  # the rest is INT8
    meta = read_metadata(result.path)
    assert meta["precision"] == "int8" and meta["grid_samples"] == "1"
    assert meta["outputs"] == "logits,theta" and meta["input_shape"] == "1,28,28"


def test_grid_check_catches_a_different_grid(tutorial: nn.Module, digits28: DataBundle,
                                             tmp_path: Path) -> None:
    import copy

    result = _export(tutorial, tmp_path / "t.onnx", digits28, opset=17)
    other = copy.deepcopy(tutorial)
    with torch.no_grad():  # shift the sampling grid by 0.01 of the half-width: 0.14 px
        other.fc_loc[2].bias[2] += 0.01
    images = digits28.test.images[:64]
    assert stn_deploy.verify(result.path, tutorial, images).passed
    report = stn_deploy.verify(result.path, other, images)
    failed = [name for name, _, ok in report.checks if not ok]
    assert "grid0" in failed


# ---------------------------------------------------------------------------- the CLI

def _imagefolder(root: Path, bundle: DataBundle, per_class: int = 4) -> Path:
    for split, data in (("train", bundle.train), ("test", bundle.test)):
        for k in range(10):
            idx = (data.labels == k).nonzero().flatten()[:per_class]
            (root / split / str(k)).mkdir(parents=True)
            for i in idx.tolist():
                Image.fromarray(data.images[i, 0].numpy()).save(root / split / str(k) / f"{i}.png")
    return root


def test_cli_factory_with_weights_and_data_dir(tutorial: nn.Module, digits28: DataBundle,
                                             tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    torch.save(tutorial.state_dict(), weights)
    data = _imagefolder(tmp_path / "folder", digits28)
    out = tmp_path / "mine.onnx"
    mean, std = digits28.config.mean[0], digits28.config.std[0]
    res = CliRunner().invoke(cli, [
        "export", "--factory", "stn_deploy.examples:tutorial_mnist_stn", "--weights", str(weights),
        "--input-shape", "1x28x28", "--data-dir", str(data), "--mean", str(mean),
        "--std", str(std), "--class-names", ",".join("zero one two three four five six seven "
                                                     "eight nine".split()),
        "--opset", "19", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "random" not in res.output and "grid 0" in res.output
    meta = read_metadata(out)
    assert meta["verified_on"].startswith("the test split of")
    with stn_deploy.open_runner(out) as runner:  # read as bench and predict read it
        assert runner.config.class_names[1] == "one" and runner.config.mean == (mean,)
        assert runner.input_spec.shape[1:] == (1, 28, 28)


def test_cli_factory_without_grid_sample_and_random_inputs(tmp_path: Path) -> None:
    out = tmp_path / "plain.onnx"
    res = CliRunner().invoke(cli, ["export", "--factory", "stn_deploy.examples:plain_cnn",
                                   "--input-shape", "1x28x28", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "STN checks (grid parity, FP32 sampling path) do not apply" in res.output
    assert "random inputs" in res.output and "not that it is accurate" in res.output
    assert read_metadata(out)["stn_checks"] == "not applicable: no grid_sample"


BAD_MODULE = '''
import torch
from torch import nn

def raises():
    raise ValueError("no such variant")

def not_a_module():
    return 42

class Unsupported(nn.Module):
    def forward(self, x):
        return torch.fft.fft2(x).abs().flatten(1)[:, :10]

def unsupported():
    return Unsupported()
'''


@pytest.mark.parametrize("args, cause", [
    (["--factory", "no_such_pkg.models:net"], "cannot import no_such_pkg.models"),
    (["--factory", "bad_factories:raises"], "the factory raised ValueError: no such variant"),
    (["--factory", "bad_factories:not_a_module"], "returned a int, not a torch.nn.Module"),
    (["--factory", "stn_deploy.examples:two_stn", "--weights", "{tutorial_weights}"],
     "do not fit the model"),
    (["--factory", "stn_deploy.examples:tutorial_mnist_stn", "--input-shape", "1x32x32"],
     "the model rejects input shape 1x32x32"),
    (["--factory", "bad_factories:unsupported"], "'aten::fft_fft2' to ONNX opset version 17 is "
                                               "not supported"),
])
def test_cli_bad_factory_input_one_line_no_file(args: list[str], cause: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad_factories.py").write_text(BAD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = tmp_path / "tutorial.pt"
    torch.save(examples.tutorial_mnist_stn().state_dict(), weights)
    args = [a.format(tutorial_weights=weights) for a in args]
    if "--input-shape" not in args:
        args += ["--input-shape", "1x28x28"]
    out = tmp_path / "out" / "m.onnx"
    res = CliRunner().invoke(cli, ["export", *args, "--out", str(out)])
    assert res.exit_code == 1, res.output
    error = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and cause in error[0], res.output
    assert not out.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------ proof on three models (slow)

@pytest.mark.slow
@pytest.mark.parametrize("factory", ["tutorial_mnist_stn", "two_stn", "flow_warp"])
def test_foreign_models_every_opset_precision_and_runtime(factory: str, digits28: DataBundle,
                                                          tmp_path: Path) -> None:
    import onnx

    from stn_deploy.export.precision import stn_path_nodes

    torch.manual_seed(0)
    # Two STNs in a row learn slower; INT8 agreement needs confident (trained) logits.
    epochs = {"two_stn": 10}.get(factory, 3)
    model = train_briefly(getattr(examples, factory)(), digits28, epochs)
    grids = {"tutorial_mnist_stn": 1, "two_stn": 2, "flow_warp": 1}[factory]
    files = []
    for opset in OPSETS:
        for precision in ("fp32", "fp16", "int8"):
            out = tmp_path / f"{factory}-{opset}-{precision}.onnx"
            result = _export(model, out, digits28, opset=opset, precision=precision)
            report = result.report
            grid_checks = [ok for name, _, ok in report.checks if name.startswith("grid")]
            assert report.passed and len(grid_checks) == grids, result.lines
            proto = onnx.load(str(out))
            assert onnx_opset(proto) == opset
            path = set(stn_path_nodes(proto))
            path_types = {n.op_type for n in proto.graph.node if n.name in path}
            assert not path_types & {"QuantizeLinear", "DequantizeLinear", "Cast"}
            if precision == "fp16":  # the sampler's inputs and constants stay float32
                assert all(t.data_type == onnx.TensorProto.FLOAT for t in proto.graph.initializer
                           if any(t.name in n.input for n in proto.graph.node if n.name in path))
            files.append(out)
    report = stn_deploy.bench_models(files[:3] + files[-3:], ["onnxruntime", "openvino"],
                              batch_sizes=(1,), iterations=3, warmup=1)
    rows = report["results"]
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows), rows
    assert all(r["eval"]["agreement_pct"] >= 95 for r in rows)
