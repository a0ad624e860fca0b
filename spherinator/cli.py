"""The ``spherinator`` command: LightningCLI with layered YAML, shape inference and embedding output.

``spherinator fit|validate|test|predict -c a.yaml -c b.yaml --model.init_args.z_dim 16`` trains and evaluates;
``spherinator export ...`` writes ONNX files (see :mod:`spherinator.export`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from spherinator.data.layout import DataError
from spherinator.shapes import ConfigError, check_model_matches_data, resolve_config

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
        given = self.config[subcommand].get("model") if subcommand else None
        given = given.clone() if given is not None else None
        super()._parse_ckpt_path()
        if given is None:
            return
        used = self.config[subcommand].get("model")
        replaced = [
            f"model.{key}: {value!r} -> {used[key]!r}"
            for key, value in given.items()
            if value is not None and key in used and used[key] != value
        ]
        if replaced:
            rank_zero_warn(
                "the checkpoint's model hyperparameters replace these given values (resume rebuilds the model it "
                "saved; start a new run without --ckpt_path to change them): " + "; ".join(replaced)
            )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._data_shape = resolve_config(config)

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
            content = yaml.safe_load(Path(value).read_text())
        except OSError:  # not a file: config text given inline (or a missing file, which the parser reports)
            continue
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
    except (ConfigError, DataError) as err:  # bad input: its message says what to change, no traceback needed
        print(f"spherinator: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
