"""Parquet data: the streaming, sharded DataModule, tensor layouts and the fast-layout writer."""

from spherinator.data.datamodule import Column, DataModule
from spherinator.data.dataset import ParquetIndex, ParquetStream, Segment, shard, split_rows
from spherinator.data.layout import ColumnLayout, DataError
from spherinator.data.writer import ParquetWriter, write_dataset

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
