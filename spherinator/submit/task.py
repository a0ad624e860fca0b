"""What runs inside each Slurm task: ``spherinator fit`` on the run dir's config, requeue on USR2, ONNX export.

Requeue uses one mechanism, Submitit's: the batch script asks Slurm for USR2 ``signal_delay_s`` before the time
limit (``--signal=USR2@N``, also on preemption); Submitit calls :meth:`TrainingTask.checkpoint`, which resubmits
the same task, runs ``scontrol requeue`` and exits. Lightning's own SLURM auto-requeue is switched off in the
config (``SLURMEnvironment(auto_requeue=False)``). A signal handler must not save a checkpoint in the middle of
an optimizer step, so USR2 only raises a flag; :class:`RequeueOnSignal` acts on it at the next point a resumed run
continues from without losing anything (all ranks agree on it first, so a DDP checkpoint is saved collectively),
saves ``checkpoints/requeue.ckpt`` and hands over to Submitit's handler. The requeued run resumes from the newest
checkpoint into the same run dir and the same TensorBoard run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

SUMMARY_NAME = "summary.json"
REQUEUE_CKPT = "requeue.ckpt"

# Process-wide state shared by the USR2 handler, the callback and the task (one task per process).
_pending_signal: int | None = None
_submitit_handler: Any = None
_training = False


def _defer_signal(signum: int, frame: Any) -> None:
    """USR2 while training: remember it for RequeueOnSignal; otherwise let Submitit handle it at once."""
    global _pending_signal
    if _training:
        _pending_signal = signum
    elif callable(_submitit_handler):
        _submitit_handler(signum, frame)


def install_signal_deferral() -> None:
    """Put :func:`_defer_signal` in front of the USR2 handler Submitit installed (no-op outside Submitit)."""
    global _submitit_handler
    if _submitit_handler is not None:
        return
    current = signal.getsignal(signal.SIGUSR2)
    if callable(current) and current is not _defer_signal:
        _submitit_handler = current
        signal.signal(signal.SIGUSR2, _defer_signal)


def write_summary(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Update ``run_dir/summary.json`` with ``fields`` (atomically: readers never see half a file)."""
    path = Path(run_dir) / SUMMARY_NAME
    summary: dict[str, Any] = {}
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError:
            summary = {}
    summary.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tmp = path.with_name(f".{SUMMARY_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)
    return summary


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _metrics(trainer: Trainer) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _best(trainer: Trainer) -> dict[str, Any] | None:
    """The monitored best of the first ModelCheckpoint with a monitor; else the final val_loss (or train_loss)."""
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "monitor", None) and cb.best_model_score is not None:
            return {"monitor": cb.monitor, "value": float(cb.best_model_score), "checkpoint": cb.best_model_path}
    metrics = _metrics(trainer)
    for key in ("val_loss", "train_loss"):
        if key in metrics:
            return {"monitor": key, "value": metrics[key], "checkpoint": None, "kind": "final"}
    return None


