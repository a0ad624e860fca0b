"""Behaviour of spherinator.data: sharding, shuffling, layouts, return modes, YAML transforms, bad input."""

from __future__ import annotations

import io
import itertools
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spherinator.data import Column, DataError, DataModule, Segment, shard, write_dataset
from spherinator.data.plan import rank_batch_sizes, split_rows
from tests.conftest import quiet_trainer, write_fast_layout


def _ids(batches) -> list[int]:
    return [i for b in batches for i in b["id"].tolist()]


def _images(n: int = 40, shape: tuple[int, ...] = (3, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _id_module(path: Path, **kwargs) -> DataModule:
    """A DataModule of ``path``'s data and id columns, batches as dicts, no validation split (unless ``kwargs``)."""
    return DataModule(path, **{"columns": ["data", "id"], "return_dict": True, "val_fraction": 0.0, **kwargs})


def _worker_loader(path: Path, batch_size: int, persistent: bool = True):
    """The train loader of ``path``'s data and id columns, 2 workers, no validation split."""
    return _id_module(path, batch_size=batch_size, num_workers=2, persistent_workers=persistent).train_dataloader()


@pytest.fixture(scope="module")
def uneven_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """101 rows in 3 files with row groups of 7 (many partial groups), ids 0..100."""
    images = _images(101)
    root = tmp_path_factory.mktemp("uneven")
    write_dataset(root, [{"data": images, "id": np.arange(101)}], rows_per_file=37, rows_per_group=7)
    return root


# -- sharding ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world,workers,batch,drop_last",
    [(1, 1, 8, False), (2, 3, 8, False), (3, 2, 5, False), (4, 1, 16, False), (2, 2, 8, True), (3, 1, 1, False)],
)
def test_every_row_once_per_epoch_across_ranks_and_workers(uneven_dataset, world, workers, batch, drop_last):
    dm = _id_module(uneven_dataset, batch_size=batch, drop_last=drop_last, shuffle_buffer=20)
    seen, counts = [], []
    for rank in range(world):
        ds = dm.dataset("train", rank=rank, world_size=world)
        rank_batches = [
            list(ds.reader.batches(epoch=3, rank=rank, world_size=world, worker=w, num_workers=workers))
            for w in range(workers)
        ]
        flat = [b for w in rank_batches for b in w]
        counts.append(len(flat))
        assert len(ds) == len(flat)  # what Lightning is told matches what the workers yield
        seen += _ids(flat)
        assert all(len(b["id"]) == len(b["data"]) <= batch for b in flat)
        if drop_last:
            assert all(len(b["id"]) == batch for b in flat)
    assert len(set(counts)) == 1, f"ranks yield different batch counts {counts}: DDP would hang"
    if drop_last:
        assert len(seen) == len(set(seen)) == (101 // (world * batch)) * world * batch
    elif batch == 1 and 101 % world:
        assert set(seen) == set(range(101))  # rows are repeated only to equalise the ranks
        assert len(seen) == counts[0] * world
    else:
        assert sorted(seen) == list(range(101))


def test_shard_plans_cover_rows_once_for_many_configurations():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 30, rng.integers(1, 12))
        segments = [Segment(0, g, 0, int(n)) for g, n in enumerate(sizes)]
        total, world, workers, batch = (
            int(sizes.sum()),
            int(rng.integers(1, 5)),
            int(rng.integers(1, 4)),
            int(rng.integers(2, 9)),
        )
        if total < world:
            continue
        interleave = bool(rng.integers(2))
        rows, counts = [], []
        for rank in range(world):
            nb = 0
            for worker in range(workers):
                where = {"rank": rank, "world_size": world, "worker": worker, "num_workers": workers}
                segs, batch_sizes = shard(segments, batch_size=batch, epoch=1, seed=5, shuffle=True, **where,
                                          interleave=interleave)  # fmt: skip
                assert sum(s.rows for s in segs) == sum(batch_sizes)
                assert all(1 <= b <= batch for b in batch_sizes)
                rows += [(s.group, r) for s in segs for r in range(s.start, s.stop)]
                nb += len(batch_sizes)
            counts.append(nb)
        assert len(set(counts)) == 1
        assert sorted(rows) == sorted((g, r) for g, n in enumerate(sizes) for r in range(n))


def test_rank_batch_sizes_spread_the_shortfall():
    assert rank_batch_sizes(100, 2, 16, False) == [[16, 16, 16, 2], [16, 16, 16, 2]]
    assert rank_batch_sizes(33, 2, 16, False) == [[16, 1], [8, 8]]
    assert rank_batch_sizes(33, 2, 16, True) == [[16], [16]]


# -- shuffling ---------------------------------------------------------------------------------------------------


def _epoch_order(path: Path, seed: int, epoch: int, **kwargs) -> list[int]:
    dm = DataModule(path, columns=["data", "id"], return_dict=True, batch_size=8, seed=seed, **kwargs)
    ds = dm.dataset("train")
    ds.set_epoch(epoch)
    return _ids(ds)


def test_order_is_deterministic_per_seed_and_epoch_and_changes_across_epochs(uneven_dataset):
    first = _epoch_order(uneven_dataset, seed=1, epoch=0)
    assert first == _epoch_order(uneven_dataset, seed=1, epoch=0)
    assert first != _epoch_order(uneven_dataset, seed=1, epoch=1)
    assert sorted(first) == sorted(_epoch_order(uneven_dataset, seed=1, epoch=1))
    # rows mix across row groups: neighbours in the stream rarely come from the same group of 7
    same_group = sum(a // 7 == b // 7 for a, b in itertools.pairwise(first))
    assert same_group < len(first) // 3
    assert first != sorted(first)


def test_splits_are_disjoint_exact_and_seeded(uneven_dataset):
    dm = DataModule(uneven_dataset, columns=["data", "id"], return_dict=True, val_fraction=0.2, test_fraction=0.1)
    dm.setup()
    train, val, test = (_ids(dm.dataset(s)) for s in ("train", "val", "test"))
    assert (len(val), len(test)) == (20, 10)
    assert sorted(train + val + test) == list(range(101))
    assert val == sorted(val)  # validation is not shuffled
    other = DataModule(uneven_dataset, columns=["id"], return_dict=True, val_fraction=0.2, test_fraction=0.1, seed=7)
    assert _ids(other.dataset("val")) != val
    groups = [(0, g, n) for g, n in enumerate([5, 9, 3])]
    assert {k: sum(s.rows for s in v) for k, v in split_rows(groups, {"val": 0.25}, 0).items()} == {
        "val": 4,
        "train": 13,
    }


def test_train_loader_changes_order_each_pass_with_persistent_workers(uneven_dataset):
    loader = _worker_loader(uneven_dataset, batch_size=10)
    passes = [_ids(loader) for _ in range(2)]
    assert sorted(passes[0]) == sorted(passes[1]) == list(range(101))
    assert passes[0] != passes[1]


class _RecordIds(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 8 * 8, 1)
        self.seen: dict[int, list[int]] = {}
        self.val_rows = 0

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch["id"].tolist())
        return self.layer(batch["data"].flatten(1)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_rows += len(batch["id"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_epochs_see_every_training_row_in_a_new_order(uneven_dataset, recwarn):
    model = _RecordIds()
    dm = DataModule(uneven_dataset, columns=["data", "id"], return_dict=True, batch_size=16, val_fraction=0.1)
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    assert sorted(model.seen[0]) == sorted(model.seen[1])
    assert len(model.seen[0]) == dm.split_rows("train") == 91
    assert model.seen[0] != model.seen[1]
    assert model.val_rows == 2 * 10
    # Lightning's caution that len() of an IterableDataset may be wrong with workers does not apply: it is exact
    assert not [w for w in recwarn if "IterableDataset` has `__len__`" in str(w.message)]


def test_no_validation_split_runs_without_validation(image_dataset):
    model = _RecordIds()
    model.layer = torch.nn.Linear(3 * 32 * 32, 1)
    dm = DataModule(image_dataset, columns=["data", "id"], return_dict=True, batch_size=32, val_fraction=0.0)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, dm)
    assert len(model.seen[0]) == 96 and model.val_rows == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_predict_gives_every_row_once_in_file_order(uneven_dataset, workers):
    dm = DataModule(
        uneven_dataset, columns=["data", "id"], return_dict=True, batch_size=6, val_fraction=0.3, num_workers=workers
    )
    batches = list(dm.predict_dataloader())
    assert _ids(batches) == list(range(101))
    images = torch.from_numpy(_images(101)).float() / 255  # the uneven_dataset images, in file order
    data = torch.cat([b["data"] for b in batches])
    assert data.dtype == torch.float32  # workers send uint8; the loader scales it
    torch.testing.assert_close(data, images)


def _check_pass(batches, images: np.ndarray) -> None:
    """Every row of the uneven_dataset once, each id with its own image scaled to [0, 1]."""
    ids = torch.tensor(_ids(batches))
    assert sorted(ids.tolist()) == list(range(len(images)))
    data = torch.cat([b["data"] for b in batches])
    assert data.dtype == torch.float32
    torch.testing.assert_close(data, torch.from_numpy(images[ids.numpy()]).float() / 255)


def _open_files(root: Path) -> list[str]:
    """The files under ``root`` this process has open."""
    fds = Path("/proc/self/fd")
    return [t for t in (os.path.realpath(fd) for fd in fds.iterdir() if fd.exists()) if t.startswith(str(root))]


def test_a_pass_stopped_early_leaves_no_file_open_and_no_reading_thread(uneven_dataset):
    # row groups are read ahead in threads: stopping after two batches ends the reads under way and closes the files
    import threading

    dm = DataModule(uneven_dataset, columns=["data", "id"], return_dict=True, batch_size=4, val_fraction=0.0,
                    shuffle=False)  # fmt: skip
    batches = iter(dm.train_dataloader())  # reads 2 of the 15 row groups of 7 rows, and 2 more ahead
    assert len(next(batches)["id"]) == len(next(batches)["id"]) == 4
    assert _open_files(uneven_dataset) and any(t.name.startswith("spherinator-read") for t in threading.enumerate())
    del batches
    assert not _open_files(uneven_dataset)
    for thread in threading.enumerate():
        assert not thread.name.startswith("spherinator-read") or not thread.is_alive()


@pytest.mark.parametrize("persistent", [True, False])
def test_workers_hand_batches_through_reused_shared_slots(uneven_dataset, persistent):
    loader = _worker_loader(uneven_dataset, batch_size=6, persistent=persistent)
    images = _images(101)
    _check_pass(list(loader), images)
    first = loader.slots
    for i, _ in enumerate(loader):  # a pass that stops early leaves prefetched batches unconverted
        if i == 3:
            break
    _check_pass(list(loader), images)
    slots = loader.slots
    assert (slots is first) == persistent  # new workers each pass get new slots
    assert slots.fallbacks.tolist() == [0, 0]  # every batch came through a slot, none busy when needed
    assert slots.busy.sum() == 0  # and every slot was freed, the unconverted ones too


def test_busy_slots_fall_back_to_a_batch_of_its_own(uneven_dataset):
    from spherinator.data.transport import BatchSlots

    loader = _worker_loader(uneven_dataset, batch_size=6)  # persistent workers: the loader keeps these slots
    # one slot per worker, though each worker is asked for up to 2 batches ahead: some find their slot busy
    loader.handover.slots = BatchSlots({"data": (3, 8, 8)}, 6, 2, depth=1)
    _check_pass(list(loader), _images(101))
    assert loader.slots.fallbacks.sum() > 0
    assert loader.slots.busy.sum() == 0


def test_too_little_shared_memory_for_slots_warns_and_sends_batches_the_default_way(uneven_dataset, monkeypatch):
    import spherinator.data.transport as transport

    monkeypatch.setattr(transport, "shared_memory_free", lambda: 10_000)  # 4 slots x 2 workers x 6 rows need 36 KiB
    loader = _worker_loader(uneven_dataset, batch_size=6)
    with pytest.warns(UserWarning, match=r"/dev/shm has 0 MiB free.*lower num_workers / batch_size"):
        batches = list(loader)
    assert loader.slots is None
    _check_pass(batches, _images(101))


def _to_bfloat16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16)


def _fails_on_third_call(tensor: torch.Tensor) -> torch.Tensor:
    _fails_on_third_call.calls = getattr(_fails_on_third_call, "calls", 0) + 1
    if _fails_on_third_call.calls == 3:
        raise ValueError("third call")
    return tensor


@pytest.fixture
def data_and_mask(tmp_path) -> Path:
    """40 rows: uint8 data (3, 8, 8) and mask (1, 4, 4), ids 0..39, row groups of 7."""
    rng = np.random.default_rng(0)
    rows = {
        "data": rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8),
        "mask": rng.integers(0, 256, (40, 1, 4, 4), dtype=np.uint8),
        "id": np.arange(40),
    }
    write_dataset(tmp_path, [rows], rows_per_group=7)
    return tmp_path


def test_small_side_columns_of_any_dtype_travel_next_to_a_slot_column(data_and_mask):
    # "data" goes through the slots, the transformed "mask" (bfloat16, which numpy lacks) beside it in the SlotBatch
    columns = ["data", Column("mask", transform=_to_bfloat16), "id"]
    expected = list(DataModule(data_and_mask, columns=columns, return_dict=True, batch_size=8).predict_dataloader())
    dm = DataModule(data_and_mask, columns=columns, return_dict=True, batch_size=8, num_workers=2)
    loader = dm.predict_dataloader()
    loader.timeout = 60  # a batch lost in a worker would hang the loader: make it an error
    batches = list(loader)
    assert len(batches) == len(expected) == 5
    for got, want in zip(batches, expected, strict=True):
        assert got["mask"].dtype == torch.bfloat16
        for name in ("data", "mask", "id"):
            torch.testing.assert_close(got[name], want[name])


def test_a_failing_batch_in_a_worker_frees_its_slot(data_and_mask):
    columns = ["data", Column("mask", transform=_fails_on_third_call), "id"]
    dm = DataModule(data_and_mask, columns=columns, return_dict=True, batch_size=4, num_workers=2)
    loader = dm.predict_dataloader()
    with pytest.raises(DataError, match="third call"):
        list(loader)
    assert sorted(_ids(loader)) == list(range(40))  # the persistent workers go on with a complete pass
    assert loader.slots.busy.sum() == 0 and loader.slots.fallbacks.sum() == 0


def test_spawned_workers_share_the_slots(uneven_dataset):
    from spherinator.data.transport import Loader

    dm = DataModule(uneven_dataset, columns=["data", "id"], return_dict=True, batch_size=6, val_fraction=0.0)
    loader = Loader(dm.dataset("train"), batch_size=None, num_workers=2, multiprocessing_context="spawn")
    _check_pass(list(loader), _images(101))
    assert loader.slots.fallbacks.tolist() == [0, 0] and loader.slots.busy.sum() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_worker_batches_arrive_pinned(data_and_mask):
    dm = DataModule(data_and_mask, columns=["data", "id"], return_dict=True, batch_size=8, num_workers=2)
    batch = next(iter(dm.predict_dataloader()))  # pin_memory defaults to True where CUDA is available
    assert batch["data"].is_pinned() and batch["id"].is_pinned()


def test_slot_batch_is_freed_when_converted_or_dropped_in_the_receiving_process():
    import pickle

    from spherinator.data.transport import BatchSlots, SlotBatch

    slots = BatchSlots({"data": (2, 3)}, batch_size=4, num_workers=1, depth=2)
    array = np.arange(18, dtype=np.uint8).reshape(3, 2, 3)
    assert [slots.claim(0), slots.claim(0), slots.claim(0)] == [0, 1, None]
    assert slots.fallbacks.tolist() == [1]
    slots.write("data", 0, 1, array)
    sent = SlotBatch(slots.token, 0, 1, 3, {"data": None, "id": torch.arange(3)}, return_dict=True)
    received = pickle.loads(pickle.dumps(sent))
    del sent  # the worker's copy going away frees nothing
    assert slots.busy.tolist() == [[1, 1]]
    batch = received.resolve(slots)
    torch.testing.assert_close(batch["data"], torch.from_numpy(array).float() / 255)
    assert batch["id"].tolist() == [0, 1, 2]
    assert slots.busy.tolist() == [[1, 0]]
    side = {"data": None, "bf16": torch.ones(2, dtype=torch.bfloat16), "grad": torch.ones(2, requires_grad=True)}
    dropped = pickle.loads(pickle.dumps(SlotBatch(slots.token, 0, 0, 3, side, return_dict=False)))
    assert dropped.columns["bf16"].dtype == torch.bfloat16 and dropped.columns["grad"].requires_grad
    del dropped  # received but never converted (an iteration that stopped early)
    assert slots.busy.tolist() == [[0, 0]]
    assert slots.claim(0) == 0


@pytest.mark.parametrize("workers", [0, 1])
def test_uint8_scalar_column_stays_an_integer_with_and_without_workers(tmp_path, workers):
    # workers send uint8 arrays unscaled and the loader scales them; a uint8 label is no image and must not be scaled
    labels = np.arange(20, dtype=np.uint8)
    write_dataset(tmp_path, [{"data": _images(20), "label": labels}], rows_per_group=8)
    dm = DataModule(
        tmp_path, columns=["data", "label"], return_dict=True, batch_size=8, val_fraction=0.0, num_workers=workers
    )
    batches = list(dm.predict_dataloader())
    label = torch.cat([b["label"] for b in batches])
    assert label.dtype == torch.int64
    assert label.tolist() == labels.tolist()
    assert torch.cat([b["data"] for b in batches]).dtype == torch.float32


def test_shuffle_buffer_memory_stays_bounded(tmp_path):
    # 2000 rows of 4 KiB: a pass must never buffer much more than shuffle_buffer + one row group
    write_dataset(tmp_path, [{"data": _images(2000, (4, 32, 32))}], rows_per_group=50)
    dm = DataModule(tmp_path, batch_size=20, shuffle_buffer=100, val_fraction=0.0)
    ds = dm.dataset("train")
    import spherinator.data.batching as batching

    peak, original = [0], batching._take_rows

    def spy(chunks, *args):  # the rows in the shuffle buffer when batches are drawn from it
        peak[0] = max(peak[0], sum(len(next(iter(c.values()))) for c in chunks))
        return original(chunks, *args)

    batching._take_rows = spy
    try:
        assert sum(len(b) for b in ds) == 2000
    finally:
        batching._take_rows = original
    assert 100 <= peak[0] <= 100 + 50 + 20


def _drawn_batches(chunks: list[np.ndarray], sizes: list[int], window: int, rng: np.random.Generator) -> list[set]:
    """The rows of each shuffled batch as a shuffle buffer draws them (what checkpoints of every spherinator saved
    before 2026-12-07 replay): the buffer's rows in order, batches drawn from one permutation of them, and the rows
    left over kept in the order drawn, ahead of the next chunks."""
    pending, stream, k, out = np.zeros(0, dtype=np.int64), iter(chunks), 0, []
    while k < len(sizes):
        while len(pending) < max(window, sizes[k]) and (chunk := next(stream, None)) is not None:
            pending = np.concatenate([pending, chunk])
        perm, pos = rng.permutation(len(pending)), 0
        while k < len(sizes) and len(pending) - pos >= sizes[k]:
            out.append(set(pending[perm[pos : pos + sizes[k]]].tolist()))
            pos, k = pos + sizes[k], k + 1
        pending = pending[perm[pos:]]
    return out


@pytest.mark.parametrize("window,batch", [(20, 8), (0, 5), (10, 3), (16, 16)])
def test_shuffled_batches_hold_the_rows_a_shuffle_buffer_draws(window, batch):
    # (before: gathering each batch in the buffer's order also kept the rows left over in the buffer's order, so
    # every batch after the first window held other rows than before; a checkpoint saved mid-epoch by the release
    # before that was replayed with the new rows and the resumed epoch trained on some rows twice, others never)
    from spherinator.data.batching import rebatch

    rows = np.arange(101)
    chunks = [rows[a : a + 7] for a in range(0, 101, 7)]  # row groups of 7, the last of 3
    sizes = [batch] * (101 // batch) + ([101 % batch] if 101 % batch else [])
    got = rebatch(iter([{"row": c} for c in chunks]), sizes, window, np.random.default_rng(3))
    assert [set(b["row"].tolist()) for b in got] == _drawn_batches(chunks, sizes, window, np.random.default_rng(3))


# -- layouts and return modes --------------------------------------------------------------------------------------


def _schema_with(table: pa.Table, metadata: dict[bytes, bytes]) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})


