"""Slurm resources of a submission: command-line options, site presets (``slurm/presets/*.yaml``), sbatch
parameters for Submitit and the matching Lightning Trainer settings."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spherinator.submit.sweep import SubmitError

PRESET_DIR = Path(__file__).resolve().parents[2] / "slurm" / "presets"


@dataclass
class Resources:
    """What each task of a sweep asks Slurm for.

    Attributes:
        nodes: Nodes per task; becomes ``trainer.num_nodes``.
        devices: Processes (one per device) per node; becomes ``trainer.devices`` and ``--ntasks-per-node``.
        gpus_per_node: GPUs per node; when set, ``devices`` follows it and the accelerator is ``gpu``.
        partition: Slurm partition.
        time: Time limit per run in minutes (each requeued run gets it again).
        cpus_per_task: CPUs per process.
        mem: Memory per node, in Slurm's syntax (``16G``).
        account: Slurm account.
        qos: Quality of service.
        constraint: Node features, e.g. ``a100``.
        sbatch_extra: Further ``#SBATCH`` options, ``{"reservation": "x"}`` -> ``--reservation=x``.
        setup: Shell lines run in the batch script before the training (``module load ...``).
        max_requeues: How often a task may be requeued after hitting its time limit.
        signal_delay_s: Seconds before the time limit at which the task is told to checkpoint and requeue.
        parallelism: How many tasks of the array run at once (``--array=...%N``); None: all.
    """

    nodes: int = 1
    devices: int = 1
    gpus_per_node: int | None = None
    partition: str | None = None
    time: int = 60
    cpus_per_task: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch_extra: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    max_requeues: int = 3
    signal_delay_s: int | None = None
    parallelism: int | None = None

    def __post_init__(self) -> None:
        for name in ("nodes", "devices", "time"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SubmitError(f"--{name.replace('_', '-')} must be a positive integer (got {value!r})")
        if self.gpus_per_node is not None:
            if self.gpus_per_node < 1:
                raise SubmitError(f"--gpus-per-node must be >= 1 (got {self.gpus_per_node})")
            self.devices = self.gpus_per_node
        if self.parallelism is not None and self.parallelism < 1:
            raise SubmitError(f"--parallelism must be >= 1 (got {self.parallelism})")
        if self.max_requeues < 0:
            raise SubmitError(f"--max-requeues must be >= 0 (got {self.max_requeues})")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices

    def effective_signal_delay_s(self) -> int:
        """Seconds before the limit for the checkpoint signal: 90 s (Submitit's default) but at most half the limit,
        so that a short limit does not signal at once."""
        if self.signal_delay_s is not None:
            return self.signal_delay_s
        return max(10, min(90, self.time * 60 // 2))

    def submitit_parameters(self) -> dict[str, Any]:
        """Keyword arguments for ``submitit.SlurmExecutor.update_parameters`` (sbatch names)."""
        params: dict[str, Any] = {
            "nodes": self.nodes,
            "ntasks_per_node": self.devices,
            "time": self.time,
            "signal_delay_s": self.effective_signal_delay_s(),
        }
        optional = {
            "gpus_per_node": self.gpus_per_node,
            "partition": self.partition,
            "cpus_per_task": self.cpus_per_task,
            "mem": self.mem,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        if self.parallelism is not None:
            params["array_parallelism"] = self.parallelism
        if self.setup:
            params["setup"] = list(self.setup)
        if self.sbatch_extra:
            params["additional_parameters"] = dict(self.sbatch_extra)
        return params

    def trainer_settings(self, strategy: Any) -> dict[str, Any]:
        """Trainer settings that match the allocation; ``strategy`` is the config's own.

        More than one process in all turns ``auto`` into ``ddp``; any other strategy (``deepspeed_stage_2``,
        ``fsdp``, a class_path) passes through unchanged.
        """
        settings: dict[str, Any] = {"num_nodes": self.nodes, "devices": self.devices}
        if self.gpus_per_node is not None:
            settings["accelerator"] = "gpu"
        if self.world_size > 1 and strategy in (None, "auto"):
            settings["strategy"] = "ddp"
        return settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_time(value: str | int) -> int:
    """A Slurm time limit in whole minutes: ``90``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM[:SS]``."""
    if isinstance(value, int):
        minutes = value
    else:
        text = str(value).strip()
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if not match:
            raise SubmitError(f"--time '{value}' is not a Slurm time; write minutes (90) or HH:MM:SS (1:30:00)")
        days, first, second, third = match.groups()
        if days is not None:  # D-HH[:MM[:SS]]
            seconds = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
        elif third is not None:  # HH:MM:SS
            seconds = int(first) * 3600 + int(second) * 60 + int(third)
        elif second is not None:  # MM:SS
            seconds = int(first) * 60 + int(second)
        else:  # minutes
            seconds = int(first) * 60
        minutes = math.ceil(seconds / 60)
    if minutes < 1:
        raise SubmitError(f"--time '{value}' is below one minute; Slurm limits are in whole minutes")
    return minutes


def available_presets(preset_dir: Path = PRESET_DIR) -> list[str]:
    return sorted(p.stem for p in preset_dir.glob("*.yaml"))


def load_preset(name: str, preset_dir: Path = PRESET_DIR) -> dict[str, Any]:
    """Read a site preset: a YAML mapping of Resources fields (``partition``, ``gpus_per_node``, ``setup``, ...).

    ``name`` is a file stem in ``slurm/presets`` or a path to a YAML file.
    """
    path = Path(name) if name.endswith((".yaml", ".yml")) else preset_dir / f"{name}.yaml"
    if not path.is_file():
        raise SubmitError(
            f"preset '{name}' not found ({path}); available: {', '.join(available_presets(preset_dir)) or 'none'}"
        )
    content = yaml.safe_load(path.read_text()) or {}
    if not isinstance(content, dict):
        raise SubmitError(f"preset '{path}' must be a mapping of resource settings (got {type(content).__name__})")
    valid = {f.name for f in dataclasses.fields(Resources)}
    unknown = sorted(set(content) - valid - {"description"})
    if unknown:
        raise SubmitError(f"preset '{path}' has unknown keys {unknown}; valid keys: {sorted(valid)}")
    content.pop("description", None)
    if "time" in content:
        content["time"] = parse_time(content["time"])
    return content


def parse_sbatch_extra(items: list[str]) -> dict[str, str]:
    """``["reservation=x", "--exclusive"]`` -> ``{"reservation": "x", "exclusive": True}`` for Submitit."""
    extra: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.removeprefix("--").partition("=")
        if not key:
            raise SubmitError(f"--sbatch-extra '{item}' names no option; write e.g. --sbatch-extra reservation=x")
        extra[key.replace("-", "_")] = value if sep else True
    return extra
