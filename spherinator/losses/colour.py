"""Mean squared error with the colour of multi-band images weighted apart from their brightness."""

from __future__ import annotations

import math

import torch
from torch import nn

from spherinator.shapes import ConfigError


class ColourWeightedMSELoss(nn.Module):
    """MSE of multi-band images split into a luminance and a colour part, the colour part weighted by
    ``colour_weight``.

    Each pixel's values over the C bands (dimension 1) are their mean, the luminance L, plus the differences
    d_c = x_c - L. The mean over bands of the squared error is exactly (L' - L)^2 + mean_c (d'_c - d_c)^2, so
    ``colour_weight`` 1 is ``torch.nn.MSELoss()``. A per-pixel loss ranks what it reconstructs by how many squared
    pixel values it moves: for galaxies that is size, brightness and shape first, while colour (the stellar
    population: red bulges, blue disks) changes every pixel by a small fraction of its light. ``colour_weight`` > 1
    asks the latent space to spend its few degrees of freedom on colour too. The loss stays a mean over the N values
    of a sample: against a VAE's ``beta`` the luminance part is the Gaussian likelihood of pixel variance
    beta * N / 2 (see the README), the colour part one of variance beta * N / (2 * colour_weight).

    Images of one band have no colour: the loss refuses them (use ``torch.nn.MSELoss``, which it would equal).

    Args:
        colour_weight: Weight of the colour part (band differences from the luminance) against the luminance part.
    """

    def __init__(self, colour_weight: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(colour_weight) and colour_weight >= 0):
            raise ValueError(f"ColourWeightedMSELoss: colour_weight must be a finite number >= 0, got {colour_weight}")
        self.colour_weight = float(colour_weight)

    def extra_repr(self) -> str:
        return f"colour_weight={self.colour_weight:g}"

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # ConfigError, not ValueError: a model of other outputs or of vectors cannot train with this loss, which
        # `spherinator fit` says in one line instead of a traceback from the first training step
        if prediction.shape != target.shape:
            raise ConfigError(
                f"ColourWeightedMSELoss: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ"
            )
        if prediction.dim() < 3:
            raise ConfigError(
                f"ColourWeightedMSELoss needs bands on dimension 1 of (B, C, ...), got shape {tuple(prediction.shape)}"
            )
        if prediction.shape[1] == 1:
            raise ConfigError(
                f"ColourWeightedMSELoss weighs the colour between bands apart, but the images have one band (shape "
                f"{tuple(prediction.shape)}): it would be plain MSE; use torch.nn.MSELoss as the model's loss"
            )
        error = prediction - target  # (B, C, ...)
        luminance = error.mean(dim=1, keepdim=True)  # (B, 1, ...)
        colour = error - luminance  # (B, C, ...), sums to 0 over the bands
        return luminance.square().mean() + self.colour_weight * colour.square().mean()
