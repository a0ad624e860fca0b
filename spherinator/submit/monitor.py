"""``spherinator-submit status``, ``logs`` and ``cancel``: a sweep's tasks as Slurm and their summaries tell them.

Reads only what a sweep keeps on disk (:mod:`spherinator.submit.records`) and asks Slurm through Submitit
(:mod:`spherinator.submit.slurm`); importing it costs neither torch nor Lightning.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spherinator.submit.predict import EMBEDDINGS_DIR, embeddings_line
from spherinator.submit.records import (
    COMPLETED,
    EMBEDDING_SET_NAME,
    FAILED,
    AtlasResult,
    Best,
    Manifest,
    RunSummary,
    finite,
    read_manifest,
)
from spherinator.submit.slurm import ENDED, FINAL, UNKNOWN, cancel_jobs, error_line, job_states, log_paths, tail
from spherinator.submit.sweep import SubmitError, name_parts

SUBMITIT_DIR = "submitit"  # the sweep's Submitit folder: sbatch scripts, Slurm's log files, pickled tasks
NOT_SUBMITTED = "NOT SUBMITTED"
_SPHERE_FIGURES = (("val_coverage", "coverage", ".0%"), ("val_knn_accuracy", "knn", ".3f"))


@dataclass
class TaskStatus:
    """One task of a sweep as ``spherinator-submit status`` shows it.

    Attributes:
        index: Position in the sweep.
        task: The task's name (its run dir's).
        params: Its swept values.
        job: Its latest Slurm job id; None before it was submitted.
        state: Slurm's state of that job (``PENDING``, ``RUNNING``, ``COMPLETED``, ...); where Slurm forgot the job
            (``ENDED``, ``UNKNOWN``), the task's own final word when it said one (``COMPLETED``/``FAILED``).
        summary_state: The state the task recorded in its summary.json.
        epoch: Epochs done.
        elapsed_s: Wall time run over all attempts.
        attempts: Runs started (first run, requeues, resumes).
        requeues: Requeues on Slurm's signal.
        best: The best (or final) metric.
        sphere: The last ``val_coverage`` and ``val_knn_accuracy`` (logged by ``SphereQuality``).
        onnx: Whether the ONNX export validated; None when there was none.
        atlas: The atlas's result from summary.json; None when there was none.
        embeddings: For a task that embeds every row (``--predict``), its ``RUN/embeddings`` as ``status`` shows a
            predict sweep's (:func:`~spherinator.submit.predict.embeddings_line`'s figures, with ``error`` where the
            task recorded one); None for a task that does not.
        error: The first line of what stopped the task: its exception, else the telling line of Slurm's stderr file
            (a task that died before Python started, a time limit, a cancel); or why its summary.json is unreadable.
        run_dir: The task's run dir.
    """

    index: int
    task: str
    params: dict[str, str]
    job: str | None
    state: str
    summary_state: str | None = None
    epoch: int | None = None
    elapsed_s: float | None = None
    attempts: int = 0
    requeues: int = 0
    best: Best | None = None
    sphere: dict[str, float | None] = field(default_factory=dict)
    onnx: bool | None = None
    atlas: AtlasResult | None = None
    embeddings: dict[str, Any] | None = None
    error: str | None = None
    run_dir: str = ""

    def cells(self) -> dict[str, str]:
        """The table's text for each column."""
        sphere = [f"{name} {_number(self.sphere[key], spec)}" for key, name, spec in _SPHERE_FIGURES
                  if key in self.sphere]  # fmt: skip
        return {
            "task": self.task,
            "job": self.job or "-",
            "state": self.state,
            "epoch": "-" if self.epoch is None else str(self.epoch),
            "elapsed": _duration(self.elapsed_s),
            "requeues": str(self.requeues),
            "best": f"{self.best.monitor}={_number(self.best.value, '.4g')}" if self.best else "-",
            "sphere": " ".join(sphere) or "-",
            "onnx": "-" if self.onnx is None else ("yes" if self.onnx else "no"),
            "atlas": _atlas_cell(self.atlas),
            "embeddings": _embeddings_cell(self.embeddings),
            "error": self.error or "",
        }


