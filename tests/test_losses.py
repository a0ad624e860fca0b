"""PerceptualLoss (with a locally built VGG-16 state dict) and CombinedLoss."""

from __future__ import annotations

from pathlib import Path

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


# -- error-weighted losses (spectra with uncertainties) ---------------------------------------------------------------

RECIPE = str(Path(__file__).resolve().parents[1] / "experiments" / "vae_gaia_xp.yaml")


def test_gaussian_nll_and_chi_square_weigh_each_value_by_its_error():
    from spherinator.losses import ChiSquareLoss, GaussianNLLLoss

    torch.manual_seed(0)
    target, prediction = torch.rand(4, 1, 10), torch.rand(4, 1, 10)
    error = torch.rand(4, 1, 10) + 0.1
    expected = nn.GaussianNLLLoss()(prediction, target, error**2)  # torch's takes variances
    assert torch.allclose(GaussianNLLLoss()(prediction, target, error), expected, atol=1e-6)
    full = GaussianNLLLoss(full=True)(prediction, target, error)
    assert torch.allclose(full, nn.GaussianNLLLoss(full=True)(prediction, target, error**2), atol=1e-6)
    chi2 = ChiSquareLoss()(prediction, target, error)
    assert torch.allclose(chi2, (((prediction - target) / error) ** 2).mean())
    # a value with ten times the error counts a hundred times less
    miss = torch.zeros(1, 2)
    assert ChiSquareLoss()(miss + 1, miss, torch.tensor([[1.0, 10.0]])) == pytest.approx((1 + 0.01) / 2)


def test_error_losses_find_the_error_in_a_batch_or_say_how_to_load_it():
    from spherinator.errors import DataError
    from spherinator.losses import ChiSquareLoss

    data, error = torch.zeros(2, 3), torch.ones(2, 3)
    loss = ChiSquareLoss()
    assert loss.error_of((data, error)) is error
    assert loss.error_of({"flux": data, "flux_error": error}) is error  # the first column's name + _error
    assert ChiSquareLoss(error_column="sigma").error_of({"flux": data, "sigma": error}) is error
    with pytest.raises(DataError, match="no column 'flux_error' .* list the error column in data.columns"):
        loss.error_of({"flux": data})
    with pytest.raises(DataError, match="holds the data alone; load the error column too"):
        loss.error_of(data)
    with pytest.raises(DataError, match="do not match the data's"):
        loss(data, data, torch.ones(2, 4))


def _spectra(root: Path, count: int, length: int) -> Path:
    import numpy as np

    from spherinator.data import write_dataset
    from tools import make_dataset

    write_dataset(root, [make_dataset.synthetic_spectra(count, length, np.random.default_rng(0))], rows_per_group=64)
    return root


@pytest.mark.slow  # about 10 s of CPU (a minute on a loaded machine)
def test_vae_with_error_weighted_loss_learns_spectra_with_uncertainties(tmp_path):
    """The Gaia XP recipe on tiny synthetic spectra (32 values, errors growing steeply to both ends and a few bad
    bins): the autoencoder passes each batch's errors to the Gaussian NLL, which falls clearly."""
    import lightning.pytorch as pl

    from spherinator.cli import SpherinatorCLI
    from tests.conftest import quiet_trainer

    data = _spectra(tmp_path / "spectra", 128, 32)
    args = ["-c", RECIPE, "--data.init_args.data_directory", str(data), "--data.init_args.num_workers", "0"]
    args += ["--data.init_args.batch_size", "32", "--model.init_args.decoder.init_args.cnn_input_dim", "[64, 4]"]
    torch.manual_seed(0)
    cli = SpherinatorCLI(args=[*args, "--trainer.accelerator", "cpu"], run=False)
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert isinstance(batch, list | tuple) and len(batch) == 2  # (flux, flux_error) reached the step
            losses.append(float(outputs["loss"]))

    quiet_trainer(max_epochs=8, callbacks=[Record()]).fit(cli.model, datamodule=cli.datamodule)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4  # the first and the last epoch
    assert first > 100 and last < 0.2 * first, (first, last)


def test_gaia_xp_recipe_trains_a_step_on_344_value_spectra(tmp_path, monkeypatch):
    from spherinator.cli import main

    monkeypatch.chdir(tmp_path)  # the default logger writes to ./runs: never into the checkout

    data = _spectra(tmp_path / "spectra", 16, 344)
    main(
        ["fit", "-c", RECIPE, "--data.init_args.data_directory", str(data), "--data.init_args.num_workers", "0"]
        + ["--data.init_args.batch_size", "8", "--trainer.max_steps", "1", "--trainer.accelerator", "cpu"]
        + ["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    )
