"""Upsampling block of the bilinear decoder."""

from __future__ import annotations

from torch import nn


class _UpsampleBlock(nn.Sequential):
    """Doubles the spatial size: bilinear 2x upsample, 3x3 convolution, BatchNorm, ReLU.

    Bilinear upsampling followed by a convolution avoids the checkerboard artefacts of transposed convolutions.
    (B, in_channels, H, W) -> (B, out_channels, 2H, 2W).

    Args:
        in_channels: Channels of the input feature map.
        out_channels: Channels of the output feature map.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),  # BN follows: no bias
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
