"""``spherinator fit|validate|test|predict``: the LightningCLI subclass :class:`SpherinatorCLI` and :func:`main`.

``spherinator fit -c a.yaml -c b.yaml --model.init_args.z_dim 16`` trains. How ``-c`` files are read and layered
and how ``--print_config`` prints is :mod:`spherinator.config`; how bad input becomes one line is
:mod:`spherinator.errors`. The ``spherinator`` command itself is :mod:`spherinator.commands`: it runs the other
commands (``export``, ``evaluate``, ``atlas``, ``examples``), answers ``--help`` and ``--version`` without importing
this module, and hands the Lightning commands to :func:`main`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from spherinator.checkpoints import (
    DamagedCheckpointError,
    install_atomic_checkpoint_io,
    read_info,
    resume_checkpoint,
    run_dir_of,
)
from spherinator.checkpoints import newest_checkpoint as newest_checkpoint_in
from spherinator.config import (
    DEFAULT_LOGGER,
    PRINT_CONFIG,
    append_callbacks_across_configs,
    check_optimizer,
    checkpoint_example,
    default_logger_under_root_dir,
    drop_repeated_callbacks,
    logger_folder,
    logger_folders,
    print_incomplete_config,
    print_resolved_config,
    use_strict_yaml,
)
from spherinator.errors import ConfigError, DataError, one_line_errors, user_error  # noqa: F401 (user_error: re-exported)
from spherinator.shapes import check_model_matches_data, resolve_config

# Subcommands that evaluate a trained model: without --ckpt_path they would run randomly initialised weights.
_EVALUATING = ("validate", "test", "predict")
# --ckpt_path values that name no file: Lightning looks the checkpoint up itself
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


class RunConfigCallback(SaveConfigCallback):
    """Lightning's SaveConfigCallback, but with W&B as the (first) logger the run's ``config.yaml`` goes into the W&B
    run's own files folder, which W&B attaches to the run: Lightning would write it to the logger's ``save_dir``,
    shared by every run there (each overwriting the one before) and not part of any W&B run."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.save_to_log_dir = not _logs_to_wandb(trainer)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not _logs_to_wandb(trainer):
            return
        run = trainer.loggers[0].experiment  # rank zero only: its W&B run
        path = Path(run.dir) / self.config_filename  # files in the run's folder are uploaded with it (also offline)
        self.parser.save(self.config, str(path), skip_unset=False, overwrite=True, multifile=self.multifile)
        run.save(str(path), base_path=run.dir, policy="now")


def check_logger_packages(config: Namespace) -> None:
    """Refuse, in one line, a ``WandbLogger`` when ``wandb`` is not installed (Lightning's error is a traceback)."""
    loggers = config.get("trainer.logger") if isinstance(config.get("trainer"), Namespace) else None
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = str(logger.get("class_path", "")) if isinstance(logger, Namespace) else ""
        if class_path.rsplit(".", 1)[-1] == "WandbLogger" and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                f"trainer.logger {class_path} needs the wandb package, which is not installed: pip install "
                "'spherinator[wandb]' (or leave trainer.logger out to log to TensorBoard)"
            )


def _logs_to_wandb(trainer: Trainer) -> bool:
    # Trainer.log_dir is the first logger's; W&B's is its save_dir, which every run shares.
    return bool(trainer.loggers) and isinstance(trainer.loggers[0], WandbLogger)


