"""Consecutive convolution stacks: one implementation for 1-D/2-D, plain and transposed convolutions."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

from torch import nn

# A layer class, or what jsonargparse makes of upstream's ``{class_path: torch.nn.ReLU}`` (a callable building one):
# both are called as ``activation()`` / ``norm(channels)``.
LayerFactory = type[nn.Module] | Callable[..., nn.Module]


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
        conv_kwargs: Further arguments of every convolution (``output_padding``, ``dilation``, ``bias``).
    """

    def __init__(
        self,
        conv: type[nn.Module],
        kernel_size: int,
        stride: int,
        padding: int,
        out_channels: list[int],
        activation: LayerFactory | None,
        norm: LayerFactory | None,
        pooling: nn.Module | None,
        conv_kwargs: dict[str, Any] | None = None,
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
        _check_conv_kwargs(name, conv_kwargs or {})
        layers: list[nn.Module] = []
        for channels in out_channels:
            layers.append(
                conv(channels, kernel_size=kernel_size, stride=stride, padding=padding, **(conv_kwargs or {}))
            )
            if norm is not None:
                layers.append(norm(channels))
            if activation is not None:
                layers.append(activation())
            if pooling is not None:
                layers.append(pooling)  # parameter-free, so one instance can be reused
        super().__init__(*layers)
        self.out_channels = list(out_channels)
        # What get_model needs to build an untrained twin through the subclass's own signature.
        self._build_kwargs: dict[str, Any] = {
            "kernel_size": kernel_size,
            "stride": stride,
            "padding": padding,
            "out_channels": list(out_channels),
            "activation": activation,
            "norm": norm,
            "pooling": pooling,
            **(conv_kwargs or {}),
        }

    def get_model(self) -> nn.Module:
        """A new, untrained stack built from the same arguments (upstream Spherinator's layer objects were
        factories, and its encoders called ``get_model()`` on each); this stack is already the module itself.

        Returns:
            A fresh instance of this class, sharing no parameters with ``self``.
        """
        return type(self)(**self._build_kwargs)


def _check_conv_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    for arg, least in (("output_padding", 0), ("dilation", 1)):
        if arg in kwargs and (not _is_int(kwargs[arg]) or kwargs[arg] < least):
            raise ValueError(
                f"{name}: {arg} must be an integer >= {least} (one value for every convolution of the stack), "
                f"got {kwargs[arg]!r}"
            )
    if "bias" in kwargs and not isinstance(kwargs["bias"], bool):
        raise ValueError(f"{name}: bias must be true or false, got {kwargs['bias']!r}")


def _stack_doc(conv: str, shape: str, transposed: bool = False) -> str:
    extra = (
        """
        output_padding: Extra size added to one side of each output (resolves the stride's ambiguity).
        dilation: Spacing between kernel elements.
        bias: Whether each convolution has a bias."""
        if transposed
        else ""
    )
    return f"""Consecutive ``{conv}`` layers with optional norm, activation and pooling; input {shape}.

    Args:
        kernel_size: Kernel size for all layers in this block.
        stride: Stride for all layers in this block.
        padding: Padding for all layers in this block.
        out_channels: Output channel counts; one layer per entry.
        activation: Activation class (``None`` for none).
        norm: Normalisation class, called with the channel count (``None`` for none).
        pooling: Optional pooling module appended after each layer.{extra}
    """


# Each stack spells out its signature: jsonargparse reads each class's own defaults (BatchNorm1d or BatchNorm2d), and
# the transposed stacks take upstream's output_padding/dilation/bias besides (appended, so positions stay).
class ConsecutiveConv1DLayer(_ConsecutiveConvLayer):
    __doc__ = _stack_doc("LazyConv1d", "(B, C, L)")
    _conv: type[nn.Module] = nn.LazyConv1d

    def __init__(
        self,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        out_channels: list[int] | None = None,
        activation: LayerFactory | None = nn.ReLU,
        norm: LayerFactory | None = nn.BatchNorm1d,
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
        activation: LayerFactory | None = nn.ReLU,
        norm: LayerFactory | None = nn.BatchNorm2d,
        pooling: nn.Module | None = None,
    ) -> None:
        super().__init__(self._conv, kernel_size, stride, padding, out_channels or [], activation, norm, pooling)


class ConsecutiveConvTranspose1DLayer(_ConsecutiveConvLayer):
    __doc__ = _stack_doc("LazyConvTranspose1d", "(B, C, L)", transposed=True)
    _conv: type[nn.Module] = nn.LazyConvTranspose1d

    def __init__(
        self,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        out_channels: list[int] | None = None,
        activation: LayerFactory | None = nn.ReLU,
        norm: LayerFactory | None = nn.BatchNorm1d,
        pooling: nn.Module | None = None,
        output_padding: int = 0,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        conv_kwargs = {"output_padding": output_padding, "dilation": dilation, "bias": bias}
        super().__init__(
            self._conv, kernel_size, stride, padding, out_channels or [], activation, norm, pooling, conv_kwargs
        )


class ConsecutiveConvTranspose2DLayer(_ConsecutiveConvLayer):
    __doc__ = _stack_doc("LazyConvTranspose2d", "(B, C, H, W)", transposed=True)
    _conv: type[nn.Module] = nn.LazyConvTranspose2d

    def __init__(
        self,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        out_channels: list[int] | None = None,
        activation: LayerFactory | None = nn.ReLU,
        norm: LayerFactory | None = nn.BatchNorm2d,
        pooling: nn.Module | None = None,
        output_padding: int = 0,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        conv_kwargs = {"output_padding": output_padding, "dilation": dilation, "bias": bias}
        super().__init__(
            self._conv, kernel_size, stride, padding, out_channels or [], activation, norm, pooling, conv_kwargs
        )
