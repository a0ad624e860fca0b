"""Decoders: transposed-convolution decoders (1-D/2-D, one implementation) and the bilinear upsampling decoder.

Decoders share a small protocol the models use so that each size is written once in a config:

- ``input_dim`` (latent size) may be None; the model then calls ``set_input_dim(z_dim)``.
- ``output_dim`` (sample shape) may be None; the model then calls ``set_output_dim(encoder.input_dim)``.
- Both setters raise a ValueError naming both values when an explicit value disagrees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from spherinator.errors import ConfigError
from spherinator.layers import _UpsampleBlock
from spherinator.models._shapes import as_shape, dry_forward, param_device_dtype
from spherinator.models.transfer import WeightsProvider, apply_transfer


class _LatentInputMixin:
    """``input_dim`` handling for decoders whose first layer is ``self.fc`` (Linear, or LazyLinear when unknown)."""

    input_dim: int | None
    fc: nn.Module

    def set_input_dim(self, input_dim: int) -> None:
        """Fix the latent size: materialise a lazy first layer, or check an explicit ``input_dim``."""
        if self.input_dim is not None:
            if self.input_dim != int(input_dim):
                raise ValueError(
                    f"{type(self).__name__}: input_dim {self.input_dim} disagrees with the latent size {input_dim} "
                    "(the model's z_dim / the encoder's output_dim); remove the decoder's input_dim to let it follow"
                )
            return
        self.input_dim = int(input_dim)
        device, dtype = param_device_dtype(self)  # type: ignore[arg-type]
        dry_forward(self.fc, self.fc, torch.zeros(1, self.input_dim, device=device, dtype=dtype))


def _seed_block(seed_norm: bool, norm: type[nn.Module], channels: int) -> nn.Sequential | None:
    """Upstream Spherinator's BatchNorm + ReLU after the seed projection, when ``seed_norm`` asks for it."""
    return nn.Sequential(norm(channels), nn.ReLU()) if seed_norm else None


def _latent_linear(input_dim: int | None, features: int, owner: str) -> nn.Module:
    if input_dim is None:
        return nn.LazyLinear(features)
    if int(input_dim) <= 0:
        raise ValueError(f"{owner}: input_dim must be a positive integer or null, got {input_dim!r}")
    return nn.Linear(int(input_dim), features)


