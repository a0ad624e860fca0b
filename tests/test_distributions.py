"""Numerics of the Power Spherical distribution, the uniform prior and their KL divergence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import kl_divergence

from spherinator.distributions import HypersphericalUniform, PowerSpherical

DIMS = [3, 16, 128, 512]
SCALES = [1e-3, 1.0, 1e2, 1e4, 1e5]


def random_loc(n: int, d: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d), dim=-1)


@pytest.mark.parametrize("d", DIMS)
def test_samples_kl_and_gradients_are_finite_in_float32(d):
    torch.manual_seed(d)
    n = len(SCALES)
    loc = random_loc(n, d).requires_grad_()
    scale = torch.tensor(SCALES).requires_grad_()
    q = PowerSpherical(loc, scale)
    z = q.rsample((4,))  # (4, n, d)
    kl = kl_divergence(q, HypersphericalUniform(d))
    assert z.dtype == kl.dtype == torch.float32
    assert torch.isfinite(z).all() and torch.isfinite(kl).all()
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4, n))
    assert (kl >= -1e-4).all()
    assert (kl[1:] > kl[:-1]).all(), "KL to the uniform must grow with the concentration"
    (kl_grad,) = torch.autograd.grad(kl.sum(), scale, retain_graph=True)
    assert (kl_grad > 0).all(), "KL gradient wrt the concentration must be positive"
    (z * torch.randn_like(z)).sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def test_kl_matches_closed_form_on_the_2_sphere():
    # d = 3: KL(PS(mu, k) || U(S^2)) = log(1 + k) - k / (1 + k), derived independently of lgamma/digamma
    scales = torch.logspace(-3, 5, 17)
    q = PowerSpherical(random_loc(len(scales), 3), scales)
    kl = kl_divergence(q, HypersphericalUniform(3)).double()
    ref = torch.tensor([math.log1p(k) - k / (1 + k) for k in scales.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("d", "scale"), [(3, 5.0), (3, 300.0), (64, 20.0), (512, 1000.0)])
def test_sampler_log_prob_and_entropy_agree(d, scale):
    # Monte-Carlo: E_q[-log q(z)] over samples of rsample must equal the analytic entropy
    torch.manual_seed(1)
    q = PowerSpherical(random_loc(1, d), torch.tensor([scale]))
    z = q.rsample((20000,))  # (S, 1, d)
    mc_entropy = -q.log_prob(z).double().mean()
    assert mc_entropy.item() == pytest.approx(q.entropy().item(), abs=0.02 * max(1.0, abs(q.entropy().item())))


@pytest.mark.parametrize(("d", "scale"), [(3, 2.0), (10, 50.0)])
def test_sample_mean_matches_analytic_mean(d, scale):
    torch.manual_seed(2)
    q = PowerSpherical(random_loc(2, d), torch.full((2,), scale))
    empirical = q.rsample((20000,)).mean(0)  # (2, d)
    torch.testing.assert_close(empirical, q.mean, atol=0.02, rtol=0)
    # mean direction is loc, and E[mu^T z] = kappa / (kappa + d - 1)
    expected = scale / (scale + d - 1)
    torch.testing.assert_close((q.mean * q.loc).sum(-1), torch.full((2,), expected), rtol=1e-5, atol=1e-6)


def test_loc_equal_to_first_axis_samples_around_it():
    loc = torch.zeros(3, 5)
    loc[:, 0] = 1.0  # the Householder vector vanishes here
    q = PowerSpherical(loc, torch.tensor([1.0, 100.0, 1e5]))
    z = q.rsample((2000,))
    assert torch.isfinite(z).all()
    cos = z[..., 0].mean(0)
    torch.testing.assert_close(cos, (q.mean * loc).sum(-1), atol=0.03, rtol=0)


def test_uniform_samples_and_density():
    u = HypersphericalUniform(3)
    z = u.sample((5000,))
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5000))
    assert z.mean(0).abs().max() < 0.05
    torch.testing.assert_close(u.log_prob(z[:2]), torch.full((2,), -math.log(4 * math.pi)))
    with pytest.raises(ValueError, match="dim >= 2"):
        HypersphericalUniform(1)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"scale must have shape .*\(4,\).*\(3,\)"):
        PowerSpherical(random_loc(4, 3), torch.ones(3))
    # a trailing singleton scale dimension is accepted
    assert PowerSpherical(random_loc(4, 3), torch.ones(4, 1)).batch_shape == (4,)
    with pytest.raises(ValueError, match="different spheres"):
        kl_divergence(PowerSpherical(random_loc(2, 3), torch.ones(2)), HypersphericalUniform(4))


def test_builds_and_samples_in_float32_under_bf16_autocast():
    loc = random_loc(4, 8).to(torch.bfloat16)
    scale = torch.full((4,), 50.0, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
        q = PowerSpherical(loc.float(), scale.float())
        z = q.rsample()
        kl = kl_divergence(q, HypersphericalUniform(8))
    assert z.dtype == torch.float32 and torch.isfinite(z).all() and torch.isfinite(kl).all()
