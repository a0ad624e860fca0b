"""Run in a venv holding upstream Spherinator (PyPI ``spherinator`` 0.5.1), never in ours: trains tiny upstream
models with upstream's own LightningCLI and writes, per model, its checkpoint, its saved config, fixed inputs with
upstream's reconstructions and encodings, and upstream's ONNX export.

Usage: python make_upstream_runs.py OUT_DIR   (tests/test_upstream.py calls it)
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # this file as a module: the data class of the configs


class TinyData(pl.LightningDataModule):
    """Random samples of ``shape`` as plain tensor batches (upstream's MSE loss takes the batch itself)."""

    def __init__(self, shape: list[int], n: int = 24, batch_size: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.data = torch.rand(n, *shape, generator=generator)
        self.batch_size = batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


def _layers(kind: str, specs: list[dict]) -> list[dict]:
    return [{"class_path": f"spherinator.models.{kind}", "init_args": spec} for spec in specs]


def conv_pair(dim: str, shape: list[int]) -> tuple[dict, dict]:
    """Upstream's convolutional encoder and decoder of ``dim`` ("1D" or "2D") for samples of ``shape`` [C, *size]:
    two stride-2 convolutions down to 6 channels at a quarter of the size, and two transposed ones back."""
    encoder = {
        "class_path": f"spherinator.models.ConvolutionalEncoder{dim}",
        "init_args": {
            "input_dim": shape,
            "output_dim": 8,
            "cnn_layers": _layers(
                f"ConsecutiveConv{dim}Layer", [{"kernel_size": 3, "stride": 2, "padding": 1, "out_channels": [4, 6]}]
            ),
        },
    }
    up = {"kernel_size": 4, "stride": 2, "padding": 1}
    decoder = {
        "class_path": f"spherinator.models.ConvolutionalDecoder{dim}",
        "init_args": {
            "input_dim": 3,
            "output_dim": shape,
            "cnn_input_dim": [6, *(size // 4 for size in shape[1:])],
            "cnn_layers": _layers(
                f"ConsecutiveConvTranspose{dim}Layer",
                [{**up, "out_channels": [5]}, {**up, "out_channels": [shape[0]], "activation": None}],
            ),
        },
    }
    return encoder, decoder


def model_configs() -> dict[str, dict]:
    """Upstream model sections: Conv2D encoder with each 2-D decoder, and the 1-D pair."""
    enc2d, conv2d = conv_pair("2D", [3, 32, 32])
    enc1d, conv1d = conv_pair("1D", [1, 32])
    upsampling = {
        "class_path": "spherinator.models.UpsamplingDecoder2D",
        "init_args": {"input_dim": 3, "output_dim": [3, 32, 32], "base_channels": 64, "seed_size": 4},
    }
    return {"conv2d": (enc2d, conv2d, [3, 32, 32]), "upsampling": (enc2d, upsampling, [3, 32, 32]),
            "conv1d": (enc1d, conv1d, [1, 32])}  # fmt: skip


def make_run(name: str, encoder: dict, decoder: dict, shape: list[int], out: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    run = out / name
    run.mkdir(parents=True)
    config = {
        "seed_everything": 0,
        "model": {"class_path": "spherinator.models.VariationalAutoencoder", "init_args": {
            "encoder": encoder, "decoder": decoder, "encoder_out_dim": 8, "z_dim": 3, "beta": 1.0e-3}},
        "data": {"class_path": "make_upstream_runs.TinyData", "init_args": {"shape": shape}},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "default_root_dir": str(run), "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
    }  # fmt: skip
    (run / "input.yaml").write_text(yaml.safe_dump(config))
    cli = LightningCLI(args=["fit", "-c", str(run / "input.yaml")], save_config_kwargs={"overwrite": True})
    ckpt = Path(cli.trainer.checkpoint_callback.best_model_path)
    saved = next(run.rglob("config.yaml"))  # LightningCLI's saved config (W&B uploads it as cli-config.yaml)
    (run / "cli-config.yaml").write_text(saved.read_text())
    ckpt.replace(run / "upstream.ckpt")
    model = cli.model.eval()
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        location, scale = model.encode(x)
        expected = {"x": x, "reconstruction": model.reconstruct(x), "location": location, "scale": scale}
    torch.save(expected, run / "expected.pt")
    try:
        _export_like_upstream(model, shape, run / "onnx")
    except Exception as err:  # recorded: the test says why it has no ONNX files
        (run / "onnx_error.txt").write_text(f"{type(err).__name__}: {err}")


def _export_like_upstream(model: torch.nn.Module, shape: list[int], directory: Path) -> None:
    """The calls of upstream's ``export_onnx`` on the model its CLI trained. Its own function rebuilds the model
    with ``yaml2model``, which cannot read a LightningCLI config (``norm: {class_path: torch.nn.BatchNorm2d}``
    becomes an instance without num_features), so a saved run cannot go through it unchanged."""
    directory.mkdir()
    for module, example, name in ((model.variational_encoder, torch.randn(1, *shape), "encoder"),
                                  (model.decoder, torch.randn(1, 3), "decoder")):  # fmt: skip
        program = torch.onnx.export(module, example, dynamic_axes={"input": {0: "batch"}}, dynamo=True)
        program.optimize()
        program.save(str(directory / f"{name}.onnx"))


if __name__ == "__main__":
    target = Path(sys.argv[1])
    for key, (encoder, decoder, shape) in model_configs().items():
        if len(sys.argv) < 3 or key in sys.argv[2:]:
            make_run(key, encoder, decoder, shape, target)