def _write_layout(root: Path, layout: str, images: np.ndarray) -> Path:
    """The same images in one of the storage layouts the DataModule understands."""
    n, shape = len(images), images.shape[1:]
    ids = pa.array(np.arange(n))
    shape_meta = {b"data_shape": ("(" + ",".join(map(str, shape)) + ")").encode()}
    if layout == "list":  # flat list<uint8> + shape metadata: existing Spherinator datasets
        data = pa.array([row.reshape(-1) for row in images], type=pa.list_(pa.uint8()))
        table = _schema_with(pa.table({"data": data, "id": ids}), shape_meta)
    elif layout == "nested_fixed_list":  # fixed-size lists all the way down: shape from the type, no metadata
        data = pa.array(images.tolist(), type=pa.list_(pa.list_(pa.list_(pa.uint8(), shape[2]), shape[1]), shape[0]))
        table = pa.table({"data": data, "id": ids})
    elif layout == "tensor":
        tensor_type = pa.fixed_shape_tensor(pa.uint8(), shape)
        storage = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), int(np.prod(shape)))
        table = pa.table({"data": pa.ExtensionArray.from_storage(tensor_type, storage), "id": ids})
    elif layout in ("png", "hf"):
        blobs = []
        for row in images:
            buf = io.BytesIO()
            Image.fromarray(row.transpose(1, 2, 0)).save(buf, format="PNG")
            blobs.append(buf.getvalue())
        data = pa.array(blobs, type=pa.binary())
        if layout == "hf":
            data = pa.StructArray.from_arrays([data, pa.array([None] * n, type=pa.string())], ["bytes", "path"])
        table = pa.table({"data": data, "id": ids})
    elif layout == "binary":  # raw bytes in a variable-length binary column
        data = pa.array([row.tobytes() for row in images], type=pa.binary())
        table = _schema_with(pa.table({"data": data, "id": ids}), {**shape_meta, b"data_dtype": b"uint8"})
    else:
        raise AssertionError(layout)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "part-0.parquet", row_group_size=7)
    return root


