"""``spherinator fit|validate|test|predict``: LightningCLI with layered YAML, shape inference and embedding output.

``spherinator fit -c a.yaml -c b.yaml --model.init_args.z_dim 16`` trains; :mod:`spherinator.commands` dispatches
the other commands (``export``, ``evaluate``) and answers ``--help`` and ``--version`` without importing this module.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import os
import re
import sys
import traceback
import warnings
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from spherinator.checkpoints import (
    DamagedCheckpointError,
    install_atomic_checkpoint_io,
    read_info,
    resume_checkpoint,
    run_dir_of,
)
from spherinator.checkpoints import newest_checkpoint as newest_checkpoint_in
from spherinator.data.layout import DataError
from spherinator.shapes import ConfigError, check_model_matches_data, resolve_config

# Subcommands that evaluate a trained model: without --ckpt_path they would run randomly initialised weights.
_EVALUATING = ("validate", "test", "predict")
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
        argv = append_callbacks_across_configs(sys.argv[1:] if args is None else list(args))
        printing = [arg for arg in argv if _PRINT_CONFIG.fullmatch(arg)]
        config = parser.parse_args([arg for arg in argv if not _PRINT_CONFIG.fullmatch(arg)])
        if printing:
            print_resolved_config(parser, config, argv, printing[-1])  # exits
        drop_repeated_callbacks(config[config.subcommand] if config.get("subcommand") else config)
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
        if ckpt_path in _LIGHTNING_CKPT_NAMES or "://" in str(ckpt_path):
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
        except (ValueError, TypeError, MisconfigurationException) as err:
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


def _no_checkpoint_message(subcommand: str, config: Namespace) -> str:
    newest = newest_checkpoint(config)
    if newest is not None:
        example = f"{newest} (the newest checkpoint under {run_dir_of(newest).parent})"
    else:
        example = "runs/<name>/version_<n>/checkpoints/last.ckpt (what spherinator fit wrote)"
    return (
        f"{subcommand} without --ckpt_path would run a randomly initialised model; give the trained one, e.g. "
        f"--ckpt_path {example}"
    )


def newest_checkpoint(config: Namespace) -> Path | None:
    """The newest checkpoint of the latest run under the log directory of the config's logger (``save_dir/name``):
    of the run whose ``checkpoints/`` changed last, the one at the highest step that loads, if any."""
    loggers = config.get("trainer.logger")
    found: list[Path] = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        args = logger.get("init_args") if isinstance(logger, Namespace) else None
        if not isinstance(args, Namespace) or not args.get("save_dir"):
            continue
        root = Path(args.save_dir) / str(args.get("name") or "")
        found += [p for p in root.glob("*/checkpoints") if p.is_dir()]
    for folder in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        newest = newest_checkpoint_in(folder)
        if newest is not None:
            return newest
    return None


def check_optimizer(config: Namespace) -> None:
    """Build the config's optimizer (and lr_scheduler) on a stand-in parameter, so that a value they refuse (a
    negative lr) or cannot train with (an infinite lr) is reported before anything else is built."""
    import torch
    from lightning.pytorch.cli import instantiate_class

    built: Any = [torch.nn.Parameter(torch.zeros(1))]  # what the next one is built on: parameters, then optimizer
    for key in ("optimizer", "lr_scheduler"):
        section = config.get(key)
        if not (isinstance(section, Namespace) and isinstance(section.get("class_path"), str)):
            return  # no optimizer: the model's configure_optimizers makes it, and any scheduler with it
        try:
            built = instantiate_class(built, section.as_dict())
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{key} {section.class_path} refuses its init_args ({err}): fix {key}.init_args") from err
        if key == "optimizer":
            lrs = [g.get("lr") for g in built.param_groups]
            bad = [lr for lr in lrs if isinstance(lr, float) and not math.isfinite(lr)]
            if bad:
                raise ConfigError(f"optimizer.init_args.lr is {bad[0]}: give a finite learning rate, e.g. lr: 0.001")


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


_PRINT_CONFIG = re.compile(r"--print_config(=.*)?")


def drop_repeated_callbacks(config: Namespace) -> None:
    """Keep one of each identical callback (same class_path and init_args) in ``config``'s ``trainer.callbacks``.

    Callbacks of ``-c`` files are appended (:func:`append_callbacks_across_configs`), so a run's saved
    ``config.yaml`` layered with the overlays it was made from would list each of their callbacks twice: two
    ModelCheckpoints writing the same files. Callbacks that differ in any argument are all kept, but for the
    classes of :data:`ONE_PER_RUN`, of which the last one listed is kept.
    """
    callbacks = config.get("trainer.callbacks") if isinstance(config.get("trainer"), Namespace) else None
    if not isinstance(callbacks, list):
        return
    kept: list[Any] = []
    for callback in callbacks:
        if not any(callback == other for other in kept):
            kept.append(callback)
    for class_path in ONE_PER_RUN:  # the later one replaces the earlier, said on stderr
        listed = [c for c in kept if isinstance(c, Namespace) and c.get("class_path") == class_path]
        for earlier in listed[:-1]:
            kept.remove(earlier)
            later_args, earlier_args = _init_args(listed[-1]), _init_args(earlier)
            differ = [k for k in {**earlier_args, **later_args} if later_args.get(k) != earlier_args.get(k)]
            print(
                f"spherinator: trainer.callbacks lists {class_path.rsplit('.', 1)[-1]} more than once; the later one "
                f"({', '.join(f'{k}: {later_args.get(k)}' for k in differ)}) replaces the earlier "
                f"({', '.join(f'{k}: {earlier_args.get(k)}' for k in differ)})",
                file=sys.stderr,
            )
    if len(kept) < len(callbacks):
        config["trainer.callbacks"] = kept


# Stateful callbacks whose state does not depend on their arguments: Lightning refuses two of them in one trainer
# ("Found more than one stateful callback"), and every model file of experiments/ brings its own SphereQuality.
ONE_PER_RUN = ("spherinator.callbacks.SphereQuality",)


def _init_args(callback: Namespace) -> dict[str, Any]:
    init_args = callback.get("init_args")
    return init_args.as_dict() if isinstance(init_args, Namespace) else dict(init_args or {})


def print_resolved_config(parser: LightningArgumentParser, config: Namespace, argv: list[str], flag: str) -> None:
    """``--print_config`` of the config that runs: with the sizes :func:`resolve_config` infers (the data's sample
    shape among them) and repeated callbacks dropped, printed by jsonargparse as usual.

    jsonargparse prints while it parses, before those values are known; so the config is parsed once without the
    flag, completed, and parsed again with the flag and the completed values as overrides.
    """
    subcommand = config.get("subcommand")
    section = config[subcommand] if subcommand else config
    before = _flat(parser, config, subcommand)
    drop_repeated_callbacks(section)
    try:
        resolve_config(section)
    except (ConfigError, DataError, OSError) as err:  # print what is known; the run itself would stop here
        print(f"spherinator: the sizes taken from the data are left null: {err}", file=sys.stderr)
    after = _flat(parser, config, subcommand)
    overrides = [f"--{key}={json.dumps(value)}" for key, value in after.items() if before.get(key) != value]
    argv = [arg for arg in argv if not _PRINT_CONFIG.fullmatch(arg)]
    parser.parse_args([*argv, *overrides, flag])  # prints and exits
    raise AssertionError("jsonargparse did not exit after --print_config")


def _flat(parser: LightningArgumentParser, config: Namespace, subcommand: str | None) -> dict[str, Any]:
    """The config as plain values (as jsonargparse dumps it), keyed by dotted path; lists are values."""
    dumped = yaml.safe_load(parser.dump(config, skip_validation=True))
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    walk(dumped.get(subcommand, {}) if subcommand else dumped, "")
    return flat


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
        if content is None:
            raise ConfigError(
                f"-c {value} is empty (or holds only comments): give settings in it, e.g. 'trainer: {{max_epochs: "
                "10}', or leave that -c out"
            )
        if not isinstance(content, dict):
            raise ConfigError(
                f"-c {value} holds a YAML {type(content).__name__}, not settings: a config file maps sections "
                "(model:, data:, trainer:, optimizer:) to their values"
            )
        trainer = content.get("trainer")
        if isinstance(trainer, dict) and isinstance(trainer.get("callbacks"), list):
            trainer["callbacks+"] = trainer.pop("callbacks")
            text = yaml.safe_dump(content, sort_keys=False)
            out[index] = text if index == i + 1 else f"--config={text}"
    return out


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``spherinator`` command (see :mod:`spherinator.commands`)."""
    from spherinator.commands import main as commands_main

    commands_main(args)


