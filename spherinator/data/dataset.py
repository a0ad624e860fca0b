"""Streaming, sharded reading of Parquet row groups.

:class:`ParquetIndex` scans the footers of every ``.parquet`` file under a path (never the data) and works out each
column's :class:`~spherinator.data.layout.ColumnLayout`. :func:`split_rows` cuts the rows into train/val/test
:class:`Segment` lists. :func:`shard` plans one epoch for one (rank, worker): which rows it reads and the sizes of
the batches it yields, such that every row is read exactly once per epoch and every rank yields the same number
of batches. :class:`ParquetStream` is the ``IterableDataset`` that executes the plan: it reads whole row groups,
decodes each column of a record batch into one array, mixes rows in a shuffle buffer and yields whole batches
(use it with ``DataLoader(batch_size=None)``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from spherinator.data.layout import ColumnLayout, DataError, _empty, check_values, to_tensor
from spherinator.data.slots import BatchSlots, SlotBatch

if TYPE_CHECKING:
    from torch.utils.data._utils.worker import WorkerInfo


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of row group ``group`` of file number ``file`` of a :class:`ParquetIndex`."""

    file: int
    group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        """Number of rows in the segment."""
        return self.stop - self.start


def find_parquet_files(path: str | Path) -> list[Path]:
    """Every ``.parquet`` file under ``path`` (recursively, sorted), or ``[path]`` for a single file."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path {str(path)!r} does not exist; give the directory that holds the .parquet files")
    if root.is_file():
        if root.suffix != ".parquet":
            raise DataError(f"data path {str(path)!r} is not a .parquet file; give a directory or a .parquet file")
        return [root]
    files = sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if not files:
        raise DataError(
            f"no .parquet files under {str(path)!r}; write a dataset there first, e.g. "
            f"`python tools/make_dataset.py synthetic --out {path}`"
        )
    return files


class ParquetIndex:
    """Files, row groups and column layouts of a Parquet dataset, from the file footers alone.

    Args:
        path: Directory searched recursively for ``.parquet`` files (or one file).
        columns: Columns to read; None means every column that can become a tensor.
        first_file_only: Read only the first footer (cheap; for shapes and column names before ``setup``).
    """

    def __init__(self, path: str | Path, columns: Sequence[str] | None = None, first_file_only: bool = False) -> None:
        self.path = Path(path)
        self.files = find_parquet_files(path)
        if first_file_only:
            self.files = self.files[:1]
        self.groups: list[tuple[int, int, int]] = []  # (file index, row group index, rows)
        self.layouts: dict[str, ColumnLayout] = {}
        self._row_shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        for i, file in enumerate(self.files):
            try:
                with pq.ParquetFile(file) as parquet_file:  # the footer only; close the file at once
                    meta = parquet_file.metadata
                schema = meta.schema.to_arrow_schema()
            except (pa.ArrowException, OSError) as err:
                raise DataError(
                    f"{file} is not a readable Parquet file ({err}); remove it from {str(path)!r} or re-write it"
                ) from err
            if i == 0:
                self.layouts = self._detect(schema, columns, file)
            else:
                self._check_same(schema, file)
            self.groups.extend((i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))

    @property
    def num_rows(self) -> int:
        """Total rows over every file."""
        return sum(rows for _, _, rows in self.groups)

    def row_shape(self, name: str) -> tuple[tuple[int, ...], str]:
        """The per-row shape of column ``name`` and where it was found: from the schema when it tells it, else
        (lists without shape metadata, encoded images) from the first row of the first row group holding rows,
        which every other row must then match."""
        layout = self.layouts[name]
        if layout.shape is not None:
            return layout.shape, f"the schema of {self.files[0]}"
        if name not in self._row_shapes:
            group = next(((f, g) for f, g, rows in self.groups if rows), None)
            if group is None:
                raise DataError(f"the parquet files under {str(self.path)!r} hold no rows; write some data first")
            file, g = group
            where = f"{self.files[file]} row group {g}"
            with pq.ParquetFile(self.files[file]) as parquet_file:
                batch = next(parquet_file.iter_batches(batch_size=1, row_groups=[g], columns=[name]))
            self._row_shapes[name] = (tuple(layout.decode(batch.column(0), where).shape[1:]), where)
        return self._row_shapes[name]

    def _detect(self, schema: pa.Schema, columns: Sequence[str] | None, file: Path) -> dict[str, ColumnLayout]:
        if columns is None:
            # Not asked for by name: skip columns of types that can never become tensors (e.g. strings).
            layouts = {
                field.name: ColumnLayout.detect(field, schema.metadata, str(file))
                for field in schema
                if ColumnLayout.supports(field.type)
            }
            if not layouts:
                raise DataError(f"{file}: no column can become a tensor (columns: {', '.join(schema.names)})")
            return layouts
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise DataError(
                f"column {missing[0]!r} not in parquet files under {str(self.path)!r} "
                f"(found: {', '.join(repr(n) for n in schema.names)}); fix `columns`"
            )
        return {c: ColumnLayout.detect(schema.field(c), schema.metadata, str(file)) for c in columns}

    def _check_same(self, schema: pa.Schema, file: Path) -> None:
        for name, layout in self.layouts.items():
            if name not in schema.names:
                raise DataError(
                    f"{file} has no column {name!r} though {self.files[0]} has it "
                    f"(found: {', '.join(repr(n) for n in schema.names)}); every file needs the same columns"
                )
            other = ColumnLayout.detect(schema.field(name), schema.metadata, str(file))
            if other != layout:
                raise DataError(
                    f"{file}: column {name!r} is stored as {other.kind} {other.shape} {other.dtype}, but "
                    f"{self.files[0]} stores it as {layout.kind} {layout.shape} {layout.dtype}; "
                    f"every file needs the same layout (convert them with tools/make_dataset.py convert)"
                )


def split_rows(
    groups: Sequence[tuple[int, int, int]], fractions: dict[str, float], seed: int
) -> dict[str, list[Segment]]:
    """Cut all rows into named splits of exact sizes (``round(fraction * rows)``; the rest goes to ``"train"``).

    Row groups are taken in a seeded random order, so a split is a random set of whole row groups plus at most one
    part of a row group at each boundary: cheap to stream, the same for the same seed. Within a split, segments
    keep file order.
    """
    total = sum(rows for _, _, rows in groups)
    names = [*fractions, "train"]
    bounds = np.cumsum([0] + [round(fractions[n] * total) for n in fractions] + [total])  # split i: [b_i, b_i+1)
    bounds[-1] = max(bounds[-1], bounds[-2])
    splits: dict[str, list[Segment]] = {name: [] for name in names}
    pos = 0
    for gi in np.random.default_rng(seed).permutation(len(groups)):
        file, group, rows = groups[gi]
        for name, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True):
            a, b = max(lo, pos), min(hi, pos + rows)
            if a < b:
                splits[name].append(Segment(file, group, int(a - pos), int(b - pos)))
        pos += rows
    for segments in splits.values():
        segments.sort(key=lambda s: (s.file, s.group, s.start))
    return splits


def rank_batch_sizes(rows: int, world: int, batch_size: int, drop_last: bool) -> list[list[int]]:
    """Batch sizes for each rank, such that every rank yields the same number of batches.

    With ``drop_last`` every batch is full and up to ``world * batch_size - 1`` rows are left out. Without it
    every row is used once: rank ``r`` gets ``rows // world`` (+1 for the first ``rows % world`` ranks) rows in
    ``ceil(rows / (world * batch_size))`` batches, full ones first and the shortfall spread over its last
    batches. Only when a rank has fewer rows than batches (fewer rows than ranks, or ``batch_size=1``) are
    rows repeated from the start of the epoch to fill its batches, as ``DistributedSampler`` does.
    """
    if drop_last:
        return [[batch_size] * (rows // (world * batch_size))] * world
    nb = math.ceil(rows / (world * batch_size))
    plans = []
    for r in range(world):
        have = max(rows // world + (r < rows % world), nb)
        excess = nb * batch_size - have
        sizes = [batch_size] * nb
        if excess:
            k = math.ceil(excess / (batch_size - 1))  # last k batches shrink, each keeps >= 1 row
            cut = np.full(k, excess // k) + (np.arange(k) < excess % k)
            for j in range(k):
                sizes[nb - k + j] -= int(cut[j])
        plans.append(sizes)
    return plans


def shard(
    segments: Sequence[Segment],
    *,
    batch_size: int,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = False,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    drop_last: bool = False,
    interleave: bool = False,
) -> tuple[list[Segment], list[int]]:
    """Plan one epoch for one (rank, worker): the segments it reads, in order, and its batch sizes.

    The segments are put in a seeded per-epoch order (the same on every rank), concatenated into one stream of
    rows, and the stream is cut into one contiguous span per rank and, within it, per worker; so a row group is
    read by one (rank, worker), or by two when a span boundary falls inside it. With ``interleave`` the rank's
    batches are dealt to its workers in turn instead, which keeps the stream order through a DataLoader.
    """
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"rank {rank}/{world_size} or worker {worker}/{num_workers} out of range")
    order = epoch_order(segments, epoch, seed, shuffle)
    ends = np.cumsum([s.rows for s in order])
    total = int(ends[-1]) if len(ends) else 0
    plans = rank_batch_sizes(total, world_size, batch_size, drop_last)
    # rank r's rows start after the rows the earlier ranks use (without repeats)
    start = sum(min(sum(p), total // world_size + (r < total % world_size)) for r, p in enumerate(plans[:rank]))
    mine = plans[rank]
    if interleave:
        # Batch j goes to worker j % num_workers: the DataLoader takes batches from its workers in turn, so the
        # rank's batches come out in stream order (each worker then reads the row groups its batches touch).
        offsets = np.concatenate([[0], np.cumsum(mine)]).astype(int) + start
        picks = range(worker, len(mine), num_workers)
        return [s for j in picks for s in _take(order, ends, int(offsets[j]), mine[j])], [mine[j] for j in picks]
    lo, hi = len(mine) * worker // num_workers, len(mine) * (worker + 1) // num_workers
    start += sum(mine[:lo])
    sizes = mine[lo:hi]
    return _take(order, ends, start, sum(sizes)), sizes


def epoch_order(segments: Sequence[Segment], epoch: int, seed: int, shuffle: bool) -> list[Segment]:
    """The segments in the order an epoch reads them: a seeded permutation per epoch with ``shuffle``."""
    order = list(segments)
    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(len(order))
        order = [order[i] for i in perm]
    return order


def _take(order: Sequence[Segment], ends: np.ndarray, start: int, count: int) -> list[Segment]:
    """Rows ``[start, start + count)`` of the stream ``order`` as segments, wrapping around past its end.

    ``ends`` is ``np.cumsum`` of the segments' row counts (a binary search finds the first segment).
    """
    out: list[Segment] = []
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        return out
    start %= total
    i = int(np.searchsorted(ends, start, side="right"))
    while count > 0:
        s = order[i]
        a = s.start + start - (int(ends[i]) - s.rows)
        b = min(s.stop, a + count)
        out.append(Segment(s.file, s.group, a, b))
        count -= b - a
        start = int(ends[i]) % total
        i = (i + 1) % len(order)
    return out


@dataclass(frozen=True)
class Pass:
    """One pass of a training loader over an epoch, or over the rest of one (a run resumed mid-epoch), as the
    loader's state records it: how it cut the rows into batches and how many batches it had handed out."""

    batch_size: int
    num_workers: int
    world_size: int
    shuffle_buffer: int
    batches: int


