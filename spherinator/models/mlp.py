"""A multi-layer perceptron (upstream Spherinator's ``MLP``, same arguments): flatten, then Linear layers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from spherinator.errors import ConfigError


class MLP(nn.Module):
    """``Flatten -> [Linear -> activation] * len(hidden_sizes) -> Linear``.

    Args:
        input_size: Features of a flattened input row.
        hidden_sizes: Widths of the hidden layers ([] for a single Linear).
        output_size: Features of the output.
        activation: The class (or factory) of the activation after each hidden layer (default ReLU).
    """

    def __init__(
        self,
        input_size: int,
        hidden_sizes: list[int],
        output_size: int,
        activation: Callable[..., nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        sizes = [input_size, *hidden_sizes, output_size]
        bad = [s for s in sizes if not isinstance(s, int) or s < 1]
        if bad:
            raise ConfigError(f"MLP: sizes must be positive integers, got input_size={input_size}, hidden_sizes="
                              f"{hidden_sizes}, output_size={output_size}")  # fmt: skip
        self.input_size, self.output_size = input_size, output_size
        self.example_input_array = torch.randn(1, input_size)
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(sizes[:-2], sizes[1:-1], strict=True):
            layers += [nn.Linear(width_in, width_out), activation()]
        layers.append(nn.Linear(sizes[-2], output_size))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row = math.prod(x.shape[1:])
        if row != self.input_size:
            raise ValueError(f"MLP: a row of shape {tuple(x.shape[1:])} has {row} values; input_size is "
                             f"{self.input_size}")  # fmt: skip
        return self.model(x)
