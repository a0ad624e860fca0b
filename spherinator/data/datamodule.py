"""The LightningDataModule that streams Parquet datasets: ``spherinator.data.DataModule``."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from spherinator.data.checksums import check_checksum_mode
from spherinator.data.hub import is_hub_id, local_parquet
from spherinator.data.layout import DataError
from spherinator.data.plan import Segment, split_rows
from spherinator.data.reader import ParquetIndex, ParquetReader
from spherinator.data.transforms import draws_random, holds_batch_only
from spherinator.data.transport import Loader, ParquetStream, apply_transform, scale_on_device
from spherinator.errors import ConfigError


def _fractions(
    val_fraction: float, test_fraction: float, validation_size: float | None, test_size: float | None, in_gpu: bool
) -> tuple[float, float]:
    """The checked ``(val_fraction, test_fraction)``, from upstream's options where given (see DataModule)."""
    if in_gpu:
        raise ConfigError(
            "in_gpu_memory: true (upstream's whole dataset in GPU memory) does not exist here: rows are streamed "
            "and each batch moves to the GPU when used; remove it (for speed raise num_workers)"
        )
    if validation_size is not None or test_size is not None:
        val_fraction, test_fraction = _upstream_fractions(validation_size, test_size, val_fraction, test_fraction)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{name}={value} must be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val_fraction={val_fraction} + test_fraction={test_fraction} leave no training rows; "
            f"make their sum less than 1"
        )
    return val_fraction, test_fraction


def _upstream_fractions(
    validation_size: float | None, test_size: float | None, val_fraction: float, test_fraction: float
) -> tuple[float, float]:
    """``(val_fraction, test_fraction)`` from upstream's ``validation_size`` (held out for validation and testing)
    and ``test_size`` (the held-out part that is tested), with upstream's defaults 0.2 and 0.5 for the one not
    given; a ConfigError where they cannot mean here what they mean upstream, or are given with ours."""
    if (val_fraction, test_fraction) != (0.1, 0.0):
        raise ConfigError(
            f"give either val_fraction/test_fraction ({val_fraction}/{test_fraction}) or upstream's "
            f"validation_size/test_size ({validation_size}/{test_size}), not both"
        )
    validation_size = 0.2 if validation_size is None else validation_size
    test_size = 0.5 if test_size is None else test_size
    if validation_size == 0.0:
        raise ConfigError(
            "validation_size=0: upstream then validates on the training rows themselves, which is not done here; "
            "write val_fraction: 0 (no validation) instead"
        )
    if not 0.0 < validation_size < 1.0 or not 0.0 <= test_size < 1.0:
        raise ConfigError(
            f"validation_size={validation_size} must be in (0, 1) and test_size={test_size} in [0, 1) (the part of "
            f"the held-out rows that is tested; 0: no test split here, where upstream tests on the validation rows)"
        )
    return validation_size * (1 - test_size), validation_size * test_size


def _at_least(name: str, value: int, low: int, unit: str = "") -> int:
    """``value``, or a DataError naming it when it is below ``low``."""
    if value < low:
        raise DataError(f"{name}={value} must be at least {low}{unit}")
    return value


