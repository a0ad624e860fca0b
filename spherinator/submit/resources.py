"""Slurm resources of a submission: command-line options, site presets (``slurm/presets/*.yaml``, looked up along
:func:`spherinator.packaged.preset_dirs`), sbatch parameters for Submitit and the matching Lightning Trainer
settings."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spherinator.packaged import PRESET_PATH_ENV, preset_dirs
from spherinator.submit.sweep import SubmitError


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
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("gpus_per_node", "parallelism", "cpus_per_task", "signal_delay_s"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("max_requeues", self.max_requeues, minimum=0)
        if self.gpus_per_node is not None:
            if self.devices not in (1, self.gpus_per_node):
                raise SubmitError(
                    f"--devices {self.devices} and --gpus-per-node {self.gpus_per_node} disagree: one process runs per "
                    f"GPU, so give only --gpus-per-node (devices follows it)"
                )
            self.devices = self.gpus_per_node
        if self.signal_delay_s is not None and self.signal_delay_s >= self.time * 60:
            raise SubmitError(
                f"--signal-delay {self.signal_delay_s} s is not shorter than the time limit ({self.time} min): the "
                f"checkpoint signal would come at once and requeue the task without end; lower it"
            )
        if self.mem is not None and not re.fullmatch(r"\d+(?:[KMGT]B?)?", str(self.mem), flags=re.IGNORECASE):
            raise SubmitError(f"--mem {self.mem!r} is not a Slurm memory size; write e.g. 16G or 64000M")
        for name in ("partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is not None:
                _check_slurm_value(name, value)
        if isinstance(self.setup, str):
            self.setup = [self.setup]  # one shell line
        if not isinstance(self.setup, list) or not all(isinstance(line, str) for line in self.setup):
            raise SubmitError(f"setup must be a list of shell lines (got {self.setup!r})")
        if not isinstance(self.sbatch_extra, dict):
            raise SubmitError(
                f"sbatch_extra must be a mapping of sbatch options, e.g. {{reservation: x}} (got {self.sbatch_extra!r})"
            )
        # one spelling per option (a preset's mail-type and the command line's mail_type would be two #SBATCH lines;
        # the later one, the command line's, wins)
        self.sbatch_extra = {str(key).replace("-", "_"): value for key, value in self.sbatch_extra.items()}
        check_sbatch_extra(self.sbatch_extra)
        for extra, mine, flag in (
            ("mem_per_cpu", self.mem, "--mem"), ("mem_per_gpu", self.mem, "--mem"),
            ("cpus_per_gpu", self.cpus_per_task, "--cpus-per-task"),
        ):  # fmt: skip
            if extra in self.sbatch_extra and mine is not None:
                raise SubmitError(
                    f"sbatch option '{extra.replace('_', '-')}' and {flag} {mine} exclude each other in sbatch; give "
                    "one of them"
                )

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


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        which = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise SubmitError(f"--{name.replace('_', '-')} must be {which} (got {value!r})")


# Long option names of sbatch (Slurm 22.05 to 25.x, src/common/slurm_opt.c), by whether they take a value. An
# unknown name is refused: sbatch reads an abbreviation as the option it begins (--nod=2 is --nodes=2) and fails
# on others only when the job is submitted.
SBATCH_FLAGS = frozenset({
    "consolidate-segments", "contiguous", "external", "help", "hold", "ignore-pbs", "no-requeue", "overcommit",
    "oversubscribe", "parsable", "quiet", "reboot", "spread-job", "spread-segments", "stepmgr", "test-only",
    "usage", "use-min-nodes", "verbose", "version", "wait"
})  # fmt: skip
SBATCH_OPTIONAL_VALUE = frozenset({
    "exclusive", "get-user-env", "nice", "no-kill", "oom-kill-step", "propagate", "requeue", "resv-ports"
})  # fmt: skip
SBATCH_VALUE = frozenset({
    "account", "acctg-freq", "array", "autocomplete", "batch", "bb", "bbf", "begin", "chdir", "cluster",
    "cluster-constraint", "clusters", "comment", "constraint", "container", "container-id", "context", "core-spec",
    "cores-per-socket", "cpu-freq", "cpus-per-gpu", "cpus-per-task", "deadline", "delay-boot", "dependency",
    "distribution", "error", "exclude", "export", "export-file", "extra", "extra-node-info", "gid", "gpu-bind",
    "gpu-freq", "gpus", "gpus-per-node", "gpus-per-socket", "gpus-per-task", "gres", "gres-flags", "hint", "input",
    "job-name", "kill-on-invalid-dep", "licenses", "mail-type", "mail-user", "mcs-label", "mem", "mem-bind",
    "mem-per-cpu", "mem-per-gpu", "mem-update", "mincpus", "network", "nodefile", "nodelist", "nodes", "ntasks",
    "ntasks-per-core", "ntasks-per-gpu", "ntasks-per-node", "ntasks-per-socket", "ntasks-per-tres", "open-mode",
    "output", "partition", "power", "prefer", "priority", "profile", "qos", "reservation", "resources", "runtime",
    "segment", "signal", "sockets-per-node", "switches", "tasks-per-node", "thread-spec", "threads-per-core",
    "time", "time-min", "tmp", "tres-bind", "tres-per-task", "uid", "wait-all-nodes", "wckey", "wrap"
})  # fmt: skip
SBATCH_SHORT = {
    "A": "account", "a": "array", "b": "begin", "D": "chdir", "M": "clusters", "C": "constraint", "S": "core-spec",
    "c": "cpus-per-task", "d": "dependency", "m": "distribution", "e": "error", "x": "exclude",
    "B": "extra-node-info", "G": "gpus", "h": "help", "H": "hold", "i": "input", "J": "job-name", "L": "licenses",
    "k": "no-kill", "F": "nodefile", "w": "nodelist", "N": "nodes", "n": "ntasks", "o": "output", "O": "overcommit",
    "s": "oversubscribe", "p": "partition", "q": "qos", "Q": "quiet", "t": "time", "v": "verbose", "V": "version",
    "W": "wait",
}  # fmt: skip

_GPU_LAYOUT = "--gpus-per-node (GPUs per node; one process per GPU, so devices follow it)"
# sbatch options the launcher sets from its own flags (and from which it derives the Trainer settings and the
# checkpoint signal): given through --sbatch-extra they would silently disagree with those.
MANAGED_OPTIONS = {
    "nodes": "--nodes", "ntasks_per_node": "--devices", "tasks_per_node": "--devices",
    "ntasks": "--nodes and --devices", "gpus_per_node": _GPU_LAYOUT, "gpus": _GPU_LAYOUT,
    "gpus_per_task": _GPU_LAYOUT, "gpus_per_socket": _GPU_LAYOUT, "tres_per_task": f"{_GPU_LAYOUT} and --cpus-per-task",
    "ntasks_per_gpu": f"{_GPU_LAYOUT} and --devices", "ntasks_per_tres": f"{_GPU_LAYOUT} and --devices",
    "time": "--time", "array": "--parallelism (sweeps are the array)", "signal": "--signal-delay",
    "no_requeue": "--max-requeues 0", "cpus_per_task": "--cpus-per-task", "mem": "--mem", "partition": "--partition",
    "account": "--account", "qos": "--qos", "constraint": "--constraint", "output": "the run dir's logs",
    "error": "the run dir's logs", "open_mode": "the run dir's logs (appended to by each requeued run)",
    "job_name": "--name",
}  # fmt: skip
# sbatch options that would break what the launcher does with the script and sbatch's reply.
_UNUSABLE_OPTIONS = {
    "parsable": "Submitit reads the job id from sbatch's usual reply",
    "quiet": "Submitit reads the job id from sbatch's reply, which --quiet drops (the job would be queued unseen)",
    "test_only": "nothing would be queued while the launcher records a submission",
    "wait": "sbatch would not return until the job ends",
    "wrap": "the launcher writes the batch script itself",
    "clusters": "status, cancel, resume and Submitit look the jobs up on the local cluster",
    "cluster": "status, cancel, resume and Submitit look the jobs up on the local cluster",
    "help": "it prints help instead of submitting", "usage": "it prints help instead of submitting",
    "version": "it prints the version instead of submitting", "autocomplete": "it is for interactive shells",
}  # fmt: skip


def check_sbatch_extra(extra: dict[str, Any]) -> None:
    """Refuse extra sbatch options that sbatch does not know, that the launcher manages through its own flags or
    that break it, and values that would not reach sbatch as written."""
    for key, value in extra.items():
        name = str(key).lstrip("-_").replace("_", "-")
        if name in SBATCH_SHORT:
            raise SubmitError(
                f"--sbatch-extra {name!r} is sbatch's short option -{name}; --sbatch-extra takes long names, "
                f"write {SBATCH_SHORT[name]}=VALUE (or use the launcher's own flag for it)"
            )
        known = SBATCH_FLAGS | SBATCH_OPTIONAL_VALUE | SBATCH_VALUE
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else "see `man sbatch` for the long option names"
            raise SubmitError(f"--sbatch-extra {str(key)!r} is not an sbatch option; {hint}")
        flag = MANAGED_OPTIONS.get(name.replace("-", "_"))
        if flag is not None:
            raise SubmitError(
                f"sbatch option '{name}' is set by spherinator-submit itself; use {flag} instead of --sbatch-extra"
            )
        reason = _UNUSABLE_OPTIONS.get(name.replace("-", "_"))
        if reason is not None:
            raise SubmitError(f"sbatch option '{name}' cannot be used with spherinator-submit: {reason}")
        _check_extra_value(name, value)


def _check_extra_value(name: str, value: Any) -> None:
    if value is True:
        if name in SBATCH_VALUE:
            raise SubmitError(f"--sbatch-extra {name} needs a value; write {name}=VALUE")
        return
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SubmitError(
            f"--sbatch-extra {name} has the value {value!r}; give a text or number, true for an option without a "
            "value, or leave the option out"
        )
    if name in SBATCH_FLAGS:
        raise SubmitError(f"--sbatch-extra {name}={value!r}: --{name} takes no value; write just {name}")
    text = str(value)
    if not text:
        raise SubmitError(f"--sbatch-extra {name}= has an empty value; give one, or write just {name} for a flag")
    if name == "gres" and any(part.split(":")[0].removeprefix("gres/") == "gpu" for part in text.split(",")):
        raise SubmitError(
            f"--sbatch-extra gres={text!r} asks for GPUs, which spherinator-submit sets itself; use {_GPU_LAYOUT}"
        )
    _check_script_text(f"--sbatch-extra {name}", text)


def _check_script_text(what: str, text: str) -> None:
    """Refuse text that would not reach sbatch as written: a line break ends the ``#SBATCH`` line (the rest runs as
    shell on the compute node); other control characters and backslashes are changed by sbatch's reader."""
    bad = sorted({c for c in text if unicodedata.category(c) == "Cc" or c == "\\"})
    if not bad:
        return
    if "\n" in bad:
        why = "a line break ends the #SBATCH line and the rest would run as shell on the compute node"
    else:
        why = "control characters and backslashes do not reach sbatch as written"
    raise SubmitError(f"{what} {text!r} holds {', '.join(map(repr, bad))}: {why}; remove them")


