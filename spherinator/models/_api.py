"""Model outputs that refuse to be unpacked: upstream Spherinator's tuples would otherwise split the batch."""

from __future__ import annotations

import copy

import torch


class _NoUnpacking(torch.Tensor):
    """A tensor whose iteration raises: ``a, b = t`` on a (2, d) tensor would give its rows without an error.

    Every operation on it (``.float()``, ``.cpu()`` included, even where they return the very tensor) gives a plain
    tensor, so only the object a model method returned refuses iteration; the values are those of the tensor.
    """

    _message = ""

    # torch documents this hook for subclasses that should not propagate through operations (as nn.Parameter).
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = torch._C._disabled_torch_function_impl(func, types, args, kwargs or {})
        return out.view_as(out) if isinstance(out, cls) else out  # a no-op .float()/.cpu() returns a plain alias

    def __iter__(self):
        raise TypeError(self._message)

    # Copies and saved files hold a plain tensor: torch.load (weights-only by default) refuses unknown subclasses,
    # and torch's default deepcopy of a subclass needs a new_empty of the subclass.
    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        return copy.deepcopy(self.as_subclass(torch.Tensor), memo)

    def __reduce_ex__(self, protocol: int) -> tuple:  # type: ignore[override]
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def no_unpacking(tensor: torch.Tensor, message: str) -> torch.Tensor:
    """``tensor``, whose iteration (unpacking) raises a TypeError with ``message``; unchanged while tracing or
    compiling (ONNX export, torch.compile), where only plain tensors belong."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return tensor
    marked = tensor.as_subclass(_NoUnpacking)
    marked._message = message
    return marked
