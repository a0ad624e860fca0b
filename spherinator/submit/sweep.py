"""Sweeps: ``--sweep key=v1,v2`` flags and sweep files expanded into a grid of named tasks."""

from __future__ import annotations

import collections
import itertools
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spherinator.errors import SubmitError  # noqa: F401 (re-exported)


@dataclass
class Task:
    """One training run of a sweep.

    Attributes:
        index: Position in the Slurm array (0-based).
        name: Readable directory name built from the swept values, e.g. ``z_dim=8_beta=0.01``.
        params: Swept config keys and their values as given on the command line (strings), in sweep order.
    """

    index: int
    name: str
    params: dict[str, str] = field(default_factory=dict)

    def cli_args(self) -> list[str]:
        """The swept values as CLI overrides: ``["--model.init_args.z_dim", "8", ...]``."""
        return [token for key, value in self.params.items() for token in (f"--{key}", value)]


def _split_values(text: str) -> list[str]:
    """Split ``3,8,[1,2],'a,b'`` on the commas that are outside brackets and quotes."""
    values, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def parse_sweep_arg(arg: str) -> tuple[str, list[str]]:
    """One ``--sweep`` flag: ``model.init_args.z_dim=3,8,16`` -> ``("model.init_args.z_dim", ["3", "8", "16"])``."""
    key, sep, values_text = arg.partition("=")
    key = key.strip().removeprefix("--")
    control = next((c for c in arg if unicodedata.category(c) == "Cc"), None)
    if control is not None:  # a line break pasted into the flag: no key or value holds one
        raise SubmitError(f"--sweep {arg!r} holds the control character {control!r}; remove it")
    if not sep or not key or not values_text.strip():
        raise SubmitError(f"--sweep '{arg}' is not KEY=V1,V2,...; write e.g. --sweep model.init_args.z_dim=3,8,16")
    values = _split_values(values_text)
    if any(v == "" for v in values):
        raise SubmitError(f"--sweep '{arg}' has an empty value; remove the stray comma")
    return key, values


