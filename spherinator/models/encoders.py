"""Convolutional encoders for 1-D (spectra) and 2-D (images) inputs; one shared implementation."""

from __future__ import annotations

import torch
from torch import nn

from spherinator.models._shapes import as_shape, dry_forward
from spherinator.models.transfer import WeightsProvider, apply_transfer


class _ConvolutionalEncoder(nn.Module):
    """Convolution stack, flatten, then a lazy linear projection to ``output_dim``.

    When ``input_dim`` is known the lazy layers are materialised at construction (dry forward in eval mode);
    when it is None they materialise at the first forward (the ``spherinator`` CLI fills it from the data).
    """

    _spatial_dims: int  # 1 for (B, C, L), 2 for (B, C, H, W)

    # The signature jsonargparse reads for both subclasses (they differ only in _spatial_dims and their docstring).
    def __init__(
        self,
        input_dim: list[int] | None = None,
        output_dim: int = 64,
        cnn_layers: list[nn.Module] | None = None,
        weights: str | WeightsProvider | None = None,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if int(output_dim) <= 0:
            raise ValueError(f"{name}: output_dim must be a positive integer, got {output_dim!r}")
        self.input_dim = as_shape(input_dim, self._spatial_dims + 1, "input_dim", name)
        self.output_dim = int(output_dim)
        self.cnn = nn.Sequential(*(cnn_layers or []))
        self.flatten = nn.Flatten()
        self.fc = nn.LazyLinear(self.output_dim)
        if self.input_dim is not None:
            x = torch.zeros(1, *self.input_dim)
            try:
                dry_forward(self, self.forward, x)
            except RuntimeError as err:
                raise ValueError(
                    f"{name}: cnn_layers cannot process input_dim {list(self.input_dim)} ({err}); use fewer layers, "
                    "smaller kernel_size/stride, padding, or a larger input"
                ) from err
        apply_transfer(self, weights, freeze)  # lazy layers without input_dim take their shapes from the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.cnn(x)))  # (B, output_dim)


def _encoder_doc(dims: str, what: str, shape: str, layer: str) -> str:
    return f"""{dims} CNN encoder ({what}): ``{layer}`` blocks, flatten, lazy linear to output_dim.

    Args:
        input_dim: Sample shape {shape}; None to infer it from the first batch (lazy layers stay unmaterialised
            until then, which DDP does not allow).
        output_dim: Size of the encoder output (the VAE's ``encoder_out_dim``).
        cnn_layers: Convolution blocks applied in order (e.g. ``{layer}``).
        weights: Start from an earlier run: a checkpoint/state-dict path or a ``WeightsProvider``.
        freeze: Fix every parameter of the encoder.
    """


class ConvolutionalEncoder1D(_ConvolutionalEncoder):
    __doc__ = _encoder_doc("1-D", "e.g. spectra", "[C, L]", "ConsecutiveConv1DLayer")
    _spatial_dims = 1


class ConvolutionalEncoder2D(_ConvolutionalEncoder):
    __doc__ = _encoder_doc("2-D", "images", "[C, H, W]", "ConsecutiveConv2DLayer")
    _spatial_dims = 2
