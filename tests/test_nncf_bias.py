"""NNCF's bias correction (``nncf_quant.FAST_BIAS_CORRECTION``): both NNCF paths, the plain
quantization and accuracy control, correct biases with NNCF's full BiasCorrection, which on
the shipped CIFAR-10 model kept top-1 agreement with FP32 above 99% where the fast variant
stayed near 97%. Checked by what lands in the file: the quantized graph's biases are those
NNCF writes with the full algorithm, and not those of the fast one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from stn_deploy.config import ModelConfig
from stn_deploy.data import ImageSet

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("nncf") is None,
                                reason="nncf is not installed (pip install 'stn-deploy[int8]')")
SCOPE = "stn-float"  # the scope the shipped CIFAR-10 model gets


Graph = tuple[Path, ModelConfig, np.ndarray, ImageSet]


@pytest.fixture(scope="module")
def fp32_graph(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Graph:
    """The tiny digits model's FP32 graph, its config, 64 calibration images and 32
    labelled held-out images (uint8 NCHW)."""
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.export.onnx_export import OnnxOptions, export_onnx
    from stn_deploy.export.verify import verification_data

    checkpoint = load_checkpoint(tiny_checkpoint)
    out = tmp_path_factory.mktemp("nncf-bias") / "fp32.onnx"
    export_onnx(checkpoint.model(), out, OnnxOptions(opset=17))
    calib = verification_data(checkpoint.config, "train", None, 64)[0]
    held = verification_data(checkpoint.config, "test", None, 32)[0]
    return out, checkpoint.config, calib.images.numpy(), held


def _conv_biases(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.name: init[n.input[2]] for n in model.graph.node
            if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in init}


def _nncf_itself(src: Path, dst: Path, images: np.ndarray, config: ModelConfig,
                 fast: bool) -> None:
    """NNCF called directly, as ``quantize_nncf`` calls it but for the bias correction."""
    import nncf

    from stn_deploy.export import nncf_quant

    model, ignored = nncf_quant._prepared(src, (), SCOPE)
    name = model.graph.input[0].name
    feeds = nncf_quant._feeds(model, images, config)
    q = nncf.quantize(model, nncf.Dataset(feeds, lambda x: {name: x}),
                      subset_size=len(images), fast_bias_correction=fast,
                      ignored_scope=nncf.IgnoredScope(names=ignored))
    onnx.save(q, str(dst))


def _assert_full_correction(got: dict[str, np.ndarray], full: dict[str, np.ndarray],
                            fast: dict[str, np.ndarray]) -> None:
    assert got.keys() == full.keys() == fast.keys() and got
    assert any(not np.allclose(full[k], fast[k], atol=1e-6) for k in got)  # they do differ
    for k in got:
        np.testing.assert_allclose(got[k], full[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_both_nncf_paths_use_full_bias_correction(fp32_graph: Graph, tmp_path: Path) -> None:
    from stn_deploy.export import nncf_quant

    src, config, calib, held = fp32_graph
    full, fast = tmp_path / "full.onnx", tmp_path / "fast.onnx"
    _nncf_itself(src, full, calib, config, fast=False)
    _nncf_itself(src, fast, calib, config, fast=True)
    want, other = _conv_biases(full), _conv_biases(fast)

    plain = nncf_quant.quantize_nncf(src, tmp_path / "plain.onnx", calib, config, scope=SCOPE)
    _assert_full_correction(_conv_biases(plain.path), want, other)

    # A budget of 100 points is met at once: accuracy control returns its first quantization.
    controlled = nncf_quant.quantize_nncf_controlled(
        src, tmp_path / "controlled.onnx", calib, held.images.numpy(),
        held.labels.numpy(), config, max_drop=100.0, grid_px=1e9, scope=SCOPE)
    assert controlled.kept_float == []
    _assert_full_correction(_conv_biases(controlled.path), want, other)
