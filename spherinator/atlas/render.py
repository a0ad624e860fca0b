"""Turn decoder outputs into pictures: images as they are, 1-D spectra as line plots; then into HiPS tiles.

A sample of shape (C, H, W) is an image (C = 1 grey, C = 3 RGB, other C: the mean over channels, grey); a sample
of shape (L,) or (C, L) is a spectrum, drawn as one line per channel. Values are mapped to pixels through one
value range for the whole atlas (so brightness compares across the sphere): [0, 1] when the decoder's outputs lie
there (uint8 data, which spherinator divides by 255), else their 0.5 and 99.5 percentiles.

Drawing is numpy and PIL only (no torch): tile workers start quickly and small, and an atlas of an ONNX export need
not import torch for its tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

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


UNIT_RANGE = (-0.02, 1.02)  # images whose values all lie here are drawn as [0, 1] (black .. white)


def value_range(samples: np.ndarray, kind: str) -> tuple[float, float]:
    """The values that map to black and white (images) or to the bottom and top of a plot (spectra)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return 0.0, 1.0
    if kind == "image" and finite.min() >= UNIT_RANGE[0] and finite.max() <= UNIT_RANGE[1]:
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
        fit: ``"fill"``: the picture covers the cell (its own corners are cut off), so centred objects make a
            seamless sky; ``"contain"``: the whole picture inside its cell (the cell's corners stay background).
            None: fill for images, contain for spectra (a plot's ends would be cut off).
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
        self.fit = self.fit or ("fill" if self.kind == "image" else "contain")
        if self.fit not in ("fill", "contain"):
            raise AtlasError(f"--tile-fit {self.fit!r}: give fill or contain")

    def pictures(self, decoded: np.ndarray, size: int | None = None) -> np.ndarray:
        """(B, 3, h, w) float32 pictures in [0, 1] of decoded samples (B, *shape); ``size`` caps the longer side."""
        size = size or self.width
        x = np.asarray(decoded, dtype=np.float32)
        scaled = np.clip((x - np.float32(self.low)) / np.float32(self.high - self.low), 0, 1, dtype=np.float32)
        if self.kind == "spectrum":
            return line_plots(scaled.reshape(len(x), -1, self.shape[-1]), size)
        if scaled.shape[1] == 3:
            rgb = scaled
        elif scaled.shape[1] == 1:
            rgb = np.broadcast_to(scaled, (len(x), 3, *scaled.shape[2:]))
        else:
            rgb = np.broadcast_to(scaled.mean(axis=1, keepdims=True), (len(x), 3, *scaled.shape[2:]))
        h, w = rgb.shape[2:]
        if max(h, w) > size:  # shrink with antialiasing first; sampling alone would alias
            scale = size / max(h, w)
            rgb = shrink(rgb, max(1, round(h * scale)), max(1, round(w * scale)))
        return np.ascontiguousarray(rgb, dtype=np.float32)

    def tiles(self, order: int, pixels: np.ndarray, decoded: np.ndarray) -> np.ndarray:
        """(B, width, width, 3) uint8 tiles of the cells ``pixels`` at ``order`` showing ``decoded`` (B, *shape)."""
        grid = tile_grid(order, pixels, self.width, aspect=self.aspect, fit=self.fit)
        return to_uint8(grid_sample(self.pictures(decoded), grid))

    def thumbnails(self, decoded: np.ndarray, size: int = 96) -> np.ndarray:
        """(B, h, w, 3) uint8 pictures of samples, not projected (for the page's source panel)."""
        return to_uint8(self.pictures(decoded, size))


def shrink(pictures: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, C, H, W) float32 pictures resized to (B, C, height, width) by PIL's antialiased bilinear filter (its
    support widens with the reduction, so nothing aliases)."""
    out = np.empty((*pictures.shape[:2], height, width), dtype=np.float32)
    for b, picture in enumerate(pictures):
        for c, channel in enumerate(picture):
            image = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), mode="F")
            out[b, c] = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return out


def grid_sample(pictures: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Bilinear sampling of (B, C, H, W) ``pictures`` at (B, T, T, 2) ``grid`` positions (x, y) in [-1, 1] across
    each picture (pixel edges at +-1, as torch's ``grid_sample(align_corners=False)``); outside the picture the
    value is 0. Returns (B, C, T, T) float32."""
    batch, channels, h, w = pictures.shape
    # positions in pixel units (pixel centres at 0 .. w - 1)
    ix = ((grid[..., 0] + 1) * w - 1) / 2
    iy = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = np.floor(ix), np.floor(iy)
    fx, fy = (ix - x0).astype(np.float32), (iy - y0).astype(np.float32)
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    flat = pictures.reshape(batch, channels, h * w)
    out = np.zeros((batch, channels, *grid.shape[1:3]), dtype=np.float32)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            x, y = x0 + dx, y0 + dy
            inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            index = np.where(inside, y * w + x, 0).reshape(batch, 1, -1)
            taken = np.take_along_axis(flat, np.broadcast_to(index, (batch, channels, index.shape[-1])), axis=2)
            weight = (wx * wy * inside).reshape(batch, 1, *grid.shape[1:3])
            out += taken.reshape(out.shape) * weight
    return out


def to_uint8(pictures: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8."""
    scaled = np.clip(pictures, 0, 1) * 255 + 0.5
    return np.ascontiguousarray(scaled.astype(np.uint8).transpose(0, 2, 3, 1))


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
