"""``spherinator atlas``: write an atlas (HiPS + catalog + page), serve atlases, and build a sweep's page."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

from spherinator.atlas import MAX_ORDER
from spherinator.atlas.page import ALADIN_LITE_CDN, ALADIN_LITE_ENV

MMAP_THRESHOLD = 1 << 20  # bytes: buffers this large come from mmap and go back to the system when freed
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter

USAGE = """spherinator atlas RUN [-c CONFIG ...] [--data.* VALUE ...] [options]
       spherinator atlas serve DIR [--port PORT]
       spherinator atlas sweep DIR"""


def build_parser() -> argparse.ArgumentParser:
    """The options of ``spherinator atlas RUN`` (``-c`` files and ``--data.*`` overrides are split off first)."""
    parser = argparse.ArgumentParser(
        prog="spherinator atlas",
        usage=USAGE,
        description="The sphere of a trained model as a HiPS (each tile: the decoder's output at its HEALPix "
        "cell's centre), the data's positions as a catalog (Parquet + VOTable), and index.html showing both in "
        "Aladin Lite. RUN is a run directory, a .ckpt file or an ONNX export directory; -c files and --data.* "
        "overrides give the data as for 'spherinator fit' (default: the run's config.yaml). 'spherinator atlas "
        "serve DIR' serves an atlas on 127.0.0.1; 'spherinator atlas sweep DIR' puts the atlases of a sweep's "
        "tasks side by side in DIR/atlas.html.",
        allow_abbrev=False,
    )
    parser.add_argument("run", metavar="RUN", help="run directory, .ckpt checkpoint or ONNX export directory")
    parser.add_argument("-o", "--out", type=Path, default=None, help="atlas directory (default: <run dir>/atlas)")
    parser.add_argument(
        "--max-order",
        "--max_order",
        type=int,
        default=5,
        help=f"deepest HiPS order, 0..{MAX_ORDER}: 12*4^k tiles at order k (default: %(default)s)",
    )
    parser.add_argument(
        "--tile-width",
        "--tile_width",
        type=int,
        default=None,
        help="tile width in pixels, a power of two (default: images' size rounded up to a power "
        "of two in 64..512; 256 for spectra)",
    )
    parser.add_argument(
        "--tile-fit",
        "--tile_fit",
        choices=["fill", "contain"],
        default=None,
        help="fill (default for images): each decoded picture covers its cell, its corners cut off, so centred "
        "objects make a seamless sky; contain (default for spectra): the whole picture inside its cell, the "
        "cell's corners dark",
    )
    parser.add_argument(
        "--tile-format",
        "--tile_format",
        choices=["jpeg", "png"],
        default="jpeg",
        help="tile format (default: %(default)s)",
    )
    parser.add_argument(
        "--max-sources",
        "--max_sources",
        type=int,
        default=20000,
        help="rows in the VOTable the page draws, a seeded sample (default: %(default)s; "
        "catalog.parquet has every row)",
    )
    parser.add_argument(
        "--thumbnails",
        type=int,
        default=1000,
        help="sampled rows that get pictures of their input and its decoding (default: %(default)s)",
    )
    parser.add_argument(
        "--aladin-lite",
        "--aladin_lite",
        default=None,
        help=f"where the page loads Aladin Lite from: a URL, or a local aladin.js / npm package "
        f"directory to copy into the atlas (default: ${ALADIN_LITE_ENV}, else {ALADIN_LITE_CDN})",
    )
    parser.add_argument("--batch-size", "--batch_size", type=int, default=64, help="cells decoded at once")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes drawing tiles, each with its own decoder on one thread (default: the cores this process "
        "may use, as Slurm or taskset give them; one per 1,000 tiles at most)",
    )
    parser.add_argument(
        "--embeddings",
        type=Path,
        default=None,
        help="the catalog's rows from 'spherinator-submit predict' (its run directory, or the embeddings/ "
        "holding _manifest.json), instead of encoding the data: no -c or --data.*, no thumbnails",
    )
    parser.add_argument("--device", default=None, help="torch device for a checkpoint (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the VOTable's row sample")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing atlas directory")
    parser.add_argument(
        "--trust-checkpoint",
        "--trust_checkpoint",
        dest="trust",
        action="store_true",
        help="read a checkpoint holding pickled Python objects in full (only files you trust)",
    )
    return parser  # fmt: skip


def split_data_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(``-c``/``--config`` files and ``--data.*`` overrides in their order, the other arguments)."""
    data, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg.split("=", 1)[0]
        if key in ("-c", "--config", "--data") or key.startswith("--data."):
            takes_value = "=" not in arg and i + 1 < len(argv)
            data += argv[i : i + 1 + takes_value]
            i += 1 + takes_value
        else:
            rest.append(arg)
            i += 1
    return data, rest


