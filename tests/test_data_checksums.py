"""Page checksums: verified on a row group's first read in a run (across DataLoader workers), on every read of a file
changed since the run started, or on every read with ``page_checksums="every_read"``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from spherinator.data import DataError, DataModule, write_dataset
from spherinator.data import reader as reader_module
from spherinator.data.checksums import file_stamp


def _dataset(path: Path) -> Path:
    """64 images of 3x32x32 uint8 in 4 row groups of 16 (48 KiB each), one uncompressed file."""
    images = np.random.default_rng(0).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    write_dataset(path, [{"data": images}], rows_per_group=16, compression="none")
    return path / "part-00000.parquet"


def _flip(file: Path, keep_stamp: bool = False) -> None:
    """Overwrite bytes inside row group 0's data page, in place; with ``keep_stamp`` the file keeps its modification
    time (as bytes rotting on disk would)."""
    stat = file.stat()
    raw = bytearray(file.read_bytes())
    raw[20000:20010] = bytes(255 - b for b in raw[20000:20010])
    with open(file, "r+b") as f:
        f.write(bytes(raw))
    if keep_stamp:
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _module(path: Path, **kwargs) -> DataModule:
    dm = DataModule(path, batch_size=8, val_fraction=0.0, shuffle_buffer=16, **kwargs)
    dm.setup("fit")
    return dm


def _epoch(loader) -> int:
    return sum(len(batch) for batch in loader)


def test_each_row_group_is_verified_on_its_first_read_only(tmp_path, monkeypatch):
    _dataset(tmp_path)
    verified, get = [], reader_module._Handles.get

    def spy(self, file, verify=True):
        verified.append(verify)
        return get(self, file, verify)

    monkeypatch.setattr(reader_module._Handles, "get", spy)
    dm = _module(tmp_path)
    loader = dm.train_dataloader()
    assert _epoch(loader) == 64 and verified == [True] * 4 and dm.index.checksums.count() == 4
    verified.clear()
    assert _epoch(loader) == 64 and verified == [False] * 4  # the next epoch reads them unverified
    verified.clear()
    assert _epoch(dm.predict_dataloader()) == 64 and verified == [False] * 4  # every loader of the DataModule


def test_every_read_verifies_every_epoch(tmp_path, monkeypatch):
    _dataset(tmp_path)
    verified, get = [], reader_module._Handles.get
    monkeypatch.setattr(reader_module._Handles, "get", lambda self, f, v=True: verified.append(v) or get(self, f, v))
    loader = _module(tmp_path, page_checksums="every_read").train_dataloader()
    assert _epoch(loader) == 64 and _epoch(loader) == 64 and verified == [True] * 8


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_row_group_is_caught_on_its_first_read(tmp_path, workers):
    _flip(_dataset(tmp_path))
    loader = _module(tmp_path, num_workers=workers, persistent_workers=False).train_dataloader()
    with pytest.raises(DataError, match="part-00000.parquet row group 0 cannot be read.*corrupt"):
        _epoch(loader)


def test_a_file_rewritten_during_the_run_is_verified_again(tmp_path):
    file = _dataset(tmp_path)
    loader = _module(tmp_path).train_dataloader()
    assert _epoch(loader) == 64
    _flip(file)  # a new modification time: not the file scanned, so its reads are verified again
    with pytest.raises(DataError, match="part-00000.parquet row group 0 cannot be read.*corrupt"):
        _epoch(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_rewritten_in_place_with_its_old_time_is_verified_again(tmp_path, workers):
    # (before: a corrupt copy put over it with `cp -p`, or a re-write followed by `touch -d`, kept its inode, size
    # and modification time, and its row groups were read unverified: garbage trained on without a word)
    file = _dataset(tmp_path)
    loader = _module(tmp_path, num_workers=workers, persistent_workers=False).train_dataloader()
    assert _epoch(loader) == 64
    _flip(file, keep_stamp=True)
    with pytest.raises(DataError, match="part-00000.parquet row group 0 cannot be read.*corrupt"):
        _epoch(loader)


def test_what_workers_verified_is_remembered_when_they_exit(tmp_path):
    # bytes that rot on disk after their first read are read unverified (the price of first_read): that they are
    # shows that the workers of the first epoch, gone since, left their flags
    file = _dataset(tmp_path)
    dm = _module(tmp_path, num_workers=2, persistent_workers=False)
    loader = dm.train_dataloader()
    assert _epoch(loader) == 64 and dm.index.checksums.count() == 4  # set by the workers, seen here
    _flip(file, keep_stamp=True)
    # rot on disk leaves every time alone; a write sets the status-change time, so the scan's stamp is made to match
    dm.index.checksums.stamps[0] = file_stamp(file)
    assert _epoch(loader) == 64
    every = _module(tmp_path, num_workers=2, persistent_workers=False, page_checksums="every_read")
    with pytest.raises(DataError, match="row group 0 cannot be read"):
        _epoch(every.train_dataloader())


def test_an_unknown_checksum_mode_is_one_error(tmp_path):
    with pytest.raises(DataError, match="page_checksums='always' is not one of 'first_read', 'every_read'"):
        DataModule(tmp_path, page_checksums="always")