def _pass_rng(seed: int, epoch: int, rank: int, worker: int, pass_index: int) -> np.random.Generator:
    """The shuffle buffer's generator of one (rank, worker) in one pass (pass 0: the epoch as a whole)."""
    return np.random.default_rng([seed, epoch, rank, worker, 1, *([pass_index] if pass_index else [])])


def _taken_per_worker(lengths: Sequence[int], batches: int) -> list[int]:
    """Batches taken from each worker when a DataLoader has handed out ``batches``: it takes them from its workers
    in turn, passing over the workers that have none left."""
    taken = [0] * len(lengths)
    while batches > 0 and any(t < n for t, n in zip(taken, lengths, strict=True)):
        for w, n in enumerate(lengths):
            if batches > 0 and taken[w] < n:
                taken[w] += 1
                batches -= 1
    return taken


def unread_rows(
    segments: Sequence[Segment], passes: Sequence[Pass], *, epoch: int, seed: int, shuffle: bool, drop_last: bool
) -> list[Segment]:
    """The rows of one epoch that ``passes`` had not handed out in a batch, in the epoch's order.

    Pass 0 reads the epoch's ``segments``; each later pass reads the rows the passes before it left. A pass is
    replayed on row numbers alone, for every rank and worker it had: which rows a batch holds is a function of the
    seed, the epoch and the sizes (of batches, row groups and the shuffle buffer), never of the values. So the rows
    left are exact whatever batch size, workers or ranks the resumed run has; with a shuffle buffer they are not
    the tail of the epoch's order (the buffer mixes rows from up to ``shuffle_buffer`` rows ahead).
    """
    order = epoch_order(segments, epoch, seed, shuffle)
    # row r of segment s is row base[s] + r of one numbering of this split's rows
    base, total = {}, 0
    for seg in order:
        base[(seg.file, seg.group)] = total - seg.start
        total += seg.rows
    for index, step in enumerate(passes):
        if step.batches <= 0:
            continue
        seen = [np.zeros(0, dtype=np.int64)]
        workers = max(step.num_workers, 1)
        window = step.shuffle_buffer if shuffle else 0
        for rank in range(step.world_size):
            plans = [
                shard(
                    order,
                    batch_size=step.batch_size,
                    rank=rank,
                    world_size=step.world_size,
                    worker=w,
                    num_workers=workers,
                    drop_last=drop_last,
                    interleave=not shuffle,
                )
                for w in range(workers)
            ]
            taken = _taken_per_worker([len(sizes) for _, sizes in plans], step.batches)
            for w, ((segs, sizes), n) in enumerate(zip(plans, taken, strict=True)):
                chunks = ({"row": base[(s.file, s.group)] + np.arange(s.start, s.stop)} for s in segs)
                rng = _pass_rng(seed, epoch, rank, w, index) if shuffle else None
                seen += [batch["row"] for batch in _rebatch(chunks, sizes[:n], window, rng)]
        done = np.zeros(total, dtype=bool)
        done[np.concatenate(seen)] = True
        rest = []
        for seg in order:
            first = base[(seg.file, seg.group)] + seg.start
            keep = np.concatenate([[False], ~done[first : first + seg.rows], [False]])
            edges = np.flatnonzero(np.diff(keep.astype(np.int8)))  # starts and stops of the runs kept
            rest += [
                Segment(seg.file, seg.group, seg.start + int(a), seg.start + int(b)) for a, b in edges.reshape(-1, 2)
            ]
        order = rest
    return order


