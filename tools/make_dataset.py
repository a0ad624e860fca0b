"""Write Parquet datasets in spherinator's fast tensor layout.

Subcommands:
    synthetic  galaxy-like images (Sersic bulge + disk, PSF, noise); the generating parameters as extra columns
    hubble     cutouts around the sources of the Hubble Deep Field image that scikit-image ships
    digits     scikit-learn's 1,797 labelled 8x8 handwritten digits, upsampled (a ``label`` column, 10 classes)
    spectra    Gaia-XP-like spectra ``flux`` (1, L) with their 1-sigma errors ``flux_error``, noisy where the errors
               are large (for the error-weighted losses, experiments/vae_gaia_xp.yaml)
    images     a folder of PNG/JPEG/FITS/NPY files
    convert    any layout the DataModule reads (lists + shape metadata, fixed_shape_tensor, encoded images) to
               the fast layout, checked at the end (row count and checksum)

Every subcommand writes ``fixed_size_binary`` tensor columns with ``<column>_shape``/``<column>_dtype`` schema
metadata (``--layout list`` writes the slower list layout, for comparisons), ``--rows-per-file`` rows per file
and ``--rows-per-group`` rows per row group.

Examples:
    python tools/make_dataset.py synthetic --out data/demo --count 2048 --size 64
    python tools/make_dataset.py hubble --out data/hubble --size 64
    python tools/make_dataset.py digits --out data/digits --size 32
    python tools/make_dataset.py spectra --out data/gaia_xp_synthetic --count 4096 --length 344
    python tools/make_dataset.py images --out data/mine --input pictures/ --size 128
    python tools/make_dataset.py convert --input data/legacy --out data/legacy-fast --compression zstd
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spherinator.data.convert import convert, resize
from spherinator.data.layout import DataError
from spherinator.data.writer import COMPRESSIONS, DEFAULT_COMPRESSION, LAYOUTS, ParquetWriter

# -- synthetic galaxies ----------------------------------------------------------------------------------------------

BULGE_COLOUR = np.array([1.0, 0.78, 0.55], dtype=np.float32)  # red-ish old stars (R, G, B)
DISK_COLOUR = np.array([0.65, 0.8, 1.0], dtype=np.float32)  # blue-ish young stars


try:  # scipy's FFT works in float32 (twice numpy's speed here); numpy's is the fallback
    from scipy.fft import irfft2 as _irfft2
    from scipy.fft import rfft2 as _rfft2
except ImportError:
    from numpy.fft import irfft2 as _irfft2
    from numpy.fft import rfft2 as _rfft2


def _sersic(r: np.ndarray, r_eff: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Sersic profile normalised to 1 at r_eff; ``b_n`` from the Ciotti & Bertin expansion."""
    b = 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n)
    return np.exp(-b * ((r / r_eff) ** (1.0 / n) - 1.0))


