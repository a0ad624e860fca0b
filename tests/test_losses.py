"""PerceptualLoss (with a locally built VGG-16 state dict) and CombinedLoss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spherinator.losses import CombinedLoss, PerceptualLoss

VGG_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 file name


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A random-initialised torchvision VGG-16 state dict (features only, with torchvision's key names)."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg16_features.pth"
    torch.save(state, path)
    return str(path), state


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def test_missing_weights_offline_is_a_clear_error(torch_home):
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*weights_path"):
        PerceptualLoss()
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        PerceptualLoss(weights_path=str(torch_home / "nowhere.pth"))


def test_weights_are_read_from_torchvision_cache(torch_home, vgg_weights):
    path, state = vgg_weights
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / VGG_FILE).symlink_to(path)
    loss = PerceptualLoss(layers=[3, 8])
    torch.testing.assert_close(loss.vgg[7].weight, state["features.7.weight"])
    assert len(loss.vgg) == 9  # truncated after the deepest tapped layer


def test_loss_behaviour_and_gradients(vgg_weights):
    loss = PerceptualLoss(weights_path=vgg_weights[0])
    target = torch.rand(2, 3, 32, 32)
    assert loss(target.clone(), target).item() == 0.0
    prediction = (target + 0.1 * torch.randn_like(target)).requires_grad_()
    value = loss(prediction, target)
    assert value.item() > 0
    value.backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss.vgg.parameters())


def test_grayscale_is_broadcast_to_three_channels(vgg_weights):
    loss = PerceptualLoss(weights_path=vgg_weights[0])
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(loss(a, b), loss(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match=r"\(2, 4, 32, 32\)"):
        loss(torch.rand(2, 4, 32, 32), torch.rand(2, 4, 32, 32))


def test_layer_weights_scale_the_terms(vgg_weights):
    path = vgg_weights[0]
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    l3, l8 = PerceptualLoss([3], weights_path=path)(a, b), PerceptualLoss([8], weights_path=path)(a, b)
    both = PerceptualLoss([8, 3], weights=[2.0, 0.5], weights_path=path)(a, b)
    torch.testing.assert_close(both, 2.0 * l8 + 0.5 * l3)


def test_layers_in_any_order_and_repeated(vgg_weights):
    path = vgg_weights[0]
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    l3, l8 = PerceptualLoss([3], weights_path=path)(a, b), PerceptualLoss([8], weights_path=path)(a, b)
    repeated = PerceptualLoss([3, 8, 3], weights=[1.0, 2.0, 0.5], weights_path=path)(a, b)
    torch.testing.assert_close(repeated, 1.5 * l3 + 2.0 * l8)


def test_bad_configurations(vgg_weights):
    with pytest.raises(ValueError, match=r"2 weights for 3 layers"):
        PerceptualLoss(weights=[1.0, 1.0], weights_path=vgg_weights[0])
    with pytest.raises(ValueError, match=r"0\.\.30.*\[3, 99\]"):
        PerceptualLoss(layers=[3, 99], weights_path=vgg_weights[0])


def test_vgg_weights_stay_out_of_checkpoints(vgg_weights):
    model = nn.ModuleDict({"head": nn.Linear(2, 2), "loss": PerceptualLoss(weights_path=vgg_weights[0])})
    state = model.state_dict()
    assert set(state) == {"head.weight", "head.bias"}
    fresh = nn.ModuleDict({"head": nn.Linear(2, 2), "loss": PerceptualLoss(weights_path=vgg_weights[0])})
    fresh.load_state_dict(state)  # strict: the VGG weights are not reported missing
    torch.testing.assert_close(fresh["head"].weight, model["head"].weight)


def test_combined_loss_is_the_weighted_sum():
    a, b = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    combined = CombinedLoss([nn.MSELoss(), nn.L1Loss()], factors=[1.0, 0.1])
    torch.testing.assert_close(combined(a, b), nn.functional.mse_loss(a, b) + 0.1 * nn.functional.l1_loss(a, b))


def test_combined_loss_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"3 factors .* 2 losses \(MSELoss, L1Loss\)"):
        CombinedLoss([nn.MSELoss(), nn.L1Loss()], factors=[1.0, 0.1, 2.0])


def test_colour_weighted_mse_is_mse_at_weight_one_and_weighs_colour_apart():
    from spherinator.losses import ColourWeightedMSELoss

    torch.manual_seed(0)
    target = torch.rand(4, 3, 8, 8)
    noisy = target + 0.1 * torch.randn_like(target)
    assert torch.allclose(ColourWeightedMSELoss()(noisy, target), nn.MSELoss()(noisy, target), rtol=1e-5)

    brighter = target + 0.1  # the same error in every band: luminance only
    redder = target + 0.1 * torch.tensor([1.0, 0.0, -1.0])[:, None, None]  # no luminance change: colour only
    for weight in (0.0, 1.0, 7.0):
        loss = ColourWeightedMSELoss(colour_weight=weight)
        assert torch.allclose(loss(brighter, target), torch.tensor(0.01), rtol=1e-4)
        assert torch.allclose(loss(redder, target), torch.tensor(weight * 0.02 / 3), rtol=1e-4, atol=1e-9)

    prediction = torch.rand(2, 3, 4, 4, requires_grad=True)
    ColourWeightedMSELoss(colour_weight=5.0)(prediction, target[:2, :, :4, :4]).backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0


def test_colour_weighted_mse_refuses_bad_input():
    from spherinator.losses import ColourWeightedMSELoss

    with pytest.raises(ValueError, match="colour_weight"):
        ColourWeightedMSELoss(colour_weight=-1.0)
    with pytest.raises(ValueError, match="bands on dimension 1"):
        ColourWeightedMSELoss()(torch.zeros(4, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="differ"):
        ColourWeightedMSELoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def test_colour_weighted_mse_refuses_one_band_naming_the_shape_and_what_to_use():
    # (before: on one band it was plain MSE without a word)
    from spherinator.losses import ColourWeightedMSELoss
    from spherinator.shapes import ConfigError

    with pytest.raises(ConfigError, match=r"one band \(shape \(2, 1, 4, 4\)\).*use torch.nn.MSELoss"):
        ColourWeightedMSELoss(colour_weight=4.0)(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ConfigError, match="one band"):
        ColourWeightedMSELoss()(torch.zeros(2, 1, 64), torch.zeros(2, 1, 64))  # spectra of one band too


def test_colour_weighted_mse_on_shapes_it_cannot_take_is_a_user_error():
    # (before: a ValueError, which `spherinator fit` shows as a traceback from the first training step)
    from spherinator.errors import ConfigError
    from spherinator.losses import ColourWeightedMSELoss

    with pytest.raises(ConfigError, match=r"bands on dimension 1 of \(B, C, ...\), got shape \(4, 5\)"):
        ColourWeightedMSELoss()(torch.zeros(4, 5), torch.zeros(4, 5))
    with pytest.raises(ConfigError, match=r"prediction \(1, 3, 4, 4\) and target \(1, 3, 4, 5\) differ"):
        ColourWeightedMSELoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
