"""``MLP``: a multi-layer perceptron, usable as an encoder or decoder of flat (or flattened) samples."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from spherinator.errors import ConfigError
from spherinator.models.transfer import WeightsProvider, apply_transfer


class MLP(nn.Module):
    """Flatten, then ``Linear`` layers of the given sizes with an activation between them (none after the last).

    Upstream Spherinator's class and arguments; ``input_dim`` / ``output_dim`` mirror ``input_size`` /
    ``output_size`` for the models' shape wiring, and ``weights`` / ``freeze`` work as on every encoder.

    Args:
        input_size: Features of a (flattened) sample.
        hidden_sizes: Sizes of the hidden layers; empty for a single linear map.
        output_size: Features of the output.
        activation: Activation class (or a callable building one) after each hidden layer.
        weights: Start from an earlier run: a checkpoint/state-dict path or a ``WeightsProvider``.
        freeze: Fix every parameter.
    """

    def __init__(
        self,
        input_size: int,
        hidden_sizes: list[int],
        output_size: int,
        activation: type[nn.Module] | Callable[..., nn.Module] = nn.ReLU,
        weights: str | WeightsProvider | None = None,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        sizes = [input_size, *hidden_sizes, output_size]
        bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
        if bad:
            raise ConfigError(f"MLP: sizes must be positive integers, got {bad[0]!r} in {sizes}")
        self.input_size, self.output_size = input_size, output_size
        self.output_dim = output_size
        layers: list[nn.Module] = [nn.Flatten()]
        for k, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
            layers.append(nn.Linear(n_in, n_out))
            if k < len(sizes) - 2:
                layers.append(activation())
        self.model = nn.Sequential(*layers)
        self.example_input_array = torch.randn(1, input_size)
        apply_transfer(self, weights, freeze)

    @property
    def in_features(self) -> int:
        """The input size, under ``nn.Linear``'s name (what ``Sequential`` and the decoders' wiring read)."""
        return self.input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row = math.prod(x.shape[1:])
        if row != self.input_size:  # nn.Linear's own message names neither the row's shape nor the MLP
            raise ValueError(f"MLP: a row of shape {tuple(x.shape[1:])} has {row} values; input_size is "
                             f"{self.input_size}")  # fmt: skip
        return self.model(x)  # (B, output_size)
