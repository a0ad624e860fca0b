"""Behaviour of the layers, encoders, decoders and the two LightningModules."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader

from spherinator.models import (
    Autoencoder,
    ConsecutiveConv1DLayer,
    ConsecutiveConv2DLayer,
    ConsecutiveConvTranspose1DLayer,
    ConsecutiveConvTranspose2DLayer,
    ConvolutionalDecoder1D,
    ConvolutionalDecoder2D,
    ConvolutionalEncoder1D,
    ConvolutionalEncoder2D,
    HuggingFaceViTEncoder,
    UpsamplingDecoder2D,
    VariationalAutoencoder,
)
from tests.conftest import quiet_trainer


def encoder_1d(input_dim: list[int] | None = (1, 32), output_dim: int = 8) -> ConvolutionalEncoder1D:
    layers = [ConsecutiveConv1DLayer(kernel_size=4, stride=2, padding=1, out_channels=[4, 8])]
    return ConvolutionalEncoder1D(input_dim=input_dim, output_dim=output_dim, cnn_layers=layers)


def decoder_1d(input_dim: int | None = None, output_dim: list[int] | None = None) -> ConvolutionalDecoder1D:
    layers = [  # (8, 8) -> (4, 16) -> (1, 32)
        ConsecutiveConvTranspose1DLayer(kernel_size=4, stride=2, padding=1, out_channels=[4]),
        ConsecutiveConvTranspose1DLayer(
            kernel_size=4, stride=2, padding=1, out_channels=[1], activation=None, norm=None
        ),
    ]
    return ConvolutionalDecoder1D(input_dim=input_dim, output_dim=output_dim, cnn_input_dim=[8, 8], cnn_layers=layers)


def encoder_2d(input_dim: list[int] | None = (3, 16, 16), output_dim: int = 8) -> ConvolutionalEncoder2D:
    # 16x16 -> 8x8 -> 4x4 -> 2x2 -> 1x1: the last BatchNorm sees a 1x1 map
    layers = [ConsecutiveConv2DLayer(kernel_size=4, stride=2, padding=1, out_channels=[4, 4, 8, 8])]
    return ConvolutionalEncoder2D(input_dim=input_dim, output_dim=output_dim, cnn_layers=layers)


def vae_1d(**kwargs) -> VariationalAutoencoder:
    return VariationalAutoencoder(encoder=encoder_1d(), decoder=decoder_1d(), **{"z_dim": 3, **kwargs})


def vae_2d() -> VariationalAutoencoder:
    return VariationalAutoencoder(encoder_2d(), UpsamplingDecoder2D(base_channels=8, seed_size=4), z_dim=4)


SEED_ENCODER_LAYERS = [
    {"kernel_size": 3, "stride": 1, "padding": 0, "out_channels": [16, 20, 24]},
    {"kernel_size": 4, "stride": 2, "padding": 0, "out_channels": [32, 64]},
]


def seed_decoder(output_dim: list[int] | None) -> ConvolutionalDecoder2D:
    layers = [
        ConsecutiveConvTranspose2DLayer(kernel_size=5, stride=2, padding=0, out_channels=[32]),
        ConsecutiveConvTranspose2DLayer(kernel_size=3, stride=1, padding=0, out_channels=[20, 16, 3], activation=None),
    ]
    return ConvolutionalDecoder2D(input_dim=3, output_dim=output_dim, cnn_input_dim=[64, 28, 28], cnn_layers=layers)


def all_materialised(module: nn.Module) -> bool:
    return not any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters())


# ---- shapes decided at construction ---------------------------------------------------------------------------


def test_seed_decoder_example_reaches_65_not_128():
    with pytest.raises(ValueError, match=r"\[3, 65, 65\].*\[3, 128, 128\]"):
        seed_decoder([3, 128, 128])
    assert seed_decoder([3, 65, 65]).output_dim == (3, 65, 65)


def test_seed_vae_config_error_through_jsonargparse():
    from jsonargparse import ArgumentParser

    config = {
        "model": {
            "class_path": "spherinator.models.VariationalAutoencoder",
            "init_args": {
                "encoder": {
                    "class_path": "spherinator.models.ConvolutionalEncoder2D",
                    "init_args": {
                        "input_dim": [3, 128, 128],
                        "output_dim": 64,
                        "cnn_layers": [
                            {"class_path": "spherinator.models.ConsecutiveConv2DLayer", "init_args": a}
                            for a in SEED_ENCODER_LAYERS
                        ],
                    },
                },
                "decoder": {
                    "class_path": "spherinator.models.ConvolutionalDecoder2D",
                    "init_args": {
                        "input_dim": 3,
                        "output_dim": [3, 128, 128],
                        "cnn_input_dim": [64, 28, 28],
                        "cnn_layers": [
                            {
                                "class_path": "spherinator.models.ConsecutiveConvTranspose2DLayer",
                                "init_args": {"kernel_size": 5, "stride": 2, "padding": 0, "out_channels": [32]},
                            },
                            {
                                "class_path": "spherinator.models.ConsecutiveConvTranspose2DLayer",
                                "init_args": {
                                    "kernel_size": 3,
                                    "stride": 1,
                                    "padding": 0,
                                    "out_channels": [20, 16, 3],
                                    "activation": None,
                                },
                            },
                        ],
                    },
                },
                "encoder_out_dim": 64,
                "z_dim": 3,
                "beta": 1.0e-3,
                "reconstruction_loss": "torch.nn.MSELoss",
            },
        }
    }
    parser = ArgumentParser()
    parser.add_subclass_arguments(pl.LightningModule, "model")
    cfg = parser.parse_string(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"\[3, 65, 65\].*\[3, 128, 128\]"):
        parser.instantiate(cfg)


def test_encoder_out_dim_mismatch_names_both_values():
    with pytest.raises(ValueError, match=r"encoder_out_dim 12 .* output_dim 8"):
        VariationalAutoencoder(encoder_1d(output_dim=8), decoder_1d(), encoder_out_dim=12)


def test_encoder_out_dim_needed_when_encoder_has_no_output_dim():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(32, 8))
    with pytest.raises(ValueError, match="encoder_out_dim"):
        VariationalAutoencoder(backbone, decoder_1d())
    model = VariationalAutoencoder(backbone, decoder_1d(), encoder_out_dim=8)
    assert model(torch.rand(2, 1, 32)).shape == (2, 1, 32)


def test_decoder_input_dim_must_match_z_dim():
    with pytest.raises(ValueError, match=r"input_dim 5 .* latent size 3"):
        VariationalAutoencoder(encoder_1d(), decoder_1d(input_dim=5), z_dim=3)
    # left out, it follows z_dim; the model materialises its first layer
    model = VariationalAutoencoder(encoder_1d(), decoder_1d(), z_dim=7)
    assert model.decoder.input_dim == 7 and all_materialised(model)


def test_decoder_output_dim_must_match_encoder_input_dim():
    with pytest.raises(ValueError, match=r"\[1, 32\].*\[1, 16\]"):
        VariationalAutoencoder(encoder_1d(input_dim=[1, 16]), decoder_1d(output_dim=[1, 32]))
    # without output_dim, the decoder's reachable shape is checked against the encoder's input
    with pytest.raises(ValueError, match=r"\[1, 32\].*\[1, 16\]"):
        VariationalAutoencoder(encoder_1d(input_dim=[1, 16]), decoder_1d())


@pytest.mark.parametrize(("size", "seed"), [(100, 7), (224, 8), (6, 7)])
def test_upsampling_decoder_rejects_unreachable_sizes(size, seed):
    with pytest.raises(ValueError, match=rf"\[3, {size}, {size}\].*seed_size {seed}"):
        UpsamplingDecoder2D(input_dim=4, output_dim=[3, size, size], base_channels=64, seed_size=seed)


def test_upsampling_decoder_infers_steps_and_halves_channels():
    decoder = UpsamplingDecoder2D(input_dim=4, output_dim=[1, 56, 56], base_channels=32, seed_size=7)
    assert len(decoder.blocks) == 3  # 7 * 2**3 = 56
    out = decoder(torch.randn(2, 4))
    assert out.shape == (2, 1, 56, 56) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="base_channels 4 .* 3 times"):
        UpsamplingDecoder2D(input_dim=4, output_dim=[1, 56, 56], base_channels=4, seed_size=7)


def test_encoder_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"input_dim \[3, 4, 4\]"):
        encoder_2d(input_dim=[3, 4, 4])
    with pytest.raises(ValueError, match=r"input_dim must be 3 positive integers"):
        encoder_2d(input_dim=[16, 16])


def test_layer_stack_structure_and_options():
    layer = ConsecutiveConv2DLayer(kernel_size=3, out_channels=[4, 6], activation=nn.GELU, pooling=nn.MaxPool2d(2))
    kinds = [type(m).__name__ for m in layer]
    assert kinds == ["LazyConv2d", "BatchNorm2d", "GELU", "MaxPool2d"] * 2
    bare = ConsecutiveConv1DLayer(kernel_size=3, out_channels=[4], activation=None, norm=None)
    assert [type(m).__name__ for m in bare] == ["LazyConv1d"]
    with pytest.raises(ValueError, match="out_channels"):
        ConsecutiveConv2DLayer(kernel_size=3, out_channels=[])


# ---- inference of sizes ---------------------------------------------------------------------------------------


def test_lazy_model_without_input_dim_infers_it_from_the_first_batch():
    model = VariationalAutoencoder(encoder_1d(input_dim=None), decoder_1d(), z_dim=3)
    assert model.input_dim is None
    loss = model.training_step(torch.rand(4, 1, 32), 0)
    assert torch.isfinite(loss) and model.input_dim == (1, 32) and all_materialised(model)


def test_autoencoder_latent_follows_encoder_output_dim():
    model = Autoencoder(encoder_1d(output_dim=6), decoder_1d(), reconstruction_loss=nn.L1Loss())
    assert model.z_dim == 6 and model.decoder.input_dim == 6 and all_materialised(model)
    x = torch.rand(3, 1, 32)
    assert model.encode(x).shape == (3, 6) and model(x).shape == x.shape


def test_autoencoder_measures_the_code_size_of_an_encoder_without_output_dim():
    class Backbone(nn.Sequential):
        input_dim = (1, 32)

    model = Autoencoder(Backbone(nn.Flatten(), nn.Linear(32, 5)), decoder_1d())
    assert model.z_dim == 5 and model.decoder.input_dim == 5


def test_reconstruction_loss_is_called_prediction_first():
    calls = []

    class Recording(nn.Module):
        def forward(self, prediction, target):
            calls.append((prediction, target))
            return (prediction - target).pow(2).mean()

    model = vae_1d(reconstruction_loss=Recording())
    x = torch.rand(4, 1, 32)
    model.training_step(x, 0)
    assert calls[-1][1] is x and calls[-1][0].requires_grad


# ---- training behaviour ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [vae_1d, vae_2d], ids=["vae1d", "vae2d"])
def test_gradients_reach_every_parameter_and_latents_are_unit_norm(make):
    torch.manual_seed(0)
    model = make()
    x = torch.rand(4, *model.input_dim)
    loss = model.training_step(x, 0)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    z = model.encode(x)
    assert z.shape == (4, model.z_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4))


def test_autoencoder_gradients_reach_every_parameter():
    model = Autoencoder(encoder_2d(), UpsamplingDecoder2D(base_channels=8, seed_size=4))
    model.training_step(torch.rand(4, 3, 16, 16), 0).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_of_one_trains_through_1x1_batchnorm_without_touching_statistics():
    model = vae_2d()  # the encoder's last BatchNorm sees (1, 8, 1, 1) for a batch of one, the centring (1, 4)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert any(isinstance(m, nn.BatchNorm1d) for m in norms)
    before = [m.running_mean.clone() for m in norms]
    loss = model.training_step(torch.rand(1, 3, 16, 16), 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(m.training for m in norms)
    for m, b in zip(norms, before, strict=True):
        torch.testing.assert_close(m.running_mean, b)


def test_a_fresh_vae_spreads_a_batch_over_the_sphere_where_the_uncentred_head_points_one_way():
    """The KL to the uniform prior ignores the locations; the centring gives a batch the prior's mean (zero) from
    the first step, where the bare linear head of positive (ReLU) features points the batch one way."""
    torch.manual_seed(0)
    model = vae_2d()
    x = torch.rand(64, *model.input_dim)
    location, _ = model.encoder(x)
    uncentred = F.normalize(model.encoder.fc_location(model.encoder.encoder(x)), dim=-1)
    assert uncentred.mean(0).norm() > 0.9  # one clump
    assert location.mean(0).norm() < 0.3
    model.eval()  # running statistics: each row's location no longer depends on the rest of its batch
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x[:3]), model.encode(x)[:3])


def test_a_training_batch_too_small_for_batch_statistics_is_centred_with_the_running_ones():
    """Batch statistics of two rows would put them at antipodes whatever the images."""
    torch.manual_seed(0)
    model = vae_1d()
    head = model.encoder
    with torch.no_grad():
        head.centre.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        head.centre.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
        x = torch.rand(2, 1, 32)
        location, _ = head(x)
        pre = head.fc_location(head.encoder(x))
    expected = F.normalize(
        (pre - head.centre.running_mean) / (head.centre.running_var + head.centre.eps).sqrt(), dim=-1
    )
    torch.testing.assert_close(location, expected)
    assert (location[0] + location[1]).norm() > 1e-3  # not antipodal
    torch.testing.assert_close(head.centre.running_mean, torch.tensor([0.1, -0.2, 0.3]))  # left as they were
    assert (
        head.min_batch == 8
        and VariationalAutoencoder(encoder_1d(), decoder_1d(output_dim=None), z_dim=9).encoder.min_batch == 11
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_the_sphere_head_runs_in_the_models_own_dtype(dtype):
    """precision: bf16-true / 64-true cast the model, the centring's statistics with it."""
    model = vae_1d().to(dtype)
    for batch in (16, 2):  # batch statistics, running statistics
        location, scale = model.encoder(torch.rand(batch, 1, 32, dtype=dtype))
        assert location.dtype == scale.dtype == torch.float32 and torch.isfinite(location).all()