@dataclass
class Column:
    """One column to load, with an optional transform.

    In YAML: ``{name: data, transform: {class_path: torchvision.transforms.v2.Resize, init_args: {size: 224}}}``.

    Attributes:
        name: Column name in the Parquet files.
        transform: Callable applied to the column's tensor.
        per_sample: True: ``transform`` gets each sample ``(*shape)``; False: it gets a whole batch
            ``(B, *shape)`` at once (faster; torchvision v2 transforms accept leading batch dimensions, but random
            ones then draw one set of parameters for the whole batch). None (default): per sample when the transform
            draws random parameters (a torchvision ``Random*`` transform, ``ColorJitter``, ``GaussianBlur``, ... or a
            ``Compose`` holding one, see :func:`~spherinator.data.transforms.draws_random`), as torchvision applies
            them in a ``Dataset``; per batch for deterministic ones (``Resize``, ``Normalize``, ``AlignByMoments``).
    """

    name: str
    transform: Callable | None = None
    per_sample: bool | None = None

    def __post_init__(self) -> None:
        batch_only = self.transform is not None and holds_batch_only(self.transform)
        if self.per_sample and batch_only:
            raise DataError(
                f"column {self.name!r}: {type(self.transform).__name__} normalises each sample of a whole batch; "
                f"remove `per_sample: true` from the column"
            )
        if self.per_sample is None and batch_only and draws_random(self.transform):
            # per sample, the normaliser would scale each row of one sample; per batch, all rows share one draw
            raise DataError(
                f"column {self.name!r}: {type(self.transform).__name__} holds both random transforms (drawn per "
                f"sample) and a normaliser of whole batches; write `per_sample: false` (one random draw for the whole "
                f"batch), or leave the normaliser out of this transform"
            )
        if self.per_sample is None:
            self.per_sample = self.transform is not None and not batch_only and draws_random(self.transform)


