"""Errors a user can cause, and how every command reports them: one line ``PROG: error: ...``, exit status 2.

Every user-error class of spherinator is defined here (the modules that raise them re-export their names):
:class:`ConfigError` (a config that cannot describe one model), :class:`DataError` (a dataset that cannot be read as
asked), :class:`CheckpointError` and :class:`DamagedCheckpointError`, :class:`ExportError` and
:class:`ValidationError`, :class:`OutputError`, :class:`SubmitError`, :class:`AtlasError` and :class:`NotASphereError`,
:class:`NonFiniteLossError`. Their messages name the bad value and the fix.

:func:`one_line_errors` wraps a command: a user error ends in one line and :data:`USER_ERROR_EXIT`, any other error
is a bug and keeps its traceback. This module imports nothing heavy (``spherinator --help`` imports it).
"""

from __future__ import annotations

import difflib
import errno
import importlib
import inspect
import os
import re
import sys
import traceback
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# The exit status of a command that stops on bad input (argparse's own, for its usage errors).
USER_ERROR_EXIT = 2

# The commands that are LightningCLI's: a parse error's hint names the one in argv (`spherinator fit --help`).
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class ConfigError(ValueError):
    """A configuration that cannot describe one consistent model."""


class DataError(ValueError):
    """A dataset that cannot be read as asked; the message names the value and the fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: damaged, or not written by Lightning."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that does not load (cut short while it was written, or no checkpoint at all)."""


class ExportError(RuntimeError):
    """An export that cannot go on: a bad input file, a mismatch, or a graph that cannot be exported."""


class ValidationError(ExportError):
    """onnxruntime disagrees with torch on an exported graph; the files and the JSON report were still written.

    Attributes:
        report: The export report (also at ``export_path/export_report.json``).
    """

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


class OutputError(ValueError):
    """A place to write to that cannot take the output: a link out of it, a file where a folder goes, no space."""


class SubmitError(ValueError):
    """A submission that cannot go on; the message names the task, the value and what to do."""


class AtlasError(ConfigError):
    """Bad input to the atlas (a path, a model, a setting): its message names the value and the fix."""


class NotASphereError(AtlasError):
    """The model's latent space is not S^2 (z_dim other than 3): there is no sphere to draw."""


class NonFiniteLossError(ConfigError):
    """Training or evaluation reached a NaN/inf loss or gradient; the run stops before the weights take it.

    A ConfigError (the CLI prints it as one line): the usual cause is a learning rate too high for the model, the
    other one data of extreme size (NaN/inf in the data are refused when they are read)."""


