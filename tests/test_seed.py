"""The user documentation ("Spherinator: Model Training", the file :data:`SEED_DOC`) works as written.

Every YAML snippet of the document is copied below verbatim and fed through the real code path (jsonargparse and
``spherinator fit``) on CPU against tiny local data. A test changes only what cannot run here and says so: cluster
data paths become the test fixtures, the hub ViT id becomes a tiny ViT saved locally, ``accelerator: gpu`` becomes
``cpu``, ``max_epochs: 500`` becomes one short epoch.
"""

from __future__ import annotations

import csv
import gc
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelSummary
from torch import nn

from spherinator.cli import SpherinatorCLI, main
from spherinator.models import (
    Autoencoder,
    ConvolutionalDecoder1D,
    ConvolutionalEncoder1D,
    ConvolutionalEncoder2D,
    HuggingFaceViTEncoder,
    UpsamplingDecoder2D,
    VariationalAutoencoder,
    VariationalEncoder,
)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TINY = str(Path(__file__).parent / "configs" / "vae_tiny.yaml")

# The user documentation, by its file name: it is kept beside the project, not in this repository.
SEED_DOC = "000_47631038dedf7531.txt"


def find_seed_doc() -> Path | None:
    """:data:`SEED_DOC` in ``$SPHERINATOR_SEED_DIR``, else in a ``docs/``, ``seed/`` or ``shared/seed/`` folder of
    the checkout or a folder above it; None where there is none."""
    folders = [Path(os.environ["SPHERINATOR_SEED_DIR"])] if os.environ.get("SPHERINATOR_SEED_DIR") else []
    folders += [base / sub for base in (ROOT, *ROOT.parents) for sub in ("docs", "seed", "shared/seed")]
    return next((folder / SEED_DOC for folder in folders if (folder / SEED_DOC).is_file()), None)


# ---- the seed's snippets, verbatim ------------------------------------------------------------------------------

DATA_SNIPPET = """\
data:
  class_path: spherinator.data.DataModule
  init_args:
    path: ./data/illustris_SKIRT_synthetic_images/parquet-128
    columns:
      - name: data
        transform:
          class_path: torchvision.transforms.v2.Resize
          init_args:
            size: 224
    return_dict: False
    batch_size: 16
    shuffle: True
    num_workers: 4
"""

AE_SNIPPET = """\
model:
  class_path: spherinator.models.Autoencoder
  init_args:
    encoder:
      class_path: ...
    decoder:
      class_path: ...
    reconstruction_loss: torch.nn.MSELoss
"""

VAE_SNIPPET = """\
model:
  class_path: spherinator.models.VariationalAutoencoder
  init_args:
    encoder:
      class_path: ...   # any encoder below
    decoder:
      class_path: ...   # any decoder below
    encoder_out_dim: 64 # must match encoder output_dim
    z_dim: 3            # latent space dimensionality
    beta: 1.0e-3        # KL weight (beta-VAE)
    reconstruction_loss: torch.nn.MSELoss
"""

ENCODER_SNIPPET = """\
encoder:
  class_path: spherinator.models.ConvolutionalEncoder2D
  init_args:
    input_dim: [3, 128, 128]
    output_dim: 64
    cnn_layers:
      - class_path: spherinator.models.ConsecutiveConv2DLayer
        init_args:
          kernel_size: 3
          stride: 1
          padding: 0
          out_channels: [16, 20, 24]
      - class_path: spherinator.models.ConsecutiveConv2DLayer
        init_args:
          kernel_size: 4
          stride: 2
          padding: 0
          out_channels: [32, 64]
"""

VIT_SNIPPET = """\
encoder:
  class_path: spherinator.models.HuggingFaceViTEncoder
  init_args:
    model_name: google/vit-base-patch16-224
    output_dim: 64
    freeze: False
"""

DECODER_SNIPPET = """\
decoder:
  class_path: spherinator.models.ConvolutionalDecoder2D
  init_args:
    input_dim: 3
    output_dim: [3, 128, 128]
    cnn_input_dim: [64, 28, 28]
    cnn_layers:
      - class_path: spherinator.models.ConsecutiveConvTranspose2DLayer
        init_args:
          kernel_size: 5
          stride: 2
          padding: 0
          out_channels: [32]
      - class_path: spherinator.models.ConsecutiveConvTranspose2DLayer
        init_args:
          kernel_size: 3
          stride: 1
          padding: 0
          out_channels: [20, 16, 3]
          activation: null
"""

UPSAMPLING_SNIPPET = """\
decoder:
  class_path: spherinator.models.UpsamplingDecoder2D
  init_args:
    input_dim: 64
    output_dim: [3, 224, 224]
    base_channels: 512
    seed_size: 7
"""

PERCEPTUAL_SNIPPET = """\
reconstruction_loss:
  class_path: spherinator.losses.PerceptualLoss
  init_args:
    layers: [3, 8, 15]   # VGG-16 layer indices to tap
    weights: [1.0, 1.0, 1.0]  # per-layer loss weights
"""

COMBINED_SNIPPET = """\
reconstruction_loss:
  class_path: spherinator.losses.CombinedLoss
  init_args:
    losses:
      - class_path: torch.nn.MSELoss
      - class_path: spherinator.losses.PerceptualLoss
        init_args:
          layers: [3, 8, 15]
          weights: [1.0, 1.0, 1.0]
    factors: [1.0, 0.1]
"""

OPTIMIZER_SNIPPET = """\
optimizer:
  class_path: torch.optim.Adam
  init_args:
    lr: 0.001
"""

TRAINER_SNIPPET = """\
trainer:
  max_epochs: 500
  accelerator: gpu
  devices: auto
  precision: bf16-mixed
  enable_progress_bar: True
  enable_model_summary: True
"""

WANDB_SNIPPET = """\
# experiments/wandb.yaml
trainer:
  logger:
    class_path: lightning.pytorch.loggers.WandbLogger
    init_args:
      project: spherinator
      log_model: True
      entity: <your-wandb-entity>
      tags:
        - my_experiment
"""

