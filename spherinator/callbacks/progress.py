"""A progress bar for log files: :class:`LineProgressBar`."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class LineProgressBar(ProgressBar):
    """Progress as lines for a log file: one per epoch, with its metrics, and one every ``every_s`` seconds within a
    long epoch; one at the end of a validate, test or predict run.

    A bar redrawn in place does not suit a file: tqdm's leaves one line per refresh in it, Rich's shows nothing until
    training ends. ``spherinator`` (and so every ``spherinator-submit`` task, whose stdout is Slurm's log file) uses
    this one instead of Lightning's when stdout is not a terminal, unless the config names a progress bar callback
    itself or turns the bar off (``enable_progress_bar: false``).

    Args:
        every_s: Seconds between the lines within an epoch; None for the epoch lines only.
    """

    def __init__(self, every_s: float | None = 60.0) -> None:
        super().__init__()
        if every_s is not None and not every_s > 0:
            raise ValueError(f"every_s must be a positive number of seconds or None (got {every_s!r})")
        self.every_s = every_s
        self._enabled = True
        self._start = self._last = 0.0
        self._batches = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _write(self, text: str, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        sys.stdout.write(f"{text}{'; ' + shown if shown else ''}\n")
        sys.stdout.flush()

    def _begin(self) -> None:
        self._start = self._last = time.monotonic()
        self._batches = 0

    def _done(self, what: str, total: float) -> str:
        elapsed = time.monotonic() - self._start
        of = f"/{int(total)}" if math.isfinite(total) else ""
        rate = f", {self._batches / elapsed:.3g} batches/s" if elapsed > 0 else ""
        return f"{what}: {self._batches}{of} batches in {_duration(elapsed)}{rate}"

    def _epoch(self, trainer: Trainer) -> str:
        last = f"/{trainer.max_epochs - 1}" if trainer.max_epochs is not None and trainer.max_epochs > 0 else ""
        return f"Epoch {trainer.current_epoch}{last}"

    # ---- training
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._batches += 1
        now = time.monotonic()
        if not self._enabled or self.every_s is None or now - self._last < self.every_s:
            return
        self._last = now
        text = self._done(self._epoch(trainer), self.total_train_batches)
        total = self.total_train_batches
        if math.isfinite(total) and self._batches < total:
            text += f", about {_duration((total - self._batches) * (now - self._start) / self._batches)} to go"
        self._write(text, trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled:
            self._write(self._done(self._epoch(trainer), self.total_train_batches), trainer, pl_module)

    # ---- validate / test / predict on their own
    def _eval_start(self, trainer: Trainer) -> None:
        if trainer.state.fn != "fit":
            self._begin()

    def _eval_batch(self) -> None:
        self._batches += 1

    def _eval_end(self, trainer: Trainer, pl_module: LightningModule, what: str, total: Any) -> None:
        if self._enabled and trainer.state.fn != "fit" and not trainer.sanity_checking:
            total = sum(total) if isinstance(total, list) else total
            self._write(self._done(what, total), trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.state.fn != "fit":
            self._eval_batch()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, pl_module, self.validation_description, trainer.num_val_batches)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._eval_batch()

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, pl_module, self.test_description, trainer.num_test_batches)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._eval_batch()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, pl_module, self.predict_description, trainer.num_predict_batches)


def progress_bar_for_logs(trainer_config: dict[str, Any], interactive: bool) -> list[Any] | None:
    """The callbacks to build the Trainer with so that its progress suits a log file, or None to leave them as the
    config has them: when stdout is a terminal (``interactive``), when the config turns the bar off, or when it names
    a progress bar of its own."""
    if interactive or trainer_config.get("enable_progress_bar") is False:
        return None
    callbacks = trainer_config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
    if any(isinstance(cb, ProgressBar) for cb in callbacks):
        return None
    return [*callbacks, LineProgressBar()]
