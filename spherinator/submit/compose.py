"""Compose each task's config with the ``spherinator`` CLI parser and check it locally before anything is queued."""

from __future__ import annotations

import contextlib
import io
import re
from argparse import ArgumentError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spherinator.errors import ConfigError, one_line, parse_error_line, user_error
from spherinator.submit.resources import Resources
from spherinator.submit.sweep import SubmitError, Task

REQUEUE_CALLBACK = "spherinator.submit.RequeueOnSignal"
SLURM_ENVIRONMENT = "lightning.pytorch.plugins.environments.SLURMEnvironment"
CHECKPOINT_CALLBACK = "lightning.pytorch.callbacks.ModelCheckpoint"
# Loggers that write under save_dir/name/version: pinned to the run dir so a requeued run continues the same run.
_DIR_LOGGERS = ("TensorBoardLogger", "CSVLogger")


def _parse_only_cli() -> type:
    """SpherinatorCLI that parses and resolves the config (shapes filled in) but builds nothing."""
    from spherinator.cli import SpherinatorCLI

    class _ParseOnly(SpherinatorCLI):
        def instantiate_classes(self) -> None:  # the submitter instantiates a CPU copy itself
            pass

    return _ParseOnly


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _error_text(err: BaseException, stderr: str) -> str:
    text = str(err).strip() if not isinstance(err, SystemExit) else ""
    if not text:  # jsonargparse printed the message and exited
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        text = lines[-1] if lines else f"exit status {getattr(err, 'code', '?')}"
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    # jsonargparse appends the alternative it also tried (None) and the whole namespace: noise, not the cause;
    # the value given is in that tail too, and worth keeping.
    head, _, tail = text.partition(" - Expected a <class 'NoneType'>")
    given = re.search(r"Given value: (.{1,80}?)(?: Given |$)", tail)
    return f"{head} (given: {given.group(1).strip()})" if given and given.group(1).strip() not in head else head


def parse_config(args: list[str]) -> tuple[Any, Any]:
    """Parse ``args`` (``-c`` files and overrides, no subcommand) with the spherinator CLI parser.

    Returns (parser, config namespace). Errors come back as the parser's message (raised as ValueError).
    """
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            cli = _parse_only_cli()(args=args, run=False, parser_kwargs={"exit_on_error": False})
    except ArgumentError as err:  # the key and the reason, as `spherinator fit` words it
        raise ValueError(parse_error_line(err, ["fit"])) from err
    except (Exception, SystemExit) as err:
        raise ValueError(_error_text(err, stderr.getvalue())) from err
    return cli.parser, cli.config


def _class_name(class_path: str | None) -> str:
    return (class_path or "").rsplit(".", 1)[-1]


def _as_list(value: Any) -> list:
    if value is None or value is False or value is True:
        return []
    return list(value) if isinstance(value, list) else [value]


def _pin_loggers(config: Any, run_dir: Path, sweep: str) -> None:
    """Every logger writes into the run dir, always into the same run (also after a requeue).

    W&B gets the task's name as the run's name (one name for all tasks, as a config gives, tells them apart in no
    W&B table), the sweep's as its group unless the config names one, and ``<sweep>-<task>`` as the run id unless the
    config gives one (the same in every attempt, so a requeued run continues the W&B run).
    """
    for logger in _as_list(config.trainer.get("logger")):
        init = logger.get("init_args")
        if init is None:
            continue
        name = _class_name(logger.get("class_path"))
        if "save_dir" in init:
            init.save_dir = str(run_dir)
        if name in _DIR_LOGGERS:
            init.name = ""
            init.version = ""
        if "default_hp_metric" in init:
            init.default_hp_metric = False  # else every requeued run logs hp_metric=-1 again
        elif name == "WandbLogger":
            if init.get("id") is None:
                init.id = f"{sweep}-{run_dir.name}"
            init.name = run_dir.name
            init.group = init.get("group") or sweep


def _namespace(class_path: str, **init_args: Any) -> Any:
    from jsonargparse import Namespace

    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


