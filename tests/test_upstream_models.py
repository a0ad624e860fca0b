"""Upstream Spherinator's model side: its encoders, YAML forms, saved run configs, transfer learning, metric names
and the W&B logger. Tiny random stand-ins for hub models, written locally; never the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from spherinator.cli import main
from spherinator.errors import ConfigError
from spherinator.models import (
    MLP,
    ConsecutiveConv2DLayer,
    ConsecutiveConvTranspose2DLayer,
    ConvolutionalDecoder2D,
    ConvolutionalEncoder2D,
    HuggingFaceEncoder,
    HuggingFaceResNetEncoder,
    HuggingFaceViTEncoder,
    Sequential,
    UpsamplingDecoder2D,
    VariationalAutoencoder,
    WeightsProvider,
)
from spherinator.models.transfer import drop_weight_sources
from tests.conftest import quiet_trainer

CLI_CONFIG = Path(__file__).parent / "configs" / "upstream" / "cli-config.yaml"


def tiny_resnet_config():
    from transformers import ResNetConfig

    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory) -> str:
    from transformers import ResNetModel

    path = tmp_path_factory.mktemp("tiny_resnet")
    ResNetModel(tiny_resnet_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory) -> str:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    path = tmp_path_factory.mktemp("tiny_vit_auto")
    ViTModel(config).save_pretrained(path)
    return str(path)


def encoder(**kwargs) -> ConvolutionalEncoder2D:
    layers = [ConsecutiveConv2DLayer(kernel_size=4, stride=2, padding=1, out_channels=[4, 8])]
    return ConvolutionalEncoder2D(**{"input_dim": [3, 16, 16], "output_dim": 6, "cnn_layers": layers, **kwargs})


def decoder(**kwargs) -> ConvolutionalDecoder2D:
    layers = [ConsecutiveConvTranspose2DLayer(kernel_size=4, stride=2, padding=1, out_channels=[3], norm=None)]
    return ConvolutionalDecoder2D(**{"input_dim": 3, "cnn_input_dim": [4, 8, 8], "cnn_layers": layers, **kwargs})


# ---- Hugging Face encoders through the Auto classes ------------------------------------------------------------


def test_resnet_encoder_pools_projects_and_freezes_like_upstream(tiny_resnet):
    enc = HuggingFaceResNetEncoder(tiny_resnet, output_dim=5, freeze=True)
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 5) and enc.input_dim is None  # any image size
    assert not any(p.requires_grad for p in enc.resnet.parameters())
    assert all(p.requires_grad for p in enc.projection.parameters())
    assert enc.example_input_array.shape == (1, 3, 128, 128)
    # upstream's state-dict names (resnet.*), and no projection when output_dim is the feature size
    assert all(k.startswith(("resnet.", "projection.")) for k in enc.state_dict())
    same = HuggingFaceResNetEncoder(tiny_resnet, output_dim=16)
    assert isinstance(same.projection, nn.Identity) and same(torch.rand(1, 3, 24, 24)).shape == (1, 16)


def test_generic_encoder_takes_any_vision_backbone_and_its_shape(tiny_vit_dir, tiny_resnet):
    vit = HuggingFaceEncoder(tiny_vit_dir, output_dim=4)
    assert vit.input_dim == (3, 32, 32) and vit(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    cls = HuggingFaceEncoder(tiny_vit_dir, pooling="cls")
    mean = HuggingFaceEncoder(tiny_vit_dir, pooling="mean")
    x = torch.rand(2, 3, 32, 32)
    hidden = cls.backbone(pixel_values=x).last_hidden_state
    torch.testing.assert_close(cls(x), hidden[:, 0])
    torch.testing.assert_close(mean(x), mean.backbone(pixel_values=x).last_hidden_state.mean(dim=1))
    with pytest.raises(ConfigError, match=r"takes images of shape \[3, 32, 32\], not input_dim \[3, 64, 64\]"):
        HuggingFaceEncoder(tiny_vit_dir, input_dim=[3, 64, 64])
    resnet = HuggingFaceEncoder(tiny_resnet, input_dim=[3, 24, 24])
    assert resnet.input_dim == (3, 24, 24) and resnet.output_dim == 16


def test_an_unknown_model_name_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load Hugging Face model .*save_pretrained"):
        HuggingFaceResNetEncoder(str(tmp_path / "missing"))


@pytest.mark.slow  # a fresh interpreter importing transformers: tens of seconds on a loaded machine
def test_hub_ids_resolve_offline_from_the_hugging_face_cache(tmp_path, tiny_resnet, tiny_vit_dir):
    # The upstream defaults (microsoft/resnet-18, google/vit-base-patch16-224) from a cache laid out as the hub
    # writes it; HF_HOME is read when huggingface_hub is imported, hence the fresh interpreter.
    for repo, source in (("microsoft/resnet-18", tiny_resnet), ("google/vit-base-patch16-224", tiny_vit_dir)):
        base = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
        snapshot = base / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        for file in Path(source).iterdir():
            (snapshot / file.name).write_bytes(file.read_bytes())
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text("0" * 40)
    code = (
        "import json, torch\n"
        "from spherinator.models import HuggingFaceResNetEncoder, HuggingFaceViTEncoder\n"
        "r = HuggingFaceResNetEncoder(output_dim=4)\n"
        "v = HuggingFaceViTEncoder()\n"
        "print(json.dumps([list(r(torch.rand(1, 3, 40, 40)).shape), v.output_dim, list(v.input_dim)]))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[1, 4], 16, [3, 32, 32]]


# ---- Sequential composition -----------------------------------------------------------------------------------


def test_sequential_decoder_as_upstream_writes_it_trains_in_a_vae(tiny_resnet):
    # HEAD illustris.yaml's decoder: Linear(z_dim -> 256) then UpsamplingDecoder2D(input_dim 256), here smaller
    dec = Sequential(
        [nn.Linear(3, 12), UpsamplingDecoder2D(input_dim=12, output_dim=[3, 32, 32], base_channels=8, seed_size=4)]
    )
    assert dec.input_dim == 3 and dec.output_dim == (3, 32, 32)
    enc = HuggingFaceResNetEncoder(tiny_resnet, output_dim=10)
    model = VariationalAutoencoder(enc, dec, encoder_out_dim=10, z_dim=3)
    loss = model.training_step(torch.rand(4, 3, 32, 32), 0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="takes 3 features but the latent size .* is 5"):
        VariationalAutoencoder(encoder(), Sequential([nn.Linear(3, 12), nn.Linear(12, 4)]), z_dim=5)


def test_upstream_illustris_model_section_runs_a_fit_step(tmp_path, monkeypatch, tiny_resnet, image_dataset):
    monkeypatch.chdir(tmp_path)
    model = {
        "class_path": "spherinator.models.VariationalAutoencoder",
        "init_args": {
            "encoder": {
                "class_path": "spherinator.models.HuggingFaceResNetEncoder",
                "init_args": {"model_name": tiny_resnet, "output_dim": 16},
            },
            "decoder": {
                "class_path": "spherinator.models.Sequential",
                "init_args": {
                    "modules": [
                        {"class_path": "torch.nn.Linear", "init_args": {"in_features": 3, "out_features": 16}},
                        {
                            "class_path": "spherinator.models.UpsamplingDecoder2D",
                            "init_args": {
                                "input_dim": 16,
                                "output_dim": [3, 32, 32],
                                "base_channels": 8,
                                "seed_size": 4,
                            },
                        },
                    ]
                },
            },
            "z_dim": 3,
            "beta": 1.0e-2,
            "encoder_out_dim": 16,
        },
    }
    data = {"class_path": "spherinator.data.DataModule", "init_args": {"path": str(image_dataset), "batch_size": 8}}
    trainer = {"accelerator": "cpu", "max_steps": 1, "limit_val_batches": 1, "logger": False}
    config = tmp_path / "illustris.yaml"
    config.write_text(yaml.safe_dump({"model": model, "data": data, "trainer": trainer}))
    main(
        ["fit", "-c", str(config), "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"]
    )


def test_mlp_as_upstream_has_it_and_as_a_vae_decoder_through_sequential(tmp_path):
    for hidden in ([], [2], [3, 2]):
        assert MLP(input_size=2, hidden_sizes=hidden, output_size=3)(torch.randn(2, 2)).shape == (2, 3)
    mlp = MLP(input_size=3, hidden_sizes=[8], output_size=3 * 16 * 16)
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    dec = Sequential(
        [MLP(3, [8], 3 * 16 * 16, weights=str(tmp_path / "mlp.pt"), freeze=True), nn.Unflatten(1, (3, 16, 16))]
    )
    model = VariationalAutoencoder(encoder(), dec, z_dim=3)
    z = torch.rand(2, 3)
    torch.testing.assert_close(model.decode(z), mlp(z).reshape(2, 3, 16, 16))
    assert not any(p.requires_grad for p in dec.parameters())
    with pytest.raises(ConfigError, match="sizes must be positive integers, got 0"):
        MLP(3, [0], 4)


# ---- a saved upstream run config loads unchanged ----------------------------------------------------------------


def test_a_saved_upstream_cli_config_trains_with_weights_and_monitors_upstream_names(
    tmp_path, monkeypatch, image_dataset
):
    monkeypatch.chdir(tmp_path)
    saved = yaml.safe_load(CLI_CONFIG.read_text())
    # the data section's upstream-only keys (validation_size, test_size, in_gpu_memory) are the data side's work
    saved["data"]["init_args"] = {"path": str(image_dataset), "batch_size": 4}
    config = tmp_path / "cli-config.yaml"
    config.write_text(yaml.safe_dump(saved))
    start = encoder(input_dim=[3, 32, 32], output_dim=8)
    start.cnn[0][0].weight.data.fill_(0.01)  # recognisable starting weights
    torch.save(start.state_dict(), tmp_path / "encoder.pt")
    main(["fit", "-c", str(config), "--trainer.default_root_dir", str(tmp_path / "out"),
          "--model.init_args.encoder.init_args.weights", str(tmp_path / "encoder.pt"),
          "--model.init_args.decoder.init_args.freeze", "true"])  # fmt: skip
    (ckpt,) = (tmp_path / "out").rglob("*.ckpt")  # its ModelCheckpoint monitored train_loss_recon
    content = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert sorted(weights_values(content["hyper_parameters"])) == ["None", "None"]  # encoder's and decoder's
    started = content["state_dict"]["encoder.encoder.cnn.0.0.weight"]  # one Adam step (lr 1e-3) from 0.01
    torch.testing.assert_close(started, torch.full_like(started, 0.01), atol=2e-3, rtol=0)
    frozen = VariationalAutoencoder.load_from_checkpoint(ckpt, map_location="cpu").decoder
    assert not any(p.requires_grad for p in frozen.parameters())
    (tmp_path / "encoder.pt").unlink()  # the checkpoint no longer needs the file it started from
    restored = VariationalAutoencoder.load_from_checkpoint(ckpt, map_location="cpu")
    assert restored.encoder.max_scale == float("inf")  # max_scale: null, no bound


def weights_values(tree: object) -> list[str]:
    """Every value of a ``weights`` key in a nested hyperparameter tree, as text."""
    found: list[str] = []
    if hasattr(tree, "items"):
        for key, value in tree.items():
            found += [str(value)] if key == "weights" else weights_values(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            found += weights_values(value)
    return found


def test_upstream_layer_options_activation_norm_class_paths_and_max_scale_null_parse():
    from jsonargparse import ArgumentParser

    layer = yaml.safe_load(CLI_CONFIG.read_text())["model"]["init_args"]["decoder"]["init_args"]["cnn_layers"][0]
    layer["init_args"].update(output_padding=1, dilation=1, bias=False)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(nn.Module, "layer")
    built = parser.instantiate(parser.parse_object({"layer": layer})).layer
    conv, norm, act = built[0], built[1], built[2]
    assert isinstance(norm, nn.BatchNorm2d) and isinstance(act, nn.ReLU) and conv.bias is None
    assert built(torch.rand(1, 2, 5, 5)).shape == (1, 4, 11, 11)  # (5 - 1) * 2 - 2 + 4 + output_padding 1


# ---- weights and freeze on every encoder and decoder ------------------------------------------------------------


def test_weights_from_a_state_dict_a_checkpoint_and_a_provider_give_the_same_module(tmp_path):
    torch.manual_seed(0)
    model = VariationalAutoencoder(encoder(), decoder(), z_dim=3)
    torch.save(model.encoder.encoder.state_dict(), tmp_path / "enc.pt")
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6"}, tmp_path / "run.ckpt")
    x = torch.rand(2, 3, 16, 16)
    want_enc, want_dec = model.encoder.encoder.eval()(x), model.decoder.eval()(torch.rand(2, 3))
    z = torch.rand(2, 3)
    want_dec = model.decoder(z)
    for weights in (
        tmp_path / "enc.pt",
        tmp_path / "run.ckpt",
        WeightsProvider(str(tmp_path / "run.ckpt"), "encoder.encoder"),
    ):
        torch.testing.assert_close(
            encoder(weights=str(weights) if isinstance(weights, Path) else weights).eval()(x), want_enc
        )
    for dec in (
        decoder(weights=str(tmp_path / "run.ckpt")),
        decoder(weights=WeightsProvider(str(tmp_path / "run.ckpt"), "decoder")),
    ):
        torch.testing.assert_close(dec.eval()(z), want_dec)
    # lazy layers (no input_dim) take their shapes from the weights
    lazy = encoder(input_dim=None, weights=str(tmp_path / "enc.pt"))
    torch.testing.assert_close(lazy.eval()(x), want_enc)
    up = UpsamplingDecoder2D(input_dim=3, output_dim=[3, 16, 16], base_channels=8, seed_size=4)
    torch.save(up.state_dict(), tmp_path / "up.pt")
    again = UpsamplingDecoder2D(
        input_dim=3, output_dim=[3, 16, 16], base_channels=8, seed_size=4, weights=str(tmp_path / "up.pt")
    )
    torch.testing.assert_close(again.eval()(z), up.eval()(z))


def test_an_upstream_vit_encoders_weights_load_without_its_unused_pooler(tmp_path, tiny_vit_dir):
    from transformers import ViTModel

    torch.manual_seed(1)
    vit = ViTModel.from_pretrained(tiny_vit_dir)  # with the pooler, as upstream builds it
    projection = nn.Linear(16, 4)
    state = {f"encoder.vit.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"encoder.projection.{k}": v for k, v in projection.state_dict().items()}
    state["sphere_head.fc_location.weight"] = torch.zeros(3, 4)  # upstream's other modules, left alone
    assert any(".pooler." in k for k in state)
    torch.save({"state_dict": state}, tmp_path / "upstream.ckpt")
    enc = HuggingFaceViTEncoder(tiny_vit_dir, output_dim=4, weights=str(tmp_path / "upstream.ckpt")).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), projection(vit.eval()(pixel_values=x).last_hidden_state[:, 0]))


def test_weights_that_do_not_fit_are_one_config_error(tmp_path):
    torch.save(encoder().state_dict(), tmp_path / "enc.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        encoder(weights=str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match="no part of .* has this module's parameter names"):
        decoder(weights=str(tmp_path / "enc.pt"))
    with pytest.raises(ConfigError, match="do not fit this module"):
        encoder(output_dim=7, weights=str(tmp_path / "enc.pt"))
    with pytest.raises(ConfigError, match="no entry .* starts with prefix 'decoder'"):
        WeightsProvider(str(tmp_path / "enc.pt"), prefix="decoder")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        encoder(weights=str(tmp_path / "text.pt"))
    with pytest.raises(ConfigError, match="need output_dim"):
        UpsamplingDecoder2D(weights=str(tmp_path / "enc.pt"))


def test_freeze_fixes_every_parameter_even_lazy_ones_and_training_leaves_them():
    enc = encoder(input_dim=None, freeze=True)  # lazy: materialised at the first batch
    dec = decoder(input_dim=None, freeze=True)
    model = VariationalAutoencoder(enc, dec, z_dim=3)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("decoder.")}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.training_step(torch.rand(4, 3, 16, 16), 0).backward()
    optimizer.step()
    assert not any(p.requires_grad for p in [*enc.parameters(), *dec.parameters()])
    assert model.encoder.fc_location.weight.requires_grad
    for k, v in model.state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k])


def test_drop_weight_sources_touches_only_transfer_settings():
    tree = {"encoder": {"init_args": {"weights": "a.ckpt", "freeze": True}}, "loss": {"weights": [1.0, 2.0]}}
    assert drop_weight_sources(tree) == {
        "encoder": {"init_args": {"weights": None, "freeze": True}},
        "loss": {"weights": [1.0, 2.0]},
    }


# ---- max_scale: null, fixed_scale, upstream metric names -----------------------------------------------------


def test_max_scale_null_leaves_the_concentration_unbounded():
    model = VariationalAutoencoder(encoder(), decoder(), z_dim=3, max_scale=None)
    model.encoder.fc_scale.bias.data.fill_(1e6)
    assert model.encoder(torch.rand(2, 3, 16, 16))[1].min() > 1e5


def test_fixed_scale_is_a_concentration_that_is_not_learned():
    # v0.5.1: fc_scale's weights zeroed and frozen, bias = fixed_scale: concentration softplus(fixed_scale) + 1
    model = VariationalAutoencoder(encoder(), decoder(), z_dim=3, fixed_scale=2.0)
    _, scale = model.encoder(torch.rand(4, 3, 16, 16) * 10)
    torch.testing.assert_close(scale, torch.full((4,), float(F.softplus(torch.tensor(2.0)) + 1)))
    assert not any(p.requires_grad for p in model.encoder.fc_scale.parameters())
    with pytest.raises(ConfigError, match="fixed_scale must be a finite number"):
        VariationalAutoencoder(encoder(), decoder(), z_dim=3, fixed_scale=float("nan"))


def test_upstream_metric_names_are_logged_beside_ours(image_dataset):
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.rand(16, 3, 16, 16)
    loader = DataLoader(TensorDataset(x), batch_size=8)
    model = VariationalAutoencoder(encoder(), decoder(), z_dim=3, beta=0.5)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, log_every_n_steps=1)
    trainer.fit(model, loader, loader)
    metrics = trainer.callback_metrics
    for name in ("train_loss_recon", "train_loss_KL", "mean(z_scale)", "max(z_scale)", "learning_rate"):
        assert name in metrics, name
    for name in ("val_loss_recon", "val_loss_KL", "val_loss", "val_recon", "val_kl"):
        assert name in metrics, name
    torch.testing.assert_close(metrics["val_loss_recon"], metrics["val_recon"])
    torch.testing.assert_close(metrics["val_loss_KL"], 0.5 * metrics["val_kl"])  # upstream logs beta * KL


# ---- the W&B logger -----------------------------------------------------------------------------------------------


def test_the_wandb_logger_without_wandb_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys, image_dataset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import wandb fails, find_spec is None
    data = {"class_path": "spherinator.data.DataModule", "init_args": {"path": str(image_dataset)}}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"data": data}))
    tiny = str(Path(__file__).parent / "configs" / "vae_tiny.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", tiny, "-c", str(tmp_path / "d.yaml"), "--trainer.logger", "WandbLogger"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'spherinator[wandb]'" in err, err


@pytest.mark.slow  # an offline W&B run starts its service process
def test_the_run_config_goes_into_the_wandb_runs_files(tmp_path, monkeypatch, image_dataset):
    wandb = pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = {"class_path": "spherinator.data.DataModule", "init_args": {"path": str(image_dataset), "batch_size": 32}}
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": str(tmp_path / "wb")}}
    overlay = {"data": data, "trainer": {"logger": logger, "max_steps": 1, "limit_val_batches": 1}}
    (tmp_path / "o.yaml").write_text(yaml.safe_dump(overlay))
    tiny = str(Path(__file__).parent / "configs" / "vae_tiny.yaml")
    main(["fit", "-c", tiny, "-c", str(tmp_path / "o.yaml")])
    wandb.finish()  # W&B writes its own files at the end of a run: ours must survive that
    configs = list((tmp_path / "wb").rglob("config.yaml"))
    in_run = [p for p in configs if p.parent.name == "files" and "model" in yaml.safe_load(p.read_text())]
    assert len(in_run) == 1, configs
    assert not (tmp_path / "wb" / "config.yaml").exists()


def test_consecutive_conv_layers_build_an_untrained_twin_with_get_model():
    # Upstream's layer objects were factories: its users call layer.get_model() and expect a fresh module.
    conv = ConsecutiveConv2DLayer(out_channels=[3], pooling=nn.MaxPool2d(2))
    model = conv.get_model()
    assert type(model) is ConsecutiveConv2DLayer and model is not conv
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3, 15, 15)
    conv(torch.randn(2, 3, 32, 32))
    assert all(p is not q for p in conv.parameters() for q in model.parameters())
    twin = ConsecutiveConvTranspose2DLayer(out_channels=[2], stride=2, output_padding=1, bias=False).get_model()
    assert twin(torch.randn(1, 4, 5, 5)).shape == (1, 2, 12, 12) and twin[0].bias is None


def test_a_torchvision_encoder_with_upstreams_positional_list_decoder_arguments():
    # Upstream's test_resnet: a torchvision classifier as encoder (encoder_out_dim = its classes) and
    # ConvolutionalDecoder2D(z_dim, output_dim, cnn_input_dim) with lists; its 4-tuple is forward_sampled here.
    torchvision = pytest.importorskip("torchvision")
    from spherinator.models import VariationalAutoencoder

    decoder = ConvolutionalDecoder2D(3, [3, 32, 32], [3, 32, 32])
    model = VariationalAutoencoder(torchvision.models.resnet18(num_classes=10), decoder, encoder_out_dim=10, z_dim=3)
    x = torch.randn(2, 3, 32, 32)
    (loc, scale), _, _, recon = model.forward_sampled(x)
    assert loc.shape == (2, 3) and scale.shape == (2, 1) and recon.shape == x.shape == model(x).shape