def synthetic_galaxies(count: int, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``count`` galaxy-like images ``(count, 3, size, size)`` uint8 plus their generating parameters.

    Each galaxy is a Sersic bulge plus an exponential disk sharing a centre, orientation and axis ratio, with its
    own sizes, bulge fraction and colours, convolved with a Gaussian PSF, on a sky with Gaussian noise. Besides the
    generating parameters, ``log_flux`` (log10 of the total light of the noiseless image, pixel values in [0, 1]
    summed over pixels and bands) and ``b_minus_r`` (the colour index 2.5 log10(F_R / F_B) of its R and B bands)
    are what a photometric catalogue would list.
    """
    p = {
        "bulge_fraction": rng.beta(1.5, 2.5, count),
        "sersic_index": rng.uniform(1.5, 4.5, count),
        "disk_radius": rng.uniform(0.08, 0.22, count) * size,
        "axis_ratio": rng.uniform(0.25, 1.0, count),
        "angle": rng.uniform(0.0, np.pi, count),
        "centre_x": rng.normal(0.0, 0.03, count) * size,
        "centre_y": rng.normal(0.0, 0.03, count) * size,
        "psf_sigma": rng.uniform(0.4, 1.6, count) * size / 64,
        "noise": rng.uniform(0.005, 0.04, count),
        "brightness": rng.uniform(0.5, 1.0, count),
        "colour_shift": rng.normal(0.0, 0.08, count),
    }
    p["bulge_radius"] = p["disk_radius"] * rng.uniform(0.15, 0.5, count)
    p = {k: v.astype(np.float32) for k, v in p.items()}
    col = {k: v[:, None, None] for k, v in p.items()}  # (B, 1, 1) for broadcasting over pixels

    centre = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - centre  # (H, W)
    dx, dy = xx[None] - col["centre_x"], yy[None] - col["centre_y"]  # (B, H, W)
    cos, sin = np.cos(col["angle"]), np.sin(col["angle"])
    major, minor = dx * cos + dy * sin, -dx * sin + dy * cos
    r = np.sqrt(major**2 + (minor / col["axis_ratio"]) ** 2) + 1e-3  # elliptical radius (B, H, W)
    bulge = _sersic(r, col["bulge_radius"], col["sersic_index"])
    disk = _sersic(r, col["disk_radius"], np.float32(1.0))
    bulge /= bulge.sum((1, 2), keepdims=True)
    disk /= disk.sum((1, 2), keepdims=True)
    shift = p["colour_shift"][:, None] * np.array([1.0, 0.0, -1.0], dtype=np.float32)  # (B, 3) redder or bluer
    bulge_rgb = (BULGE_COLOUR + shift) * p["bulge_fraction"][:, None]  # (B, 3)
    disk_rgb = (DISK_COLOUR + shift) * (1 - p["bulge_fraction"])[:, None]
    light = bulge_rgb[:, :, None, None] * bulge[:, None] + disk_rgb[:, :, None, None] * disk[:, None]  # (B,3,H,W)

    # PSF: Gaussian blur in Fourier space, one sigma per image
    fy = np.fft.fftfreq(size).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    kernel = np.exp(-2 * np.pi**2 * p["psf_sigma"][:, None, None] ** 2 * (fx**2 + fy**2))  # (B, H, W//2+1)
    light = _irfft2(_rfft2(light) * kernel[:, None], s=(size, size)).astype(np.float32)

    light *= p["brightness"][:, None, None, None] / light.max((1, 2, 3), keepdims=True).clip(1e-12)
    # photometry of the noiseless image, as a catalogue would list it: total light and the B - R colour index
    band_flux = light.sum((2, 3), dtype=np.float64).clip(1e-12)  # (B, 3): R, G, B
    p["log_flux"] = np.log10(band_flux.sum(1)).astype(np.float32)
    p["b_minus_r"] = (2.5 * np.log10(band_flux[:, 0] / band_flux[:, 2])).astype(np.float32)  # larger: redder
    light += 0.02 + rng.standard_normal(light.shape, dtype=np.float32) * p["noise"][:, None, None, None]
    images = np.clip(light * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return {"data": images, **p}


def _synthetic_batches(args: argparse.Namespace) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(args.seed)
    chunk = max(1, min(args.count, (8 << 20) // (3 * args.size * args.size)))  # ~32 MB of float work per chunk
    for start in range(0, args.count, chunk):
        n = min(chunk, args.count - start)
        batch = synthetic_galaxies(n, args.size, rng)
        yield {"data": batch.pop("data"), "id": np.arange(start, start + n, dtype=np.int64), **batch}


# -- Hubble Deep Field cutouts ---------------------------------------------------------------------------------------


def hubble_cutouts(size: int, min_area: int, augment: bool) -> dict[str, np.ndarray]:
    """Stamps ``(N, 3, size, size)`` uint8 centred on the sources found in ``skimage.data.hubble_deep_field()``.

    Sources: connected regions of the smoothed luminance above the background plus 3 robust sigmas, with at least
    ``min_area`` pixels, whose stamp lies inside the image. ``augment`` adds the 7 other rotations/flips.
    """
    from skimage import data, filters, measure

    image = data.hubble_deep_field()  # (872, 1000, 3) uint8
    gray = filters.gaussian(image.mean(-1).astype(np.float32), sigma=1.5)
    background = np.median(gray)
    sigma = 1.4826 * np.median(np.abs(gray - background))
    labels = measure.label(gray > background + 3 * sigma)
    half = size // 2
    stamps, rows = [], []
    for region in measure.regionprops(labels, intensity_image=gray):
        if region.area < min_area:
            continue
        cy, cx = (int(round(c)) for c in region.centroid_weighted)
        y0, x0 = cy - half, cx - half
        if y0 < 0 or x0 < 0 or y0 + size > image.shape[0] or x0 + size > image.shape[1]:
            continue
        stamps.append(image[y0 : y0 + size, x0 : x0 + size].transpose(2, 0, 1))  # (3, size, size)
        rows.append((cx, cy, region.area, float(region.image_intensity.sum())))
    if not stamps:
        raise DataError(f"no source of at least {min_area} pixels fits a {size}px stamp; lower --min-area or --size")
    data_ = np.stack(stamps)
    x, y, area, flux = (np.array(c) for c in zip(*rows, strict=True))
    variant = np.zeros(len(data_), dtype=np.int64)
    if augment:
        variants = [np.rot90(data_, k, axes=(2, 3)) for k in range(4)]
        variants += [v[..., ::-1] for v in variants]
        data_ = np.concatenate([np.ascontiguousarray(v) for v in variants])
        x, y, area, flux = (np.tile(c, 8) for c in (x, y, area, flux))
        variant = np.repeat(np.arange(8), len(stamps))
    return {
        "data": data_,
        "id": np.arange(len(data_), dtype=np.int64),
        "x": x.astype(np.int64),
        "y": y.astype(np.int64),
        "area": area.astype(np.int64),
        "flux": flux.astype(np.float32),
        "variant": variant,
    }


# -- handwritten digits -----------------------------------------------------------------------------------------------


def digits(size: int) -> dict[str, np.ndarray]:
    """scikit-learn's ``load_digits()`` (1,797 8x8 images of the digits 0-9, values 0-16; shipped in the wheel, no
    download) as ``(1797, 1, size, size)`` uint8 images (bilinear upsampling, 16 -> 255), with ``label`` (the digit)
    and ``id`` (the row in ``load_digits``)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None] * (255.0 / 16.0)  # (N, 1, 8, 8)
    if size != images.shape[-1]:
        images = resize(images, size)
    return {
        "data": np.clip(np.round(images), 0, 255).astype(np.uint8),
        "label": bunch.target.astype(np.int64),
        "id": np.arange(len(images), dtype=np.int64),
    }


