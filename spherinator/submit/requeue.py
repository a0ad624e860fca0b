"""Requeue on Slurm's signal at a safe point: :class:`RequeueOnSignal`, and the USR2 hand-over to Submitit.

Requeue uses one mechanism, Submitit's: the batch script asks Slurm for USR2 ``signal_delay_s`` before the time
limit (``--signal=USR2@N``, also on preemption); Submitit calls :meth:`TrainingTask.checkpoint`, which resubmits
the same task, runs ``scontrol requeue`` and exits. Lightning's own SLURM auto-requeue is switched off in the
config (``SLURMEnvironment(auto_requeue=False)``). A signal handler must not save a checkpoint in the middle of
an optimizer step, so USR2 only raises a flag (:class:`RequeueSignal`); :class:`RequeueOnSignal` acts on it at the
next point a resumed run continues from without losing anything (all ranks agree on it first, so a DDP checkpoint
is saved collectively), saves ``checkpoints/requeue.ckpt`` and hands over to Submitit's handler. The requeued run
resumes from the newest checkpoint into the same run dir and the same TensorBoard run.
"""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from spherinator.submit.records import Best, RunSummary
from spherinator.submit.sweep import short_keys

REQUEUE_CKPT = "requeue.ckpt"


@dataclass
class RequeueSignal:
    """USR2 as this process has it: one per process, since a signal handler is process-wide.

    Attributes:
        pending: The signal that came while training and waits for :class:`RequeueOnSignal`; None when none did.
        submitit_handler: The USR2 handler Submitit installed (which checkpoints, requeues and exits), kept here
            while :meth:`defer` stands in front of it; None outside a Submitit job.
        training: Whether a ``fit`` is training, so that a signal must wait for a safe point.
    """

    pending: int | None = None
    submitit_handler: Callable[[int, Any], Any] | None = None
    training: bool = False

    def defer(self, signum: int, frame: Any) -> None:
        """The USR2 handler: while training remember the signal for RequeueOnSignal; otherwise let Submitit handle
        it at once."""
        if self.training:
            self.pending = signum
        elif callable(self.submitit_handler):
            self.submitit_handler(signum, frame)

    def install(self) -> None:
        """Put :meth:`defer` in front of the USR2 handler Submitit installed (no-op outside Submitit)."""
        if self.submitit_handler is not None:
            return
        current = signal.getsignal(signal.SIGUSR2)
        if callable(current) and current != self.defer:
            self.submitit_handler = current
            signal.signal(signal.SIGUSR2, self.defer)

    def hand_over(self) -> None:
        """Let Submitit checkpoint (TrainingTask.checkpoint), requeue and exit; ranks > 0 just stop."""
        signum = self.pending or signal.SIGUSR2
        self.pending = None
        self.training = False
        if callable(self.submitit_handler):
            self.submitit_handler(signum, None)  # rank 0: requeues and raises SystemExit; other ranks: returns
        raise SystemExit(-1)


# The process's signal state: the task installs it, RequeueOnSignal reads and clears it.
REQUEUE_SIGNAL = RequeueSignal()