def test_a_state_dict_from_before_the_centring_loads_and_encodes_as_it_did():
    torch.manual_seed(0)
    old = vae_1d().eval()
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("encoder.centre.")}
    model = vae_1d()
    model.encoder.centre.running_mean.fill_(5.0)  # the loaded state decides, not these
    model.load_state_dict(state)  # strict: the missing statistics are filled in
    model.eval()
    x = torch.rand(5, 1, 32)
    with torch.no_grad():
        before = F.normalize(old.encoder.fc_location(old.encoder.encoder(x)), dim=-1)
        torch.testing.assert_close(model.encode(x), before)
    with pytest.raises(RuntimeError, match="centre.running_var"):  # a state with the centring must be whole
        vae_1d().load_state_dict({k: v for k, v in old.state_dict().items() if k != "encoder.centre.running_var"})


def test_predict_step_returns_location_scale_and_id_columns():
    model = vae_1d().eval()
    batch = {"data": torch.rand(5, 1, 32), "id": torch.arange(5), "mask": torch.ones(5, 2)}
    out = model.predict_step(batch, 0)
    assert set(out) == {"location", "scale", "id"}
    assert out["location"].shape == (5, 3) and out["scale"].shape == (5,)
    assert (out["scale"] >= 1).all() and torch.equal(out["id"], batch["id"])
    ae_out = Autoencoder(encoder_1d(), decoder_1d()).eval().predict_step(torch.rand(2, 1, 32), 0)
    assert set(ae_out) == {"location"} and ae_out["location"].shape == (2, 8)


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    return quiet_trainer(**{"max_steps": 2, "default_root_dir": tmp_path, **kwargs})


