"""Parquet data: the streaming, sharded DataModule, tensor layouts and the fast-layout writer.

``DataModule`` and ``Column`` import Lightning; they load on first use so that tools which only write or read
Parquet (``spherinator.data.writer``, ``tools/make_dataset.py``) start in a fraction of a second.
"""

from typing import TYPE_CHECKING

from spherinator.data.dataset import ParquetIndex, ParquetStream, Segment, shard, split_rows
from spherinator.data.layout import ColumnLayout, DataError
from spherinator.data.writer import ParquetWriter, write_dataset

if TYPE_CHECKING:
    from spherinator.data.datamodule import Column, DataModule

__all__ = [
    "Column",
    "ColumnLayout",
    "DataError",
    "DataModule",
    "ParquetIndex",
    "ParquetStream",
    "ParquetWriter",
    "Segment",
    "shard",
    "split_rows",
    "write_dataset",
]


def __getattr__(name: str):
    if name in ("DataModule", "Column"):
        from spherinator.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'spherinator.data' has no attribute {name!r}")
