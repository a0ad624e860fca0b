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