@pytest.mark.parametrize("cls", [VariationalAutoencoder, Autoencoder])
def test_fit_changes_weights_and_checkpoint_reload_gives_identical_outputs(tmp_path, cls):
    torch.manual_seed(0)
    model = cls(encoder=encoder_1d(), decoder=decoder_1d())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = DataLoader(torch.rand(16, 1, 32), batch_size=4)
    trainer = _trainer(tmp_path)
    trainer.fit(model, data)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("encoder" in k for k in changed) and any("decoder" in k for k in changed)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    # built from Python objects, the hparams hold pickled modules: trusted file, so weights_only=False
    loaded = cls.load_from_checkpoint(path, weights_only=False)
    x = torch.rand(6, 1, 32)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)


def test_bf16_mixed_training_step_has_no_nan(tmp_path):
    torch.manual_seed(0)
    model = vae_1d()
    trainer = _trainer(tmp_path, precision="bf16-mixed", max_steps=2)
    trainer.fit(model, DataLoader(torch.rand(8, 1, 32), batch_size=4))
    assert math.isfinite(trainer.callback_metrics["train_loss"].item())
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- HuggingFace ViT encoder (tiny local model) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    path = tmp_path_factory.mktemp("tiny_vit")
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return str(path)


def test_vit_encoder_in_a_vae_takes_shapes_from_its_config(tiny_vit):
    encoder = HuggingFaceViTEncoder(tiny_vit, output_dim=12)
    assert encoder.input_dim == (3, 32, 32) and encoder.output_dim == 12
    model = VariationalAutoencoder(encoder, UpsamplingDecoder2D(base_channels=8, seed_size=4), z_dim=3)
    assert model.encoder_out_dim == 12 and model.decoder.output_dim == (3, 32, 32)
    loss = model.training_step(torch.rand(2, 3, 32, 32), 0)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert HuggingFaceViTEncoder(tiny_vit).output_dim == 16  # no projection: the hidden size


