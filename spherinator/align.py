"""A sweep's spheres aligned: each task's sphere rotated onto a reference task's, and how stable the sphere is.

Two runs' spheres differ by an arbitrary rotation (the uniform prior has no preferred direction), so they are
compared after :func:`procrustes_rotation` turns one onto the other on the rows both embedded: an exact rotation
(orthogonal, determinant +1: no reflection, no scaling) in any dimension. How stable the sphere is across tasks is
:func:`neighbour_agreement`: for each row, the fraction of its k nearest neighbours on one sphere that are also among
its k nearest on the other (1: the same neighbourhoods; about k/n: unrelated). It needs no alignment (rotations keep
distances) and says what the rotation cannot: whether the tasks learned the same map.

:func:`align_sweep` does both for the atlases of a sweep (their ``catalog.parquet``: ``row`` and ``x, y, z``) and
writes ``alignment.json`` beside them, which the sweep page, ``spherinator-submit status`` and TensorBoard's HParams
tab (a ``sphere_stability`` scalar in each task's log directory) read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from spherinator.errors import AtlasError
from spherinator.staging import staged_file

ALIGNMENT_JSON = "alignment.json"
STABILITY_TAG = "sphere_stability"  # the scalar TensorBoard's HParams tab shows beside the swept values


class AlignmentError(AtlasError):
    """Points that cannot be aligned (shapes that differ, too few rows, values that are not finite)."""


def _pair(source: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise AlignmentError(f"points of shape {a.shape} and {b.shape}: give two (n, d) arrays of the same rows")
    if len(a) < 2:
        raise AlignmentError(f"{len(a)} shared row(s): a rotation needs at least 2")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise AlignmentError("points that are not finite (NaN/inf) cannot be aligned")
    return a, b


def procrustes_rotation(source: ArrayLike, target: ArrayLike) -> np.ndarray:
    """The rotation ``R`` (d x d) that brings the rows of ``source`` (n, d) closest to those of ``target``:
    ``source @ R`` ~ ``target`` in least squares, among rotations only (``R.T @ R = I``, ``det R = +1``).

    Orthogonal Procrustes (SVD of ``source.T @ target``) with the sign fix: where the best orthogonal map would be
    a reflection, the singular direction that costs least is turned the other way, so a mirrored sphere stays
    mirrored (its misfit shows) rather than being reflected back."""
    a, b = _pair(source, target)
    u, _, vt = np.linalg.svd(a.T @ b)
    signs = np.ones(len(vt))
    signs[-1] = 1.0 if np.linalg.det(u @ vt) >= 0 else -1.0  # singular values come sorted: the last is the cheapest
    return (u * signs) @ vt


def neighbour_agreement(a: ArrayLike, b: ArrayLike, k: int = 10, chunk: int = 512) -> np.ndarray:
    """Per row, the fraction of its ``k`` nearest neighbours among the rows of ``a`` (n, d) that are also among its
    ``k`` nearest in ``b`` (the same rows, another sphere); neighbours by angle (points are normalised)."""
    a, b = _pair(a, b)
    n = len(a)
    if not 1 <= k < n:
        raise AlignmentError(f"k={k} neighbours of {n} rows: give 1 <= k < {n}")
    near_a, near_b = _nearest(a, k, chunk), _nearest(b, k, chunk)
    both = (near_a[:, :, None] == near_b[:, None, :]).any(axis=2)  # (n, k)
    return both.mean(axis=1)


def _nearest(points: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """The indices of each row's ``k`` nearest other rows (n, k), by cosine similarity, ``chunk`` rows at a time."""
    unit = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    out = np.empty((len(unit), k), dtype=np.int64)
    for lo in range(0, len(unit), chunk):
        sims = unit[lo : lo + chunk] @ unit.T  # (chunk, n)
        sims[np.arange(len(sims)), np.arange(lo, lo + len(sims))] = -np.inf  # a row is not its own neighbour
        out[lo : lo + chunk] = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return out


@dataclass
class TaskAlignment:
    """How one task's sphere maps onto the reference's.

    Attributes:
        rotation: ``R`` (d x d, rows of lists): the task's point ``p`` lies at ``p @ R`` on the reference sphere.
        rows: Shared rows the rotation was fitted on (and the agreement measured on).
        rms_before: Root mean square distance between the shared rows' points before the rotation.
        rms_after: The same after it (0: the same sphere, rotated).
        agreement: Mean kNN agreement with the reference (see :func:`neighbour_agreement`); None for the
            reference itself.
    """

    rotation: list[list[float]]
    rows: int
    rms_before: float
    rms_after: float
    agreement: float | None = None


@dataclass
class SweepAlignment:
    """The tasks' spheres rotated onto ``reference``'s (``alignment.json``); ``stability``: the mean agreement of
    the other tasks with the reference (None with one task); ``notes``: tasks left out, and why."""

    reference: str
    k: int
    tasks: dict[str, TaskAlignment]
    stability: float | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> SweepAlignment:
        info = json.loads(Path(path).read_text())
        tasks = {name: TaskAlignment(**task) for name, task in info["tasks"].items()}
        return cls(info["reference"], info["k"], tasks, info.get("stability"), info.get("notes", []))

    def line(self) -> str:
        """One line for ``status``: the stability and each task's agreement with the reference."""
        figures = ", ".join(f"{name} {t.agreement:.2f}" for name, t in self.tasks.items() if t.agreement is not None)
        overall = "n/a (one task)" if self.stability is None else f"{self.stability:.2f}"
        return (
            f"sphere stability (kNN-{self.k} neighbours that agree with {self.reference}, after rotating each sphere "
            f"onto it): {overall}" + (f" ({figures})" if figures else "")
        )