def return_freed_memory() -> None:
    """Make buffers of a MiB or more (a batch's activations in onnxruntime, decoded samples, tiles) come from mmap,
    returned to the system when freed, in this process and the tile workers it spawns. glibc's malloc raises its
    mmap threshold to up to 32 MiB after the first such buffer is freed and then keeps those in heaps it does not
    give back: measured, the atlas of an ONNX export at order 3 peaked at 631 MiB with and 410 MiB without that. A
    no-op off glibc."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))  # read by a spawned worker at its start
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _serve(argv: list[str]) -> None:
    """``spherinator atlas serve DIR``."""
    parser = argparse.ArgumentParser(prog="spherinator atlas serve",
                                     description="Serve an atlas (or a sweep's atlas.html) on 127.0.0.1 and "
                                     "print the SSH port-forward line to view it from a laptop.")  # fmt: skip
    parser.add_argument("dir", metavar="DIR", type=Path, help="atlas directory, or a sweep directory")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    args = parser.parse_args(argv)
    from spherinator.atlas.serve import serve
    from spherinator.errors import one_line_errors

    with one_line_errors("spherinator atlas serve", []):
        serve(args.dir, args.port, args.host)


def _sweep(argv: list[str]) -> None:
    """``spherinator atlas sweep DIR``."""
    parser = argparse.ArgumentParser(prog="spherinator atlas sweep",
                                     description="Write DIR/atlas.html: the spheres of every atlas under DIR "
                                     "(DIR/*/atlas) side by side.")  # fmt: skip
    parser.add_argument("dir", metavar="DIR", type=Path, help="a sweep directory (spherinator-submit --name)")
    parser.add_argument("--aladin-lite", "--aladin_lite", default=None, help="as for spherinator atlas")
    args = parser.parse_args(argv)
    from spherinator.atlas.page import write_sweep_page
    from spherinator.errors import one_line_errors

    with one_line_errors("spherinator atlas sweep", []):
        path = write_sweep_page(
            args.dir, args.aladin_lite, log=lambda line: print(f"spherinator atlas sweep: {line}", file=sys.stderr)
        )
    print(f"wrote {path} (view it: spherinator atlas serve {args.dir})")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``spherinator atlas``; bad input ends in one line naming the value (exit status 2). The
    arguments are parsed before anything heavy is imported: ``--help`` answers at once."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        _serve(argv[1:])
        return
    if argv[:1] == ["sweep"]:
        _sweep(argv[1:])
        return
    data_args, rest = split_data_args(argv)
    args = build_parser().parse_args(rest)
    from spherinator.atlas.build import write_atlas
    from spherinator.errors import one_line_errors
    from spherinator.staging import exit_on_sigterm

    return_freed_memory()
    with exit_on_sigterm(), one_line_errors("spherinator atlas", ["predict", *data_args]):
        write_atlas(
            args.run,
            data_args,
            out=args.out,
            max_order=args.max_order,
            tile_width=args.tile_width,
            tile_fit=args.tile_fit,
            tile_format=args.tile_format,
            max_sources=args.max_sources,
            thumbnails=args.thumbnails,
            aladin_lite=args.aladin_lite,
            batch_size=args.batch_size,
            device=args.device,
            overwrite=args.overwrite,
            seed=args.seed,
            trust=args.trust,
            workers=args.workers,
            embeddings=args.embeddings,
        )
