"""Config layering for ``spherinator``: how ``-c`` files are read, composed, checked and printed.

- :func:`load_yaml` / :func:`load_config_file` read a config file strictly: a key given twice in one mapping (two
  ``trainer:`` sections, of which YAML keeps the second without a word) and an integer with a leading zero
  (``z_dim: 010``, which YAML 1.1 reads as the octal 8 where the command line reads 10) are refused, naming the
  file, the key and the line(s). The CLI's parser reads its config files with the same check (:data:`YAML_MODE`).
- :func:`append_callbacks_across_configs`: each ``-c`` file's ``trainer.callbacks`` adds to the earlier ones.
- :func:`drop_repeated_callbacks`: one of each identical callback, the last of :data:`ONE_PER_RUN`.
- :func:`check_optimizer`: the optimizer and scheduler refuse their arguments before anything else is built.
- :func:`print_resolved_config`: ``--print_config`` shows the config that runs, the inferred sizes filled in.
"""

from __future__ import annotations

import json
import math
import re
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import Namespace, get_loader, set_loader

from spherinator.errors import ConfigError, DataError
from spherinator.shapes import resolve_config

# The parser mode (jsonargparse's name for a config-file loader) of the spherinator CLI: YAML, read strictly.
YAML_MODE = "spherinator_yaml"

_INT_TAG = "tag:yaml.org,2002:int"
# YAML 1.1's octal integers (010 is 8); Python and jsonargparse's command-line values read 010 as 10.
_OCTAL = re.compile(r"[-+]?0[0-7_]+")


def check_yaml(text: str, source: str) -> None:
    """Refuse YAML ``text`` that does not read as it looks: a mapping key given twice, or an integer with a
    leading zero. ``source`` names the text in the message (``-c model.yaml``). Text that is no valid YAML is
    left to the loader to report."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return
    seen: set[int] = set()  # anchors and aliases share nodes: check each once
    pending: list[tuple[yaml.Node | None, str]] = [(node, "")]
    while pending:
        node, where = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            pending += _check_keys(node, where, source)
        elif isinstance(node, yaml.SequenceNode):
            pending += [(item, f"{where}[{i}]") for i, item in enumerate(node.value)]
        elif isinstance(node, yaml.ScalarNode) and node.tag == _INT_TAG and _OCTAL.fullmatch(node.value):
            as_octal, as_decimal = yaml.safe_load(node.value), int(node.value.replace("_", ""))
            if as_octal == as_decimal:  # 0, 07: the same number either way
                continue
            raise ConfigError(
                f"{source} line {node.start_mark.line + 1}: {where or 'the value'}: {node.value} has a leading zero, "
                f"which YAML reads as the octal number {as_octal} (the command line reads {as_decimal}): write "
                f"{as_decimal} (or {as_octal}) without the leading zero, or quote it ('{node.value}') for a string"
            )


def _check_keys(node: yaml.MappingNode, where: str, source: str) -> list[tuple[yaml.Node, str]]:
    """Raise if ``node`` gives a key twice; else its values, each with its dotted place."""
    lines: dict[tuple[str, str], int] = {}
    values = []
    for key_node, value_node in node.value:
        key = (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
        name = f"{where}.{key_node.value}" if where and key else (key_node.value if key else f"{where}.?")
        if key is not None and key[1] != "<<":  # merge keys (<<: *base) may repeat
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(
                    f"{source}: {name} is given twice (lines {lines[key]} and {line}), and YAML would keep only the "
                    f"second without a word: give {name} once"
                )
            lines[key] = line
        values.append((value_node, name))
    return values


def load_yaml(text: str, source: str) -> Any:
    """``text`` as YAML after :func:`check_yaml` (``source`` names it in errors); a YAML error is a ConfigError."""
    check_yaml(text, source)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}".replace("<unicode string>", source)) from err


def load_config_file(path: str | Path, source: str | None = None) -> Any:
    """The YAML config file ``path``, read as :func:`load_yaml` reads it (``source``: its name in errors, by default
    ``-c PATH``). What ``spherinator-submit -c`` layers is read with this, as ``spherinator -c`` is."""
    source = source or f"-c {path}"
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not a text file ({err}); give a YAML config file") from err
    return load_yaml(text, source)


def use_strict_yaml() -> str:
    """Register :data:`YAML_MODE` with jsonargparse (once) and return it, for ``parser_mode``: jsonargparse's own
    YAML loader after :func:`check_yaml`. Other parsers in the process keep their mode."""
    try:
        get_loader(YAML_MODE)
    except KeyError:
        yaml_load = get_loader("yaml")

        def strict_load(value: str, path: str | Path = "") -> Any:
            check_yaml(value, f"-c {path}" if path else "the YAML given")
            return yaml_load(value)

        set_loader(YAML_MODE, strict_load, exceptions=(yaml.YAMLError,))
    return YAML_MODE


def append_callbacks_across_configs(argv: list[str]) -> list[str]:
    """Make each ``-c`` file's ``trainer.callbacks`` add to those of earlier files instead of replacing them.

    Callbacks come as overlay files (``-c callback_best_model.yaml -c callback_log_reconstructions.yaml``), each
    writing ``trainer: callbacks: [...]``; plain YAML composition would keep only the last file's list. A file
    that has such a list is passed on as its text with the key written ``callbacks+``, jsonargparse's append.
    Every ``-c`` file is read by :func:`load_config_file` (refused with its name if it is no config).
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
            content = load_config_file(value)
        except OSError:  # not a file: config text given inline (or a missing file, which the parser reports)
            continue
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