# -- a folder of files -------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
ARRAY_SUFFIXES = {".npy", ".fits", ".fit", ".fts"}


def load_file(path: Path) -> np.ndarray:
    """One file as an array: images ``(C, H, W)`` (grayscale ``(1, H, W)``), FITS/NPY as stored."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            array = np.asarray(im)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if suffix == ".npy":
        return np.load(path)
    if suffix in {".fits", ".fit", ".fts"}:
        try:
            from astropy.io import fits
        except ImportError as err:
            raise DataError(
                f"{path}: reading FITS needs astropy; `pip install astropy` (or spherinator[data])"
            ) from err
        with fits.open(path) as hdus:
            for hdu in hdus:
                if hdu.data is not None:
                    return np.asarray(hdu.data).astype(hdu.data.dtype.newbyteorder("="))
        raise DataError(f"{path}: no HDU holds image data")
    raise DataError(f"{path}: unsupported file type {suffix!r}; use PNG, JPEG, FITS or NPY")


def _folder_batches(args: argparse.Namespace, files: Sequence[Path]) -> Iterator[dict[str, np.ndarray]]:
    shape, chunk, ids, names = None, [], [], []
    for i, path in enumerate(tqdm(files, desc="files", unit="file", disable=args.quiet)):
        array = load_file(path)
        if args.size is not None:
            array = resize(array, args.size)
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise DataError(
                f"{path} has shape {array.shape}, but {files[0]} has {shape}; give --size to resize every image"
            )
        chunk.append(array)
        ids.append(i)
        names.append(str(path.relative_to(args.input)))
        if len(chunk) == args.rows_per_group:
            yield {"data": np.stack(chunk), "id": np.array(ids, dtype=np.int64), "filename": np.array(names)}
            chunk, ids, names = [], [], []
    if chunk:
        yield {"data": np.stack(chunk), "id": np.array(ids, dtype=np.int64), "filename": np.array(names)}


# -- spectra with uncertainties ---------------------------------------------------------------------------------------


def synthetic_spectra(count: int, length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``count`` spectra ``flux`` ``(count, 1, length)`` float32 with 1-sigma errors ``flux_error`` of the same shape,
    and their generating parameters.

    Each true spectrum is a smooth continuum (a slope ``tilt``, as of a temperature) with one broad line at
    ``line_position`` (0..1 along the spectrum) of depth ``line_depth``; its values lie in about [0.2, 1.2]. The
    errors are small in the middle and grow steeply towards both ends (like Gaia XP's, where the instrument's
    throughput falls), and a few bins per spectrum are "bad" (errors of the order of the signal); the observed flux
    is the true one plus Gaussian noise of those errors. A loss that ignores the errors spends its capacity
    fitting the noise at the ends; an error-weighted one (chi-square, Gaussian NLL) learns the shape.
    """
    grid = np.linspace(0.0, 1.0, length, dtype=np.float32)
    tilt = rng.uniform(-0.5, 0.5, count).astype(np.float32)
    position = rng.uniform(0.2, 0.8, count).astype(np.float32)
    depth = rng.uniform(-0.4, 0.4, count).astype(np.float32)
    true = 0.7 + tilt[:, None] * (grid - 0.5) + depth[:, None] * np.exp(-0.5 * ((grid - position[:, None]) / 0.05) ** 2)
    edge = np.abs(grid - 0.5) * 2  # 0 in the middle, 1 at the ends
    error = np.broadcast_to(0.01 + 0.6 * edge**6, (count, length)).copy()
    bad = rng.random((count, length)) < 0.02
    error[bad] = rng.uniform(0.3, 1.0, int(bad.sum()))
    flux = true + rng.normal(size=(count, length)) * error
    return {
        "flux": flux[:, None].astype(np.float32),
        "flux_error": error[:, None].astype(np.float32),
        "true_flux": true[:, None].astype(np.float32),
        "tilt": tilt,
        "line_position": position,
        "line_depth": depth,
    }


