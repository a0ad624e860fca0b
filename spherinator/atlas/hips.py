"""Write a HiPS (IVOA HiPS 1.0) of a decoded sphere: one tile per HEALPix cell, showing the decoder's output at
the cell's centre, streamed to disk batch by batch (order 6 is 49,152 tiles; none are held in memory).

Layout: ``properties``, ``NorderK/DirD/NpixN.{jpg,png}`` for K = 0..max_order (D = N // 10000 * 10000, NESTED
HEALPix, 12 * 4^K tiles at order K), and ``Norder3/Allsky.{jpg,png}``: the 768 tiles of order 3 shrunk to 64 x 64
(at most) and laid side by side, 27 to a row, in index order (drawn also when max_order is below 3: Aladin Lite
asks for it).

The tiles of an order are independent: with ``workers`` > 1 they are drawn by a pool of processes over chunks of
whole batches (the same batches as one process decodes, so the files are byte for byte the same), each worker with a
decoder of its own running on one thread (:meth:`~spherinator.atlas.model.SphereModel.worker_decoder`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spherinator.atlas.render import TileRenderer
from spherinator.atlas.sky import cell_centres, cells

FORMATS = {"jpeg": "jpg", "png": "png"}
ALLSKY_ORDER = 3
ALLSKY_TILE = 64
HIPS_VERSION = "1.4"  # the hips_version value of the HiPS 1.0 Recommendation
TILES_PER_WORKER = 1000  # fewer tiles than this per worker do not pay for starting it (~1 s: imports, session)
CHUNKS_PER_WORKER = 8  # work items per worker: small enough to balance, large enough to amortise the hand-over


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (what Slurm or ``taskset`` gives), else the count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def tile_path(root: Path, order: int, npix: int, extension: str) -> Path:
    """``root/NorderK/DirD/NpixN.ext`` of tile ``npix`` at ``order`` (D = N // 10000 * 10000)."""
    return Path(root) / f"Norder{order}" / f"Dir{npix // 10000 * 10000}" / f"Npix{npix}.{extension}"


def allsky_layout(order: int) -> tuple[int, int]:
    """(columns, rows) of the Allsky mosaic of ``order``: int(sqrt(tiles)) columns, as HiPS 1.0 says."""
    n = cells(order)
    columns = int(math.isqrt(n))
    return columns, math.ceil(n / columns)


def write_hips(
    decode: Callable[[np.ndarray], np.ndarray],
    renderer: TileRenderer,
    out: Path,
    max_order: int,
    tile_format: str = "jpeg",
    batch_size: int = 64,
    properties: dict[str, str] | None = None,
    progress: bool = True,
    workers: int = 1,
    worker_decoder: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Decode the centre of every cell at orders 0..``max_order`` and write its tile, the Allsky and the
    ``properties`` under ``out``.

    Args:
        decode: (B, 3) float32 unit vectors -> (B, *shape) decoder outputs.
        renderer: Draws the outputs as tiles.
        out: The HiPS directory.
        max_order: Deepest order (``hips_order``).
        tile_format: ``jpeg`` or ``png``.
        batch_size: Cells decoded at once.
        properties: Extra or overriding ``properties`` keys (``obs_title``, ``creator_did``, ...).
        progress: Show a progress bar (stderr).
        workers: Processes drawing tiles (at most one per :data:`TILES_PER_WORKER` tiles); 1: this process alone.
        worker_decoder: A picklable ``decode`` for the worker processes (each calls it on its own batches); None:
            no workers.

    Returns:
        ``{"orders", "tiles", "tile_width", "format", "seconds", "seconds_per_1k_tiles", "decode_seconds",
        "workers"}``; with workers, ``decode_seconds`` adds up their decoding.
    """
    if tile_format not in FORMATS:
        raise ValueError(f"tile_format must be one of {sorted(FORMATS)}, got {tile_format!r}")
    ext, out, width = FORMATS[tile_format], Path(out), int(renderer.width)
    total = sum(cells(k) for k in range(max_order + 1))
    drawn = sum(cells(k) for k in range(max(max_order, ALLSKY_ORDER) + 1))
    workers = min(int(workers), max(1, drawn // TILES_PER_WORKER)) if worker_decoder is not None else 1
    start = time.perf_counter()
    if workers > 1:
        allsky, decode_seconds = _draw_tiles_in_pool(worker_decoder, renderer, out, max_order, ext, batch_size,
                                                     drawn, progress, workers)  # fmt: skip
    else:
        allsky, decode_seconds = _draw_tiles(decode, renderer, out, max_order, ext, batch_size, drawn, progress)
    (out / f"Norder{ALLSKY_ORDER}").mkdir(parents=True, exist_ok=True)
    _save(allsky, out / f"Norder{ALLSKY_ORDER}" / f"Allsky.{ext}")
    seconds = time.perf_counter() - start
    keys = hips_properties(max_order, width, tile_format, total, properties)
    write_properties(out / "properties", keys)
    return {
        "orders": list(range(max_order + 1)),
        "tiles": total,
        "tile_width": width,
        "format": tile_format,
        "allsky": f"Norder{ALLSKY_ORDER}/Allsky.{ext}",
        "seconds": round(seconds, 2),
        "seconds_per_1k_tiles": round(1000 * seconds / drawn, 3),  # tiles drawn: the Allsky's too
        "decode_seconds": round(decode_seconds, 2),
        "workers": workers,
    }


def _draw_tiles(decode: Callable[[np.ndarray], np.ndarray], renderer: TileRenderer, out: Path, max_order: int,
                ext: str, batch_size: int, drawn: int, progress: bool) -> tuple[np.ndarray, float]:  # fmt: skip
    """Decode and write the tiles of orders 0..``max_order`` (and draw order 3 for the Allsky in any case).
    Returns the Allsky mosaic and the seconds spent decoding."""
    from tqdm import tqdm

    small = min(ALLSKY_TILE, int(renderer.width))
    columns, rows = allsky_layout(ALLSKY_ORDER)
    allsky = np.zeros((rows * small, columns * small, 3), dtype=np.uint8)
    decode_seconds = 0.0
    bar = tqdm(total=drawn, desc="HiPS tiles", unit="tile", file=sys.stderr, disable=not progress)
    # Encoding and writing a batch's files overlaps with decoding the next batch (PIL releases the GIL).
    with ThreadPoolExecutor(max_workers=2) as pool, bar:
        pending: list[Any] = []
        _make_dirs(out, max_order)
        for order in range(max(max_order, ALLSKY_ORDER) + 1):
            for first in range(0, cells(order), batch_size):
                pixels = np.arange(first, min(first + batch_size, cells(order)))
                t0 = time.perf_counter()
                decoded = decode(cell_centres(order, pixels).astype(np.float32))
                decode_seconds += time.perf_counter() - t0
                tiles = renderer.tiles(order, pixels, decoded)
                if order == ALLSKY_ORDER:
                    for npix, tile in zip(pixels, tiles, strict=True):
                        r, c = divmod(int(npix), columns)
                        allsky[r * small : (r + 1) * small, c * small : (c + 1) * small] = _shrink(tile, small)
                for done in pending:
                    done.result()
                if order <= max_order:
                    pending = [pool.submit(_save_tiles, out, order, pixels, tiles, ext)]
                bar.update(len(pixels))
        for done in pending:
            done.result()
    return allsky, decode_seconds


def _make_dirs(out: Path, max_order: int) -> None:
    for order in range(max_order + 1):
        for d in range(0, cells(order), 10000):
            (out / f"Norder{order}" / f"Dir{d}").mkdir(parents=True, exist_ok=True)


def _chunks(max_order: int, batch_size: int, workers: int, drawn: int) -> Iterator[tuple[int, int, int]]:
    """(order, first, stop) work items of whole batches: the batches one process decodes, grouped."""
    size = batch_size * max(1, drawn // (workers * CHUNKS_PER_WORKER * batch_size))
    for order in range(max(max_order, ALLSKY_ORDER) + 1):
        for first in range(0, cells(order), size):
            yield order, first, min(first + size, cells(order))


def _draw_tiles_in_pool(decode: Callable[[np.ndarray], np.ndarray], renderer: TileRenderer, out: Path,
                        max_order: int, ext: str, batch_size: int, drawn: int, progress: bool,
                        workers: int) -> tuple[np.ndarray, float]:  # fmt: skip
    """:func:`_draw_tiles` by ``workers`` processes (spawned: no thread pool of the parent's is copied half-held
    into a child, as fork would), each drawing whole chunks of batches with a decoder of its own."""
    from tqdm import tqdm

    _make_dirs(out, max_order)
    small = min(ALLSKY_TILE, int(renderer.width))
    columns, rows = allsky_layout(ALLSKY_ORDER)
    allsky = np.zeros((rows * small, columns * small, 3), dtype=np.uint8)
    decode_seconds = 0.0
    setup = (decode, renderer, out, max_order, ext, batch_size, small)
    context = multiprocessing.get_context("spawn")
    bar = tqdm(total=drawn, desc="HiPS tiles", unit="tile", file=sys.stderr, disable=not progress)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=setup) as pool, bar:
        chunks = _chunks(max_order, batch_size, workers, drawn)
        futures = {pool.submit(_draw_chunk, *chunk): chunk[2] - chunk[1] for chunk in chunks}  # -> its tile count
        for future in as_completed(futures):
            first, pieces, seconds = future.result()
            decode_seconds += seconds
            for offset, piece in enumerate(pieces if pieces is not None else ()):
                r, c = divmod(first + offset, columns)
                allsky[r * small : (r + 1) * small, c * small : (c + 1) * small] = piece
            bar.update(futures[future])
    return allsky, decode_seconds


_WORKER: dict[str, Any] = {}


def _start_worker(*setup: Any) -> None:
    _WORKER["setup"] = setup


def _draw_chunk(order: int, first: int, stop: int) -> tuple[int, np.ndarray | None, float]:
    """Draw (and, up to the deepest order, write) the tiles ``first .. stop - 1`` of ``order`` in a worker, batch
    by batch as :func:`_draw_tiles` does. Returns ``first``, the chunk's Allsky pieces (order 3) and the seconds
    spent decoding."""
    decode, renderer, out, max_order, ext, batch_size, small = _WORKER["setup"]
    pieces, decode_seconds = [], 0.0
    for begin in range(first, stop, batch_size):
        pixels = np.arange(begin, min(begin + batch_size, stop))
        t0 = time.perf_counter()
        decoded = decode(cell_centres(order, pixels).astype(np.float32))
        decode_seconds += time.perf_counter() - t0
        tiles = renderer.tiles(order, pixels, decoded)
        if order == ALLSKY_ORDER:
            pieces += [_shrink(tile, small) for tile in tiles]
        if order <= max_order:
            _save_tiles(out, order, pixels, tiles, ext)
    return first, np.stack(pieces) if pieces else None, decode_seconds


def _shrink(tile: np.ndarray, size: int) -> np.ndarray:
    if tile.shape[0] == size:
        return tile
    return np.asarray(Image.fromarray(tile).resize((size, size), Image.Resampling.BOX))


def _save_tiles(root: Path, order: int, pixels: np.ndarray, tiles: np.ndarray, ext: str) -> None:
    for npix, tile in zip(pixels, tiles, strict=True):
        _save(tile, tile_path(root, order, int(npix), ext))


def _save(picture: np.ndarray, path: Path) -> None:
    image = Image.fromarray(picture)
    if path.suffix == ".jpg":
        image.save(path, quality=90)
    else:
        image.save(path, compress_level=3)


def hips_properties(
    max_order: int, width: int, tile_format: str, tiles: int, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The ``properties`` keys: the ones HiPS 1.0 requires, and the technical ones clients use."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ")
    from spherinator import __version__

    cell_deg = math.degrees(math.sqrt(4 * math.pi / cells(max_order)))
    keys = {
        "creator_did": "ivo://spherinator/P/atlas",
        "obs_title": "spherinator atlas",
        "obs_description": "The decoder of a spherinator model, drawn at the centre of every HEALPix cell",
        "dataproduct_type": "image",
        "dataproduct_subtype": "color",
        "hips_version": HIPS_VERSION,
        "hips_builder": f"spherinator {__version__}",
        "hips_creation_date": now,
        "hips_release_date": now,
        "hips_status": "public master clonableOnce",
        "hips_tile_format": tile_format,
        "hips_tile_width": str(width),
        "hips_order": str(max_order),
        "hips_order_min": "0",
        "hips_frame": "equatorial",
        "hips_initial_ra": "0",
        "hips_initial_dec": "0",
        "hips_initial_fov": "180",
        "hips_nb_tiles": str(tiles),
        "hips_pixel_scale": f"{cell_deg / width:.6g}",
        "hips_sampling": "bilinear",
    }
    keys.update(extra or {})
    return keys


def write_properties(path: Path, keys: dict[str, str]) -> None:
    """``keyword = value`` lines (UTF-8, LF), keywords padded to one column as HiPS tools write them."""
    lines = [f"{key:<20} = {' '.join(str(value).split())}" for key, value in keys.items()]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_properties(path: Path) -> dict[str, str]:
    """The keys of a HiPS ``properties`` file (comments and blank lines skipped)."""
    keys = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        keys[key.strip()] = value.strip()
    return keys