def lightning_main(argv: list[str]) -> None:
    """``spherinator fit|validate|test|predict ...``: the LightningCLI, with bad input reported in one line."""
    with one_line_errors("spherinator", argv):
        # Parse errors are raised, not printed after ~50 lines of usage: the one line they become says what matters.
        SpherinatorCLI(args=argv, parser_kwargs={"exit_on_error": False})


@contextmanager
def one_line_errors(prog: str, argv: list[str]) -> Iterator[None]:
    """Bad input (a parse error, or an error :func:`user_error` finds) ends in one line ``PROG: error: ...`` and
    exit status 2; any other error is a bug and keeps its traceback."""
    try:
        yield
    except ArgumentError as err:
        print(f"{prog}: error: {parse_error_line(err, argv)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"{prog}: error: {cause}", file=sys.stderr)  # its message says what to change
        raise SystemExit(2) from None


_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_NOT_ACCEPTED_BY_SUBCOMMAND = re.compile(r"^Subcommand '\w+' does not accept option '([^']+)'")


def parse_error_line(err: ArgumentError, argv: list[str]) -> str:
    """jsonargparse's error as one line: where in the config (``model.init_args.beta``), the innermost reason,
    and a hint to ``--help``.

    jsonargparse nests its message one level per key and class (``Parser key "model": ... Problem with given
    class_path ...: Parser key "beta": Expected a <class 'float'>. Got value: nan``), each level the cause of
    the one above; the path is read off that chain.
    """
    chain: list[BaseException] = []
    link: BaseException | None = err
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    path: list[str] = []
    class_path = None  # the innermost class named
    in_list = False  # the innermost key holds a list of classes (cnn_layers)
    for link in chain:
        lines = [line.strip() for line in str(link).strip().splitlines()]
        first = lines[0] if lines else ""
        if (key := _PARSER_KEY.match(first)) and (not path or path[-1] != key.group(1)):
            path.append(key.group(1))
            in_list = False
        elif first.startswith("Does not validate against any of the Union subtypes"):
            subtypes = next((line for line in lines if line.startswith("Subtypes:")), "")
            in_list = subtypes.startswith("Subtypes: [list[")
        elif cls := _CLASS_PATH.match(first):
            class_path = cls.group(1)
            path += ["[...]", "init_args"] if in_list else ["init_args"]
    reason = " ".join(line.strip() for line in str(chain[-1]).strip().splitlines() if line.strip())
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reason).replace("Expected a int", "Expected an int")
    if path and path[-1] == "init_args" and class_path and not _NOT_ACCEPTED.match(reason):
        path.pop()  # the class itself is the problem, not one of its arguments
        reason = f"class_path {class_path!r}: {reason}"
    if (unknown := _NOT_ACCEPTED.match(reason)) and class_path:
        reason += _did_you_mean(unknown.group(1), class_path)
    elif unknown := _NOT_ACCEPTED_BY_SUBCOMMAND.match(reason):
        section, _, name = unknown.group(1).rpartition(".")
        if section == "trainer":
            reason += _did_you_mean(name, "lightning.pytorch.Trainer", list_all=False)
        elif not section:
            sections = ["model", "data", "trainer", "optimizer", "lr_scheduler", "ckpt_path", "seed_everything"]
            reason += _did_you_mean(name, sections)
    where = ".".join(path).replace(".[...]", "[...]")
    subcommand = next((a for a in argv if a in SpherinatorCLI.subcommands()), None)
    hint = f"spherinator {subcommand} --help" if subcommand else "spherinator --help"
    return f"{where + ': ' if where else ''}{reason} (see {hint})"