@pytest.mark.parametrize("layout", ["list", "nested_fixed_list", "tensor", "png", "hf", "binary"])
def test_each_storage_layout_reads_the_same_tensors(tmp_path, layout):
    images = _images(30)
    root = _write_layout(tmp_path / layout, layout, images)
    dm = DataModule(root, columns=["data", "id"], return_dict=True, batch_size=8, val_fraction=0.0)
    assert dm.sample_shape() == (3, 8, 8)
    batches = list(dm.predict_dataloader())
    data = torch.cat([b["data"] for b in batches])
    assert data.dtype == torch.float32
    torch.testing.assert_close(data, torch.from_numpy(images).float() / 255)
    assert torch.cat([b["id"] for b in batches]).tolist() == list(range(30))


def test_float_spectra_and_return_modes(spectrum_dataset):
    dm = DataModule(spectrum_dataset, columns=["data", "id"], batch_size=16, val_fraction=0.0)
    batch = next(iter(dm.predict_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (16, 1, 64) and batch.dtype == torch.float32
    assert batch.max() > 0.9  # float data is not rescaled
    dm = DataModule(spectrum_dataset, columns=["data", "id"], return_dict=True, batch_size=16, val_fraction=0.0)
    batch = next(iter(dm.predict_dataloader()))
    assert list(batch) == ["data", "id"] and batch["id"].dtype == torch.int64
    assert batch["id"].tolist() == list(range(16))


def test_default_columns_are_all_tensor_columns(image_dataset):
    dm = DataModule(image_dataset)
    assert dm.column_names == ["data", "id"]
    assert dm.sample_shape() == (3, 32, 32) and dm.sample_shape("id") == ()


def test_batch_and_per_sample_transforms(image_dataset):
    from torchvision.transforms import v2

    dm = DataModule(image_dataset, columns=[Column("data", v2.Resize(16))], batch_size=8, val_fraction=0.0)
    assert dm.sample_shape() == (3, 16, 16)
    assert next(iter(dm.predict_dataloader())).shape == (8, 3, 16, 16)

    calls = []

    def per_sample(x):
        calls.append(tuple(x.shape))
        return x.mean(0, keepdim=True)

    dm = DataModule(
        image_dataset,
        columns=[{"name": "data", "transform": per_sample, "per_sample": True}],
        batch_size=8,
        val_fraction=0.0,
    )
    assert next(iter(dm.predict_dataloader())).shape == (8, 1, 32, 32)
    assert set(calls) == {(3, 32, 32)}


# -- bad input -------------------------------------------------------------------------------------------------------


def _error(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        dm = DataModule(path, **kwargs)
        dm.setup("fit")
        list(dm.train_dataloader())
    return str(info.value)


def test_missing_path_and_no_parquet_files(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope") and "nope" in _error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    message = _error(tmp_path / "empty")
    assert "no .parquet files" in message and "empty" in message and "make_dataset" in message


def test_unknown_column_lists_the_columns_that_exist(image_dataset):
    message = _error(image_dataset, columns=["image"])
    assert "'image'" in message and "'data'" in message and "'id'" in message
    with pytest.raises(DataError, match="'image'.*found: 'data', 'id'"):
        DataModule(image_dataset, columns=["image"]).sample_shape()


def test_ragged_lists_without_shape(tmp_path):
    data = pa.array([[1.0, 2.0], [1.0, 2.0, 3.0]], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"data": data}), tmp_path / "x.parquet")
    message = _error(tmp_path, val_fraction=0.0)
    assert "ragged" in message and "data_shape" in message and "x.parquet row group 0" in message


def test_shape_metadata_not_matching_data(tmp_path):
    data = pa.array([[1.0, 2.0, 3.0]] * 4, type=pa.list_(pa.float32()))
    table = pa.table({"data": data}).replace_schema_metadata({b"data_shape": b"(2,2)"})
    pq.write_table(table, tmp_path / "x.parquet")
    message = _error(tmp_path, val_fraction=0.0)
    assert "(2, 2)" in message and "3 values per row" in message and "x.parquet" in message


def test_corrupt_file_is_named(image_dataset, tmp_path):
    for f in image_dataset.glob("*.parquet"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "part-002.parquet").write_bytes(b"not parquet at all")
    message = _error(tmp_path)
    assert "part-002.parquet" in message and "not a readable Parquet file" in message


def test_corrupt_row_group_is_named(tmp_path):
    write_dataset(tmp_path, [{"data": _images(64, (3, 32, 32))}], rows_per_group=16, compression="none")
    file = tmp_path / "part-00000.parquet"
    raw = bytearray(file.read_bytes())
    raw[20000:20010] = b"x" * 10  # inside row group 0's data page (each row group holds 48 KiB)
    file.write_bytes(bytes(raw))
    dm = DataModule(tmp_path, batch_size=8, val_fraction=0.0)
    with pytest.raises(DataError, match="part-00000.parquet row group 0 cannot be read.*corrupt"):
        list(dm.predict_dataloader())


def test_empty_split(image_dataset):
    message = _error(image_dataset, val_fraction=0.001)
    assert "val split is empty" in message and "val_fraction=0.001" in message and "96 rows" in message


def test_wrong_binary_length_names_file_and_row_group(tmp_path):
    data = pa.array([bytes(12)] * 3 + [bytes(10)], type=pa.binary())
    table = pa.table({"data": data}).replace_schema_metadata({b"data_shape": b"(3,4)", b"data_dtype": b"uint8"})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=2)
    message = _error(tmp_path, val_fraction=0.0, shuffle=False)
    assert "x.parquet row group 1" in message and "10 bytes" in message and "needs 12" in message
    fixed = pa.table({"data": pa.array([bytes(10)] * 2, type=pa.binary(10))})
    pq.write_table(
        fixed.replace_schema_metadata({b"data_shape": b"(3,4)", b"data_dtype": b"uint8"}), tmp_path / "x.parquet"
    )
    message = _error(tmp_path, val_fraction=0.0)
    assert "x.parquet" in message and "10 bytes per row" in message and "needs 12" in message


@pytest.mark.parametrize(
    "metadata,missing",
    [({b"data_shape": b"(3,4)"}, "data_dtype"), ({b"data_dtype": b"uint8"}, "data_shape"), ({}, "data_shape and")],
)
def test_missing_dtype_or_shape_metadata(tmp_path, metadata, missing):
    table = pa.table({"data": pa.array([bytes(12)] * 2, type=pa.binary(12))}).replace_schema_metadata(metadata)
    pq.write_table(table, tmp_path / "x.parquet")
    message = _error(tmp_path, val_fraction=0.0)
    assert "x.parquet" in message and missing in message and "convert" in message


def test_bad_arguments_name_the_value(image_dataset):
    with pytest.raises(DataError, match="val_fraction=0.6 \\+ test_fraction=0.5"):
        DataModule(image_dataset, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(DataError, match="batch_size=0"):
        DataModule(image_dataset, batch_size=0)
    dm = DataModule(image_dataset, columns=[Column("data", lambda x: x.reshape(3, 32, 32))], val_fraction=0.0)
    with pytest.raises(DataError, match="per_sample: true"):
        next(iter(dm.predict_dataloader()))


def test_fast_layout_fixture_matches_writer(tmp_path):
    images = _images(20)
    write_fast_layout(tmp_path / "a", {"data": images}, files=1)
    write_dataset(tmp_path / "b", [{"data": images}])
    a, b = (torch.cat(list(DataModule(tmp_path / p, val_fraction=0.0).predict_dataloader())) for p in "ab")
    torch.testing.assert_close(a, b)


# -- values the model cannot take, shapes that change, resuming with other sizes (issue #11) -------------------------


def _float_images(dtype=np.float32, n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).random((n, 3, 8, 8)).astype(dtype)


def _write_float_layout(root: Path, layout: str, images: np.ndarray) -> Path:
    """``images`` (float) in the fast, list or fixed_shape_tensor layout, row groups of 7 rows."""
    if layout == "fast":
        return write_fast_layout(root, {"data": images, "id": np.arange(len(images))}, files=1, rows_per_group=7)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), int(np.prod(images.shape[1:])))
    if layout == "list":
        table = _schema_with(pa.table({"data": flat}), {b"data_shape": b"(3,8,8)"})
    else:
        tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(images.dtype), images.shape[1:])
        table = pa.table({"data": pa.ExtensionArray.from_storage(tensor_type, flat)})
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "part-00000.parquet", row_group_size=7)
    return root