# Stateful callbacks whose state does not depend on their arguments: Lightning refuses two of them in one trainer
# ("Found more than one stateful callback"), and every model file of experiments/ brings its own SphereQuality.
ONE_PER_RUN = ("spherinator.callbacks.SphereQuality",)


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


def _init_args(callback: Namespace) -> dict[str, Any]:
    init_args = callback.get("init_args")
    return init_args.as_dict() if isinstance(init_args, Namespace) else dict(init_args or {})


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


DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "spherinator"},
}


def default_logger_under_root_dir(config: Namespace) -> None:
    """With ``trainer.default_root_dir`` given, a TensorBoardLogger whose ``save_dir`` is the default ``runs`` writes
    its run (events, config.yaml, checkpoints) under that directory instead, as Lightning's own default logger does:
    a user who moves the run elsewhere gets all of it there (``~`` expanded, as the logger itself would: its
    checkpoints would otherwise land in a folder named ``~``)."""
    trainer = config.get("trainer")
    root = trainer.get("default_root_dir") if isinstance(trainer, Namespace) else None
    logger = trainer.get("logger") if root else None
    if not isinstance(logger, Namespace) or logger.get("class_path") != DEFAULT_LOGGER["class_path"]:
        return
    args = logger.get("init_args")
    if isinstance(args, Namespace) and args.get("save_dir") == DEFAULT_LOGGER["init_args"]["save_dir"]:
        args.save_dir = str(Path(str(root)).expanduser())


def logger_folders(config: Namespace) -> list[Path]:
    """The folders the config's loggers keep their runs in (``save_dir/name``, each run a ``version_<n>`` there),
    for the loggers that have a ``save_dir``."""
    loggers = config.get("trainer.logger")
    folders = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        args = logger.get("init_args") if isinstance(logger, Namespace) else None
        if isinstance(args, Namespace) and args.get("save_dir"):
            folders.append(Path(str(args.save_dir)) / str(args.get("name") or ""))
    return folders


def _without_logger(config: Namespace) -> bool:
    return config.get("trainer.logger") in (False, [])


def logger_folder(config: Namespace) -> str:
    """Where a fit of ``config`` keeps its runs' checkpoints, as messages name it: the first logger's
    ``save_dir/name``; without a logger, ``default_root_dir``."""
    folders = logger_folders(config)
    if folders:
        return str(folders[0])
    if _without_logger(config):
        return str(Path(str(config.get("trainer.default_root_dir") or ".")).expanduser())
    return "runs/<name>"


def checkpoint_example(config: Namespace, file: str = "<file>.ckpt") -> str:
    """A checkpoint path as a fit of ``config`` writes it, for messages (``runs/spherinator/version_<n>/...``)."""
    version = "" if _without_logger(config) else "version_<n>/"
    return f"{logger_folder(config)}/{version}checkpoints/{file}"


PRINT_CONFIG = re.compile(r"--print_config(=.*)?")


def print_resolved_config(parser: Any, config: Namespace, argv: list[str], flag: str) -> NoReturn:
    """``--print_config`` of the config that runs: with the sizes :func:`resolve_config` infers (the data's sample
    shape among them) and repeated callbacks dropped, printed by jsonargparse as usual.

    jsonargparse prints while it parses, before those values are known; so the config is parsed once without the
    flag (``config``), completed, and parsed again with the flag and the completed values as overrides.
    """
    subcommand = config.get("subcommand")
    section = config[subcommand] if subcommand else config
    before = _flat(parser, config, subcommand)
    default_logger_under_root_dir(section)
    drop_repeated_callbacks(section)
    try:
        resolve_config(section)
    except (ConfigError, DataError, OSError) as err:  # print what is known; the run itself would stop here
        print(f"spherinator: the sizes taken from the data are left null: {err}", file=sys.stderr)
    after = _flat(parser, config, subcommand)
    overrides = [_override(key, value) for key, value in after.items() if before.get(key) != value]
    argv = [arg for arg in argv if not PRINT_CONFIG.fullmatch(arg)]
    parser.parse_args([*argv, *overrides, flag])  # prints and exits
    raise AssertionError("jsonargparse did not exit after --print_config")


def _override(key: str, value: Any) -> str:
    """``--key=value`` that jsonargparse reads back as ``value``. It reads a str option's text as YAML only to refuse
    what is no string there (``a: b``, ``[a]``) and keeps the text itself, quotes and all: such a string goes in as
    a JSON object of its parent (``--trainer.logger.init_args={"save_dir": "x: y"}``), which sets only that key."""
    if not isinstance(value, str):
        return f"--{key}={json.dumps(value)}"
    try:
        plain = yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain = False
    parent, _, name = key.rpartition(".")
    return f"--{key}={value}" if plain or not parent else f"--{parent}={json.dumps({name: value})}"


def print_incomplete_config(parser: Any, argv: list[str], missing: ArgumentError) -> NoReturn:
    """``--print_config`` of a config that cannot run yet (``missing``: why, e.g. no ``data:`` section): printed as
    jsonargparse prints it, which is before it checks for what is required; the sizes the data would decide are
    null, and stderr says why."""
    try:
        parser.parse_args(argv)  # prints and exits, or raises what else is wrong
    except ArgumentError:
        raise missing from None  # a wrong value, not a missing one: the first parse's error says it best
    except SystemExit as done:
        if done.code == 0:
            reason = " ".join(str(missing).split())
            print(f"spherinator: the config is incomplete ({reason}); sizes it would infer are null", file=sys.stderr)
        raise
    raise AssertionError("jsonargparse did not exit after --print_config")


def _flat(parser: Any, config: Namespace, subcommand: str | None) -> dict[str, Any]:
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
