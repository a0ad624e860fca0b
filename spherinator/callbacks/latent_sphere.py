"""Pictures of the latent sphere on Mollweide maps: where the validation samples land, and (for a latent sphere
S^2) what the decoder draws at points all over it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from spherinator.callbacks._collect import ValidationCollector
from spherinator.callbacks._images import log_image
from spherinator.callbacks.sphere_quality import missing_column
from spherinator.figures import decoded_map, mollweide_map, on_s2, run_in_eval, sphere_grid
from spherinator.models.autoencoder import model_input


class LogLatentSphere(ValidationCollector):
    """Embeds up to ``max_samples`` validation samples with ``model.encode`` and logs a Mollweide map of them.

    The first three latent coordinates are renormalised onto S^2 (exact for z_dim = 3, a projection above, a
    great circle for z_dim = 2). Rank zero shows its own samples; logged under the key ``"latent_sphere"``.

    With ``decoded`` and a model whose latents lie on S^2 (z_dim = 3, unit norm) and whose ``decode`` makes images
    (C, H, W), a second map shows the image decoded at each point of a grid over the sphere: the atlas a user
    browses, logged under ``"latent_sphere_decoded"``.

    With ``color_column``, the points are coloured by that per-row column of the batch (a label, a flux): the data
    must return dicts holding it (``data.init_args.return_dict: true``, the column in ``data.init_args.columns``).

    Args:
        max_samples: Number of validation samples embedded per epoch.
        every_n_epochs: Log every this many validation epochs.
        decoded: Also log the map of decoded images.
        color_column: Per-row column of the batch dict that colours the points.
    """

    def __init__(
        self, max_samples: int = 1000, every_n_epochs: int = 1, decoded: bool = True, color_column: str | None = None
    ) -> None:
        super().__init__()
        if max_samples < 1 or every_n_epochs < 1:
            raise ValueError(
                f"LogLatentSphere: max_samples and every_n_epochs must be >= 1, got {max_samples}, {every_n_epochs}"
            )
        self.max_samples = int(max_samples)
        self.every_n_epochs = int(every_n_epochs)
        self.decoded = bool(decoded)
        self.color_column = color_column
        self._latents: list[torch.Tensor] = []
        self._colors: list[torch.Tensor] = []
        self._color_missing = False

    def _active(self, trainer: pl.Trainer) -> bool:
        return (
            trainer.is_global_zero and not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0
        )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._latents = []
        self._colors = []

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        have = sum(len(z) for z in self._latents)
        if have >= self.max_samples or not self._active(trainer):
            return
        x = model_input(batch)[: self.max_samples - have]
        with torch.no_grad():
            self._latents.append(pl_module.encode(x).float().cpu())
        if self.color_column is not None:
            self._colors.append(self._color_values(batch, len(x)))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._latents or not self._active(trainer):
            return
        z = torch.cat(self._latents)  # (N, z_dim)
        colors = torch.cat(self._colors) if self._colors else None
        self._latents, self._colors = [], []
        if colors is not None and bool(colors.isnan().all()):
            colors = None
        log_image(trainer, "latent_sphere", mollweide_map(z, colors, self.color_column))
        if self.decoded and on_s2(z) and callable(getattr(pl_module, "decode", None)):
            points = sphere_grid()
            images = run_in_eval(pl_module, pl_module.decode, points)
            if images.dim() == 4:  # (N, C, H, W); spectra and cubes have no thumbnail
                log_image(trainer, "latent_sphere_decoded", decoded_map(points, images))

    def _color_values(self, batch: Any, n: int) -> torch.Tensor:
        """The colour column's first ``n`` values (n,) float, NaN where the batch does not hold it."""
        column = batch.get(self.color_column) if isinstance(batch, dict) else None
        if isinstance(column, torch.Tensor) and column.dim() == 1 and len(column) >= n:
            return column[:n].detach().double().cpu()
        if not self._color_missing:
            self._color_missing = True
            rank_zero_warn(missing_column("LogLatentSphere", "color_column", self.color_column, batch))
        return torch.full((n,), float("nan"), dtype=torch.float64)