def _did_you_mean(name: str, accepted: str | list[str], list_all: bool = True) -> str:
    """``; did you mean 'beta'?`` for a ``name`` not among the ``accepted`` names (a list, or a class path whose
    arguments they are); else the accepted names (``list_all``) or nothing."""
    owner = "it"
    if isinstance(accepted, str):
        module, _, owner = accepted.rpartition(".")
        try:
            params = inspect.signature(getattr(importlib.import_module(module), owner)).parameters
        except (ImportError, AttributeError, ValueError, TypeError):
            return ""
        accepted = [p for p, v in params.items() if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
    close = difflib.get_close_matches(name, accepted, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; {owner} takes {', '.join(accepted)}" if list_all else ""


def user_error(err: BaseException) -> BaseException | None:
    """The error in ``err``'s chain that bad input caused, else None (a bug: keep the traceback).

    ConfigError and DataError are bad input by definition, and so is Lightning's MisconfigurationException (e.g.
    a ModelCheckpoint monitoring a metric that is never logged). A class that refuses its arguments while jsonargparse
    builds it (a model's ``ValueError("z_dim must be >= 2 ...")``) reaches us wrapped in jsonargparse's
    "Does not validate against any of the Union subtypes"; the refusal itself is the message to show.
    """
    wrapped = False
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConfigError | DataError | MisconfigurationException):
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