class RequeueOnSignal(Callback):
    """Checkpoint and requeue at a safe point after Slurm's USR2 (time limit or preemption).

    Added to every config that ``spherinator-submit`` composes; outside a Submitit job it only keeps
    ``summary.json`` up to date at each epoch end (epoch, metrics, best checkpoint).

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

    Args:
        check_in_validation: Also act on the signal between validation batches. Under DDP every rank must then run
            the same number of validation batches (Lightning's DistributedSampler and spherinator's DataModule
            do); set False for a data module that does not.
    """

    def __init__(self, check_in_validation: bool = True) -> None:
        self.check_in_validation = check_in_validation
        self._stop = False  # some rank got the signal (agreed by all ranks)
        self._saved = False  # requeue.ckpt written after a training batch: leave at the next safe point
        self._unfinished_validation = False  # the checkpoint being written is saved before/inside a validation
        self._validation_cut: int | None = None  # epoch whose validation a previous attempt was requeued in

    def state_dict(self) -> dict[str, Any]:
        return {"validation_cut": self._validation_cut}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validation_cut = state_dict.get("validation_cut")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        global _training
        _training = True
        self._stop = self._saved = False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        global _training
        _training = False

    def _requested(self, trainer: Trainer) -> bool:
        """Whether any rank got the signal. A collective until it is True: every rank calls it at the same point."""
        if not self._stop:
            self._stop = trainer.strategy.reduce_boolean_decision(_pending_signal is not None, all=False)
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
        if self._saved:
            self._leave(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
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
        global _training
        _training = False
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
        try:
            trainer.save_checkpoint(path)
        finally:
            self._unfinished_validation = False
        if trainer.is_global_zero:
            write_summary(
                run_dir, state="REQUEUEING", epoch=trainer.current_epoch, global_step=trainer.global_step,
                requeue_checkpoint=str(path), requeued_during=during,
            )  # fmt: skip

    def _leave(self, trainer: Trainer) -> None:
        global _pending_signal
        signum = _pending_signal or signal.SIGUSR2
        _pending_signal = None
        self._stop = self._saved = False
        for logger in trainer.loggers:
            logger.finalize("requeued")
        _hand_over(signum)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            write_summary(
                Path(trainer.default_root_dir), state="RUNNING", epoch=trainer.current_epoch + 1,
                global_step=trainer.global_step, metrics=_metrics(trainer), best=_best(trainer),
            )  # fmt: skip


def _ignore_signal_from_now_on() -> None:
    """The task's work is done: a USR2 now must neither requeue it nor kill it. It can land while Submitit writes the
    result or while Python exits, and Python puts the default handlers back when it exits: USR2's default action
    kills the task, which Slurm then counts as FAILED although the summary says COMPLETED."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _hand_over(signum: int) -> None:
    """Let Submitit checkpoint (TrainingTask.checkpoint), requeue and exit; ranks > 0 just stop."""
    global _training
    _training = False
    if callable(_submitit_handler):
        _submitit_handler(signum, None)  # rank 0: requeues and raises SystemExit; other ranks: returns
    raise SystemExit(-1)


def _mark_validation_unfinished(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint saved at the start of, or inside, a validation of ``fit`` resume by running it again.

    Lightning resumes a checkpoint whose validation progress says "started a batch, not processed it" by going back
    to that validation (its mid-evaluation restart); with none of the batches counted as done it starts from the
    first. Any other progress there makes the resumed run skip the validation. The progress is Lightning's loop
    state (``loops.fit_loop``, the same layout in all of lightning 2.6, the range pyproject allows).
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.val_loop.batch_progress")
    if progress is None:
        return
    current, total = progress["current"], progress["total"]
    # `total` counts the validation batches of this epoch (several validations per epoch with val_check_interval)
    done_before = {key: total[key] - current[key] for key in ("ready", "started", "processed", "completed")}
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["total"] = {key: done_before[key] + progress["current"][key] for key in done_before}
    progress["is_last_batch"] = False


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the newer of ``requeue.ckpt`` (saved on a signal) and ``last.ckpt``."""
    candidates = [p for p in (Path(run_dir) / "checkpoints").glob("*.ckpt") if p.name.startswith(("requeue", "last"))]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resume_point(run_dir: Path) -> tuple[Path | None, str | None]:
    """The checkpoint to resume from and, when the newest one is damaged, that one's path (a kill while it was
    written, from before checkpoints were written atomically): the newest intact checkpoint beside it is used."""
    from spherinator.checkpoints import resume_checkpoint

    newest = newest_checkpoint(run_dir)
    if newest is None:
        return None, None
    chosen, warning = resume_checkpoint(newest)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return chosen, str(newest) if chosen != newest else None


def _link_logs(run_dir: Path) -> None:
    """Links to this process's Submitit stdout/stderr files in ``run_dir/logs`` (logs stay in one place)."""
    try:
        import submitit

        env = submitit.JobEnvironment()
        logs = run_dir / "logs"
        logs.mkdir(exist_ok=True)
        for source in (env.paths.stdout, env.paths.stderr):
            link = logs / Path(source).name
            if not link.is_symlink():
                link.symlink_to(Path(source).resolve())
    except (RuntimeError, OSError):
        pass  # not inside a Submitit job, or a link raced with another rank


def _package_dir() -> Path:
    import spherinator

    return Path(spherinator.__file__).resolve().parent


def package_files(package: Path) -> list[Path]:
    """The files of a package dir that make up its code (no byte-code caches)."""
    return sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def code_hash(package: Path | None = None) -> str:
    """``sha256:<16 hex>`` of the spherinator package's files (default: the one imported)."""
    package = package or _package_dir()
    digest = hashlib.sha256()
    for path in package_files(package):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"sha256:{digest.hexdigest()[:16]}"


def git_state(package: Path) -> str | None:
    """``<commit>`` or ``<commit>+uncommitted changes`` of the checkout ``package`` is in; None outside git."""
    try:
        run = {"cwd": package, "capture_output": True, "text": True, "timeout": 20, "check": True}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+uncommitted changes" if dirty else commit


_INHERITED_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def _rank() -> int:
    for var in ("SLURM_PROCID", "RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class TrainingTask:
    """One task of a sweep, as Submitit runs it in every Slurm task (one per process/device).

    Submitit requeues any callable with a ``checkpoint`` method (it checks ``hasattr``), so no Submitit base class
    is needed: ``submitit`` is only imported inside the job, and ``RequeueOnSignal`` (in every task's config)
    stays cheap to import.

    Args:
        run_dir: The task's run dir holding the composed ``config.yaml``.
        cwd: Working directory of the submission (relative data paths in the config are relative to it).
        export: Export the best (else last) checkpoint to ``run_dir/onnx`` after training, and validate it.
        code_version: The code the task was submitted with (:func:`code_hash` of the sweep's code snapshot, then
            its git state): a task that would import other code refuses to run.
    """

    def __init__(
        self, run_dir: str | Path, cwd: str | Path | None = None, export: bool = True, code_version: str | None = None
    ) -> None:
        self.run_dir = str(Path(run_dir).resolve())
        self.cwd = str(cwd or Path.cwd())
        self.export = export
        self.code_version = code_version

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by Submitit on USR2 (rank 0): resubmit this task; it resumes from the newest checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TrainingTask(self.run_dir, self.cwd, self.export, self._code_version))

    @property
    def _code_version(self) -> str | None:
        return getattr(self, "code_version", None)  # tasks pickled before code versions were recorded have none

    def _check_code(self) -> None:
        """Refuse to train with other code than the task was submitted with."""
        expected = self._code_version
        if not expected:
            return
        running = code_hash()
        if running != expected.split()[0]:
            raise RuntimeError(
                f"this task was submitted with spherinator {expected} but imports {running} from {_package_dir()}: "
                "the sweep's code snapshot is missing or was changed; submit the sweep again"
            )

    def __call__(self) -> dict[str, Any] | None:
        from spherinator.cli import SpherinatorCLI

        os.chdir(self.cwd)
        if self.cwd not in sys.path:  # Python started in the code snapshot: modules of the submit dir, last
            sys.path.append(self.cwd)
        # sbatch exports the submitting shell's environment: a MASTER_PORT or RANK left there by an earlier
        # torch.distributed run must not steer this job's rendezvous, which Lightning derives from Slurm.
        for var in _INHERITED_DIST_VARS:
            os.environ.pop(var, None)
        run_dir = Path(self.run_dir)
        rank = _rank()
        _link_logs(run_dir)
        install_signal_deferral()
        argv, sys.argv = sys.argv, sys.argv[:1]  # Submitit's own arguments are not for the CLI
        try:
            self._check_code()
            resume, damaged = resume_point(run_dir)
            args = ["fit", "--config", str(run_dir / "config.yaml")]
            if resume is not None:
                args += ["--ckpt_path", str(resume)]
            if rank == 0:
                previous = read_summary(run_dir)
                write_summary(
                    run_dir, state="RUNNING", job_id=os.environ.get("SLURM_JOB_ID"), host=socket.gethostname(),
                    started=time.strftime("%Y-%m-%dT%H:%M:%S"), attempts=int(previous.get("attempts", 0)) + 1,
                    resumed_from=str(resume) if resume else None, damaged_checkpoint=damaged, error=None,
                    code_version=self._code_version,
                )  # fmt: skip
            cli = SpherinatorCLI(args=args)
        except BaseException as err:
            if rank == 0 and not isinstance(err, SystemExit):
                write_summary(run_dir, state="FAILED", error=f"{type(err).__name__}: {err}",
                              traceback=traceback.format_exc(limit=20))  # fmt: skip
            raise
        finally:
            sys.argv = argv
        trainer = cli.trainer
        if rank != 0:
            _ignore_signal_from_now_on()
            return None
        summary = write_summary(
            run_dir, state="TRAINED", epoch=trainer.current_epoch, global_step=trainer.global_step,
            metrics=_metrics(trainer), best=_best(trainer),
            last_checkpoint=str(newest_checkpoint(run_dir) or ""),
        )  # fmt: skip
        onnx = self._export(run_dir, trainer) if self.export else None
        done = write_summary(run_dir, state="COMPLETED", onnx=onnx, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _ignore_signal_from_now_on()
        return done | {"run_dir": str(run_dir), "best": summary.get("best")}

    def _export(self, run_dir: Path, trainer: Trainer) -> dict[str, Any]:
        """Export the best (else last) checkpoint to ONNX and validate it; failures are reported, not raised."""
        from spherinator.export import ExportError, ValidationError, export_onnx

        best = _best(trainer)
        ckpt = Path(best["checkpoint"]) if best and best.get("checkpoint") else None
        if ckpt is None or not ckpt.is_file():
            last = Path(trainer.checkpoint_callback.last_model_path) if trainer.checkpoint_callback else None
            ckpt = last if last is not None and last.is_file() else newest_checkpoint(run_dir)
        if ckpt is None:
            return {"validated": False, "error": f"no checkpoint under {run_dir / 'checkpoints'} to export"}
        out = run_dir / "onnx"
        try:
            report = export_onnx(ckpt, out, config=run_dir / "config.yaml", overwrite=True)
        except ValidationError as err:
            return {"checkpoint": str(ckpt), "path": str(out), "validated": False, "error": str(err),
                    "report": err.report}  # fmt: skip
        except ExportError as err:
            return {"checkpoint": str(ckpt), "path": str(out), "validated": False, "error": str(err)}
        return {
            "checkpoint": str(ckpt),
            "path": str(out),
            "validated": bool(report.get("passed")),
            "graphs": sorted(report.get("graphs", {})),
        }
