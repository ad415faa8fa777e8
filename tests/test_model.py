from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stn_deploy.config import ModelConfig, flat_metadata
from stn_deploy.errors import StnDeployError
from stn_deploy.model import AffineGrid, build_model, count_parameters


def test_cifar_config_has_the_seed_parameter_count() -> None:
    model = build_model(ModelConfig())
    assert count_parameters(model) == 145_104
    assert model.stn is not None
    assert count_parameters(model.stn) == 9_072
    # The seed's grouped convs: 432 and 6,912 parameters.
    sizes = {m.weight.numel() for m in model.classifier.modules()
             if isinstance(m, torch.nn.Conv2d) and m.groups == 12}
    assert sizes == {432, 6_912}


def test_no_stn_variant_is_the_same_classifier() -> None:
    with_stn = build_model(ModelConfig())
    without = build_model(ModelConfig(use_stn=False))
    assert without.stn is None
    assert count_parameters(without) == count_parameters(with_stn.classifier)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [(32, 32), (28, 20), (7, 13), (42, 42)])
def test_affine_grid_equals_torch(align_corners: bool, size: tuple[int, int]) -> None:
    torch.manual_seed(1)
    theta = torch.randn(6, 2, 3)
    h, w = size
    ours = AffineGrid(h, w, align_corners)(theta)
    ref = F.affine_grid(theta, [6, 1, h, w], align_corners=align_corners)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref)


def test_identity_init_gives_identity_warp() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        warped, theta = model.stn(x)  # type: ignore[misc]
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(4, 2, 3)
    assert torch.equal(theta, eye)
    assert torch.allclose(warped, x, atol=1e-6)


@pytest.mark.parametrize("channels,size", [(1, 28), (1, 32), (3, 32), (3, 48)])
def test_other_sizes_and_channels(channels: int, size: int) -> None:
    config = ModelConfig(in_channels=channels, image_size=size, mean=(0.5,) * channels,
                         std=(0.25,) * channels)
    model = build_model(config).eval()
    logits, theta = model.forward_with_theta(torch.randn(3, channels, size, size))
    assert logits.shape == (3, 10) and theta.shape == (3, 2, 3)


def test_config_round_trip_and_validation() -> None:
    config = ModelConfig(align_corners=True, distort="rts")
    assert ModelConfig.from_json(config.to_json()) == config
    meta = flat_metadata(config)
    assert meta["input_shape"] == "3,32,32"
    assert meta["class_names"].split("\n") == list(config.class_names)
    with pytest.raises(StnDeployError, match="image_size"):
        ModelConfig(image_size=16)
    with pytest.raises(StnDeployError, match="class names"):
        ModelConfig(num_classes=3)
    with pytest.raises(StnDeployError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})