_NAME = r"[A-Za-z0-9_.+-]+"
_FEATURE = r"[A-Za-z0-9_.:+/-]+(?:\*\d+)?"
_SLURM_VALUES = {
    "partition": (rf"{_NAME}(?:,{_NAME})*", "a partition name, or several joined by commas (letters, digits, _ . + -)"),
    "account": (_NAME, "an account name (letters, digits, _ . + -)"),
    "qos": (_NAME, "a QOS name (letters, digits, _ . + -)"),
    "constraint": (
        rf"{_FEATURE}(?:[&|,]{_FEATURE})*",
        "a feature expression such as a100, a100&ib, [rack1|rack2] or [rack1*2&rack2*4]",
    ),
}  # fmt: skip


def _check_slurm_value(name: str, value: Any) -> None:
    """``value`` as Slurm's grammar for ``name`` has it; the error names the flag, the value and what to write."""
    flag = f"--{name}"
    if not isinstance(value, str) or not value.strip():
        raise SubmitError(f"{flag} must be a non-empty text (got {value!r})")
    _check_script_text(flag, value)
    pattern, expected = _SLURM_VALUES[name]
    flat = value
    if name == "constraint":
        depth = []
        for char in value:
            if char in "([":
                depth.append(char)
            elif char in ")]" and (not depth or depth.pop() != "([)]"[")]".index(char)]):
                depth.append("unbalanced")
                break
        flat = "" if depth else value.replace("[", "").replace("]", "").replace("(", "").replace(")", "")
    if not re.fullmatch(pattern, flat):
        raise SubmitError(f"{flag} {value!r} is not {expected}; fix the value")