class WorkerError:
    """A DataError raised in a DataLoader worker, sent to the main process as if it were a batch: the loader raises
    it there with its own one-line message (the DataLoader would wrap it in the worker's traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def raise_(self) -> None:
        raise DataError(self.message)


def _errors_as_batches(batches: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from batches
    except DataError as err:
        yield WorkerError(str(err))


def resolve_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


class ParquetStream(IterableDataset):
    """Yields whole batches (a tensor, or a dict of tensors) from Parquet row groups; use ``batch_size=None``.

    Args:
        index: The scanned dataset.
        segments: The rows of this split.
        batch_size: Rows per batch (the last batches of an epoch may be smaller unless ``drop_last``).
        transforms: Per column, a callable applied to each batch tensor ``(B, *shape)``, or a tuple
            ``(callable, True)`` to apply it to each sample.
        return_dict: Yield ``{column: tensor}``; else the first column's tensor.
        shuffle: Seeded per-epoch order of row groups plus a shuffle buffer.
        shuffle_buffer: Rows mixed together at a time (memory: this many rows plus one row group).
        seed: Base seed; the order is a function of (seed, epoch, rank, worker).
        drop_last: Only full batches (the rows left over differ every epoch when shuffling).
        rank: Override the DDP rank (else from torch.distributed / environment).
        world_size: Override the DDP world size.
    """

    def __init__(
        self,
        index: ParquetIndex,
        segments: Sequence[Segment],
        batch_size: int,
        transforms: dict[str, tuple[Callable | None, bool]] | None = None,
        return_dict: bool = False,
        shuffle: bool = False,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.files = index.files
        self.layouts = index.layouts
        self.segments = list(segments)
        self.batch_size = batch_size
        self.transforms = transforms or {}
        self.return_dict = return_dict
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        # Workers send uint8 columns as uint8 (4x fewer bytes through shared memory than float32) when the
        # DataLoader scales them in the main process (set by spherinator.data.DataModule's loaders).
        self.defer_uint8 = False
        # With defer_uint8: reusable shared buffers for those columns, set by the DataModule's loaders.
        self.slots: BatchSlots | None = None
        # A worker sends a DataError as a WorkerError batch, which the loader raises (set by the DataModule's loaders).
        self.errors_as_batches = False
        # (epoch, the rows its earlier passes left, pass number): set by resume_after, read when that epoch starts.
        self.resume: tuple[int, list[Segment], int] | None = None
        # Shared memory, so persistent DataLoader workers see the epoch the main process sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # Columns whose per-row shape the schema does not tell: every batch must match the first row's.
        self.row_shapes = {name: index.row_shape(name) for name, layout in self.layouts.items() if layout.shape is None}

    @property
    def num_rows(self) -> int:
        """Rows in this split."""
        return sum(s.rows for s in self.segments)

    @property
    def epoch(self) -> int:
        """The epoch whose order the next iteration uses."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (and so the order) of the next iteration."""
        self._epoch.fill_(int(epoch))

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        return resolve_rank()

    def __len__(self) -> int:
        """Batches this rank yields per epoch (over all its workers)."""
        rank, world = self._rank_world()
        return len(rank_batch_sizes(self.num_rows, world, self.batch_size, self.drop_last)[rank])

    def __iter__(self) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self.iter_shard(self.epoch, rank, world, worker, num_workers)
        return _errors_as_batches(batches) if info is not None and self.errors_as_batches else batches

    def resume_after(self, epoch: int, passes: Sequence[Pass]) -> int:
        """Make epoch ``epoch`` read only the rows ``passes`` had not handed out (a run resumed mid-epoch), cut into
        batches of this stream's size; returns how many batches this rank then yields."""
        rest = unread_rows(
            self.segments, passes, epoch=epoch, seed=self.seed, shuffle=self.shuffle, drop_last=self.drop_last
        )
        self.resume = (epoch, rest, len(passes))
        rank, world = self._rank_world()
        return len(rank_batch_sizes(sum(s.rows for s in rest), world, self.batch_size, self.drop_last)[rank])

    def iter_shard(
        self, epoch: int, rank: int, world_size: int, worker: int = 0, num_workers: int = 1
    ) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """The batches of one (rank, worker) in one epoch; ``__iter__`` calls this with the real values."""
        rows, pass_index, new_order = self.segments, 0, self.shuffle
        if self.resume is not None and self.resume[0] == epoch:
            _, rows, pass_index = self.resume
            new_order = False  # the rows left keep the epoch's order
        segments, sizes = shard(
            rows,
            batch_size=self.batch_size,
            epoch=epoch,
            seed=self.seed,
            shuffle=new_order,
            rank=rank,
            world_size=world_size,
            worker=worker,
            num_workers=num_workers,
            drop_last=self.drop_last,
            interleave=not self.shuffle,
        )
        rng = _pass_rng(self.seed, epoch, rank, worker, pass_index)
        window = self.shuffle_buffer if self.shuffle else 0
        use_threads = get_worker_info() is None
        for arrays in _rebatch(self._read(segments, use_threads), sizes, window, rng if self.shuffle else None):
            yield self._finish(arrays)

    def _read(self, segments: Sequence[Segment], use_threads: bool) -> Iterator[dict[str, np.ndarray]]:
        """Decoded arrays of each segment, one row group read at a time."""
        names = list(self.layouts)
        handles: dict[int, pq.ParquetFile] = {}
        last: tuple[tuple[int, int], pa.Table] | None = None  # consecutive segments often share a row group
        try:
            for seg in segments:
                where = f"{self.files[seg.file]} row group {seg.group}"
                if last is not None and last[0] == (seg.file, seg.group):
                    yield self._decode(last[1].slice(seg.start, seg.rows), where, seg.start)
                    continue
                if seg.file not in handles:
                    if len(handles) >= 8:
                        handles.pop(next(iter(handles))).close()
                    # No memory_map: mapped pages would count as resident memory growing with the data read.
                    handles[seg.file] = pq.ParquetFile(self.files[seg.file], page_checksum_verification=True)
                try:
                    table = handles[seg.file].read_row_group(seg.group, columns=names, use_threads=use_threads)
                except (pa.ArrowException, OSError) as err:
                    raise DataError(
                        f"{where} cannot be read ({err}); the file is corrupt: re-write or remove it"
                    ) from err
                last = ((seg.file, seg.group), table)
                if seg.start or seg.stop != table.num_rows:
                    table = table.slice(seg.start, seg.rows)
                yield self._decode(table, where, seg.start)
        finally:  # also when the consumer stops early (limit_*_batches, an exception, a closed generator)
            for handle in handles.values():
                handle.close()

    def _decode(self, table: pa.Table, where: str, first_row: int) -> dict[str, np.ndarray]:
        """Each column of rows ``first_row, ...`` of the row group at ``where``, checked: values the model can take
        (see :func:`~spherinator.data.layout.check_values`), the shape of the first row where the schema has none."""
        arrays = {}
        for name, layout in self.layouts.items():
            array = layout.decode(table.column(name), where, first_row)
            check_values(array, layout, where, first_row)
            if name in self.row_shapes and len(array) and array.shape[1:] != self.row_shapes[name][0]:
                shape, first = self.row_shapes[name]
                hint = (
                    "make them one size, e.g. `python tools/make_dataset.py convert --size 128 ...`"
                    if layout.kind == "encoded"
                    else f"store rows of one shape (pad, crop or resample them) and record it as {name}_shape metadata"
                )
                raise DataError(
                    f"{where}: column {name!r} holds rows of shape {tuple(array.shape[1:])}, but {first} holds "
                    f"{shape} (without {name}_shape metadata the first row sets the shape of all); {hint}"
                )
            arrays[name] = array
        return arrays

    def deferred_columns(self) -> dict[str, tuple[int, ...] | None]:
        """Columns a worker sends as uint8 for the loader to scale (see ``defer_uint8``), with their sample shape
        when the schema tells it (such columns can go through :class:`~spherinator.data.slots.BatchSlots`)."""
        return {
            name: layout.shape
            for name, layout in self.layouts.items()
            if layout.is_tensor and layout.dtype == np.uint8 and name not in self.transforms
        }

    def _finish(self, arrays: dict[str, np.ndarray]) -> torch.Tensor | dict[str, torch.Tensor] | SlotBatch:
        info = get_worker_info()
        in_worker = info is not None
        slot = self.slots.claim(info.id) if in_worker and self.slots is not None else None
        try:
            batch = self._columns(arrays, info, slot)
        except BaseException:
            if slot is not None:  # the batch never leaves this worker: nobody else will free its slot
                self.slots.free(info.id, slot)
            raise
        if slot is not None:
            rows = len(next(iter(arrays.values())))
            return SlotBatch(self.slots.token, info.id, slot, rows, batch, self.return_dict)
        return batch if self.return_dict else next(iter(batch.values()))

    def _columns(
        self, arrays: dict[str, np.ndarray], info: WorkerInfo | None, slot: int | None
    ) -> dict[str, torch.Tensor | None]:
        """Each column's tensor (``info``: the DataLoader worker's, None in the main process); None for a column
        written to ``slot``."""
        in_worker = info is not None
        batch = {}
        for name, array in arrays.items():
            transform, per_sample = self.transforms.get(name, (None, False))
            layout = self.layouts[name]
            # only array columns are scaled to [0, 1]; uint8 scalars (labels) stay integers, as without workers
            deferred = self.defer_uint8 and in_worker and transform is None and array.dtype == np.uint8
            if deferred and layout.is_tensor and slot is not None and name in self.slots.buffers:
                self.slots.write(name, info.id, slot, array)
                batch[name] = None  # in the slot
                continue
            if deferred and layout.is_tensor:
                tensor = _empty(array.shape, torch.uint8, shared=True)  # scaled by the loader: see defer_uint8
                tensor.numpy()[...] = array
            else:
                # A tensor a transform replaces need not be shared; the transform's output is sent as usual.
                tensor = to_tensor(array, layout, shared=in_worker and transform is None)
            if transform is not None:
                tensor = apply_transform(transform, tensor, per_sample, name)
                check_transformed(tensor, transform, name)
            batch[name] = tensor
        return batch


