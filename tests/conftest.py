"""Shared fixtures: tiny Parquet datasets written locally, in the fast tensor layout.

Fast layout (see README "Tensor layout"): one ``fixed_size_binary`` value per row holding the raw array
bytes; the schema metadata carries ``<column>_shape`` (e.g. ``b"(3,32,32)"``) and ``<column>_dtype``
(e.g. ``b"uint8"``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest

from spherinator.data.writer import write_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpointing, progress bar or model summary; ``kwargs`` add or override."""
    options = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    return pl.Trainer(**{**options, "enable_model_summary": False, **kwargs})


def write_fast_layout(root: Path, arrays: dict[str, np.ndarray], *, files: int = 2, rows_per_group: int = 16) -> Path:
    """Write ``arrays`` (each (N, ...)) as ``files`` Parquet files; ndim > 1 columns use the fast layout."""
    n = len(next(iter(arrays.values())))
    write_dataset(root, [arrays], rows_per_file=math.ceil(n / files), rows_per_group=rows_per_group)
    return root


def gaussian_blobs(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """``n`` round Gaussian blobs (N, size, size) in [0, 1] at random centres in [8, 24), their x centres ``cx``
    (N,), and the generator they were drawn from (to draw more per-row values from)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = rng.uniform(8, 24, (2, n)).astype(np.float32)
    blob = np.exp(-((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2) / 18.0)
    return blob, cx, rng


@pytest.fixture(scope="session")
def image_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 rows of 3x32x32 uint8 images (smooth blobs, so a model can learn them) plus an ``id`` column."""
    rng = np.random.default_rng(0)
    n, size = 96, 32
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = rng.uniform(8, 24, (2, n, 1, 1)).astype(np.float32)
    width = rng.uniform(2, 6, (n, 1, 1)).astype(np.float32)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))  # (N, H, W)
    colour = rng.uniform(0.3, 1.0, (n, 3, 1, 1)).astype(np.float32)
    images = (255 * blob[:, None] * colour).astype(np.uint8)  # (N, 3, H, W)
    return write_fast_layout(tmp_path_factory.mktemp("images"), {"data": images, "id": np.arange(n, dtype=np.int64)})


@pytest.fixture(scope="session")
def spectrum_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 rows of 1x64 float32 spectra (a few Gaussian lines) plus an ``id`` column."""
    rng = np.random.default_rng(1)
    n, length = 64, 64
    x = np.arange(length, dtype=np.float32)
    centres = rng.uniform(10, 54, (n, 1)).astype(np.float32)
    spectra = np.exp(-((x - centres) ** 2) / 8.0)[:, None, :].astype(np.float32)  # (N, 1, L)
    return write_fast_layout(tmp_path_factory.mktemp("spectra"), {"data": spectra, "id": np.arange(n, dtype=np.int64)})


@pytest.fixture(scope="session")
def images128(tmp_path_factory) -> Path:
    rng = np.random.default_rng(2)
    return write_fast_layout(
        tmp_path_factory.mktemp("images128"),
        {"data": rng.integers(0, 255, (16, 3, 128, 128), dtype=np.uint8)},
        files=1,
        rows_per_group=8,
    )


@pytest.fixture(scope="session")
def spectra256(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    return write_fast_layout(
        tmp_path_factory.mktemp("spectra256"),
        {"data": rng.random((16, 1, 256), dtype=np.float32)},
        files=1,
        rows_per_group=8,
    )


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    path = tmp_path_factory.mktemp("tiny-vit")
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _finish_wandb_run():
    """A W&B run left open is reused by the next WandbLogger, and W&B keeps the directory of its first run for the
    whole process: close the run and reset W&B after every test that used it."""
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None:
        if getattr(wandb, "run", None) is not None:
            wandb.finish()
        wandb.teardown()


# Slurm tests wait on the queue (a requeued job restarts only after slurmctld's next pass): twice the per-test
# timeout of pyproject.toml, unless a test sets its own.
SLURM_TIMEOUT_S = 1800


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slurm") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLURM_TIMEOUT_S))