def _number(value: float | None, spec: str) -> str:
    return "nan" if value is None else f"{value:{spec}}"  # None: a NaN the task recorded (JSON has no NaN)


def _atlas_cell(atlas: AtlasResult | None) -> str:
    if not atlas:
        return "-"
    if atlas.written:
        return "atlas/"  # in the task's run dir
    return "n/a" if atlas.skipped else "failed"


def _embeddings_cell(figures: dict[str, Any] | None) -> str:
    if not figures:
        return "-"
    if "rows_written" not in figures:
        return "failed" if figures.get("error") else "-"
    cell = f"{figures['rows_written']:,}/{figures['rows']:,} rows"
    return cell + (" failed" if figures.get("error") else "")


def _task_embeddings(run_dir: Path, summary: RunSummary) -> dict[str, Any] | None:
    """The figures of a task's ``RUN/embeddings`` (``--predict``), with the error the task recorded, if any."""
    path = run_dir / EMBEDDINGS_DIR
    figures = embeddings_line(str(path))[1] if (path / EMBEDDING_SET_NAME).is_file() else None
    if summary.embeddings is not None and summary.embeddings.error:
        figures = (figures or {"dir": str(path)}) | {"error": summary.embeddings.error}
    return figures


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):  # a hand-edited summary's Infinity or NaN
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _summary(run_dir: Path) -> tuple[RunSummary, str | None]:
    """The task's summary and, for one that cannot be read, why (shown in its row: the other tasks still show)."""
    if run_dir.exists() and not run_dir.is_dir():
        return RunSummary(), f"'{run_dir}' is a file, where the task's run dir goes; move it away"
    try:
        return RunSummary.load(run_dir), None
    except SubmitError as err:
        return RunSummary(), str(err)


def task_rows(sweep_dir: Path, manifest: Manifest | dict[str, Any]) -> tuple[list[TaskStatus], str | None]:
    """One :class:`TaskStatus` per task, and a line on where Slurm's states came from when sacct could not say."""
    if isinstance(manifest, dict):
        manifest = Manifest.from_dict(manifest, Path(sweep_dir) / "sweep.json")
    latest = manifest.latest_jobs()
    folder = sweep_dir / SUBMITIT_DIR
    states, note = job_states(folder, sorted(set(latest.values())))
    rows = []
    for task in manifest.tasks:
        run_dir = sweep_dir / task.name
        summary, unreadable = _summary(run_dir)
        job = latest.get(str(task.index))
        state = NOT_SUBMITTED if job is None else states.get(job, UNKNOWN)
        if state in (ENDED, UNKNOWN) and summary.state in (COMPLETED, FAILED):
            state = summary.state  # Slurm forgot the job; the task said how it ended
        error = summary.error_line if summary.state == FAILED else unreadable
        if error is None and job is not None and state in FINAL and state != COMPLETED:
            error = error_line(log_paths(folder, job)[1])
        rows.append(TaskStatus(
            index=task.index, task=task.name, params=task.params, job=job, state=state,
            summary_state=summary.state, epoch=summary.epoch, elapsed_s=summary.elapsed_s(running=state == "RUNNING"),
            attempts=summary.attempts, requeues=summary.requeues, best=summary.best,
            sphere={key: summary.metrics[key] for key, _, _ in _SPHERE_FIGURES if key in summary.metrics},
            onnx=summary.onnx.validated if summary.onnx else None, atlas=summary.atlas,
            embeddings=_task_embeddings(run_dir, summary), error=error,
            run_dir=str(run_dir),
        ))  # fmt: skip
    return rows, note


def print_table(rows: list[TaskStatus]) -> None:
    cells = [row.cells() for row in rows]
    shown = {"error": any(r["error"] for r in cells), "embeddings": any(r.embeddings for r in rows)}
    columns = [c for c in TaskStatus(0, "", {}, None, "").cells() if shown.get(c, True)]
    widths = [max(len(c), *(len(row[c]) for row in cells)) for c in columns]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(row[c].ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())


