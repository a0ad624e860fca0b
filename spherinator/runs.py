"""One way from a run to its objects: a run directory, a checkpoint or an ONNX export directory, and its config,
checkpoints, model and DataModule.

A run directory is what ``spherinator fit`` logs into (``runs/<name>/version_N``) or a ``spherinator-submit``
task: ``config.yaml`` (the composed config), ``checkpoints/*.ckpt`` and, once exported, ``onnx/``. Checkpoints are
ordered by the global step they hold, not by their files' times (a ``cp -r`` of a run resets those); the file
facts (:func:`run_dir_of`, :func:`newest_checkpoint`, the resume fallback) live in :mod:`spherinator.checkpoints`,
below the CLI, and are re-exported here.

The model and DataModule of a checkpoint are built by :class:`~spherinator.cli.SpherinatorCLI` with ``run=False``,
composed from ``-c`` files and overrides exactly as ``spherinator fit`` composes them; the model's settings come from
the checkpoint's hyper-parameters, and extra per-row columns are asked for in the composed config.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spherinator.checkpoints import (
    CheckpointError,
    checkpoints_by_step,
    newest_checkpoint,
    read_info,
    resume_checkpoint,
    run_dir_of,
)
from spherinator.errors import ConfigError

CONFIG_NAME = "config.yaml"
# What spherinator export writes beside its graphs (spherinator.export.REPORT_NAME; named here too, so that reading
# a run imports no torch: tests/test_atlas.py checks that both agree).
EXPORT_REPORT = "export_report.json"
# The checkpoints a requeued task resumes from: saved on Slurm's signal, or the last one of an epoch.
RESUMABLE = ("requeue", "last")


@dataclass(frozen=True)
class Run:
    """What was found at a path given as a run (see :func:`open_run`).

    Attributes:
        path: The path given.
        run_dir: The run directory (None for an ONNX export directory of its own).
        checkpoint: The checkpoint given, else the run's (:func:`run_checkpoint`), if any.
        onnx_dir: The ONNX export directory (``decoder.onnx`` in it), if any.
        config: The run's ``config.yaml``, if any.
    """

    path: Path
    run_dir: Path | None
    checkpoint: Path | None
    onnx_dir: Path | None
    config: Path | None


def open_run(path: str | Path) -> Run:
    """The run of a ``.ckpt`` file, a run directory or an ONNX export directory; nothing is loaded yet.

    A run directory's checkpoint is the one its ONNX export came from if that is still there, else the intact one
    at the highest step.
    """
    path = Path(path)
    if path.is_file():
        run_dir: Path | None = run_dir_of(path)
        checkpoint, onnx_dir = path, None
    elif (path / "decoder.onnx").is_file():
        run_dir, checkpoint, onnx_dir = None, None, path
    else:
        run_dir = path
        onnx_dir = path / "onnx" if (path / "onnx" / "decoder.onnx").is_file() else None
        checkpoint = run_checkpoint(path, onnx_dir)
    config = run_dir / CONFIG_NAME if run_dir is not None and (run_dir / CONFIG_NAME).is_file() else None
    return Run(path, run_dir, checkpoint, onnx_dir, config)


def run_checkpoint(run_dir: str | Path, onnx_dir: Path | None = None) -> Path | None:
    """The checkpoint an ONNX export of the run came from if it is still there, else the intact one of
    ``checkpoints/`` at the highest step."""
    if onnx_dir is not None:
        try:
            exported = Path(json.loads((onnx_dir / EXPORT_REPORT).read_text())["checkpoint"])
        except (OSError, ValueError, KeyError, TypeError):
            exported = None
        if exported is not None and exported.is_file():
            return exported
    return newest_checkpoint(Path(run_dir) / "checkpoints")


def resume_point(run_dir: str | Path) -> tuple[Path | None, Path | None]:
    """The checkpoint a task of ``run_dir`` resumes from (``requeue.ckpt`` or ``last.ckpt``, the one at the higher
    step), and the damaged one passed over, if any.

    A ``requeue``/``last`` file that does not load and is newer than every intact one (a kill while it was written,
    from before checkpoints were written atomically) is passed over: the intact checkpoint of the same run and model
    at the highest step is used (:func:`~spherinator.checkpoints.resume_checkpoint`).
    """
    folder = Path(run_dir) / "checkpoints"
    files = [p for p in folder.glob("*.ckpt") if p.is_file() and p.name.startswith(RESUMABLE)]
    if not files:
        return None, None
    intact = [info for info in checkpoints_by_step(folder, RESUMABLE) if info.resumable]
    loaded = {info.path for info in intact}
    newest_intact = max((p.stat().st_mtime for p in loaded), default=float("-inf"))
    damaged = [p for p in files if p not in loaded and p.stat().st_mtime >= newest_intact]
    if not damaged:
        return intact[0].path, None
    newest = max(damaged, key=lambda p: p.stat().st_mtime)
    chosen, _ = resume_checkpoint(newest)
    return chosen, newest


def build(
    cli_args: Sequence[str],
    checkpoint: str | Path,
    columns: Sequence[str] | Callable[[Any], list[str] | None] = (),
) -> tuple[Any, Any]:
    """The checkpoint's model (weights loaded, eval mode) and the DataModule of the configs ``cli_args``, composed
    as ``spherinator fit`` composes them (the model's settings from the checkpoint).

    Args:
        cli_args: ``-c`` files and overrides, as for ``spherinator fit`` (no subcommand).
        checkpoint: A checkpoint ``spherinator fit`` wrote.
        columns: Per-row columns the batches should hold beside the model input (they then are dicts); or a function
            of the composed ``data`` section giving the column names to load (None: leave them as they are).

    Raises:
        CheckpointError: the checkpoint does not load weights-only or holds no weights.
        ConfigError: columns asked of data other than :class:`spherinator.data.DataModule`; any error of the configs.
    """
    import torch

    from spherinator.cli import SpherinatorCLI

    info = read_info(checkpoint)

    class _FromCheckpoint(SpherinatorCLI):
        def before_instantiate_classes(self) -> None:
            if info.class_path:  # as LightningCLI does for --ckpt_path: the checkpoint's model settings win
                model = {"class_path": info.class_path, "dict_kwargs": info.hparams}
                self.config = self.parser.parse_object({"model": model}, self.config)
            self._model_from = str(checkpoint)
            _ask_for_columns(self.config, columns)
            super().before_instantiate_classes()

    cli = _FromCheckpoint(
        args=list(cli_args), run=False, parser_kwargs={"exit_on_error": False}, save_config_callback=None
    )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    cli.model.load_state_dict(state)  # the model's pre-hooks fill keys of older checkpoints (the centred head)
    return cli.model.eval(), cli.datamodule


def _ask_for_columns(config: Any, columns: Sequence[str] | Callable[[Any], list[str] | None]) -> None:
    """Set the ``data`` section's ``columns`` (the model input first) and ``return_dict`` before it is built."""
    data = config.get("data")
    wanted = columns(data) if callable(columns) else list(columns)
    if not wanted:
        return
    if data is None or data.get("class_path") not in ("spherinator.data.DataModule",
                                                       "spherinator.data.datamodule.DataModule"):  # fmt: skip
        found = data.get("class_path") if data is not None else None
        raise ConfigError(
            f"per-row columns ({', '.join(wanted)}) need the data to be spherinator.data.DataModule, got {found}; "
            "leave them out or use DataModule"
        )
    have = data.init_args.get("columns")
    if have is not None:
        names = [c if isinstance(c, str) else getattr(c, "name", None) for c in have]
        data.init_args.columns = list(have) + [name for name in wanted if name not in names]
    elif callable(columns):
        data.init_args.columns = wanted  # the function named every column to load
    data.init_args.return_dict = True


__all__ = [
    "CONFIG_NAME",
    "EXPORT_REPORT",
    "CheckpointError",
    "Run",
    "build",
    "newest_checkpoint",
    "open_run",
    "resume_point",
    "run_checkpoint",
    "run_dir_of",
]
