"""Figures of the latent sphere on the validation data, each validation epoch: how much of it is used, how
concentrated the posteriors are, how well a label can be told from the position; a warning when it collapses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributions import kl_divergence

from spherinator import metrics
from spherinator.callbacks._collect import ValidationCollector
from spherinator.distributions import HypersphericalUniform, PowerSpherical


def kl_per_row(location: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL divergence (nats) of each row's Power Spherical posterior (location (B, d), scale (B,)) from the uniform
    distribution on the sphere, as the VAE's loss computes it; (B,) float32."""
    with torch.autocast(device_type=location.device.type, enabled=False):
        q = PowerSpherical(location.float(), scale.float())
        return kl_divergence(q, HypersphericalUniform(location.shape[-1], device=location.device))


def encode_rows(pl_module: pl.LightningModule, batch: Any, batch_idx: int = 0) -> dict[str, torch.Tensor]:
    """``pl_module.predict_step(batch)`` without gradients: ``location`` (B, d), for a VAE ``scale`` (B,), and
    the batch's per-row columns (``id``, ``label``, ...) when it is a dict."""
    with torch.no_grad():
        out = pl_module.predict_step(batch, batch_idx)
    if isinstance(out, torch.Tensor):
        out = {"location": out}
    return {name: value.detach() for name, value in out.items() if isinstance(value, torch.Tensor)}


def missing_column(owner: str, argument: str, column: str, batch: Any) -> str:
    """The warning for a per-row column a callback was told to read but the validation batches lack."""
    found = list(batch) if isinstance(batch, dict) else f"a {type(batch).__name__}, not a dict"
    return (
        f"{owner}: {argument} {column!r} is not a per-row column of the validation batches (found: {found}); set "
        "data.init_args.return_dict: true and add it to data.init_args.columns"
    )


