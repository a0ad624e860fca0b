"""What a sweep keeps on disk, typed: ``sweep.json`` (:class:`Manifest`) and each task's ``summary.json``
(:class:`RunSummary`, with its :class:`OnnxResult` and :class:`AtlasResult`).

This module is the one place that reads and writes them. Both are written atomically (temp file + rename: a reader
never sees half a file) as strict JSON (a NaN metric is written as null); reading checks every known key's type, so a
cut-short or hand-edited file is one :class:`SubmitError` naming the file and the key. Keys a file holds that this
version does not know (from a newer one) are left out. Reading needs neither torch nor Lightning, so that
``spherinator-submit status`` starts at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from spherinator.submit.sweep import SubmitError

MANIFEST_NAME = "sweep.json"
SUMMARY_NAME = "summary.json"

# States a task's summary.json records (the task writes them; Slurm's own states are another matter). EMBEDDING: the
# model is trained and exported, and the task embeds every row (``--predict``): a requeue goes on with that alone.
RUNNING, REQUEUEING, TRAINED, EMBEDDING = "RUNNING", "REQUEUEING", "TRAINED", "EMBEDDING"
COMPLETED, FAILED = "COMPLETED", "FAILED"


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


def finite(content: Any) -> Any:
    """``content`` with every NaN or infinite float replaced by None: JSON has no NaN (``json.dumps`` writes a bare
    ``NaN`` that strict readers such as ``jq`` refuse), and a metric that is not a number has no value to show."""
    if isinstance(content, float) and not math.isfinite(content):
        return None
    if isinstance(content, dict):
        return {key: finite(value) for key, value in content.items()}
    if isinstance(content, list | tuple):
        return [finite(value) for value in content]
    return content


def _write_json(path: Path, content: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(finite(content), indent=2, default=str, allow_nan=False) + "\n")
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    """The JSON content of ``path``; a file that cannot be read or parsed is a SubmitError naming it."""
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise SubmitError(f"'{path}' cannot be read ({err.strerror or err}); check its permissions") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SubmitError(
            f"'{path}' is not valid JSON ({err}): it was cut short or edited by hand; restore it from a backup"
        ) from err
    except RecursionError as err:  # brackets nested thousands deep: no file spherinator-submit writes
        raise SubmitError(f"'{path}' nests its values too deep to be read; restore it from a backup") from err


# ---------------------------------------------------------------------------------------------- typed reading
Record = TypeVar("Record")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (the types records use: scalars, None, unions, dicts, lists)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint in (int, float):  # JSON does not tell 1 from 1.0; a bool is not a number here
        return isinstance(value, int | float if hint is float else int) and not isinstance(value, bool)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(item, args[1]) for item in value.values())
    if origin is list:
        return isinstance(value, list) and all(_conforms(item, args[0]) for item in value)
    return isinstance(value, hint)


def _record_type(hint: Any) -> type | None:
    """The record class in a hint such as ``Best | None``, if any."""
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def _value(hint: Any, value: Any, where: Path, key: str) -> Any:
    record = _record_type(hint)
    if record is not None and isinstance(value, dict):
        return from_json(record, value, where, f"{key}.")
    item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
    if item is not None and dataclasses.is_dataclass(item) and isinstance(value, list):
        return [_value(item, element, where, f"{key}[{i}]") for i, element in enumerate(value)]
    if not _conforms(value, hint):
        raise SubmitError(
            f"'{where}': '{key}' is {json.dumps(value)[:60]}, not {_type_name(hint)}: the file was edited by hand or "
            "written by other code; restore it from a backup"
        )
    return value


def from_json(cls: type[Record], content: Any, where: Path, prefix: str = "") -> Record:
    """A record (a dataclass of this module) from its JSON form, every key checked against its field's type.

    Raises:
        SubmitError: naming ``where`` (the file) and the key that is missing or of the wrong type.
    """
    if not isinstance(content, dict):
        what = f"'{prefix.rstrip('.')}'" if prefix else "its content"
        raise SubmitError(f"'{where}': {what} is {type(content).__name__}, not a mapping; restore it from a backup")
    hints = typing.get_type_hints(cls)
    values = {}
    for spec in dataclasses.fields(cls):
        key = f"{prefix}{spec.name}"
        if spec.name in content:
            values[spec.name] = _value(hints[spec.name], content[spec.name], where, key)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise SubmitError(f"'{where}' has no '{key}': it was cut short or edited by hand; restore it from a backup")
    return cls(**values)


@dataclass
class Best:
    """The model a task would export: the best of its first monitored ModelCheckpoint, else its final loss.

    Attributes:
        monitor: The metric (``val_loss``).
        value: Its value; None where it is not a number (a diverged run's NaN).
        checkpoint: The checkpoint holding that model; None for a final value without a checkpoint of its own.
        kind: ``monitored`` (the ModelCheckpoint's best) or ``final`` (the metric at the end of training).
    """

    monitor: str
    value: float | None
    checkpoint: str | None = None
    kind: str = "monitored"


@dataclass
class OnnxResult:
    """How a task's ONNX export ended (``summary.json``'s ``onnx``).

    Attributes:
        validated: Whether the export passed its validation against the checkpoint.
        checkpoint: The checkpoint exported.
        path: The export's directory (``RUN/onnx``).
        graphs: The graphs written (``encoder``, ``decoder``, ...), for an export that passed.
        error: Why it failed.
        report: The validation's report, for an export that failed its validation.
    """

    validated: bool = False
    checkpoint: str | None = None
    path: str | None = None
    graphs: list[str] | None = None
    error: str | None = None
    report: dict[str, Any] | None = None


@dataclass
class AtlasResult:
    """How a task's atlas (``spherinator atlas``) ended (``summary.json``'s ``atlas``).

    Attributes:
        written: Whether the atlas was written.
        path: Its directory (``RUN/atlas``); None for one skipped.
        skipped: Why none was drawn (the latent space is no sphere).
        error: Why it failed.
        page: Its ``index.html``.
        max_order: Its deepest HiPS order.
        tiles: HiPS tiles written.
        rows: Catalog rows written.
        seconds: Time it took.
        sweep_page: The sweep's ``atlas.html``, refreshed after it.
        sweep_page_error: Why that page could not be refreshed.
    """

    written: bool = False
    path: str | None = None
    skipped: str | None = None
    error: str | None = None
    page: str | None = None
    max_order: int | None = None
    tiles: int | None = None
    rows: int | None = None
    seconds: float | None = None
    sweep_page: str | None = None
    sweep_page_error: str | None = None


@dataclass
class EmbeddingsResult:
    """How a task's embedding of every row (``spherinator-submit --predict``) ended (``summary.json``'s
    ``embeddings``); the shards themselves and which rows each holds are in ``path``'s ``_manifest.json``.

    Attributes:
        path: The embedding set's directory (``RUN/embeddings``).
        checkpoint: The checkpoint whose model embedded the rows (the one exported).
        shards: Shards written whole, of ``planned``.
        planned: Shards in the set.
        rows: Rows written.
        seconds: Time the task spent embedding in its last attempt.
        error: Why it failed (a failed embedding does not fail the task: the trained model is what it is for).
    """

    path: str
    checkpoint: str | None = None
    shards: int = 0
    planned: int = 0
    rows: int = 0
    seconds: float | None = None
    error: str | None = None


@dataclass
class RunSummary:
    """A task's ``summary.json``: what it is doing, how far it got, and how each attempt ended.

    Only rank 0 of a task writes it, through :meth:`save`; the task and :class:`RequeueOnSignal` change it through
    the methods below, one per event.

    Attributes:
        state: ``RUNNING``, ``REQUEUEING`` (checkpointed on Slurm's signal, requeued), ``TRAINED`` (training done,
            export and atlas running), ``EMBEDDING`` (export and atlas done, embedding every row), ``COMPLETED``
            or ``FAILED``; None before the task first started.
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
        onnx: The ONNX export's result; None when none was asked for.
        atlas: The atlas's result; None when none was asked for.
        embeddings: The embedding of every row's result; None when none was asked for.
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
    metrics: dict[str, float | None] = field(default_factory=dict)
    best: Best | None = None
    resumed_from: str | None = None
    damaged_checkpoint: str | None = None
    requeue_checkpoint: str | None = None
    requeued_during: str | None = None
    last_checkpoint: str | None = None
    code_version: str | None = None
    error: str | None = None
    traceback: str | None = None
    onnx: OnnxResult | None = None
    atlas: AtlasResult | None = None
    embeddings: EmbeddingsResult | None = None

    # ---------------------------------------------------------------------------------------------- reading, writing
    @classmethod
    def load(cls, run_dir: str | Path) -> RunSummary:
        """``run_dir/summary.json``, checked; an empty summary when there is none (the task has not started).

        Raises:
            SubmitError: the file cannot be read, is not JSON, or a key holds a value of the wrong type.
        """
        path = Path(run_dir) / SUMMARY_NAME
        if not path.exists():
            return cls()
        return from_json(cls, _read_json(path), path)

    @classmethod
    def read(cls, run_dir: str | Path) -> RunSummary:
        """As :meth:`load`, but an empty summary for a file that is not readable: what a task updates (a damaged
        summary.json must not stop the training it describes; the task writes it anew)."""
        try:
            return cls.load(run_dir)
        except SubmitError:
            return cls()

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
        """The task leaves to be requeued (one that was embedding stays ``EMBEDDING``: its next attempt embeds)."""
        self.state = EMBEDDING if self.state == EMBEDDING else REQUEUEING
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

    def embedding(self, onnx: OnnxResult | None, atlas: AtlasResult | None) -> RunSummary:
        """Export and atlas are done; the task embeds every row (a requeue from here embeds only)."""
        self.state, self.onnx, self.atlas = EMBEDDING, onnx, atlas
        return self

    def completed(
        self, onnx: OnnxResult | None, atlas: AtlasResult | None = None, embeddings: EmbeddingsResult | None = None
    ) -> RunSummary:
        self.state, self.onnx, self.atlas, self.embeddings = COMPLETED, onnx, atlas, embeddings
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
@dataclass
class ManifestTask:
    """One task of a sweep as its manifest records it.

    Attributes:
        index: Its position in the Slurm array.
        name: Its run dir's name in the sweep dir.
        params: Its swept keys and values, as given on the command line.
        launcher_changes: What the launcher set on top of ``spherinator fit`` of the same files.
    """

    index: int
    name: str
    params: dict[str, str] = field(default_factory=dict)
    launcher_changes: list[str] = field(default_factory=list)


