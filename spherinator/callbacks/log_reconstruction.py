"""Log originals next to their reconstructions after every validation epoch."""

from __future__ import annotations

import numbers
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch.utils.data import IterableDataset, default_collate

from spherinator.callbacks._collect import ValidationCollector
from spherinator.callbacks._images import log_image
from spherinator.errors import ConfigError
from spherinator.figures import reconstruction_picture, run_in_eval
from spherinator.models.autoencoder import model_input


def _check_samples(samples: int | list[int]) -> int | list[int]:
    def is_int(v: object) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(samples):
        if samples < 1:
            raise ConfigError(f"LogReconstructionCallback: samples must be >= 1, got {samples}")
        return int(samples)
    if not isinstance(samples, list | tuple) or not samples or not all(is_int(s) and s >= 0 for s in samples):
        raise ConfigError(
            f"LogReconstructionCallback: samples must be a count >= 1 or a non-empty list of row indices >= 0, "
            f"got {samples!r}"
        )
    return [int(s) for s in samples]


class LogReconstructionCallback(ValidationCollector):
    """Logs a fixed set of validation samples (top row) and their reconstructions (bottom row).

    The samples are the first ``samples`` rows the validation loader yields (or, for a list, the rows at those
    positions of the first validation epoch); they stay the same for the whole run.
    Images (B, C, H, W) are shown as a grid (the first 3 channels; each pair scaled by the original's range);
    1-D data (B, C, L) as line plots. The reconstruction uses the deterministic ``model(x)`` in eval mode, so
    BatchNorm statistics are untouched. Runs on rank zero only and logs to TensorBoard, W&B or any logger with a
    ``log_dir`` (as PNG) under the key ``"reconstructions"``.

    Upstream Spherinator's direct call ``callback.on_train_epoch_end(trainer=..., model=...)`` logs the rows
    ``samples`` names of ``trainer.train_dataloader.dataset`` at once (see :meth:`on_train_epoch_end`).

    Args:
        samples: Number of samples to show, or a list of row indices.
    """

    def __init__(self, samples: int | list[int] = 6) -> None:
        super().__init__()
        self.samples = _check_samples(samples)
        self._originals: torch.Tensor | None = None
        self._picked: dict[int, torch.Tensor] = {}  # row index -> row, for a list of indices
        self._position = 0  # rows of the current validation epoch seen so far

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._position = 0

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        if isinstance(self.samples, list):
            self._collect_indices(model_input(batch))
            return
        have = 0 if self._originals is None else len(self._originals)
        if have >= self.samples:
            return
        x = model_input(batch)[: self.samples - have].detach().cpu().clone()
        self._originals = x if self._originals is None else torch.cat([self._originals, x])

    def _collect_indices(self, x: torch.Tensor) -> None:
        start, self._position = self._position, self._position + len(x)
        if self._originals is not None:
            return
        for index in self.samples:
            if start <= index < self._position:
                self._picked[index] = x[index - start].detach().cpu().clone()
        if len(self._picked) == len(set(self.samples)):
            self._originals = torch.stack([self._picked[i] for i in self.samples])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self._originals is None and isinstance(self.samples, list):
            missing = sorted(set(self.samples) - set(self._picked))
            raise ConfigError(
                f"LogReconstructionCallback: sample indices {missing} are not below the {self._position} rows of "
                "the validation set; pick smaller indices"
            )
        if self._originals is None:
            return
        x = self._originals.float()
        x_hat = run_in_eval(pl_module, pl_module, x)
        log_image(trainer, "reconstructions", reconstruction_picture(x, x_hat))

    def on_train_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule | None = None, *, model: Any = None
    ) -> None:
        """Lightning's hook does nothing here (reconstructions are logged after validation); upstream
        Spherinator's direct call ``on_train_epoch_end(trainer=trainer, model=model)`` logs the rows ``samples``
        names of the training dataset now.

        Raises:
            ValueError: A sample index is not smaller than the training dataset's size.
        """
        if model is None:
            return
        indices = list(range(self.samples)) if isinstance(self.samples, int) else self.samples
        x = _training_rows(trainer.train_dataloader.dataset, indices).float()
        picture = reconstruction_picture(x, run_in_eval(model, model, x))
        log_image(trainer, "reconstructions", picture)
        _log_figure_upstream_style(trainer, picture)


def _training_rows(dataset: Any, indices: list[int]) -> torch.Tensor:
    """The model inputs of rows ``indices`` of a training dataset: indexed in a map-style dataset (upstream's), read
    in the order of the current epoch from a stream of batches (ours), which reads no further than it needs."""
    if not isinstance(dataset, IterableDataset):
        size = len(dataset)
        if max(indices) < size:
            return model_input(default_collate([dataset[i] for i in indices]))
    else:
        picked: dict[int, torch.Tensor] = {}
        size = 0
        batches = iter(dataset)
        try:
            for batch in batches:
                x = model_input(batch)
                picked.update({i: x[i - size] for i in indices if size <= i < size + len(x)})
                size += len(x)
                if len(picked) == len(set(indices)):
                    return torch.stack([picked[i] for i in indices])
        finally:
            getattr(batches, "close", lambda: None)()  # stop a stream's read-ahead now, not at garbage collection
    raise ConfigError(
        f"LogReconstructionCallback: The sample indices must be smaller than the dataset size: samples {indices} "
        f"for {size} rows; pick fewer samples or smaller indices"
    )


def _log_figure_upstream_style(trainer: pl.Trainer, picture: np.ndarray) -> None:
    """Hand ``picture`` as a matplotlib figure to loggers :func:`log_image` leaves out that have upstream's
    ``log_image(key=, images=)`` method (its custom loggers), under upstream's key ``"Reconstructions"``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger | WandbLogger) or not callable(getattr(logger, "log_image", None)):
            continue
        figure = Figure(figsize=(picture.shape[1] / 80, picture.shape[0] / 80), dpi=80)
        FigureCanvasAgg(figure)  # a canvas of its own, no pyplot state to leak
        axes = figure.add_axes((0, 0, 1, 1))
        axes.imshow(picture)
        axes.axis("off")
        logger.log_image(key="Reconstructions", images=[figure])