def apply_transform(transform: Callable, batch: torch.Tensor, per_sample: bool, name: str) -> torch.Tensor:
    """Apply ``transform`` to a batch ``(B, ...)`` at once, or to each sample with ``per_sample``."""
    try:
        if per_sample:
            return torch.stack([transform(sample) for sample in batch])
        return transform(batch)
    except Exception as err:
        how = "each sample" if per_sample else "a batch"
        hint = "" if per_sample else "; if it only takes one sample, set `per_sample: true` on the column"
        raise DataError(
            f"transform {transform!r} of column {name!r} failed on {how} of shape {tuple(batch.shape)}: {err}{hint}"
        ) from err


def check_transformed(batch: Any, transform: Callable, name: str) -> None:
    """A DataError when ``transform`` made NaN/inf of a column's values (which were checked finite when read)."""
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or not batch.numel():
        return
    if math.isfinite(float(batch.sum(dtype=torch.float32))):  # finite sum: finite values (see check_values)
        return
    bad = ~torch.isfinite(batch.reshape(len(batch), -1)).all(dim=1)
    if bad.any():
        raise DataError(
            f"transform {transform!r} of column {name!r} made values that are not finite (in {int(bad.sum())} of "
            f"{len(batch)} rows) from finite ones; make it finite for every value the column holds (e.g. log1p or a "
            f"clamp before log)"
        )


