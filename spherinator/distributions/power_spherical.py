"""Power Spherical distribution, the uniform distribution on the hypersphere and their KL divergence.

Power Spherical (De Cao & Aziz, 2020): density on the unit sphere S^{d-1} proportional to
``(1 + mu^T x)^kappa``. It has a reparameterised sampler without rejection, which makes it a drop-in posterior
for a spherical VAE.

Numerics: the location/sample algebra runs in the caller's dtype (float32 in training), while the scalar
functions of the concentration (lgamma, digamma of values up to ~1e5 + d/2) are evaluated in float64 on the
(B,) scale vector only. That keeps log-normaliser, entropy and KL accurate at large concentration for the cost
of a few double-precision ops per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import Beta, Distribution, constraints
from torch.distributions.kl import register_kl


def _scalar_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for the concentration functions, except on backends without double support."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _log_sphere_area(dim: int) -> float:
    """log of the surface area of S^{dim-1} = 2 pi^{dim/2} / Gamma(dim/2)."""
    return math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


class PowerSpherical(Distribution):
    """Power Spherical distribution on the unit sphere in R^d.

    Args:
        loc: Mean direction, unit norm, shape (..., d) with d >= 2.
        scale: Concentration kappa >= 0, shape (...) (a trailing singleton dimension is squeezed).
        validate_args: Passed to ``torch.distributions.Distribution``.
    """

    arg_constraints = {"loc": constraints.real_vector, "scale": constraints.nonnegative}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args: bool | None = None) -> None:
        if loc.dim() < 1 or loc.shape[-1] < 2:
            raise ValueError(f"loc must have shape (..., d) with d >= 2, got {tuple(loc.shape)}")
        if scale.dim() == loc.dim() and scale.shape[-1] == 1:
            scale = scale.squeeze(-1)
        if scale.shape != loc.shape[:-1]:
            raise ValueError(
                f"scale must have shape loc.shape[:-1] = {tuple(loc.shape[:-1])}, got {tuple(scale.shape)}"
            )
        self.loc = loc
        self.scale = scale
        self.dim = loc.shape[-1]
        super().__init__(batch_shape=scale.shape, event_shape=loc.shape[-1:], validate_args=validate_args)

    def _alpha_beta(self) -> tuple[torch.Tensor, float]:
        """Beta parameters of the marginal t = (1 + mu^T x) / 2 ~ Beta(alpha, beta), alpha in float64."""
        beta = 0.5 * (self.dim - 1)
        alpha = self.scale.to(_scalar_dtype(self.scale)) + beta
        return alpha, beta

    def _log_normalizer(self) -> torch.Tensor:
        """log N with N = 2^{alpha+beta} pi^beta Gamma(alpha) / Gamma(alpha+beta); returned in float64."""
        alpha, beta = self._alpha_beta()
        return (
            (alpha + beta) * math.log(2.0) + beta * math.log(math.pi) + torch.lgamma(alpha) - torch.lgamma(alpha + beta)
        )

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape)
        alpha, beta = self._alpha_beta()
        # s = 1 - t ~ Beta(beta, alpha) is small for large kappa: sampling it directly keeps 1 - w accurate.
        s = Beta(torch.full_like(alpha, beta), alpha).rsample(shape).to(self.loc.dtype)  # (*S, *B)
        w = 1.0 - 2.0 * s  # cosine to the mean direction
        sin = 2.0 * torch.sqrt((s * (1.0 - s)).clamp_min(0.0))  # sqrt(1 - w^2) without cancellation
        v = torch.randn(shape + self.loc.shape[:-1] + (self.dim - 1,), dtype=self.loc.dtype, device=self.loc.device)
        v = F.normalize(v, dim=-1)  # uniform on S^{d-2}
        y = torch.cat([w.unsqueeze(-1), sin.unsqueeze(-1) * v], dim=-1)  # sample around e1, (*S, *B, d)
        # Householder reflection that maps e1 to loc; u = 0 when loc == e1 (then y is already right).
        e1 = torch.zeros_like(self.loc)
        e1[..., 0] = 1.0
        u = F.normalize(e1 - self.loc, dim=-1)
        z = y - 2.0 * (y * u).sum(-1, keepdim=True) * u
        return F.normalize(z, dim=-1)  # remove rounding drift off the sphere

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        cos = (self.loc * value).sum(-1)
        dtype = _scalar_dtype(cos)
        log_p = self.scale.to(dtype) * torch.log1p(cos.to(dtype).clamp_min(-1.0 + 1e-12)) - self._log_normalizer()
        return log_p.to(self.loc.dtype)

    def _entropy_scalar(self) -> torch.Tensor:
        """Entropy in float64 (float32 on MPS), shape (...)."""
        alpha, beta = self._alpha_beta()
        scale = self.scale.to(alpha.dtype)
        return self._log_normalizer() - scale * (math.log(2.0) + torch.digamma(alpha) - torch.digamma(alpha + beta))

    def entropy(self) -> torch.Tensor:
        return self._entropy_scalar().to(self.loc.dtype)

    @property
    def mean(self) -> torch.Tensor:
        alpha, beta = self._alpha_beta()
        factor = ((alpha - beta) / (alpha + beta)).to(self.loc.dtype)  # E[mu^T x]
        return self.loc * factor.unsqueeze(-1)

    @property
    def mode(self) -> torch.Tensor:
        return self.loc

    @property
    def stddev(self) -> torch.Tensor:
        raise NotImplementedError("PowerSpherical.stddev is not implemented; use samples from rsample() instead")


class HypersphericalUniform(Distribution):
    """Uniform distribution on the unit sphere S^{dim-1} in R^dim.

    Args:
        dim: Dimension of the ambient space (the latent size, z_dim).
        device: Device of the samples.
        dtype: dtype of the samples.
        validate_args: Passed to ``torch.distributions.Distribution``.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        validate_args: bool | None = None,
    ) -> None:
        if dim < 2:
            raise ValueError(f"HypersphericalUniform needs dim >= 2 (a sphere in R^dim), got dim={dim}")
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size([dim]), validate_args=validate_args)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.event_shape
        return F.normalize(torch.randn(shape, device=self.device, dtype=self.dtype), dim=-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return torch.full(value.shape[:-1], -_log_sphere_area(self.dim), dtype=value.dtype, device=value.device)

    def entropy(self) -> torch.Tensor:
        return torch.tensor(_log_sphere_area(self.dim), dtype=self.dtype, device=self.device)


@register_kl(PowerSpherical, HypersphericalUniform)
def _kl_power_spherical_uniform(p: PowerSpherical, q: HypersphericalUniform) -> torch.Tensor:
    if p.dim != q.dim:
        raise ValueError(f"KL between distributions on different spheres: PowerSpherical d={p.dim}, uniform d={q.dim}")
    return (_log_sphere_area(q.dim) - p._entropy_scalar()).to(p.loc.dtype)