def test_vit_encoder_freeze_keeps_the_backbone_fixed(tiny_vit):
    encoder = HuggingFaceViTEncoder(tiny_vit, output_dim=4, freeze=True)
    assert not any(p.requires_grad for p in encoder.vit.parameters())
    assert all(p.requires_grad for p in encoder.projection.parameters())


def test_vit_encoder_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load ViT"):
        HuggingFaceViTEncoder(str(tmp_path / "missing"))


# ---- numeric hyperparameters are refused at construction, naming the value ------------------------------------


@pytest.mark.parametrize("beta", [-1.0, math.nan, math.inf])
def test_vae_refuses_a_beta_that_is_negative_or_not_finite(beta):
    # a negative beta trained: the loss went below zero by rewarding a large KL
    with pytest.raises(ValueError, match=rf"beta .* finite number >= 0, got {beta}"):
        vae_1d(beta=beta)
    vae_1d(beta=0.0)  # no KL term at all is a plain (spherical) autoencoder


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out_channels": [8, -4]}, r"out_channels \[8, -4\] has -4"),
        ({"out_channels": [8, 0]}, r"out_channels \[8, 0\] has 0"),
        ({"out_channels": [8], "kernel_size": 0}, "kernel_size must be an integer >= 1 .*got 0"),
        ({"out_channels": [8], "stride": 0}, "stride must be an integer >= 1 .*got 0"),
        ({"out_channels": [8], "padding": -1}, "padding must be an integer >= 0 .*got -1"),
    ],
)
@pytest.mark.parametrize(
    "layer",
    [ConsecutiveConv1DLayer, ConsecutiveConv2DLayer, ConsecutiveConvTranspose1DLayer, ConsecutiveConvTranspose2DLayer],
)
def test_conv_stack_refuses_bad_sizes_at_construction(layer, kwargs, message):
    # a negative out_channels ended in a 139-line traceback from the lazy convolution
    with pytest.raises(ValueError, match=rf"{layer.__name__}: {message}"):
        layer(**kwargs)


