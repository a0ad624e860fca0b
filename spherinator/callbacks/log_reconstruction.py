"""Log originals next to their reconstructions after every validation epoch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from spherinator.callbacks._collect import ValidationCollector
from spherinator.callbacks._images import log_image
from spherinator.figures import reconstruction_picture, run_in_eval
from spherinator.models.autoencoder import model_input


class LogReconstructionCallback(ValidationCollector):
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

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
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