def ignore_signal_from_now_on() -> None:
    """The task's work is done: a USR2 now must neither requeue it nor kill it. It can land while Submitit writes the
    result or while Python exits, and Python puts the default handlers back when it exits: USR2's default action
    kills the task, which Slurm then counts as FAILED although the summary says COMPLETED."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def logged_metrics(trainer: Trainer) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def best_model(trainer: Trainer) -> Best | None:
    """The monitored best of the first ModelCheckpoint with a monitor; else the final val_loss (or train_loss)."""
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "monitor", None) and cb.best_model_score is not None:
            return Best(cb.monitor, float(cb.best_model_score), cb.best_model_path)
    metrics = logged_metrics(trainer)
    for key in ("val_loss", "train_loss"):
        if key in metrics:
            return Best(key, metrics[key], None, kind="final")
    return None


def swept_hparams(swept: dict[str, Any]) -> dict[str, Any]:
    """The swept values of a task by their short names (``beta``, ``lr``), as the HParams tab compares them."""
    names = short_keys(list(swept))
    return {names[key]: _number(value) for key, value in swept.items()}


def _number(value: Any) -> int | float | str:
    """A swept value as the HParams tab compares it: ``16`` and ``1e-3`` as numbers, anything else as text.

    The values come as the command line gave them (strings) or as the task's config.yaml reads them back (YAML
    makes ``1e-3`` a number there)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    text = value if isinstance(value, str) else json.dumps(value)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def log_swept_hparams(trainer: Trainer, hparams: dict[str, Any]) -> None:
    """Give every logger the swept values; TensorBoard's HParams tab gets them as this run's session.

    Lightning's TensorBoardLogger writes the HParams session only together with a metric (``hp_metric``, which the
    launcher turns off so that a requeued run does not log it again at -1); the session is written here without
    one, and TensorBoard takes the metrics from the run's own scalars (val_loss, ...).
    """
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
        if isinstance(logger, TensorBoardLogger):
            _, session_start, _ = hparams_summaries(hparams, {})
            logger.experiment.file_writer.add_summary(session_start)