class SphereQuality(ValidationCollector):
    """Logs figures of the validation latents each validation epoch and warns once when the sphere collapses.

    Up to ``max_samples`` validation rows are encoded (gathered from all ranks). Logged, for every logger:

    - ``val_coverage``: fraction of the 192 equal-area HEALPix cells (nside 4) of S^2 holding a position, and
      ``val_coverage_uniform``, what as many uniform points would cover (z_dim 3 only);
    - ``val_resultant_length``: length of the mean position (1: one point; about 0: spread);
    - ``val_scale_p10``, ``val_scale_p50``, ``val_scale_p90``, ``val_scale_at_floor``: the Power Spherical
      concentrations and the fraction of rows at their floor of 1 (VAE); ``val_kl_per_sample`` (nats);
    - ``val_knn_accuracy``: 5-fold cross-validated kNN accuracy of ``label_column`` from the positions, when the
      data return dicts holding it (``data.init_args.return_dict: true``, ``columns: [data, label]``); for a
      column that is a quantity rather than class labels (a redshift: see :func:`spherinator.metrics.is_continuous`)
      ``val_knn_r2``, the cross-validated kNN R^2, instead. Rows without a value (NaN) are left out, with a warning
      saying how many.

    A figure that cannot be computed (one class, a constant column, too few rows) is skipped with a warning, once
    per figure: a watcher never stops the fit it watches.

    When :func:`spherinator.metrics.collapse_warnings` fires for ``patience`` validation epochs in a row (the
    posterior at its floor, a KL per sample near zero, one clump), or for twice as many on coverage alone (far
    below uniform's), it warns once, with the numbers and the fix. A healthy demo run (it ended on 79% of the
    cells) started in one region and spread slowly: its validation coverage sat below a quarter of uniform's for
    three epochs in a row, where runs that never spread stay there.

    Args:
        max_samples: Validation rows used per epoch.
        label_column: Per-row class label in the batch dict, for ``val_knn_accuracy``.
        k: Neighbours of the kNN classifier.
        nside: HEALPix resolution of the coverage, a power of two (4: 192 cells).
        patience: Validation epochs in a row with collapsed figures before the warning. Healthy runs can start at
            the floor: on the demo the median concentration sat at 1.0 for the first two epochs of runs that
            reached 10-80 by the tenth, where a collapsed run stays there (3: warned after the third epoch).
    """

    def __init__(
        self, max_samples: int = 5000, label_column: str | None = None, k: int = 5, nside: int = 4, patience: int = 3
    ) -> None:
        super().__init__()
        if max_samples < 10 or k < 1 or patience < 1:
            raise ValueError(
                f"SphereQuality: need max_samples >= 10, k >= 1, patience >= 1; got max_samples={max_samples}, k={k}, "
                f"patience={patience}"
            )
        try:
            metrics.check_nside(nside)
        except ValueError as err:
            raise ValueError(f"SphereQuality: {err}") from None
        self.max_samples = int(max_samples)
        self.label_column = label_column
        self.k = int(k)
        self.nside = int(nside)
        self.patience = int(patience)
        self.collapsed_epochs = 0
        self.empty_epochs = 0
        self.warned = False
        self.figures: dict[str, float] = {}  # the last epoch's figures
        self._rows: list[dict[str, torch.Tensor]] = []
        self._label_missing = False
        self._said: set[str] = set()  # warnings given once per run

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        have = sum(len(r["location"]) for r in self._rows)
        if trainer.sanity_checking or have >= self.max_samples:
            return
        rows = encode_rows(pl_module, batch, batch_idx)
        keep = {"location", "scale"}
        if self.label_column is not None:
            if self.label_column in rows:
                keep.add(self.label_column)
            elif not self._label_missing:
                self._label_missing = True
                rank_zero_warn(missing_column("SphereQuality", "label_column", self.label_column, batch))
        self._rows.append({name: rows[name][: self.max_samples - have].cpu() for name in keep if name in rows})

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._rows:
            return
        rows = {name: torch.cat([r[name] for r in self._rows]) for name in self._rows[0]}
        self._rows = []
        if trainer.world_size > 1:
            rows = {name: _gather(pl_module, value) for name, value in rows.items()}
        figures = self._figures(rows)
        self.figures = figures
        for name, value in figures.items():
            pl_module.log(name, value, on_epoch=True, on_step=False, sync_dist=False)
        self._check_collapse(rows, figures, pl_module)

    def _figures(self, rows: dict[str, torch.Tensor]) -> dict[str, float]:
        location = rows["location"].double()
        points = torch.nn.functional.normalize(location, dim=-1).numpy()
        figures: dict[str, float] = {}
        if points.shape[1] == 3:
            cover = self._guarded("val_coverage", lambda: metrics.coverage(points, self.nside))
            if cover:
                figures["val_coverage"] = cover["coverage"]
                figures["val_coverage_uniform"] = cover["uniform_coverage"]
        figures.update(self._guarded("val_resultant_length", lambda: metrics.resultant_length(points)))
        if "scale" in rows:
            scale = rows["scale"].numpy()
            concentration = self._guarded("val_scale", lambda: metrics.concentration(scale))
            figures.update({f"val_scale_{name}": value for name, value in concentration.items()})
            kl = self._guarded("val_kl_per_sample", lambda: float(kl_per_row(rows["location"], rows["scale"]).mean()))
            figures.update(kl)
        labels = rows.get(self.label_column) if self.label_column else None
        if labels is not None:
            figures.update(self._guarded(f"the kNN figure of {self.label_column!r}", lambda: self._knn(points, labels)))
        return figures

    def _knn(self, points: np.ndarray, labels: torch.Tensor) -> dict[str, float]:
        """``val_knn_accuracy`` of class labels or ``val_knn_r2`` of a quantity, rows without a value left out."""
        values = labels.numpy()
        keep = metrics.present(values)
        if not keep.all():
            self._say_once(
                "missing",
                f"SphereQuality: label_column {self.label_column!r} has no value (NaN) in {int((~keep).sum())} of "
                f"{len(values)} validation rows; they are left out of its figure",
            )
        name, value = metrics.knn_label(points[keep], values[keep], k=self.k)
        return {f"val_{name}": value}

    def _guarded(self, name: str, compute: Callable[[], Any]) -> dict[str, float]:
        """``compute()`` as ``{name: value}`` (a dict result as it is); on any error a warning, once per figure, and
        nothing: a figure must never stop the fit it watches (a Slurm task would end FAILED)."""
        try:
            value = compute()
        except Exception as err:  # noqa: BLE001 - whatever a figure raises, the fit goes on without it
            self._say_once(name, f"SphereQuality: {name} skipped ({type(err).__name__}: {err})")
            return {}
        return value if isinstance(value, dict) else {name: value}

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            rank_zero_warn(message)

    def _check_collapse(
        self, rows: dict[str, torch.Tensor], figures: dict[str, float], pl_module: pl.LightningModule
    ) -> None:
        if "scale" not in rows:
            return  # a plain autoencoder: no prior, so the fixes below (beta) do not apply
        beta = getattr(pl_module, "beta", None)
        beta = float(beta) if isinstance(beta, int | float) else None
        collapsed = metrics.collapse_warnings(
            scale=rows["scale"].numpy(),
            kl=figures.get("val_kl_per_sample"),
            resultant_length=figures.get("val_resultant_length"),
            beta=beta,
        )
        empty = metrics.collapse_warnings(
            coverage=figures.get("val_coverage"), uniform_coverage=figures.get("val_coverage_uniform"), beta=beta
        )
        self.collapsed_epochs = self.collapsed_epochs + 1 if collapsed else 0
        self.empty_epochs = self.empty_epochs + 1 if empty else 0
        due = (collapsed and self.collapsed_epochs >= self.patience) or (
            empty and self.empty_epochs >= 2 * self.patience
        )
        if due and not self.warned:
            self.warned = True
            n = max(self.collapsed_epochs, self.empty_epochs)
            epochs = f"{n} validation epoch{'s' if n > 1 else ''}"
            messages = collapsed + empty
            rank_zero_warn(f"SphereQuality, after {epochs} of {len(rows['location'])} rows: " + " | ".join(messages))

    def state_dict(self) -> dict[str, Any]:
        return {"collapsed_epochs": self.collapsed_epochs, "empty_epochs": self.empty_epochs, "warned": self.warned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.collapsed_epochs = int(state_dict.get("collapsed_epochs", 0))
        self.empty_epochs = int(state_dict.get("empty_epochs", 0))
        self.warned = bool(state_dict.get("warned", False))


def _gather(pl_module: pl.LightningModule, value: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, concatenated; ranks may hold different numbers of rows."""
    local = value.to(pl_module.device)
    counts = pl_module.all_gather(torch.tensor([len(local)], device=pl_module.device)).reshape(-1)  # (W,)
    padded = local.new_zeros((int(counts.max()), *local.shape[1:]))
    padded[: len(local)] = local
    gathered = pl_module.all_gather(padded)  # (W, max rows, ...)
    return torch.cat([gathered[r, : int(n)] for r, n in enumerate(counts)]).cpu()
