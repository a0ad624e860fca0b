"""Render pictures and send them to whichever loggers the trainer has."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """Render a matplotlib figure (Agg, no pyplot state) to an (H, W, 3) uint8 array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


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
