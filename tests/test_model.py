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


@pytest.mark.parametrize("loc_net", ["seed", "large"])
def test_leaky_stn_adds_no_parameters_and_its_units_cannot_die(loc_net: str) -> None:
    relu = build_model(ModelConfig(loc_net=loc_net))
    leaky = build_model(ModelConfig(loc_net=loc_net, loc_act="leaky"))
    assert count_parameters(leaky) == count_parameters(relu)
    assert leaky.stn is not None and relu.stn is not None
    acts = [m for m in leaky.stn.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU))]
    assert acts and all(isinstance(m, torch.nn.LeakyReLU) for m in acts)
    # Every hidden unit negative for every image: ReLU passes no gradient to the first linear
    # layer (dead), LeakyReLU still does.
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for model in (relu, leaky):
        torch.manual_seed(0)
        with torch.no_grad():
            model.stn.regressor[0].bias.fill_(-1e3)
            model.stn.regressor[2].weight.normal_(0, 0.01)
        model.stn.theta(x).square().sum().backward()
        grads.append(float(model.stn.regressor[0].weight.grad.abs().sum()))
    assert grads[0] == 0.0 and grads[1] > 0.0


def test_loc_act_round_trip_and_default_for_older_configs() -> None:
    cfg = ModelConfig(loc_act="leaky")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    older = ModelConfig().to_dict()
    del older["loc_act"]  # a checkpoint written before the option existed
    assert ModelConfig.from_dict(older).loc_act == "relu"
    with pytest.raises(StnDeployError, match="loc_act"):
        ModelConfig(loc_act="tanh")


def test_two_passes_add_no_parameters_and_compose_the_refinement() -> None:
    from stn_deploy.model import compose_thetas

    one, two = build_model(ModelConfig()), build_model(ModelConfig(stn_passes=2))
    assert count_parameters(two) == count_parameters(one) == 145_104
    torch.manual_seed(0)
    with torch.no_grad():
        two.stn.regressor[2].weight.normal_(0, 0.01)
        two.stn.regressor[2].bias.add_(torch.tensor([-0.1, 0.05, 0.02, 0.03, -0.08, -0.04]))
    two.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first = two.stn._regress(x)
        warped = F.grid_sample(x, F.affine_grid(first, list(x.shape), align_corners=False),
                               align_corners=False)
        expected = compose_thetas(first, two.stn._regress(warped))
        theta = two.stn.theta(x)
        out, theta_fwd = two.stn(x)
    torch.testing.assert_close(theta, expected)
    torch.testing.assert_close(theta_fwd, theta)
    # The input is sampled once, through the composed theta.
    once = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False),
                         align_corners=False)
    torch.testing.assert_close(out, once, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(theta, first)
    with pytest.raises(StnDeployError, match="stn_passes"):
        ModelConfig(stn_passes=0)


def test_compose_thetas_is_warping_twice() -> None:
    from stn_deploy.model import compose_thetas

    outer = torch.tensor([[[0.8, 0.2, 0.1], [-0.1, 0.9, 0.05]]])
    inner = torch.tensor([[[0.9, -0.1, -0.05], [0.15, 1.1, 0.1]]])
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 128),
                            indexing="ij")
    img = (torch.exp(-((xs - 0.2) ** 2 + (ys + 0.1) ** 2) / 0.1)
           + 0.5 * torch.sin(3 * xs) * torch.cos(2 * ys))[None, None]

    def warp(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(i, F.affine_grid(t, list(i.shape), align_corners=False),
                             align_corners=False)

    twice = warp(warp(img, outer), inner)[..., 20:-20, 20:-20]
    assert (twice - warp(img, compose_thetas(outer, inner))[..., 20:-20, 20:-20]).abs().max() < 0.01
    assert (twice - warp(img, compose_thetas(inner, outer))[..., 20:-20, 20:-20]).abs().max() > 0.1