LOG_RECONSTRUCTIONS_SNIPPET = """\
# experiments/callback_log_reconstructions.yaml
trainer:
  callbacks:
    - class_path: spherinator.callbacks.LogReconstructionCallback
      init_args:
        samples: 6
"""

KL_ANNEALING_SNIPPET = """\
trainer:
  callbacks:
    - class_path: spherinator.callbacks.KLAnnealing
      init_args:
        start: 0.0
        end: 1.0e-2
        n_epochs: 500
        n_cycles: 4
        ratio: 0.5
"""

BEST_MODEL_SNIPPET = """\
# experiments/callback_best_model.yaml
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        monitor: train_loss
        filename: "{epoch}-{train_loss:.2f}"
        save_top_k: 1
        mode: min
        every_n_epochs: 1
"""


# ---- helpers ----------------------------------------------------------------------------------------------------


def load(snippet: str) -> dict[str, Any]:
    return yaml.safe_load(snippet)


def write(path: Path, config: dict[str, Any] | str) -> str:
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return str(path)


def data_config(path: Path, size: int | None, **init_args: Any) -> dict[str, Any]:
    """The seed's data snippet reading ``path``, resized to ``size`` (None: no transform)."""
    config = load(DATA_SNIPPET)
    args = config["data"]["init_args"]
    args["path"] = str(path)
    if size is None:
        args["columns"] = ["data"]
    else:
        args["columns"][0]["transform"]["init_args"]["size"] = size
    args.update(init_args)
    return config


def test_trainer(**options: Any) -> dict[str, Any]:
    """One short CPU epoch (the seed's runs are long GPU runs)."""
    trainer = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "limit_train_batches": 1,
        "limit_val_batches": 1,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return {"trainer": {**trainer, **options}}


test_trainer.__test__ = False  # a helper, not a test


def model_config(snippet: str, encoder: dict[str, Any], decoder: dict[str, Any]) -> dict[str, Any]:
    """The seed's model snippet with its ``class_path: ...`` placeholders filled."""
    config = load(snippet)
    init_args = config["model"]["init_args"]
    assert init_args["encoder"] == {"class_path": "..."} and init_args["decoder"] == {"class_path": "..."}
    init_args["encoder"], init_args["decoder"] = encoder, decoder
    return config


