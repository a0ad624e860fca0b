"""Picture of the latent sphere: validation samples embedded and drawn on a Mollweide map."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from matplotlib.figure import Figure

from spherinator.callbacks._images import figure_to_array, log_image
from spherinator.models.autoencoder import model_input


class LogLatentSphere(pl.Callback):
    """Embeds up to ``max_samples`` validation samples with ``model.encode`` and logs a Mollweide map of them.

    The first three latent coordinates are renormalised onto S^2 (exact for z_dim = 3, a projection above, a
    great circle for z_dim = 2). Rank zero shows its own samples; logged under the key ``"latent_sphere"``.

    Args:
        max_samples: Number of validation samples embedded per epoch.
        every_n_epochs: Log every this many validation epochs.
    """

    def __init__(self, max_samples: int = 1000, every_n_epochs: int = 1) -> None:
        super().__init__()
        if max_samples < 1 or every_n_epochs < 1:
            raise ValueError(
                f"LogLatentSphere: max_samples and every_n_epochs must be >= 1, got {max_samples}, {every_n_epochs}"
            )
        self.max_samples = int(max_samples)
        self.every_n_epochs = int(every_n_epochs)
        self._latents: list[torch.Tensor] = []

    def _active(self, trainer: pl.Trainer) -> bool:
        return (
            trainer.is_global_zero and not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0
        )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._latents = []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        have = sum(len(z) for z in self._latents)
        if have >= self.max_samples or not self._active(trainer):
            return
        x = model_input(batch)[: self.max_samples - have]
        with torch.no_grad():
            self._latents.append(pl_module.encode(x).float().cpu())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._latents or not self._active(trainer):
            return
        z = torch.cat(self._latents)  # (N, z_dim)
        self._latents = []
        log_image(trainer, "latent_sphere", mollweide_map(z))


def mollweide_map(z: torch.Tensor) -> np.ndarray:
    """Mollweide scatter of latent vectors (N, d), d >= 2, as an (H, W, 3) uint8 image."""
    xyz = torch.nn.functional.pad(z[:, :3], (0, max(0, 3 - z.shape[1])))  # (N, 3)
    xyz = torch.nn.functional.normalize(xyz, dim=-1).numpy()
    lon = np.arctan2(xyz[:, 1], xyz[:, 0])
    lat = np.arcsin(np.clip(xyz[:, 2], -1.0, 1.0))
    figure = Figure(figsize=(6, 3.4), dpi=100)
    ax = figure.add_subplot(projection="mollweide")
    ax.scatter(lon, lat, s=4, alpha=0.6)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=6)
    title = "latent sphere" if z.shape[1] == 3 else f"latent sphere (first 3 of {z.shape[1]} dims)"
    ax.set_title(f"{title}, {len(z)} samples", fontsize=9)
    return figure_to_array(figure)
