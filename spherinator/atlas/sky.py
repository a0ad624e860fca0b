"""Where things are on the sphere: unit vectors <-> RA/Dec, HEALPix cells (NESTED) and the sampling grid that
draws an image upright inside a cell's tile.

Conventions (the README's "RA/Dec" paragraph): a unit vector (x, y, z) is at RA = atan2(y, x) in [0, 360) degrees
and Dec = asin(z) in [-90, 90] degrees, the ICRS-like frame ``hips_frame = equatorial`` of the HiPS; so (1, 0, 0)
is RA 0, Dec 0, (0, 1, 0) RA 90, Dec 0 and (0, 0, 1) the north pole. HEALPix indices are NESTED, nside = 2^order,
computed by astropy-healpix from (RA, Dec).
"""

from __future__ import annotations

import astropy.units as u
import numpy as np
from astropy_healpix import healpix_to_lonlat, lonlat_to_healpix


def cells(order: int) -> int:
    """Number of HEALPix cells (HiPS tiles) at ``order``: 12 * 4^order."""
    return 12 * 4**order


def unit_to_radec(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RA and Dec in degrees of (N, 3) vectors (normalised here; a zero vector gives RA 0, Dec 0)."""
    v = np.asarray(vectors, dtype=np.float64)
    norm = np.linalg.norm(v, axis=1)
    z = np.divide(v[:, 2], norm, out=np.zeros(len(v)), where=norm > 0)
    ra = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(z, -1.0, 1.0)))
    return ra, dec


def radec_to_unit(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """(N, 3) unit vectors of RA/Dec in degrees; the inverse of :func:`unit_to_radec`."""
    ra, dec = np.radians(np.asarray(ra, dtype=np.float64)), np.radians(np.asarray(dec, dtype=np.float64))
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def healpix_index(ra: np.ndarray, dec: np.ndarray, order: int) -> np.ndarray:
    """NESTED HEALPix index at ``order`` of the cells holding RA/Dec (degrees)."""
    return np.asarray(lonlat_to_healpix(np.asarray(ra) * u.deg, np.asarray(dec) * u.deg, 2**order, order="nested"))


def cell_centres(order: int, pixels: np.ndarray) -> np.ndarray:
    """(N, 3) unit vectors of the centres of the NESTED cells ``pixels`` at ``order``."""
    lon, lat = healpix_to_lonlat(np.asarray(pixels), 2**order, order="nested")
    return radec_to_unit(lon.to_value(u.deg), lat.to_value(u.deg))


def tile_pixel_index(width: int) -> np.ndarray:
    """(width, width) NESTED sub-index of each pixel of a HiPS tile, as it is stored in a PNG/JPEG (row 0 on top).

    Tile pixel [row, col] is the cell ``npix * width^2 + index[row, col]`` at order ``order + log2(width)``: the
    row's bits are the even bits of the sub-index (HEALPix's x within the cell), the column's the odd bits (y).
    """
    bits = int(width).bit_length() - 1
    rows, cols = np.mgrid[0:width, 0:width]
    index = np.zeros((width, width), dtype=np.int64)
    for b in range(bits):
        index |= ((rows >> b) & 1) << (2 * b)
        index |= ((cols >> b) & 1) << (2 * b + 1)
    return index


def _local_frame(centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """East and north unit vectors (N, 3) of the tangent planes at ``centres`` (N, 3); at a pole, east is +y."""
    east = np.stack([-centres[:, 1], centres[:, 0], np.zeros(len(centres))], axis=1)
    norm = np.linalg.norm(east, axis=1, keepdims=True)
    east = np.where(norm > 1e-12, east / np.maximum(norm, 1e-12), np.array([0.0, 1.0, 0.0]))
    north = np.cross(centres, east)
    return east, north


def tile_grid(order: int, pixels: np.ndarray, width: int, aspect: float = 1.0, fit: str = "fill",
              coarse: int = 16) -> np.ndarray:  # fmt: skip
    """Where in an image each pixel of the tiles ``pixels`` at ``order`` looks, so that the image appears upright
    (north up, east left, as a sky viewer shows it) and undistorted in the cell.

    Each tile pixel's position on the sphere is projected onto the tangent plane at the cell centre (gnomonic
    projection); the image is centred there with its top towards north. ``fit="fill"`` scales the image so that
    it covers the whole cell (the cell's corners reach the middle of the image's sides: an image's corners are
    not shown); ``fit="contain"`` scales it to lie inside the cell (all of a plot is shown, the cell's corners
    are background). ``aspect`` is the image's width / height.

    Positions are computed exactly by HEALPix on a (coarse + 1)^2 grid per tile and bilinearly interpolated to
    the ``width`` x ``width`` pixels, which keeps order 6 (49,152 tiles) cheap.

    Returns:
        (N, width, width, 2) float32 coordinates for :func:`torch.nn.functional.grid_sample`: (x, y) in [-1, 1]
        across the image (align_corners=False), outside that range beyond the image.
    """
    pixels = np.asarray(pixels)
    n, g = len(pixels), min(coarse, width)
    centres = cell_centres(order, pixels)  # (N, 3)
    east, north = _local_frame(centres)
    steps = np.linspace(0.0, 1.0, g + 1)
    dx, dy = np.meshgrid(steps, steps, indexing="ij")  # dx along tile rows, dy along columns
    index = np.repeat(pixels, (g + 1) ** 2)
    lon, lat = healpix_to_lonlat(index, 2**order, dx=np.tile(dx.ravel(), n), dy=np.tile(dy.ravel(), n),
                                 order="nested")  # fmt: skip
    points = radec_to_unit(lon.to_value(u.deg), lat.to_value(u.deg)).reshape(n, g + 1, g + 1, 3)
    depth = np.einsum("ngmk,nk->ngm", points, centres)
    east_off = np.einsum("ngmk,nk->ngm", points, east) / depth  # (N, g+1, g+1) gnomonic coordinates
    north_off = np.einsum("ngmk,nk->ngm", points, north) / depth
    # half-extent of the cell: its corners are the grid's corners
    corners = (slice(None), [0, 0, -1, -1], [0, -1, 0, -1])
    reach = np.maximum(np.abs(east_off[corners]), np.abs(north_off[corners])).max(axis=1)  # (N,)
    if fit == "fill":
        half_w = half_h = reach
        if aspect >= 1:
            half_w = reach * aspect
        else:
            half_h = reach / aspect
    elif fit == "contain":  # the largest image of this aspect inside the diamond |e| + |n| <= reach
        half_h = reach / (1.0 + aspect)
        half_w = half_h * aspect
    else:
        raise ValueError(f"fit must be 'fill' or 'contain', got {fit!r}")
    # image x grows to the right = west (east is left), image y grows downwards = south
    grid_x = -east_off / half_w[:, None, None]
    grid_y = -north_off / half_h[:, None, None]
    coarse_grid = np.stack([grid_x, grid_y], axis=1).astype(np.float32)  # (N, 2, g+1, g+1), [row, col]
    return _upsample(coarse_grid, width)


def _upsample(coarse_grid: np.ndarray, width: int) -> np.ndarray:
    """Bilinear interpolation of (N, 2, g+1, g+1) values at the cell's grid corners to the centres of
    (width, width) pixels: (N, width, width, 2). Separable: one (width, g+1) weight matrix each way."""
    g = coarse_grid.shape[-1] - 1
    at = (np.arange(width) + 0.5) / width * g  # pixel centres in coarse-grid units
    left = np.minimum(np.floor(at).astype(int), g - 1)
    frac = at - left
    weights = np.zeros((width, g + 1))
    weights[np.arange(width), left] = 1 - frac
    weights[np.arange(width), left + 1] += frac
    fine = np.einsum("ia,ncab,jb->nijc", weights, coarse_grid.astype(np.float64), weights, optimize=True)
    return np.ascontiguousarray(fine, dtype=np.float32)  # (N, width, width, 2)