def _as_cli_value(value: Any) -> str:
    """A YAML value from a sweep file as the string the CLI parser reads (scalars plain, the rest as JSON)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def load_sweep_file(path: str | Path) -> list[dict[str, str]]:
    """Read a sweep file: a mapping ``key: [values]`` (a grid) or a list of mappings (one task each).

    Returns the tasks' parameter sets (values as CLI strings).
    """
    path = Path(path)
    if not path.is_file():
        raise SubmitError(f"sweep file '{path}' does not exist; pass a YAML file of 'key: [values]'")
    from spherinator.config import check_yaml  # here: status, logs and cancel import this module, not jsonargparse
    from spherinator.errors import ConfigError

    try:
        text = path.read_text()
        check_yaml(text, f"sweep file '{path}'")  # a key given twice, 010 read as 8: as -c files are read
        content = yaml.safe_load(text)
    except ConfigError as err:
        raise SubmitError(str(err)) from err
    except UnicodeDecodeError as err:
        raise SubmitError(f"sweep file '{path}' is not a text file ({err}); pass a YAML file") from err
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise SubmitError(f"sweep file '{path}' is not valid YAML{at}: {str(err).splitlines()[0]}") from err
    if isinstance(content, dict):
        axes = []
        for key, values in content.items():
            if not isinstance(values, list) or not values:
                raise SubmitError(
                    f"sweep file '{path}': '{key}' must be a non-empty list of values (got {values!r}); "
                    f"write e.g. '{key}: [3, 8]'"
                )
            axes.append((str(key), [_as_cli_value(v) for v in values]))
        return _grid(axes)
    if isinstance(content, list) and content and all(isinstance(item, dict) for item in content):
        return [{str(k): _as_cli_value(v) for k, v in item.items()} for item in content]
    raise SubmitError(
        f"sweep file '{path}' holds {type(content).__name__}; write a mapping 'key: [values]' (a grid) "
        "or a list of mappings (one task each)"
    )


def _same_key(key: str) -> str:
    """``model.init_args.z_dim`` and ``model.z_dim`` set the same value: compare keys without ``init_args``."""
    return ".".join(p for p in key.split(".") if p != "init_args")


def _same_value(value: str) -> Any:
    """What a value sets, for telling identical tasks: ``1e-3`` and ``0.001`` are one number."""
    try:
        number = float(value)
    except ValueError:
        return value
    return number if math.isfinite(number) else value


def _grid(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    for key, values in axes:
        seen: dict[Any, str] = {}
        for value in values:
            same = seen.setdefault(_same_value(value), value)
            if same != value or values.count(value) > 1:
                twice = f"{value} twice" if same == value else f"{same} and {value}, one number,"
                raise SubmitError(f"'{key}' sweeps {twice} which makes identical tasks; list each value once")
    keys = [key for key, _ in axes]
    same = [_same_key(key) for key in keys]
    if len(set(same)) != len(same):
        duplicate = next(k for k, n in zip(keys, same, strict=True) if same.count(n) > 1)
        raise SubmitError(f"'{duplicate}' is swept twice; give all its values in one --sweep")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(values for _, values in axes))]


def expand_sweep(sweep_args: list[str] | None = None, sweep_file: str | Path | None = None) -> list[Task]:
    """The tasks of a sweep: the grid of all ``--sweep`` flags times the sweep file's tasks.

    Without any sweep there is one task, named ``run``.
    """
    flag_sets = _grid([parse_sweep_arg(arg) for arg in sweep_args or []])
    file_sets = load_sweep_file(sweep_file) if sweep_file is not None else [{}]
    param_sets = []
    for file_params, flag_params in itertools.product(file_sets, flag_sets):
        clash = sorted({_same_key(k) for k in file_params} & {_same_key(k) for k in flag_params})
        if clash:
            raise SubmitError(f"'{clash[0]}' is swept both in the sweep file and by --sweep; keep one")
        param_sets.append({**file_params, **flag_params})
    seen: dict[tuple, int] = {}
    for i, params in enumerate(param_sets):  # a sweep file's list may give one task twice
        key = tuple(sorted((_same_key(k), _same_value(v)) for k, v in params.items()))
        if key in seen:
            raise SubmitError(
                f"tasks {seen[key]} and {i} of the sweep set the same values ({params or 'none'}), which makes "
                "identical tasks; give each task once"
            )
        seen[key] = i
    names = task_names(param_sets)
    pairs = zip(names, param_sets, strict=True)
    return [Task(index=i, name=name, params=params) for i, (name, params) in enumerate(pairs)]


def short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key (dropping ``init_args``) that tells the keys apart."""
    parts = {key: _same_key(key).split(".") for key in keys}
    short = {}
    for key, key_parts in parts.items():
        for n in range(1, len(key_parts) + 1):
            candidate = ".".join(key_parts[-n:])
            others = [".".join(p[-n:]) for k, p in parts.items() if k != key]
            if candidate not in others:
                break
        short[key] = candidate
    return short


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+\-=]+", "-", text).strip("-")[:60] or "x"


def name_parts(param_sets: list[dict[str, Any]]) -> list[list[str]]:
    """The ``key=value`` parts of each task's name (``["z_dim=8", "beta=0.01"]``), keys as short as they can be."""
    keys = list(dict.fromkeys(k for params in param_sets for k in params))
    short = short_keys(keys)
    return [[f"{_clean(short[k])}={_clean(str(v))}" for k, v in params.items()] for params in param_sets]


def task_names(param_sets: list[dict[str, str]]) -> list[str]:
    """Readable, unique directory names: ``z_dim=8_beta=0.01`` (``run`` when nothing is swept)."""
    names = ["_".join(parts) if parts else "run" for parts in name_parts(param_sets)]
    unique: list[str] = []
    taken = set(names)
    counts = collections.Counter(names)  # not names.count(): a grid of thousands of tasks would take minutes
    for i, name in enumerate(names):
        if counts[name] > 1:
            candidate, n = f"{name}_{i}", 0
            while candidate in taken:  # a value may itself look like a suffix
                n += 1
                candidate = f"{name}_{i}-{n}"
            taken.add(candidate)
            name = candidate
        unique.append(name)
    return unique
