"""spherinator.staging: stage beside the destination, publish by rename, nothing half-published on failure."""

from __future__ import annotations

import errno

import pytest

from spherinator.staging import move_files, replace_dir, staged_dir, staged_file


class Refused(ValueError):
    pass


def test_a_staged_directory_replaces_the_old_one_or_leaves_it(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    full = r"cannot write the atlas under '.*' \(No space left on device\)"
    with pytest.raises(Refused, match=full), staged_dir(dest, Refused, "atlas") as staging:
        (staging / "new.txt").write_text("new")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (dest / "old.txt").read_text() == "old"
    with staged_dir(dest, Refused) as staging:
        (staging / "new.txt").write_text("new")
        replace_dir(staging, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in dest.iterdir()] == ["new.txt"]
    with pytest.raises(FileNotFoundError), staged_dir(dest, Refused):  # not the disk's fault: passed on as it is
        raise FileNotFoundError(errno.ENOENT, "gone", "input.parquet")


def test_move_files_replaces_only_the_named_files(tmp_path):
    dest = tmp_path / "onnx"
    dest.mkdir()
    (dest / "encoder.onnx.data").write_text("old sidecar")
    (dest / "README.txt").write_text("mine")
    with staged_dir(dest) as staging:
        (staging / "encoder.onnx").write_text("new")
        move_files(staging, dest, replaces=["encoder.onnx*"])
    assert sorted(p.name for p in dest.iterdir()) == ["README.txt", "encoder.onnx"]


def test_a_staged_file_is_published_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "page.html"
    dest.write_text("old")
    with pytest.raises(Refused, match="Read-only file system"), staged_file(dest, Refused, "page") as tmp:
        tmp.write_text("half")
        raise OSError(errno.EROFS, "Read-only file system")
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"] and dest.read_text() == "old"
    with staged_file(dest) as tmp:
        tmp.write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"] and dest.read_text() == "new"


def test_a_directory_in_the_way_of_a_staged_file_is_the_callers_error(tmp_path):
    from spherinator.errors import AtlasError

    (tmp_path / "page.html").mkdir()  # was an IsADirectoryError traceback from os.replace
    words = r"cannot write the page under '.*' \(Is a directory\); nothing was replaced"
    with pytest.raises(AtlasError, match=words), staged_file(tmp_path / "page.html", AtlasError, "page") as tmp:
        tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"] and (tmp_path / "page.html").is_dir()


def test_sigterm_ends_the_block_and_removes_what_was_staged(tmp_path):
    import os
    import signal
    import time

    from spherinator.staging import exit_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    # Python's default SIGTERM ended the process at once: `scancel` left .out.partial-* (a whole HiPS) behind
    with pytest.raises(SystemExit) as info, exit_on_sigterm(), staged_dir(tmp_path / "out") as staging:
        (staging / "half.txt").write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode: this sleep is cut short
    assert info.value.code == 143 and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous


STAGE_AND_HANG = """
import os, signal, sys, time
from pathlib import Path
from spherinator import staging
dest = Path(sys.argv[1])
with staging.staged_dir(dest) as staged:
    (staged / "tile.png").write_bytes(b"x" * 1000)
    print(staged.name, flush=True)
    if len(sys.argv) > 2:  # killed between replace_dir's two renames: the old dest is aside, the new not yet there
        replace = os.replace
        def kill_at_second(src, dst, calls=[]):
            calls.append(src)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)
        staging.os.replace = kill_at_second
        staging.replace_dir(staged, dest)
    time.sleep(60)
"""


def stage_and_kill(dest, *args):
    import signal
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", STAGE_AND_HANG, str(dest), *args], stdout=subprocess.PIPE, text=True
    )
    staged = child.stdout.readline().strip()
    if not args:
        child.kill()
    assert child.wait() == -signal.SIGKILL and staged
    return staged, child.pid


def tag(pid: int) -> str:
    """A staging name's writer: this host, this pid namespace, ``pid``."""
    import os
    import socket

    return f"{socket.gethostname()}-{os.stat('/proc/self/ns/pid').st_ino}-{pid}"


def test_what_a_killed_writer_staged_is_removed_by_the_next_one_on_the_host(tmp_path):
    import socket

    dest = tmp_path / "atlas"
    dest.mkdir()
    (dest / "index.html").write_text("old")
    staged, _ = stage_and_kill(dest)  # SIGKILL: no handler runs, the staging dir stays (it may hold a whole HiPS)
    assert (tmp_path / staged).is_dir()
    kept = [
        f".atlas.partial-{tag(1)}-x",  # pid 1 lives: another writer, still at work
        ".atlas.partial-elsewhere-1-12345-x",  # its process cannot be asked from here
        f".atlas.partial-{socket.gethostname()}-1-12345-x",  # another pid namespace (a container) on this host
        f".atlas.partial-{socket.gethostname()}-12345-777-abcdefgh",  # was: host 'vm' read 12345 as the pid
        f".atlas.partial-{tag(10**30)}",  # was: OverflowError
        f".atlas.partial-{tag(1)[:-1]}\u00b2",  # was: ValueError on a superscript digit
    ]
    for name in kept:
        (tmp_path / name).mkdir()
    with staged_dir(dest) as staging:
        assert not (tmp_path / staged).exists()
        (staging / "index.html").write_text("new")
        replace_dir(staging, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["atlas", *kept])
    assert (dest / "index.html").read_text() == "new"


def test_a_writer_killed_between_the_two_renames_gets_the_old_directory_back(tmp_path):
    dest = tmp_path / "atlas"
    dest.mkdir()
    (dest / "index.html").write_text("old")
    stage_and_kill(dest, "between the renames")
    aside = [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert not dest.exists() and len(aside) == 1
    with staged_dir(dest):
        assert (dest / "index.html").read_text() == "old"  # the previous atlas is back where it was
    assert [p.name for p in tmp_path.iterdir()] == ["atlas"]


def test_a_link_named_like_a_directory_moved_aside_is_removed_not_made_the_destination(tmp_path, dead_pid):
    # was: the link was "restored" as the destination, and export wrote its files through it into the target
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "encoder.onnx").write_text("mine")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f".onnx.old-{tag(dead_pid)}").symlink_to(precious)
    with staged_dir(tmp_path / "out" / "onnx") as staging:
        (staging / "encoder.onnx").write_text("new")
        move_files(staging, tmp_path / "out" / "onnx")
    assert (precious / "encoder.onnx").read_text() == "mine" and not (tmp_path / "out" / "onnx").is_symlink()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["onnx"]


def test_a_leftover_of_a_process_that_had_this_pid_before_is_cleared(tmp_path):
    import os

    # a container restarted: the writer's pid is this process's now. was: "Directory not empty" at every rerun
    dest = tmp_path / "atlas"
    dest.mkdir()
    (tmp_path / f".atlas.old-{tag(os.getpid())}").mkdir()
    (tmp_path / f".atlas.old-{tag(os.getpid())}" / "stale").write_text("x")
    with staged_dir(dest) as staging:
        replace_dir(staging, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["atlas"]


@pytest.fixture
def dead_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
