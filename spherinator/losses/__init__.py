"""Reconstruction losses: VGG-16 perceptual loss, a colour-weighted MSE and a weighted combination of losses."""

from spherinator.losses.colour import ColourWeightedMSELoss
from spherinator.losses.combined import CombinedLoss
from spherinator.losses.perceptual import PerceptualLoss

__all__ = ["ColourWeightedMSELoss", "CombinedLoss", "PerceptualLoss"]