@pytest.mark.parametrize(
    "layout,dtype,value,shown",
    [
        ("fast", np.float32, np.nan, "holds nan"),
        ("fast", np.float32, -np.inf, "holds -inf"),
        ("fast", np.float64, np.nan, "holds nan"),
        ("fast", np.float16, np.inf, "holds inf"),
        ("fast", np.float64, 1e39, "holds 1e+39 (beyond float32"),
        ("list", np.float32, np.nan, "holds nan"),
        ("tensor", np.float32, np.inf, "holds inf"),
    ],
)
def test_values_the_model_cannot_take_name_column_file_row_group_and_row(tmp_path, layout, dtype, value, shown):
    # (before: NaN ended mid-epoch in a 110-line traceback about the PowerSpherical loc; 1e39 in float64 became inf)
    images = _float_images(dtype)
    images[17, 1, 2, 3] = value  # row group 2, its row 3
    root = _write_float_layout(tmp_path, layout, images)
    message = _error(root, val_fraction=0.0, batch_size=4)
    assert "part-00000.parquet row group 2: column 'data' row 3 " + shown in message, message
    assert "1 of the 7 rows read there" in message


def test_a_row_group_read_from_its_middle_names_the_row_of_the_row_group(tmp_path):
    images = _float_images()
    images[19, 0, 0, 0] = np.nan  # row group 2, its row 5
    root = _write_float_layout(tmp_path, "fast", images)
    dm = DataModule(root, batch_size=4, val_fraction=0.0)
    dm.setup()
    dm._splits["train"] = [Segment(0, 2, 4, 7)]  # a split that starts inside the row group
    with pytest.raises(DataError, match="row group 2: column 'data' row 5 holds nan"):
        list(dm.train_dataloader())


def test_the_finiteness_check_passes_finite_values_whose_sum_overflows_and_checks_any_byte_order():
    from spherinator.data.layout import ColumnLayout, Where
    from spherinator.data.reader import check_values

    def check(array):
        check_values(array, ColumnLayout("data", "raw", array.shape[1:], array.dtype), Where(Path("x.parquet"), 0))

    check(np.full((4, 8), 3e38, dtype=np.float32))  # finite: only the fast path's sum overflows
    big_endian = np.ones((4, 8), dtype=">f4")
    check(big_endian)
    big_endian[2, 5] = np.inf
    with pytest.raises(DataError, match="row group 0: column 'data' row 2 holds inf"):
        check(big_endian)


@pytest.mark.parametrize("persistent", [True, False])
def test_a_data_error_in_a_worker_reaches_the_main_process_as_its_one_line_message(tmp_path, persistent):
    # (before: a DataError from a worker read "Caught DataError in DataLoader worker process 0. Original Traceback...")
    images = _float_images()
    images[30, 0, 0, 0] = np.inf
    root = _write_float_layout(tmp_path, "fast", images)
    dm = DataModule(root, batch_size=4, val_fraction=0.0, num_workers=2, persistent_workers=persistent)
    loader = dm.predict_dataloader()
    with pytest.raises(DataError) as info:
        list(loader)
    message = str(info.value)
    assert message.startswith(f"{root / 'part-00000.parquet'} row group 4: column 'data' row 2 holds inf"), message
    assert "\n" not in message and "Traceback" not in message


def test_nan_in_a_scalar_side_column_passes_through_as_missing(tmp_path):
    # catalogue columns (a redshift) use NaN for "unknown"; they go with the batch, they are not the model input
    redshift = np.linspace(0, 1, 20)
    redshift[3] = np.nan
    write_dataset(tmp_path, [{"data": _images(20), "redshift": redshift}])
    dm = DataModule(tmp_path, columns=["data", "redshift"], return_dict=True, batch_size=20, val_fraction=0.0)
    batch = next(iter(dm.predict_dataloader()))
    assert torch.isnan(batch["redshift"][3]) and torch.isfinite(batch["data"]).all()


def test_uint64_ids_beyond_int64_are_refused_not_wrapped(tmp_path):
    # (before: ids 2**63 + i became -2**63 + i)
    ids = np.arange(20, dtype=np.uint64) + np.uint64(2**63)
    write_dataset(tmp_path, [{"data": _images(20), "id": ids}], rows_per_group=8)
    message = _error(tmp_path, columns=["data", "id"], return_dict=True, val_fraction=0.0, shuffle=False)
    assert "row group 0: column 'id' row 0 holds 9223372036854775808, beyond int64" in message
    ok = np.arange(20, dtype=np.uint64)
    write_dataset(tmp_path / "ok", [{"data": _images(20), "id": ok}])
    dm = DataModule(tmp_path / "ok", columns=["data", "id"], return_dict=True, batch_size=20, val_fraction=0.0)
    assert next(iter(dm.predict_dataloader()))["id"].tolist() == list(range(20))


def _write_groups(path: Path, groups: list[pa.Table]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, groups[0].schema) as writer:
        for table in groups:
            writer.write_table(table)


@pytest.mark.parametrize("workers", [0, 2])
def test_list_rows_without_shape_metadata_must_keep_the_first_row_groups_shape(tmp_path, workers):
    # (before: the batch mixing two shapes failed in np.concatenate, or a model's matmul, naming no file)
    list_type = pa.list_(pa.list_(pa.list_(pa.float32())))
    groups = []
    for g in range(4):
        width = 7 if g == 2 else 8
        rows = np.random.default_rng(g).random((5, 3, 8, width), dtype=np.float32)
        groups.append(pa.table({"data": pa.array(rows.tolist(), type=list_type)}))
    _write_groups(tmp_path / "part-0.parquet", groups)
    dm = DataModule(tmp_path, batch_size=5, val_fraction=0.0, num_workers=workers)
    with pytest.raises(DataError) as info:
        list(dm.predict_dataloader())
    message = str(info.value)
    assert f"{tmp_path / 'part-0.parquet'} row group 2: column 'data' holds rows of shape (3, 8, 7)" in message
    assert "but " + str(tmp_path / "part-0.parquet") + " row group 0 holds (3, 8, 8)" in message
    assert "data_shape metadata" in message and "\n" not in message