def test_loss_weights_and_the_kl_schedule_refuse_negative_or_non_finite_values():
    from spherinator.callbacks import KLAnnealing
    from spherinator.losses import CombinedLoss, PerceptualLoss

    with pytest.raises(ValueError, match=r"CombinedLoss: factors \[1.0, -0.5\] has -0.5"):
        CombinedLoss([nn.MSELoss(), nn.L1Loss()], factors=[1.0, -0.5])
    with pytest.raises(ValueError, match=r"CombinedLoss: factors \[nan\] has nan"):
        CombinedLoss([nn.MSELoss()], factors=[math.nan])
    with pytest.raises(ValueError, match=r"PerceptualLoss: weights \[1.0, -1.0\] has -1.0"):  # before any VGG file
        PerceptualLoss(layers=[3, 8], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="KLAnnealing: start is -0.001"):
        KLAnnealing(start=-1e-3, end=1e-3)
    with pytest.raises(ValueError, match="KLAnnealing: end is inf"):
        KLAnnealing(end=math.inf)


# ---- a NaN/inf loss or gradient stops the run before the weights take it (issue #11) ---------------------------


class _NanOnCall(nn.Module):
    """MSE, but ``bad`` (NaN by default) on the ``n``-th call: a training that diverges at a known step."""

    def __init__(self, n: int, bad: float = math.nan) -> None:
        super().__init__()
        self.n, self.bad, self.calls = n, bad, 0

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = nn.functional.mse_loss(prediction, target)
        return loss * self.bad if self.calls == self.n else loss


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


