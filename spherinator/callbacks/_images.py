"""Send pictures (rendered by :mod:`spherinator.figures`) to whichever loggers the trainer has."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger


def log_image(trainer: pl.Trainer, key: str, image: np.ndarray) -> None:
    """Log an (H, W, 3) uint8 image to TensorBoard (``add_image``), W&B (``log_image``) or, for other loggers
    with a ``log_dir``, as a PNG under ``<log_dir>/images``."""
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif getattr(logger, "log_dir", None):
            import matplotlib.image

            path = Path(logger.log_dir) / "images" / f"{key}_step{step}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            matplotlib.image.imsave(path, image)