def test_encoded_images_of_another_size_in_a_later_row_group_are_named(tmp_path):
    def png(size: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    groups = [pa.table({"data": pa.array([png(12 if g == 1 else 8)] * 4, type=pa.binary())}) for g in range(3)]
    _write_groups(tmp_path / "part-0.parquet", groups)
    message = _error(tmp_path, val_fraction=0.0, shuffle=False, batch_size=8)
    assert "row group 1: column 'data' holds rows of shape (3, 12, 12), but" in message
    assert "row group 0 holds (3, 8, 8)" in message and "convert --size" in message


def test_an_empty_first_file_and_an_empty_row_group_are_passed_over(tmp_path):
    list_type = pa.list_(pa.float32())
    empty = pa.table({"data": pa.array([], type=list_type)})
    _write_groups(tmp_path / "a.parquet", [empty])
    rows = [
        pa.table({"data": pa.array([[float(i)] * 4 for i in range(4 * g, 4 * g + 4)], type=list_type)})
        for g in range(2)
    ]
    _write_groups(tmp_path / "b.parquet", [rows[0], empty, rows[1]])
    dm = DataModule(tmp_path, batch_size=3, val_fraction=0.0)
    assert dm.sample_shape() == (4,)
    data = torch.cat(list(dm.predict_dataloader()))
    assert data[:, 0].tolist() == [float(i) for i in range(8)]


# Resuming mid-epoch: the loader's state tells which rows the epoch has handed out, whatever the new sizes


def _all_ids_unread(dm: DataModule, segments: list[Segment]) -> list[int]:
    """The ids of ``segments`` (the uneven_dataset's ids are the row numbers in file order)."""
    offset, start = {}, 0
    for f, g, rows in dm.index.groups:
        offset[(f, g)] = start
        start += rows
    return [offset[(s.file, s.group)] + r for s in segments for r in range(s.start, s.stop)]


@pytest.mark.parametrize(
    "world,workers,shuffle,buffer", [(1, 0, True, 16), (1, 2, True, 16), (2, 2, True, 5), (3, 1, False, 0)]
)
def test_unread_rows_are_exactly_the_rows_the_loaders_had_not_handed_out(
    uneven_dataset, world, workers, shuffle, buffer
):
    from spherinator.data.plan import Pass, unread_rows
    from spherinator.data.transport import Loader

    dm = DataModule(uneven_dataset, columns=["data", "id"], return_dict=True, batch_size=4, val_fraction=0.0,
                    shuffle=shuffle, shuffle_buffer=buffer, seed=3)  # fmt: skip
    handed_out = []
    for rank in range(world):
        stream = dm.dataset("train", rank=rank, world_size=world)
        stream.set_epoch(2)
        loader = Loader(stream, batch_size=None, num_workers=workers)
        handed_out += _ids(itertools.islice(loader, 5))
    passes = [Pass(batch_size=4, num_workers=workers, world_size=world, shuffle_buffer=buffer, batches=5)]
    left = unread_rows(dm._splits["train"], passes, epoch=2, seed=3, shuffle=shuffle, drop_last=False)
    left_ids = _all_ids_unread(dm, left)
    assert len(handed_out) == world * 5 * 4
    assert sorted(left_ids + handed_out) == list(range(101))


class _SaveAfter(pl.Callback):
    """Saves a checkpoint after the ``n``-th training batch of this run (as the requeue callback does)."""

    def __init__(self, n: int, path: Path) -> None:
        self.n, self.path, self.seen = n, path, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.n:
            trainer.save_checkpoint(self.path)


def _fit_ids(path: Path, ckpt: Path | None = None, *, save: tuple[int, Path] | None = None, max_steps: int = -1,
             max_epochs: int = 1, **data) -> tuple[dict[int, list[int]], pl.Trainer]:  # fmt: skip
    """Train the id-recording module on ``path`` (no validation); the ids each epoch trained on, and the trainer."""
    model = _RecordIds()
    dm = DataModule(path, columns=["data", "id"], return_dict=True, val_fraction=0.0, **data)
    callbacks = [_SaveAfter(*save)] if save else []
    trainer = quiet_trainer(max_epochs=max_epochs, max_steps=max_steps, callbacks=callbacks)
    trainer.fit(model, dm, ckpt_path=ckpt)
    return model.seen, trainer


@pytest.mark.parametrize(
    "before,after",
    [
        ({"batch_size": 8}, {"batch_size": 16}),  # Lightning would end the epoch after 2 of the 4 batches left
        ({"batch_size": 16, "num_workers": 2}, {"batch_size": 6}),
        ({"batch_size": 8, "shuffle": False}, {"batch_size": 5, "num_workers": 2, "shuffle": False}),
        ({"batch_size": 8}, {"batch_size": 8}),
    ],
)
def test_resuming_mid_epoch_with_another_batch_size_trains_on_every_row_once(uneven_dataset, tmp_path, before, after):
    # (before: the state counted batches, and the new loader skipped that many batches of the new size)
    ckpt = tmp_path / "mid.ckpt"
    first, _ = _fit_ids(uneven_dataset, save=(5, ckpt), max_steps=5, **before)
    rest, trainer = _fit_ids(uneven_dataset, ckpt, max_epochs=2, **after)
    assert len(first[0]) == 5 * before["batch_size"]
    assert sorted(first[0] + rest[0]) == list(range(101))  # every row of the epoch once
    assert sorted(rest[1]) == list(range(101))  # and the next epoch is whole again
    # one optimizer step per batch trained on: 5 before, the rows left in batches of the new size, a whole epoch
    left = math.ceil((101 - 5 * before["batch_size"]) / after["batch_size"])
    assert trainer.global_step == 5 + left + math.ceil(101 / after["batch_size"]) and trainer.current_epoch == 2
    assert trainer.reload_dataloaders_every_n_epochs == 0  # the trainer's setting as it was


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_resumed_epoch_reads_only_the_row_groups_holding_rows_not_yet_trained_on(
    uneven_dataset, tmp_path, monkeypatch, shuffle
):
    # (the rows trained on before the checkpoint are neither read again nor handed out again)
    from spherinator.data.reader import ParquetReader

    ckpt = tmp_path / "mid.ckpt"
    data = {"batch_size": 8, "shuffle": shuffle, "shuffle_buffer": 10, "seed": 5}
    first, _ = _fit_ids(uneven_dataset, save=(8, ckpt), max_steps=8, **data)
    reads, read_group = [], ParquetReader._read_group

    def counted(self, handles, file, group):
        reads.append((file, group))
        return read_group(self, handles, file, group)

    monkeypatch.setattr(ParquetReader, "_read_group", counted)
    rest, _ = _fit_ids(uneven_dataset, ckpt, **data)
    assert len(first[0]) == 64 and sorted(first[0] + rest[0]) == list(range(101))  # exactly the untrained rows
    groups = DataModule(uneven_dataset, val_fraction=0.0).index.groups  # (file, group, rows) in file order, ids too
    group_of = [(f, g) for f, g, rows in groups for _ in range(rows)]  # the row group of each id
    assert sorted(reads) == sorted({group_of[i] for i in rest[0]})  # each of those row groups once, no other
    if not shuffle:  # the rows in file order: no row group before the one of row 64 is read (two read at a time)
        assert min(reads) == group_of[64] and len(reads) == len({group_of[i] for i in range(64, 101)})


def test_resuming_twice_in_one_epoch_with_other_sizes_trains_on_every_row_once(uneven_dataset, tmp_path):
    one, two = tmp_path / "one.ckpt", tmp_path / "two.ckpt"
    first, _ = _fit_ids(uneven_dataset, save=(3, one), max_steps=3, batch_size=7, shuffle_buffer=20)
    second, _ = _fit_ids(uneven_dataset, one, save=(4, two), max_steps=7, batch_size=5, num_workers=2)
    third, _ = _fit_ids(uneven_dataset, two, batch_size=11)
    assert len(first[0]) == 21 and len(second[0]) == 20
    assert sorted(first[0] + second[0] + third[0]) == list(range(101))


def test_a_loader_state_of_an_older_spherinator_resumes_by_its_batch_count(uneven_dataset, tmp_path):
    ckpt = tmp_path / "mid.ckpt"
    first, _ = _fit_ids(uneven_dataset, save=(5, ckpt), max_steps=5, batch_size=8)
    state = torch.load(ckpt, weights_only=False)
    loops = state["loops"]["fit_loop"]["state_dict"]
    loops["combined_loader"] = [{"epoch": 0}]  # what the loader saved before it recorded its passes
    torch.save(state, ckpt)
    rest, _ = _fit_ids(uneven_dataset, ckpt, batch_size=8)
    assert sorted(first[0] + rest[0]) == list(range(101))


@pytest.mark.parametrize("batch_size", [8, 16])
def test_a_checkpoint_holding_only_the_loaders_position_resumes_with_its_sizes(uneven_dataset, tmp_path, batch_size):
    # (a checkpoint of spherinator before the DataModule kept the position: Lightning loads the loader's copy after
    # it has taken the epoch's length, so only the sizes it was saved with end the epoch there)
    ckpt = tmp_path / "mid.ckpt"
    first, _ = _fit_ids(uneven_dataset, save=(5, ckpt), max_steps=5, batch_size=8)
    state = torch.load(ckpt, weights_only=False)
    del state[DataModule.__qualname__]
    torch.save(state, ckpt)
    if batch_size != 8:
        with pytest.raises(DataError, match="middle of epoch 0 with batch_size 8, num_workers 0 on 1 rank"):
            _fit_ids(uneven_dataset, ckpt, batch_size=batch_size)
        return
    rest, trainer = _fit_ids(uneven_dataset, ckpt, batch_size=batch_size)
    assert sorted(first[0] + rest[0]) == list(range(101)) and trainer.global_step == 13


def test_resuming_mid_epoch_on_another_split_or_seed_is_refused(uneven_dataset, tmp_path):
    ckpt = tmp_path / "mid.ckpt"
    _fit_ids(uneven_dataset, save=(5, ckpt), max_steps=5, batch_size=8)
    with pytest.raises(DataError, match="middle of epoch 0 .*seed 42 -> 7.*end of an epoch"):
        _fit_ids(uneven_dataset, ckpt, batch_size=8, seed=7)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_transform_that_makes_nan_or_inf_is_named(tmp_path, workers):
    # (before: torch.log of images with black pixels ended in the PowerSpherical loc traceback)
    images = _images(16) | 1  # no black pixel but one
    images[3, 0, 0, 0] = 0
    write_dataset(tmp_path, [{"data": images}])
    dm = DataModule(tmp_path, columns=[Column("data", torch.log)], batch_size=8, val_fraction=0.0, num_workers=workers)
    with pytest.raises(DataError) as info:
        list(dm.predict_dataloader())
    message = str(info.value)
    assert "transform <built-in method log" in message and "column 'data' made values that are not finite" in message
    assert "(in 1 of 8 rows)" in message and "\n" not in message


# String id columns (survey object names) pass through the loader and predict as lists of str


def _name(i: int) -> str:
    return f"SDSS J{i:06d}.78+1234{i % 10}.7"


@pytest.fixture(scope="module", params=["string", "large_string"])
def named_dataset(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """45 rows of 3x16x16 uint8 images, ``id`` 0..44 and ``name`` (a string or large_string column, a function of
    the id), in 2 files with row groups of 7."""
    root = tmp_path_factory.mktemp(f"named-{request.param}")
    names = np.array([_name(i) for i in range(45)])
    write_dataset(root, [{"data": _images(45, (3, 16, 16)), "id": np.arange(45), "name": names}],
                  rows_per_file=23, rows_per_group=7)  # fmt: skip
    if request.param == "large_string":
        for file in root.glob("*.parquet"):
            table = pq.read_table(file)
            field = table.schema.get_field_index("name")
            table = table.set_column(field, "name", table.column("name").cast(pa.large_string()))
            pq.write_table(table, file, row_group_size=7)
    assert pa.types.is_large_string(pq.read_schema(next(root.glob("*.parquet"))).field("name").type) == (
        request.param == "large_string"
    )
    return root


def _check_names(batches) -> list[int]:
    ids = []
    for batch in batches:
        assert isinstance(batch["name"], list) and all(isinstance(n, str) for n in batch["name"])
        assert batch["name"] == [_name(i) for i in batch["id"].tolist()]  # each name stays with its row
        ids += batch["id"].tolist()
    return ids


@pytest.mark.parametrize("workers", [0, 2])
def test_string_columns_come_as_lists_of_str_with_their_rows(named_dataset, workers):
    dm = DataModule(named_dataset, columns=["data", "name", "id"], return_dict=True, batch_size=6,
                    num_workers=workers, val_fraction=0.2, shuffle_buffer=10)  # fmt: skip
    assert _check_names(dm.predict_dataloader()) == list(range(45))  # file order
    train = _check_names(dm.train_dataloader())  # shuffled, through the workers' slots when there are workers
    val = _check_names(dm.val_dataloader())
    assert sorted(train + val) == list(range(45))


def test_string_columns_shard_across_ranks_and_workers(named_dataset):
    from spherinator.data.transport import Loader

    dm = DataModule(named_dataset, columns=["data", "name", "id"], return_dict=True, batch_size=4, val_fraction=0.0)
    ids = []
    for rank in range(2):
        loader = Loader(dm.dataset("train", rank=rank, world_size=2), batch_size=None, num_workers=2)
        ids += _check_names(loader)
    assert len(ids) == 2 * 6 * 4 - 3  # 45 rows over 2 ranks x 6 batches: the last batches shrink, no row twice
    assert sorted(ids) == list(range(45))


def test_string_column_cannot_be_the_model_input_nor_transformed(named_dataset):
    first = r"^column 'name' holds strings, so it cannot be the model input"
    with pytest.raises(DataError, match=first + r".*columns: \[data, name\]$"):
        DataModule(named_dataset, columns=["name", "data"]).setup()
    with pytest.raises(DataError, match=first):
        DataModule(named_dataset, columns=["name", "data"]).sample_shape()  # before setup, as the CLI asks
    with pytest.raises(DataError, match="column 'name' holds strings, which a transform cannot take"):
        DataModule(named_dataset, columns=["data", Column("name", transform=torch.log)]).setup()
    assert DataModule(named_dataset).column_names == ["data", "id"]  # not named: strings are left out


@pytest.mark.parametrize("workers", [0, 2])
def test_predict_writes_string_ids_into_the_embeddings_in_row_order(named_dataset, tmp_path, workers):
    from spherinator.callbacks import EmbeddingWriter
    from spherinator.models import (
        ConsecutiveConv2DLayer,
        ConvolutionalEncoder2D,
        UpsamplingDecoder2D,
        VariationalAutoencoder,
    )

    encoder = ConvolutionalEncoder2D([3, 16, 16], 8, [ConsecutiveConv2DLayer(4, 2, 1, [4, 8])])
    model = VariationalAutoencoder(encoder, UpsamplingDecoder2D(base_channels=8, seed_size=4), z_dim=3)
    dm = DataModule(named_dataset, columns=["data", "name", "id"], return_dict=True, batch_size=8,
                    num_workers=workers)  # fmt: skip
    out = tmp_path / "embeddings.parquet"
    trainer = quiet_trainer(callbacks=[EmbeddingWriter(out)])
    trainer.predict(model, dm, return_predictions=False)
    table = pq.read_table(out)
    assert table.schema.field("name").type == pa.string()
    assert table.column("name").to_pylist() == [_name(i) for i in range(45)]
    assert table.column("id").to_pylist() == list(range(45))
    assert table.column("location").to_pylist()[0] != table.column("location").to_pylist()[1]


# -- per-row columns keep their stored dtype (issue 19) ----------------------------------------------------------


@pytest.fixture(scope="module")
def catalogue_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images with float64 MJDs, a float64 beyond float32, float32 fluxes and int64 ids beyond 2**53."""
    n = 24
    columns = {
        "data": _images(n),
        "mjd": 59000.123456 + np.arange(n, dtype=np.float64),
        "huge": np.full(n, 1e300),
        "flux": np.linspace(0, 1, n, dtype=np.float32),
        "id": np.arange(n, dtype=np.int64) + 2**60 + 1,
    }
    root = tmp_path_factory.mktemp("catalogue")
    write_dataset(root, [columns], rows_per_group=8)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_per_row_columns_keep_their_stored_dtype(catalogue_dataset, workers):
    # (before: float64 became float32: MJD 59000.123456 read 59000.125 and 1e300 became inf)
    dm = DataModule(catalogue_dataset, columns=["data", "mjd", "huge", "flux", "id"], return_dict=True,
                    batch_size=24, num_workers=workers, shuffle=False)  # fmt: skip
    batch = next(iter(dm.predict_dataloader()))
    assert batch["mjd"].dtype == torch.float64 and batch["mjd"][0].item() == 59000.123456
    assert batch["huge"].dtype == torch.float64 and (batch["huge"] == 1e300).all()
    assert batch["flux"].dtype == torch.float32
    assert batch["id"].dtype == torch.int64 and batch["id"][0].item() == 2**60 + 1
    assert batch["data"].dtype == torch.float32  # the model input is still cast


def test_predict_writes_per_row_columns_in_their_stored_dtype(catalogue_dataset, tmp_path):
    from spherinator.callbacks import EmbeddingWriter

    dm = DataModule(catalogue_dataset, columns=["data", "mjd", "huge", "id"], return_dict=True, batch_size=8)
    out = tmp_path / "embeddings.parquet"
    trainer = quiet_trainer(callbacks=[EmbeddingWriter(out)])
    trainer.predict(_tiny_vae(), dm, return_predictions=False)
    table = pq.read_table(out)
    assert table.schema.field("mjd").type == pa.float64() and table.schema.field("huge").type == pa.float64()
    assert table.column("mjd").to_pylist() == (59000.123456 + np.arange(24)).tolist()
    assert table.column("huge").to_pylist() == [1e300] * 24
    assert table.column("id").to_pylist() == list(range(2**60 + 1, 2**60 + 25))
    assert table.schema.field("location").type.value_type == pa.float32()


def _tiny_vae():
    from spherinator.models import (
        ConsecutiveConv2DLayer,
        ConvolutionalEncoder2D,
        UpsamplingDecoder2D,
        VariationalAutoencoder,
    )

    encoder = ConvolutionalEncoder2D([3, 8, 8], 8, [ConsecutiveConv2DLayer(4, 2, 1, [4, 8])])
    return VariationalAutoencoder(encoder, UpsamplingDecoder2D(base_channels=8, seed_size=4), z_dim=3)


_PREDICT_SCRIPT = """
import sys, time
from pathlib import Path
import lightning.pytorch as pl
from spherinator.callbacks import EmbeddingWriter
from spherinator.data import DataModule
from tests.test_data import _tiny_vae

class Slow(pl.Callback):
    def on_predict_batch_end(self, *args):
        Path(sys.argv[2]).touch()  # a batch is written: the parent may send the signal
        time.sleep(0.2)

dm = DataModule(sys.argv[1], columns=["data", "id"], return_dict=True, batch_size=2)
trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[EmbeddingWriter(sys.argv[3]), Slow()])
trainer.predict(_tiny_vae(), dm, return_predictions=False)
"""


@pytest.mark.slow  # a subprocess that imports torch and Lightning: 30 s on a busy 2-core machine
def test_predict_stops_on_sigterm_and_leaves_no_torn_embeddings(uneven_dataset, tmp_path):
    # (before: predict went on after SIGTERM, and a kill left embeddings.parquet without a footer at its final name)
    import signal
    import subprocess
    import sys
    import time

    out, started = tmp_path / "embeddings.parquet", tmp_path / "started"
    pq.write_table(pa.table({"id": [7]}), out)  # an earlier run's whole file
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-c", _PREDICT_SCRIPT, str(uneven_dataset), str(started), str(out)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, output
    assert pq.read_table(out).column("id").to_pylist() == [7]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.parquet", "started"]  # no partial file left


# -- odd Parquet inputs (issue 19) -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_deleted_between_epochs_is_named(tmp_path, workers):
    # (before: FileNotFoundError's traceback, from a DataLoader worker wrapped in another)
    write_dataset(tmp_path, [{"data": _images(40), "id": np.arange(40)}], rows_per_file=20, rows_per_group=10)
    dm = _id_module(tmp_path, batch_size=10, num_workers=workers, persistent_workers=False)
    loader = dm.train_dataloader()
    assert sorted(_ids(loader)) == list(range(40))
    gone = sorted(tmp_path.glob("*.parquet"))[1]
    gone.unlink()
    with pytest.raises(DataError, match=rf"{gone}.* is gone .*deleted or moved"):
        list(loader)


def test_dictionary_encoded_columns_read_as_their_values(tmp_path):
    # (pandas categoricals: object names as dictionary<string>, labels as dictionary<int>; before: refused or left out)
    names = pa.array([f"obj{i % 3}" for i in range(12)]).dictionary_encode()
    labels = pa.array([i % 2 for i in range(12)], type=pa.int16()).dictionary_encode()
    table = pa.table({"data": pa.array(list(_images(12, (4,))), type=pa.list_(pa.uint8(), 4)), "name": names,
                      "label": labels})  # fmt: skip
    pq.write_table(table, tmp_path / "cat.parquet")
    dm = DataModule(tmp_path, columns=["data", "name", "label"], return_dict=True, batch_size=12, val_fraction=0.0)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["name"] == [f"obj{i % 3}" for i in range(12)]
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [i % 2 for i in range(12)]
    assert DataModule(tmp_path).column_names == ["data", "label"]  # not named: the strings are left out, as plain ones


def test_nulls_in_a_floating_per_row_column_are_missing_values_and_elsewhere_named(tmp_path):
    # a catalogue's missing redshift may be a null as well as a NaN; a null id has no such reading
    data = pa.array(list(_images(6, (4,))), type=pa.list_(pa.uint8(), 4))
    table = pa.table({"data": data, "z": pa.array([0.1, None, 0.3, None, 0.5, 0.6]), "id": [0, 1, None, 3, 4, 5]})
    pq.write_table(table, tmp_path / "nulls.parquet")
    dm = DataModule(tmp_path, columns=["data", "z"], return_dict=True, batch_size=6, val_fraction=0.0)
    z = next(iter(dm.predict_dataloader()))["z"]
    assert (
        z.dtype == torch.float64 and torch.isnan(z[[1, 3]]).all() and z[[0, 2, 4, 5]].tolist() == [0.1, 0.3, 0.5, 0.6]
    )
    message = _error(tmp_path, columns=["data", "id"], return_dict=True, batch_size=6, val_fraction=0.0)
    assert "column 'id' has 1 null rows (first: row 2)" in message


def test_an_empty_or_truncated_file_is_named(tmp_path):
    write_dataset(tmp_path, [{"data": _images(8)}])
    (tmp_path / "empty.parquet").write_bytes(b"")
    assert "empty.parquet is not a readable Parquet file" in _error(tmp_path)
    (tmp_path / "empty.parquet").unlink()
    whole = sorted(tmp_path.glob("*.parquet"))[0]
    (tmp_path / "torn.parquet").write_bytes(whole.read_bytes()[:-20])  # a copy cut short: no footer
    assert "torn.parquet is not a readable Parquet file" in _error(tmp_path)


def test_a_failed_predict_leaves_a_whole_file_of_the_rows_before_and_an_unwritable_place_is_named(tmp_path):
    from spherinator.callbacks import EmbeddingWriter
    from spherinator.shapes import ConfigError

    images = _images(24, (3, 8, 8))
    write_dataset(tmp_path / "data", [{"data": images, "id": np.arange(24)}], rows_per_group=8)
    bad = tmp_path / "bad"
    floats = images.astype(np.float32)
    floats[20, 0, 0, 0] = np.nan  # in the last row group: two batches are written first
    write_dataset(bad, [{"data": floats, "id": np.arange(24)}], rows_per_group=8)
    out = tmp_path / "out" / "embeddings.parquet"
    dm = _id_module(bad, batch_size=8)
    with pytest.raises(DataError, match="row 4 holds nan"):
        quiet_trainer(callbacks=[EmbeddingWriter(out)]).predict(_tiny_vae(), dm, return_predictions=False)
    assert pq.read_table(out).column("id").to_pylist() == list(range(16))  # closed: the rows before the failure
    assert [p.name for p in out.parent.iterdir()] == ["embeddings.parquet"]  # no partial file left
    (tmp_path / "a-file").write_text("")
    writer = EmbeddingWriter(tmp_path / "a-file" / "embeddings.parquet")
    with pytest.raises(ConfigError, match=r"cannot write the embeddings to .*a-file/embeddings.parquet"):
        quiet_trainer(callbacks=[writer]).predict(_tiny_vae(), _id_module(tmp_path / "data"), return_predictions=False)


@pytest.mark.parametrize("change", ["fewer rows", "other row groups", "another layout", "no such column"])
def test_a_file_rewritten_between_epochs_is_named_not_read_in_part(tmp_path, change):
    # (before: the plan's segments read what the new file held there: 48 or 40 of 80 rows without a word, or a
    # KeyError's traceback for a column gone)
    write_dataset(tmp_path, [{"data": _images(40), "id": np.arange(40)}], rows_per_file=20, rows_per_group=20)
    dm = _id_module(tmp_path, batch_size=10, shuffle=False)
    loader = dm.train_dataloader()
    assert sorted(_ids(loader)) == list(range(40))
    rewritten = sorted(tmp_path.glob("*.parquet"))[1]
    table = pq.read_table(rewritten)
    if change == "fewer rows":
        pq.write_table(table.slice(0, 5), rewritten)
    elif change == "other row groups":
        pq.write_table(table, rewritten, row_group_size=3)
    elif change == "another layout":
        pq.write_table(table.set_column(1, "id", pa.array(np.arange(20, 40, dtype=np.float64))), rewritten)
    else:
        pq.write_table(table.drop_columns(["id"]), rewritten)
    with pytest.raises(DataError, match=rf"{rewritten} was re-written during the run"):
        list(loader)


def test_a_broken_link_to_a_parquet_file_is_named_not_left_out(tmp_path):
    # (before: left out without a word: a part of the dataset on an unmounted disk trained on the rest)
    write_dataset(tmp_path, [{"data": _images(20), "id": np.arange(20)}], rows_per_file=20)
    (tmp_path / "part-9.parquet").symlink_to(tmp_path / "elsewhere" / "part-9.parquet")
    with pytest.raises(DataError, match=r"part-9.parquet is a link to .*elsewhere/part-9.parquet.*does not exist"):
        _id_module(tmp_path).setup()


def test_a_linked_directory_of_parquet_files_is_part_of_the_dataset_once(tmp_path):
    # (before: a directory link was not followed: its files were left out without a word, or with only it
    # "no .parquet files under" the path; a link back to an ancestor must not loop, one directory linked twice
    # counts once)
    write_dataset(tmp_path / "disk2", [{"data": _images(30), "id": np.arange(30)}], rows_per_file=10)
    write_dataset(tmp_path / "data", [{"data": _images(5), "id": np.arange(30, 35)}], rows_per_file=5)
    (tmp_path / "data" / "shard2").symlink_to(tmp_path / "disk2", target_is_directory=True)
    (tmp_path / "data" / "again").symlink_to(tmp_path / "disk2", target_is_directory=True)
    (tmp_path / "disk2" / "up").symlink_to(tmp_path / "data", target_is_directory=True)
    dm = _id_module(tmp_path / "data", batch_size=8)
    assert sorted(_ids(dm.train_dataloader())) == list(range(35))
    assert sorted(_ids(_id_module(tmp_path / "disk2", batch_size=8).train_dataloader())) == list(range(35))


# -- upstream Spherinator's DataModule options -----------------------------------------------------------------------


def _upstream_table(path: Path, columns: dict, shapes: dict[str, str] | None = None) -> Path:
    """A Parquet file as upstream's tests write them: list columns with ``<col>_shape`` metadata."""
    metadata = {f"{name}_shape": shape for name, shape in (shapes or {}).items()}
    pq.write_table(pa.table(columns, metadata=metadata or None), path)
    return path


def test_parquet_data_module_takes_upstream_options(tmp_path):
    from spherinator.data import ParquetDataModule

    rows = [np.random.default_rng(i).random(12).astype(np.float32) for i in range(10)]
    path = _upstream_table(tmp_path / "a.parquet", {"id": range(10), "data": rows}, {"data": "(1,12)"})
    dm = ParquetDataModule(str(path), data_column="data", batch_size=2, num_workers=0, shuffle=True)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and batches[0].shape == (2, 1, 12) and batches[0].dtype == torch.float32
    assert dm.sample_shape() == (1, 12) and dm.val_dataloader() == []  # upstream's has no validation split


def test_parquet_data_module_normalizes_and_concatenates_like_upstream(tmp_path):
    from spherinator.data import ParquetDataModule

    rows = [np.array([-1.2, 3.9, -0.5], dtype=np.float32), np.array([1.7, -8.2, -0.4], dtype=np.float32)]
    path = _upstream_table(tmp_path / "n.parquet", {"data": rows})
    dm = ParquetDataModule(str(path), data_column="data", normalize="absmax", batch_size=2, shuffle=False)
    expected = torch.tensor([[-0.3077, 1.0000, -0.1282], [0.2073, -1.0000, -0.0488]])  # upstream's test values
    assert torch.allclose(next(iter(dm.train_dataloader())), expected, atol=1e-3)
    minmax = ParquetDataModule(str(path), data_column="data", normalize="minmax", batch_size=2, shuffle=False)
    batch = next(iter(minmax.train_dataloader()))
    assert torch.allclose(batch.amin(1), torch.zeros(2)) and torch.allclose(batch.amax(1), torch.ones(2))
    pair = {"data1": [np.array([1.0, 2.0], np.float32)], "data2": [np.array([3.0, 4.0], np.float32)]}
    merged = ParquetDataModule(str(_upstream_table(tmp_path / "m.parquet", pair)), data_column=["data1", "data2"])
    assert torch.equal(next(iter(merged.train_dataloader())), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert merged.sample_shape() == (4,)


def test_parquet_data_module_error_column_gives_data_and_error_scaled_alike(tmp_path):
    from spherinator.data import ParquetDataModule

    rng = np.random.default_rng(0)
    flux = [(rng.random(12) * 5 + 3).astype(np.float32) for _ in range(10)]
    error = [rng.random(12).astype(np.float32) for _ in range(10)]
    path = _upstream_table(tmp_path / "e.parquet", {"flux": flux, "flux_error": error}, {"flux": "(1,12)"})
    dm = ParquetDataModule(str(path), data_column="flux", error_column="flux_error", batch_size=10, shuffle=False)
    data, err = next(iter(dm.train_dataloader()))
    assert data.shape == (10, 1, 12) and err.shape == (10, 12)
    span = torch.tensor(np.ptp(np.stack(flux), axis=1))
    assert torch.allclose(data.amin((1, 2)), torch.zeros(10)) and torch.allclose(data.amax((1, 2)), torch.ones(10))
    assert torch.allclose(err, torch.tensor(np.stack(error)) / span[:, None])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"with_index": True}, "with_index: true .* columns: \\[data, id\\]"),
        ({"normalize": "zscore"}, "normalize='zscore' is not known; write minmax, absmax or none"),
        ({"data_column": ["a", "b"], "error_column": "e"}, "goes with one data column"),
    ],
)
def test_parquet_data_module_options_that_cannot_mean_the_same_say_what_to_write(tmp_path, kwargs, match):
    from spherinator.data import ParquetDataModule
    from spherinator.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        ParquetDataModule(str(tmp_path), **{"data_column": "data", **kwargs})


