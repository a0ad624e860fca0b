"""Weighted sum of reconstruction losses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class CombinedLoss(nn.Module):
    """``sum_i factors[i] * losses[i](prediction, target)``, e.g. MSE blended with a perceptual loss.

    Args:
        losses: Loss modules, each called as ``loss(prediction, target)``.
        factors: Weight of each loss, same length as ``losses`` (default: all 1.0).
    """

    def __init__(self, losses: list[nn.Module], factors: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(losses) == 0:
            raise ValueError("CombinedLoss: losses is empty; give at least one loss module")
        factors = [1.0] * len(losses) if factors is None else [float(f) for f in factors]
        if len(factors) != len(losses):
            raise ValueError(
                f"CombinedLoss: {len(factors)} factors {factors} for {len(losses)} losses "
                f"({', '.join(type(loss).__name__ for loss in losses)}); give one factor per loss"
            )
        bad = [f for f in factors if not (math.isfinite(f) and f >= 0.0)]
        if bad:
            raise ValueError(
                f"CombinedLoss: factors {factors} has {bad[0]}; each factor weighs one loss and must be a finite "
                "number >= 0 (a negative one rewards a worse reconstruction)"
            )
        self.losses = nn.ModuleList(losses)
        self.factors = factors

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = sum(f * loss(prediction, target) for f, loss in zip(self.factors, self.losses, strict=True))
        return total  # type: ignore[return-value]
