"""The settings of :func:`~spherinator.atlas.build.write_atlas`, checked on construction, and the checks of where an
atlas may be written: never over what is not an atlas, the model it is drawn from or the data it encodes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spherinator.atlas import MAX_ORDER, AtlasError
from spherinator.atlas.page import ATLAS_JSON
from spherinator.atlas.render import MAX_TILE_WIDTH
from spherinator.staging import output_dir_contents

MAX_SOURCES = 10_000_000  # the VOTable is TABLEDATA text read by a browser: ~1 GB there
MAX_THUMBNAILS = 1_000_000
MAX_BATCH_SIZE = 65_536
MAX_SEED = 2**63 - 1
MAX_WORKERS = 1024


@dataclass
class AtlasOptions:
    """How :func:`~spherinator.atlas.build.write_atlas` draws an atlas; a bad value raises :class:`AtlasError`
    naming the option (as its command-line flag) and the range it takes.

    Attributes:
        out: Atlas directory; None: ``<run dir>/atlas``.
        max_order: Deepest HiPS order, 0..:data:`~spherinator.atlas.MAX_ORDER`.
        tile_width: Tile width in pixels, a power of two in 8..:data:`MAX_TILE_WIDTH`; None: from the data.
        tile_fit: ``fill`` or ``contain``; None: fill for images, contain for spectra.
        tile_format: ``jpeg`` or ``png``.
        max_sources: Rows in the VOTable, 1..:data:`MAX_SOURCES`.
        thumbnails: Sampled rows with pictures, 0..:data:`MAX_THUMBNAILS`.
        aladin_lite: Where the page loads Aladin Lite from (see :func:`~spherinator.atlas.page.find_aladin_lite`).
        batch_size: Cells decoded at once, 1..:data:`MAX_BATCH_SIZE`.
        device: Torch device of a checkpoint's model.
        overwrite: Replace an existing atlas (only an atlas: a directory holding ``atlas.json``).
        seed: Seed of the VOTable's row sample, 0..2^63-1.
        trust: Read a checkpoint holding pickled Python objects in full.
        progress: Progress bars on stderr.
        workers: Processes drawing tiles, 1..:data:`MAX_WORKERS`; None: the cores this process may use (its CPU
            affinity, which Slurm sets).
        embeddings: ``spherinator-submit predict``'s run directory (or its ``embeddings/``): the catalog's rows,
            embedded already; None: encode the data.
    """

    out: str | Path | None = None
    max_order: int = 5
    tile_width: int | None = None
    tile_fit: str | None = None
    tile_format: str = "jpeg"
    max_sources: int = 20000
    thumbnails: int = 1000
    aladin_lite: str | Path | None = None
    batch_size: int = 64
    device: str | None = None
    overwrite: bool = False
    seed: int = 0
    trust: bool = False
    progress: bool = True
    workers: int | None = None
    embeddings: str | Path | None = None

    def __post_init__(self) -> None:
        if self.out is not None:
            self.out = Path(self.out)
        _check_int("--max-order", self.max_order, 0, MAX_ORDER, "(12 * 4^k tiles at order k: 49,152 at 6)")
        if self.tile_width is not None:
            _check_int("--tile-width", self.tile_width, 8, MAX_TILE_WIDTH, "and a power of two")
            if self.tile_width & (self.tile_width - 1):
                raise AtlasError(f"--tile-width {self.tile_width} must be a power of two (HiPS tiles are), e.g. 256")
        if self.tile_fit not in (None, "fill", "contain"):
            raise AtlasError(f"--tile-fit {self.tile_fit!r}: give fill or contain")
        if self.tile_format not in ("jpeg", "png"):
            raise AtlasError(f"--tile-format {self.tile_format!r}: give jpeg or png")
        _check_int("--max-sources", self.max_sources, 1, MAX_SOURCES, "(catalog.parquet has every row)")
        _check_int("--thumbnails", self.thumbnails, 0, MAX_THUMBNAILS)
        _check_int("--batch-size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int("--seed", self.seed, 0, MAX_SEED)
        if self.workers is None:
            from spherinator.atlas.hips import available_cores

            self.workers = available_cores()
        _check_int("--workers", self.workers, 1, MAX_WORKERS)


def _check_int(flag: str, value: Any, low: int, high: int, hint: str = "") -> None:
    """``value`` is an int (not a bool or float) in ``low..high``; else one line naming ``flag`` and the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AtlasError(f"{flag} {value!r} must be a whole number in {low:,}..{high:,}")
    if not low <= value <= high:
        raise AtlasError(f"{flag} {value:,} is out of range: give {low:,}..{high:,} {hint}".rstrip())


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both resolved: links and ``..`` followed)."""
    return path.resolve().is_relative_to(folder.resolve())


def check_out(out: Path, overwrite: bool, sources: list[Path]) -> None:
    """Refuse an atlas directory ``out`` that would replace anything but an atlas.

    ``out`` may not exist yet, or be an empty directory, or (with ``overwrite``) an atlas: a directory holding
    ``atlas.json``. It may never be, or hold, the current directory or any of ``sources`` (the model's files and
    directories, read before the atlas is published).

    Raises:
        AtlasError: naming ``out`` and what to give instead.
    """
    if str(out) in ("", ".") or _inside(Path.cwd(), out):
        raise AtlasError(f"-o {out} is (or holds) the current directory; give the atlas a directory of its own, "
                         "e.g. -o atlas")  # fmt: skip
    for source in sources:
        if _inside(source, out):
            raise AtlasError(f"-o {out} holds '{source}', which the atlas is drawn from; give a directory of its own, "
                             "e.g. -o <run dir>/atlas (the default)")  # fmt: skip
    if not output_dir_contents(out, f"-o {out}", AtlasError, "give a directory of its own"):
        return
    if not overwrite:
        raise AtlasError(f"'{out}' already exists; pass --overwrite (overwrite=True) to replace it, or -o elsewhere")
    if not (out / ATLAS_JSON).is_file():
        raise AtlasError(f"'{out}' is not an atlas (it holds no {ATLAS_JSON}), so --overwrite does not replace it; "
                         "give -o a new directory or an atlas's")  # fmt: skip


def check_data_path(out: Path, datamodule: Any) -> None:
    """Refuse an atlas inside the data the next fit reads (its catalog.parquet would join the dataset), or around
    them (replacing the atlas would delete them)."""
    data = getattr(datamodule, "path", None)
    if not isinstance(data, str | os.PathLike):
        return
    data = Path(data).expanduser()
    folder = data if data.is_dir() else None
    if folder is not None and _inside(out, folder):
        raise AtlasError(f"-o {out} is inside the data directory '{data}', where its catalog.parquet would become "
                         "part of the dataset; write the atlas elsewhere (default: <run dir>/atlas)")  # fmt: skip
    if data.exists() and _inside(data, out):
        raise AtlasError(f"-o {out} holds the data '{data}'; give the atlas a directory of its own")


def check_embeddings_path(out: Path, embeddings: Path) -> None:
    """Refuse an atlas inside the embedding shards it is drawn from (its catalog.parquet would be read with them
    as one more shard by whatever reads the directory)."""
    if _inside(out, embeddings):
        raise AtlasError(f"-o {out} is inside the embeddings '{embeddings}', where its catalog.parquet would join the "
                         "shards; write the atlas elsewhere (default: <run dir>/atlas)")  # fmt: skip


def resolve_run_data(datamodule: Any, run_dir: Path) -> str | None:
    """Resolve a relative data path of a run's own ``config.yaml`` against where the run was made, not against the
    current directory: ``spherinator fit`` read ``./data/demo`` from its working directory, which holds the run
    (``runs/demo/version_0``), so the nearest directory above the run where the path exists is taken (the current
    directory when none). Returns a note when the path was changed."""
    data = getattr(datamodule, "path", None)
    if not isinstance(data, str | os.PathLike) or Path(data).expanduser().is_absolute():
        return None
    relative = Path(data)
    for folder in Path(run_dir).resolve().parents:
        if (folder / relative).exists():
            if (folder / relative).resolve() != relative.resolve():
                datamodule.path = folder / relative
                return f"data path '{data}' of the run's config is relative to where the run was made: {folder}"
            return None
    return None