def instantiate(key: str, config: dict[str, Any], base: type = nn.Module) -> Any:
    """Build ``config[key]`` the way LightningCLI does (jsonargparse subclass arguments)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, key)
    return getattr(parser.instantiate(parser.parse_object(config)), key)


def latest_checkpoint(root: Path) -> Path:
    return max(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def assert_trained(cli: SpherinatorCLI, before: dict[str, torch.Tensor] | None = None) -> None:
    loss = cli.trainer.callback_metrics["train_loss"]
    assert torch.isfinite(loss), f"train_loss is {loss}"
    assert cli.trainer.global_step >= 1
    if before is not None:
        after = params(cli.model)
        assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed in a training step"


def test_the_snippets_are_the_documentations_own_text():
    doc = find_seed_doc()
    if doc is None:
        pytest.skip(f"the documentation {SEED_DOC} is not here: set SPHERINATOR_SEED_DIR to the folder that holds it")
    text = doc.read_text()
    snippets = {name: value for name, value in globals().items() if name.endswith("_SNIPPET")}
    assert len(snippets) == 15
    assert [name for name, snippet in snippets.items() if snippet not in text] == []


def test_installed_package_provides_the_spherinator_command():
    """`pip install spherinator` gives the distribution and the `spherinator` command used throughout."""
    from importlib.metadata import distribution

    from spherinator.commands import main as command_main

    dist = distribution("spherinator")
    (command,) = [ep for ep in dist.entry_points if ep.group == "console_scripts" and ep.name == "spherinator"]
    assert command.load() is command_main


# ---- DataModule ---------------------------------------------------------------------------------------------------


def test_data_snippet_as_written(image_dataset, tmp_path, monkeypatch):
    # The snippet's relative path, pointing at the test images: the snippet itself is not changed at all.
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "data" / "illustris_SKIRT_synthetic_images" / "parquet-128"
    link.parent.mkdir(parents=True)
    link.symlink_to(image_dataset)
    data = instantiate("data", load(DATA_SNIPPET), LightningDataModule)
    assert (data.batch_size, data.shuffle, data.num_workers, data.return_dict) == (16, True, 4, False)
    assert data.sample_shape() == (3, 224, 224)
    loader = data.train_dataloader()
    assert loader.num_workers == 4
    batches = list(loader)  # a whole epoch: an iterator left mid-epoch makes its 4 workers slow to shut down
    batch = batches[0]
    assert sum(len(b) for b in batches) == data.split_rows("train")
    assert isinstance(batch, torch.Tensor)  # return_dict False: the first column's tensor itself
    assert batch.shape == (16, 3, 224, 224) and batch.dtype == torch.float32
    assert batch.min() >= 0.0 and batch.max() <= 1.0 and batch.max() > 0.5  # uint8 images scaled to [0, 1]
    del loader, batches, batch
    gc.collect()  # stop the 4 persistent workers now: collected later, inside another test, they took ~20 s


def test_data_return_dict_and_shuffle(image_dataset):
    config = data_config(image_dataset, 48, return_dict=True, num_workers=0, val_fraction=0.0)
    config["data"]["init_args"]["columns"].append({"name": "id"})
    data = instantiate("data", config, LightningDataModule)
    epochs = []
    for _ in range(2):
        ids = []
        for batch in data.train_dataloader():
            assert isinstance(batch, dict) and list(batch) == ["data", "id"]  # keyed by column name, in order
            assert batch["data"].shape[1:] == (3, 48, 48) and len(batch["data"]) <= 16
            assert batch["id"].dtype == torch.int64 and batch["id"].shape == (len(batch["data"]),)
            ids += batch["id"].tolist()
        epochs.append(ids)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(96))  # every row once per epoch
    assert epochs[0] != list(range(96)) and epochs[0] != epochs[1]  # shuffled, differently each epoch
    # return_dict False on the same columns: the first column (the model input) alone
    config["data"]["init_args"]["return_dict"] = False
    batch = next(iter(instantiate("data", config, LightningDataModule).train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (16, 3, 48, 48)


# ---- models -------------------------------------------------------------------------------------------------------


def test_seed_decoder_reaches_65_not_128_and_says_so(image_dataset, tmp_path, capsys):
    # The seed's ConvolutionalDecoder2D: 28 -(k5,s2)-> 59 -(k3)-> 61 -> 63 -> 65, so [3, 128, 128] is unreachable.
    config = model_config(VAE_SNIPPET, load(ENCODER_SNIPPET)["encoder"], load(DECODER_SNIPPET)["decoder"])
    data = write(tmp_path / "data.yaml", data_config(image_dataset, 128, num_workers=0))
    with pytest.raises(SystemExit):
        main(["fit", "-c", write(tmp_path / "seed.yaml", config), "-c", data])
    err = capsys.readouterr().err  # one line, no traceback
    assert "Traceback" not in err and re.search(r"spherinator: error: .*\[3, 65, 65\].*\[3, 128, 128\]", err)
    with pytest.raises(ValueError, match=r"\[3, 65, 65\].*\[3, 128, 128\]"):
        instantiate("decoder", load(DECODER_SNIPPET))


def test_vae_snippet_with_seed_encoder_and_decoder_at_65(image_dataset, tmp_path, monkeypatch):
    """The seed's VAE, encoder and decoder snippets with only the image size changed to the one they reach."""
    monkeypatch.chdir(tmp_path)
    model = write(tmp_path / "model.yaml", seed_vae_at_65())
    data = write(tmp_path / "data.yaml", data_config(image_dataset, 65, batch_size=4, num_workers=0))
    cli = SpherinatorCLI(args=["fit", "-c", model, "-c", data, "-c", write(tmp_path / "t.yaml", test_trainer())])
    assert_trained(cli)
    vae = cli.model.eval()
    assert isinstance(vae, VariationalAutoencoder) and (vae.z_dim, vae.beta) == (3, 1.0e-3)
    assert isinstance(vae.reconstruction_loss, nn.MSELoss)
    # The encoder: 5 lazy convolutions (16, 20, 24 with k3 s1; 32, 64 with k4 s2), BatchNorm + ReLU after each.
    backbone = vae.encoder.encoder
    assert isinstance(backbone, ConvolutionalEncoder2D) and backbone.output_dim == 64
    convs = [m for m in backbone.cnn.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (16, (3, 3), (1, 1), (0, 0)), (20, (3, 3), (1, 1), (0, 0)), (24, (3, 3), (1, 1), (0, 0)),
        (32, (4, 4), (2, 2), (0, 0)), (64, (4, 4), (2, 2), (0, 0)),
    ]  # fmt: skip
    assert sum(isinstance(m, nn.BatchNorm2d) for m in backbone.cnn.modules()) == 5
    assert sum(isinstance(m, nn.ReLU) for m in backbone.cnn.modules()) == 5
    assert backbone.fc.in_features == 64 * 13 * 13  # 65 -> 63, 61, 59 -> 28 -> 13
    # activation: null on the last decoder block: no activation after the 20/16/3 transposed convolutions
    last_block = vae.decoder.cnn[1]
    assert not any(isinstance(m, nn.ReLU) for m in last_block) and isinstance(last_block[-1], nn.BatchNorm2d)
    assert isinstance(vae.decoder.cnn[0][-1], nn.ReLU)
    # VariationalEncoder: fc_location -> centred per axis -> unit-norm location of size z_dim, fc_scale -> softplus + 1
    assert isinstance(vae.encoder, VariationalEncoder)
    assert (vae.encoder.fc_location.in_features, vae.encoder.fc_location.out_features) == (64, 3)
    assert (vae.encoder.fc_scale.in_features, vae.encoder.fc_scale.out_features) == (64, 1)
    x = torch.rand(2, 3, 65, 65)
    with torch.no_grad():
        location, scale = vae.encoder(x)
        h = backbone(x)
        torch.testing.assert_close(location, F.normalize(vae.encoder.centre(vae.encoder.fc_location(h)), dim=-1))
        torch.testing.assert_close(scale, F.softplus(vae.encoder.fc_scale(h)).squeeze(-1) + 1)
        assert vae(x).shape == x.shape
    torch.testing.assert_close(location.norm(dim=1), torch.ones(2))  # z_dim 3: on the sphere S^2
    assert (scale >= 1).all()


def seed_vae_at_65() -> dict[str, Any]:
    """The seed's VAE, encoder and decoder snippets for 65x65 images (the size the decoder reaches)."""
    encoder = load(ENCODER_SNIPPET)["encoder"]
    decoder = load(DECODER_SNIPPET)["decoder"]
    encoder["init_args"]["input_dim"] = decoder["init_args"]["output_dim"] = [3, 65, 65]
    return model_config(VAE_SNIPPET, encoder, decoder)


def test_encoder_out_dim_must_match_encoder_output_dim():
    config = seed_vae_at_65()
    config["model"]["init_args"]["encoder"]["init_args"]["output_dim"] = 32
    with pytest.raises(ValueError, match=r"encoder_out_dim 64.*output_dim 32"):
        instantiate("model", config, LightningModule)


def test_max_scale_bounds_the_concentration():
    config = seed_vae_at_65()
    config["model"]["init_args"]["max_scale"] = 2.0
    vae = instantiate("model", config, LightningModule).eval()
    with torch.no_grad():
        vae.encoder.fc_scale.bias.fill_(100.0)  # softplus + 1 would be about 101
        location, scale = vae.encoder(torch.rand(2, 3, 65, 65))
    assert scale.tolist() == [2.0, 2.0]
    torch.testing.assert_close(location.norm(dim=1), torch.ones(2))


