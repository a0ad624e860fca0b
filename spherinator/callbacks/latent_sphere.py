"""Pictures of the latent sphere on Mollweide maps: where the validation samples land, and (for a latent sphere
S^2) what the decoder draws at points all over it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure

from spherinator.callbacks._images import figure_to_array, log_image, run_in_eval
from spherinator.callbacks.sphere_quality import missing_column
from spherinator.models.autoencoder import model_input


class LogLatentSphere(pl.Callback):
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


def on_s2(z: torch.Tensor) -> bool:
    """Whether latents (N, d) lie on the sphere S^2: d = 3 and unit norm (a VAE's locations, not an
    Autoencoder's free code), so the decoder can be drawn over S^2."""
    return z.shape[1] == 3 and torch.allclose(z.norm(dim=-1), torch.ones(len(z), dtype=z.dtype), atol=1e-3)


def mollweide_map(z: torch.Tensor, colors: torch.Tensor | None = None, color_label: str | None = None) -> np.ndarray:
    """Mollweide scatter of latent vectors (N, d), d >= 2, as an (H, W, 3) uint8 image; with ``colors`` (N,) the
    points are coloured by them (a categorical palette for up to 20 integer values, else viridis), with a
    colour bar named ``color_label``."""
    xyz = torch.nn.functional.pad(z[:, :3], (0, max(0, 3 - z.shape[1])))  # (N, 3)
    xyz = torch.nn.functional.normalize(xyz, dim=-1).numpy()
    lon = np.arctan2(xyz[:, 1], xyz[:, 0])
    lat = np.arcsin(np.clip(xyz[:, 2], -1.0, 1.0))
    figure = Figure(figsize=(6, 3.4), dpi=100)
    ax = figure.add_subplot(projection="mollweide")
    if colors is None:
        ax.scatter(lon, lat, s=4, alpha=0.6)
    else:
        values = colors.double().numpy()
        whole = np.isfinite(values).all() and np.array_equal(values, np.round(values))
        categorical = bool(whole) and len(np.unique(values)) <= 20
        cmap = ("tab10" if len(np.unique(values)) <= 10 else "tab20") if categorical else "viridis"
        points = ax.scatter(lon, lat, c=values, s=4, alpha=0.8, cmap=cmap, plotnonfinite=True)
        bar = figure.colorbar(points, ax=ax, fraction=0.03, pad=0.02)
        bar.ax.tick_params(labelsize=6)
        bar.set_label(color_label or "", fontsize=7)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=6)
    title = "latent sphere" if z.shape[1] == 3 else f"latent sphere (first 3 of {z.shape[1]} dims)"
    ax.set_title(f"{title}, {len(z)} samples", fontsize=9)
    return figure_to_array(figure)


def sphere_grid(rows: int = 7, equator: int = 16) -> torch.Tensor:
    """Unit vectors (N, 3) on ``rows`` circles of latitude 180 / (rows + 1) degrees apart, points spaced about
    equally along each (``equator`` on the equator, fewer towards the poles)."""
    points = []
    for lat in np.radians(np.linspace(-90.0, 90.0, rows + 2)[1:-1]):
        n = max(1, round(equator * np.cos(lat)))
        lon = np.radians((np.arange(n) + 0.5) / n * 360.0 - 180.0)
        points.append(np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.full(n, np.sin(lat))], 1))
    return torch.from_numpy(np.concatenate(points)).float()


def decoded_map(points: torch.Tensor, images: torch.Tensor) -> np.ndarray:
    """Mollweide map with ``images[i]`` (C, H, W) drawn at ``points[i]`` (unit vectors); (H, W, 3) uint8."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    images = images[:, :3] if images.shape[1] >= 3 else images[:, :1].expand(-1, 3, -1, -1)
    lo, hi = images.amin(), images.amax()
    images = ((images - lo) / (hi - lo).clamp_min(1e-8)).permute(0, 2, 3, 1).numpy()  # one scale for all
    lon = np.arctan2(points[:, 1].numpy(), points[:, 0].numpy())
    lat = np.arcsin(np.clip(points[:, 2].numpy(), -1.0, 1.0))
    figure = Figure(figsize=(9, 4.8), dpi=100)
    ax = figure.add_subplot(projection="mollweide")
    ax.set_facecolor("black")
    ax.grid(True, alpha=0.25, color="white")
    ax.tick_params(labelsize=6)
    figure.subplots_adjust(left=0.03, right=0.97, bottom=0.03, top=0.92)
    zoom = 46 / max(images.shape[1:3]) * 72 / figure.dpi  # thumbnails about 46 pixels across (zoom is in points)
    for image, x, y in zip(images, lon, lat, strict=True):
        ax.add_artist(AnnotationBbox(OffsetImage(image, zoom=zoom), (x, y), frameon=False, pad=0))
    ax.set_title(f"decoded latent sphere: the decoder's image at {len(points)} points of S^2", fontsize=9)
    return figure_to_array(figure)