def _add_run_callbacks(config: Any, swept: dict[str, str]) -> None:
    """Checkpoints with ``last.ckpt`` (resume points) and the requeue-on-signal callback, which gets the task's
    ``swept`` values (it logs them as hyperparameters)."""
    callbacks = _as_list(config.trainer.get("callbacks"))
    checkpoints = [cb for cb in callbacks if _class_name(cb.get("class_path")) == "ModelCheckpoint"]
    if checkpoints:
        if not any(cb.init_args.get("save_last") for cb in checkpoints):
            checkpoints[0].init_args.save_last = True
    else:
        callbacks.append(_namespace(CHECKPOINT_CALLBACK, save_last=True))
    requeue = [cb for cb in callbacks if cb.get("class_path") == REQUEUE_CALLBACK]
    if not requeue:
        callbacks.append(_namespace(REQUEUE_CALLBACK, **({"swept": dict(swept)} if swept else {})))
    elif swept:
        requeue[0].init_args.swept = dict(swept)
    config.trainer.callbacks = callbacks


def _add_slurm_environment(config: Any) -> None:
    """Lightning's own SLURM auto-requeue off: Submitit's USR2 checkpoint/requeue is the one mechanism."""
    plugins = _as_list(config.trainer.get("plugins"))
    if not any(_class_name(getattr(p, "class_path", None)) == "SLURMEnvironment" for p in plugins):
        plugins.append(_namespace(SLURM_ENVIRONMENT, auto_requeue=False))
    config.trainer.plugins = plugins[0] if len(plugins) == 1 else plugins


def _check_strategy(strategy: Any) -> None:
    if not isinstance(strategy, str) or strategy == "auto":
        return
    from lightning.pytorch.strategies import StrategyRegistry

    if strategy not in StrategyRegistry.available_strategies():
        known = ", ".join(sorted(StrategyRegistry.available_strategies())[:12])
        raise ValueError(f"trainer.strategy '{strategy}' is not a Lightning strategy (known: {known}, ...)")


# What the submit host cannot stand in for: the cluster's devices and nodes, how they run, and the classes the
# trainer section builds (loggers, callbacks, plugins), which the task's own Trainer checks
# (and the switches that set process-wide torch flags: this process goes on to check the next task)
_CLUSTER_SETTINGS = (
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "precision",
    "plugins",
    "deterministic",
    "benchmark",
)