def test_parquet_iterable_data_module_scales_each_sample_to_unit_range(tmp_path):
    from spherinator.data import ParquetIterableDataModule

    rows = [np.arange(12, dtype=np.float32) * (i + 1) for i in range(10)]
    path = _upstream_table(tmp_path / "i.parquet", {"data": rows}, {"data": "(1,12)"})
    dm = ParquetIterableDataModule(str(path), batch_size=2, scanner_batch_size=8, num_workers=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and batches[0].shape == (2, 1, 12)
    assert torch.allclose(batches[3][1, 0], torch.arange(12) / 11.0)


def test_upstream_validation_and_test_size_map_onto_fractions(image_dataset):
    from spherinator.errors import ConfigError

    dm = DataModule(image_dataset, validation_size=0.2, test_size=0.5, in_gpu_memory=False)
    assert (dm.val_fraction, dm.test_fraction) == pytest.approx((0.1, 0.1))
    dm = DataModule(image_dataset, validation_size=0.4)  # upstream's test_size default 0.5
    assert (dm.val_fraction, dm.test_fraction) == pytest.approx((0.2, 0.2))
    with pytest.raises(ConfigError, match="in_gpu_memory: true .* remove it"):
        DataModule(image_dataset, in_gpu_memory=True)
    with pytest.raises(ConfigError, match="validation_size=0: .* write val_fraction: 0"):
        DataModule(image_dataset, validation_size=0.0)
    with pytest.raises(ConfigError, match="either val_fraction/test_fraction .* not both"):
        DataModule(image_dataset, val_fraction=0.3, validation_size=0.2)


def test_upstream_data_sections_parse_and_load(image_dataset, tmp_path):
    """v0.5.1's illustris.yaml data section (random flips and rotations in a Compose) and the DataModule keys an
    upstream run's saved cli-config.yaml carries, read by our CLI: the transforms draw per sample."""
    import yaml

    from spherinator.cli import SpherinatorCLI

    data = {
        "class_path": "spherinator.data.DataModule",
        "init_args": {
            "path": str(image_dataset),
            "columns": [
                {
                    "name": "data",
                    "transform": {
                        "class_path": "torchvision.transforms.v2.Compose",
                        "init_args": {
                            "transforms": [
                                {"class_path": "torchvision.transforms.v2.RandomHorizontalFlip"},
                                {
                                    "class_path": "torchvision.transforms.v2.RandomRotation",
                                    "init_args": {"degrees": 180},
                                },
                            ]
                        },
                    },
                }
            ],
            "return_dict": False,
            "batch_size": 4,
            "shuffle": True,
            "num_workers": 0,
            "validation_size": 0.2,
            "test_size": 0.5,
            "in_gpu_memory": False,
        },
    }
    config = tmp_path / "upstream_data.yaml"
    config.write_text(yaml.safe_dump({"data": data}))
    tiny = str(Path(__file__).parent / "configs" / "vae_tiny.yaml")
    cli = SpherinatorCLI(args=["-c", tiny, "-c", str(config), "--trainer.accelerator", "cpu"], run=False)
    dm = cli.datamodule
    assert dm.columns[0].per_sample is True and (dm.val_fraction, dm.test_fraction) == pytest.approx((0.1, 0.1))
    assert next(iter(dm.train_dataloader())).shape[0] == 4


# -- Hugging Face Hub dataset ids as path ----------------------------------------------------------------------------


@pytest.fixture
def offline_hub_dataset(tmp_path, monkeypatch) -> str:
    """``ORG/tiny`` in a temporary ``datasets`` cache as a download leaves it (Arrow files and dataset_info.json
    under ``ORG___tiny/default/0.0.0/<hash>/``), with the Hub offline: ``load_dataset`` reads it from there."""
    datasets = pytest.importorskip("datasets")
    source = tmp_path / "source.parquet"
    images = []
    for i in range(12):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), i * 20, dtype=np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    flux = [np.arange(5, dtype=np.float32) + i for i in range(12)]
    pq.write_table(pa.table({"image": images, "flux": flux, "label": list(range(12))}), source)
    cache = tmp_path / "hf_cache"
    built = datasets.load_dataset("parquet", data_files={"train": str(source)}, split="train", cache_dir=str(cache))
    arrow = Path(built.cache_files[0]["filename"])
    target = cache / "ORG___tiny" / "default" / "0.0.0" / arrow.parent.name
    target.mkdir(parents=True)
    (target / "dataset_info.json").write_bytes((arrow.parent / "dataset_info.json").read_bytes())
    (target / "tiny-train.arrow").write_bytes(arrow.read_bytes())  # the file name a Hub dataset's split gets
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return "ORG/tiny"