@dataclass
class Submission:
    """One ``sbatch`` of (some of) a sweep's tasks: the first submission or a ``--resume``.

    Attributes:
        time: When it was submitted.
        jobs: {task index: Slurm job id}.
        resources: The :class:`~spherinator.submit.resources.Resources` it asked for, as a mapping.
    """

    time: str
    jobs: dict[str, str]
    resources: dict[str, Any] = field(default_factory=dict)


# What a task name and a Slurm job id may look like: a hand-edited manifest must not point status outside the sweep
# dir, nor pass options to scancel.
_TASK_NAME = re.compile(r"[A-Za-z0-9._+=-]+")
_JOB_ID = re.compile(r"\d+(?:_\d+)?")


@dataclass
class PredictJob:
    """What a predict sweep (``spherinator-submit predict``) embeds, as its ``sweep.json`` records it.

    Attributes:
        checkpoint: The checkpoint whose model embeds the rows (absolute).
        embeddings: The directory of the embedding shards and their :class:`EmbeddingSet` (``_manifest.json``).
        onnx: The ONNX export directory whose ``encoder.onnx`` encodes (onnxruntime); None: the checkpoint's model in
            torch, which writes every column ``spherinator predict`` writes.
        rows: Rows over all shards.
    """

    checkpoint: str
    embeddings: str
    onnx: str | None = None
    rows: int = 0


