"""What a sweep keeps on disk: ``sweep.json`` (its manifest) and each task's ``summary.json``.

Both are written atomically (temp file + rename: a reader never sees half a file). Reading them needs neither torch
nor Lightning, so that ``spherinator-submit status`` starts at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spherinator.submit.sweep import SubmitError

MANIFEST_NAME = "sweep.json"
SUMMARY_NAME = "summary.json"

# States a task's summary.json records (the task writes them; Slurm's own states are another matter).
RUNNING, REQUEUEING, TRAINED, COMPLETED, FAILED = "RUNNING", "REQUEUEING", "TRAINED", "COMPLETED", "FAILED"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _seconds(stamp: str | None) -> float | None:
    """Seconds since the epoch of a ``_now()`` stamp (local time), None for none or an unreadable one."""
    if not stamp:
        return None
    try:
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def _write_json(path: Path, content: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2, default=str) + "\n")
    tmp.replace(path)


@dataclass
class Best:
    """The model a task would export: the best of its first monitored ModelCheckpoint, else its final loss.

    Attributes:
        monitor: The metric (``val_loss``).
        value: Its value.
        checkpoint: The checkpoint holding that model; None for a final value without a checkpoint of its own.
        kind: ``monitored`` (the ModelCheckpoint's best) or ``final`` (the metric at the end of training).
    """

    monitor: str
    value: float
    checkpoint: str | None = None
    kind: str = "monitored"


@dataclass
class RunSummary:
    """A task's ``summary.json``: what it is doing, how far it got, and how each attempt ended.

    Only rank 0 of a task writes it, through :meth:`save`; the task and :class:`RequeueOnSignal` change it through
    the methods below, one per event.

    Attributes:
        state: ``RUNNING``, ``REQUEUEING`` (checkpointed on Slurm's signal, requeued), ``TRAINED`` (training done,
            export and atlas running), ``COMPLETED`` or ``FAILED``; None before the task first started.
        attempts: How often the task started (the first run, each requeue and each ``--resume``).
        requeues: How often it checkpointed and requeued itself on Slurm's signal (time limit, preemption).
        job_id: The Slurm job of the current (or last) attempt.
        host: The host of rank 0 in that attempt.
        started: When the first attempt started.
        attempt_started: When the current (or last) attempt started.
        attempt_ended: When the last attempt ended, as far as it said so (a killed one says nothing).
        earlier_attempts_s: Wall time of the attempts before the current one, in seconds.
        updated: The last time anything was recorded.
        finished: When the task completed.
        epoch: Epochs done.
        global_step: Optimizer steps done.
        metrics: The last value of every logged metric.
        best: See :class:`Best`.
        resumed_from: The checkpoint the current attempt resumed from.
        damaged_checkpoint: A newer checkpoint that could not be read, so the one before it was resumed from.
        requeue_checkpoint: The checkpoint saved on the last signal.
        requeued_during: ``training``, ``validation`` or ``the end of training``.
        last_checkpoint: The newest checkpoint when training ended.
        code_version: The spherinator code the task runs (``sha256:...`` of its sweep's snapshot).
        error: ``Type: message`` of the exception that stopped the task.
        traceback: Its traceback.
        onnx: The ONNX export's result (``validated``, ``path``, ``error``, ...).
        atlas: The atlas's result (``written``, ``path``, ``max_order``, ``tiles``, ``rows``, ``seconds``, ``error``
            or ``skipped``; see ``spherinator atlas``); None when none was asked for.
    """

    state: str | None = None
    attempts: int = 0
    requeues: int = 0
    job_id: str | None = None
    host: str | None = None
    started: str | None = None
    attempt_started: str | None = None
    attempt_ended: str | None = None
    earlier_attempts_s: float = 0.0
    updated: str | None = None
    finished: str | None = None
    epoch: int | None = None
    global_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    best: Best | None = None
    resumed_from: str | None = None
    damaged_checkpoint: str | None = None
    requeue_checkpoint: str | None = None
    requeued_during: str | None = None
    last_checkpoint: str | None = None
    code_version: str | None = None
    error: str | None = None
    traceback: str | None = None
    onnx: dict[str, Any] | None = None
    atlas: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------------------------- reading, writing
    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> RunSummary:
        """A summary from its JSON form; keys it does not know (from another version) are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in content.items() if k in known}
        best = values.get("best")
        values["best"] = Best(**best) if isinstance(best, dict) and {"monitor", "value"} <= best.keys() else None
        return cls(**values)

    @classmethod
    def read(cls, run_dir: str | Path) -> RunSummary:
        """``run_dir/summary.json``; an empty summary when there is none (the task has not started) or it is not
        readable."""
        try:
            content = json.loads((Path(run_dir) / SUMMARY_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            return cls()
        return cls.from_dict(content) if isinstance(content, dict) else cls()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, run_dir: str | Path) -> RunSummary:
        """Write ``run_dir/summary.json`` (the one place that does), stamped with the time."""
        self.updated = _now()
        _write_json(Path(run_dir) / SUMMARY_NAME, self.to_dict())
        return self

    # ---------------------------------------------------------------------------------------------- events
    def start_attempt(
        self, job_id: str | None, host: str, resumed_from: str | None, damaged: str | None, code_version: str | None
    ) -> RunSummary:
        now = _now()
        started, ended = _seconds(self.attempt_started), _seconds(self.attempt_ended or self.updated)
        if started is not None and ended is not None and ended > started:
            self.earlier_attempts_s += ended - started
        self.state, self.job_id, self.host = RUNNING, job_id, host
        self.attempts += 1
        self.started = self.started or now
        self.attempt_started, self.attempt_ended = now, None
        self.resumed_from, self.damaged_checkpoint = resumed_from, damaged
        self.code_version = code_version
        self.error = self.traceback = None
        return self

    def progress(self, epoch: int, global_step: int, metrics: dict[str, float], best: Best | None) -> RunSummary:
        self.state, self.epoch, self.global_step, self.metrics, self.best = RUNNING, epoch, global_step, metrics, best
        return self

    def requeueing(self, epoch: int, global_step: int, checkpoint: str, during: str) -> RunSummary:
        """The requeue checkpoint is saved (it may be saved again before the task leaves: see :meth:`requeued`)."""
        self.state, self.epoch, self.global_step = REQUEUEING, epoch, global_step
        self.requeue_checkpoint, self.requeued_during = checkpoint, during
        return self

    def requeued(self) -> RunSummary:
        """The task leaves to be requeued."""
        self.state = REQUEUEING
        self.requeues += 1
        self.attempt_ended = _now()
        return self

    def failed(self, error: BaseException, traceback: str) -> RunSummary:
        self.state, self.error, self.traceback = FAILED, f"{type(error).__name__}: {error}", traceback
        self.attempt_ended = _now()
        return self

    def trained(
        self, epoch: int, global_step: int, metrics: dict[str, float], best: Best | None, last_checkpoint: str | None
    ) -> RunSummary:
        self.state, self.epoch, self.global_step, self.metrics, self.best = TRAINED, epoch, global_step, metrics, best
        self.last_checkpoint = last_checkpoint
        return self

    def completed(self, onnx: dict[str, Any] | None, atlas: dict[str, Any] | None = None) -> RunSummary:
        self.state, self.onnx, self.atlas = COMPLETED, onnx, atlas
        self.finished = self.attempt_ended = _now()
        return self

    # ---------------------------------------------------------------------------------------------- figures
    def elapsed_s(self, running: bool, now: float | None = None) -> float | None:
        """Wall time the task has run over all its attempts: up to ``now`` while it is ``running``, else up to the
        last attempt's end (or its last record, for an attempt that was killed without a word)."""
        started = _seconds(self.attempt_started)
        if started is None:
            return None
        end = (now or time.time()) if running else _seconds(self.attempt_ended or self.updated)
        return self.earlier_attempts_s + max(0.0, (end or started) - started)

    @property
    def error_line(self) -> str | None:
        return self.error.strip().splitlines()[0] if self.error and self.error.strip() else None


# -------------------------------------------------------------------------------------------------- the manifest
def write_manifest(sweep_dir: Path, manifest: dict[str, Any]) -> None:
    _write_json(Path(sweep_dir) / MANIFEST_NAME, manifest)


def read_manifest(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The sweep dir and manifest for ``run_dir`` (a sweep dir, or one task's run dir inside it)."""
    path = Path(run_dir)
    if not path.exists():
        raise SubmitError(f"'{run_dir}' does not exist; pass a sweep dir made by spherinator-submit (RUN_ROOT/NAME)")
    for candidate in (path, path.parent):
        if (candidate / MANIFEST_NAME).is_file():
            return candidate.resolve(), json.loads((candidate / MANIFEST_NAME).read_text())
    raise SubmitError(f"'{run_dir}' holds no {MANIFEST_NAME}; pass a sweep dir made by spherinator-submit")
