"""Distributions on the unit hypersphere: Power Spherical posterior, uniform prior and their KL divergence."""

from spherinator.distributions.power_spherical import HypersphericalUniform, PowerSpherical

__all__ = ["HypersphericalUniform", "PowerSpherical"]
