"""Cyclic linear annealing of the VAE's KL weight beta."""

from __future__ import annotations

import math

import lightning.pytorch as pl


class KLAnnealing(pl.Callback):
    """Sets ``pl_module.beta`` at the start of every training epoch from a (cyclic) linear schedule.

    The n_epochs are split into ``n_cycles`` periods; in each, beta ramps linearly from ``start`` to ``end`` over
    the first ``ratio`` of the period and then stays at ``end`` (Fu et al., 2019). After ``n_epochs`` beta stays
    at ``end``. The value is logged as ``"beta"``.

    Args:
        start: beta at the beginning of each cycle.
        end: beta at the end of the ramp.
        n_epochs: Total number of epochs the schedule spans.
        n_cycles: Number of ramps (1: monotone schedule).
        ratio: Fraction of each cycle spent ramping, in (0, 1].
    """

    def __init__(
        self, start: float = 0.0, end: float = 1.0e-2, n_epochs: int = 100, n_cycles: int = 1, ratio: float = 1.0
    ) -> None:
        super().__init__()
        if n_epochs < 1 or n_cycles < 1 or n_cycles > n_epochs:
            raise ValueError(
                f"KLAnnealing: need 1 <= n_cycles <= n_epochs, got n_epochs={n_epochs}, n_cycles={n_cycles}"
            )
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"KLAnnealing: ratio is the ramping fraction of a cycle, in (0, 1]; got {ratio}")
        bad = [(name, b) for name, b in (("start", start), ("end", end)) if not (math.isfinite(b) and b >= 0.0)]
        if bad:
            raise ValueError(
                f"KLAnnealing: {bad[0][0]} is {bad[0][1]}; beta (the KL weight) must be a finite number >= 0 "
                f"throughout the schedule (e.g. start: 0.0, end: 1.0e-4)"
            )
        self.start = float(start)
        self.end = float(end)
        self.n_epochs = int(n_epochs)
        self.n_cycles = int(n_cycles)
        self.ratio = float(ratio)

    def beta(self, epoch: int) -> float:
        """The schedule's beta for ``epoch`` (0-based)."""
        if epoch >= self.n_epochs:
            return self.end
        period = self.n_epochs / self.n_cycles
        position = (epoch % period) / period  # in [0, 1) within the current cycle
        return self.start + (self.end - self.start) * min(position / self.ratio, 1.0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "beta"):
            raise AttributeError(
                f"KLAnnealing needs a model with a 'beta' attribute (VariationalAutoencoder), got "
                f"{type(pl_module).__name__}; remove the callback for this model"
            )
        pl_module.beta = self.beta(trainer.current_epoch)
        pl_module.log("beta", pl_module.beta, on_step=False, on_epoch=True)