class _ConvolutionalDecoder(_LatentInputMixin, nn.Module):
    """Linear projection of the latent to ``cnn_input_dim``, then transposed-convolution blocks.

    The convolution stack is materialised and its output shape computed at construction (it only depends on
    ``cnn_input_dim``), so an ``output_dim`` it cannot reach fails at once.
    """

    _spatial_dims: int

    # The signature jsonargparse reads for both subclasses (they differ only in _spatial_dims and their docstring).
    def __init__(
        self,
        input_dim: int | None = None,
        output_dim: list[int] | None = None,
        cnn_input_dim: list[int] | None = None,
        cnn_layers: list[nn.Module] | None = None,
        weights: str | WeightsProvider | None = None,
        freeze: bool = False,
        seed_norm: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_dim = int(input_dim) if input_dim is not None else None
        cnn_shape = as_shape(cnn_input_dim, self._spatial_dims + 1, "cnn_input_dim", name)
        if cnn_shape is None:
            raise ValueError(f"{name}: cnn_input_dim is required, e.g. [64, 28, 28]")
        self.cnn_input_dim = cnn_shape
        self.fc = _latent_linear(input_dim, math.prod(cnn_shape), name)
        self.unflatten = nn.Unflatten(1, cnn_shape)
        norm = nn.BatchNorm1d if self._spatial_dims == 1 else nn.BatchNorm2d
        self.seed_block = _seed_block(seed_norm, norm, cnn_shape[0])
        self.cnn = nn.Sequential(*(cnn_layers or []))
        try:
            out = dry_forward(self.cnn, self.cnn, torch.zeros(1, *cnn_shape))
        except RuntimeError as err:
            raise ValueError(
                f"{name}: cnn_layers cannot process cnn_input_dim {list(cnn_shape)} ({err}); check the layers' "
                "kernel_size/stride/padding"
            ) from err
        self.reachable_dim = tuple(out.shape[1:])  # the only output shape these layers can produce
        self.output_dim: tuple[int, ...] | None = None
        if output_dim is not None:
            self.set_output_dim(output_dim)
        apply_transfer(self, weights, freeze)

    def set_output_dim(self, output_dim: Sequence[int]) -> None:
        """Check that the layers produce ``output_dim``; raises naming both shapes when they do not."""
        shape = as_shape(output_dim, self._spatial_dims + 1, "output_dim", type(self).__name__)
        if shape != self.reachable_dim:
            raise ValueError(
                f"{type(self).__name__}: cnn_layers turn cnn_input_dim {list(self.cnn_input_dim)} into "
                f"{list(self.reachable_dim)}, not output_dim {list(shape)}; change cnn_input_dim or the layers' "
                "kernel_size/stride/padding/out_channels"
            )
        self.output_dim = shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        seed = self.unflatten(self.fc(z))
        if self.seed_block is not None:
            seed = self.seed_block(seed)
        return self.cnn(seed)  # (B, *reachable_dim)


def _decoder_doc(dims: str, shape: str, layer: str) -> str:
    return f"""{dims} transposed-convolution decoder: latent -> Linear -> reshape to cnn_input_dim {shape} -> conv
    blocks.

    Args:
        input_dim: Latent size; None follows the model's z_dim.
        output_dim: Target shape {shape}; None takes the encoder's input_dim. Checked at construction.
        cnn_input_dim: Shape {shape} the linear projection is reshaped to.
        cnn_layers: Transposed-convolution blocks (e.g. ``{layer}``).
        weights: Start from an earlier run: a checkpoint/state-dict path or a ``WeightsProvider``.
        freeze: Fix every parameter of the decoder.
        seed_norm: BatchNorm + ReLU after the reshaped projection, as upstream Spherinator's decoders have
            (its converted checkpoints set it).
    """


class ConvolutionalDecoder1D(_ConvolutionalDecoder):
    __doc__ = _decoder_doc("1-D", "[C, L]", "ConsecutiveConvTranspose1DLayer")
    _spatial_dims = 1


class ConvolutionalDecoder2D(_ConvolutionalDecoder):
    __doc__ = _decoder_doc("2-D", "[C, H, W]", "ConsecutiveConvTranspose2DLayer")
    _spatial_dims = 2


class UpsamplingDecoder2D(_LatentInputMixin, nn.Module):
    """Bilinear-upsampling decoder: Linear -> (base_channels, seed, seed) -> n x ``_UpsampleBlock`` -> 1x1 conv
    -> sigmoid.

    The number of 2x steps n is inferred from ``output_dim[1] = seed_size * 2**n``; channels halve at each step
    (never below ``min_channels`` when given). Output values lie in (0, 1).

    Args:
        input_dim: Latent size; None follows the model's z_dim.
        output_dim: Target image shape [C, H, W] with H == W == seed_size * 2**n; None takes the encoder's
            input_dim.
        base_channels: Channels at the spatial seed; halved at each upsampling step.
        seed_size: Width/height of the seed feature map.
        weights: Start from an earlier run: a checkpoint/state-dict path or a ``WeightsProvider`` (needs
            output_dim, which decides the layers).
        freeze: Fix every parameter of the decoder.
        seed_norm: BatchNorm + ReLU after the reshaped projection, as upstream Spherinator has.
        min_channels: Floor of the halved channel counts (upstream Spherinator's is 32); None for none.
    """

    def __init__(
        self,
        input_dim: int | None = None,
        output_dim: list[int] | None = None,
        base_channels: int = 512,
        seed_size: int = 7,
        weights: str | WeightsProvider | None = None,
        freeze: bool = False,
        seed_norm: bool = False,
        min_channels: int | None = None,
    ) -> None:
        super().__init__()
        if min_channels is not None and int(min_channels) <= 0:
            raise ValueError(
                f"UpsamplingDecoder2D: min_channels must be a positive integer or null, got {min_channels}"
            )
        if base_channels <= 0 or seed_size <= 0:
            raise ValueError(
                f"UpsamplingDecoder2D: base_channels and seed_size must be positive, got {base_channels}, {seed_size}"
            )
        self.input_dim = int(input_dim) if input_dim is not None else None
        self.base_channels = int(base_channels)
        self.seed_size = int(seed_size)
        self.fc = _latent_linear(input_dim, self.base_channels * self.seed_size**2, "UpsamplingDecoder2D")
        self.unflatten = nn.Unflatten(1, (self.base_channels, self.seed_size, self.seed_size))
        self.seed_block = _seed_block(seed_norm, nn.BatchNorm2d, self.base_channels)
        self.min_channels = int(min_channels) if min_channels is not None else None
        self.output_dim: tuple[int, ...] | None = None
        self.blocks: nn.Sequential | None = None
        self.head: nn.Sequential | None = None
        if output_dim is not None:
            self.set_output_dim(output_dim)
        elif weights is not None or freeze:
            raise ConfigError(
                "UpsamplingDecoder2D: weights/freeze need output_dim, which decides its layers; set output_dim "
                "(e.g. [3, 128, 128])"
            )
        apply_transfer(self, weights, freeze)

    def set_output_dim(self, output_dim: Sequence[int]) -> None:
        """Infer the number of upsampling steps and build them; unreachable sizes raise a ValueError."""
        shape = as_shape(output_dim, 3, "output_dim", "UpsamplingDecoder2D")
        assert shape is not None
        if self.output_dim is not None:
            if shape != self.output_dim:
                raise ValueError(
                    f"UpsamplingDecoder2D: output_dim {list(self.output_dim)} disagrees with {list(shape)}; use one"
                )
            return
        channels, height, width = shape
        steps = round(math.log2(height / self.seed_size)) if height >= self.seed_size else -1
        if height != width or steps < 0 or self.seed_size * 2**steps != height:
            reachable = ", ".join(str(self.seed_size * 2**k) for k in range(6))
            raise ValueError(
                f"UpsamplingDecoder2D cannot reach output_dim {list(shape)} from seed_size {self.seed_size}: it makes "
                f"square images of seed_size * 2**n pixels ({reachable}, ...); change seed_size or resize the data"
            )
        if self.base_channels >> steps < 1 and self.min_channels is None:
            raise ValueError(
                f"UpsamplingDecoder2D: base_channels {self.base_channels} halved {steps} times leaves no channel; "
                f"use base_channels >= {2**steps} or set min_channels"
            )
        widths = [self.base_channels]
        for _ in range(steps):
            widths.append(max(widths[-1] // 2, self.min_channels or 1))
        blocks = [_UpsampleBlock(widths[k], widths[k + 1]) for k in range(steps)]
        device, dtype = param_device_dtype(self)
        self.blocks = nn.Sequential(*blocks).to(device=device, dtype=dtype)
        self.head = nn.Sequential(nn.Conv2d(widths[-1], channels, kernel_size=1), nn.Sigmoid()).to(
            device=device, dtype=dtype
        )
        self.output_dim = shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.blocks is None or self.head is None:
            raise RuntimeError(
                "UpsamplingDecoder2D: output_dim is unknown; set output_dim or the encoder's input_dim (spherinator "
                "fit fills it from the data)"
            )
        seed = self.unflatten(self.fc(z))
        if self.seed_block is not None:
            seed = self.seed_block(seed)
        return self.head(self.blocks(seed))  # (B, C, H, W)