def _rows(chunk: dict[str, np.ndarray]) -> int:
    return len(next(iter(chunk.values())))


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    return {n: np.concatenate([c[n] for c in chunks]) for n in chunks[0]}


def _rebatch(
    chunks: Iterator[dict[str, np.ndarray]], sizes: Sequence[int], window: int, rng: np.random.Generator | None
) -> Iterator[dict[str, np.ndarray]]:
    """Cut a stream of decoded chunks into batches of the given sizes.

    Without ``rng`` batches are slices of the chunks (no copy unless a batch spans two chunks). With ``rng``,
    chunks are buffered until at least ``window`` rows (and one batch) are there; every full batch is then drawn
    from a random permutation of the buffer and the few rows left over join the next window.
    """
    pending: list[dict[str, np.ndarray]] = []
    have, k = 0, 0
    while k < len(sizes):
        need = max(window, sizes[k]) if rng is not None else sizes[k]
        while have < need:
            chunk = next(chunks, None)
            if chunk is None:
                break
            if _rows(chunk):
                pending.append(chunk)
                have += _rows(chunk)
        if have < sizes[k]:
            return  # fewer rows than planned: the files changed while reading
        if rng is None:
            if _rows(pending[0]) < sizes[k]:  # the batch spans chunks
                pending = [_concat(pending)]
            head, size = pending[0], sizes[k]
            yield {n: a[:size] for n, a in head.items()}
            if _rows(head) == size:
                pending.pop(0)
            else:
                pending[0] = {n: a[size:] for n, a in head.items()}
            have -= size
            k += 1
            continue
        buffer = _concat(pending)  # (have, ...) per column
        perm = rng.permutation(have)
        pos = 0
        while k < len(sizes) and have - pos >= sizes[k]:
            idx = perm[pos : pos + sizes[k]]
            yield {n: a[idx] for n, a in buffer.items()}
            pos += sizes[k]
            k += 1
        rest = perm[pos:]
        pending = [{n: a[rest] for n, a in buffer.items()}] if rest.size else []
        have = rest.size
