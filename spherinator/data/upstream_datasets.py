"""Upstream Spherinator's PyTorch datasets under their own names, for scripts that build DataLoaders themselves.

``ParquetDataset`` (rows of one column, or several concatenated along the last axis), ``ParquetDatasetWithError``
(``(data, error)``, each sample scaled to [0, 1] and its error by the same factor), ``ParquetDatasetSampling``
(each access draws ``normal(data, error)``) and ``ParquetIterableDataset`` (rows streamed in record batches,
split across DataLoader workers). They hold what upstream's hold, read with spherinator's column layouts: a
``<column>_shape`` schema entry (``"(1,12)"``, ``"(3, 128, 128)"``) shapes each row, fixed-size lists and tensors
keep their shapes, and a column that is missing, ragged or not numeric is one DataError naming it and the file.
Map-style datasets load their columns into memory as upstream's do; for large data use
:class:`~spherinator.data.DataModule`, which streams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from spherinator.data.layout import ColumnLayout, DataError, Where
from spherinator.data.reader import find_parquet_files


def _files(data_directory: str | Path) -> list[Path]:
    files = [f for f in find_parquet_files(data_directory) if not f.name.startswith(("_", "."))]
    if not files:
        raise DataError(f"{str(data_directory)!r} holds no .parquet file (upstream's data_directory)")
    return files


def _layouts(files: list[Path], columns: list[str]) -> dict[str, ColumnLayout]:
    schema = ds.dataset(files[0], format="parquet").schema
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"column {missing[0]!r} is not in {files[0]} (its columns: {', '.join(schema.names)})")
    return {c: ColumnLayout.detect(schema.field(c), schema.metadata, Where(files[0])) for c in columns}


def _read_columns(data_directory: str | Path, columns: list[str]) -> dict[str, np.ndarray]:
    """Every row of ``columns`` of the Parquet files under ``data_directory``, as float32 arrays ``(N, *shape)``."""
    files = _files(data_directory)
    layouts = _layouts(files, columns)
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for file in files:
        table = ds.dataset(file, format="parquet").to_table(columns=columns)
        for c in columns:
            parts[c].append(np.asarray(layouts[c].decode(table.column(c), Where(file)), dtype=np.float32))
    return {c: np.concatenate(parts[c]) if parts[c] else np.zeros((0,), np.float32) for c in columns}


class ParquetDataset(Dataset):
    """Rows of ``data_column`` (or of several columns, concatenated along their last axis) as float32 tensors.

    Args:
        data_directory: A Parquet file or a directory of them (files starting with ``_`` or ``.`` are skipped).
        data_column: The column, or a list of columns to concatenate.
        transform: Applied to each row tensor.
        with_index: Return ``(row, index)``.
    """

    def __init__(self, data_directory: str, data_column: str | list[str], transform: Callable | None = None,
                 with_index: bool = False) -> None:  # fmt: skip
        super().__init__()
        names = [data_column] if isinstance(data_column, str) else list(data_column)
        if not names:
            raise DataError("data_column=[] names no column; give one, or a list to concatenate")
        arrays = _read_columns(data_directory, names)
        try:
            self.data = np.concatenate([arrays[n] for n in names], axis=-1) if len(names) > 1 else arrays[names[0]]
        except ValueError as err:
            shapes = ", ".join(f"{n} {arrays[n].shape[1:]}" for n in names)
            raise DataError(f"columns {names} cannot be concatenated along their last axis ({shapes})") from err
        self.transform, self.with_index = transform, with_index

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        row = torch.from_numpy(self.data[index].copy())
        if self.transform is not None:
            row = self.transform(row)
        return (row, torch.tensor(index)) if self.with_index else row


class _WithErrorColumn(Dataset):
    def __init__(self, data_directory: str, data_column: str, error_column: str, transform: Callable | None = None,
                 with_index: bool = False) -> None:  # fmt: skip
        super().__init__()
        arrays = _read_columns(data_directory, [data_column, error_column])
        self.data, self.error = arrays[data_column], arrays[error_column]
        if self.data.shape != self.error.shape:
            raise DataError(f"error_column {error_column!r} has rows of shape {self.error.shape[1:]}, data_column "
                            f"{data_column!r} {self.data.shape[1:]}; they must match")  # fmt: skip
        self.transform, self.with_index = transform, with_index

    def __len__(self) -> int:
        return len(self.data)


class ParquetDatasetWithError(_WithErrorColumn):
    """``(data, error)`` rows: each sample scaled to [0, 1] (min-max) and its error by the same factor, as upstream.

    A constant sample gives zeros (upstream divides by zero); ``transform`` applies to the data only.
    """

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        data, error = torch.from_numpy(self.data[index].copy()), torch.from_numpy(self.error[index].copy())
        low, span = data.min(), data.max() - data.min()
        span = span if span > 0 else torch.ones_like(span)
        data, error = (data - low) / span, error / span
        if self.transform is not None:
            data = self.transform(data)
        return (data, error, torch.tensor(index)) if self.with_index else (data, error)


class ParquetDatasetSampling(_WithErrorColumn):
    """Each access draws a row from ``normal(data, error)`` (the error as one standard deviation), as upstream."""

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        row = torch.normal(torch.from_numpy(self.data[index].copy()), torch.from_numpy(self.error[index].copy()))
        if self.transform is not None:
            row = self.transform(row)
        return (row, torch.tensor(index)) if self.with_index else row


class ParquetIterableDataset(IterableDataset):
    """Rows of ``data_column`` streamed in record batches of ``batch_size``; with DataLoader workers, worker ``i``
    of ``n`` reads record batches ``i, i + n, ...`` (every row once across workers).

    Args:
        data_directory: A Parquet file or a directory of them.
        data_column: The column to read.
        batch_size: Rows per record batch read (not the DataLoader's batch size).
        transform: Applied to each record batch ``(B, *shape)`` before its rows are yielded.
    """

    def __init__(self, data_directory: str, data_column: str = "data", batch_size: int = 64,
                 transform: Callable | None = None) -> None:  # fmt: skip
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        self.files = _files(data_directory)
        self.layout = _layouts(self.files, [data_column])[data_column]
        self.data_column, self.batch_size, self.transform = data_column, batch_size, transform

    def _batches(self) -> Iterator[np.ndarray]:
        for file in self.files:
            scanner = ds.dataset(file, format="parquet").scanner(columns=[self.data_column], batch_size=self.batch_size)
            for batch in scanner.to_batches():
                if batch.num_rows:
                    yield np.asarray(self.layout.decode(batch.column(0), Where(file)), dtype=np.float32)

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for i, batch in enumerate(self._batches()):
            if i % step != first:
                continue
            rows = torch.from_numpy(batch.copy())
            if self.transform is not None:
                rows = self.transform(rows)
            yield from rows


__all__ = ["ParquetDataset", "ParquetDatasetSampling", "ParquetDatasetWithError", "ParquetIterableDataset"]
