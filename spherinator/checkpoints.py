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

import functools
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spherinator.errors import (  # noqa: F401 (CheckpointError, DamagedCheckpointError: re-exported)
    CheckpointError,
    DamagedCheckpointError,
    OutputError,
    disk_error,
)

# The key Lightning needs to restore a checkpoint (it migrates checkpoints by their version).
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    # torch's zip reader appends "This is an internal error ..." and a hint about legacy files: not the cause
    return f"{type(err).__name__}: {text.split('. This is', 1)[0]}" if text else type(err).__name__


def _load_quietly(path: Path, mmap: bool) -> Any:
    import torch  # here, not at the top: the path facts (run_dir_of) serve an ONNX atlas that imports no torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's FutureWarnings about weights_only are not the user's concern here
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _read(path: Path) -> Any:
    """``path`` loaded weights-only; a zip checkpoint is memory-mapped, so its tensors are not read."""
    try:
        try:
            return _load_quietly(path, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            return _load_quietly(path, mmap=False)  # not a zip file: legacy format, or no torch file at all
    except pickle.UnpicklingError:
        raise  # a weights-only refusal or a broken pickle: the callers tell them apart
    # KeyError/IndexError/AttributeError: the weights-only unpickler meeting bytes that are no pickle (a text file)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError, TypeError) as err:
        raise DamagedCheckpointError(f"checkpoint {path} cannot be read ({_short(err)})") from err


def _require_lightning(path: Path, content: Any, version: bool = True) -> dict[str, Any]:
    """``content`` if it is a Lightning checkpoint with weights (``version``: one Lightning can restore a run from,
    which names the Lightning version that wrote it)."""
    if not isinstance(content, dict) or (version and LIGHTNING_VERSION_KEY not in content):
        held = ", ".join(repr(k) for k in list(content)[:6]) if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint: it holds {held} but no {LIGHTNING_VERSION_KEY!r} (a plain "
            "torch.save file?); give a checkpoint that `spherinator fit` wrote (runs/<name>/.../checkpoints/*.ckpt)"
        )
    if not isinstance(content.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} is a Lightning checkpoint without model weights (no 'state_dict'); give a checkpoint that "
            "`spherinator fit` wrote with its weights (not save_weights_only=False's trainer state alone)"
        )
    return content


