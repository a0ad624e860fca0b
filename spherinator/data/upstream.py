"""Upstream Spherinator's DataModules under their own names, on the streaming :class:`DataModule`.

Configs written for HITS-AIN/Spherinator name ``spherinator.data.ParquetDataModule`` (spectra, flattened images) or
``spherinator.data.ParquetIterableDataModule``; these classes take the same options and map them onto columns and
transforms of :class:`~spherinator.data.datamodule.DataModule`:

- ``data_directory`` -> ``path``; ``data_column`` (one name or several, concatenated along the last axis);
- ``normalize: minmax | absmax`` -> :class:`~spherinator.data.transforms.MinMaxNormalize` /
  :class:`~spherinator.data.transforms.AbsMaxNormalize` on each sample;
- ``error_column``: batches are ``(data, error)`` as upstream's ``ParquetDatasetWithError`` gives them: each
  sample scaled to [0, 1] and its error by the same factor (then ``normalize``, on the data only); a loss that
  takes the error (:class:`~spherinator.losses.GaussianNLLLoss`, :class:`~spherinator.losses.ChiSquareLoss`) gets it;
- there is no validation split (upstream's classes have none); every row trains.

Where an option cannot mean the same here (``with_index: true``: the rows are streamed and shuffled, there is no
position to return), a ConfigError says what to write instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spherinator.data.datamodule import Column, DataModule
from spherinator.data.transforms import AbsMaxNormalize, MinMaxNormalize
from spherinator.errors import ConfigError

_NORMALIZE = {"minmax": MinMaxNormalize, "absmax": AbsMaxNormalize}


def _normalizer(normalize: str | None) -> torch.nn.Module | None:
    if normalize is None or str(normalize).lower() == "none":
        return None
    if str(normalize).lower() not in _NORMALIZE:
        raise ConfigError(f"normalize={normalize!r} is not known; write minmax, absmax or none")
    return _NORMALIZE[str(normalize).lower()]()


@dataclass
class UpstreamBatch:
    """Turns a loaded ``{column: tensor}`` batch into upstream's: the data columns concatenated along the last
    axis, and with an error column ``(data, error)``, both scaled by each sample's range of data values."""

    data_columns: list[str]
    error_column: str | None = None
    normalize: torch.nn.Module | None = None

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        parts = [batch[name].float() for name in self.data_columns]
        data = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if self.error_column is None:
            return data if self.normalize is None else self.normalize(data)
        flat = data.reshape(len(data), -1)
        low = flat.amin(1).reshape(-1, *[1] * (data.dim() - 1))
        span = flat.amax(1).reshape(low.shape) - low
        span = torch.where(span > 0, span, torch.ones_like(span))  # a flat spectrum: left as it is, not NaN
        error = batch[self.error_column].float()
        data, error = (data - low) / span, error / span.reshape(-1, *[1] * (error.dim() - 1))
        return (data if self.normalize is None else self.normalize(data)), error


class ParquetDataModule(DataModule):
    """Upstream Spherinator's ``ParquetDataModule``: one or several array columns of the Parquet files under
    ``data_directory``, optionally normalised per sample and with their errors (see the module's notes).

    Args:
        data_directory: Directory (or file) of the Parquet files.
        data_column: The data column, or several concatenated along their last axis.
        error_column: A column of 1-sigma errors of the data (same shape); batches become ``(data, error)``.
        normalize: ``minmax`` (each sample to [0, 1]), ``absmax`` (each sample to [-1, 1]) or None/``none``.
        shuffle: Shuffle the rows every epoch.
        batch_size: Rows per batch.
        num_workers: DataLoader worker processes.
        with_index: Upstream returns each row's position with it; only ``false`` is accepted here.
    """

    def __init__(
        self,
        data_directory: str,
        data_column: str | list[str] = "data",
        error_column: str | None = None,
        normalize: str | None = None,
        shuffle: bool = True,
        batch_size: int = 32,
        num_workers: int = 1,
        with_index: bool = False,
    ) -> None:
        if with_index:
            raise ConfigError(
                "with_index: true (each row's position) does not exist here: rows are streamed and shuffled; store an "
                "index column (e.g. id) and use spherinator.data.DataModule with columns: [data, id], return_dict: true"
            )
        names = [data_column] if isinstance(data_column, str) else list(data_column)
        if not names:
            raise ConfigError("data_column=[] names no column; give one, e.g. data_column: flux")
        if error_column is not None and len(names) > 1:
            raise ConfigError(
                f"error_column={error_column!r} goes with one data column, not {names}; as upstream, give one"
            )
        self.data_column, self.error_column, self.normalize, self.with_index = names, error_column, normalize, False
        self._finish = UpstreamBatch(names, error_column, _normalizer(normalize))
        columns: list[str | Column] = [*names, *([error_column] if error_column is not None else [])]
        super().__init__(
            path=data_directory,
            columns=columns,
            return_dict=True,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            val_fraction=0.0,
        )
        self.data_directory = data_directory

    def finish_batch(self) -> UpstreamBatch:
        """Upstream's batch layout: the data tensor, or ``(data, error)``."""
        return self._finish

    def sample_shape(self, column: str | None = None) -> tuple[int, ...]:
        """Shape of one sample of the model input (the data columns concatenated), or of ``column``."""
        if column is not None or len(self.data_column) == 1:
            return super().sample_shape(column or self.data_column[0])
        shapes = [super(ParquetDataModule, self).sample_shape(name) for name in self.data_column]
        return (*shapes[0][:-1], sum(shape[-1] for shape in shapes))


class ParquetIterableDataModule(ParquetDataModule):
    """Upstream Spherinator's ``ParquetIterableDataModule``: one column, each sample scaled to [0, 1] (upstream's
    fixed min-max transform), streamed.

    Args:
        data_directory: Directory (or file) of the Parquet files.
        data_column: The data column.
        batch_size: Rows per batch.
        scanner_batch_size: Rows upstream's scanner reads at once; here the files' row groups are read whole, so it
            is accepted and has no effect on the batches.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        data_directory: str,
        data_column: str = "data",
        batch_size: int = 32,
        scanner_batch_size: int = 512,
        num_workers: int = 1,
    ) -> None:
        super().__init__(
            data_directory,
            data_column,
            normalize="minmax",
            shuffle=False,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        self.scanner_batch_size = scanner_batch_size


__all__ = ["ParquetDataModule", "ParquetIterableDataModule", "UpstreamBatch"]
