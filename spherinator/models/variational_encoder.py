"""The sphere head of the VAE: a backbone encoder plus location and concentration heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VariationalEncoder(nn.Module):
    """Wraps a backbone encoder with two linear heads giving a Power Spherical posterior.

    ``fc_location`` maps the backbone output to a unit-norm location (B, z_dim); ``fc_scale`` maps it to a
    concentration (B,) via softplus + 1 (so it never collapses to 0), clamped at ``max_scale``. Both are returned
    in float32 even under mixed precision, since the distribution needs it.

    Args:
        encoder: Backbone mapping (B, *input_dim) -> (B, encoder_out_dim).
        encoder_out_dim: Output size of the backbone.
        z_dim: Dimension of the latent space (the sphere S^{z_dim-1} in R^{z_dim}).
        max_scale: Upper bound of the concentration.
    """

    def __init__(self, encoder: nn.Module, encoder_out_dim: int, z_dim: int, max_scale: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.fc_location = nn.Linear(encoder_out_dim, z_dim)
        self.fc_scale = nn.Linear(encoder_out_dim, 1)
        self.max_scale = float(max_scale)
        self.input_dim: tuple[int, ...] | None = getattr(encoder, "input_dim", None)
        self.output_dim = z_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)  # (B, encoder_out_dim)
        location = F.normalize(self.fc_location(h).float(), dim=-1)  # (B, z_dim), unit norm
        scale = (F.softplus(self.fc_scale(h).float()) + 1.0).clamp(max=self.max_scale).squeeze(-1)  # (B,)
        return location, scale