@dataclass
class Manifest:
    """A sweep's ``sweep.json``: what was submitted, from where, and the Slurm jobs of each submission.

    Attributes:
        tasks: The sweep's tasks.
        name: The sweep's name (its dir's).
        cwd: The working directory of the submission.
        configs: The ``-c`` files, absolute.
        overrides: The command line's overrides.
        export: Whether the tasks export their model to ONNX.
        atlas_order: The deepest HiPS order of each task's atlas; None: no atlas.
        code_version: The code the tasks run (the sweep's code snapshot).
        submissions: Every submission, the first one first.
        predict: For a predict sweep (its tasks are embedding shards), what it embeds; None for a training sweep.
        predict_after_fit: Whether each training task embeds every row after its export (``--predict``), into
            ``RUN/embeddings`` as a predict sweep does.
        predict_shards: Shards of that embedding (None: one per row group, at most 32).
    """

    tasks: list[ManifestTask]
    name: str = ""
    cwd: str = ""
    configs: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    export: bool = True
    atlas_order: int | None = None
    code_version: str | None = None
    submissions: list[Submission] = field(default_factory=list)
    predict: PredictJob | None = None
    predict_after_fit: bool = False
    predict_shards: int | None = None

    def latest_jobs(self) -> dict[str, str]:
        """{task index: its latest Slurm job id} over all submissions of the sweep."""
        latest: dict[str, str] = {}
        for submission in self.submissions:
            latest.update(submission.jobs)
        return latest

    def check(self, where: Path) -> Manifest:
        """Refuse task names that are not plain dir names and job ids that are not Slurm's, no tasks, and tasks that
        share a name (one run dir) or an index (one Slurm job) (a hand-edited file)."""
        if not self.tasks:
            raise SubmitError(f"'{where}': 'tasks' is empty, and every sweep has a task; restore it from a backup")
        names: dict[str, int] = {}
        indices: dict[int, int] = {}
        for i, task in enumerate(self.tasks):
            if not _TASK_NAME.fullmatch(task.name) or set(task.name) == {"."}:
                raise SubmitError(f"'{where}': 'tasks[{i}].name' {task.name!r} is not a task's dir name; restore it")
            if task.index < 0:
                raise SubmitError(f"'{where}': 'tasks[{i}].index' is {task.index}, not a place in a Slurm array")
            for key, seen, what in ((task.name, names, "name"), (task.index, indices, "index")):
                if key in seen:
                    raise SubmitError(
                        f"'{where}': 'tasks[{seen[key]}]' and 'tasks[{i}]' have the same {what} {key!r}; restore the "
                        "file from a backup"
                    )
                seen[key] = i
        for i, submission in enumerate(self.submissions):
            bad = next((job for job in submission.jobs.values() if not _JOB_ID.fullmatch(job)), None)
            if bad is not None:
                raise SubmitError(f"'{where}': 'submissions[{i}].jobs' holds {bad!r}, not a Slurm job id; restore it")
        return self

    @classmethod
    def from_dict(cls, content: Any, where: Path) -> Manifest:
        """A manifest from its JSON form (``where`` names the file in errors), checked."""
        return from_json(cls, content, where).check(where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_manifest(sweep_dir: Path, manifest: Manifest) -> None:
    _write_json(Path(sweep_dir) / MANIFEST_NAME, manifest.to_dict())


def find_sweep(run_dir: str | Path) -> Path:
    """The sweep dir of ``run_dir`` (a sweep dir, or one task's run dir inside it), resolved."""
    path = Path(run_dir)
    if not path.exists():
        raise SubmitError(f"'{run_dir}' does not exist; pass a sweep dir made by spherinator-submit (RUN_ROOT/NAME)")
    for candidate in (path, path.parent):
        if (candidate / MANIFEST_NAME).exists():
            return candidate.resolve()
    raise SubmitError(f"'{run_dir}' holds no {MANIFEST_NAME}; pass a sweep dir made by spherinator-submit")


def read_manifest(run_dir: str | Path) -> tuple[Path, Manifest]:
    """The sweep dir and manifest for ``run_dir`` (a sweep dir, or one task's run dir inside it).

    Raises:
        SubmitError: there is no sweep there, or its sweep.json cannot be read, is not JSON or has a bad key.
    """
    sweep_dir = find_sweep(run_dir)
    path = sweep_dir / MANIFEST_NAME
    return sweep_dir, Manifest.from_dict(_read_json(path), path)


# -------------------------------------------------------------------------------------------------- embedding sets
EMBEDDING_SET_NAME = "_manifest.json"  # "_": Parquet dataset readers (pyarrow, duckdb globs of *.parquet) skip it


@dataclass
class ShardSegment:
    """Rows ``[start, stop)`` of row group ``group`` of source file number ``file`` of an :class:`EmbeddingSet`;
    their row ids are ``row .. row + stop - start - 1``."""

    file: int
    group: int
    start: int
    stop: int
    row: int


@dataclass
class EmbeddingShard:
    """One shard of an :class:`EmbeddingSet`: one array task's Parquet file and the source rows it holds, in order.

    Attributes:
        index: The shard's number (its task's place in the Slurm array).
        file: Its file's name in the set's directory (``shard-00003.parquet``).
        rows: Rows it holds.
        segments: The source rows it holds, in the file's row order.
    """

    index: int
    file: str
    rows: int
    segments: list[ShardSegment] = field(default_factory=list)


@dataclass
class EmbeddingSet:
    """A directory of embedding shards as one embedding set (its ``_manifest.json``): which rows are where.

    Attributes:
        data: The data directory embedded (absolute).
        files: Its Parquet files (relative to ``data``), numbered as :attr:`ShardSegment.file` counts them.
        row_groups: Rows of each row group of each file when the set was planned (a file changed since is told).
        rows: Rows over all shards: row ids ``0 .. rows - 1``, each in exactly one shard.
        batch_size: The DataModule's batch size the shards were planned with.
        row_column: The column of each shard that holds the row id.
        shards: Every shard, in order of row ids.
        checkpoint: The checkpoint whose model embeds the rows.
        onnx: The ONNX export that encodes, if not the checkpoint's model in torch.
        encoder_stamp: Size and modification time of what encodes (``encoder.onnx``, else the checkpoint) when the
            set was planned: a shard is not written by another model at the same path (None in older sets).
    """

    data: str
    files: list[str]
    row_groups: list[list[int]]
    rows: int
    batch_size: int
    shards: list[EmbeddingShard]
    row_column: str = "row"
    checkpoint: str | None = None
    onnx: str | None = None
    encoder_stamp: str | None = None

    def encoded_by(self, checkpoint: str, onnx: str | None = None) -> None:
        """Record that ``checkpoint`` (through ``onnx``'s ``encoder.onnx`` if given) embeds the set, as it is now."""
        self.checkpoint, self.onnx = checkpoint, onnx
        self.encoder_stamp = file_stamp(_encoder_file(checkpoint, onnx))

    def encoder_problem(self, checkpoint: str | None = None, onnx: str | None = None) -> str | None:
        """What differs in what encodes (``checkpoint``/``onnx``, default the set's own) from what the set was
        planned with, as the start of a sentence; None where nothing does, or where the set recorded no stamp (one
        of an older version, or without a checkpoint)."""
        checkpoint, onnx = checkpoint or self.checkpoint, onnx or self.onnx
        if not self.encoder_stamp or not checkpoint:
            return None
        path = _encoder_file(checkpoint, onnx)
        stamp = file_stamp(path)
        if stamp == self.encoder_stamp:
            return None
        if stamp == "missing":
            return f"'{path}', which embeds this set, no longer exists"
        return f"'{path}' changed since this embedding set was planned (its shards would hold two models' embeddings)"

    def written(self, directory: str | Path) -> list[EmbeddingShard]:
        """The shards whose file in ``directory`` is whole (:meth:`damage`)."""
        return [shard for shard in self.shards if self.damage(directory, shard) is None]

    def damaged(self, directory: str | Path) -> dict[str, str]:
        """{file: what is wrong with it} of the shard files in ``directory`` that are not whole (a file made or cut
        by hand: a task writes a shard whole, staged and then renamed)."""
        found = {shard.file: self.damage(directory, shard) for shard in self.shards}
        return {file: why for file, why in found.items() if why and why != "missing"}

    def damage(self, directory: str | Path, shard: EmbeddingShard) -> str | None:
        """What is wrong with ``shard``'s file in ``directory``: None for a Parquet file whose footer holds the
        shard's rows and, where its statistics say, its row ids; ``missing`` for none. Reads the footer only."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(directory) / shard.file
        if not path.exists():
            return "missing"
        try:
            meta = pq.read_metadata(path)
        except (OSError, pa.ArrowException) as err:
            return f"not a Parquet file ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        if meta.num_rows != shard.rows:
            return f"{meta.num_rows} rows where the manifest has {shard.rows}"
        column = meta.schema.to_arrow_schema().get_field_index(self.row_column)
        if column < 0:
            return f"no '{self.row_column}' column"
        span = _stored_span(meta, column)
        ids = [(s.row, s.row + s.stop - s.start - 1) for s in shard.segments if s.stop > s.start]
        expected = (min(a for a, _ in ids), max(b for _, b in ids)) if ids else None
        if span is not None and expected is not None and span != expected:
            return f"row ids {span[0]}..{span[1]} where the manifest has {expected[0]}..{expected[1]}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _encoder_file(checkpoint: str, onnx: str | None) -> Path:
    return Path(onnx) / "encoder.onnx" if onnx else Path(checkpoint)


def file_stamp(path: Path) -> str:
    """Size and newest modification time of a file, or of the files under a directory (a DeepSpeed checkpoint):
    what changes when it is written again; ``missing`` where there is none."""
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
    try:
        stats = [file.stat() for file in files]
    except OSError:
        return "missing"
    return f"{sum(st.st_size for st in stats)} bytes, {max((st.st_mtime_ns for st in stats), default=0)} ns"


def _stored_span(meta: Any, column: int) -> tuple[int, int] | None:
    """The smallest and largest value of ``column`` by the footer's statistics; None where a row group has none."""
    lows, highs = [], []
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            return None
        lows.append(stats.min)
        highs.append(stats.max)
    return (min(lows), max(highs)) if lows else None


def write_embedding_set(directory: str | Path, embedding_set: EmbeddingSet) -> None:
    _write_json(Path(directory) / EMBEDDING_SET_NAME, embedding_set.to_dict())


def read_embedding_set(directory: str | Path) -> EmbeddingSet:
    """The :class:`EmbeddingSet` of a directory of embedding shards.

    Raises:
        SubmitError: the directory has no ``_manifest.json``, or it cannot be read or has a bad key.
    """
    path = Path(directory) / EMBEDDING_SET_NAME
    if not path.is_file():
        raise SubmitError(f"'{directory}' holds no {EMBEDDING_SET_NAME}; pass the embeddings dir of a predict sweep")
    embedding_set = from_json(EmbeddingSet, _read_json(path), path)
    problem = _inconsistency(embedding_set)
    if problem:  # a shard file outside the dir, rows in two shards or in none: writing by it would damage data
        raise SubmitError(f"'{path}': {problem}: it was edited by hand; restore it from a backup or submit again")
    return embedding_set


def _inconsistency(embedding_set: EmbeddingSet) -> str | None:
    """What makes an embedding set's manifest other than one planned: None where its shards are plain files of its
    directory, each numbered as placed, holding rows of the planned row groups whose ids are ``0 .. rows - 1``,
    each in exactly one shard."""
    if embedding_set.row_groups and len(embedding_set.row_groups) != len(embedding_set.files):
        return f"'row_groups' lists {len(embedding_set.row_groups)} files where 'files' has {len(embedding_set.files)}"
    names = set()
    spans = []
    for k, shard in enumerate(embedding_set.shards):
        if shard.index != k:
            return f"shard {k} has index {shard.index}"
        if (
            shard.file in names
            or Path(shard.file).name != shard.file
            or not re.fullmatch(r"[^._].*\.parquet", shard.file)
        ):
            return f"shard {k}'s file {shard.file!r} is not a plain .parquet name of its own in the set's dir"
        names.add(shard.file)
        for seg in shard.segments:
            if not _segment_fits(seg, embedding_set.row_groups):
                return f"shard {k} has rows {seg.start}..{seg.stop} of row group {seg.group} of file {seg.file}"
            spans.append((seg.row, seg.row + seg.stop - seg.start))
        if shard.rows != sum(seg.stop - seg.start for seg in shard.segments):
            return f"shard {k} has 'rows' {shard.rows} where its segments hold other rows"
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            return f"row {min(start, end)} is {'in two shards' if start < end else 'in no shard'}"
        end = stop
    return None if end == embedding_set.rows else f"'rows' is {embedding_set.rows} where the shards hold {end}"


def _segment_fits(seg: ShardSegment, row_groups: list[list[int]]) -> bool:
    """Whether ``seg`` is a row range of a planned row group (any range where the rows were not recorded)."""
    if not 0 <= seg.start <= seg.stop:
        return False
    if not row_groups:
        return True
    return 0 <= seg.file < len(row_groups) and 0 <= seg.group < len(row_groups[seg.file]) and (
        seg.stop <= row_groups[seg.file][seg.group]
    )  # fmt: skip
