"""Reading a Parquet dataset: plan -> read row groups -> decode -> re-batch, as plain numpy arrays per column.

:class:`ParquetIndex` scans the footers of every ``.parquet`` file under a path (never the data) and works out each
column's :class:`~spherinator.data.layout.ColumnLayout`. :class:`ParquetReader` yields the batches of one
(rank, worker) in one epoch: it plans them (:mod:`spherinator.data.plan`), reads whole row groups (the next ones in
threads while the current one is cut into batches), decodes and checks each column of a row group into one array,
and mixes rows in a shuffle buffer. How batches become tensors and reach the model is
:mod:`spherinator.data.transport`'s business.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spherinator.data.batching import rebatch
from spherinator.data.checksums import ChecksumMemory, Stamp, check_checksum_mode, file_stamp
from spherinator.data.layout import ColumnLayout, DataError, Where
from spherinator.data.plan import Pass, Segment, epoch_order, pass_plan, pass_rng, rank_batch_sizes, unread_rows

T = TypeVar("T")
U = TypeVar("U")


def _parquet_paths(root: Path) -> list[Path]:
    """Every path named ``*.parquet`` under ``root`` but directories, following links to directories (a shard on
    another disk), each directory once: one reached again by another link, or a link back up, is not walked again."""
    found, walked = [], set()
    for top, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in walked:
            dirs.clear()
            continue
        walked.add(real)
        dirs.sort()  # the first link to a directory walked is the same in every process
        found += [Path(top) / name for name in names if name.endswith(".parquet")]
    return found


def find_parquet_files(path: str | Path) -> list[Path]:
    """Every ``.parquet`` file under ``path`` (recursively, sorted), or ``[path]`` for a single file."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path {str(path)!r} does not exist; give the directory that holds the .parquet files")
    if root.is_file():
        if root.suffix != ".parquet":
            raise DataError(f"data path {str(path)!r} is not a .parquet file; give a directory or a .parquet file")
        return [root]
    found = _parquet_paths(root)
    broken = next((p for p in sorted(found) if p.is_symlink() and not p.exists()), None)
    if broken is not None:  # a part of the dataset on a file system that is not mounted: not a smaller dataset
        raise DataError(
            f"{broken} is a link to {os.readlink(broken)!r}, which does not exist; mount or restore what it points "
            f"to, or remove the link from {str(path)!r}"
        )
    files = sorted(p for p in found if p.is_file())
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
        self.path = Path(path).expanduser()
        self.files = find_parquet_files(path)
        if first_file_only:
            self.files = self.files[:1]
        self.groups: list[tuple[int, int, int]] = []  # (file index, row group index, rows)
        self.layouts: dict[str, ColumnLayout] = {}
        self.stamps: list[Stamp | None] = []  # each file's identity when scanned (see spherinator.data.checksums)
        self._row_shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        self._checksums: ChecksumMemory | None = None
        for i, file in enumerate(self.files):
            self.stamps.append(file_stamp(file))  # before the footer: a re-write after this differs from it
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

    @property
    def checksums(self) -> ChecksumMemory:
        """The row groups read with their page checksums verified, shared by every reader of this index and their
        DataLoader workers (allocated at first use: by the process that makes the readers, before any worker)."""
        if self._checksums is None:
            per_file = collections.Counter(file for file, _, _ in self.groups)
            self._checksums = ChecksumMemory(self.files, [per_file[i] for i in range(len(self.files))], self.stamps)
        return self._checksums

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
            where = Where(self.files[file], g)
            with pq.ParquetFile(self.files[file]) as parquet_file:
                batch = next(parquet_file.iter_batches(batch_size=1, row_groups=[g], columns=[name]))
            self._row_shapes[name] = (tuple(layout.decode(batch.column(0), where).shape[1:]), str(where))
        return self._row_shapes[name]

    def _detect(self, schema: pa.Schema, columns: Sequence[str] | None, file: Path) -> dict[str, ColumnLayout]:
        if columns is None:
            # Not asked for by name: skip columns of types that can never become tensors (strings too).
            layouts = {
                field.name: ColumnLayout.detect(field, schema.metadata, Where(file))
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
        return {c: ColumnLayout.detect(schema.field(c), schema.metadata, Where(file)) for c in columns}

    def _check_same(self, schema: pa.Schema, file: Path) -> None:
        for name, layout in self.layouts.items():
            if name not in schema.names:
                raise DataError(
                    f"{file} has no column {name!r} though {self.files[0]} has it "
                    f"(found: {', '.join(repr(n) for n in schema.names)}); every file needs the same columns"
                )
            other = ColumnLayout.detect(schema.field(name), schema.metadata, Where(file))
            if other != layout:
                raise DataError(
                    f"{file}: column {name!r} is stored as {other.kind} {other.shape} {other.dtype}, but "
                    f"{self.files[0]} stores it as {layout.kind} {layout.shape} {layout.dtype}; "
                    f"every file needs the same layout (convert them with tools/make_dataset.py convert)"
                )


FLOAT32_MAX = float(np.finfo(np.float32).max)
INT64_MAX = np.iinfo(np.int64).max


def check_values(array: np.ndarray, layout: ColumnLayout, where: Where, first_row: int = 0) -> None:
    """Raise a DataError naming the column, the place and the first bad row when the values of one decoded record
    batch cannot reach the model as they are.

    Floating array columns must be finite, and within float32 (what the model computes in) when stored wider: a NaN
    would otherwise surface mid-epoch as an error about the Power Spherical ``loc``, or train on as NaN weights.
    uint64 scalars must fit int64 (they would wrap to negative ids). ``first_row``: the row of the row group at
    which ``array`` starts. Floating scalar columns (catalogue values such as a redshift) may hold NaN for missing.
    """
    kind = array.dtype.kind
    if not array.size or kind not in "fu":
        return
    if kind == "u":
        if array.dtype.itemsize == 8 and not layout.is_tensor and array.max() > INT64_MAX:
            row = int(np.flatnonzero(array > INT64_MAX)[0])
            raise DataError(
                f"{where}: column {layout.name!r} row {first_row + row} holds {int(array[row])}, beyond int64 (the "
                f"dtype integer columns become); store it as int64 (e.g. ids below 2**63) or leave it out of `columns`"
            )
        return
    if not layout.is_tensor:
        return
    if array.dtype.isnative and array.dtype.itemsize <= 4:
        # a finite sum means finite values (one NaN or inf makes it NaN or inf); torch sums 2x faster than numpy's
        # min and max (measured in tools/bench/bench_data.py --float32); an overflowing sum is checked below
        # torch only where it is loaded already (training): the atlas of an ONNX export reads without it
        torch = sys.modules.get("torch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only view of Arrow memory, only read here
            total = torch.from_numpy(array).sum(dtype=torch.float32) if torch else array.sum(dtype=np.float32)
            if math.isfinite(float(total)):
                return
    elif float(array.min()) >= -FLOAT32_MAX and float(array.max()) <= FLOAT32_MAX:  # NaN fails both
        return
    flat = array.reshape(len(array), -1)
    bad = ~np.isfinite(flat)
    wide = not bad.any()  # finite, but beyond float32 (or only the sum overflowed)
    if wide:
        bad = np.abs(flat) > FLOAT32_MAX
    rows = np.flatnonzero(bad.any(axis=1))
    if not rows.size:
        return
    value = float(flat[rows[0]][bad[rows[0]]][0])
    what = f"{value:g} (beyond float32, which the model computes in)" if wide else f"{value:g}"
    fix = "rescale the column" if wide else "drop or repair those rows (e.g. np.nan_to_num) before training"
    raise DataError(
        f"{where}: column {layout.name!r} row {first_row + int(rows[0])} holds {what}, and {rows.size} of the "
        f"{len(array)} rows read there hold such values; {fix}"
    )


class ParquetReader:
    """The batches of a split for one (rank, worker) per epoch, as ``{column: array (B, *shape)}`` in the stored
    dtype.

    Args:
        index: The scanned dataset.
        segments: The rows of this split.
        batch_size: Rows per batch (the last batches of an epoch may be smaller unless ``drop_last``).
        shuffle: Seeded per-epoch order of row groups plus a shuffle buffer.
        shuffle_buffer: Rows mixed together at a time (memory: this many rows plus the row group being cut into
            batches and the ones read ahead).
        seed: Base seed; the order is a function of (seed, epoch, rank, worker).
        drop_last: Only full batches (the rows left over differ every epoch when shuffling).
        page_checksums: ``first_read``: verify a row group's page checksums on its first read by this index's
            readers (and their workers), then read it unverified; ``every_read``: on every read (see
            :mod:`spherinator.data.checksums`).
    """

    def __init__(
        self,
        index: ParquetIndex,
        segments: Sequence[Segment],
        *,
        batch_size: int,
        shuffle: bool = False,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        drop_last: bool = False,
        page_checksums: str = "first_read",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.files = index.files
        self.layouts = index.layouts
        self.segments = list(segments)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.drop_last = drop_last
        self.checksums = index.checksums
        self.every_read = check_checksum_mode(page_checksums) == "every_read"
        # (epoch, the rows its earlier passes left, pass number): set by resume_after, read when that epoch starts
        self.resume: tuple[int, list[Segment], int] | None = None
        # Columns whose per-row shape the schema does not tell: every batch must match the first row's.
        self.row_shapes = {name: index.row_shape(name) for name, layout in self.layouts.items() if layout.shape is None}
        # The rows of each row group of each file as scanned: a file re-written during the run is told by them.
        self.scanned: dict[int, list[int]] = collections.defaultdict(list)
        for file, _, rows in index.groups:
            self.scanned[file].append(rows)

    @property
    def num_rows(self) -> int:
        """Rows in this split."""
        return sum(s.rows for s in self.segments)

    def num_batches(self, rank: int, world_size: int, rows: int | None = None) -> int:
        """Batches rank ``rank`` yields per epoch (over all its workers), of ``rows`` rows (default: the split's)."""
        rows = self.num_rows if rows is None else rows
        return len(rank_batch_sizes(rows, world_size, self.batch_size, self.drop_last)[rank])

    def resume_after(self, epoch: int, passes: Sequence[Pass] | None, rank: int, world_size: int) -> int:
        """Make epoch ``epoch`` read only the rows ``passes`` had not handed out (a run resumed mid-epoch), cut into
        batches of this reader's size; returns how many batches rank ``rank`` then yields. Reading starts in the
        first row group that holds such rows: the rows handed out are not read again. ``passes=None``: every epoch
        reads all its rows again."""
        if passes is None:
            self.resume = None
            return self.num_batches(rank, world_size)
        rest = unread_rows(
            self.segments, passes, epoch=epoch, seed=self.seed, shuffle=self.shuffle, drop_last=self.drop_last
        )
        self.resume = (epoch, rest, len(passes))
        return self.num_batches(rank, world_size, sum(s.rows for s in rest))

    def batches(
        self,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        ahead: int = 1,
        into: Callable[[int], dict[str, np.ndarray]] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """The batches of one (rank, worker) in one epoch, reading up to ``ahead`` row groups in threads while the
        consumer works on the batches before them. ``into(rows)``: arrays of ``rows`` rows for some columns, which
        a batch drawn from the shuffle buffer is gathered into (e.g. shared memory), instead of new arrays."""
        rows, pass_index, new_order = self.segments, 0, self.shuffle
        if self.resume is not None and self.resume[0] == epoch:
            _, rows, pass_index = self.resume
            new_order = False  # the rows left keep the epoch's order
        order = epoch_order(rows, epoch, self.seed, new_order)
        plan = pass_plan(order, self.batch_size, rank, world_size, worker, num_workers, drop_last=self.drop_last,
                         shuffle=self.shuffle)  # fmt: skip
        segments, sizes = plan
        rng = pass_rng(self.seed, epoch, rank, worker, pass_index) if self.shuffle else None
        window = self.shuffle_buffer if self.shuffle else 0
        return rebatch(self._read(segments, ahead), sizes, window, rng, into)

    def _read(self, segments: Sequence[Segment], ahead: int) -> Iterator[dict[str, np.ndarray]]:
        """Decoded arrays of each segment, in order; each row group is read once (consecutive segments often share
        one), up to ``ahead`` of them at a time in threads: pyarrow releases the GIL while it reads and decompresses,
        so reading overlaps with cutting, converting and training."""
        reads = [list(group) for _, group in itertools.groupby(segments, key=lambda s: (s.file, s.group))]
        handles = _Handles(self.files, self._check_unchanged)
        results = ordered_map(functools.partial(self._read_segments, handles), reads, ahead)
        try:
            for chunks in results:
                yield from chunks
        finally:  # also when the consumer stops early (limit_*_batches, an exception, a closed generator)
            results.close()  # the reads under way end first
            handles.close()

    def _read_segments(self, handles: _Handles, segments: list[Segment]) -> list[dict[str, np.ndarray]]:
        """The decoded arrays of ``segments``, all of one row group, which is read once."""
        file, group = segments[0].file, segments[0].group
        verify = self.every_read or self.checksums.needed(file, group)
        table = self._read_group(handles.get(file, verify), file, group)
        if verify:  # read whole, so every page of its columns was verified
            self.checksums.verified(file, group)
        where = Where(self.files[file], group)
        return [
            self._decode(table.slice(s.start, s.rows) if s.start or s.stop != table.num_rows else table, where, s.start)
            for s in segments
        ]

    def _check_unchanged(self, file: int, handle: pq.ParquetFile) -> None:
        """A DataError when file number ``file`` (just opened as ``handle``) is not the file scanned when the run
        started: other row groups or rows (the plan's segments would read other rows, or fewer, without a word), or
        another layout of a column read."""
        path, meta = self.files[file], handle.metadata
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        changed = None
        if rows != self.scanned.get(file, []):
            changed = f"it holds {sum(rows)} rows in {len(rows)} row groups, not the {sum(self.scanned.get(file, []))} "
            changed += f"rows in {len(self.scanned.get(file, []))} row groups scanned"
        else:
            schema = handle.schema_arrow
            for name, layout in self.layouts.items():
                if name not in schema.names:
                    changed = f"it has no column {name!r} any more"
                elif ColumnLayout.detect(schema.field(name), schema.metadata, Where(path)) != layout:
                    changed = f"its column {name!r} is stored another way now"
                if changed:
                    break
        if changed:
            raise DataError(
                f"{path} was re-written during the run: {changed}; start the run again so that the dataset is "
                f"scanned anew (and leave the files alone while it reads them)"
            )

    def _read_group(self, handle: pq.ParquetFile, file: int, group: int) -> pa.Table:
        """Row group ``group`` of file number ``file`` (open as ``handle``)."""
        try:
            # one thread: pyarrow's pool splits the work by column and costs twice the time here (one column)
            return handle.read_row_group(group, columns=list(self.layouts), use_threads=False)
        except (pa.ArrowException, OSError) as err:
            raise DataError(
                f"{Where(self.files[file], group)} cannot be read ({err}); the file is corrupt: re-write or remove it"
            ) from err

    def _decode(self, table: pa.Table, where: Where, first_row: int) -> dict[str, np.ndarray]:
        """Each column of rows ``first_row, ...`` of the row group at ``where``, checked: values the model can take
        (see :func:`check_values`), the shape of the first row where the schema has none."""
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


class _Handles:
    """The Parquet files a pass has open: each reading thread its own handles, at most 8 each; a file read both with
    and without page checksum verification has a handle for each (pyarrow fixes it when the file is opened)."""

    def __init__(self, files: Sequence[Path], check: Callable[[int, pq.ParquetFile], None] | None = None) -> None:
        self.files = files
        self.check = check  # called on each file opened: raises when it is not the file scanned
        self._local = threading.local()
        self._all: list[dict[tuple[int, bool], pq.ParquetFile]] = []
        self._lock = threading.Lock()

    def get(self, file: int, verify: bool = True) -> pq.ParquetFile:
        """File number ``file``, opened by this thread, verifying the page checksums of what it reads or not."""
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
            with self._lock:
                self._all.append(handles)
        key = (file, verify)
        if key not in handles:
            if len(handles) >= 8:
                handles.pop(next(iter(handles))).close()
            path = self.files[file]
            try:
                # No memory_map: mapped pages would count as resident memory growing with the data read.
                handles[key] = pq.ParquetFile(path, page_checksum_verification=verify)
            except FileNotFoundError as err:
                raise DataError(
                    f"{path} was scanned when the run started but is gone now (deleted or moved during the run); put "
                    f"it back, or start the run again so that the dataset is scanned anew"
                ) from err
            except (pa.ArrowException, OSError) as err:
                raise DataError(
                    f"{path} cannot be opened ({err}); the file changed during the run: re-write it"
                ) from err
            if self.check is not None:
                try:
                    self.check(file, handles[key])
                except DataError:
                    handles.pop(key).close()
                    raise
        return handles[key]

    def close(self) -> None:
        """Close every handle (once no thread reads any more)."""
        with self._lock:
            for handles in self._all:
                for handle in handles.values():
                    handle.close()
                handles.clear()


def ordered_map(fn: Callable[[T], U], items: Sequence[T], ahead: int) -> Iterator[U]:
    """``fn(item)`` for each item, in order, computed in ``ahead`` threads up to ``ahead`` items before the one the
    consumer takes. An error raised by ``fn`` is raised here, in the consumer; when the consumer stops, the calls
    under way end before this returns."""
    with ThreadPoolExecutor(max(1, ahead), thread_name_prefix="spherinator-read") as pool:
        pending: collections.deque[Future[U]] = collections.deque()
        todo = iter(items)
        try:
            for item in itertools.islice(todo, max(1, ahead)):
                pending.append(pool.submit(fn, item))
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(todo, 1):
                    pending.append(pool.submit(fn, item))
                yield result
        finally:
            for future in pending:
                future.cancel()
