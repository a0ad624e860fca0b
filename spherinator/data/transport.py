"""How a batch travels: from a :class:`~spherinator.data.reader.ParquetReader`'s arrays to the tensors the model sees,
in the main process or through DataLoader workers.

:class:`ParquetStream` is the ``IterableDataset`` that wraps a reader: it turns each batch's arrays into tensors
(:func:`to_tensor`: uint8 arrays scaled to float32 in [0, 1]) and applies the columns' transforms. :class:`Loader`
is the DataLoader over it; with workers it gives the stream a :class:`Handover` that makes the workers send uint8
array columns unscaled (4x fewer bytes; the loader scales them) through shared buffers allocated once
(:class:`BatchSlots`), and DataErrors as batches that the loader raises with their one-line message. The loader also
tells the stream the epoch before every pass and is resumable in the middle of an epoch.

Under a Trainer (``scale_on_device``) uint8 array columns without a transform are not scaled here at all: they travel
to the device as uint8 (a quarter of the bytes to pin and copy) and the DataModule's ``on_after_batch_transfer``
scales them there with :func:`scale_on_device`, to the same floats. A column with a transform is scaled on the CPU
before it: transforms take floats in [0, 1] and run where the batch is made (in the workers).

Shared buffers: by default a DataLoader worker hands each batch tensor to the main process by creating a new
shared-memory segment, copying the batch into it and passing the segment's file descriptor over a socket; the main
process maps it and touches every page again. For a 3 MB image batch that costs the worker about 2.5 ms, more than
half of what reading and shuffling the batch costs, and the main process pays again. :class:`BatchSlots` are
allocated by the main process before the workers start: each worker owns a ring of ``depth`` slots per column,
writes a batch into its next slot and yields a :class:`SlotBatch` of a few bytes that names the slot. The main
process copies the slot out (scaling uint8 to float32 in the same pass, unless the device scales) and frees the slot.

A slot is busy from the moment a worker claims it until the main process is done with its :class:`SlotBatch`:
converted, or dropped unconverted (the DataLoader discards prefetched batches when an iteration ends early).
A worker whose next slot is still busy does not wait: it sends that batch the default way. With ``depth`` at
least the DataLoader's ``prefetch_factor`` + 1 this does not happen, since a worker is never asked for more than
``prefetch_factor`` batches beyond the one the main process is converting.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import itertools
import math
import multiprocessing
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from spherinator.data.layout import ColumnLayout, DataError
from spherinator.data.plan import Pass
from spherinator.data.reader import ParquetReader

Batch = torch.Tensor | dict[str, Any]


# -- tensors ----------------------------------------------------------------------------------------------------------


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory: a DataLoader worker hands it to the main process without the copy
    into a new shared-memory segment its pickler makes of an ordinary tensor.

    The one private torch call of spherinator.data, kept here: torch's public API has no way to allocate in shared
    memory directly (``Tensor.share_memory_()`` moves a tensor that exists, copying its bytes: one more pass over
    every batch); ``_new_shared`` is what torch's own ``default_collate`` calls to build a batch in a worker.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


_FLOATS = {2: torch.float16, 4: torch.float32, 8: torch.float64}  # numpy float itemsize -> torch dtype


def to_tensor(array: np.ndarray, layout: ColumnLayout, shared: bool = False) -> torch.Tensor | list[str]:
    """The tensor the model sees: arrays of uint8 scaled to float32 in [0, 1], other arrays as float32;
    integer/boolean scalars as int64, floating scalars in their stored dtype (a float64 MJD or RA stays exact).
    Always a new tensor (never a view of Arrow memory); in shared memory with ``shared``. A string column becomes a
    list of ``str``."""
    if layout.kind == "string":
        return array.tolist()
    if layout.is_tensor:
        dtype = torch.float32
    elif array.dtype.kind == "f":
        dtype = _FLOATS[array.dtype.itemsize]
    else:
        dtype = torch.int64
    out = shared_empty(array.shape, dtype) if shared else torch.empty(array.shape, dtype=dtype)
    if array.dtype == np.uint8 and layout.is_tensor:
        return _scale_into(array, out)
    out.numpy()[...] = array
    return out


def _scale_into(array: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """uint8 ``array`` into float32 ``out`` in [0, 1], in one pass (within 1 ulp of x / 255)."""
    np.multiply(array, np.float32(1 / 255), out=out.numpy())
    return out


# The scale of uint8 values, as a float32 (exactly representable): x * _INV255 in float32 is one correctly rounded
# multiply, so numpy on the CPU and torch on any device make the same floats of the same bytes.
_INV255 = float(np.float32(1 / 255))


def scale_on_device(batch: Batch, columns: set[str], first: str) -> Batch:
    """uint8 tensors of the ``columns`` of a batch to float32 in [0, 1], on the device they are on (the GPU, after
    Lightning's transfer): the same floats as :func:`to_tensor` makes on the CPU. ``first``: the column a batch
    that is no dict holds; other dtypes and columns pass as they are."""
    if isinstance(batch, dict):
        return {name: _scaled(value) if name in columns else value for name, value in batch.items()}
    return _scaled(batch) if first in columns else batch


def _scaled(value: Any) -> Any:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        return value
    return value.to(torch.float32).mul_(_INV255)


def unscaled_tensor(array: np.ndarray, shared: bool = False, pin: bool = False) -> torch.Tensor:
    """A uint8 batch as a uint8 tensor for the device to scale: a batch gathered into new memory (a shuffled one)
    as it is, other arrays (views of Arrow memory, of a worker's slot) copied; in shared or page-locked memory
    with ``shared`` / ``pin``."""
    if not (shared or pin) and array.flags.owndata and array.flags.writeable and array.flags.c_contiguous:
        return torch.from_numpy(array)
    if shared:
        tensor = shared_empty(array.shape, torch.uint8)
    else:
        tensor = torch.empty(array.shape, dtype=torch.uint8, pin_memory=pin)
    tensor.numpy()[...] = array
    return tensor


def uint8_to_float(array: np.ndarray, pin: bool = False) -> torch.Tensor:
    """uint8 array -> new float32 tensor in [0, 1]; in page-locked memory with ``pin`` (it then copies to the
    GPU asynchronously)."""
    return _scale_into(array, torch.empty(array.shape, dtype=torch.float32, pin_memory=pin))


def scale_uint8(batch: Batch, pin: bool = False) -> Batch:
    """uint8 tensors of a batch (from workers that send uint8 to move 4x fewer bytes) to float32 in [0, 1]."""
    if isinstance(batch, dict):
        return {name: scale_uint8(tensor, pin) for name, tensor in batch.items()}
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8:  # lists of str pass as they are
        return batch
    return uint8_to_float(batch.numpy(), pin)


def apply_transform(transform: Callable, batch: torch.Tensor, per_sample: bool, name: str) -> torch.Tensor:
    """Apply ``transform`` to a batch ``(B, ...)`` at once, or to each sample with ``per_sample``."""
    try:
        if per_sample:
            return torch.stack([transform(sample) for sample in batch])
        return transform(batch)
    except Exception as err:
        how = "each sample" if per_sample else "a batch"
        hint = "" if per_sample else "; if it only takes one sample, set `per_sample: true` on the column"
        raise DataError(
            f"transform {transform!r} of column {name!r} failed on {how} of shape {tuple(batch.shape)}: {err}{hint}"
        ) from err


def check_transformed(batch: Any, transform: Callable, name: str) -> None:
    """A DataError when ``transform`` made NaN/inf of a column's values (which were checked finite when read)."""
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or not batch.numel():
        return
    if math.isfinite(float(batch.sum(dtype=torch.float32))):  # finite sum: finite values (see check_values)
        return
    bad = ~torch.isfinite(batch.reshape(len(batch), -1)).all(dim=1)
    if bad.any():
        raise DataError(
            f"transform {transform!r} of column {name!r} made values that are not finite (in {int(bad.sum())} of "
            f"{len(batch)} rows) from finite ones; make it finite for every value the column holds (e.g. log1p or a "
            f"clamp before log)"
        )


# -- shared batch buffers ---------------------------------------------------------------------------------------------


def shared_memory_free(directory: str = "/dev/shm") -> int | None:
    """Bytes free where torch puts shared memory on Linux; None where there is no such directory."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


# The BatchSlots alive in this process by token, so that a SlotBatch dropped unconverted can free its slot.
_LIVE: weakref.WeakValueDictionary[str, BatchSlots] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


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
            name: shared_empty((num_workers, depth, batch_size, *shape), torch.uint8) for name, shape in shapes.items()
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
        """In a worker: copy the batch ``array`` of column ``name`` into its slot (unless it was gathered there)."""
        slot_view = self.view(name, worker, slot, len(array))
        if array.__array_interface__["data"][0] != slot_view.__array_interface__["data"][0]:
            slot_view[...] = array

    def view(self, name: str, worker: int, slot: int, rows: int) -> np.ndarray:
        """The first ``rows`` rows of a slot of column ``name``: in a worker to fill, in the main process to read
        (valid until the slot is freed)."""
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

    def resolve(
        self, slots: BatchSlots, pin: bool = False, scale: bool = True
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """In the main process: the batch as the model sees it (slot columns scaled to float32; without ``scale``
        copied out as uint8, for the device to scale), the slot freed."""
        if slots is None or slots.token != self.token:
            raise RuntimeError(f"batch of slots {self.token} resolved with slots {getattr(slots, 'token', None)}")
        batch = {}
        for name, tensor in self.columns.items():
            if tensor is None:
                view = slots.view(name, self.worker, self.slot, self.rows)
                tensor = uint8_to_float(view, pin) if scale else unscaled_tensor(view, pin=pin)
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


# -- the dataset and the loader ---------------------------------------------------------------------------------------


class WorkerError:
    """A DataError raised in a DataLoader worker, sent to the main process as if it were a batch: the loader raises
    it there with its own one-line message (the DataLoader would wrap it in the worker's traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def raise_(self) -> None:
        raise DataError(self.message)


def resolve_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


@dataclasses.dataclass
class Handover:
    """How DataLoader workers send their batches to the main process (given to a :class:`ParquetStream` by
    :class:`Loader`): uint8 array columns without a transform unscaled, in ``slots`` when there are (the loader
    allocates them before the workers start), and a DataError as a :class:`WorkerError` batch."""

    slots: BatchSlots | None = None


class ParquetStream(IterableDataset):
    """Yields whole batches (a tensor, or a dict of tensors) of a :class:`ParquetReader`; use ``batch_size=None``.

    Args:
        reader: The split's reader.
        transforms: Per column, ``(callable, per_sample)``: the callable applied to each batch tensor
            ``(B, *shape)``, or with ``per_sample`` to each sample.
        return_dict: Yield ``{column: tensor}``; else the first column's tensor.
        rank: Override the DDP rank (else from torch.distributed / environment).
        world_size: Override the DDP world size.
        handover: How batches leave a DataLoader worker (set by :class:`Loader` on the copy it iterates).
        unscaled: Yield uint8 array columns without a transform as uint8, for the device to scale
            (:func:`scale_on_device`); else as float32 in [0, 1].
    """

    def __init__(
        self,
        reader: ParquetReader,
        transforms: dict[str, tuple[Callable | None, bool]] | None = None,
        return_dict: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        handover: Handover | None = None,
        unscaled: bool = False,
    ) -> None:
        super().__init__()
        self.reader = reader
        self.transforms = transforms or {}
        self.return_dict = return_dict
        self.rank = rank
        self.world_size = world_size
        self.handover = handover
        self.unscaled = unscaled
        # Shared memory, so persistent DataLoader workers see the epoch the main process sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def handed_over(self, handover: Handover | None = None, unscaled: bool | None = None) -> ParquetStream:
        """This stream (same reader, same epoch) sending its batches from workers as ``handover`` says, and uint8
        unscaled or not as ``unscaled`` says (None: as this one)."""
        stream = copy.copy(self)
        stream.handover = handover
        stream.unscaled = self.unscaled if unscaled is None else unscaled
        return stream

    @property
    def epoch(self) -> int:
        """The epoch whose order the next iteration uses."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (and so the order) of the next iteration."""
        self._epoch.fill_(int(epoch))

    def rank_world(self) -> tuple[int, int]:
        """(rank, world size): the ones given, else torch.distributed's."""
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        return resolve_rank()

    def __len__(self) -> int:
        """Batches this rank yields per epoch (over all its workers)."""
        return self.reader.num_batches(*self.rank_world())

    def resume_after(self, epoch: int, passes: list[Pass] | None) -> int:
        """See :meth:`ParquetReader.resume_after` (None: read whole epochs again); returns the batches this rank then
        yields."""
        return self.reader.resume_after(epoch, passes, *self.rank_world())

    def slot_columns(self) -> dict[str, tuple[int, ...]]:
        """Columns a worker sends through slots: uint8 arrays without a transform, of a shape the schema tells."""
        return {
            name: layout.shape
            for name, layout in self.reader.layouts.items()
            if layout.is_tensor and layout.dtype == np.uint8 and layout.shape is not None
            and name not in self.transforms
        }  # fmt: skip

    def __iter__(self) -> Iterator[Batch | SlotBatch | WorkerError]:
        rank, world = self.rank_world()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slots = self.handover.slots if info is not None and self.handover is not None else None
        claimed: collections.deque[int | None] = collections.deque()  # the slots of batches gathered into them

        def into_slot(rows: int) -> dict[str, np.ndarray]:
            """A worker's shuffled batch is gathered straight into its slot (not copied there afterwards)."""
            slot = slots.claim(worker)
            claimed.append(slot)
            return {} if slot is None else {name: slots.view(name, worker, slot, rows) for name in slots.buffers}

        # Row groups read ahead in threads: two in the main process, so that reading keeps up with converting and
        # training; one in a worker, which is itself one of several readers.
        ahead = 2 if info is None else 1
        arrays = self.reader.batches(
            self.epoch, rank, world, worker, num_workers, ahead, into_slot if slots is not None else None
        )
        batches = (self._finish(batch, info, claimed.popleft() if claimed else _CLAIM) for batch in arrays)
        return batches if info is None or self.handover is None else _errors_as_batches(batches)

    def _finish(self, arrays: dict[str, np.ndarray], info: Any, slot: int | None | object) -> Batch | SlotBatch:
        """The batch of ``arrays`` as it leaves this process; in a worker with slots, ``slot`` is the one the
        reader gathered it into (None: none was free), or ``_CLAIM`` to claim one for it now."""
        handover = self.handover if info is not None else None
        slots = handover.slots if handover is not None else None
        if slot is _CLAIM:
            slot = slots.claim(info.id) if slots is not None else None
        try:
            batch = self._columns(arrays, info, handover, slot)
        except BaseException:
            if slot is not None:  # the batch never leaves this worker: nobody else will free its slot
                slots.free(info.id, slot)
            raise
        if slot is not None:
            rows = len(next(iter(arrays.values())))
            return SlotBatch(slots.token, info.id, slot, rows, batch, self.return_dict)
        return batch if self.return_dict else next(iter(batch.values()))

    def _columns(
        self, arrays: dict[str, np.ndarray], info: Any, handover: Handover | None, slot: int | None
    ) -> dict[str, Any]:
        """Each column's tensor (``info``: the DataLoader worker's, None in the main process); None for a column
        written to ``slot``."""
        in_worker = info is not None
        batch = {}
        for name, array in arrays.items():
            transform, per_sample = self.transforms.get(name, (None, False))
            layout = self.reader.layouts[name]
            # only array columns are sent unscaled; uint8 scalars (labels) become int64 here, as without workers.
            # A column with a transform is scaled here: the transform takes floats in [0, 1], on the CPU.
            unscaled = (handover is not None or self.unscaled) and transform is None
            unscaled = unscaled and layout.is_tensor and array.dtype == np.uint8
            if unscaled and slot is not None and name in handover.slots.buffers:
                handover.slots.write(name, info.id, slot, array)
                batch[name] = None  # in the slot
                continue
            if unscaled:
                tensor = unscaled_tensor(array, shared=in_worker)  # the loader or the device scales it
            else:
                # A tensor a transform replaces need not be shared; the transform's output is sent as usual.
                tensor = to_tensor(array, layout, shared=in_worker and transform is None)
            if transform is not None:
                tensor = apply_transform(transform, tensor, per_sample, name)
                check_transformed(tensor, transform, name)
            batch[name] = tensor
        return batch


_CLAIM = object()  # a batch not gathered into a slot: _finish claims one


def _errors_as_batches(batches: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from batches
    except DataError as err:
        yield WorkerError(str(err))


class TrainProgress(Protocol):
    """Where the run a training :class:`Loader` feeds stands, as a plain integer (the DataModule, at Lightning's
    edge, answers)."""

    def epoch(self) -> int:
        """The epoch the next pass reads."""


class Loader(DataLoader):
    """A DataLoader over a :class:`ParquetStream` that tells it the epoch before every pass (persistent workers
    see it too: the epoch lives in shared memory). With workers, it iterates a copy of the stream that sends uint8
    array columns unscaled (see :class:`Handover`) and scales them to float32 here, which moves 4x fewer bytes from
    the workers; columns of a fixed shape come through shared buffers allocated once (:class:`BatchSlots`) instead
    of a new shared-memory segment per batch.

    A training loader (given ``progress``) is resumable: its state says how its passes over the current epoch cut
    the rows into batches and how many batches they handed out (counted here), and a loader restored from it reads
    the rows not yet handed out, in batches of its own size (see :meth:`load_state_dict`). It learns the epoch from
    ``progress`` as a plain integer and never looks at the trainer itself.

    With ``scale_on_device`` it hands uint8 array columns without a transform on as uint8 (a quarter of the bytes
    to copy, pin and transfer, and no float conversion on the CPU): the DataModule's ``on_after_batch_transfer``
    scales them on the device (:func:`scale_on_device`). ``finish`` turns each batch, in this process, into the one
    handed out (upstream's tuples)."""

    def __init__(
        self,
        dataset: ParquetStream,
        *,
        progress: TrainProgress | None = None,
        scale_on_device: bool = False,
        finish: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.handover = Handover() if kwargs.get("num_workers", 0) > 0 else None
        self.scale_on_device = scale_on_device
        if self.handover is not None or scale_on_device:
            dataset = dataset.handed_over(self.handover, scale_on_device)
        # The seed torch gives each pass's workers comes from this generator, seeded from the data's seed and the
        # epoch, not from the process's: a pass draws nothing from the generators the model samples with, so a
        # run resumed at an epoch's end (whose loader starts earlier) samples as one never stopped.
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, **kwargs)
        self.progress = progress
        self.finish = finish  # turns each batch, in this process, into the one handed out (upstream's tuples)
        # the passes over epoch _passes_epoch before the current one; the current one handed out _handed batches
        self._passes: list[Pass] = []
        self._passes_epoch: int | None = None
        self._handed = 0
        self._resumed_len: int | None = None  # len(self) while the resumed epoch lasts: batches before + left
        self._loaded = False  # a state was loaded: a second one (Lightning's copy of the same) is not applied
        self.resumed_after_its_end = False  # the loaded state's epoch had handed out all its batches
        # the batch is pinned here, after the pin-memory thread: that one sees uint8 tensors or slot names
        self._pin = self.pin_memory and torch.cuda.is_available()
        self._warned = False

    @property
    def slots(self) -> BatchSlots | None:
        """The workers' batch buffers of the current pass (None without workers or without such columns)."""
        return self.handover.slots if self.handover is not None else None

    def _slots_for_pass(self) -> BatchSlots | None:
        """The workers' batch buffers for this pass, allocated before the workers start (they inherit them): once
        for persistent workers, anew for the new workers of each pass otherwise (the last pass's workers may
        still be writing theirs)."""
        handover = self.handover
        if handover is None:
            return None
        if handover.slots is None or not self.persistent_workers:
            shapes = self.dataset.slot_columns()
            batch_size = self.dataset.reader.batch_size
            # a worker is asked for at most prefetch_factor batches beyond the one being converted here
            depth = (self.prefetch_factor or 2) + 2
            handover.slots = None
            if shapes and self._shared_memory_suffices(BatchSlots.size(shapes, batch_size, self.num_workers, depth)):
                context = self.multiprocessing_context or torch.multiprocessing  # what the DataLoader uses
                handover.slots = BatchSlots(shapes, batch_size, self.num_workers, depth, context)
        return handover.slots

    def _shared_memory_suffices(self, need: int) -> bool:
        free = shared_memory_free()
        if free is None or need <= free // 2:
            return True
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"/dev/shm has {free / 2**20:.0f} MiB free, too little for the {need / 2**20:.0f} MiB of batch "
                f"buffers of {self.num_workers} workers x batch_size {self.dataset.reader.batch_size}; the workers "
                f"send batches the slower default way. Give the job more shared memory (e.g. `docker run "
                f"--shm-size 8g`) or lower num_workers / batch_size.",
                stacklevel=2,
            )
        return False

    def _receive(self, slots: BatchSlots | None, batch: Any) -> Batch:
        if isinstance(batch, SlotBatch):
            return batch.resolve(slots, self._pin, scale=not self.scale_on_device)
        if isinstance(batch, WorkerError):
            batch.raise_()
        # uint8 tensors from workers: the DataLoader's pin-memory thread has pinned them already
        return batch if self.scale_on_device else scale_uint8(batch, self._pin)

    # state_dict/load_state_dict make the loader resumable for Lightning: a run restored from a checkpoint taken
    # in the middle of an epoch (a requeued Slurm job) goes on with the rows that epoch had not yet trained on,
    # instead of starting the epoch's order again (some rows twice, others not at all).
    def _pass(self, batches: int) -> Pass:
        reader = self.dataset.reader
        world = self.dataset.rank_world()[1]
        return Pass(reader.batch_size, self.num_workers, world, reader.shuffle_buffer, batches)

    def _order(self) -> dict[str, Any]:
        """What fixes an epoch's rows and their order: a run resumed mid-epoch must have the same."""
        reader = self.dataset.reader
        return {"rows": reader.num_rows, "seed": reader.seed, "shuffle": reader.shuffle, "drop_last": reader.drop_last}

    def state_dict(self) -> dict[str, Any]:
        epoch = self.dataset.epoch
        if self.progress is None:
            return {"epoch": epoch}
        earlier = self._passes if self._passes_epoch == epoch else []
        current = self._pass(self._handed)
        return {"epoch": epoch, "passes": [dataclasses.asdict(p) for p in [*earlier, current]], **self._order()}

    def resume(self, state: dict[str, Any]) -> None:
        """Resume in the epoch ``state`` (a :meth:`state_dict`) was saved in: that epoch's next pass reads the rows
        its passes had not handed out, in batches of this loader's size, with its workers (any batch size, worker or
        rank count), and until that epoch ends ``len(self)`` is the batches handed out before plus those left. The
        DataModule calls it with its copy of the state, before Lightning takes the length."""
        if self.progress is None or self._loaded:
            return
        self._loaded = True
        if "passes" not in state:  # older still: the count of batches done lay in Lightning's loop state only
            warnings.warn(
                f"the checkpoint's loader state (of a spherinator older than 2026-12-01) does not say which rows epoch "
                f"{state['epoch']} had trained on; that epoch reads its rows from the start (some twice, others not)",
                stacklevel=2,
            )
            return
        self._check_order(state)
        passes = [Pass(**p) for p in state["passes"]]
        left = self.dataset.resume_after(state["epoch"], passes)
        if left:  # else saved after the epoch's last batch: nothing to resume
            self._passes, self._passes_epoch, self._handed = passes, state["epoch"], 0
            self._resumed_len = sum(p.batches for p in passes) + left
        else:
            self.resumed_after_its_end = True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Lightning's copy of the state: applied only when the DataModule had none (a checkpoint of an older
        spherinator). Lightning loads it after it has taken the length (``FitLoop.setup_data``), so the resumed
        epoch must end at that length: with the batch size, worker and rank count the state was saved with."""
        if self._loaded:
            return
        self.resume(state)
        if self._resumed_len is None or self._resumed_len == self.epoch_batches:
            self._resumed_len = None
            return
        last = self._passes[-1]
        raise DataError(
            f"the checkpoint (of an older spherinator) was saved in the middle of epoch {state['epoch']} with "
            f"batch_size {last.batch_size}, num_workers {last.num_workers} on {last.world_size} rank(s); resume it "
            f"with those, or from a checkpoint saved at the end of an epoch"
        )

    def _check_order(self, state: dict[str, Any]) -> None:
        changed = [f"{k} {state[k]} -> {v}" for k, v in self._order().items() if state[k] != v]
        if changed:  # raised here, before Lightning starts the epoch's iterator
            raise DataError(
                f"the checkpoint was saved in the middle of epoch {state['epoch']} of a run with another train "
                f"split or order ({', '.join(changed).replace('rows', 'train rows')}), so the rows left of that "
                f"epoch are unknown; resume with that run's data, seed, val/test fractions, shuffle and "
                f"drop_last, or from a checkpoint saved at the end of an epoch"
            )

    def __len__(self) -> int:
        """Batches of this rank per epoch; in a resumed epoch, those handed out before the checkpoint plus those
        left (Lightning, which restored its count of the first, ends the epoch when its count reaches this)."""
        return self._resumed_len if self._resumed_len is not None else super().__len__()

    @property
    def epoch_batches(self) -> int:
        """Batches of a whole epoch (``len(self)`` but in a resumed epoch)."""
        return super().__len__()

    def _count(self, batch: Any) -> Any:
        self._handed += 1
        return batch

    def __iter__(self) -> Iterator[Any]:
        if self.progress is not None:
            self.dataset.set_epoch(self.progress.epoch())
        epoch = self.dataset.epoch
        if self._passes_epoch != epoch:  # a new epoch (not the one resumed): whole, from its first row
            self.dataset.resume_after(epoch, None)
            self._passes, self._passes_epoch, self._resumed_len = [], None, None
        self._handed = 0
        if self.generator is not None:
            self.generator.manual_seed(
                int(np.random.SeedSequence([self.dataset.reader.seed, epoch]).generate_state(1)[0])
            )
        slots = self._slots_for_pass()
        batches = super().__iter__()
        if self.handover is not None:
            batches = map(functools.partial(self._receive, slots), batches)
        if self.finish is not None:
            batches = map(self.finish, batches)
        return map(self._count, batches) if self.progress is not None else batches