class RequeueOnSignal(Callback):
    """Checkpoint and requeue at a safe point after Slurm's USR2 (time limit or preemption).

    Added to every config that ``spherinator-submit`` composes; outside a Submitit job it only keeps
    ``summary.json`` up to date at each epoch end (epoch, metrics, best checkpoint). In a sweep it also logs the
    task's swept values as hyperparameters (TensorBoard's HParams tab compares the tasks by them).

    Where it stops, and why there (Lightning 2.6's loops decide what a resumed run does with a checkpoint):

    - After a training batch whose optimizer step is done, ``requeue.ckpt`` is saved, Lightning's own resume point
      (``ModelCheckpoint(every_n_train_steps)`` saves there too). The process leaves at the next training batch's
      start, once Lightning has logged that batch. If a validation starts first, it leaves there instead: a
      checkpoint from the batch before a validation resumes *past* that validation (Lightning counts the epoch or
      the validation check as done), so one epoch would have no ``val_loss``.
    - Between validation batches (``check_in_validation``): a validation longer than the signal delay would
      otherwise be killed by the time limit. Lightning keeps no partial validation metrics in a checkpoint, so the
      one saved here (and at a validation's start) says that validation has not run: the resumed run starts it
      again from its first batch, then trains on.
    - At the end of training (the signal came during the last epoch's end or validation): it requeues, so that the
      ONNX export runs in a fresh time limit.

    ``requeue.ckpt`` (and a checkpoint saved before it leaves, such as ``last.ckpt`` at the epoch's end) also holds
    the random generators (torch, CUDA, NumPy, Python) as they were where it stops (at a cut validation: as they were
    when it began); the resumed run sets them where it reaches that point again. A requeue at an epoch's end (with
    or without its validation) or in its closing validation then logs the values of a run never stopped (tested). In
    the middle of an epoch (also in a validation there, ``val_check_interval`` < 1) the rows left train in another
    order (:meth:`spherinator.data.transport.Loader.resume`), so the values differ from there on.

    Args:
        check_in_validation: Also act on the signal between validation batches. Under DDP every rank must then run
            the same number of validation batches (Lightning's DistributedSampler and spherinator's DataModule
            do); set False for a data module that does not.
        swept: The task's swept config keys and values as given on the command line
            (``{"model.init_args.beta": "1e-3"}``); ``spherinator-submit`` writes them into each task's config.
            None or {}: no sweep, no hyperparameters logged.
    """

    def __init__(self, check_in_validation: bool = True, swept: dict[str, Any] | None = None) -> None:
        self.check_in_validation = check_in_validation
        self.swept = dict(swept or {})
        self.signal = REQUEUE_SIGNAL
        self._stop = False  # some rank got the signal (agreed by all ranks)
        self._saved = False  # requeue.ckpt written after a training batch: leave at the next safe point
        self._unfinished_validation = False  # the checkpoint being written is saved before/inside a validation
        self._validation_cut: int | None = None  # epoch whose validation a previous attempt was requeued in
        self._random_state: dict[str, Any] | None = None  # saved with requeue.ckpt: the generators where it stops
        self._random_at_validation: dict[str, Any] | None = None  # ... or where the validation it cuts began
        self._resume_random_state: dict[str, Any] | None = None  # read from requeue.ckpt, set when training starts

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"validation_cut": self._validation_cut}
        if self._random_state is not None:  # only in requeue.ckpt
            state["random_state"] = self._random_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validation_cut = state_dict.get("validation_cut")
        self._resume_random_state = state_dict.get("random_state")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self.swept:
            log_swept_hparams(trainer, swept_hparams(self.swept))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.signal.training = True
        self._stop = self._saved = False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.signal.training = False

    def _requested(self, trainer: Trainer) -> bool:
        """Whether any rank got the signal. A collective until it is True: every rank calls it at the same point."""
        if not self._stop:
            self._stop = trainer.strategy.reduce_boolean_decision(self.signal.pending is not None, all=False)
        return self._stop

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if self._saved or not self._requested(trainer):
            return
        last = batch_idx + 1 >= trainer.num_training_batches
        if (batch_idx + 1) % trainer.accumulate_grad_batches and not last:
            return  # inside a gradient accumulation window: its partial gradients would be in no checkpoint
        self._save(trainer, "training")
        self._saved = True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._continue_random_state("training")
        if self._saved:
            self._leave(trainer)

    def _continue_random_state(self, at: str) -> None:
        """Set the generators requeue.ckpt saved, at the point of the resumed run that corresponds to where they
        were taken (the next training batch, or the start of the cut validation): what Lightning and the data loaders
        draw from them on the way there (the sanity check, each loader's seed) is then drawn before, as in a run
        that was never stopped."""
        state = self._resume_random_state
        if state is not None and not isinstance(state, dict):
            self._resume_random_state = None
            rank_zero_warn(f"the checkpoint's random generator state is no state ({type(state).__name__}); the "
                           "resumed run goes on with other random draws than the stopped one would have")  # fmt: skip
        elif isinstance(state, dict) and state.get("at") == at:
            self._resume_random_state = None
            try:
                set_random_state(state)
            except (TypeError, ValueError, RuntimeError) as err:  # a checkpoint edited or of another machine
                rank_zero_warn(f"the checkpoint's random generator state cannot be set ({err}); the resumed run "
                               "goes on with other random draws than the stopped one would have")  # fmt: skip

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._continue_random_state("validation")
            self._random_at_validation = random_state()
        if self._saved and not trainer.sanity_checking:
            self._save(trainer, "validation", unfinished_validation=True)
            self._leave(trainer)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if not self.check_in_validation or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._requested(trainer):
            self._save(trainer, "validation", unfinished_validation=True)
            self._leave(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.signal.training = False
        if self._saved or self._requested(trainer):
            self._save(trainer, "the end of training")  # a checkpoint of finished training: the resume only exports
            self._leave(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._unfinished_validation:
            _mark_validation_unfinished(checkpoint)

    def _save(self, trainer: Trainer, during: str, unfinished_validation: bool = False) -> None:
        run_dir = Path(trainer.default_root_dir)
        path = run_dir / "checkpoints" / REQUEUE_CKPT
        if unfinished_validation:
            if self._validation_cut == trainer.current_epoch:
                rank_zero_warn(
                    f"the validation of epoch {trainer.current_epoch} was cut short by the time limit again: a "
                    "requeued run redoes a whole validation, and this one takes longer than what the time limit "
                    "leaves after resuming; raise --time, or lower trainer.limit_val_batches"
                )
            self._validation_cut = trainer.current_epoch
        self._unfinished_validation = unfinished_validation
        if unfinished_validation:
            self._random_state = {**(self._random_at_validation or random_state()), "at": "validation"}
        elif during == "training":
            self._random_state = {**random_state(), "at": "training"}
        try:
            trainer.save_checkpoint(path)
        finally:
            self._unfinished_validation = False
        # until it leaves, the checkpoints saved on the way (last.ckpt at the epoch's end, newer than requeue.ckpt at
        # the same step, and so the one resumed) hold the same generators: nothing draws from them in between
        if trainer.is_global_zero:
            summary = RunSummary.read(run_dir)
            summary.requeueing(trainer.current_epoch, trainer.global_step, str(path), during).save(run_dir)

    def _leave(self, trainer: Trainer) -> None:
        self._stop = self._saved = False
        self._random_state = None
        if trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            RunSummary.read(run_dir).requeued().save(run_dir)
        for logger in trainer.loggers:
            logger.finalize("requeued")
        self.signal.hand_over()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            run_dir = Path(trainer.default_root_dir)
            summary = RunSummary.read(run_dir)
            epoch, step = trainer.current_epoch + 1, trainer.global_step
            summary.progress(epoch, step, logged_metrics(trainer), best_model(trainer)).save(run_dir)


def random_state() -> dict[str, Any]:
    """The process's random generators (torch CPU and CUDA, NumPy's legacy global, Python's) as plain values that a
    weights-only load reads: a requeued run continues their sequences where the killed one stopped, so that its
    sampled latents, dropout and augmentations are those of a run that was never stopped."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Set the generators :func:`random_state` saved (each one present; CUDA's only where this rank has a GPU)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _mark_validation_unfinished(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint saved at the start of, or inside, a validation of ``fit`` resume by running it again.

    Lightning resumes a checkpoint whose validation progress says "started a batch, not processed it" by going back
    to that validation (its mid-evaluation restart); with none of the batches counted as done it starts from the
    first. Any other progress there makes the resumed run skip the validation. The progress is Lightning's loop
    state (``loops.fit_loop``, the same layout in all of lightning 2.6, the range pyproject allows).

    Why this one place edits the saved loop state (measured against lightning 2.6.6; the test of a requeue in a
    validation fails without it): a resumed ``fit`` reruns a validation only when the checkpoint's validation progress
    is "mid-evaluation" (``loops/evaluation_loop.py:215-224``: started == ready, processed == started - 1); any other
    state is skipped (``loops/training_epoch_loop.py:281-292``: ``_skip_next_val`` for a checkpoint saved after the
    epoch's last batch, else ``increment_progress_to_evaluation_end``). That state exists only *inside* a
    ``validation_step`` (between ``increment_started`` and ``increment_processed``, ``evaluation_loop.py:433-443``),
    where no callback hook runs, and saving there would mean a checkpoint in the first batch of every validation, before
    any signal came (the one of batch k resumes with k batches counted as done). Running the cut validation with
    ``trainer.validate`` before the resumed ``fit`` is public but not the same run: ModelCheckpoint and EarlyStopping
    act only while fitting (``callbacks/model_checkpoint.py:629``, ``callbacks/early_stopping.py:211``), so the cut
    epoch would have no last/best checkpoint and no stopping check.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.val_loop.batch_progress")
    if progress is None:
        return
    current, total = progress["current"], progress["total"]
    # `total` counts the validation batches of this epoch (several validations per epoch with val_check_interval);
    # those completed before this validation count. Its "ready"/"started" may hold one more from an earlier cut of
    # this same validation (the state written here, which a resumed run keeps in `total`): counted as such they
    # made a second cut of one validation resume past it, with no val_loss for the epoch.
    done_before = total["completed"] - current["completed"]
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["total"] = {key: done_before + progress["current"][key] for key in progress["current"]}
    progress["is_last_batch"] = False