def align_points(
    points: dict[str, tuple[np.ndarray, np.ndarray]],
    reference: str | None = None,
    k: int = 10,
    max_rows: int = 4000,
    seed: int = 0,
) -> SweepAlignment:
    """Align each task's points onto the ``reference`` task's (default: the first) on the rows they share.

    ``points``: per task, ``(row ids (n,), points (n, d))``. At most ``max_rows`` shared rows (a seeded sample)
    are used per task; a task sharing fewer than ``k + 2`` rows with the reference, of another dimension, or with
    points that are not finite (a diverged run), is left out with a note."""
    if not points:
        raise AlignmentError("no task to align")
    reference = reference if reference is not None else next(iter(points))
    if reference not in points:
        raise AlignmentError(f"reference task {reference!r} is not among {', '.join(points)}")
    ref_rows, ref_points = points[reference]
    dim = ref_points.shape[1]
    identity = np.eye(dim).tolist()
    tasks, notes = {reference: TaskAlignment(identity, len(ref_rows), 0.0, 0.0)}, []
    for name, (rows, task_points) in points.items():
        if name == reference:
            continue
        shared, at_task, at_ref = np.intersect1d(rows, ref_rows, assume_unique=True, return_indices=True)
        if task_points.shape[1] != dim or len(shared) < k + 2:
            notes.append(f"{name}: {len(shared)} rows shared with {reference} in {task_points.shape[1]} dimensions")
            continue
        if len(shared) > max_rows:
            pick = np.sort(np.random.default_rng(seed).choice(len(shared), max_rows, replace=False))
            at_task, at_ref = at_task[pick], at_ref[pick]
        a, b = task_points[at_task], ref_points[at_ref]
        if not np.isfinite(a).all():  # one diverged task leaves the others aligned
            notes.append(f"{name}: points that are not finite (NaN/inf)")
            continue
        rotation = procrustes_rotation(a, b)
        rms = [float(np.sqrt(np.mean(np.sum((x - b) ** 2, axis=1)))) for x in (a, a @ rotation)]
        agreement = float(neighbour_agreement(a, b, k).mean())
        tasks[name] = TaskAlignment(rotation.tolist(), len(a), rms[0], rms[1], agreement)
    others = [t.agreement for t in tasks.values() if t.agreement is not None]
    stability = float(np.mean(others)) if others else None
    return SweepAlignment(reference, k, tasks, stability, notes)


def read_catalog_points(catalog: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(row ids, unit vectors (n, 3))`` of an atlas's ``catalog.parquet``."""
    import pyarrow.parquet as pq

    table = pq.read_table(catalog, columns=["row", "x", "y", "z"])
    xyz = np.stack([table.column(c).to_numpy().astype(np.float64) for c in ("x", "y", "z")], axis=1)
    return table.column("row").to_numpy(), xyz


def align_sweep(atlases: dict[str, Path], out: Path, reference: str | None = None, k: int = 10) -> SweepAlignment:
    """Align the atlases (task name -> atlas directory holding ``catalog.parquet``) onto ``reference``'s, write
    ``out/alignment.json`` (atomically), and the stability into each task's TensorBoard log directory."""
    points, unreadable = {}, []
    for name, atlas in atlases.items():
        try:
            points[name] = read_catalog_points(atlas / "catalog.parquet")
        except (OSError, KeyError, ValueError) as err:  # pyarrow's errors are OSError/ValueError/KeyError kinds
            unreadable.append(f"{name}: its catalog.parquet cannot be read ({type(err).__name__}: {err})")
    alignment = align_points(points, reference, k)
    alignment.notes = unreadable + alignment.notes
    with staged_file(out / ALIGNMENT_JSON, AlignmentError, "sweep alignment") as tmp:
        tmp.write_text(json.dumps(_finite(asdict(alignment)), indent=1), encoding="utf-8")
    for name, task in alignment.tasks.items():
        if task.agreement is not None:
            log_stability(atlases[name].parent, task.agreement, len(alignment.tasks))
    return alignment


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def stability_line(sweep_dir: Path) -> str:
    """The sweep's stability line from its ``alignment.json``, or one saying why it cannot be read."""
    try:
        return SweepAlignment.load(Path(sweep_dir) / ALIGNMENT_JSON).line()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # AttributeError: "tasks": []
        return f"sphere stability: {ALIGNMENT_JSON} cannot be read ({type(err).__name__}: {err}); refresh the page"


def log_stability(run_dir: Path, agreement: float, step: int) -> bool:
    """Write ``sphere_stability`` as a TensorBoard scalar into ``run_dir`` when a TensorBoard logger writes there
    (the HParams tab then shows it beside the task's swept values); ``step``: the number of tasks aligned (the
    figure changes as more tasks finish). Returns whether it was written."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return False
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(run_dir), filename_suffix=".stability")
    summary = Summary(value=[Summary.Value(tag=STABILITY_TAG, simple_value=agreement)])
    writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
    writer.close()
    return True


__all__ = [
    "ALIGNMENT_JSON",
    "AlignmentError",
    "SweepAlignment",
    "TaskAlignment",
    "align_points",
    "align_sweep",
    "neighbour_agreement",
    "procrustes_rotation",
    "stability_line",
]
