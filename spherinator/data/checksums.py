"""Which row groups a run has read with their page checksums verified, so that later epochs read them unverified.

Verifying the CRC32 of every data page costs more than reading it: pyarrow read the benchmark's uncompressed
3x128x128 uint8 row groups at about 0.4x its speed without the check (``tools/bench/bench_data.py``), and every
epoch paid it again on bytes that had not changed. A :class:`ChecksumMemory` remembers, per row group, that it was
read verified, in shared memory allocated by the process that builds the readers: DataLoader workers (persistent or
started anew each epoch, forked or spawned) read and set the same flags, so each row group of a file is verified on
its first read by that process tree, i.e. once per DDP rank. A file whose identity (inode, size, modification time)
is not the one scanned when the run started is verified on every read: a copy or re-write during the run is
checked again. What is not caught: bytes of a file that rot on disk after their first read, unchanged in size and
time (``page_checksums="every_read"`` checks every read for that).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spherinator.data.layout import DataError

CHECKSUM_MODES = ("first_read", "every_read")
"""``first_read``: each row group's page checksums are verified on its first read in a run (per rank);
``every_read``: on every read."""

Stamp = tuple[int, int, int]


def check_checksum_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`CHECKSUM_MODES`, else a DataError naming it."""
    if mode not in CHECKSUM_MODES:
        raise DataError(f"page_checksums={mode!r} is not one of {', '.join(map(repr, CHECKSUM_MODES))}; write one")
    return mode


def file_stamp(path: Path) -> Stamp | None:
    """What tells a file from its re-written self: (inode, size, modification time in ns); None when it is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class ChecksumMemory:
    """One flag per row group of a dataset: read with its page checksums verified, in shared memory.

    Args:
        files: The dataset's files.
        groups: The number of row groups of each file, in file order (as :class:`ParquetIndex` scans them).
        stamps: Each file's :func:`file_stamp` when it was scanned.
    """

    def __init__(self, files: Sequence[Path], groups: Sequence[int], stamps: Sequence[Stamp | None]) -> None:
        self.files = list(files)
        self.stamps = list(stamps)
        self.first = [0, *itertools.accumulate(groups)]  # the flag of row group g of file f: first[f] + g
        # allocated before any worker starts: forked workers inherit it, spawned ones receive it by torch's pickler.
        # A process without torch loaded has no DataLoader workers (the atlas of an ONNX export reads in numpy and
        # imports no torch): its flags are its own.
        if "torch" in sys.modules:
            import torch

            self.flags = torch.zeros(self.first[-1], dtype=torch.uint8).share_memory_()
        else:
            self.flags = np.zeros(self.first[-1], dtype=np.uint8)

    def needed(self, file: int, group: int) -> bool:
        """Whether row group ``group`` of file number ``file`` must be read verified: not yet read so, or its file
        is not the one scanned (an ``os.stat``, a microsecond against milliseconds of reading)."""
        if not self._array()[self.first[file] + group]:
            return True
        return file_stamp(self.files[file]) != self.stamps[file]

    def verified(self, file: int, group: int) -> None:
        """Row group ``group`` of file number ``file`` was just read with its checksums verified."""
        self._array()[self.first[file] + group] = 1

    def _array(self) -> np.ndarray:
        """The flags as a numpy array (a view of the shared tensor's memory)."""
        return self.flags if isinstance(self.flags, np.ndarray) else self.flags.numpy()

    def count(self) -> int:
        """Row groups read verified so far."""
        return int(self.flags.sum())
