"""The ``spherinator`` command: LightningCLI with layered YAML, shape inference and embedding output.

``spherinator fit|validate|test|predict -c a.yaml -c b.yaml --model.init_args.z_dim 16`` trains and evaluates;
``spherinator export ...`` writes ONNX files (see :mod:`spherinator.export`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from spherinator.data.layout import DataError
from spherinator.shapes import ConfigError, check_model_matches_data, resolve_config

# --ckpt_path values that name no file: Lightning looks the checkpoint up itself
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "spherinator"},
}


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
        trainer_defaults = {"logger": DEFAULT_LOGGER, **kwargs.pop("trainer_defaults", {})}
        super().__init__(
            LightningModule, LightningDataModule, args=args, run=run, trainer_defaults=trainer_defaults, **kwargs
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, dict | Namespace):
            super().parse_arguments(parser, args)
            return
        argv = sys.argv[1:] if args is None else list(args)
        self.config = parser.parse_args(append_callbacks_across_configs(argv))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI lets the checkpoint's model hyperparameters replace the model settings of the command line
        # and config files. That is right for resuming, but silent; say which given values were replaced.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        given = self.config[subcommand].get("model") if subcommand else None
        given = given.clone() if given is not None else None
        named = ckpt_path in _LIGHTNING_CKPT_NAMES or "://" in str(ckpt_path)
        is_file = bool(ckpt_path) and Path(ckpt_path).is_file()
        if ckpt_path and not named and not is_file:
            raise ConfigError(
                f"--ckpt_path {ckpt_path!r} is no file; give a checkpoint such as "
                f"runs/<name>/version_<n>/checkpoints/last.ckpt"
            )
        try:
            super()._parse_ckpt_path()
        except Exception as err:
            raise ConfigError(
                f"--ckpt_path {ckpt_path!r} cannot be read as a Lightning checkpoint ({type(err).__name__}: {err})"
            ) from err
        if is_file:
            self._model_from = ckpt_path
        if given is None:
            return
        used = self.config[subcommand].get("model")
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

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._data_shape = resolve_config(config, model_from=getattr(self, "_model_from", None))

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


def _same_setting(a: Any, b: Any) -> bool:
    """Equal settings, also when one names a class (``torch.nn.MSELoss``) and the other is that class given as
    ``{class_path, init_args}`` with default arguments (how a checkpoint's hyperparameters come back)."""
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


def append_callbacks_across_configs(argv: list[str]) -> list[str]:
    """Make each ``-c`` file's ``trainer.callbacks`` add to those of earlier files instead of replacing them.

    Callbacks come as overlay files (``-c callback_best_model.yaml -c callback_log_reconstructions.yaml``), each
    writing ``trainer: callbacks: [...]``; plain YAML composition would keep only the last file's list. A file
    that has such a list is passed on as its text with the key written ``callbacks+``, jsonargparse's append.
    """
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("-c", "--config") and i + 1 < len(out):
            index, value = i + 1, out[i + 1]
        elif arg.startswith("--config="):
            index, value = i, arg.split("=", 1)[1]
        else:
            continue
        try:
            text = Path(value).read_text()
        except OSError:  # not a file: config text given inline (or a missing file, which the parser reports)
            continue
        except UnicodeDecodeError as err:
            raise ConfigError(f"-c {value}: not a text file ({err}); give a YAML config file") from err
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"-c {value}: not valid YAML: {err}".replace("<unicode string>", value)) from err
        trainer = content.get("trainer") if isinstance(content, dict) else None
        if isinstance(trainer, dict) and isinstance(trainer.get("callbacks"), list):
            trainer["callbacks+"] = trainer.pop("callbacks")
            text = yaml.safe_dump(content, sort_keys=False)
            out[index] = text if index == i + 1 else f"--config={text}"
    return out


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``spherinator`` command."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "export":
        from spherinator.export import main as export_main

        export_main(argv[1:])
        return
    try:
        SpherinatorCLI(args=args)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"spherinator: error: {cause}", file=sys.stderr)  # its message says what to change
        raise SystemExit(2) from None


def user_error(err: BaseException) -> BaseException | None:
    """The error in ``err``'s chain that bad input caused, else None (a bug: keep the traceback).

    ConfigError and DataError are bad input by definition. A class that refuses its arguments while jsonargparse
    builds it (a model's ``ValueError("z_dim must be >= 2 ...")``) reaches us wrapped in jsonargparse's
    "Does not validate against any of the Union subtypes"; the refusal itself is the message to show.
    """
    wrapped = False
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConfigError | DataError):
            return err
        frames = traceback.extract_tb(err.__traceback__)
        in_jsonargparse = bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename
        if wrapped and not in_jsonargparse and isinstance(err, ValueError | TypeError | OSError):
            return err
        wrapped = wrapped or in_jsonargparse
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
