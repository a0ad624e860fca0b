"""Shared-memory batch buffers that DataLoader workers fill and the main process reads, allocated once.

By default a DataLoader worker hands each batch tensor to the main process by creating a new shared-memory
segment, copying the batch into it and passing the segment's file descriptor over a socket; the main process
maps it and touches every page again. For a 3 MB image batch that costs the worker about 2.5 ms, more than half of
what reading and shuffling the batch costs, and the main process pays again. :class:`BatchSlots` are allocated by
the main process before the workers start: each worker owns a ring of ``depth`` slots per column, writes a batch
into its next slot and yields a :class:`SlotBatch` of a few bytes that names the slot. The main process copies the
slot out (scaling uint8 to float32 in the same pass, which it does anyway) and frees the slot.

A slot is busy from the moment a worker claims it until the main process is done with its :class:`SlotBatch`:
converted, or dropped unconverted (the DataLoader discards prefetched batches when an iteration ends early).
A worker whose next slot is still busy does not wait: it sends that batch the default way. With ``depth`` at
least the DataLoader's ``prefetch_factor`` + 1 this does not happen, since a worker is never asked for more than
``prefetch_factor`` batches beyond the one the main process is converting.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import weakref
from typing import Any

import numpy as np
import torch

from spherinator.data.layout import _empty, uint8_to_float

# The BatchSlots alive in this process by token, so that a SlotBatch dropped unconverted can free its slot.
_LIVE: weakref.WeakValueDictionary[str, BatchSlots] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


def shared_memory_free(directory: str = "/dev/shm") -> int | None:
    """Bytes free where torch puts shared memory on Linux; None where there is no such directory."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


class BatchSlots:
    """Per worker, ``depth`` uint8 batch buffers of ``(batch_size, *shape)`` for each column in ``shapes``.

    Args:
        shapes: Per column, the shape of one sample (uint8 array columns only).
        batch_size: Rows per batch (the largest batch a worker yields).
        num_workers: DataLoader workers.
        depth: Slots per worker.
        context: The workers' multiprocessing context (its lock must come from the same one).
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        batch_size: int,
        num_workers: int,
        depth: int,
        context: Any = multiprocessing,
    ) -> None:
        self.depth = depth
        self.buffers = {  # pages are touched only when the workers write them
            name: _empty((num_workers, depth, batch_size, *shape), torch.uint8, shared=True)
            for name, shape in shapes.items()
        }
        self.busy = torch.zeros((num_workers, depth), dtype=torch.uint8).share_memory_()
        # Taken around every change of ``busy``: the lock's release/acquire order the main process's last read of
        # a slot before the worker's next write to it, on any CPU. Reentrant: a SlotBatch dropped during a
        # garbage collection inside ``free`` frees its own slot.
        self._lock = context.RLock()
        self.token = f"{os.getpid()}-{next(_TOKENS)}"
        # per worker, the batches sent the default way because their slot was busy
        self.fallbacks = torch.zeros(num_workers, dtype=torch.int64).share_memory_()
        self._next = 0  # the slot this process (a worker: each has its own copy) tries next
        _LIVE[self.token] = self

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickled in a spawned process (ddp_spawn ranks, spawned workers): the same shared memory, findable there
        self.__dict__.update(state)
        _LIVE.setdefault(self.token, self)

    @staticmethod
    def size(shapes: dict[str, tuple[int, ...]], batch_size: int, num_workers: int, depth: int) -> int:
        """Bytes of shared memory the slots take."""
        return num_workers * depth * batch_size * sum(math.prod(shape) for shape in shapes.values())

    def claim(self, worker: int) -> int | None:
        """In a worker: the next slot of its ring, marked busy; None (send the batch the default way) when busy."""
        slot = self._next % self.depth
        busy = self.busy.numpy()
        with self._lock:
            if busy[worker, slot]:
                self.fallbacks[worker] += 1
                return None
            busy[worker, slot] = 1
        self._next += 1
        return slot

    def write(self, name: str, worker: int, slot: int, array: np.ndarray) -> None:
        """In a worker: copy the batch ``array`` of column ``name`` into its slot."""
        self.buffers[name].numpy()[worker, slot, : len(array)] = array

    def read(self, name: str, worker: int, slot: int, rows: int) -> np.ndarray:
        """In the main process: the first ``rows`` rows of a slot (a view; valid until the slot is freed)."""
        return self.buffers[name].numpy()[worker, slot, :rows]

    def free(self, worker: int, slot: int) -> None:
        """The worker may write the slot again: in the main process when done with it, in the worker when the
        batch it claimed the slot for failed."""
        with self._lock:
            self.busy.numpy()[worker, slot] = 0


class SlotBatch:
    """What a worker yields for a batch whose slot columns lie in :class:`BatchSlots`: the slot's address, the
    other columns' tensors, and the column order. Frees its slot when dropped in the main process."""

    def __init__(
        self, token: str, worker: int, slot: int, rows: int, columns: dict[str, Any], return_dict: bool
    ) -> None:
        self.token, self.worker, self.slot, self.rows = token, worker, slot, rows
        self.columns = columns  # name -> tensor, or None for a column in the slot
        self.return_dict = return_dict
        self._received = False  # True in the process that unpickled it: that one frees the slot

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # small side columns (ids, labels) travel inline as numpy: cheaper than a shared-memory segment each
        state["columns"] = {n: _inline(t) for n, t in self.columns.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["columns"] = {
            n: torch.from_numpy(t) if isinstance(t, np.ndarray) else t for n, t in state["columns"].items()
        }
        self.__dict__.update(state)
        self._received = True

    def pin_memory(self, device: Any = None) -> SlotBatch:
        """Called by the DataLoader's pin-memory thread: pins the columns that travel as tensors (the slot columns
        are pinned when ``resolve`` converts them)."""
        self.columns = {n: t.pin_memory() if isinstance(t, torch.Tensor) else t for n, t in self.columns.items()}
        return self

    def resolve(self, slots: BatchSlots, pin: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """In the main process: the batch as the model sees it (slot columns scaled to float32), the slot freed."""
        if slots is None or slots.token != self.token:
            raise RuntimeError(f"batch of slots {self.token} resolved with slots {getattr(slots, 'token', None)}")
        batch = {}
        for name, tensor in self.columns.items():
            if tensor is None:
                tensor = uint8_to_float(slots.read(name, self.worker, self.slot, self.rows), pin)
            batch[name] = tensor
        self._free(slots)
        return batch if self.return_dict else next(iter(batch.values()))

    def _free(self, slots: BatchSlots | None) -> None:
        if self._received and slots is not None:
            slots.free(self.worker, self.slot)
        self._received = False

    def __del__(self) -> None:
        if self._received:  # dropped unconverted (an iteration that ended early)
            self._free(_LIVE.get(self.token))


def _inline(tensor: torch.Tensor | None) -> torch.Tensor | np.ndarray | None:
    """A small CPU tensor as a numpy array (pickled by value); others, and dtypes numpy lacks (bfloat16), as they
    are (shared by torch's pickler)."""
    # exactly torch.Tensor: subclasses (torchvision's tv_tensors) keep their type the torch way
    if type(tensor) is not torch.Tensor or tensor.device.type != "cpu" or tensor.nbytes > 65536:
        return tensor
    if tensor.requires_grad:
        return tensor
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError):
        return tensor