def check_script_path(path: Path, what: str) -> None:
    """Refuse a path that lands in the batch script (the logs' ``#SBATCH --output``) but would not arrive there as
    written: control characters and backslashes (see above), and ``%``, which sbatch reads as a file name pattern."""
    _check_script_text(what, str(path))
    if "%" in str(path):
        raise SubmitError(
            f"{what} {str(path)!r} holds '%', which sbatch reads as a file name pattern (%j, %x) in the logs' path; "
            "choose a path without it"
        )


class _PresetLoader(yaml.SafeLoader):
    """YAML as users mean it in presets: ``time: 12:00:00`` is a Slurm time, not YAML 1.1's base-60 integer."""


_PresetLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_PresetLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789")
)
_PresetLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"),
    list("-+0123456789."),
)


def parse_time(value: str | int) -> int:
    """A Slurm time limit in whole minutes: ``90``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM[:SS]``."""
    if isinstance(value, int):
        minutes = value
    else:
        text = str(value).strip()
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if not match:
            raise SubmitError(f"--time {value!r} is not a Slurm time; write minutes (90) or HH:MM:SS (1:30:00)")
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
        raise SubmitError(f"--time {value!r} is below one minute; Slurm limits are in whole minutes")
    return minutes


def available_presets(preset_dir: Path | None = None) -> list[str]:
    dirs = [preset_dir] if preset_dir is not None else preset_dirs()
    return sorted({p.stem for d in dirs for p in d.glob("*.yaml")})


def load_preset(name: str, preset_dir: Path | None = None) -> dict[str, Any]:
    """Read a site preset: a YAML mapping of Resources fields (``partition``, ``gpus_per_node``, ``setup``, ...).

    ``name`` is a path to a YAML file, or a file stem looked up in ``preset_dir`` (default: the folders of
    ``$SPHERINATOR_PRESET_PATH``, then the presets that ship with spherinator; the first match wins).
    """
    dirs = [preset_dir] if preset_dir is not None else preset_dirs()
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise SubmitError(f"preset file '{name}' not found; give the path of a YAML file, or a preset's name")
    else:
        path = next((d / f"{name}.yaml" for d in dirs if (d / f"{name}.yaml").is_file()), None)
        if path is None:
            raise SubmitError(
                f"preset '{name}' not found in {', '.join(str(d) for d in dirs)}; available: "
                f"{', '.join(available_presets(preset_dir)) or 'none'} (add a folder of your own with "
                f"${PRESET_PATH_ENV}, or give a YAML file's path)"
            )
    try:
        content = yaml.load(path.read_text(), Loader=_PresetLoader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise SubmitError(f"preset '{path}' is not valid YAML: {err}") from err
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
    check_sbatch_extra(extra)
    return extra