def test_autoencoder_snippet_with_seed_encoder_trains_at_128(image_dataset, tmp_path, monkeypatch):
    """The Autoencoder snippet, the seed's encoder as written, and a decoder variant that does reach 128x128."""
    monkeypatch.chdir(tmp_path)
    decoder = load(DECODER_SNIPPET)["decoder"]
    decoder["init_args"]["input_dim"] = 64  # an autoencoder's code is the encoder's output (64), not z_dim 3
    decoder["init_args"]["cnn_input_dim"] = [64, 60, 60]
    decoder["init_args"]["cnn_layers"][0]["init_args"]["kernel_size"] = 4  # 60 -(k4,s2)-> 122 -> 124, 126, 128
    model = write(tmp_path / "model.yaml", model_config(AE_SNIPPET, load(ENCODER_SNIPPET)["encoder"], decoder))
    data = write(tmp_path / "data.yaml", data_config(image_dataset, 128, batch_size=4, num_workers=0))
    cli = SpherinatorCLI(args=["fit", "-c", model, "-c", data, "-c", write(tmp_path / "t.yaml", test_trainer())])
    ae = cli.model
    assert isinstance(ae, Autoencoder) and not isinstance(ae, VariationalAutoencoder)
    assert isinstance(ae.reconstruction_loss, nn.MSELoss) and ae.z_dim == 64
    assert_trained(cli)
    ae.eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (2, 64)  # deterministic: the code itself, not on a sphere, no sampling
        torch.testing.assert_close(ae(x), ae.decode(z))
        torch.testing.assert_close(ae(x), ae(x), rtol=0, atol=0)
    assert ae(x).shape == x.shape


def test_conv2d_layer_arguments(tmp_path):
    """kernel_size, stride, padding, out_channels, activation (incl. null), norm (incl. null), pooling."""
    encoder = {
        "class_path": "spherinator.models.ConvolutionalEncoder2D",
        "init_args": {
            "input_dim": [3, 32, 32],
            "output_dim": 5,
            "cnn_layers": [
                {
                    "class_path": "spherinator.models.ConsecutiveConv2DLayer",
                    "init_args": {
                        "kernel_size": 3, "stride": 1, "padding": 1, "out_channels": [8, 6],
                        "activation": "torch.nn.GELU", "norm": "torch.nn.InstanceNorm2d",
                        "pooling": {"class_path": "torch.nn.MaxPool2d", "init_args": {"kernel_size": 2}},
                    },
                },  # 32 -> conv 32 -> pool 16 -> conv 16 -> pool 8
                {
                    "class_path": "spherinator.models.ConsecutiveConv2DLayer",
                    "init_args": {"kernel_size": 3, "stride": 2, "padding": 0, "out_channels": [4],
                                  "activation": None, "norm": None},
                },  # 8 -> 3
                {"class_path": "spherinator.models.ConsecutiveConv2DLayer", "init_args": {"out_channels": [7]}},
            ],  # defaults: kernel 3, stride 1, padding 0, BatchNorm2d, ReLU: 3 -> 1
        },
    }  # fmt: skip
    built = instantiate("encoder", {"encoder": encoder})
    first, second, third = built.cnn
    assert [type(m) for m in first] == [nn.Conv2d, nn.InstanceNorm2d, nn.GELU, nn.MaxPool2d] * 2
    assert [(m.out_channels, m.kernel_size, m.stride, m.padding) for m in first if isinstance(m, nn.Conv2d)] == [
        (8, (3, 3), (1, 1), (1, 1)), (6, (3, 3), (1, 1), (1, 1)),
    ]  # fmt: skip
    assert [type(m) for m in second] == [nn.Conv2d] and second[0].stride == (2, 2) and second[0].padding == (0, 0)
    assert [type(m) for m in third] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert (third[0].kernel_size, third[0].stride, third[0].padding) == ((3, 3), (1, 1), (0, 0))
    x = torch.rand(2, 3, 32, 32)
    assert first(x).shape == (2, 6, 8, 8) and second(first(x)).shape == (2, 4, 3, 3)
    assert built.fc.in_features == 7 * 1 * 1 and built(x).shape == (2, 5)
    built(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in built.parameters())


CNN1D_VAE = """\
model:
  class_path: spherinator.models.VariationalAutoencoder
  init_args:
    encoder:
      class_path: spherinator.models.ConvolutionalEncoder1D
      init_args:
        input_dim: [1, 64]
        output_dim: 16
        cnn_layers:
          - class_path: spherinator.models.ConsecutiveConv1DLayer
            init_args: {kernel_size: 4, stride: 2, padding: 1, out_channels: [8, 16]}
    decoder:
      class_path: spherinator.models.ConvolutionalDecoder1D
      init_args:
        input_dim: 3
        output_dim: [1, 64]
        cnn_input_dim: [16, 16]
        cnn_layers:
          - class_path: spherinator.models.ConsecutiveConvTranspose1DLayer
            init_args: {kernel_size: 4, stride: 2, padding: 1, out_channels: [8]}
          - class_path: spherinator.models.ConsecutiveConvTranspose1DLayer
            init_args: {kernel_size: 4, stride: 2, padding: 1, out_channels: [1], activation: null, norm: null}
    encoder_out_dim: 16
    z_dim: 3
"""