def check_checkpoint(path: str | Path) -> None:
    """Raise if ``path`` is no Lightning checkpoint that loads.

    Cheap for the usual files: a zip checkpoint is memory-mapped, so its tensors are not read. A file that torch
    refuses to read weights-only (a model built in Python pickles its modules) passes: Lightning decides how to load
    it.

    Raises:
        DamagedCheckpointError: the file does not load (truncated, empty, not a torch file).
        CheckpointError: it loads but is no Lightning checkpoint (a plain ``torch.save({...})``, no ``state_dict``).
    """
    path = Path(path)
    try:
        content = _read(path)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            return
        raise DamagedCheckpointError(f"checkpoint {path} cannot be read ({_short(err)})") from err
    _require_lightning(path, content)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint that loads weights-only holds: enough to tell which model and how far it got.

    Attributes:
        path: The file.
        step: The global step it was saved at (-1 if it does not say).
        class_path: The model's ``class_path`` in its hyper-parameters ("" if none).
        hparams: The other hyper-parameters.
        shapes: ``state_dict`` key -> tensor shape.
        resumable: It names the Lightning version that wrote it (Lightning restores a run only from such a file).
    """

    path: Path
    step: int
    class_path: str
    hparams: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    resumable: bool = True

    def same_model(self, other: CheckpointInfo) -> bool:
        """Both hold weights of one model: the same class path, keys and shapes."""
        return self.class_path == other.class_path and self.shapes == other.shapes


def read_info(path: str | Path) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of ``path``, which must load weights-only (no pickled code) and hold weights.

    Raises:
        DamagedCheckpointError: the file does not load, or holds objects torch will not load weights-only.
        CheckpointError: no dict with a ``state_dict`` (a file without the Lightning version passes, as
            ``resumable=False``: it can be exported or drawn, not resumed).
    """
    import torch

    path = Path(path)
    try:
        content = _require_lightning(path, _read(path), version=False)
    except pickle.UnpicklingError as err:
        refused = "Weights only load" in str(err)
        # torch cannot tell bytes that are no pickle from one naming code: its reason ("Unsupported operand 76")
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", str(err))
        why = _short(err)
        if refused:
            said = f"torch: {reason.group(1)}; " if reason else ""
            why = f"{said}no checkpoint, or one naming Python objects, not only tensors and settings"
        raise DamagedCheckpointError(f"checkpoint {path} cannot be read weights-only ({why})") from err
    hparams = dict(content.get("hyper_parameters") or {})
    class_path = hparams.pop("_class_path", "")
    hparams.pop("_instantiator", None)
    state = content["state_dict"]
    shapes = {str(k): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    step = content.get("global_step")
    step = step if isinstance(step, int) else -1
    return CheckpointInfo(path, step, str(class_path), hparams, shapes, LIGHTNING_VERSION_KEY in content)


def run_dir_of(path: str | Path) -> Path:
    """The run directory of a checkpoint (the directory holding its ``checkpoints/``), of an ONNX export directory
    (the directory above it) or of a run directory (itself)."""
    path = Path(path)
    if path.is_file():
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if (path / "decoder.onnx").is_file():
        return path.parent
    return path


def checkpoints_by_step(folder: str | Path, names: tuple[str, ...] = ()) -> list[CheckpointInfo]:
    """The checkpoints in ``folder`` that load weights-only, the one at the highest global step first (files written
    at the same step: the newer file first). ``names``: only files whose name starts with one of them."""
    found = []
    for path in Path(folder).glob("*.ckpt") if Path(folder).is_dir() else []:
        if not path.is_file() or (names and not path.name.startswith(names)):
            continue
        try:
            found.append((read_info(path), path.stat().st_mtime))
        except CheckpointError:
            continue
    # the step a file holds orders them (a copy resets mtimes); mtime only breaks ties (last.ckpt beside epoch=N)
    found.sort(key=lambda item: (item[0].step, item[1]), reverse=True)
    return [info for info, _ in found]


def newest_checkpoint(folder: str | Path, names: tuple[str, ...] = ()) -> Path | None:
    """The checkpoint in ``folder`` at the highest global step that loads, or None (see :func:`checkpoints_by_step`)."""
    ordered = checkpoints_by_step(folder, names)
    return ordered[0].path if ordered else None


def _intact_beside(path: Path, reference: CheckpointInfo | None = None) -> list[CheckpointInfo]:
    """The other checkpoints of ``path``'s run that a resume may take instead: only in the run's own
    ``checkpoints/`` directory, only files that load weights-only and hold weights of one model (the
    ``reference``'s when given, else the model the newest of them holds), the highest step first."""
    if path.parent.name != "checkpoints":
        return []  # a folder of checkpoints of several runs: a neighbour may be another model
    others = [
        info for info in checkpoints_by_step(path.parent) if info.resumable and info.path.resolve() != path.resolve()
    ]
    run_hparams = _run_hparams(path.parent.parent) if reference is None else None
    if run_hparams is not None:  # the run's own model, as its logger wrote it down: a copied-in file is no match
        others = [info for info in others if _plain(info.hparams) == run_hparams]
    reference = reference or (others[0] if others else None)
    return [info for info in others if reference is not None and info.same_model(reference)]


def _run_hparams(run_dir: Path) -> dict[str, Any] | None:
    """The model hyper-parameters a run's logger wrote at its start (``hparams.yaml``), as :func:`read_info` gives
    them; None where there is no such plain YAML file."""
    try:
        hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(hparams, dict) or not hparams:
        return None
    hparams = {k: v for k, v in hparams.items() if k not in ("_class_path", "_instantiator")}
    return _plain(hparams)


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (a checkpoint keeps tuples, YAML reads lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def resume_checkpoint(
    path: str | Path, fallback: bool = True, reference: CheckpointInfo | None = None
) -> tuple[Path, str | None]:
    """The checkpoint to load for ``path``: itself if it loads, else (``fallback``) the intact one of the same run
    and model at the highest step (:func:`_intact_beside`).

    Returns:
        The path to load, and the warning to show when it is not ``path`` (None otherwise).

    Raises:
        CheckpointError: ``path`` is no Lightning checkpoint; or it is damaged and no intact checkpoint of its run
            is beside it (or ``fallback`` is False: the message then names the intact ones).
    """
    path = Path(path)
    try:
        check_checkpoint(path)
        return path, None
    except DamagedCheckpointError as err:
        damaged = err
    intact = _intact_beside(path, reference)
    if fallback and intact:
        other = intact[0].path
        return other, (
            f"{damaged}; resuming from {other} instead, the intact checkpoint of this run at the highest step "
            f"({intact[0].step}; training since that checkpoint is done again)"
        )
    if fallback:
        where = "" if path.parent.name == "checkpoints" else " (only a run's own checkpoints/ folder is searched)"
        raise CheckpointError(
            f"{damaged}, and no intact checkpoint is beside it{where}: it was cut short while being written, or is no "
            "checkpoint; start without --ckpt_path, or give another checkpoint"
        ) from damaged
    names = ", ".join(info.path.name for info in intact[:3])
    hint = f"intact ones beside it: {names}" if intact else "none beside it loads"
    raise CheckpointError(f"{damaged}: it was cut short while being written, or is no checkpoint; {hint}") from damaged


@functools.cache
def _atomic_checkpoint_io() -> type:
    """:class:`AtomicCheckpointIO`, made at its first use: its base class imports Lightning, which the path facts
    of this module (:func:`run_dir_of`, ...) do not need."""
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.utilities import rank_zero_warn

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
            except BaseException as err:
                partial.unlink(missing_ok=True)
                if (isinstance(err, RuntimeError) and _short_write(err)) or disk_error(err) is not None:
                    raise OutputError(
                        f"cannot write the checkpoint {target} ({_short(err)}); the previous one is kept: free space, "
                        "or log to a directory you can write"
                    ) from err
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

    AtomicCheckpointIO.__module__ = __name__
    AtomicCheckpointIO.__qualname__ = "AtomicCheckpointIO"  # pickled by name: found through __getattr__ below
    return AtomicCheckpointIO


def __getattr__(name: str) -> Any:
    if name == "AtomicCheckpointIO":
        return _atomic_checkpoint_io()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _short_write(err: RuntimeError) -> bool:
    """Whether torch's zip writer failed on a write the disk did not take (it raises RuntimeError, not OSError:
    ``unexpected pos 26560 vs 26456`` on a full disk)."""
    text = str(err)
    return "PytorchStreamWriter" in text or "unexpected pos" in text or "file write failed" in text


def _is_local(path: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem
    from lightning.fabric.utilities.cloud_io import get_filesystem

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
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = _atomic_checkpoint_io()()


__all__ = [  # noqa: F822 (AtomicCheckpointIO is made at its first use: __getattr__)
    "AtomicCheckpointIO",
    "CheckpointError",
    "CheckpointInfo",
    "DamagedCheckpointError",
    "check_checkpoint",
    "checkpoints_by_step",
    "newest_checkpoint",
    "read_info",
    "run_dir_of",
    "install_atomic_checkpoint_io",
    "resume_checkpoint",
]