class SpherinatorCLI(LightningCLI):
    """LightningCLI for spherinator models and data.

    Any LightningModule / LightningDataModule can be named by ``class_path``. Before the classes are built, values
    that are one fact written in several places are filled in from each other (see :mod:`spherinator.shapes`):
    the decoder's latent size from ``z_dim``, ``encoder_out_dim`` from the encoder, and the input shape from the
    data. The filled-in values are part of the saved ``config.yaml`` and of the checkpoint.
    """

    def __init__(self, args: list[str] | dict[str, Any] | None = None, run: bool = True, **kwargs: Any) -> None:
        # An `optimizer:` in the config replaces the model's own configure_optimizers: that is what it is for.
        warnings.filterwarnings("ignore", message=r"`\w+\.configure_optimizers` will be overridden by")
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        trainer_defaults = {"logger": DEFAULT_LOGGER, **kwargs.pop("trainer_defaults", {})}
        super().__init__(
            LightningModule, LightningDataModule, args=args, run=run, trainer_defaults=trainer_defaults, **kwargs
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Config files are read strictly (a key given twice, z_dim: 010): spherinator.config.check_yaml.
        kwargs.setdefault("parser_mode", use_strict_yaml())
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # -c files add their callbacks to each other's; --print_config prints the config completed as it runs.
        if isinstance(args, dict | Namespace):
            super().parse_arguments(parser, args)
            return
        argv = append_callbacks_across_configs(sys.argv[1:] if args is None else list(args))
        printing = [arg for arg in argv if PRINT_CONFIG.fullmatch(arg)]
        try:
            config = parser.parse_args([arg for arg in argv if not PRINT_CONFIG.fullmatch(arg)])
        except ArgumentError as err:
            if not printing:
                raise
            print_incomplete_config(parser, argv, err)  # exits
        if printing:
            print_resolved_config(parser, config, argv, printing[-1])  # exits
        section = config[config.subcommand] if config.get("subcommand") else config
        default_logger_under_root_dir(section)
        drop_repeated_callbacks(section)
        self.config = config
        self._check_ckpt_path()

    def _check_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before Lightning reads the checkpoint's hyper-parameters from it, and rewrite it
        where a damaged file is resumed past: ``fit`` takes the intact checkpoint of the same run at the highest
        step; validate/test/predict stop, naming the intact ones (:func:`~spherinator.checkpoints.resume_checkpoint`).

        Called at the end of :meth:`parse_arguments`: LightningCLI loads the file right after it, weights-only, and
        lets the checkpoint's model hyperparameters replace those given (:meth:`_warn_replaced_model` says which).
        """
        subcommand = self.config.get("subcommand")
        section = self.config[subcommand] if subcommand else None
        ckpt_path = section.get("ckpt_path") if section is not None else None
        if not ckpt_path:
            return
        model = section.get("model")
        self._given_model = model.clone() if isinstance(model, Namespace) else None
        if ckpt_path in _LIGHTNING_CKPT_NAMES:
            ckpt_path = _named_checkpoint(str(ckpt_path), subcommand, section)
        if ckpt_path is None or "://" in str(ckpt_path):
            return  # Lightning looks the checkpoint up itself (a damaged one is loaded past by AtomicCheckpointIO)
        if not Path(ckpt_path).is_file():
            raise ConfigError(
                f"--ckpt_path {ckpt_path!r} is no file; give a checkpoint such as "
                f"runs/<name>/version_<n>/checkpoints/last.ckpt"
            )
        chosen, warning = resume_checkpoint(ckpt_path, fallback=subcommand == "fit")
        if warning:
            rank_zero_warn(warning)
        try:
            read_info(chosen)  # what LightningCLI is about to do: a weights-only load
        except DamagedCheckpointError as err:
            raise ConfigError(
                f"--ckpt_path {str(chosen)!r} cannot be read as a Lightning checkpoint ({err}); give a checkpoint "
                "that `spherinator fit` wrote (runs/<name>/version_<n>/checkpoints/last.ckpt)"
            ) from err
        section.ckpt_path = str(chosen)
        self._model_from = str(chosen)

    def _warn_replaced_model(self) -> None:
        """Say which given model settings the checkpoint's hyperparameters replaced (right for resuming, but
        silent in LightningCLI)."""
        given = getattr(self, "_given_model", None)
        used = self.config[self.subcommand].get("model") if self.subcommand else None
        if given is None or used is None:
            return
        replaced = [
            f"model.{key}: {value!r} -> {used[key]!r}"
            for key, value in given.items()
            if value is not None and key in used and not _same_setting(used[key], value)
        ]
        if replaced:
            rank_zero_warn(
                "the checkpoint's model hyperparameters replace these given values (resume rebuilds the model it "
                "saved; start a new run without --ckpt_path to change them): " + "; ".join(replaced)
            )

    def after_instantiate_classes(self) -> None:
        # Checkpoints are written atomically and a damaged one is loaded past (spherinator.checkpoints).
        if getattr(self, "trainer", None) is not None:
            install_atomic_checkpoint_io(self.trainer)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._warn_replaced_model()
        if self.subcommand in _EVALUATING and not config.get("ckpt_path"):
            raise ConfigError(_no_checkpoint_message(self.subcommand, config))
        check_optimizer(config)
        check_logger_packages(config)
        self._data_shape = resolve_config(config, model_from=getattr(self, "_model_from", None))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from spherinator.callbacks.progress import progress_bar_for_logs

        # Progress into a file (a Slurm log) is one line per epoch, unless the config chose its bar.
        section = self.config_init.get(f"{self.subcommand}.trainer" if self.subcommand else "trainer")
        callbacks = progress_bar_for_logs({**(section or {}), **kwargs}, interactive=sys.stdout.isatty())
        if callbacks is not None:
            kwargs["callbacks"] = callbacks
        # The Trainer is built from the trainer: section directly, not by jsonargparse: what it refuses is the
        # config's fault (accelerator: gpux).
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError, MisconfigurationException, ImportError) as err:  # accelerator: tpu, no XLA
            raise ConfigError(f"trainer: {err}") from err

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        check_model_matches_data(self.model, self.datamodule, getattr(self, "_data_shape", None))

    def predict(self, **kwargs: Any) -> None:
        # Embeddings stream to Parquet (EmbeddingWriter); keeping them all in memory too helps nobody.
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)

    def before_predict(self) -> None:
        from spherinator.callbacks.embeddings import EmbeddingWriter

        if not any(isinstance(cb, EmbeddingWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(EmbeddingWriter())


def _named_checkpoint(name: str, subcommand: str, config: Namespace) -> Path | None:
    """The file ``--ckpt_path last|best|hpc|registry`` names, or None where Lightning is left to look it up.

    Lightning looks ``last`` up in the ModelCheckpoint's folder of the new run (a new ``version_N``, empty), so it
    never finds the run before: validate/test/predict would run a randomly initialised model and fit start afresh,
    each after a warning. ``last`` is therefore the newest checkpoint of the latest run under the logger's folder
    (:func:`newest_checkpoint`); ``best`` is known only inside the fit that saved it.

    Raises:
        ConfigError: no checkpoint of that name is there (for ``fit --ckpt_path last`` Lightning starts afresh).
    """
    newest = newest_checkpoint(config)
    example = f"{newest}" if newest is not None else checkpoint_example(config)
    if name == "last":
        if _fixed_checkpoint_dir(config):
            return None  # a ModelCheckpoint with its own dirpath: Lightning finds last.ckpt there
        if newest is not None:
            rank_zero_info(f"--ckpt_path last: {newest} (the newest checkpoint of the latest run)")
            return newest
        if subcommand == "fit":
            return None  # Lightning starts a new run, with its warning: `last` may be set before the first fit
        raise ConfigError(
            f"--ckpt_path last: no checkpoint found under the logger's folder {logger_folder(config)}; {subcommand} "
            f"would run a randomly initialised model: give the checkpoint file, e.g. {example}"
        )
    if name == "best":
        raise ConfigError(
            "--ckpt_path best names the best checkpoint of a fit run in this same command, which a new command has "
            f"not: give the checkpoint file, e.g. --ckpt_path {example}"
        )
    if name == "hpc":
        root = Path(config.get("trainer.default_root_dir") or ".")
        if not any(root.glob("hpc_ckpt_*.ckpt")):
            raise ConfigError(
                f"--ckpt_path hpc: no hpc_ckpt_<n>.ckpt in {root} (Lightning's Slurm requeue checkpoints); give the "
                f"checkpoint file, e.g. --ckpt_path {example}"
            )
        return None
    if importlib.util.find_spec("litmodels") is None:
        raise ConfigError(
            f"--ckpt_path {name} needs the litmodels package (Lightning's model registry), which is not installed; "
            f"give the checkpoint file, e.g. --ckpt_path {example}"
        )
    return None


def _fixed_checkpoint_dir(config: Namespace) -> bool:
    """Whether a ModelCheckpoint of the config writes into a folder of its own (``dirpath``), not the run's."""
    callbacks = config.get("trainer.callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        named = isinstance(callback, Namespace) and "ModelCheckpoint" in str(callback.get("class_path"))
        if named and callback.get("init_args.dirpath"):
            return True
    return False


def _no_checkpoint_message(subcommand: str, config: Namespace) -> str:
    newest = newest_checkpoint(config)
    if newest is not None:
        example = f"{newest} (the newest checkpoint under {run_dir_of(newest).parent})"
    else:
        example = f"{checkpoint_example(config, 'last.ckpt')} (what spherinator fit wrote)"
    return (
        f"{subcommand} without --ckpt_path would run a randomly initialised model; give the trained one, e.g. "
        f"--ckpt_path {example}"
    )


def newest_checkpoint(config: Namespace) -> Path | None:
    """The newest checkpoint of the latest run under the log directory of the config's logger (``save_dir/name``):
    of the run whose ``checkpoints/`` changed last, the one at the highest step that loads, if any."""
    found = [p for root in logger_folders(config) for p in root.glob("*/checkpoints") if p.is_dir()]
    for folder in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        newest = newest_checkpoint_in(folder)
        if newest is not None:
            return newest
    return None


def _same_setting(a: Any, b: Any) -> bool:
    """Equal settings, also when one names a class (``torch.nn.MSELoss``) and the other is that class given as
    ``{class_path, init_args}`` with default arguments (how a checkpoint's hyperparameters come back)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b or _as_class_and_args(a) == _as_class_and_args(b)


def _as_class_and_args(value: Any) -> Any:
    if isinstance(value, type):
        return value, {}
    if not (isinstance(value, Namespace) and isinstance(value.get("class_path"), str)):
        return value
    module, _, name = value.class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    except (ImportError, AttributeError, ValueError, TypeError):
        return value
    init_args = value.get("init_args")
    args = init_args.as_dict() if isinstance(init_args, Namespace) else {}
    return cls, {k: v for k, v in args.items() if k not in defaults or defaults[k] != v}


def main(args: list[str] | None = None) -> None:
    """``spherinator fit|validate|test|predict ...`` (the LightningCLI), with bad input reported in one line.

    The ``spherinator`` command itself (:func:`spherinator.commands.main`) also runs ``export``, ``evaluate``,
    ``atlas`` and ``examples``, and hands the Lightning commands to this.
    """
    argv = sys.argv[1:] if args is None else list(args)
    with one_line_errors("spherinator", argv):
        # Parse errors are raised, not printed after ~50 lines of usage: the one line they become says what matters.
        SpherinatorCLI(args=argv, parser_kwargs={"exit_on_error": False})


if __name__ == "__main__":
    main()