# An OSError of the place written to, not of the code: a full, read-only or foreign disk, a file where a folder goes
# (a log directory `runs` that is a file). Its message names the path: the user's to fix, in one line.
# The disk cannot take the write: full, read-only, no permission, over quota or file size.
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG})
# ... or a file or folder stands where the other is written.
DISK_ERRNOS = NO_ROOM_ERRNOS | {errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def disk_error(err: BaseException) -> OutputError | None:
    """An :class:`OutputError` for an ``OSError`` of the disk that names its path (see :data:`DISK_ERRNOS`), else
    None."""
    if not isinstance(err, OSError) or err.errno not in DISK_ERRNOS:
        return None
    if not err.filename and err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return None  # which path? (a write to a full disk needs none to be clear)
    where = f" {err.filename}" if err.filename else ""
    return OutputError(
        f"cannot write{where} ({err.strerror or err}): free space, or give a directory you can write (where a "
        "folder goes, no file of that name)"
    )


# Bad input by definition, whatever raised it.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, ExportError, OutputError, SubmitError)


def _misconfiguration() -> tuple[type[BaseException], ...]:
    # Lightning's MisconfigurationException (a ModelCheckpoint monitoring a metric never logged) is bad input too;
    # an error can only be one when Lightning is loaded, and importing it here would make `--help` import torch.
    module = sys.modules.get("lightning.fabric.utilities.exceptions")
    return (module.MisconfigurationException,) if module is not None else ()


def user_error(err: BaseException | None) -> BaseException | None:
    """The error in ``err``'s chain that bad input caused, else None (a bug: keep the traceback).

    The classes of :data:`USER_ERRORS` are bad input by definition, and so is Lightning's MisconfigurationException.
    A class that refuses its arguments while jsonargparse builds it (a model's ``ValueError("z_dim must be >= 2
    ...")``) reaches us wrapped in jsonargparse's "Does not validate against any of the Union subtypes"; the refusal
    itself is the message to show.
    """
    known = USER_ERRORS + _misconfiguration()
    wrapped = False
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, known):
            return err
        if (disk := disk_error(err)) is not None:
            return disk
        frames = traceback.extract_tb(err.__traceback__)
        in_jsonargparse = bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename
        if wrapped and not in_jsonargparse and isinstance(err, ValueError | TypeError | OSError):
            return err
        wrapped = wrapped or in_jsonargparse
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def one_line_errors(prog: str, argv: list[str]) -> Iterator[None]:
    """Bad input (a parse error, or an error :func:`user_error` finds) ends in one line ``PROG: error: ...`` and
    exit status :data:`USER_ERROR_EXIT`; any other error is a bug and keeps its traceback.

    ``argv``: the command's arguments; the Lightning command among them (if any) names the ``--help`` to see.
    """
    try:
        yield
    except ArgumentError as err:
        print(f"{prog}: error: {parse_error_line(err, argv)}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"{prog}: error: {one_line(cause)}", file=sys.stderr)  # its message says what to change
        raise SystemExit(USER_ERROR_EXIT) from None


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (its lines joined), or its class name when it has none."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text or type(err).__name__


_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_NOT_ACCEPTED_BY_SUBCOMMAND = re.compile(r"^Subcommand '\w+' does not accept option '([^']+)'")


# The classes LightningCLI types `model` and `data` with: init_args for them mean the config names no class yet
_BASE_CLASSES = {
    "LightningDataModule": "spherinator.data.DataModule",
    "LightningModule": "spherinator.models.VariationalAutoencoder",
}


def _error_chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    link: BaseException | None = err
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


def _config_path(chain: list[BaseException]) -> tuple[list[str], str | None]:
    """The keys (``model``, ``init_args``, ``beta``) jsonargparse's nested messages name, and the innermost class."""
    path: list[str] = []
    class_path = None
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
    return path, class_path


def parse_error_line(err: ArgumentError, argv: list[str]) -> str:
    """jsonargparse's error as one line: where in the config (``model.init_args.beta``), the innermost reason,
    and a hint to ``--help``.

    jsonargparse nests its message one level per key and class (``Parser key "model": ... Problem with given
    class_path ...: Parser key "beta": Expected a <class 'float'>. Got value: nan``), each level the cause of
    the one above; the path is read off that chain.
    """
    chain = _error_chain(err)
    path, class_path = _config_path(chain)
    reason = " ".join(line.strip() for line in str(chain[-1]).strip().splitlines() if line.strip())
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reason).replace("Expected a int", "Expected an int")
    if path and path[-1] == "init_args" and class_path and not _NOT_ACCEPTED.match(reason):
        path.pop()  # the class itself is the problem, not one of its arguments
        reason = f"class_path {class_path!r}: {reason}"
    base = (class_path or "").rpartition(".")[2]
    unknown = _NOT_ACCEPTED.match(reason)
    if unknown and base in _BASE_CLASSES:
        section = ".".join(path[:-1]) if path and path[-1] == "init_args" else "its section"
        reason += f"; give {section}.class_path first (e.g. {_BASE_CLASSES[base]})"  # the base takes none
    elif unknown and class_path:
        reason += _did_you_mean(unknown.group(1), class_path)
    elif unknown := _NOT_ACCEPTED_BY_SUBCOMMAND.match(reason):
        section, _, name = unknown.group(1).rpartition(".")
        if section == "trainer":
            reason += _did_you_mean(name, "lightning.pytorch.Trainer", list_all=False)
        elif not section:
            sections = ["model", "data", "trainer", "optimizer", "lr_scheduler", "ckpt_path", "seed_everything"]
            reason += _did_you_mean(name, sections)
    where = ".".join(path).replace(".[...]", "[...]")
    subcommand = next((a for a in argv if a in LIGHTNING_COMMANDS), None)
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
