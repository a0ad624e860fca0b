"""Write Parquet datasets in the fast tensor layout, streaming from numpy batches.

Fast layout: an array column holds one ``fixed_size_binary`` value per row with the raw C-order bytes of that
row's array; the schema metadata carries ``<column>_shape`` (e.g. ``b"(3,128,128)"``) and ``<column>_dtype``
(e.g. ``b"uint8"``). Reading it back is a memcpy per record batch (about 10x faster than list columns, which
Parquet decodes one element at a time). One-dimensional inputs (one value per row) become plain columns.

Example:
    >>> with ParquetWriter("data/x", rows_per_file=4096, rows_per_group=256) as writer:
    ...     for images, ids in batches:  # images (B, 3, 64, 64) uint8, ids (B,) int64
    ...         writer.write({"data": images, "id": ids})
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spherinator.data.layout import DataError, dtype_key, format_shape, shape_key

COMPRESSIONS = ("none", "lz4", "zstd", "snappy")
# Chosen by what every epoch pays (tools/bench/bench_data.py, README "Tests and benchmarks"): a row group of
# uncompressed image bytes is read at 2-4x the rate of lz4, zstd or snappy ones (decompressing costs more than the
# bytes it saves, the files being in the page cache from the second epoch on); zstd makes files about half the
# size, for a dataset that outgrows memory or a slow shared disk.
DEFAULT_COMPRESSION = "none"
LAYOUTS = ("fast", "list")


def tensor_array(array: np.ndarray, layout: str = "fast") -> pa.Array:
    """Rows of ``array`` ``(N, *shape)`` as one Arrow array without copying: ``fixed_size_binary`` for the fast
    layout, a flat ``fixed_size_list`` of values for ``layout="list"`` (the layout of existing Spherinator data)."""
    array = np.ascontiguousarray(array)
    n, per_row = len(array), math.prod(array.shape[1:])
    if layout == "list":
        return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), per_row)
    width = per_row * array.dtype.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(array)])


class ParquetWriter:
    """Streams batches of numpy arrays into Parquet files ``<prefix>-00000.parquet, ...`` under ``out``.

    Arrays with more than one dimension ``(B, *shape)`` are tensor columns (fast layout by default), 1-D arrays
    ``(B,)`` plain columns (strings too). The columns and per-row shapes are fixed by the first batch.

    Args:
        out: Output directory (created).
        rows_per_file: Rows per file; the last file may hold fewer.
        rows_per_group: Rows per row group (the unit of reading and of shuffling).
        compression: ``none`` (the default: fastest to read), ``lz4``, ``zstd`` (about half the size on image
            data, half the read rate) or ``snappy``.
        layout: ``fast`` (raw bytes) or ``list`` (fixed-size list, slower to read; for compatibility tests).
        prefix: File name prefix.
        metadata: Extra schema metadata (str -> str).
    """

    def __init__(
        self,
        out: str | Path,
        *,
        rows_per_file: int = 4096,
        rows_per_group: int = 256,
        compression: str = DEFAULT_COMPRESSION,
        layout: str = "fast",
        prefix: str = "part",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise DataError(f"compression={compression!r} is not one of {', '.join(COMPRESSIONS)}")
        if layout not in LAYOUTS:
            raise DataError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
        if rows_per_group < 1 or rows_per_file < 1:
            raise DataError(f"rows_per_file={rows_per_file} and rows_per_group={rows_per_group} must be >= 1")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self.rows_per_group = rows_per_group
        self.compression = compression
        self.layout = layout
        self.prefix = prefix
        self.extra_metadata = dict(metadata or {})
        self.files: list[Path] = []
        self.rows = 0
        self._schema: pa.Schema | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0

    def _make_schema(self, batch: Mapping[str, np.ndarray]) -> pa.Schema:
        fields, metadata = [], {k.encode(): str(v).encode() for k, v in self.extra_metadata.items()}
        for name, array in batch.items():
            if array.ndim > 1:
                shape = tuple(array.shape[1:])
                self._shapes[name] = shape
                metadata[shape_key(name)] = format_shape(shape)
                if self.layout == "fast":
                    metadata[dtype_key(name)] = array.dtype.name.encode()
                fields.append(pa.field(name, tensor_array(array[:0], self.layout).type))
            else:
                fields.append(pa.field(name, pa.array(array).type))  # whole batch: empty object arrays are null
        return pa.schema(fields, metadata=metadata)

    def write(self, batch: Mapping[str, np.ndarray]) -> None:
        """Append a batch: every column an array with the same first dimension."""
        batch = {name: np.asarray(array) for name, array in batch.items()}
        lengths = {name: len(array) for name, array in batch.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"columns of one batch have different lengths {lengths}; give every column B rows")
        if self._schema is None:
            self._schema = self._make_schema(batch)
        elif list(batch) != self._schema.names:
            raise DataError(f"batch columns {list(batch)} differ from the first batch's {self._schema.names}")
        for name, shape in self._shapes.items():
            if batch[name].shape[1:] != shape:
                raise DataError(
                    f"column {name!r}: rows of shape {batch[name].shape[1:]}, but the first batch had {shape}; "
                    f"every row of a column needs one shape"
                )
        n = next(iter(lengths.values()))
        if n == 0:
            return
        self._pending.append(batch)
        self._pending_rows += n
        while self._pending_rows >= self._group_target():
            self._flush_group(self._group_target())

    def _group_target(self) -> int:
        return min(self.rows_per_group, self.rows_per_file - self._rows_in_file)

    def _take(self, rows: int) -> dict[str, np.ndarray]:
        merged = (
            self._pending[0]
            if len(self._pending) == 1
            else {n: np.concatenate([b[n] for b in self._pending]) for n in self._pending[0]}
        )
        head = {n: a[:rows] for n, a in merged.items()}
        rest = {n: a[rows:] for n, a in merged.items()}
        self._pending = [rest] if len(next(iter(rest.values()))) else []
        self._pending_rows -= rows
        return head

    def _flush_group(self, rows: int) -> None:
        batch = self._take(rows)
        if self._writer is None:
            path = self.out / f"{self.prefix}-{len(self.files):05d}.parquet"
            tensors = set(self._shapes)
            plain = [n for n in self._schema.names if n not in tensors]
            self._writer = pq.ParquetWriter(
                path,
                self._schema,
                compression=self.compression,
                use_dictionary=plain,  # dictionary/statistics on raw tensor bytes only cost time
                write_statistics=plain,
                write_page_checksum=True,  # lets the reader name a corrupt row group instead of reading garbage
            )
            self.files.append(path)
        arrays = [
            tensor_array(batch[n], self.layout) if n in self._shapes else pa.array(batch[n]) for n in self._schema.names
        ]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self._schema), row_group_size=rows)
        self._rows_in_file += rows
        self.rows += rows
        if self._rows_in_file >= self.rows_per_file:
            self._writer.close()
            self._writer = None
            self._rows_in_file = 0

    def close(self) -> list[Path]:
        """Write what is left and close the last file; returns the files written."""
        while self._pending_rows:
            self._flush_group(min(self._pending_rows, self._group_target()))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.files

    def __enter__(self) -> ParquetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def write_dataset(out: str | Path, batches: Iterable[Mapping[str, np.ndarray]], **kwargs: Any) -> list[Path]:
    """Write an iterable of batches with a :class:`ParquetWriter` (``kwargs`` are its options)."""
    with ParquetWriter(out, **kwargs) as writer:
        for batch in batches:
            writer.write(batch)
    return writer.files
