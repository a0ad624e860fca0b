"""uint8 columns delivered unscaled and scaled on the device (DataModule.on_after_batch_transfer): the floats the
model sees are those of the CPU path, bit for bit."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from spherinator.data import Column, DataModule
from tests.conftest import quiet_trainer, write_fast_layout


class _Double:
    """A transform that needs floats (it would overflow uint8)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory) -> str:
    rng = np.random.default_rng(3)
    n = 60
    arrays = {
        "data": rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8),
        "mask": rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8),
        "flux": rng.normal(size=(n, 5)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.uint8),
        "id": np.arange(n, dtype=np.int64),
    }
    return write_fast_layout(tmp_path_factory.mktemp("mixed"), arrays, rows_per_group=16)


def _module(path, device: bool | None, workers: int = 0) -> DataModule:
    columns = ["data", Column("mask", transform=_Double()), "flux", "label", "id"]
    dm = DataModule(path, columns=columns, return_dict=True, batch_size=16, num_workers=workers, val_fraction=0.3)
    dm.scale_on_device = device
    dm.setup("fit")
    return dm


def _batches(dm: DataModule, split: str) -> list[dict]:
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return [dm.on_after_batch_transfer(batch, 0) if dm.scale_on_device else batch for batch in loader]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("split", ["train", "val"])
def test_scaled_on_device_gives_the_cpu_path_floats(mixed_dataset, workers, split):
    cpu = _batches(_module(mixed_dataset, False, workers), split)
    raw_dm = _module(mixed_dataset, True, workers)
    loader = raw_dm.train_dataloader() if split == "train" else raw_dm.val_dataloader()
    raw = list(loader)
    assert raw[0]["data"].dtype == torch.uint8  # what travels to the device
    assert raw[0]["mask"].dtype == torch.float32  # its transform needs floats: scaled and applied on the CPU
    device = [raw_dm.on_after_batch_transfer(batch, 0) for batch in raw]
    assert len(cpu) == len(device) > 1
    for a, b in zip(cpu, device, strict=True):
        assert list(a) == list(b)
        for name in a:
            assert a[name].dtype == b[name].dtype, name
            assert torch.equal(a[name], b[name]), name  # bit for bit: one float32 multiply either way
    assert cpu[0]["data"].dtype == torch.float32 and float(cpu[0]["data"].max()) <= 1.0
    assert cpu[0]["label"].dtype == torch.int64  # uint8 scalars stay labels, never scaled


def test_every_uint8_value_scales_as_on_the_cpu():
    from spherinator.data.transport import scale_on_device, uint8_to_float

    values = np.arange(256, dtype=np.uint8).reshape(1, 256)
    cpu = uint8_to_float(values)
    device = scale_on_device(torch.from_numpy(values.copy()), {"data"}, "data")
    assert device.dtype == torch.float32 and torch.equal(cpu, device)
    assert float(device[0, 255]) == 1.0 and float(device[0, 0]) == 0.0


def test_a_batch_that_is_no_dict_is_scaled_when_its_column_is(mixed_dataset):
    dm = DataModule(mixed_dataset, columns=["data"], batch_size=16, val_fraction=0.0)
    dm.scale_on_device = True
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.uint8
    assert dm.on_after_batch_transfer(batch, 0).dtype == torch.float32


def test_without_a_trainer_the_loaders_scale_on_the_cpu(image_dataset):
    dm = DataModule(image_dataset, batch_size=16, val_fraction=0.0)
    assert next(iter(dm.predict_dataloader())).dtype == torch.float32


class _Recorder(pl.LightningModule):
    """Records what its steps are given; counts calls of its own on_after_batch_transfer."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[torch.Tensor] = []
        self.hooked = 0

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.hooked += 1
        assert batch.dtype == torch.float32  # the DataModule scaled it first
        return batch

    def training_step(self, batch, batch_idx):
        self.seen.append(batch)
        return self.layer(batch.reshape(len(batch), -1)[:, :1].float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.filterwarnings("ignore:You have overridden `on_after_batch_transfer` in both")  # Lightning's, once
def test_a_trainer_gets_uint8_to_the_device_and_the_model_sees_floats(image_dataset):
    dm = DataModule(image_dataset, batch_size=16, val_fraction=0.0, shuffle=False)
    model = _Recorder()
    quiet_trainer(max_epochs=1).fit(model, datamodule=dm)
    assert dm.train_dataloader().scale_on_device  # the loaders a Trainer takes deliver uint8
    cpu = DataModule(image_dataset, batch_size=16, val_fraction=0.0, shuffle=False)
    expected = list(cpu.predict_dataloader())
    assert model.hooked == len(expected) == len(model.seen)
    for a, b in zip(expected, model.seen, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_writer_default_is_uncompressed_and_lz4_reads_back(tmp_path, compression):
    import pyarrow.parquet as pq

    from spherinator.data import ParquetWriter

    images = np.random.default_rng(0).integers(0, 256, (20, 3, 4, 4), dtype=np.uint8)
    options = {} if compression is None else {"compression": compression}
    with ParquetWriter(tmp_path, rows_per_group=8, **options) as writer:
        writer.write({"data": images})
    stored = pq.ParquetFile(writer.files[0]).metadata.row_group(0).column(0).compression
    assert stored == ("UNCOMPRESSED" if compression is None else "LZ4")
    dm = DataModule(tmp_path, batch_size=20, shuffle=False, val_fraction=0.0)
    torch.testing.assert_close(next(iter(dm.predict_dataloader())), torch.from_numpy(images).float() / 255)
