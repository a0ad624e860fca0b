"""Shape helpers shared by encoders, decoders and models: argument checks and dry forwards."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def as_shape(value: Sequence[int] | None, ndim: int, name: str, owner: str) -> tuple[int, ...] | None:
    """Check that ``value`` is None or a sequence of ``ndim`` positive ints; return it as a tuple."""
    if value is None:
        return None
    if isinstance(value, int) or len(value) != ndim or any(int(v) <= 0 for v in value):
        raise ValueError(
            f"{owner}: {name} must be {ndim} positive integers ({'[C, L]' if ndim == 2 else '[C, H, W]'}), "
            f"got {value!r}"
        )
    return tuple(int(v) for v in value)


@torch.no_grad()
def dry_forward(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run ``fn(x)`` without gradients in eval mode (BatchNorm statistics untouched), then restore the mode.

    Materialises lazy layers so that DDP, checkpoint loading and ONNX export see real parameters.
    """
    was_training = module.training
    module.eval()
    try:
        return fn(x)
    finally:
        module.train(was_training)


def param_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the first materialised parameter (CPU float32 when there is none)."""
    for p in module.parameters():
        if not isinstance(p, nn.parameter.UninitializedParameter) and p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32