def test_hub_dataset_id_as_path_loads_through_datasets_offline(offline_hub_dataset):
    dm = DataModule(offline_hub_dataset, columns=["image", "label"], return_dict=True, batch_size=12, val_fraction=0)
    dm.prepare_data()
    local = dm.local_path
    assert local.suffix == ".parquet" and local.exists()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (12, 3, 8, 8) and batch["image"].dtype == torch.float32
    by_label = batch["image"][batch["label"].argsort()]
    assert torch.allclose(by_label[:, 0, 0, 0], torch.arange(12) * 20 / 255.0)
    stamp = local.stat().st_mtime_ns
    again = DataModule(offline_hub_dataset, columns=["flux"], val_fraction=0)
    assert again.local_path == local and local.stat().st_mtime_ns == stamp  # the Parquet copy is made once
    assert again.sample_shape() == (5,)


def test_hub_dataset_copy_on_a_full_or_read_only_disk_is_one_data_error(offline_hub_dataset, monkeypatch):
    import datasets

    def full_disk(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1")  # half written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "to_parquet", full_disk)
    dm = DataModule(offline_hub_dataset, columns=["flux"], val_fraction=0)
    with pytest.raises(DataError, match="cannot write the Parquet copy of the Hub dataset 'ORG/tiny' into .*HF_DAT"):
        dm.prepare_data()
    folder = Path(datasets.config.HF_DATASETS_CACHE)
    assert not [p for p in folder.rglob("*") if "spherinator" in p.name]  # no partial or half file is left


def test_hub_dataset_id_not_in_the_cache_offline_is_one_data_error(offline_hub_dataset):
    dm = DataModule("ORG/not-downloaded", val_fraction=0)
    with pytest.raises(DataError, match="'ORG/not-downloaded' is no local file or directory, and `datasets` cannot"):
        dm.setup()
