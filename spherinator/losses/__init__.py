"""Reconstruction losses: VGG-16 perceptual loss, a colour-weighted MSE, a weighted combination of losses, and losses
that weigh each value by its error (chi-square, Gaussian NLL)."""

from spherinator.losses.colour import ColourWeightedMSELoss
from spherinator.losses.combined import CombinedLoss
from spherinator.losses.perceptual import PerceptualLoss
from spherinator.losses.uncertainty import ChiSquareLoss, GaussianNLLLoss

__all__ = ["ChiSquareLoss", "ColourWeightedMSELoss", "CombinedLoss", "GaussianNLLLoss", "PerceptualLoss"]