def status(run_dir: str, as_json: bool = False) -> int:
    sweep_dir, manifest = read_manifest(run_dir)
    rows, note = task_rows(sweep_dir, manifest)
    embeddings = embeddings_line(manifest.predict.embeddings) if manifest.predict is not None else None
    if as_json:  # strict JSON: a NaN metric is null
        content = {"sweep": manifest.name, "dir": str(sweep_dir), "note": note, "tasks": [asdict(r) for r in rows]}
        if embeddings is not None:
            content["embeddings"] = embeddings[1]
        print(json.dumps(finite(content), indent=2, allow_nan=False))
        return 0
    print(f"sweep {manifest.name} ({sweep_dir})")
    print_table(rows)
    if embeddings is not None:
        print(embeddings[0])
    if any(r.atlas and r.atlas.written for r in rows):
        page = " (atlas.html: the spheres side by side)" if (sweep_dir / "atlas.html").is_file() else ""
        print(f"atlases: spherinator atlas serve {sweep_dir}{page}")
    if (sweep_dir / "alignment.json").is_file():  # written with the sweep page (spherinator.align)
        from spherinator.align import stability_line

        print(stability_line(sweep_dir))
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cancel(run_dir: str) -> int:
    sweep_dir, manifest = read_manifest(run_dir)
    rows, _ = task_rows(sweep_dir, manifest)
    active = [r.job for r in rows if r.job is not None and r.state not in FINAL]
    if not active:
        print(f"nothing to cancel in {sweep_dir}: no task is pending or running")
        return 0
    cancel_jobs(sweep_dir / SUBMITIT_DIR, active)
    print(f"cancelled {len(active)} task(s): {' '.join(active)}")
    return 0


def _chosen_task(run_dir: str, sweep_dir: Path, manifest: Manifest, task: str | None) -> Any:
    """The task ``logs`` shows: the one named, the one whose run dir was given, or the sweep's only one."""
    names = [t.name for t in manifest.tasks]
    given = Path(run_dir).resolve()
    if task is None and given != sweep_dir and given.name in names:
        task = given.name  # a task's run dir was given
    if task is None:
        if len(names) != 1:
            raise SubmitError(
                f"sweep {manifest.name} has {len(names)} tasks; name one: spherinator-submit logs {run_dir} TASK "
                f"(one of: {', '.join(names)})"
            )
        task = names[0]
    chosen = next((t for t in manifest.tasks if task in (t.name, str(t.index))), None)
    if chosen is None:  # swept values: `beta=1e-4`, or several as `beta=1e-4,z_dim=3`
        given = set(task.split(","))
        parts = name_parts([t.params for t in manifest.tasks])
        matches = [t for t, own in zip(manifest.tasks, parts, strict=True) if given <= set(own)]
        if len(matches) > 1:
            raise SubmitError(f"{task!r} names {len(matches)} tasks of sweep {manifest.name}: "
                              f"{', '.join(t.name for t in matches)}; name one")  # fmt: skip
        chosen = matches[0] if matches else None
    if chosen is None:
        raise SubmitError(f"sweep {manifest.name} has no task {task!r}; tasks: {', '.join(names)}")
    return chosen


def logs(run_dir: str, task: str | None = None, lines: int | None = None) -> int:
    """Print Slurm's stdout and stderr files of a task's latest job (rank 0), or their last ``lines`` lines."""
    sweep_dir, manifest = read_manifest(run_dir)
    chosen = _chosen_task(run_dir, sweep_dir, manifest, task)
    job = manifest.latest_jobs().get(str(chosen.index))
    if job is None:
        raise SubmitError(f"task {chosen.name} was never submitted: it has no Slurm logs")
    for path in log_paths(sweep_dir / SUBMITIT_DIR, job):
        print(f"==> {path} <==", flush=True)
        if not path.exists():
            print(f"(not written yet: job {job} has not started)")
            continue
        try:
            sys.stdout.writelines(tail(path, lines))
        except OSError as err:  # a dir in its place, no permission: say so and show the other file
            print(f"(cannot be read: {err.strerror or err})")
    return 0


__all__ = ["NOT_SUBMITTED", "TaskStatus", "cancel", "logs", "print_table", "status", "task_rows"]
