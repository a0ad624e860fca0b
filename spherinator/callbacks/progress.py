"""A progress bar for log files: :class:`LineProgressBar`."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar

# The stage of a validate, test or predict run (Trainer.state.fn) as ProgressBar names its description.
_EVAL_STAGES = {"validate": "validation", "test": "test", "predict": "predict"}


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
        self._total = math.inf

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

    def _begin(self, total: float) -> None:
        self._start = self._last = time.monotonic()
        self._batches = 0
        self._total = total

    def _done(self, what: str) -> str:
        elapsed = time.monotonic() - self._start
        of = f"/{int(self._total)}" if math.isfinite(self._total) else ""
        rate = f", {self._batches / elapsed:.3g} batches/s" if elapsed > 0 else ""
        return f"{what}: {self._batches}{of} batches in {_duration(elapsed)}{rate}"

    def _epoch(self, trainer: Trainer) -> str:
        last = f"/{trainer.max_epochs - 1}" if trainer.max_epochs is not None and trainer.max_epochs > 0 else ""
        # Under max_steps the run ends at a step, maybe within an epoch: say where it stands.
        steps = f" (step {trainer.global_step}/{trainer.max_steps})" if trainer.max_steps > 0 else ""
        return f"Epoch {trainer.current_epoch}{last}{steps}"

    def _to_go(self, trainer: Trainer, now: float) -> str:
        left = self._total - self._batches
        if trainer.max_steps > 0:
            left = min(left, trainer.max_steps - trainer.global_step)
        if not (math.isfinite(left) and left > 0):
            return ""
        return f", about {_duration(left * (now - self._start) / self._batches)} to go"

    # ---- training
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The number of batches is taken now: when max_steps ends the run, Lightning has reset it by the epoch's end.
        self._begin(self.total_train_batches)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._batches += 1
        now = time.monotonic()
        if not self._enabled or self.every_s is None or now - self._last < self.every_s:
            return
        self._last = now
        self._write(self._done(self._epoch(trainer)) + self._to_go(trainer, now), trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled:
            self._write(self._done(self._epoch(trainer)), trainer, pl_module)

    # ---- validate / test / predict on their own (a validation within fit is part of its epoch): the three report
    # alike, so one set of hooks serves them all
    def _eval_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit":
            self._begin(math.inf)

    def _eval_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.state.fn != "fit":
            self._batches += 1

    def _eval_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled or trainer.state.fn == "fit" or trainer.sanity_checking:
            return
        stage = _EVAL_STAGES[trainer.state.fn]
        total = getattr(trainer, f"num_{'val' if stage == 'validation' else stage}_batches")
        self._total = sum(total) if isinstance(total, list) else total
        self._write(self._done(getattr(self, f"{stage}_description")), trainer, pl_module)

    on_validation_start = on_test_start = on_predict_start = _eval_start
    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _eval_batch_end
    on_validation_end = on_test_end = on_predict_end = _eval_end


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
