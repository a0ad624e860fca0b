"""Converting a Parquet dataset of any readable layout to the fast layout, and verifying what was written.

:func:`convert` streams every row group of a dataset into a :class:`~spherinator.data.writer.ParquetWriter` and
then reads the output back (:func:`verify`): the row count and a CRC-32 of every column must match what was
written. ``tools/make_dataset.py convert`` is its command line.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from spherinator.data.layout import ColumnLayout, DataError, Where
from spherinator.data.reader import ParquetIndex, find_parquet_files
from spherinator.data.writer import ParquetWriter


def resize(array: np.ndarray, size: int) -> np.ndarray:
    """Resize the last two axes of ``array`` to ``size x size`` (antialiased bilinear), keeping the dtype."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    lead = tensor.shape[:-2]
    out = torch.nn.functional.interpolate(
        tensor.reshape(1, -1, *tensor.shape[-2:]), size=(size, size), mode="bilinear", antialias=True
    ).reshape(*lead, size, size)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        return out.round().clamp(info.min, info.max).numpy().astype(array.dtype)
    return out.numpy().astype(array.dtype)


def convert(
    source: Path,
    writer: ParquetWriter,
    columns: Sequence[str] | None = None,
    size: int | None = None,
    quiet: bool = False,
) -> dict[str, int]:
    """Stream every row group of ``source`` into ``writer``, then read the output back and check it.

    Tensor columns (any layout) are decoded and written in the writer's layout; other columns (numbers,
    strings) are copied. Returns ``{"rows": ..., "checksum": ...}``; raises DataError when the output's row count
    or CRC-32 over every column's bytes differs from what was written.
    """
    index = ParquetIndex(source, columns)
    schema = pq.read_schema(index.files[0])
    names = list(columns) if columns is not None else schema.names
    layouts = {n: index.layouts.get(n) for n in names}
    crcs: dict[str, int] = {}
    rows = 0
    with tqdm(total=index.num_rows, desc="convert", unit="row", disable=quiet) as bar:
        for file_no, group, _ in index.groups:
            where = Where(index.files[file_no], group)
            with pq.ParquetFile(index.files[file_no]) as pf:
                table = pf.read_row_group(group, columns=names)
            batch = {}
            for name in names:
                layout = layouts[name]
                if layout is None or not layout.is_tensor:
                    batch[name] = table.column(name).to_numpy(zero_copy_only=False)
                    continue
                if size is not None and layout.kind == "encoded":
                    array = np.stack(
                        [
                            resize(layout.decode(table.column(name).slice(i, 1), where)[0], size)
                            for i in range(table.num_rows)
                        ]
                    )
                else:
                    array = layout.decode(table.column(name), where)
                    if size is not None:
                        array = resize(array, size)
                batch[name] = array
            _checksum(batch, crcs)
            writer.write(batch)
            rows += table.num_rows
            bar.update(table.num_rows)
    writer.close()
    check, crc = verify(writer.out, names), _combine(crcs)
    if check != {"rows": rows, "checksum": crc}:
        raise DataError(
            f"{writer.out} does not hold what was written: read back {check}, wrote rows={rows} checksum={crc}; "
            f"the output is damaged, write it again"
        )
    return check


def _checksum(batch: dict[str, np.ndarray], crcs: dict[str, int]) -> dict[str, int]:
    """Update one CRC-32 per column (so the result does not depend on where batches begin and end)."""
    for name, array in batch.items():
        if array.dtype == object or array.dtype.kind == "U":
            data = b"".join(str(v).encode() + b"\0" for v in array)
        else:
            data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        crcs[name] = zlib.crc32(data, crcs.get(name, 0))
    return crcs


def _combine(crcs: dict[str, int]) -> int:
    return zlib.crc32(b"".join(c.to_bytes(4, "little") for c in crcs.values()))


def verify(path: Path, columns: Sequence[str]) -> dict[str, int]:
    """Row count and CRC-32 of a fast-layout dataset's columns, decoded as the DataModule reads them."""
    crcs: dict[str, int] = {}
    rows = 0
    for file in find_parquet_files(path):
        with pq.ParquetFile(file, page_checksum_verification=True) as pf:
            schema = pf.schema_arrow
            for group in range(pf.num_row_groups):
                table = pf.read_row_group(group, columns=list(columns))
                where = Where(file, group)
                batch = {}
                for name in columns:
                    field = schema.field(name)
                    if ColumnLayout.supports(field.type):
                        batch[name] = ColumnLayout.detect(field, schema.metadata, where).decode(
                            table.column(name), where
                        )
                    else:
                        batch[name] = table.column(name).to_numpy(zero_copy_only=False)
                _checksum(batch, crcs)
                rows += table.num_rows
    return {"rows": rows, "checksum": _combine(crcs)}
