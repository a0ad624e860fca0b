"""Datasets of the Hugging Face Hub as ``data.path``: ``HITS-AIN/Illustris_TNG_SKIRT_SDSS`` instead of a directory.

:func:`local_parquet` loads such a name with ``datasets.load_dataset`` (which downloads it once into the ``datasets``
cache, ``HF_HOME``/``HF_DATASETS_CACHE``, and reads it from there offline with ``HF_DATASETS_OFFLINE=1`` /
``HF_HUB_OFFLINE=1``) and writes its split once as one Parquet file next to the cache's own files, which the
streaming reader then reads like any local dataset (Hub image columns are ``{bytes, path}`` structs, which it decodes).
The Parquet copy is named after the cache's files, so a new version of the dataset gets a new copy.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from spherinator.errors import DataError

# A Hub dataset id: an owner and a name (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_hub_id(path: str | Path) -> bool:
    """Whether ``path`` names no local file or directory and reads as a Hub dataset id (``owner/name``)."""
    text = str(path)
    return not Path(text).exists() and not text.endswith(".parquet") and bool(_HUB_ID.match(text))


def _load(name: str, split: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data.path {name!r} is no local file or directory; to read it as a Hugging Face Hub dataset install the "
            f"`datasets` library: pip install 'spherinator[data]'"
        ) from None
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # datasets raises many kinds: offline, not found, no access, bad files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"data.path {name!r} is no local file or directory, and `datasets` cannot load it as a Hub dataset "
            f"({reason}); give a local directory of Parquet files, or a Hub id that is downloaded (or reachable)"
        ) from None
    if split not in loaded:
        raise DataError(
            f"the Hub dataset {name!r} has no {split!r} split (it has: {', '.join(map(repr, loaded))}); the "
            f"DataModule reads {split!r} and cuts validation/test rows from it"
        )
    return loaded[split]


def _key(dataset, name: str) -> tuple[Path, str]:
    """Where the Parquet copy goes, and a key naming this version of the split."""
    files = [Path(f["filename"]) for f in dataset.cache_files]
    if files:
        stamp = "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return files[0].parent, hashlib.sha256(stamp.encode()).hexdigest()[:16]
    import datasets  # an in-memory dataset (no cache files): key by its contents' size, under the cache

    stamp = f"{name}|{dataset.num_rows}|{dataset.features}|{dataset.data.nbytes}"
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "spherinator-parquet" / name.replace("/", "___")
    return folder, hashlib.sha256(stamp.encode()).hexdigest()[:16]


def local_parquet(name: str, split: str = "train") -> Path:
    """The Parquet file holding split ``split`` of the Hub dataset ``name``, written once from the ``datasets``
    cache (and downloaded into it first if it is not there and the Hub is reachable).

    Raises:
        DataError: ``datasets`` is not installed, cannot load ``name`` (offline and not cached, no such dataset, no
            access), or the dataset has no such split.
    """
    dataset = _load(name, split)
    folder, key = _key(dataset, name)
    target = folder / f"spherinator-{split}-{key}.parquet"
    if target.exists():
        return target
    partial = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # written under a temporary name and renamed: a reader (another rank) never sees half a file
        handle, partial = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".partial")
        os.close(handle)
        dataset.to_parquet(partial)
        os.replace(partial, target)
    except OSError as err:  # a full disk or a read-only (shared) cache: the user's to fix, in one line
        raise DataError(
            f"cannot write the Parquet copy of the Hub dataset {name!r} into {folder} ({err.strerror or err}); free "
            f"space there, or point HF_DATASETS_CACHE at a writable directory with room for the dataset"
        ) from None
    finally:
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)
    return target