def _check_spectra(args: argparse.Namespace) -> None:
    # checked before the writer exists: a refused value leaves no empty output directory behind
    if args.count < 1:
        raise DataError(f"--count {args.count} must be at least 1")
    if args.length < 8:
        raise DataError(f"--length {args.length} must be at least 8")


def _spectra_batches(args: argparse.Namespace) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(args.seed)
    chunk = 4096
    for start in range(0, args.count, chunk):
        n = min(chunk, args.count - start)
        yield {**synthetic_spectra(n, args.length, rng), "id": np.arange(start, start + n, dtype=np.int64)}


# -- command line -----------------------------------------------------------------------------------------------------


def _writer(args: argparse.Namespace) -> ParquetWriter:
    return ParquetWriter(
        args.out,
        rows_per_file=args.rows_per_file,
        rows_per_group=args.rows_per_group,
        compression=args.compression,
        layout=args.layout,
    )


def _write(args: argparse.Namespace, batches, total: int) -> None:
    with _writer(args) as writer, tqdm(total=total, desc="write", unit="row", disable=args.quiet) as bar:
        for batch in batches:
            writer.write(batch)
            bar.update(len(next(iter(batch.values()))))
    _report(args, writer)


def _report(args: argparse.Namespace, writer: ParquetWriter) -> None:
    if not args.quiet:
        print(f"wrote {writer.rows} rows in {len(writer.files)} files to {writer.out}")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (one subparser per subcommand)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, help="output directory")
    common.add_argument("--rows-per-file", type=int, default=4096, help="rows per Parquet file (default 4096)")
    common.add_argument("--rows-per-group", type=int, default=256, help="rows per row group (default 256)")
    common.add_argument(
        "--compression", choices=COMPRESSIONS, default=DEFAULT_COMPRESSION, help=f"default {DEFAULT_COMPRESSION}"
    )
    common.add_argument("--layout", choices=LAYOUTS, default="fast", help="tensor layout (default fast)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthetic", parents=[common], help="galaxy-like Sersic images with their parameters")
    p.add_argument("--count", type=int, default=2048, help="number of images (default 2048)")
    p.add_argument("--size", type=int, default=64, help="image width and height in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    p = sub.add_parser("hubble", parents=[common], help="cutouts around sources in the Hubble Deep Field image")
    p.add_argument("--size", type=int, default=64, help="stamp width and height in pixels (default 64)")
    p.add_argument("--min-area", type=int, default=30, help="smallest source in pixels (default 30)")
    p.add_argument("--augment", action="store_true", help="add the 7 other rotations/flips of each stamp")

    p = sub.add_parser("digits", parents=[common], help="scikit-learn's labelled 8x8 digits, upsampled")
    p.add_argument("--size", type=int, default=32, help="image width and height in pixels (default 32)")

    p = sub.add_parser("spectra", parents=[common], help="Gaia-XP-like spectra with per-value errors")
    p.add_argument("--count", type=int, default=4096, help="number of spectra (default 4096)")
    p.add_argument("--length", type=int, default=344, help="values per spectrum (default 344, as Gaia XP)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    p = sub.add_parser("images", parents=[common], help="a folder of PNG/JPEG/FITS/NPY files")
    p.add_argument("--input", type=Path, required=True, help="folder searched recursively")
    p.add_argument("--size", type=int, default=None, help="resize every image to SIZE x SIZE")

    p = sub.add_parser("convert", parents=[common], help="any readable layout -> fast layout, checked at the end")
    p.add_argument("--input", type=Path, required=True, help="dataset directory (or .parquet file)")
    p.add_argument("--columns", nargs="+", default=None, help="columns to keep (default: all)")
    p.add_argument("--size", type=int, default=None, help="resize image columns to SIZE x SIZE")
    return parser


def _check_out(out: Path) -> None:
    # a second run into a dataset would replace some of its part files and leave the others: a silent mix of both
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory; give a new directory")
    existing = sorted(out.rglob("*.parquet")) if out.is_dir() else []
    if existing:
        raise DataError(
            f"--out {out} already holds {len(existing)} .parquet files (e.g. {existing[0].name}); give a new directory "
            f"or remove them first"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        _check_out(Path(args.out))
        if args.command == "synthetic":
            _write(args, _synthetic_batches(args), args.count)
        elif args.command == "hubble":
            cutouts = hubble_cutouts(args.size, args.min_area, args.augment)
            _write(args, [cutouts], len(cutouts["data"]))
        elif args.command == "digits":
            if args.size < 1:
                raise DataError(f"--size {args.size} must be at least 1 pixel")
            rows = digits(args.size)
            _write(args, [rows], len(rows["data"]))
        elif args.command == "spectra":
            _check_spectra(args)
            _write(args, _spectra_batches(args), args.count)
        elif args.command == "images":
            if not args.input.is_dir():
                raise DataError(f"--input {args.input} is not a directory")
            suffixes = IMAGE_SUFFIXES | ARRAY_SUFFIXES
            files = sorted(p for p in args.input.rglob("*") if p.suffix.lower() in suffixes)
            if not files:
                raise DataError(f"no PNG/JPEG/FITS/NPY files under {args.input}")
            _write(args, _folder_batches(args, files), len(files))
        else:
            writer = _writer(args)
            check = convert(args.input, writer, args.columns, args.size, args.quiet)
            _report(args, writer)
            if not args.quiet:
                print(f"checked: {check['rows']} rows, crc32 {check['checksum']:08x} match the input")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
