"""Checkpoints that a kill cannot tear, and resume points chosen among the checkpoints that load.

Lightning 2.6's ``TorchCheckpointIO`` writes a checkpoint to a temporary file in ``$TMPDIR`` and moves it into
place. Where ``$TMPDIR`` is another filesystem than the run dir (node-local ``/tmp``, shared ``runs/``), that move
is a copy, and a job killed during it leaves a torn ``last.ckpt``. :class:`AtomicCheckpointIO` writes beside the
target instead (``.<name>.partial``), syncs it and renames it over the target: the target is the old checkpoint or
the new one, never part of one. ``spherinator`` installs it by default (:func:`install_atomic_checkpoint_io`).

A torn file can still come from elsewhere (an older run, a full disk, a copy): :func:`resume_checkpoint` then
picks the newest checkpoint beside it that loads, and says so.
"""

from __future__ import annotations

import itertools
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from spherinator.errors import CheckpointError, DamagedCheckpointError  # noqa: F401 (re-exported)

# The key Lightning needs to restore a checkpoint (it migrates checkpoints by their version).
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    # torch's zip reader appends "This is an internal error ..." and a hint about legacy files: not the cause
    return f"{type(err).__name__}: {text.split('. This is', 1)[0]}" if text else type(err).__name__


def _load_quietly(path: Path, mmap: bool) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's FutureWarnings about weights_only are not the user's concern here
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def check_checkpoint(path: str | Path) -> None:
    """Raise if ``path`` is no Lightning checkpoint that loads.

    Cheap for the usual files: a zip checkpoint is memory-mapped, so its tensors are not read.

    Raises:
        DamagedCheckpointError: the file does not load (truncated, empty, not a torch file).
        CheckpointError: it loads but is no Lightning checkpoint (a plain ``torch.save({...})``).
    """
    path = Path(path)
    try:
        try:
            content = _load_quietly(path, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            content = _load_quietly(path, mmap=False)  # not a zip file: legacy format, or no torch file at all
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            return  # a pickle with classes torch will not load by default: intact; Lightning decides how to load it
        raise DamagedCheckpointError(f"checkpoint {path} cannot be read ({_short(err)})") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DamagedCheckpointError(f"checkpoint {path} cannot be read ({_short(err)})") from err
    if not isinstance(content, dict) or LIGHTNING_VERSION_KEY not in content:
        held = ", ".join(repr(k) for k in list(content)[:6]) if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint: it holds {held} but no {LIGHTNING_VERSION_KEY!r} (a plain "
            "torch.save file?); give a checkpoint that `spherinator fit` wrote (runs/<name>/.../checkpoints/*.ckpt)"
        )


def _intact_beside(path: Path) -> Iterator[Path]:
    """The other ``*.ckpt`` files in ``path``'s directory that load, newest first (each checked when asked for)."""
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p.is_file() and p.resolve() != path.resolve()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for other in others:
        try:
            check_checkpoint(other)
        except CheckpointError:
            continue
        yield other


def resume_checkpoint(path: str | Path, fallback: bool = True) -> tuple[Path, str | None]:
    """The checkpoint to load for ``path``: itself if it loads, else (``fallback``) the newest one beside it that does.

    Returns:
        The path to load, and the warning to show when it is not ``path`` (None otherwise).

    Raises:
        CheckpointError: ``path`` is no Lightning checkpoint; or it is damaged and no intact checkpoint is beside it
            (or ``fallback`` is False: the message then names the intact ones).
    """
    path = Path(path)
    try:
        check_checkpoint(path)
        return path, None
    except DamagedCheckpointError as err:
        damaged = err
    if fallback:
        other = next(_intact_beside(path), None)
        if other is not None:
            return other, (
                f"{damaged}; resuming from {other} instead, the newest intact checkpoint beside it "
                f"(training since that checkpoint is done again)"
            )
        raise CheckpointError(
            f"{damaged}, and no intact checkpoint is beside it: it was cut short while being written, or is no "
            "checkpoint; start without --ckpt_path, or give another checkpoint"
        ) from damaged
    intact = list(itertools.islice(_intact_beside(path), 3))
    hint = f"intact ones beside it: {', '.join(p.name for p in intact)}" if intact else "none beside it loads"
    raise CheckpointError(f"{damaged}: it was cut short while being written, or is no checkpoint; {hint}") from damaged


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, but a kill while saving leaves the previous checkpoint intact, and loading
    a damaged checkpoint resumes from the newest intact one beside it (with a warning naming both).

    Local files are written to ``.<name>.partial`` in the target's directory, synced to disk and renamed over the
    target (one rename in one filesystem is atomic). Remote paths (``s3://`` ...) are saved by Lightning's own code.

    Args:
        fallback: Load the newest intact checkpoint beside a damaged one instead of failing.
    """

    def __init__(self, fallback: bool = True) -> None:
        self.fallback = fallback

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")  # one name per target: a killed save leaves one
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:  # fmt: skip
        if _is_local(path) and Path(path).is_file():
            chosen, warning = resume_checkpoint(path, fallback=self.fallback)
            if warning:
                rank_zero_warn(warning)
            path = str(chosen)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _is_local(path: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(str(path)), LocalFileSystem)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a crash of the node right after it must not bring the old file back)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def install_atomic_checkpoint_io(trainer: Any) -> None:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` if it uses Lightning's default one.

    A checkpoint IO the user chose (a ``plugins:`` entry, ``AsyncCheckpointIO``), a strategy's own (XLA) and
    strategies that write checkpoints without it (DeepSpeed: the engine writes a directory) are left as they are.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "DamagedCheckpointError",
    "check_checkpoint",
    "install_atomic_checkpoint_io",
    "resume_checkpoint",
]
