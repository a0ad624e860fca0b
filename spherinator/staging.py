"""Write beside the destination under a temporary name, publish by rename: an interrupted or failed write (a kill,
a full or read-only disk) leaves the destination as it was and no half-written files behind.

``staged_dir`` stages a directory (published whole by :func:`replace_dir`, or file by file by :func:`move_files`);
``staged_file`` stages one file and publishes it when the block ends without error. Staged names carry the
writer's host and pid: what a writer killed outright left behind is cleared by the next writer of the same
destination on that host (:func:`remove_leftovers`). A disk error while staging or
publishing is raised as the caller's error class, in one line naming the destination. :func:`exit_on_sigterm` lets
a SIGTERM (Slurm's ``scancel`` and time limit, ``kill``) end a command through these blocks, so that they remove
what they staged.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from spherinator.errors import NO_ROOM_ERRNOS

# A disk that is full, read-only or not ours: the user's to fix. Other OSErrors (a missing input) pass unchanged.
DISK_WORDS = ("No space left", "Read-only file system", "Permission denied", "Disk quota")
SIGTERM_EXIT = 143  # 128 + 15: the status of a process ended by SIGTERM


def output_dir_contents(path: Path, name: str, error: type[Exception], fix: str) -> list[str]:
    """The names in an output directory ``path`` (empty when it does not exist yet), refusing a path that cannot be
    one: a link to nothing, a file, or a place under a file.

    Args:
        path: The directory a command is about to write.
        name: How messages name it (``"-o atlas"``, ``"export_path 'out'"``).
        error: The command's error class, raised with one line.
        fix: What to give instead, ending each message.
    """
    if path.is_symlink() and not path.exists():
        raise error(f"{name} is a link to nothing ({os.readlink(path)}); {fix}")
    if not path.exists():
        above = next(parent for parent in path.absolute().parents if parent.exists())
        if not above.is_dir():
            raise error(f"{name}: '{above}' is a file, so no directory can be made there; {fix}")
        return []
    if not path.is_dir():
        raise error(f"{name} is a file, not a directory; {fix}")
    return sorted(p.name for p in path.iterdir())


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` (Python's default ends the process at once, leaving
    staged files behind); the previous handler is restored after. Only in the main thread, where handlers can be
    set; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(SIGTERM_EXIT)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def is_disk_error(err: OSError) -> bool:
    """Whether ``err`` says the disk cannot take the write (pyarrow's errors carry no errno, only the words)."""
    return err.errno in NO_ROOM_ERRNOS or any(word in str(err) for word in DISK_WORDS)


def _disk_error(error: type[Exception], dest: Path, err: OSError, what: str) -> Exception:
    return error(f"cannot write the {what} under '{dest.parent}' ({err.strerror or err}); nothing was replaced: "
                 "free space, or give a directory you can write")  # fmt: skip


def _writer_tag() -> str:
    """``<host>-<pid namespace>-<pid>``: whose staged files these are, so that a later writer can tell leftovers
    (a pid means one process only within its host and pid namespace: containers on one host share the name)."""
    return f"{socket.gethostname()}-{_pid_namespace()}-{os.getpid()}"


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _dead_writer(pid: int) -> bool:
    """Whether the writer ``pid`` of this host and pid namespace no longer runs. A live pid may be a writer still at
    work: kept. This process's own pid is a leftover of an earlier process that had it (a block removes what it
    staged when it ends)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):  # alive (another user's), or no pid at all: not ours to judge
        return False
    return False


def remove_leftovers(dest: Path) -> None:
    """Clear what writers of ``dest`` killed outright (SIGKILL, a node lost) left beside it: their staging files
    and directories are removed; a previous ``dest`` directory that :func:`replace_dir` had moved aside when the
    kill came, with no new one published, is put back (a link moved aside is only removed: what it points to stays
    as it is, and is not made the destination again).

    A leftover is named ``.<dest>.partial-<tag>`` (``-<random>`` more for a directory) or ``.<dest>.old-<tag>``, with
    the tag of :func:`_writer_tag`, matched whole: a writer on another host or in another pid namespace cannot be
    asked whether it still runs, and its files are kept."""
    if not dest.parent.is_dir():
        return
    prefix = f".{dest.name}."
    tag = re.escape(socket.gethostname()) + rf"-{_pid_namespace()}-([0-9]{{1,10}})"
    leftover = re.compile(re.escape(prefix) + rf"(old|partial)-{tag}(?:-[A-Za-z0-9_]+)?", re.ASCII)
    for path in dest.parent.iterdir():
        found = leftover.fullmatch(path.name) if path.name.startswith(prefix) else None
        if found is None or not _dead_writer(int(found.group(2))):
            continue
        if found.group(1) == "old" and not (dest.exists() or dest.is_symlink() or path.is_symlink()) and path.is_dir():
            os.replace(path, dest)
        else:
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged_dir(dest: str | Path, error: type[Exception] = OSError, what: str = "files") -> Iterator[Path]:
    """A new private directory beside ``dest`` (``.<name>.partial-*``), removed when the block ends; publish it
    inside the block with :func:`replace_dir` or :func:`move_files`.

    Raises:
        error: the directory cannot be made, or the block fails with an ``OSError`` of the disk (full, read-only);
            the message says ``cannot write the <what> under <dest's parent>``.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(dest)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{_writer_tag()}-", dir=dest.parent))
    except OSError as err:
        raise _disk_error(error, dest, err, what) from err
    try:
        yield staging
    except OSError as err:
        if isinstance(err, error) or not is_disk_error(err):
            raise
        raise _disk_error(error, dest, err, what) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(staging: Path, dest: Path) -> None:
    """Put ``staging`` at ``dest``: an older ``dest`` is moved aside first and removed only after the rename."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{_writer_tag()}")
        os.replace(dest, old)
    try:
        os.replace(staging, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)  # put the old one back
        raise
    if old is not None:
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    dest.chmod(0o755)  # mkdtemp made it private


def move_files(staging: Path, dest: Path, replaces: Iterable[str] = ()) -> None:
    """Move the files of ``staging`` into the directory ``dest`` (made if missing), after removing the files there
    matching the glob patterns ``replaces`` (older versions of what is moved in); other files of ``dest`` stay."""
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in replaces:
        for old in dest.glob(pattern):
            old.unlink()
    for file in sorted(staging.iterdir()):
        os.replace(file, dest / file.name)


@contextmanager
def staged_file(dest: str | Path, error: type[Exception] = OSError, what: str = "file") -> Iterator[Path]:
    """A temporary path beside ``dest`` to write; renamed to ``dest`` when the block ends without error, removed
    otherwise.

    Raises:
        error: the file cannot be written or renamed (full or read-only disk).
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.partial-{_writer_tag()}")
    try:
        remove_leftovers(dest)
        yield tmp
        os.replace(tmp, dest)
    except OSError as err:
        if isinstance(err, error) or not (is_disk_error(err) or err.errno in (errno.EISDIR, errno.ENOTDIR)):
            raise
        raise _disk_error(error, dest, err, what) from err
    finally:
        tmp.unlink(missing_ok=True)