def _check_trainer(trainer: Any) -> None:
    """Build a CPU Trainer from the trainer section's plain values (``max_epochs: -2`` is refused here, not when
    the task starts on the cluster): one device, no logger, no checkpoints, nothing written, and not the Slurm
    allocation this command may run in (its task count is not the task's)."""
    import logging
    import tempfile
    import warnings

    from jsonargparse import Namespace
    from lightning.pytorch import Trainer
    from lightning.pytorch.plugins.environments import LightningEnvironment
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    values = trainer.as_dict() if isinstance(trainer, Namespace) else {}
    plain = {
        key: value
        for key, value in values.items()
        if key not in (*_CLUSTER_SETTINGS, "logger", "callbacks")
        and (not isinstance(value, dict | list) or key == "max_time")  # max_time: {hours: 1} is a plain value
    }
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "GPU available: False ..." says nothing about the cluster
    try:
        with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer(**{**plain, "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                       "default_root_dir": root, "plugins": [LightningEnvironment()]})  # fmt: skip
    except (ValueError, TypeError, MisconfigurationException) as err:  # as SpherinatorCLI.instantiate_trainer says it
        raise ConfigError(f"trainer: {err}") from err
    finally:
        quiet.setLevel(level)


def _tiny_batch(model: Any, datamodule: Any) -> None:
    """One batch of two samples through the model (eval mode, no gradients): it runs and keeps the input shape."""
    import torch

    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    elif isinstance(batch, list | tuple):
        batch = batch[0]
    x = batch[:2]  # (2, *sample_shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor):
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(
                f"the model maps a batch of shape {tuple(x.shape)} to {tuple(out.shape)}; an autoencoder must "
                "reconstruct its input's shape: check the decoder's layers"
            )
        if not torch.isfinite(out).all():
            raise ValueError("the model's output for a batch of the data is not finite (NaN/inf)")


def check_config(parser: Any, config: Any) -> None:
    """Build the model and data module of ``config`` on this CPU and run a batch of two samples through the model.

    The Trainer is built on the CPU with what does not depend on the cluster (a login node may have no GPU for
    ``accelerator: gpu``); the strategy name is checked against Lightning's registry.
    """
    from spherinator.shapes import check_model_matches_data

    local = config.clone()
    data_init = local.get("data.init_args")
    if data_init is not None and "num_workers" in data_init:
        data_init.num_workers = 0  # no worker processes on the submit host
    path = data_init.get("path") if data_init is not None else None
    if path is not None and not Path(str(path)).expanduser().exists():
        raise ValueError(f"data.init_args.path '{path}' does not exist (seen from {Path.cwd()})")
    _check_strategy(config.trainer.get("strategy"))
    _check_trainer(config.trainer)
    built = parser.instantiate_classes(local)
    model, datamodule = built.get("model"), built.get("data")
    check_model_matches_data(model, datamodule)
    if model is not None and datamodule is not None:
        _tiny_batch(model, datamodule)


@dataclass(frozen=True)
class ComposedTask:
    """A task's config as ``spherinator fit`` would run it, plus what the launcher set on top of it.

    Attributes:
        text: The complete config (YAML) the task trains with: every value the user wrote, ``null`` included.
        changes: One line per value the launcher set or added (``trainer.num_nodes: 1 -> 2``), relative to the
            config ``spherinator fit`` builds from the same files, overrides and swept values.
    """

    text: str
    changes: list[str] = field(default_factory=list)


def compose_task(
    configs: list[str],
    overrides: list[str],
    task: Task,
    resources: Resources,
    run_dir: Path,
    sweep: str,
    validate: bool = True,
) -> ComposedTask:
    """The complete config that ``task`` trains with, checked unless ``validate`` is False.

    It is the ``spherinator fit`` config of ``-c configs`` + ``overrides`` + the swept values, with the Trainer
    sized to ``resources``, loggers and checkpoints in ``run_dir`` (W&B runs grouped by the name of the ``sweep``),
    ``last.ckpt`` saved, Lightning's SLURM auto-requeue off and :class:`RequeueOnSignal` added (with the swept
    values, which it logs as hyperparameters). Those additions are listed in ``changes``; nothing else differs from
    what ``spherinator fit`` trains.

    Raises:
        SubmitError: naming the task, its swept values and the parser's / model's complaint.
    """
    label = f"task {task.index} '{task.name}'" + (f" ({_describe(task.params)})" if task.params else "")
    args = [token for path in configs for token in ("-c", str(path))]
    args += list(overrides) + task.cli_args()
    try:
        parser, config = parse_config(args)
        as_written = config.clone()
        config.trainer.default_root_dir = str(run_dir)
        for key, value in resources.trainer_settings(config.trainer.get("strategy")).items():
            config.trainer[key] = value
        _pin_loggers(config, run_dir, sweep)
        _add_run_callbacks(config, task.params)
        if validate:
            check_config(parser, config)
        _add_slurm_environment(config)
        # skip_unset=False: an explicit `norm: null` must reach the task as null, not vanish so that the class
        # default (BatchNorm2d) comes back. LightningCLI saves its own config.yaml the same way.
        text = parser.dump(config, skip_unset=False)
        changes = config_changes(as_written, config)
    except SubmitError:
        raise
    except Exception as err:
        cause = user_error(err)  # a class's own refusal, as `spherinator fit` shows it
        raise SubmitError(f"{label}: {one_line(cause) if cause else _error_text(err, '')}") from err
    return ComposedTask(text, changes)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, {"c": 2}]}}`` -> ``{"a.b[0]": 1, "a.b[1].c": 2}`` (Namespaces as dicts)."""
    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def config_changes(before: Any, after: Any) -> list[str]:
    """Every leaf of the config that differs between ``before`` and ``after``: ``key: old -> new``."""
    old, new = _flatten(before), _flatten(after)
    missing = object()
    lines = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, missing), new.get(key, missing)
        if a is missing:
            lines.append(f"{key}: (added) {b!r}")
        elif b is missing:
            lines.append(f"{key}: {a!r} (removed)")
        elif a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


def _describe(params: dict[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in params.items())
