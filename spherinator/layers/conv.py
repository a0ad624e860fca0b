"""Consecutive convolution stacks: one implementation for 1-D/2-D, plain and transposed convolutions."""

from __future__ import annotations

import numbers

from torch import nn


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class _ConsecutiveConvLayer(nn.Sequential):
    """A stack of lazy convolutions, each followed by an optional norm, activation and pooling.

    Subclasses only pick the lazy convolution class and the default norm; everything else is shared.

    Args:
        conv: Lazy convolution class (e.g. ``nn.LazyConv2d``); its input channels are inferred at first forward.
        kernel_size: Kernel size of every convolution in the stack.
        stride: Stride of every convolution in the stack.
        padding: Padding of every convolution in the stack.
        out_channels: Output channels, one convolution per entry.
        activation: Activation class instantiated after each convolution; ``None`` for none.
        norm: Normalisation class called as ``norm(channels)`` after each convolution; ``None`` for none.
        pooling: Module appended after each convolution block (e.g. ``nn.MaxPool2d(2)``); ``None`` for none.
    """

    def __init__(
        self,
        conv: type[nn.Module],
        kernel_size: int,
        stride: int,
        padding: int,
        out_channels: list[int],
        activation: type[nn.Module] | None,
        norm: type[nn.Module] | None,
        pooling: nn.Module | None,
    ) -> None:
        name = type(self).__name__
        if isinstance(out_channels, int) or len(out_channels) == 0:
            raise ValueError(
                f"{name}: out_channels must be a non-empty list with one entry per convolution, got "
                f"{out_channels!r}; write e.g. out_channels: [16, 32]"
            )
        bad = [c for c in out_channels if not _is_int(c) or c < 1]
        if bad:
            raise ValueError(
                f"{name}: out_channels {list(out_channels)} has {bad[0]!r}; every entry is the channel count of one "
                "convolution, a positive integer"
            )
        for arg, value, least in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
            if not _is_int(value) or value < least:
                raise ValueError(
                    f"{name}: {arg} must be an integer >= {least} (one value for every convolution of the stack), "
                    f"got {value!r}"
                )
        layers: list[nn.Module] = []
        for channels in out_channels:
            layers.append(conv(channels, kernel_size=kernel_size, stride=stride, padding=padding))
            if norm is not None:
                layers.append(norm(channels))
            if activation is not None:
                layers.append(activation())
            if pooling is not None:
                layers.append(pooling)  # parameter-free, so one instance can be reused
        super().__init__(*layers)
        self.out_channels = list(out_channels)


def _stack_doc(conv: str, shape: str) -> str:
    return f"""Consecutive ``{conv}`` layers with optional norm, activation and pooling; input {shape}.

    Args:
        kernel_size: Kernel size for all layers in this block.
        stride: Stride for all layers in this block.
        padding: Padding for all layers in this block.
        out_channels: Output channel counts; one layer per entry.
        activation: Activation class (``None`` for none).
        norm: Normalisation class, called with the channel count (``None`` for none).
        pooling: Optional pooling module appended after each layer.
    """


# The 1-D and 2-D stacks spell out their signatures: jsonargparse reads each class's own defaults (BatchNorm1d or
# BatchNorm2d). A transposed stack differs from its plain one only in the convolution, so it inherits the signature.
class ConsecutiveConv1DLayer(_ConsecutiveConvLayer):
    __doc__ = _stack_doc("LazyConv1d", "(B, C, L)")
    _conv: type[nn.Module] = nn.LazyConv1d

    def __init__(
        self,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        out_channels: list[int] | None = None,
        activation: type[nn.Module] | None = nn.ReLU,
        norm: type[nn.Module] | None = nn.BatchNorm1d,
        pooling: nn.Module | None = None,
    ) -> None:
        super().__init__(self._conv, kernel_size, stride, padding, out_channels or [], activation, norm, pooling)


class ConsecutiveConv2DLayer(_ConsecutiveConvLayer):
    __doc__ = _stack_doc("LazyConv2d", "(B, C, H, W)")
    _conv: type[nn.Module] = nn.LazyConv2d

    def __init__(
        self,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        out_channels: list[int] | None = None,
        activation: type[nn.Module] | None = nn.ReLU,
        norm: type[nn.Module] | None = nn.BatchNorm2d,
        pooling: nn.Module | None = None,
    ) -> None:
        super().__init__(self._conv, kernel_size, stride, padding, out_channels or [], activation, norm, pooling)


class ConsecutiveConvTranspose1DLayer(ConsecutiveConv1DLayer):
    __doc__ = _stack_doc("LazyConvTranspose1d", "(B, C, L)")
    _conv = nn.LazyConvTranspose1d


class ConsecutiveConvTranspose2DLayer(ConsecutiveConv2DLayer):
    __doc__ = _stack_doc("LazyConvTranspose2d", "(B, C, H, W)")
    _conv = nn.LazyConvTranspose2d