class DataModule(pl.LightningDataModule):
    """Streams Parquet files in shards: row group by row group, one tensor per record batch, across DDP ranks and
    DataLoader workers.

    Every ``.parquet`` file under ``path`` is read (recursively). Within one epoch each row is read exactly once
    by one (rank, worker), every rank yields the same number of batches, and with ``shuffle`` the order is a
    seeded function of (``seed``, epoch): row groups in a new random order every epoch, rows mixed in a shuffle
    buffer of ``shuffle_buffer`` rows. Array columns of uint8 become float32 in [0, 1], other arrays float32;
    integer scalar columns (e.g. ``id``) become int64, floating ones keep their stored dtype (float64 MJDs, RA/Dec
    stay exact). String columns (e.g. object names), when named in ``columns``, come as a list of ``str`` per batch
    (with ``return_dict``; never the first column).

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
        shuffle_buffer: Rows mixed together when shuffling; memory holds about this many rows plus three row groups
            (the one being cut into batches and two read ahead in threads; one with workers, per worker).
        drop_last: Yield only full training batches.
        pin_memory: Pin batches in page-locked memory; None pins when CUDA is available.
        persistent_workers: Keep workers alive between epochs (only with ``num_workers > 0``).
        prefetch_factor: Batches each worker loads ahead (only with ``num_workers > 0``).
        validation_size: Upstream Spherinator's name: the fraction of rows held out for validation *and* testing,
            of which ``test_size`` go to testing; given, it sets ``val_fraction = validation_size * (1 - test_size)``
            and ``test_fraction = validation_size * test_size`` (upstream's defaults 0.2 and 0.5: 10% each).
        test_size: Upstream's fraction of the held-out rows that go to testing (see ``validation_size``).
        in_gpu_memory: Upstream's switch to hold the whole dataset in GPU memory; only ``false`` is accepted here
            (rows are streamed from the files and each batch moves to the GPU when it is used).
        page_checksums: When the CRC32 page checksums the writer stores are verified, so that a corrupt file is named
            instead of read as garbage: ``first_read`` (default) on each row group's first read in the run (per
            rank; a file changed since the run started on every read), ``every_read`` on every read of every epoch
            (slower: the benchmark's uncompressed images at 0.6x the speed of later ``first_read`` epochs; see
            :mod:`spherinator.data.checksums`).

    A ``path`` that is no local file or directory but a Hugging Face Hub dataset id (``owner/name``) is loaded with
    ``datasets.load_dataset`` (cached, offline with ``HF_DATASETS_OFFLINE=1``) and its ``train`` split is read from a
    Parquet copy written once next to the ``datasets`` cache (see :mod:`spherinator.data.hub`).
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
        validation_size: float | None = None,
        test_size: float | None = None,
        in_gpu_memory: bool = False,
        page_checksums: str = "first_read",
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self._local: Path | None = None  # the Parquet file or directory that path names (a Hub id's copy)
        val_fraction, test_fraction = _fractions(val_fraction, test_fraction, validation_size, test_size, in_gpu_memory)
        self.columns = [self._as_column(c) for c in columns] if columns is not None else None
        if self.columns is not None and not self.columns:
            raise DataError("columns=[] names no column; give at least one, e.g. columns: [data]")
        self.return_dict = return_dict
        self.batch_size = _at_least("batch_size", batch_size, 1)
        self.shuffle = shuffle
        self.num_workers = _at_least("num_workers", num_workers, 0, " (0: load in the main process)")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.shuffle_buffer = _at_least("shuffle_buffer", shuffle_buffer, 0, " rows")
        self.drop_last = drop_last
        self.page_checksums = check_checksum_mode(page_checksums)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self._index: ParquetIndex | None = None
        self._splits: dict[str, list[Segment]] = {}
        self._passes = itertools.count()  # passes made without a trainer: the epoch of each
        self._train_loader: Loader | None = None  # the one whose position a checkpoint saves
        self._to_resume: dict[str, Any] | None = None  # its position in a checkpoint being loaded
        self._user_reload: int | None = None  # the trainer's reload_dataloaders_every_n_epochs while a resume lasts
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
        head = ParquetIndex(self.local_path, names, first_file_only=True)
        if not head.num_rows:  # the first file is empty: look further
            head = ParquetIndex(self.local_path, names)
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
        for name in index.layouts:
            self._check_sample_layout(index, name)

    def _check_sample_layout(self, index: ParquetIndex, name: str) -> None:
        """A transform that names the dimensions of one sample (``sample_layout``, e.g. AlignByMoments' (C, H, W))
        gets samples of that many: with others it would silently treat a batch as one sample."""
        transform = self._column(name).transform
        layout = getattr(transform, "sample_layout", None)
        if layout is None or index.layouts[name].kind == "string":
            return
        shape = index.row_shape(name)[0]
        if len(shape) != len(layout):
            raise DataError(
                f"column {name!r} holds samples of shape {tuple(shape)}, but its transform {type(transform).__name__} "
                f"takes samples ({', '.join(layout)}); store them so (e.g. grey images (H, W) as (1, H, W)) or remove "
                f"the transform"
            )

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
        return tuple(apply_transform(spec.transform, torch.zeros(1, *shape), spec.per_sample, name).shape[1:])

    @property
    def local_path(self) -> Path:
        """The local Parquet file or directory read: ``path`` itself, or for a Hub dataset id the Parquet copy of its
        ``train`` split (loaded with ``datasets`` at first use)."""
        if self._local is None:
            self._local = local_parquet(str(self.path)) if is_hub_id(self.path) else self.path
        return self._local

    # -- Lightning hooks ------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download a Hub dataset id's files once (Lightning calls this on one process per node before ``setup``)."""
        self.local_path  # noqa: B018 (loads and converts a Hub dataset)

    def setup(self, stage: str | None = None) -> None:
        """Scan the file footers, check every column and cut the splits; raises DataError on bad input."""
        if self._index is None:
            names = [c.name for c in self.columns] if self.columns is not None else None
            self._index = ParquetIndex(self.local_path, names)
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
        reader = ParquetReader(
            index,
            self._splits[split],
            batch_size=self.batch_size,
            shuffle=self.shuffle and train,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            drop_last=self.drop_last and train,
            page_checksums=self.page_checksums,
        )
        transforms = {c.name: (c.transform, c.per_sample) for c in self.columns or [] if c.transform is not None}
        return ParquetStream(reader, transforms, self.return_dict, rank=rank, world_size=world_size)

    def finish_batch(self) -> Callable[[Any], Any] | None:
        """A callable that turns each loaded batch into the one handed out (in the main process, after the columns'
        transforms), or None to hand out batches as loaded; subclasses (upstream's batch layouts) override it."""
        return None

    def _loader(self, split: str) -> DataLoader:
        workers = {}
        if self.num_workers > 0:
            workers = {"persistent_workers": self.persistent_workers, "prefetch_factor": self.prefetch_factor}
        kwargs = dict(batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **workers)
        kwargs["finish"] = finish = self.finish_batch()
        # a finishing step (upstream's tuples, per-sample normalisation) takes the batch's floats: scale on the CPU
        kwargs["scale_on_device"] = self._scales_on_device() and finish is None
        if split != "train":
            return Loader(self.dataset(split), **kwargs)
        return Loader(self.dataset(split), progress=_TrainerProgress(self), **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (if ``shuffle``), sharded training batches; after a checkpoint saved in the middle of an epoch,
        the rows that epoch had not handed out first (see :meth:`load_state_dict`)."""
        self._restore_reload()
        loader = self._train_loader = self._loader("train")
        state, self._to_resume = self._to_resume, None
        if state is not None and self.trainer is not None and state.get("epoch") == self.trainer.current_epoch:
            loader.resume(state)
            # A checkpoint saved after the epoch's last batch (last.ckpt at the epoch's end): Lightning takes this
            # loader's iterator while its epoch is still the finished one, and would run the next epoch on it, in
            # the finished epoch's order; loaded again for the next epoch, it has that epoch's order.
            if len(loader) != loader.epoch_batches or loader.resumed_after_its_end:
                # Lightning takes the epoch's length once per loading of the training loader (FitLoop.setup_data:
                # num_training_batches, which ends an epoch, and val_check_batch, which runs validation). A resumed
                # epoch has another length (batches before + left, in batches of the new size), so the loader is
                # loaded again for the next epoch, which has the whole length; reload_dataloaders_every_n_epochs is
                # the public switch for that, given back as it was by the next train_dataloader() or teardown().
                self._user_reload = self.trainer.reload_dataloaders_every_n_epochs
                self.trainer.reload_dataloaders_every_n_epochs = 1
        return loader

    def _restore_reload(self) -> None:
        if self._user_reload is not None and self.trainer is not None:
            self.trainer.reload_dataloaders_every_n_epochs = self._user_reload
        self._user_reload = None

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the current epoch: the training loader's position (which rows it handed out,
        see :class:`~spherinator.data.transport.Loader`); Lightning saves it in checkpoints."""
        if self._train_loader is None or self._train_loader.progress is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the training loader's position from a checkpoint: Lightning restores the DataModule before it asks for
        the training loader, which then resumes the epoch there with its own length."""
        self._to_resume = state_dict.get("train_loader")

    def teardown(self, stage: str) -> None:
        """Gives the trainer back its ``reload_dataloaders_every_n_epochs`` if a resumed epoch was the last."""
        self._restore_reload()

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

    # -- uint8 scaled on the device ---------------------------------------------------------------------------------

    scale_on_device: bool | None = None
    """Loaders hand uint8 array columns without a transform on as uint8, and :meth:`on_after_batch_transfer`
    scales them to float32 in [0, 1] on the device (a GPU node's CPU does not convert every pixel; the same floats
    as on the CPU). None: when a Trainer drives this DataModule (it calls the hook); False: the loaders scale on
    the CPU, for a caller that iterates them without a Trainer (True: the caller scales, with the hook)."""

    def _scales_on_device(self) -> bool:
        return self.trainer is not None if self.scale_on_device is None else self.scale_on_device

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Scale the uint8 columns the loaders delivered unscaled, on the device the batch is on now; then the
        LightningModule's own ``on_after_batch_transfer``, if it has one (Lightning calls only the DataModule's
        when both have it), gets the scaled batch."""
        names = self.column_names
        scaled = {name for name in names if self._column(name).transform is None}
        batch = scale_on_device(batch, scaled, names[0])
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None and type(model).on_after_batch_transfer is not pl.LightningModule.on_after_batch_transfer:
            batch = model.on_after_batch_transfer(batch, dataloader_idx)
        return batch


class _TrainerProgress:
    """The training loader's :class:`~spherinator.data.transport.TrainProgress`: the epoch, the trainer's or (without
    one) the number of passes made."""

    def __init__(self, datamodule: DataModule) -> None:
        self.datamodule = datamodule

    def epoch(self) -> int:
        trainer = self.datamodule.trainer
        return trainer.current_epoch if trainer is not None else next(self.datamodule._passes)


__all__ = ["Column", "DataModule"]