def test_conv1d_encoder_and_decoder_train_on_spectra(spectrum_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write(tmp_path / "data.yaml", data_config(spectrum_dataset, None, batch_size=8, num_workers=0))
    model = write(tmp_path / "model.yaml", CNN1D_VAE)
    cli = SpherinatorCLI(args=["fit", "-c", model, "-c", data, "-c", write(tmp_path / "t.yaml", test_trainer())])
    assert_trained(cli)
    vae = cli.model.eval()
    assert isinstance(vae.encoder.encoder, ConvolutionalEncoder1D) and isinstance(vae.decoder, ConvolutionalDecoder1D)
    convs = [type(m) for m in vae.modules() if isinstance(m, nn.Conv1d | nn.ConvTranspose1d)]
    assert convs == [nn.Conv1d, nn.Conv1d, nn.ConvTranspose1d, nn.ConvTranspose1d]
    assert any(isinstance(m, nn.BatchNorm1d) for m in vae.encoder.modules())
    x = torch.rand(3, 1, 64)
    with torch.no_grad():
        assert vae(x).shape == (3, 1, 64)
        torch.testing.assert_close(vae.encode(x).norm(dim=1), torch.ones(3))


def test_upsampling_decoder_snippet_infers_five_steps_to_224():
    decoder = instantiate("decoder", load(UPSAMPLING_SNIPPET)).eval()
    assert isinstance(decoder, UpsamplingDecoder2D) and decoder.fc.in_features == 64
    assert len(decoder.blocks) == 5  # 7 * 2**5 = 224
    convs = [block[1] for block in decoder.blocks]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(512, 256), (256, 128), (128, 64), (64, 32), (32, 16)]
    for block in decoder.blocks:  # bilinear 2x upsample, 3x3 convolution, BatchNorm, ReLU
        assert [type(m) for m in block] == [nn.Upsample, nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
        assert block[0].scale_factor == 2 and block[0].mode == "bilinear" and block[1].kernel_size == (3, 3)
    head_conv, head_act = decoder.head
    assert (head_conv.in_channels, head_conv.out_channels, head_conv.kernel_size) == (16, 3, (1, 1))
    assert isinstance(head_act, nn.Sigmoid)
    with torch.no_grad():
        x_hat = decoder(torch.randn(1, 64))
    assert x_hat.shape == (1, 3, 224, 224) and x_hat.min() > 0 and x_hat.max() < 1


@pytest.mark.parametrize(("seed_size", "size", "steps"), [(7, 56, 3), (4, 32, 3), (4, 4, 0), (5, 80, 4)])
def test_upsampling_steps_follow_output_size(seed_size, size, steps):
    config = load(UPSAMPLING_SNIPPET)
    config["decoder"]["init_args"].update(output_dim=[1, size, size], base_channels=16, seed_size=seed_size)
    decoder = instantiate("decoder", config)
    assert len(decoder.blocks) == steps
    assert decoder(torch.randn(2, 64)).shape == (2, 1, size, size)


# ---- HuggingFaceViTEncoder ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """A 1-layer ViT for 224x224 inputs (hidden size 32) saved with save_pretrained: nothing from the hub."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    path = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


def vit_snippet(tiny_vit: Path, **init_args: Any) -> dict[str, Any]:
    config = load(VIT_SNIPPET)
    config["encoder"]["init_args"].update(model_name=str(tiny_vit), **init_args)
    return config


def test_vit_snippet_projects_the_cls_token(tiny_vit):
    encoder = instantiate("encoder", vit_snippet(tiny_vit)).eval()
    assert isinstance(encoder, HuggingFaceViTEncoder) and encoder.output_dim == 64
    assert all(p.requires_grad for p in encoder.parameters())  # freeze: False
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        cls = encoder.vit(pixel_values=x).last_hidden_state[:, 0]  # (2, 32)
        out = encoder(x)
    assert out.shape == (2, 64)
    torch.testing.assert_close(out, encoder.projection(cls))


def test_vit_output_dim_null_uses_hidden_size(tiny_vit):
    encoder = instantiate("encoder", vit_snippet(tiny_vit, output_dim=None)).eval()
    assert encoder.output_dim == 32
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), encoder.vit(pixel_values=x).last_hidden_state[:, 0])


def test_vit_freeze_true_leaves_no_trainable_backbone_parameter(tiny_vit):
    encoder = instantiate("encoder", vit_snippet(tiny_vit, freeze=True))
    assert not any(p.requires_grad for p in encoder.vit.parameters())
    assert all(p.requires_grad for p in encoder.projection.parameters())
    encoder(torch.rand(2, 3, 224, 224)).sum().backward()
    assert all(p.grad is None for p in encoder.vit.parameters())
    assert encoder.projection.weight.grad.abs().sum() > 0


# ---- losses ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    """A random-initialised torchvision VGG-16 state dict (the ImageNet file cannot be downloaded here)."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    features = vgg16(weights=None).features.state_dict()  # torchvision's key names; the classifier is not used
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    return path


@pytest.fixture
def vgg_cache(vgg_file, tmp_path, monkeypatch) -> Path:
    """torchvision's weights cache holding the VGG file, so the snippets need no weights_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "vgg16-397923af.pth").symlink_to(vgg_file)
    return vgg_file


def fit_with_loss(tmp_path: Path, images: Path, snippet: str) -> SpherinatorCLI:
    """``spherinator fit`` of the tiny VAE with the seed's ``reconstruction_loss`` snippet; checks it trained."""
    data = write(tmp_path / "data.yaml", data_config(images, None, batch_size=4, num_workers=0))
    loss = write(tmp_path / "loss.yaml", {"model": {"init_args": load(snippet)}})
    trainer = write(tmp_path / "t.yaml", test_trainer())
    cli = SpherinatorCLI(args=["fit", "-c", TINY, "-c", data, "-c", loss, "-c", trainer])
    assert_trained(cli)
    return cli


