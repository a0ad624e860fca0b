"""Parquet data: the streaming, sharded DataModule, its reader and transport, tensor layouts and the fast-layout writer.

- :mod:`~spherinator.data.layout`: how a column stores its per-row arrays, and how to decode a record batch of it;
- :mod:`~spherinator.data.plan`: which rows an epoch reads, in which order and batches (splits, shards, resume);
- :mod:`~spherinator.data.reader`: plan -> read row groups -> decode -> re-batch, as numpy arrays per column;
- :mod:`~spherinator.data.transport`: arrays to tensors, the DataLoader and its workers' shared-memory hand-over;
- :mod:`~spherinator.data.datamodule`: the LightningDataModule; :mod:`~spherinator.data.writer` and
  :mod:`~spherinator.data.convert`: writing the fast layout, converting and verifying datasets.

``ParquetDataModule`` and ``ParquetIterableDataModule`` take upstream Spherinator's options
(:mod:`~spherinator.data.upstream`), and upstream's map-style and iterable datasets keep their names
(:mod:`~spherinator.data.upstream_datasets`); a Hugging Face Hub dataset id as ``path`` is read through ``datasets``
(:mod:`~spherinator.data.hub`).

``DataModule`` and ``Column`` import Lightning, ``ParquetStream`` torch; they load on first use so that tools which
only write or read Parquet (``spherinator.data.writer``, ``tools/make_dataset.py``, the atlas of an ONNX export
reading through :class:`ParquetReader`) start in a fraction of a second without torch.
"""

from typing import TYPE_CHECKING

from spherinator.data.layout import ColumnLayout, DataError, Where
from spherinator.data.plan import Segment, shard, split_rows
from spherinator.data.reader import ParquetIndex, ParquetReader, find_parquet_files
from spherinator.data.writer import ParquetWriter, write_dataset

if TYPE_CHECKING:
    from spherinator.data.datamodule import Column, DataModule
    from spherinator.data.transforms import AbsMaxNormalize, AlignByMoments, MinMaxNormalize
    from spherinator.data.transport import ParquetStream
    from spherinator.data.upstream import ParquetDataModule, ParquetIterableDataModule
    from spherinator.data.upstream_datasets import (
        ParquetDataset,
        ParquetDatasetSampling,
        ParquetDatasetWithError,
        ParquetIterableDataset,
    )

__all__ = [
    "AbsMaxNormalize",
    "AlignByMoments",
    "Column",
    "ColumnLayout",
    "DataError",
    "DataModule",
    "MinMaxNormalize",
    "ParquetDataModule",
    "ParquetDataset",
    "ParquetDatasetSampling",
    "ParquetDatasetWithError",
    "ParquetIndex",
    "ParquetIterableDataModule",
    "ParquetIterableDataset",
    "ParquetReader",
    "ParquetStream",
    "ParquetWriter",
    "Segment",
    "Where",
    "find_parquet_files",
    "shard",
    "split_rows",
    "write_dataset",
]


def __getattr__(name: str):
    if name == "ParquetStream":
        from spherinator.data import transport

        return transport.ParquetStream
    if name in ("DataModule", "Column"):
        from spherinator.data import datamodule

        return getattr(datamodule, name)
    if name in ("AlignByMoments", "MinMaxNormalize", "AbsMaxNormalize"):
        from spherinator.data import transforms

        return getattr(transforms, name)
    if name in ("ParquetDataModule", "ParquetIterableDataModule"):
        from spherinator.data import upstream

        return getattr(upstream, name)
    if name in ("ParquetDataset", "ParquetDatasetSampling", "ParquetDatasetWithError", "ParquetIterableDataset"):
        from spherinator.data import upstream_datasets

        return getattr(upstream_datasets, name)
    raise AttributeError(f"module 'spherinator.data' has no attribute {name!r}")
