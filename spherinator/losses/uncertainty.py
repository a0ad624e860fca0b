"""Reconstruction losses that weigh each value by its measurement error (spectra with uncertainties, e.g. Gaia XP).

A plain MSE treats every value of a spectrum as equally certain, so a model spends its capacity on the noisiest,
brightest bins. With the 1-sigma error of each value, the reconstruction is scored by how many sigmas it misses:
:class:`ChiSquareLoss` (the mean of ``((x_hat - x) / sigma)^2``) and :class:`GaussianNLLLoss` (the negative log
likelihood of ``x`` under ``Normal(x_hat, sigma)``, which is half the chi-square plus ``log sigma``: the same gradients
for fixed errors, and upstream Spherinator's ``loss: NLL-normal``).

Both are called as ``loss(prediction, target, error)``; they carry ``takes_error = True`` and :meth:`error_of` picks
the error out of a batch, so the autoencoders pass it on: a batch ``(data, error)`` (upstream's layout,
:class:`~spherinator.data.ParquetDataModule` with ``error_column``), or a dict batch (``return_dict: true``) holding
``error_column``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from spherinator.errors import DataError


class _ErrorWeightedLoss(nn.Module):
    """Shared part: where the error comes from, and its floor."""

    takes_error = True

    def __init__(self, error_column: str | None = None, min_error: float = 1e-6) -> None:
        super().__init__()
        if not (math.isfinite(min_error) and min_error > 0):
            raise ValueError(f"{type(self).__name__}: min_error must be a finite number > 0, got {min_error}")
        self.error_column = error_column
        self.min_error = float(min_error)

    def error_of(self, batch: Any) -> torch.Tensor:
        """The errors of a batch: the second entry of a ``(data, error)`` tuple, or ``batch[error_column]`` of a dict
        batch (by default the column named like the first one plus ``_error``)."""
        if isinstance(batch, list | tuple) and len(batch) >= 2:
            return batch[1]
        if isinstance(batch, dict) and batch:
            name = self.error_column or f"{next(iter(batch))}_error"
            if name in batch:
                return batch[name]
            raise DataError(
                f"{type(self).__name__} needs each value's error, but the batch has no column {name!r} (it has "
                f"{', '.join(map(repr, batch))}); list the error column in data.columns, or set error_column"
            )
        raise DataError(
            f"{type(self).__name__} needs each value's error, but the batch holds the data alone; load the error "
            f"column too (ParquetDataModule's error_column, or DataModule columns: [flux, flux_error] with "
            f"return_dict: true)"
        )

    def _sigma(self, error: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if error.shape != target.shape:
            raise DataError(
                f"{type(self).__name__}: errors of shape {tuple(error.shape)} do not match the data's "
                f"{tuple(target.shape)}; store one error per value"
            )
        # a zero error (a value given as exact) would weigh infinitely: floored at min_error
        return error.to(target.dtype).abs().clamp(min=self.min_error)


class ChiSquareLoss(_ErrorWeightedLoss):
    """Mean over values of ``((prediction - target) / error)^2``.

    Args:
        error_column: With dict batches, the column holding the errors (default: the first column's name plus
            ``_error``, e.g. ``flux_error``).
        min_error: Floor of the errors (a zero error would weigh a value infinitely).
    """

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(error, target)
        return (((prediction - target) / sigma) ** 2).mean()


class GaussianNLLLoss(_ErrorWeightedLoss):
    """Mean over values of the negative log likelihood of ``target`` under ``Normal(prediction, error)``:
    ``0.5 * ((prediction - target) / error)^2 + log(error)`` (plus ``0.5 * log(2 pi)`` with ``full``).

    Args:
        error_column: With dict batches, the column holding the errors (see :class:`ChiSquareLoss`).
        min_error: Floor of the errors.
        full: Add the constant ``0.5 * log(2 pi)`` (a true log likelihood; no change to the gradients).
    """

    def __init__(self, error_column: str | None = None, min_error: float = 1e-6, full: bool = False) -> None:
        super().__init__(error_column, min_error)
        self.full = bool(full)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(error, target)
        nll = 0.5 * ((prediction - target) / sigma) ** 2 + torch.log(sigma)
        if self.full:
            nll = nll + 0.5 * math.log(2 * math.pi)
        return nll.mean()