class _NanGradientOnCall(_NanOnCall):
    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            prediction = _NanGradient.apply(prediction)  # the loss stays finite
        return nn.functional.mse_loss(prediction, target)


def _fit_to_divergence(tmp_path, model, data, every: int = 1, **trainer_args) -> str:
    """Fit with checkpoints after every step, at the end and on the exception; the error's message. Every
    checkpoint left must hold finite values, and the model finite weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from spherinator.cli import user_error
    from spherinator.models.autoencoder import NonFiniteLossError

    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1, save_last=True, save_on_exception=True
    )
    trainer = _trainer(tmp_path, max_steps=20, enable_checkpointing=True, callbacks=[checkpoints], **trainer_args)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(model, data)
    assert user_error(info.value) is info.value  # the CLI prints it as one line
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert saved, "the steps before the divergence left their checkpoints"
    for path in saved:
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path.name
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the weights never took the step
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_reconstruction_loss_stops_training_and_names_step_term_and_fix(tmp_path, bad):
    # (before: training went on with NaN weights and saved them in every later checkpoint)
    torch.manual_seed(0)
    model = vae_1d(reconstruction_loss=_NanOnCall(4, bad))
    message = _fit_to_divergence(tmp_path, model, DataLoader(torch.rand(32, 1, 32), batch_size=4))
    assert f"train batch 3 of epoch 0 (step 3): the reconstruction loss is {bad} (KL term " in message
    assert "before this step changes the weights" in message
    assert "optimizer.init_args.lr, now 0.001" in message and "gradient_clip_val" in message


def test_a_non_finite_kl_term_is_named(tmp_path, monkeypatch):
    from spherinator.models import autoencoder

    calls, kl_divergence = [], autoencoder.kl_divergence

    def kl_inf_on_third(q, p):
        calls.append(1)
        return kl_divergence(q, p) * (math.inf if len(calls) == 3 else 1.0)

    monkeypatch.setattr(autoencoder, "kl_divergence", kl_inf_on_third)
    torch.manual_seed(0)
    message = _fit_to_divergence(tmp_path, vae_1d(), DataLoader(torch.rand(32, 1, 32), batch_size=4))
    assert "train batch 2 of epoch 0 (step 2): the KL term is inf (reconstruction loss " in message


def test_a_finite_loss_with_non_finite_gradients_stops_before_the_optimizer_step(tmp_path):
    torch.manual_seed(0)
    model = Autoencoder(encoder_1d(), decoder_1d(), reconstruction_loss=_NanGradientOnCall(3))
    message = _fit_to_divergence(tmp_path, model, DataLoader(torch.rand(32, 1, 32), batch_size=4))
    assert "train batch 2 of epoch 0 (step 2): the loss is finite (reconstruction loss " in message
    assert "but the gradient of 'encoder.cnn.0." in message


def test_a_forward_pass_that_overflows_leaves_no_checkpoint_of_its_batchnorm_statistics(tmp_path):
    # values of extreme size (finite, so the data check lets them through) overflow BatchNorm's variance: the
    # refused step's forward pass has already written inf into the running statistics, and the checkpoint on the
    # exception (the last one was at step 2) would save them
    torch.manual_seed(0)
    model = vae_2d()
    images = torch.rand(16, 3, 16, 16)
    images[12:16] = 1e30
    message = _fit_to_divergence(tmp_path, model, DataLoader(images, batch_size=4), every=2)
    assert message.startswith("not saving a checkpoint at step 3 (epoch 0): 'encoder.")
    assert "is not finite after train batch 3 of epoch 0 (step 3): the reconstruction loss is " in message


def test_a_non_finite_validation_loss_is_named(tmp_path):
    torch.manual_seed(0)
    model = vae_1d()
    val = torch.rand(8, 1, 32)
    val[5] = 1e30
    trainer = _trainer(tmp_path, max_steps=2, num_sanity_val_steps=0)
    from spherinator.models.autoencoder import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"val batch 1 of epoch 0: the reconstruction loss is inf .*val data"):
        trainer.fit(model, DataLoader(torch.rand(8, 1, 32), batch_size=4), DataLoader(val, batch_size=4))
    # the sanity check runs before any step
    trainer = _trainer(tmp_path, max_steps=2, num_sanity_val_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"val batch 1 of epoch 0: .* is inf .*; no step ran, so look at"):
        trainer.fit(model, DataLoader(torch.rand(8, 1, 32), batch_size=4), DataLoader(val, batch_size=4))


def test_weights_grown_until_batchnorm_statistics_overflow_are_not_saved(tmp_path):
    # lr 1e8: every loss stayed finite, but BatchNorm's running variance of the huge activations became inf
    from spherinator.models.autoencoder import NonFiniteLossError

    torch.manual_seed(0)
    model = vae_2d()
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(model, DataLoader(torch.rand(8, 3, 16, 16), batch_size=4))
    model.encoder.encoder.cnn[0][1].running_var.fill_(math.inf)
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \(epoch 1\): 'encoder\..*running_var' is not finite after "
                       r"finite losses, with weights up to .*; lower the learning rate"):  # fmt: skip
        trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def test_a_non_finite_posterior_is_named_instead_of_the_distributions_constraint_error(tmp_path):
    # (before: "Expected parameter loc ... to satisfy the constraint IndependentConstraint(Real(), 1)", 110 lines)
    from spherinator.models.autoencoder import NonFiniteLossError

    torch.manual_seed(0)
    data = torch.rand(12, 1, 32)
    data[5, 0, 7] = math.inf  # batch 1: what a model sees from data a DataLoader of our own did not check
    trainer = _trainer(tmp_path, max_steps=5)
    expected = r"train batch 1 of epoch 0 \(step 1\): the encoder's posterior is not finite \(location nan"
    with pytest.raises(NonFiniteLossError, match=expected):
        trainer.fit(vae_1d(), DataLoader(data, batch_size=4))


def test_a_diverged_step_outside_a_trainer_is_refused_with_the_plain_fix():
    """The finiteness check reads the trainer through Lightning's public property, which raises when none is
    attached: a module used on its own still gets its one-line NonFiniteLossError, without the learning rate."""
    from spherinator.models.autoencoder import NonFiniteLossError

    model = Autoencoder(encoder_1d(), decoder_1d())
    model._check_finite("train", {"loss": torch.tensor(float("nan"))})
    with pytest.raises(NonFiniteLossError, match=r"loss is nan.*\(optimizer.init_args.lr\), clip"):
        model.on_before_optimizer_step(torch.optim.SGD(model.parameters(), lr=0.1))


# -- MLP (upstream's) ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [[], [5], [6, 4]])
def test_mlp_flattens_and_stacks_linear_layers(hidden):
    from spherinator.models import MLP

    net = MLP(input_size=12, hidden_sizes=hidden, output_size=3)
    linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == list(zip([12, *hidden], [*hidden, 3], strict=True))
    assert net(torch.randn(2, 3, 4)).shape == (2, 3)  # a (3, 4) row is flattened to its 12 values
    with pytest.raises(ValueError, match=r"MLP: a row of shape \(5,\) has 5 values; input_size is 12"):
        net(torch.randn(2, 5))


def test_mlp_refuses_a_size_that_is_no_positive_integer():
    from spherinator.errors import ConfigError
    from spherinator.models import MLP

    with pytest.raises(ConfigError, match=r"MLP: sizes must be positive integers, got 0 in \[4, 0, 2\]"):
        MLP(input_size=4, hidden_sizes=[0], output_size=2)
