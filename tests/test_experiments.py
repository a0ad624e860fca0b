"""Every YAML under experiments/ composes and trains for a step or two on CPU against tiny local data.

Cluster data paths are replaced by a test overlay (last ``-c``); the ViT config runs against a tiny ViT saved to
a temporary directory, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from spherinator.callbacks import SphereQuality
from spherinator.cli import SpherinatorCLI, main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = str(Path(__file__).parent / "configs" / "vae_tiny.yaml")

MODEL_YAMLS = ["vae_cnn3.yaml", "ae_cnn3.yaml", "vae_cnn1d.yaml", "vae_vit.yaml", "vae_digits.yaml"]
DATA_YAMLS = ["illustris.yaml", "illustris_small.yaml", "demo.yaml"]
OVERLAYS = [
    "wandb.yaml",
    "tensorboard.yaml",
    "callback_log_reconstructions.yaml",
    "callback_best_model.yaml",
    "callback_latent_sphere.yaml",
    "kl_annealing.yaml",
    "bf16.yaml",
    "ddp.yaml",
    "deepspeed.yaml",
]


def exp(name: str) -> str:
    return str(EXPERIMENTS / name)


def test_overlay(tmp_path: Path, data_path: Path, **trainer) -> str:
    """The last ``-c``: local data instead of cluster paths, two steps, logs under tmp_path."""
    config = {
        "data": {
            "class_path": "spherinator.data.DataModule",
            "init_args": {"path": str(data_path), "batch_size": 4, "num_workers": 0, "val_fraction": 0.25},
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            **trainer,
        },
    }
    out = tmp_path / "test_overlay.yaml"
    out.write_text(yaml.safe_dump(config))
    return str(out)


test_overlay.__test__ = False  # a helper, not a test


def digits32(near: Path) -> Path:
    """16 rows of ``make_dataset.py digits`` (1x32x32 uint8 with ``label``), written once beside ``near``."""
    from tests.conftest import write_fast_layout
    from tools import make_dataset

    path = near.parent / "digits32"
    if not path.exists():
        rows = make_dataset.digits(32)
        partial = write_fast_layout(near.parent / "digits32.partial", {k: v[:16] for k, v in rows.items()}, files=1)
        partial.rename(path)
    return path


def model_args(name: str, images128: Path, spectra256: Path, tiny_vit: Path) -> tuple[list[str], Path]:
    """Extra arguments and the data each model YAML is run with."""
    if name == "vae_digits.yaml":  # 1x32x32 with a label column
        return [], digits32(images128)
    if name == "vae_cnn1d.yaml":
        return [], spectra256
    if name == "vae_vit.yaml":
        vit = ["--model.init_args.encoder.init_args.model_name", str(tiny_vit)]
        return [*vit, "--model.init_args.decoder.init_args.base_channels", "32"], images128
    return [], images128


RECIPES = ["vae_gaia_xp.yaml"]  # model and data together; trained in tests/test_losses.py


def test_every_experiment_yaml_is_covered():
    assert {p.name for p in EXPERIMENTS.glob("*.yaml")} == set(MODEL_YAMLS + DATA_YAMLS + OVERLAYS + RECIPES)


@pytest.mark.parametrize("name", MODEL_YAMLS)
def test_model_yaml_trains(name, images128, spectra256, tiny_vit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra, data = model_args(name, images128, spectra256, tiny_vit)
    main(["fit", "-c", exp(name), "-c", exp("illustris_small.yaml"), "-c", test_overlay(tmp_path, data), *extra])
    assert list(tmp_path.rglob("*.ckpt")), "fit wrote no checkpoint"
    assert list(tmp_path.rglob("events.out.tfevents.*")), "fit wrote no TensorBoard events"


@pytest.mark.parametrize("name", MODEL_YAMLS)
def test_z_dim_alone_can_be_overridden_and_swept(name, images128, spectra256, tiny_vit, tmp_path):
    extra, data = model_args(name, images128, spectra256, tiny_vit)
    base = ["-c", exp(name), "-c", exp("illustris_small.yaml"), "-c", test_overlay(tmp_path, data), *extra]
    if name == "ae_cnn3.yaml":  # a plain autoencoder's latent size is its encoder's output_dim
        key, dims = "--model.init_args.encoder.init_args.output_dim", (4, 16)
    else:
        key, dims = "--model.init_args.z_dim", (8, 16)
    for dim in dims:
        cli = SpherinatorCLI(args=[*base, key, str(dim)], run=False)
        cli.model.eval()
        x = torch.rand(2, *cli.model.input_dim)
        z = cli.model.encode(x)
        assert z.shape == (2, dim)
        assert cli.model.decode(z).shape == x.shape


@pytest.mark.parametrize("name", DATA_YAMLS)
def test_data_yaml_trains(name, image_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", TINY, "-c", exp(name), "-c", test_overlay(tmp_path, image_dataset)])
    assert list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("name", [n for n in OVERLAYS if n not in ("ddp.yaml", "deepspeed.yaml")])
def test_overlay_yaml_trains(name, image_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = ["fit", "-c", TINY, "-c", exp(name), "-c", test_overlay(tmp_path, image_dataset, max_steps=4)]
    if name == "wandb.yaml":  # the placeholder entity is for users to edit; offline runs need none
        args += ["--trainer.logger.init_args.entity", "null", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    main(args)
    if name == "wandb.yaml":
        assert list(tmp_path.rglob("*.wandb")), "no offline W&B run was written"


def test_ddp_overlay_trains_on_one_cpu_process(image_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The overlay asks for GPUs; on CPU the same strategy runs as one gloo process. Lightning leaves MASTER_PORT
    # etc. in os.environ: scrub them so later tests (and jobs they submit to Slurm) do not inherit them.
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    try:
        main(["fit", "-c", TINY, "-c", exp("ddp.yaml"), "-c", test_overlay(tmp_path, image_dataset)])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert list(tmp_path.rglob("*.ckpt"))


def test_deepspeed_overlay_builds_its_strategy(image_dataset, tmp_path):
    """DeepSpeed trains only on CUDA GPUs: on CPU we can check the composed config builds its strategy."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install spherinator[deepspeed])")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    cli = SpherinatorCLI(
        args=["-c", TINY, "-c", exp("deepspeed.yaml"), "-c", test_overlay(tmp_path, image_dataset)], run=False
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == 2


def test_callback_overlays_add_up(image_dataset, tmp_path):
    names = ["kl_annealing.yaml", "callback_latent_sphere.yaml", "callback_best_model.yaml", "demo.yaml"]
    args = [a for n in names for a in ("-c", exp(n))]
    cli = SpherinatorCLI(args=["-c", TINY, *args, "-c", test_overlay(tmp_path, image_dataset)], run=False)
    # demo.yaml's LogLatentSphere is the same as callback_latent_sphere.yaml's: listed once; its ModelCheckpoint
    # differs from callback_best_model.yaml's: both kept
    assert [c.class_path.rsplit(".", 1)[1] for c in cli.config.trainer.callbacks] == [
        "KLAnnealing", "LogLatentSphere", "ModelCheckpoint",  # each overlay's callback, in order
        "ModelCheckpoint", "LogReconstructionCallback",  # demo.yaml's (its SphereQuality comes with vae_cnn3.yaml)
    ]  # fmt: skip


@pytest.mark.parametrize("name", MODEL_YAMLS)
def test_every_model_yaml_watches_its_sphere_while_it_trains(name):
    """Each model file brings SphereQuality (coverage, concentration, KL per epoch, the collapse warning)."""
    config = yaml.safe_load(Path(exp(name)).read_text())
    paths = [callback["class_path"] for callback in config["trainer"]["callbacks"]]
    assert "spherinator.callbacks.SphereQuality" in paths


def test_a_second_sphere_quality_replaces_the_model_files_one_and_says_so(image_dataset, tmp_path, capsys):
    """vae_cnn3.yaml brings SphereQuality(); an overlay asking for the kNN figure brings another. Lightning refuses
    two (its state has one key), so the later one is kept and stderr says which."""
    files = []
    for name, init_args in (("model.yaml", {}), ("knn.yaml", {"label_column": "label"})):  # as vae_cnn3.yaml's
        files += ["-c", str(tmp_path / name)]
        callback = {"class_path": "spherinator.callbacks.SphereQuality", "init_args": init_args}
        (tmp_path / name).write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    args = ["-c", TINY, *files]
    cli = SpherinatorCLI(args=[*args, "-c", test_overlay(tmp_path, image_dataset)], run=False)
    quality = [c for c in cli.trainer.callbacks if isinstance(c, SphereQuality)]
    assert len(quality) == 1 and quality[0].label_column == "label"
    err = capsys.readouterr().err
    said = "lists SphereQuality more than once; the later one (label_column: label) replaces the earlier"
    assert f"{said} (label_column: None)" in err
    assert err.count("more than once") == 1
