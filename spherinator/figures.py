"""The pictures of a learned sphere, for the training callbacks and ``spherinator evaluate`` alike: where samples land
on a Mollweide map, what the decoder draws over S^2, originals beside their reconstructions. Each returns an
(H, W, 3) uint8 array; drawing uses matplotlib's Agg canvas, no pyplot state."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """Render a matplotlib figure (Agg, no pyplot state) to an (H, W, 3) uint8 array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def run_in_eval(pl_module: pl.LightningModule, fn: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for a picture: in eval mode without gradients (BatchNorm statistics untouched), ``x`` moved to the
    module's device and dtype, the module's mode restored after; the result as float32 on the CPU."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad():
            parameter = next(pl_module.parameters())
            return fn(x.to(parameter.device, parameter.dtype)).float().cpu()
    finally:
        pl_module.train(was_training)


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


def reconstruction_picture(x: torch.Tensor, x_hat: torch.Tensor) -> np.ndarray:
    """Originals beside their reconstructions, (B, C, H, W) as an image grid, (B, C, L) as line plots; (H', W', 3)
    uint8."""
    return _image_grid(x, x_hat) if x.dim() == 4 else _line_plots(x, x_hat)


def _image_grid(x: torch.Tensor, x_hat: torch.Tensor) -> np.ndarray:
    """(2 * pad + H) * 2 rows, originals above reconstructions; (H', W', 3) uint8."""
    from torchvision.utils import make_grid

    channels = 3 if x.shape[1] >= 3 else 1
    x, x_hat = x[:, :channels], x_hat[:, :channels]
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-8)
    pairs = torch.cat([(x - lo) / span, (x_hat - lo) / span]).clamp(0, 1)  # (2B, C, H, W)
    grid = make_grid(pairs, nrow=len(x), padding=2, pad_value=1.0)  # (3, H', W')
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _line_plots(x: torch.Tensor, x_hat: torch.Tensor) -> np.ndarray:
    """One panel per sample, original (solid) and reconstruction (dashed) for every channel."""
    x, x_hat = x.reshape(len(x), -1, x.shape[-1]), x_hat.reshape(len(x_hat), -1, x_hat.shape[-1])  # (B, C, L)
    figure = Figure(figsize=(3 * len(x), 2.5), dpi=80)
    axes = figure.subplots(1, len(x), squeeze=False)[0]
    for ax, original, reconstruction in zip(axes, x, x_hat, strict=True):
        for c in range(original.shape[0]):
            ax.plot(original[c].numpy(), color=f"C{c}", lw=1)
            ax.plot(reconstruction[c].numpy(), color=f"C{c}", lw=1, ls="--")
        ax.set_xticks([])
    axes[0].set_title("original (solid) / reconstruction (dashed)", fontsize=8, loc="left")
    figure.tight_layout()
    return figure_to_array(figure)


__all__ = [
    "decoded_map",
    "figure_to_array",
    "mollweide_map",
    "on_s2",
    "reconstruction_picture",
    "run_in_eval",
    "sphere_grid",
]
