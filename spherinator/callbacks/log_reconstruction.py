"""Log originals next to their reconstructions after every validation epoch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from matplotlib.figure import Figure

from spherinator.callbacks._images import figure_to_array, log_image, run_in_eval
from spherinator.models.autoencoder import model_input


class LogReconstructionCallback(pl.Callback):
    """Logs a fixed set of validation samples (top row) and their reconstructions (bottom row).

    The samples are the first ``samples`` rows the validation loader yields; they stay the same for the whole run.
    Images (B, C, H, W) are shown as a grid (the first 3 channels; each pair scaled by the original's range);
    1-D data (B, C, L) as line plots. The reconstruction uses the deterministic ``model(x)`` in eval mode, so
    BatchNorm statistics are untouched. Runs on rank zero only and logs to TensorBoard, W&B or any logger with a
    ``log_dir`` (as PNG) under the key ``"reconstructions"``.

    Args:
        samples: Number of samples to show.
    """

    def __init__(self, samples: int = 6) -> None:
        super().__init__()
        if samples < 1:
            raise ValueError(f"LogReconstructionCallback: samples must be >= 1, got {samples}")
        self.samples = int(samples)
        self._originals: torch.Tensor | None = None

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        have = 0 if self._originals is None else len(self._originals)
        if have >= self.samples or not trainer.is_global_zero:
            return
        x = model_input(batch)[: self.samples - have].detach().cpu().clone()
        self._originals = x if self._originals is None else torch.cat([self._originals, x])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._originals is None:
            return
        x = self._originals.float()
        x_hat = run_in_eval(pl_module, pl_module, x)
        log_image(trainer, "reconstructions", reconstruction_picture(x, x_hat))


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
