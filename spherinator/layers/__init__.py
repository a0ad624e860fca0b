"""Plain ``nn.Module`` building blocks: consecutive convolution stacks and upsampling blocks."""

from spherinator.layers.conv import (
    ConsecutiveConv1DLayer,
    ConsecutiveConv2DLayer,
    ConsecutiveConvTranspose1DLayer,
    ConsecutiveConvTranspose2DLayer,
)
from spherinator.layers.upsample import _UpsampleBlock

__all__ = [
    "ConsecutiveConv1DLayer",
    "ConsecutiveConv2DLayer",
    "ConsecutiveConvTranspose1DLayer",
    "ConsecutiveConvTranspose2DLayer",
    "_UpsampleBlock",
]
