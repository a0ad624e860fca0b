"""Reconstruction losses: VGG-16 perceptual loss and a weighted combination of losses."""

from spherinator.losses.combined import CombinedLoss
from spherinator.losses.perceptual import PerceptualLoss

__all__ = ["CombinedLoss", "PerceptualLoss"]
