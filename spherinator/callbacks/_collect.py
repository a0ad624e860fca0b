"""The base of the callbacks that gather rows of the validation batches (latents, originals, labels)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class ValidationCollector(pl.Callback):
    """A callback that reads each validation batch: subclasses implement :meth:`collect` and leave Lightning's
    hook signature to this class."""

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.collect(trainer, pl_module, batch, batch_idx)

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Take what the callback needs from one validation ``batch``."""
        raise NotImplementedError
