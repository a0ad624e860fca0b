"""Turn decoder outputs into pictures: images as they are, 1-D spectra as line plots; then into HiPS tiles.

A sample of shape (C, H, W) is an image (C = 1 grey, C = 3 RGB, other C: the mean over channels, grey); a sample
of shape (L,) or (C, L) is a spectrum, drawn as one line per channel. Values are mapped to pixels through one
value range for the whole atlas (so brightness compares across the sphere): [0, 1] when the decoder's outputs lie
there (uint8 data, which spherinator divides by 255), else their 0.5 and 99.5 percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from spherinator.atlas import AtlasError
from spherinator.atlas.sky import tile_grid

# Plot colours of spectrum channels (RGB in [0, 1]), on a near-black background; not the catalog's gold.
LINE_COLOURS = np.array([[0.35, 0.8, 1.0], [1.0, 0.42, 0.6], [0.55, 1.0, 0.5], [0.8, 0.6, 1.0]], dtype=np.float32)
PLOT_BACKGROUND = np.array([0.02, 0.03, 0.06], dtype=np.float32)
PLOT_FRAME = np.array([0.22, 0.25, 0.32], dtype=np.float32)
MAX_TILE_WIDTH = 1024  # 3 MiB of RGB per tile; HiPS tools use 64..512 (16384 would be 768 MiB, 2 GiB as floats)


def data_kind(shape: tuple[int, ...]) -> str:
    """``"image"`` for (C, H, W) samples, ``"spectrum"`` for (L,) and (C, L); else an AtlasError."""
    if len(shape) == 3:
        return "image"
    if len(shape) in (1, 2):
        return "spectrum"
    raise AtlasError(
        f"the atlas draws (C, H, W) images and (L,) or (C, L) spectra; this model's samples have shape {list(shape)}"
    )


def value_range(samples: np.ndarray, kind: str) -> tuple[float, float]:
    """The values that map to black and white (images) or to the bottom and top of a plot (spectra)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return 0.0, 1.0
    if kind == "image" and finite.min() >= -0.02 and finite.max() <= 1.02:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    if kind == "spectrum":
        margin = 0.05 * (hi - lo)
        lo, hi = lo - margin, hi + margin
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def _power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclass
class TileRenderer:
    """Draws decoded samples of ``shape`` as HiPS tiles of ``width`` x ``width`` pixels (RGB uint8).

    Attributes:
        shape: Sample shape of the decoder's output, e.g. (3, 128, 128) or (1, 256).
        low: Value drawn black (images) or at a plot's bottom.
        high: Value drawn white (images) or at a plot's top.
        width: Tile width in pixels (a power of two); None: the image size rounded up to a power of two in
            [64, 512], 256 for spectra.
        fit: ``"contain"``: the whole picture inside its cell (the cell's corners stay black); ``"fill"``: the
            picture covers the cell (its own corners are cut off). None: contain.
    """

    shape: tuple[int, ...]
    low: float = 0.0
    high: float = 1.0
    width: int | None = None
    fit: str | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        self.kind = data_kind(self.shape)
        if self.width is None:
            self.width = min(max(_power_of_two(max(self.shape[1:])), 64), 512) if self.kind == "image" else 256
        if self.width < 8 or self.width > MAX_TILE_WIDTH or self.width & (self.width - 1):
            raise AtlasError(
                f"--tile-width {self.width} must be a power of two in 8..{MAX_TILE_WIDTH} (HiPS tiles are)"
            )
        # a spectrum is drawn on a plot twice as wide as high, inside the cell; an image covers the cell
        self.aspect = 2.0 if self.kind == "spectrum" else self.shape[2] / self.shape[1]
        self.fit = self.fit or "contain"
        if self.fit not in ("fill", "contain"):
            raise AtlasError(f"--tile-fit {self.fit!r}: give fill or contain")

    def pictures(self, decoded: np.ndarray, size: int | None = None) -> torch.Tensor:
        """(B, 3, h, w) float pictures in [0, 1] of decoded samples (B, *shape); ``size`` caps the longer side."""
        size = size or self.width
        x = torch.as_tensor(np.asarray(decoded, dtype=np.float32))
        scaled = ((x - self.low) / (self.high - self.low)).clamp(0, 1)
        if self.kind == "spectrum":
            return torch.from_numpy(line_plots(scaled.reshape(len(x), -1, self.shape[-1]).numpy(), size))
        if scaled.shape[1] == 3:
            rgb = scaled
        elif scaled.shape[1] == 1:
            rgb = scaled.expand(-1, 3, -1, -1)
        else:
            rgb = scaled.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        h, w = rgb.shape[2:]
        if max(h, w) > size:  # shrink with antialiasing first; grid_sample alone would alias
            scale = size / max(h, w)
            rgb = F.interpolate(rgb, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                                antialias=True, align_corners=False)  # fmt: skip
        return rgb.contiguous()

    def tiles(self, order: int, pixels: np.ndarray, decoded: np.ndarray) -> np.ndarray:
        """(B, width, width, 3) uint8 tiles of the cells ``pixels`` at ``order`` showing ``decoded`` (B, *shape)."""
        grid = torch.from_numpy(tile_grid(order, pixels, self.width, aspect=self.aspect, fit=self.fit))
        pictures = self.pictures(decoded)
        drawn = F.grid_sample(pictures, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return to_uint8(drawn)

    def thumbnails(self, decoded: np.ndarray, size: int = 96) -> np.ndarray:
        """(B, h, w, 3) uint8 pictures of samples, not projected (for the page's source panel)."""
        return to_uint8(self.pictures(decoded, size))


def to_uint8(pictures: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8."""
    return (pictures.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def line_plots(spectra: np.ndarray, width: int) -> np.ndarray:
    """Draw (B, C, L) values in [0, 1] as (B, 3, width // 2, width) RGB plots in [0, 1]: one antialiased line per
    channel (0 at the bottom, 1 at the top) in a thin frame on a dark background."""
    batch, channels, length = spectra.shape
    height = max(width // 2, 8)
    pad = max(height // 16, 1)
    # the spectrum at each plot column, linearly interpolated
    at = np.linspace(0.0, length - 1.0, width)
    left = np.floor(at).astype(int)
    right = np.minimum(left + 1, length - 1)
    frac = (at - left).astype(np.float32)
    values = spectra[..., left] * (1 - frac) + spectra[..., right] * frac  # (B, C, W)
    y = (1.0 - values) * (height - 1 - 2 * pad) + pad  # row of the line in each column
    # each column draws the vertical span from its value to its right neighbour's, 1 px wide at least
    nxt = np.concatenate([y[..., 1:], y[..., -1:]], axis=-1)
    top, bottom = np.minimum(y, nxt) - 0.5, np.maximum(y, nxt) + 0.5
    rows = np.arange(height, dtype=np.float32)[:, None]  # (H, 1)
    distance = np.maximum(np.maximum(top[..., None, :] - rows, rows - bottom[..., None, :]), 0.0)  # (B, C, H, W)
    alpha = np.clip(1.5 - distance, 0.0, 1.0)  # ~2 px line with soft edges
    picture = np.broadcast_to(PLOT_BACKGROUND[:, None, None], (batch, 3, height, width)).copy()
    frame = np.zeros((height, width), dtype=bool)
    frame[[pad - 1, height - pad], :] = True
    frame[:, [0, width - 1]] = True
    picture[:, :, frame] = PLOT_FRAME[:, None]
    for c in range(channels):
        colour = LINE_COLOURS[c % len(LINE_COLOURS)][None, :, None, None]
        a = alpha[:, c][:, None]
        picture = picture * (1 - a) + colour * a
    return picture.astype(np.float32)