def test_perceptual_loss_snippet_trains_a_vae(vgg_cache, image_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = fit_with_loss(tmp_path, image_dataset, PERCEPTUAL_SNIPPET)
    loss = cli.model.reconstruction_loss
    assert type(loss).__name__ == "PerceptualLoss" and loss.layers == [3, 8, 15] and loss.weights == [1.0] * 3
    assert all(isinstance(loss.vgg[i], nn.ReLU) for i in (3, 8, 15))  # outputs of the first three ReLU blocks
    reference = torch.load(vgg_cache, weights_only=True)
    torch.testing.assert_close(loss.vgg[14].weight, reference["features.14.weight"])  # frozen VGG-16 weights
    assert not any(p.requires_grad for p in loss.vgg.parameters())
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    # the MSE between VGG activations at the tapped layers, on ImageNet-normalised inputs
    vgg = nn.Sequential(*list(loss.vgg)[:16])
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    fa, fb, expected = (a - mean) / std, (b - mean) / std, 0.0
    for i, module in enumerate(vgg):
        fa, fb = module(fa), module(fb)
        if i in (3, 8, 15):
            expected = expected + F.mse_loss(fa, fb)
    torch.testing.assert_close(loss(a, b), expected)
    # single-channel inputs are broadcast to three channels
    g1, g2 = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(loss(g1, g2), loss(g1.expand(-1, 3, -1, -1), g2.expand(-1, 3, -1, -1)))
    assert loss(a, a.clone()).item() == 0.0


def test_perceptual_loss_defaults(vgg_cache):
    from spherinator.losses import PerceptualLoss

    loss = PerceptualLoss()
    assert loss.layers == [3, 8, 15] and loss.weights == [1.0, 1.0, 1.0]


def test_combined_loss_snippet_is_the_weighted_sum(vgg_cache, image_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = fit_with_loss(tmp_path, image_dataset, COMBINED_SNIPPET)
    loss = cli.model.reconstruction_loss
    assert type(loss).__name__ == "CombinedLoss" and loss.factors == [1.0, 0.1]
    mse, perceptual = loss.losses
    assert isinstance(mse, nn.MSELoss) and type(perceptual).__name__ == "PerceptualLoss"
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loss(a, b), F.mse_loss(a, b) + 0.1 * perceptual(a, b))
    bad = load(COMBINED_SNIPPET)
    bad["reconstruction_loss"]["init_args"]["factors"] = [1.0]
    with pytest.raises(ValueError, match=r"1 factors.*2 losses"):
        instantiate("reconstruction_loss", bad)


# ---- optimizer and trainer --------------------------------------------------------------------------------------


def test_optimizer_and_trainer_snippets_train_in_bf16(image_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write(tmp_path / "data.yaml", data_config(image_dataset, None, batch_size=8, num_workers=0))
    optimizer = write(tmp_path / "optimizer.yaml", OPTIMIZER_SNIPPET)
    trainer = write(tmp_path / "trainer.yaml", TRAINER_SNIPPET)
    # vae_tiny.yaml says lr 0.003, no progress bar, no summary: the snippets, given later, must win.
    cli = SpherinatorCLI(
        args=[
            "fit", "-c", TINY, "-c", data, "-c", optimizer, "-c", trainer,
            "--trainer.accelerator", "cpu",  # the snippet's `gpu`: this machine has none
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        ]
    )  # fmt: skip
    assert_trained(cli)
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.trainer.progress_bar_callback is not None
    assert any(isinstance(cb, ModelSummary) for cb in cli.trainer.callbacks)  # RichModelSummary when rich is there
    (opt,) = cli.trainer.optimizers
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.001
    assert cli.trainer.global_step == 2


@pytest.mark.parametrize(("precision", "expected"), [("32", "32-true"), ("16-mixed", None), ("bf16-mixed", None)])
def test_precision_options_are_accepted(precision, expected, image_dataset, tmp_path):
    data = write(tmp_path / "data.yaml", data_config(image_dataset, None, num_workers=0))
    cli = SpherinatorCLI(args=["-c", TINY, "-c", data, "--trainer.precision", precision], run=False)
    # 16-mixed on a CPU: Lightning uses bf16-mixed instead (fp16 autocast needs a GPU), with a warning
    assert cli.trainer.precision == (expected or ("bf16-mixed" if "mixed" in precision else precision))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the seed's trainer snippet says accelerator: gpu")
def test_trainer_snippet_as_written_on_gpu(image_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write(tmp_path / "data.yaml", data_config(image_dataset, None, num_workers=0))
    trainer = write(tmp_path / "trainer.yaml", TRAINER_SNIPPET)
    cli = SpherinatorCLI(
        args=["fit", "-c", TINY, "-c", data, "-c", trainer, "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    )  # fmt: skip
    assert_trained(cli)
    assert cli.trainer.precision == "bf16-mixed" and cli.model.device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="--trainer.devices [0,1] needs two GPUs")
def test_devices_0_1_trains_on_two_gpus(image_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write(tmp_path / "data.yaml", data_config(image_dataset, None, num_workers=0))
    main(
        ["fit", "-c", TINY, "-c", data, "--trainer.accelerator", "gpu", "--model.init_args.z_dim", "16",
         "--trainer.devices", "[0,1]", "--trainer.max_epochs", "1"]
    )  # fmt: skip
    assert list(tmp_path.rglob("*.ckpt"))


# ---- W&B and callbacks: the experiments/ files and the complete examples ----------------------------------------


@pytest.mark.parametrize(
    ("name", "snippet"),
    [
        ("wandb.yaml", WANDB_SNIPPET),
        ("callback_log_reconstructions.yaml", LOG_RECONSTRUCTIONS_SNIPPET),
        ("callback_best_model.yaml", BEST_MODEL_SNIPPET),
    ],
)
def test_experiment_files_are_the_seed_snippets(name, snippet):
    assert load((EXPERIMENTS / name).read_text()) == load(snippet)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def test_complete_cnn_example_with_wandb_and_best_model(wandb_offline, image_dataset, tmp_path, monkeypatch):
    """spherinator fit -c vae_cnn3.yaml -c illustris_small.yaml -c wandb.yaml -c callback_best_model.yaml"""
    monkeypatch.chdir(tmp_path)
    overlay = data_config(image_dataset, 128, batch_size=4, num_workers=0)  # the test images as 128x128
    overlay.update(test_trainer(max_epochs=2))
    files = ["vae_cnn3.yaml", "illustris_small.yaml", "wandb.yaml", "callback_best_model.yaml"]
    args = [a for name in files for a in ("-c", str(EXPERIMENTS / name))]
    cli = SpherinatorCLI(args=["fit", *args, "-c", write(tmp_path / "test.yaml", overlay)])
    assert_trained(cli)
    assert cli.model.input_dim == (3, 128, 128)
    logger = cli.trainer.logger
    assert type(logger).__name__ == "WandbLogger"
    assert logger.experiment.project == "spherinator" and list(logger.experiment.tags) == ["my_experiment"]
    assert list(tmp_path.rglob("*.wandb")), "no offline W&B run was written"
    (checkpoint,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ModelCheckpoint"]
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_top_k) == ("train_loss", "min", 1)
    (kept,) = tmp_path.rglob("*.ckpt")  # save_top_k 1 over two epochs
    assert re.fullmatch(r"epoch=[01]-train_loss=\d+\.\d\d\.ckpt", kept.name), kept.name
    assert kept.name.endswith(f"-train_loss={checkpoint.best_model_score:.2f}.ckpt")  # the lowest train_loss


def test_wandb_run_keeps_its_own_config_yaml(wandb_offline, image_dataset, tmp_path, monkeypatch):
    # Lightning wrote config.yaml to the logger's save_dir, shared by every run there (the second run's replaced
    # the first's) and part of no W&B run: each run's config goes into its own W&B files folder.
    monkeypatch.chdir(tmp_path)
    data = write(tmp_path / "data.yaml", data_config(image_dataset, None, batch_size=8, num_workers=0))
    args = ["fit", "-c", TINY, "-c", data, "-c", str(EXPERIMENTS / "wandb.yaml"), "-c", write(tmp_path / "t.yaml",
            test_trainer()), "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]  # fmt: skip
    runs = []
    for z_dim in (3, 4):
        cli = SpherinatorCLI(args=[*args, "--model.init_args.z_dim", str(z_dim)])
        runs.append(Path(cli.trainer.logger.experiment.dir))
        cli.trainer.logger.experiment.finish()
    assert runs[0] != runs[1]
    for run, z_dim in zip(runs, (3, 4), strict=True):
        assert load((run / "config.yaml").read_text())["model"]["init_args"]["z_dim"] == z_dim
    assert not (tmp_path / "logs" / "config.yaml").exists()


def test_complete_vit_example_logs_reconstructions_to_wandb(wandb_offline, tiny_vit, image_dataset, tmp_path):
    """spherinator fit -c vae_vit.yaml -c illustris_small.yaml -c wandb.yaml -c callback_log_reconstructions.yaml"""
    from PIL import Image

    overlay = data_config(image_dataset, None, batch_size=4, num_workers=0)
    del overlay["data"]["init_args"]["columns"]  # keep vae_vit.yaml's Resize to 224
    overlay.update(test_trainer(limit_val_batches=2, default_root_dir=str(tmp_path)))
    files = ["vae_vit.yaml", "illustris_small.yaml", "wandb.yaml", "callback_log_reconstructions.yaml"]
    args = [a for name in files for a in ("-c", str(EXPERIMENTS / name))]
    cli = SpherinatorCLI(
        args=[
            "fit", *args, "-c", write(tmp_path / "test.yaml", overlay),
            "--model.init_args.encoder.init_args.model_name", str(tiny_vit),  # not the hub's ViT-Base
            "--model.init_args.decoder.init_args.base_channels", "32",  # 512 is slow on a CPU; the steps are the same
            "--trainer.logger.init_args.save_dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert_trained(cli)
    assert cli.model.input_dim == (3, 224, 224) and len(cli.model.decoder.blocks) == 5
    (callback,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LogReconstructionCallback"]
    assert callback.samples == 6
    (png,) = tmp_path.rglob("media/images/reconstructions*.png")
    width, height = Image.open(png).size
    assert (width, height) == (6 * (224 + 2) + 2, 2 * (224 + 2) + 2)  # 6 originals above 6 reconstructions


def test_kl_annealing_snippet_sets_and_logs_beta(image_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write(tmp_path / "data.yaml", data_config(image_dataset, None, batch_size=8, num_workers=0))
    annealing = write(tmp_path / "kl.yaml", KL_ANNEALING_SNIPPET)
    cli = SpherinatorCLI(
        args=[
            "fit", "-c", TINY, "-c", data, "-c", annealing, "-c", write(tmp_path / "t.yaml", test_trainer()),
            "--trainer.max_epochs", "3",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", "logs",
        ]
    )  # fmt: skip

    # the seed: 4 cycles over 500 epochs (125 each), ramping linearly from 0 to 1e-2 over the first half of each
    def seed_beta(epoch: int) -> float:
        return 1.0e-2 * min((epoch % 125) / (0.5 * 125), 1.0) if epoch < 500 else 1.0e-2

    (metrics,) = tmp_path.rglob("metrics.csv")
    with open(metrics) as f:
        logged = {int(r["epoch"]): float(r["beta"]) for r in csv.DictReader(f) if r.get("beta")}
    assert logged == pytest.approx({e: seed_beta(e) for e in range(3)})
    assert cli.model.beta == pytest.approx(seed_beta(2))
    (callback,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "KLAnnealing"]
    for epoch in (0, 31, 62, 63, 100, 124, 125, 150, 187, 250, 300, 375, 437, 499, 500, 600):
        assert callback.beta(epoch) == pytest.approx(seed_beta(epoch)), epoch


# ---- the command lines ------------------------------------------------------------------------------------------


class _ParseOnly(SpherinatorCLI):
    """The CLI's parser alone: for command lines that name cluster paths or GPUs."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


@pytest.fixture(scope="module")
def fit_run(image_dataset, tmp_path_factory) -> Path:
    """`spherinator fit -c config.yaml --model.init_args.z_dim 16 --trainer.max_epochs 1`, the real command."""
    root = tmp_path_factory.mktemp("fit-run")
    config = load(Path(TINY).read_text())
    config.update(data_config(image_dataset, None, batch_size=32, num_workers=0))
    config["trainer"].update(max_epochs=2, limit_val_batches=1)
    write(root / "config.yaml", config)
    command = Path(sys.executable).with_name("spherinator")
    args = [str(command), "fit", "-c", "config.yaml", "--model.init_args.z_dim", "16", "--trainer.max_epochs", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_fit_command_with_inline_overrides(fit_run):
    version = fit_run / "runs" / "spherinator" / "version_0"
    saved = load((version / "config.yaml").read_text())
    assert saved["model"]["init_args"]["z_dim"] == 16 and saved["trainer"]["max_epochs"] == 1
    (ckpt,) = (version / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["epoch"] == 0
    assert state["state_dict"]["encoder.fc_location.weight"].shape == (16, 16)  # z_dim 16 (x encoder output 16)


def test_resume_command(fit_run, monkeypatch):
    """`spherinator fit -c config.yaml --ckpt_path path/to/checkpoint.ckpt` (config.yaml says max_epochs 2)."""
    monkeypatch.chdir(fit_run)
    (ckpt,) = (fit_run / "runs" / "spherinator" / "version_0" / "checkpoints").glob("*.ckpt")
    first = torch.load(ckpt, map_location="cpu", weights_only=False)
    main(["fit", "-c", "config.yaml", "--ckpt_path", str(ckpt.relative_to(fit_run))])
    (resumed,) = (fit_run / "runs" / "spherinator" / "version_1" / "checkpoints").glob("*.ckpt")
    state = torch.load(resumed, map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 2 * first["global_step"]  # one more epoch, not two
    # the checkpoint's model (z_dim 16) is resumed, though config.yaml alone would build z_dim 3
    assert state["state_dict"]["encoder.fc_location.weight"].shape == (16, 16)


def test_devices_command_line_parses(fit_run):
    """`--trainer.devices [0,1]` needs two GPUs to run (test_devices_0_1_trains_on_two_gpus); here: it parses."""
    cli = _ParseOnly(
        args=["-c", str(fit_run / "config.yaml"), "--model.init_args.z_dim", "16", "--trainer.devices", "[0,1]",
              "--trainer.max_epochs", "100"],
        run=False,
    )  # fmt: skip
    assert cli.config.trainer.devices == [0, 1]
    assert cli.config.trainer.max_epochs == 100 and cli.config.model.init_args.z_dim == 16


def test_chained_configs_compose_later_over_earlier():
    """`spherinator fit -c experiments/illustris.yaml -c experiments/vae_vit.yaml -c experiments/wandb.yaml`"""
    args = [a for n in ("illustris.yaml", "vae_vit.yaml", "wandb.yaml") for a in ("-c", str(EXPERIMENTS / n))]
    config = _ParseOnly(args=args, run=False).config
    data = config.data.init_args
    assert data.path == "./data/illustris_SKIRT_synthetic_images/parquet-128" and data.batch_size == 32  # illustris
    (column,) = data.columns  # vae_vit.yaml adds the resize to the ViT's 224x224
    assert column.name == "data" and column.transform.init_args.size == 224
    assert config.model.init_args.encoder.class_path == "spherinator.models.HuggingFaceViTEncoder"
    assert config.trainer.logger.class_path == "lightning.pytorch.loggers.WandbLogger"
    later = _ParseOnly(args=[*args, "-c", str(EXPERIMENTS / "illustris_small.yaml")], run=False).config
    assert later.data.init_args.path.endswith("parquet-128-small") and later.data.init_args.batch_size == 16


def test_callback_files_chained_keep_both_callbacks():
    """ "Callbacks are appended as additional YAML files": two callback files give two callbacks."""
    files = ("vae_cnn3.yaml", "illustris_small.yaml", "callback_log_reconstructions.yaml", "callback_best_model.yaml")
    args = [a for n in files for a in ("-c", str(EXPERIMENTS / n))]
    callbacks = _ParseOnly(args=args, run=False).config.trainer.callbacks
    assert [cb.class_path for cb in callbacks] == [
        "spherinator.callbacks.SphereQuality",  # vae_cnn3.yaml's own
        "spherinator.callbacks.LogReconstructionCallback", "lightning.pytorch.callbacks.ModelCheckpoint",
    ]  # fmt: skip


# ---- ONNX ---------------------------------------------------------------------------------------------------------


def test_export_onnx_writes_three_graphs_with_dynamic_batch(fit_run, tmp_path):
    import onnxruntime as ort

    from spherinator import export_onnx

    version = fit_run / "runs" / "spherinator" / "version_0"
    (ckpt,) = (version / "checkpoints").glob("*.ckpt")
    out = tmp_path / "onnx"
    export_onnx(ckpt, export_path=out, config=version / "config.yaml")
    assert {p.name for p in out.glob("*.onnx")} == {"encoder.onnx", "decoder.onnx", "reconstruction.onnx"}
    model = VariationalAutoencoder.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).eval()
    sessions = {g: ort.InferenceSession(str(out / f"{g}.onnx"), providers=["CPUExecutionProvider"]) for g in
                ("encoder", "decoder", "reconstruction")}  # fmt: skip

    def run(graph: str, x: np.ndarray) -> np.ndarray:
        (name,) = [i.name for i in sessions[graph].get_inputs()]
        return sessions[graph].run(None, {name: x})[0]

    for batch in (1, 5):
        x = np.random.default_rng(batch).random((batch, 3, 32, 32), dtype=np.float32)
        with torch.no_grad():
            z_torch = model.encode(torch.from_numpy(x))
            x_hat_torch = model(torch.from_numpy(x))
        z = run("encoder", x)
        assert z.shape == (batch, 16)
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)  # unit-normalised location
        np.testing.assert_allclose(z, z_torch.numpy(), atol=1e-5, rtol=1e-3)
        np.testing.assert_allclose(run("decoder", z), model.decode(torch.from_numpy(z)).detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(run("reconstruction", x), x_hat_torch.numpy(), atol=1e-5, rtol=1e-3)
