"""The LightningDataModule that streams Parquet datasets: ``spherinator.data.DataModule``."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from spherinator.data.dataset import (
    ParquetIndex,
    ParquetStream,
    Pass,
    Segment,
    WorkerError,
    apply_transform,
    split_rows,
)
from spherinator.data.layout import DataError, scale_uint8
from spherinator.data.slots import BatchSlots, SlotBatch, shared_memory_free


@dataclass
class Column:
    """One column to load, with an optional transform.

    In YAML: ``{name: data, transform: {class_path: torchvision.transforms.v2.Resize, init_args: {size: 224}}}``.

    Attributes:
        name: Column name in the Parquet files.
        transform: Callable applied to the column's tensor. By default it gets a whole batch ``(B, *shape)``
            (torchvision v2 transforms accept leading batch dimensions; random ones then draw one set of
            parameters per batch).
        per_sample: Apply ``transform`` to each sample ``(*shape)`` instead (e.g. per-sample augmentations).
    """

    name: str
    transform: Callable | None = None
    per_sample: bool = False


class _Loader(DataLoader):
    """A DataLoader over a :class:`ParquetStream` that tells it the epoch before every pass (persistent workers
    see it too: the epoch lives in shared memory) and, with workers, receives uint8 array columns as uint8 and
    scales them to float32 here, which moves 4x fewer bytes from the workers. Columns of a fixed shape come
    through shared buffers allocated once (:class:`~spherinator.data.slots.BatchSlots`) instead of a new
    shared-memory segment per batch.

    A training loader (``progress_fn``: the trainer's batch progress of the epoch) is resumable: its state says how
    its passes over the current epoch cut the rows into batches and how many batches they handed out, and a loader
    restored from it reads the rows not yet handed out, in batches of its own size (see :meth:`load_state_dict`)."""

    def __init__(
        self,
        dataset: ParquetStream,
        *args: Any,
        epoch_fn: Callable[[], int] | None = None,
        progress_fn: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.epoch_fn = epoch_fn
        self.progress_fn = progress_fn
        self._to_resume: tuple[int, list[Pass] | None] | None = None
        # the passes over epoch _passes_epoch before the current one, which began at batch _first_batch of it
        self._passes: list[Pass] = []
        self._passes_epoch: int | None = None
        self._first_batch = 0
        dataset.defer_uint8 = self.num_workers > 0
        dataset.errors_as_batches = self.num_workers > 0
        # the batch is pinned here, after the pin-memory thread: that one sees uint8 tensors or slot names
        self._pin = self.pin_memory and torch.cuda.is_available()
        self._warned = False

    def _slots_for_pass(self) -> BatchSlots | None:
        """The workers' batch buffers for this pass, allocated before the workers start (they inherit them): once
        for persistent workers, anew for the new workers of each pass otherwise (the last pass's workers may
        still be writing theirs)."""
        dataset = self.dataset
        if not dataset.defer_uint8:
            return None
        if dataset.slots is None or not self.persistent_workers:
            shapes = {name: shape for name, shape in dataset.deferred_columns().items() if shape is not None}
            # a worker is asked for at most prefetch_factor batches beyond the one being converted here
            depth = (self.prefetch_factor or 2) + 2
            dataset.slots = None
            if shapes and self._shared_memory_suffices(
                BatchSlots.size(shapes, dataset.batch_size, self.num_workers, depth)
            ):
                context = self.multiprocessing_context or torch.multiprocessing  # what the DataLoader uses
                dataset.slots = BatchSlots(shapes, dataset.batch_size, self.num_workers, depth, context)
        return dataset.slots

    def _shared_memory_suffices(self, need: int) -> bool:
        free = shared_memory_free()
        if free is None or need <= free // 2:
            return True
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"/dev/shm has {free / 2**20:.0f} MiB free, too little for the {need / 2**20:.0f} MiB of batch "
                f"buffers of {self.num_workers} workers x batch_size {self.dataset.batch_size}; the workers send "
                f"batches the slower default way. Give the job more shared memory (e.g. `docker run --shm-size 8g`) "
                f"or lower num_workers / batch_size.",
                stacklevel=2,
            )
        return False

    def _receive(self, slots: BatchSlots | None, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        if isinstance(batch, SlotBatch):
            return batch.resolve(slots, self._pin)
        if isinstance(batch, WorkerError):
            batch.raise_()
        return scale_uint8(batch, self._pin)

    # state_dict/load_state_dict make the loader resumable for Lightning: a run restored from a checkpoint taken
    # in the middle of an epoch (a requeued Slurm job) goes on with the rows that epoch had not yet trained on,
    # instead of starting the epoch's order again (some rows twice, others not at all).
    def _pass(self, batches: int) -> Pass:
        dataset = self.dataset
        world = dataset._rank_world()[1]
        return Pass(dataset.batch_size, self.num_workers, world, dataset.shuffle_buffer, batches)

    def _batches_done(self) -> int:
        """Training batches of the current epoch already trained on (Lightning's count).

        ``processed``, not ``completed``: a checkpoint saved in ``on_train_batch_end`` (as the requeue callback does)
        holds the optimizer step of its batch, while ``completed`` counts that batch only after the hook.
        """
        return self.progress_fn().current.processed

    def state_dict(self) -> dict[str, Any]:
        dataset = self.dataset
        epoch = dataset.epoch
        if self.progress_fn is None or self.progress_fn() is None:
            return {"epoch": epoch}
        earlier = self._passes if self._passes_epoch == epoch else []
        first = self._first_batch if self._passes_epoch == epoch else 0
        current = self._pass(self._batches_done() - first)
        return {
            "epoch": epoch,
            "passes": [dataclasses.asdict(p) for p in [*earlier, current]],
            # what fixes the epoch's rows and their order: a resumed run must have the same
            "rows": dataset.num_rows,
            "seed": dataset.seed,
            "shuffle": dataset.shuffle,
            "drop_last": dataset.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume in the epoch the state was saved in: the next pass reads the rows its passes had not handed out,
        in batches of this loader's size, with its workers (any batch size, worker or rank count). A state of an
        older spherinator (``{"epoch"}`` only) counted batches of this loader's batch size."""
        if self.progress_fn is None:
            return
        passes = None  # an older state: its batches are counted by the trainer
        if "passes" in state:
            dataset = self.dataset
            now = {
                "rows": dataset.num_rows,
                "seed": dataset.seed,
                "shuffle": dataset.shuffle,
                "drop_last": dataset.drop_last,
            }
            changed = [f"{k} {state[k]} -> {v}" for k, v in now.items() if state[k] != v]
            if changed:  # raised here, before Lightning starts the epoch's iterator
                raise DataError(
                    f"the checkpoint was saved in the middle of epoch {state['epoch']} of a run with another train "
                    f"split or order ({', '.join(changed).replace('rows', 'train rows')}), so the rows left of that "
                    f"epoch are unknown; resume with that run's data, seed, val/test fractions, shuffle and "
                    f"drop_last, or from a checkpoint saved at the end of an epoch"
                )
            passes = [Pass(**p) for p in state["passes"]]
        self._to_resume = (state["epoch"], passes)

    def _resume(self, epoch: int, passes: list[Pass] | None) -> None:
        progress = self.progress_fn()
        if progress is None or epoch != self.dataset.epoch:
            return
        if passes is None:
            passes = [self._pass(self._batches_done())]
        if not sum(p.batches for p in passes):
            return
        left = self.dataset.resume_after(epoch, passes)
        # Lightning counts this epoch's batches from the ones done up to len(self): start its count where the
        # batches left end the epoch (with another batch size they are not len(self) - done).
        first = len(self) - left if left else self._batches_done()
        shift = first - self._batches_done()
        for counter in (progress.current, progress.total):
            for field in ("ready", "started", "processed", "completed"):
                setattr(counter, field, getattr(counter, field) + shift)
        self._passes, self._passes_epoch, self._first_batch = passes, epoch, first

    def __iter__(self) -> Iterator[Any]:
        if self.epoch_fn is not None:
            self.dataset.set_epoch(self.epoch_fn())
        epoch = self.dataset.epoch
        if self._to_resume is not None:
            resume, self._to_resume = self._to_resume, None
            self._resume(*resume)
        elif self._passes_epoch != epoch:
            self.dataset.resume, self._passes, self._passes_epoch, self._first_batch = None, [], None, 0
        slots = self._slots_for_pass()
        batches = super().__iter__()
        return map(functools.partial(self._receive, slots), batches) if self.dataset.defer_uint8 else batches


class DataModule(pl.LightningDataModule):
    """Streams Parquet files in shards: row group by row group, one tensor per record batch, across DDP ranks and
    DataLoader workers.

    Every ``.parquet`` file under ``path`` is read (recursively). Within one epoch each row is read exactly once
    by one (rank, worker), every rank yields the same number of batches, and with ``shuffle`` the order is a
    seeded function of (``seed``, epoch): row groups in a new random order every epoch, rows mixed in a shuffle
    buffer of ``shuffle_buffer`` rows. Array columns of uint8 become float32 in [0, 1], other arrays float32;
    integer scalar columns (e.g. ``id``) stay int64. String columns (e.g. object names), when named in ``columns``,
    come as a list of ``str`` per batch (with ``return_dict``; never the first column).

    Tensor storage understood: the fast layout (``fixed_size_binary`` raw bytes with ``<col>_shape`` and
    ``<col>_dtype`` metadata, see :mod:`spherinator.data.writer`), list / fixed-size-list columns with
    ``<col>_shape`` metadata, Arrow ``fixed_shape_tensor``, and PNG/JPEG bytes or ``{bytes, path}`` structs.

    Args:
        path: Directory holding the Parquet files (searched recursively), or one ``.parquet`` file.
        columns: Columns to load, each a name or a :class:`Column` (``{name, transform, per_sample}``); the first
            is the model input. None: every column that can become a tensor, in file order.
        return_dict: Batches are ``{column: tensor}``; else the first column's tensor ``(B, *shape)``.
        batch_size: Rows per batch (the last batches of an epoch may be smaller unless ``drop_last``).
        shuffle: Shuffle the training rows every epoch (validation, test and predict are never shuffled).
        num_workers: DataLoader worker processes per rank (each reads its own row groups).
        val_fraction: Fraction of rows held out for validation (0 disables validation).
        test_fraction: Fraction of rows held out for testing (0: no test split).
        seed: Seed of the split and of the shuffling.
        shuffle_buffer: Rows mixed together when shuffling; memory holds about this many rows plus a row group.
        drop_last: Yield only full training batches.
        pin_memory: Pin batches in page-locked memory; None pins when CUDA is available.
        persistent_workers: Keep workers alive between epochs (only with ``num_workers > 0``).
        prefetch_factor: Batches each worker loads ahead (only with ``num_workers > 0``).
    """

    def __init__(
        self,
        path: str | Path,
        columns: list[str | Column] | None = None,
        return_dict: bool = False,
        batch_size: int = 32,
        shuffle: bool = True,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        seed: int = 42,
        shuffle_buffer: int = 1024,
        drop_last: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.columns = [self._as_column(c) for c in columns] if columns is not None else None
        if self.columns is not None and not self.columns:
            raise DataError("columns=[] names no column; give at least one, e.g. columns: [data]")
        self.return_dict = return_dict
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        self.batch_size = batch_size
        self.shuffle = shuffle
        if num_workers < 0:
            raise DataError(f"num_workers={num_workers} must be 0 (load in the main process) or more")
        self.num_workers = num_workers
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise DataError(f"{name}={value} must be in [0, 1)")
        if val_fraction + test_fraction >= 1.0:
            raise DataError(
                f"val_fraction={val_fraction} + test_fraction={test_fraction} leave no training rows; "
                f"make their sum less than 1"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        if shuffle_buffer < 0:
            raise DataError(f"shuffle_buffer={shuffle_buffer} must be >= 0 rows")
        self.shuffle_buffer = shuffle_buffer
        self.drop_last = drop_last
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self._index: ParquetIndex | None = None
        self._splits: dict[str, list[Segment]] = {}
        self._passes = itertools.count()
        # Lightning warns about every IterableDataset with __len__ that its length may be wrong with workers.
        # Here it is exact: every (rank, worker) reads its own rows and each rank yields len() batches (tested).
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)

    @staticmethod
    def _as_column(column: str | Column | dict) -> Column:
        if isinstance(column, Column):
            return column
        if isinstance(column, str):
            return Column(column)
        if isinstance(column, dict) and "name" in column:
            return Column(**column)
        raise DataError(f"column entry {column!r} is neither a name nor {{name, transform}}; write e.g. `- data`")

    # -- cheap look-ups, usable before setup() --------------------------------------------------------------------

    def _head(self) -> ParquetIndex:
        """The index, or one built from the first file's footer only."""
        if self._index is not None:
            return self._index
        names = [c.name for c in self.columns] if self.columns is not None else None
        head = ParquetIndex(self.path, names, first_file_only=True)
        if not head.num_rows:  # the first file is empty: look further
            head = ParquetIndex(self.path, names)
        self._check_layouts(head)
        return head

    def _check_layouts(self, index: ParquetIndex) -> None:
        """String columns travel as lists of ``str``: they can be neither the model input nor transformed."""
        strings = [name for name, layout in index.layouts.items() if layout.kind == "string"]
        first = next(iter(index.layouts))
        if first in strings:
            rest = [n for n in index.layouts if n != first]
            raise DataError(
                f"column {first!r} holds strings, so it cannot be the model input (the first of `columns`); put an "
                f"array column first, e.g. columns: [{', '.join(rest[:1] or ['data'])}, {first}]"
            )
        for name in strings:
            if self._column(name).transform is not None:
                raise DataError(f"column {name!r} holds strings, which a transform cannot take; remove its `transform`")

    @property
    def column_names(self) -> list[str]:
        """Names of the loaded columns, the model input first."""
        if self.columns is not None:
            return [c.name for c in self.columns]
        return list(self._head().layouts)

    def _column(self, name: str) -> Column:
        for column in self.columns or []:
            if column.name == name:
                return column
        return Column(name)

    def sample_shape(self, column: str | None = None) -> tuple[int, ...]:
        """Shape of one sample of ``column`` (default: the first) after its transform, e.g. ``(3, 224, 224)``.

        Reads the first file's schema, and its first row group only when the schema does not tell the shape
        (lists without shape metadata, encoded images). Usable before ``setup()``.
        """
        head = self._head()
        name = column if column is not None else next(iter(head.layouts))
        if name not in head.layouts:
            raise DataError(f"column {name!r} is not loaded (loaded: {', '.join(map(repr, head.layouts))})")
        shape, _ = head.row_shape(name)
        spec = self._column(name)
        if spec.transform is None:
            return tuple(shape)
        if spec.per_sample:
            return tuple(apply_transform(spec.transform, torch.zeros(1, *shape), True, name).shape[1:])
        return tuple(apply_transform(spec.transform, torch.zeros(1, *shape), False, name).shape[1:])

    # -- Lightning hooks ------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Scan the file footers, check every column and cut the splits; raises DataError on bad input."""
        if self._index is None:
            names = [c.name for c in self.columns] if self.columns is not None else None
            self._index = ParquetIndex(self.path, names)
            self._check_layouts(self._index)
            if self._index.num_rows == 0:
                raise DataError(f"the parquet files under {str(self.path)!r} hold no rows; write some data first")
            fractions = {"test": self.test_fraction, "val": self.val_fraction}
            self._splits = split_rows(self._index.groups, fractions, self.seed)
            self._splits["predict"] = [Segment(f, g, 0, rows) for f, g, rows in self._index.groups if rows]
            total = self._index.num_rows
            for name, fraction in (("val", self.val_fraction), ("test", self.test_fraction)):
                if fraction > 0 and not self._splits[name]:
                    raise DataError(
                        f"the {name} split is empty: {name}_fraction={fraction} of {total} rows under "
                        f"{str(self.path)!r} is less than one row; raise {name}_fraction or set it to 0"
                    )
            if not self._splits["train"]:
                raise DataError(
                    f"the train split is empty: {total} rows under {str(self.path)!r} all go to validation/test; "
                    f"lower val_fraction/test_fraction or add data"
                )
        if self.drop_last and stage in (None, "fit"):
            world = self.trainer.world_size if self.trainer is not None else 1
            train_rows = self.split_rows("train")
            if train_rows < world * self.batch_size:
                raise DataError(
                    f"drop_last=True with batch_size={self.batch_size} on {world} rank(s) leaves no training batch: "
                    f"the train split has {train_rows} rows; lower batch_size or set drop_last to False"
                )

    @property
    def index(self) -> ParquetIndex:
        """The scanned dataset (after ``setup()``)."""
        if self._index is None:
            self.setup()
        return self._index

    def split_rows(self, split: str) -> int:
        """Rows in ``split`` (``train``, ``val``, ``test`` or ``predict``)."""
        self.index  # noqa: B018 (runs setup if needed)
        return sum(s.rows for s in self._splits[split])

    def dataset(self, split: str, rank: int | None = None, world_size: int | None = None) -> ParquetStream:
        """The :class:`ParquetStream` of ``split``; rank/world default to the trainer's, else torch.distributed."""
        index = self.index
        if rank is None and world_size is None and self.trainer is not None:
            rank, world_size = self.trainer.global_rank, self.trainer.world_size
        train = split == "train"
        transforms = {c.name: (c.transform, c.per_sample) for c in self.columns or [] if c.transform is not None}
        return ParquetStream(
            index,
            self._splits[split],
            batch_size=self.batch_size,
            transforms=transforms,
            return_dict=self.return_dict,
            shuffle=self.shuffle and train,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            drop_last=self.drop_last and train,
            rank=rank,
            world_size=world_size,
        )

    def _loader(self, split: str) -> DataLoader:
        workers = {}
        if self.num_workers > 0:
            workers = {"persistent_workers": self.persistent_workers, "prefetch_factor": self.prefetch_factor}
        kwargs = dict(batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **workers)
        if split != "train":
            return _Loader(self.dataset(split), **kwargs)
        return _Loader(self.dataset(split), epoch_fn=self._epoch, progress_fn=self._batch_progress, **kwargs)

    def _batch_progress(self) -> Any:
        """The trainer's count of the current epoch's training batches (None without a trainer)."""
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress

    def _epoch(self) -> int:
        """The trainer's epoch when attached, else the number of passes made so far."""
        if self.trainer is not None:
            return self.trainer.current_epoch
        return next(self._passes)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (if ``shuffle``), sharded training batches."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order; an empty list (no validation) when ``val_fraction`` is 0."""
        return self._loader("val") if self.val_fraction > 0 else []

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order; a DataError when ``test_fraction`` is 0 (there is nothing to test on)."""
        if self.test_fraction <= 0:
            raise DataError(
                "there is no test split: test_fraction is 0; set data.init_args.test_fraction (e.g. 0.1) to hold "
                "out rows for testing, or run `validate` on the validation split"
            )
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Every row once, in file order, no shuffle (all rows, whatever the splits)."""
        return self._loader("predict")


__all__ = ["Column", "DataModule"]
