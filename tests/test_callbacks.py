"""KLAnnealing schedule, reconstruction images and the latent sphere map, read back from the loggers."""

from __future__ import annotations

import io
import re
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from spherinator.callbacks import (
    KLAnnealing,
    LogLatentSphere,
    LogReconstructionCallback,
    ParamConfig,
    ParamManager,
    SphereQuality,
)
from spherinator.models import (
    Autoencoder,
    ConsecutiveConv1DLayer,
    ConsecutiveConv2DLayer,
    ConsecutiveConvTranspose1DLayer,
    ConvolutionalDecoder1D,
    ConvolutionalEncoder1D,
    ConvolutionalEncoder2D,
    UpsamplingDecoder2D,
    VariationalAutoencoder,
)
from tests.conftest import quiet_trainer


def vae_2d() -> VariationalAutoencoder:
    encoder = ConvolutionalEncoder2D([3, 16, 16], 8, [ConsecutiveConv2DLayer(4, 2, 1, [4, 8])])
    return VariationalAutoencoder(encoder, UpsamplingDecoder2D(base_channels=8, seed_size=4), z_dim=3)


def vae_1d() -> VariationalAutoencoder:
    encoder = ConvolutionalEncoder1D([1, 32], 8, [ConsecutiveConv1DLayer(4, 2, 1, [4, 8])])
    decoder = ConvolutionalDecoder1D(
        cnn_input_dim=[4, 16], cnn_layers=[ConsecutiveConvTranspose1DLayer(4, 2, 1, [1], activation=None, norm=None)]
    )
    return VariationalAutoencoder(encoder, decoder, z_dim=5)


def trainer(tmp_path, callbacks, logger=False, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=1, logger=logger, callbacks=callbacks, num_sanity_val_steps=0, log_every_n_steps=1)
    return quiet_trainer(**{**options, "default_root_dir": tmp_path, **kwargs})


def tensorboard_images(log_dir) -> dict[str, list[np.ndarray]]:
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    return {
        tag: [np.asarray(Image.open(io.BytesIO(e.encoded_image_string))) for e in events.Images(tag)]
        for tag in events.Tags()["images"]
    }


# ---- KLAnnealing ------------------------------------------------------------------------------------------------


def test_monotone_schedule_ramps_then_stays_at_end():
    schedule = KLAnnealing(start=0.0, end=1.0, n_epochs=4)
    assert [schedule.beta(e) for e in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_cyclic_schedule_with_ratio():
    schedule = KLAnnealing(start=0.0, end=1.0, n_epochs=8, n_cycles=2, ratio=0.5)
    assert [schedule.beta(e) for e in range(8)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0]
    seed = KLAnnealing(start=0.0, end=1.0e-2, n_epochs=500, n_cycles=4, ratio=0.5)  # the documented example
    assert seed.beta(0) == 0.0 and seed.beta(31) == pytest.approx(1.0e-2 * 31 / 62.5)
    assert seed.beta(63) == seed.beta(124) == 1.0e-2 and seed.beta(125) == 0.0


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="ratio"):
        KLAnnealing(ratio=0.0)
    with pytest.raises(ValueError, match="n_cycles=5"):
        KLAnnealing(n_epochs=4, n_cycles=5)


def test_kl_annealing_sets_and_logs_beta_each_epoch(tmp_path):
    seen = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append((pl_module.beta, trainer.callback_metrics["beta"].item()))

    model = vae_1d()
    data = DataLoader(torch.rand(8, 1, 32), batch_size=4)
    trainer(tmp_path, [KLAnnealing(start=0.1, end=0.5, n_epochs=2), Record()], max_epochs=3).fit(model, data)
    assert [b for b, _ in seen] == pytest.approx([0.1, 0.3, 0.5])
    assert [logged for _, logged in seen] == pytest.approx([0.1, 0.3, 0.5])


def test_kl_annealing_needs_a_beta_attribute(tmp_path):
    encoder = ConvolutionalEncoder1D([1, 32], 8, [ConsecutiveConv1DLayer(4, 2, 1, [4])])
    model = Autoencoder(encoder, ConvolutionalDecoder1D(cnn_input_dim=[1, 32]))
    with pytest.raises(AttributeError, match="beta"):
        trainer(tmp_path, [KLAnnealing()]).fit(model, DataLoader(torch.rand(4, 1, 32), batch_size=4))


# ---- LogReconstructionCallback ------------------------------------------------------------------------------------


def test_reconstructions_are_written_to_tensorboard(tmp_path):
    model = vae_2d()
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    data = DataLoader(torch.rand(8, 3, 16, 16), batch_size=4)
    trainer(tmp_path, [LogReconstructionCallback(samples=6)], logger=logger, max_epochs=2).fit(model, data, data)
    images = tensorboard_images(logger.log_dir)["reconstructions"]
    assert len(images) == 2  # one per validation epoch
    height, width = images[0].shape[:2]
    assert height == 2 * 16 + 3 * 2 and width == 6 * 16 + 7 * 2  # 2 rows x 6 samples, padding 2


def test_reconstruction_callback_keeps_batchnorm_statistics_and_mode(tmp_path):
    model = vae_2d().train()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    t = trainer(tmp_path, [], logger=logger)
    callback = LogReconstructionCallback(samples=3)
    callback.on_validation_batch_end(t, model, None, {"data": torch.rand(2, 3, 16, 16), "id": torch.arange(2)}, 0)
    callback.on_validation_batch_end(t, model, None, {"data": torch.rand(2, 3, 16, 16), "id": torch.arange(2)}, 1)
    callback.on_validation_epoch_end(t, model)
    assert model.training
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, stats[name]), name
    logger.experiment.flush()
    (image,) = tensorboard_images(logger.log_dir)["reconstructions"]
    assert image.shape[1] == 3 * 16 + 4 * 2  # three samples gathered over two batches


def test_one_dimensional_data_is_drawn_as_line_plots(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    data = DataLoader(torch.rand(8, 1, 32), batch_size=4)
    trainer(tmp_path, [LogReconstructionCallback(samples=2)], logger=logger).fit(vae_1d(), data, data)
    (image,) = tensorboard_images(logger.log_dir)["reconstructions"]
    assert image.shape[:2] == (200, 480)  # 2 panels of 3 x 2.5 inches at 80 dpi
    assert image.std() > 0


def test_reconstructions_are_logged_to_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="spherinator-test", save_dir=str(tmp_path), offline=True)
    data = DataLoader(torch.rand(4, 3, 16, 16), batch_size=4)
    try:
        trainer(tmp_path, [LogReconstructionCallback(samples=2)], logger=logger).fit(vae_2d(), data, data)
        run_dir = logger.experiment.dir
    finally:
        wandb.finish()
    pngs = list((tmp_path / "wandb").rglob("media/images/reconstructions*.png"))
    assert pngs, f"no reconstruction image under {run_dir}"


class _UpstreamStyleLogger(pl.loggers.Logger):
    """A custom logger as upstream Spherinator's users write them: ``log_image(key=, images=)``, no log_dir."""

    name, version = "custom", "0"

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, list[Any]]] = []

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_image(self, key: str, images: list[Any]) -> None:
        self.images.append((key, images))


class _BatchStream(torch.utils.data.IterableDataset):
    """Yields whole batches, as our ParquetStream does (no __getitem__)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __iter__(self):
        return iter(self.rows.split(3))


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_call_form_logs_the_training_rows_it_names(tmp_path, stream):
    import matplotlib.figure

    rows = torch.rand(8, 3, 16, 16)
    data = DataLoader(_BatchStream(rows), batch_size=None) if stream else DataLoader(rows, batch_size=4)
    logger, model = _UpstreamStyleLogger(), vae_2d()
    t = trainer(tmp_path, [], logger=logger, limit_val_batches=0)
    t.fit(model, data)
    callback = LogReconstructionCallback(samples=[1, 6])
    callback.on_train_epoch_end(t, model)  # Lightning's own call: reconstructions come after validation instead
    assert logger.images == []
    callback.on_train_epoch_end(trainer=t, model=model)  # upstream's direct call
    ((key, (figure,)),) = logger.images
    assert key == "Reconstructions" and isinstance(figure, matplotlib.figure.Figure)
    for samples in (9, [0, 8]):
        with pytest.raises(ValueError, match="The sample indices must be smaller than the dataset size.*8 rows"):
            LogReconstructionCallback(samples=samples).on_train_epoch_end(trainer=t, model=model)


def test_a_list_of_samples_picks_those_validation_rows_and_refuses_rows_past_the_end(tmp_path):
    model, t = vae_2d(), trainer(tmp_path, [])
    batches = [{"data": torch.rand(2, 3, 16, 16)} for _ in range(3)]
    callback = LogReconstructionCallback(samples=[4, 1])
    callback.on_validation_epoch_start(t, model)
    for i, batch in enumerate(batches):
        callback.on_validation_batch_end(t, model, None, batch, i)
    assert torch.equal(callback._originals, torch.stack([batches[2]["data"][0], batches[0]["data"][1]]))
    callback = LogReconstructionCallback(samples=[1, 6])
    callback.on_validation_epoch_start(t, model)
    for i, batch in enumerate(batches):
        callback.on_validation_batch_end(t, model, None, batch, i)
    with pytest.raises(ValueError, match=r"sample indices \[6\] are not below the 6 rows of the validation set"):
        callback.on_validation_epoch_end(t, model)
    for bad in ([], [-1], [1.5], "3"):
        with pytest.raises(ValueError, match="non-empty list of row indices"):
            LogReconstructionCallback(samples=bad)


# ---- LogLatentSphere ----------------------------------------------------------------------------------------------


def test_latent_sphere_map_is_logged_each_validation_epoch(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    data = DataLoader(torch.rand(12, 3, 16, 16), batch_size=4)
    callback = LogLatentSphere(max_samples=10)
    trainer(tmp_path, [callback], logger=logger, max_epochs=2).fit(vae_2d(), data, data)
    images = tensorboard_images(logger.log_dir)["latent_sphere"]
    assert len(images) == 2 and images[0].shape[:2] == (340, 600)


def test_latent_sphere_embeds_at_most_max_samples(tmp_path):
    model = vae_1d().eval()  # z_dim = 5: projected to the first three coordinates
    t = trainer(tmp_path, [])
    callback = LogLatentSphere(max_samples=5)
    for i in range(3):
        callback.on_validation_batch_end(t, model, None, torch.rand(4, 1, 32), i)
    assert sum(len(z) for z in callback._latents) == 5
    assert all(torch.allclose(z.norm(dim=-1), torch.ones(len(z))) for z in callback._latents)


def test_decoded_sphere_map_is_logged_for_image_models_on_s2_only(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    images = DataLoader(torch.rand(12, 3, 16, 16), batch_size=4)
    trainer(tmp_path, [LogLatentSphere(max_samples=10)], logger=logger, max_epochs=2).fit(vae_2d(), images, images)
    logged = tensorboard_images(logger.log_dir)
    assert len(logged["latent_sphere_decoded"]) == 2 and logged["latent_sphere_decoded"][0].shape[:2] == (480, 900)
    spectra = DataLoader(torch.rand(12, 1, 32), batch_size=4)  # z_dim 5 and 1-D data: no atlas to draw
    logger = TensorBoardLogger(tmp_path, name="tb1d", version=0)
    trainer(tmp_path, [LogLatentSphere(max_samples=10)], logger=logger).fit(vae_1d(), spectra, spectra)
    assert "latent_sphere_decoded" not in tensorboard_images(logger.log_dir)


def test_decoded_map_draws_each_image_where_its_point_is():
    from spherinator.figures import decoded_map, sphere_grid

    points = sphere_grid()
    assert torch.allclose(points.norm(dim=1), torch.ones(len(points)))
    south = points[:, 2] < -0.9  # the southernmost circle
    images = torch.zeros(len(points), 3, 8, 8)
    images[south, 1] = 1.0  # green in the south, red elsewhere
    images[~south, 0] = 1.0
    picture = decoded_map(points, images).astype(int)
    red = (picture[..., 0] > 200) & (picture[..., 1] < 60)
    green = (picture[..., 1] > 200) & (picture[..., 0] < 60)
    rows = np.arange(picture.shape[0])[:, None]
    assert red.sum() > 10 * green.sum() > 0
    assert (rows * green).sum() / green.sum() > (rows * red).sum() / red.sum() + 100  # south is down the picture


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):
        LogReconstructionCallback(samples=0)
    with pytest.raises(ValueError, match="max_samples"):
        LogLatentSphere(max_samples=0)


# ---- EmbeddingWriter --------------------------------------------------------------------------------------------


class _FailingVAE(VariationalAutoencoder):
    fail_at: int | None = None

    def predict_step(self, batch, batch_idx: int = 0, dataloader_idx: int = 0):
        if batch_idx == self.fail_at:
            raise RuntimeError("predict failed on purpose")
        return super().predict_step(batch, batch_idx, dataloader_idx)


def test_embedding_writer_counts_each_run_and_closes_its_file_on_an_exception(tmp_path):
    import pyarrow.parquet as pq

    from spherinator.callbacks import EmbeddingWriter

    torch.manual_seed(0)
    encoder = ConvolutionalEncoder2D([3, 16, 16], 8, [ConsecutiveConv2DLayer(4, 2, 1, [4, 8])])
    model = _FailingVAE(encoder, UpsamplingDecoder2D(base_channels=8, seed_size=4), z_dim=3)
    loader = DataLoader(torch.rand(10, 3, 16, 16), batch_size=4)  # batches of 4, 4, 2
    writer = EmbeddingWriter(tmp_path / "emb.parquet")
    run = trainer(tmp_path, [writer])
    for _ in range(2):  # the second run rewrites the file and reports its own rows, not a running total
        run.predict(model, loader, return_predictions=False)
        assert writer.rows == 10
        table = pq.read_table(tmp_path / "emb.parquet")
        assert table.num_rows == 10 and table.column_names == ["location", "scale"]
    model.fail_at = 2
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer(tmp_path, [writer]).predict(model, loader, return_predictions=False)
    assert pq.read_table(tmp_path / "emb.parquet").num_rows == 8  # the rows before the failure, in a closed file


def test_a_failed_write_of_the_embeddings_keeps_the_earlier_file_and_the_data_directory_is_refused(
    tmp_path, monkeypatch
):
    # a full disk while writing: the torn partial file (no footer) was renamed over the earlier whole one
    import pyarrow.parquet as pq

    from spherinator.callbacks import EmbeddingWriter
    from spherinator.errors import ConfigError, OutputError

    torch.manual_seed(0)
    encoder = ConvolutionalEncoder2D([3, 16, 16], 8, [ConsecutiveConv2DLayer(4, 2, 1, [4, 8])])
    model = _FailingVAE(encoder, UpsamplingDecoder2D(base_channels=8, seed_size=4), z_dim=3)
    loader = DataLoader(torch.rand(10, 3, 16, 16), batch_size=4)
    out = tmp_path / "emb.parquet"
    trainer(tmp_path, [EmbeddingWriter(out)]).predict(model, loader, return_predictions=False)
    before = out.read_bytes()
    calls = []

    def full_disk(self, table, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return original(self, table, *args, **kwargs)

    original = pq.ParquetWriter.write_table
    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    with pytest.raises(ConfigError, match="No space left on device"):
        trainer(tmp_path, [EmbeddingWriter(out)]).predict(model, loader, return_predictions=False)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir() if p.suffix != ".yaml"] == [out.name]
    monkeypatch.undo()

    class _Data(pl.LightningDataModule):
        path = tmp_path

        def predict_dataloader(self):
            return loader

    with pytest.raises(OutputError, match="inside the data directory"):
        trainer(tmp_path, [EmbeddingWriter(tmp_path / "sub")]).predict(model, datamodule=_Data())
    assert not (tmp_path / "sub").exists()


# ---- SphereQuality ------------------------------------------------------------------------------------------------


class _FirstThree(torch.nn.Module):
    """A backbone whose code is the first three input values: the sphere head's identity maps them onto S^2."""

    input_dim = (3, 16, 16)
    output_dim = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3]


def sphere_vae(collapsed: bool) -> VariationalAutoencoder:
    """healthy: the position is the input's first three values (spread over S^2), the scale 51. collapsed: one
    position for every input, the scale at its floor of 1."""
    model = VariationalAutoencoder(_FirstThree(), UpsamplingDecoder2D(base_channels=8, seed_size=4), z_dim=3)
    head = model.encoder
    with torch.no_grad():
        head.fc_scale.weight.zero_()
        head.fc_scale.bias.fill_(-30.0 if collapsed else 50.0)
        head.fc_location.weight.copy_(torch.zeros(3, 3) if collapsed else torch.eye(3))
        head.fc_location.bias.copy_(torch.tensor([0.0, 0.0, 1.0]) if collapsed else torch.zeros(3))
    return model


class _Rows(torch.utils.data.Dataset):
    """Images whose first three values are a uniform point of S^2, with a label telling its hemisphere."""

    def __init__(self, n: int = 300) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 16, 16, generator=generator)
        points = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator), dim=1)
        self.images.view(n, -1)[:, :3] = points
        self.label = (points[:, 2] > 0).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"data": self.images[i], "label": self.label[i]}


def fit_with_label(tmp_path, rows, label: str) -> tuple[pl.Trainer, SphereQuality, Any]:
    """Two epochs of a healthy sphere under ``SphereQuality(label_column=label)``, recording the warnings."""
    data = DataLoader(rows, batch_size=50)
    callback = SphereQuality(label_column=label, patience=5)
    run = trainer(tmp_path, [callback], max_epochs=2, limit_train_batches=1)
    with pytest.warns(UserWarning) as recorded:
        run.fit(sphere_vae(False), data, data)
    return run, callback, recorded


def sphere_warnings(recorded) -> list[str]:
    return [str(w.message) for w in recorded if "SphereQuality" in str(w.message)]


def test_sphere_quality_warns_once_on_a_collapsed_model_with_numbers_and_the_fix(tmp_path):
    data = DataLoader(_Rows(), batch_size=50)
    callback = SphereQuality(label_column="label", patience=2)
    with pytest.warns(UserWarning) as recorded:
        trainer(tmp_path, [callback], max_epochs=3, limit_train_batches=1).fit(sphere_vae(True), data, data)
    (message,) = sphere_warnings(recorded)  # epochs 2 and 3 are collapsed, the warning comes once
    assert "after 2 validation epochs of 300 rows" in message
    assert "median concentration 1 is at its floor 1 (100% of rows" in message and "KL per sample 0.193" in message
    assert re.search(r"cover [0-3]% of the sphere's cells", message) and "mean resultant length 1.000" in message
    assert "lower model.init_args.beta (now 0.001, try 0.0001)" in message
    assert callback.figures["val_scale_p50"] == pytest.approx(1.0)
    assert "val_knn_accuracy" in callback.figures  # (a few steps of training spread the clump a hair: kNN sees it)


class _ScaleAtFloorFor(pl.Callback):
    """Sets the concentration head before each validation: at its floor for the first ``epochs``, 51 after."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            pl_module.encoder.fc_scale.weight.zero_()
            pl_module.encoder.fc_scale.bias.fill_(-30.0 if trainer.current_epoch < self.epochs else 50.0)


@pytest.mark.parametrize(("floor_epochs", "warned"), [(2, False), (4, True)])
def test_sphere_quality_waits_out_a_start_at_the_floor_and_warns_when_it_stays(tmp_path, recwarn, floor_epochs, warned):
    """Healthy demo runs sat at the floor for their first two epochs; the default patience (3) lets them climb and
    still tells a run that stays there after its third."""
    data = DataLoader(_Rows(), batch_size=50)
    run = trainer(tmp_path, [_ScaleAtFloorFor(floor_epochs), SphereQuality()], max_epochs=4, limit_train_batches=1)
    run.fit(sphere_vae(False), data, data)
    messages = sphere_warnings(recwarn)
    assert len(messages) == int(warned), messages
    if warned:
        assert "after 3 validation epochs of 300 rows" in messages[0] and "is at its floor" in messages[0]


class _EquatorRows(_Rows):
    """Rows on the equator of S^2 only: spread (no clump) but on a sixth of the cells."""

    def __init__(self, n: int = 300) -> None:
        super().__init__(n)
        flat = self.images.view(n, -1)
        flat[:, :3] = torch.nn.functional.normalize(flat[:, :3] * torch.tensor([1.0, 1.0, 0.0]), dim=1)


@pytest.mark.parametrize(("epochs", "warned"), [(1, False), (2, True)])
def test_sphere_quality_gives_a_mostly_empty_sphere_twice_the_patience(tmp_path, recwarn, epochs, warned):
    data = DataLoader(_EquatorRows(), batch_size=50)
    callback = SphereQuality(patience=1)
    run = trainer(tmp_path, [_ScaleAtFloorFor(0), callback], max_epochs=epochs, limit_train_batches=1)
    run.fit(sphere_vae(False), data, data)
    assert callback.figures["val_coverage"] < 0.2 and callback.figures["val_resultant_length"] < 0.2
    assert callback.figures["val_scale_p50"] == pytest.approx(51.0)  # healthy but for its coverage
    messages = sphere_warnings(recwarn)
    assert len(messages) == int(warned), messages
    if warned:
        assert "after 2 validation epochs of 300 rows" in messages[0] and "the sphere is mostly empty" in messages[0]


def test_sphere_quality_logs_healthy_figures_without_a_warning(tmp_path, recwarn):
    data = DataLoader(_Rows(), batch_size=50)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    run = trainer(tmp_path, [SphereQuality(label_column="label", patience=1)], logger=logger)
    run.validate(sphere_vae(False), data, verbose=False)
    assert sphere_warnings(recwarn) == []
    figures = {k: float(v) for k, v in run.callback_metrics.items()}  # what a task's summary.json collects
    assert figures["val_coverage"] > 0.6 and figures["val_coverage_uniform"] == pytest.approx(1 - (191 / 192) ** 300)
    assert figures["val_scale_p50"] == pytest.approx(51.0) and figures["val_scale_at_floor"] == 0.0
    assert figures["val_kl_per_sample"] > 2.0 and figures["val_resultant_length"] < 0.2
    assert figures["val_knn_accuracy"] > 0.9
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logger.log_dir))
    events.Reload()
    assert {"val_coverage", "val_scale_p50", "val_knn_accuracy"} <= set(events.Tags()["scalars"])


def test_sphere_quality_says_how_to_get_a_missing_label_column(tmp_path):
    data = DataLoader(torch.rand(40, 3, 16, 16), batch_size=20)  # tensors, not dicts
    with pytest.warns(UserWarning, match="label_column 'label' is not a per-row column.*return_dict: true"):
        trainer(tmp_path, [SphereQuality(label_column="label")]).validate(vae_2d(), data, verbose=False)


def test_sphere_quality_arguments_are_checked():
    with pytest.raises(ValueError, match="patience=0"):
        SphereQuality(patience=0)
    with pytest.raises(ValueError, match="SphereQuality: nside 3 is not a power of two"):
        SphereQuality(nside=3)  # it reported 1% coverage of a uniform sphere


class _RedshiftRows(_Rows):
    """A continuous per-row column of the position (a redshift), missing (NaN) in every tenth row."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        z = self.images[i].view(-1)[2]
        redshift = torch.tensor(float("nan")) if i % 10 == 0 else 1.0 + z
        return {"data": self.images[i], "redshift": redshift}


def test_sphere_quality_scores_a_continuous_label_with_missing_values_and_the_fit_goes_on(tmp_path):
    """A float label with NaNs stopped the fit after the first validation epoch with sklearn's traceback."""
    run, callback, recorded = fit_with_label(tmp_path, _RedshiftRows(), "redshift")
    assert run.state.finished and run.current_epoch == 2
    assert callback.figures["val_knn_r2"] > 0.8 and "val_knn_accuracy" not in callback.figures
    (message,) = sphere_warnings(recorded)  # once, not each epoch
    assert "label_column 'redshift' has no value (NaN) in 30 of 300 validation rows" in message


class _Constant(_Rows):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"data": self.images[i], "label": torch.tensor(1.5)}


def test_sphere_quality_skips_a_figure_it_cannot_compute_with_one_warning(tmp_path):
    run, callback, recorded = fit_with_label(tmp_path, _Constant(), "label")
    assert run.state.finished and "val_coverage" in callback.figures and "val_knn_r2" not in callback.figures
    (message,) = sphere_warnings(recorded)
    assert "SphereQuality: the kNN figure of 'label' skipped" in message and "value is 1.5 in all 300 rows" in message


def test_latent_sphere_map_is_coloured_by_a_column(tmp_path):
    from spherinator.figures import mollweide_map

    points = torch.nn.functional.normalize(torch.randn(2000, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    plain = mollweide_map(points).astype(int)
    coloured = mollweide_map(points, (points[:, 2] > 0).long(), "north").astype(int)
    assert plain.shape == coloured.shape == (340, 600, 3)

    def dots(picture: np.ndarray, rows: slice) -> np.ndarray:  # mean colour of the coloured (not grey) pixels
        pixels = picture[rows, 150:450].reshape(-1, 3)
        return pixels[np.ptp(pixels, axis=1) > 40].mean(0)

    north, south = slice(100, 150), slice(190, 240)
    assert np.abs(dots(coloured, north) - dots(coloured, south)).max() > 40  # the two hemispheres in two colours
    assert np.abs(dots(plain, north) - dots(plain, south)).max() < 10

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    model = sphere_vae(False)
    data = DataLoader(_Rows(40), batch_size=20)
    trainer(tmp_path, [LogLatentSphere(color_column="label")], logger=logger).validate(model, data, verbose=False)
    assert len(tensorboard_images(logger.log_dir)["latent_sphere"]) == 1
    tensors = DataLoader(torch.rand(40, 3, 16, 16), batch_size=20)
    with pytest.warns(UserWarning, match="color_column 'label' is not a per-row column"):
        trainer(tmp_path, [LogLatentSphere(color_column="label")]).validate(model, tensors, verbose=False)


def test_sphere_figures_reach_a_tasks_summary_and_the_status_table(tmp_path, capsys):
    from spherinator.submit import RunSummary, launch
    from spherinator.submit.requeue import logged_metrics

    data = DataLoader(_Rows(), batch_size=50)
    run = trainer(tmp_path, [SphereQuality(label_column="label")], limit_train_batches=1)
    run.fit(sphere_vae(False), data, data)
    (tmp_path / "task").mkdir()
    summary = RunSummary().start_attempt("1", "host", None, None, None)  # what TrainingTask writes
    summary.trained(1, run.global_step, logged_metrics(run), None, None).completed(None).save(tmp_path / "task")
    manifest = {"tasks": [{"index": 0, "name": "task", "params": {}}], "submissions": []}
    (row,), _ = launch.task_rows(tmp_path, manifest)
    assert re.fullmatch(r"coverage \d+% knn 0\.9\d\d", row.cells()["sphere"])
    launch.print_table([row])
    assert "SPHERE" in capsys.readouterr().out


# -- ParamManager (upstream's parameter callback) ------------------------------------------------------------------
def test_param_manager_freezes_sets_and_caps_what_its_patterns_name(tmp_path):
    """The frozen encoder ends as it began, the decoder's bias starts at the value and stays under its cap, the
    parameters no pattern names train, and a pattern naming nothing says so once."""
    model = sphere_vae(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = ParamManager(configs=[
        ParamConfig(pattern=r"^encoder\.", freeze=True),
        {"pattern": r"^decoder\.fc\.bias$", "value": 0.5, "max_value": 0.25},
        ParamConfig(pattern="no_such_parameter", freeze=True),
    ])  # fmt: skip
    data = DataLoader(_Rows(), batch_size=50)
    run = trainer(tmp_path, [callback], max_epochs=2)
    with pytest.warns(UserWarning, match="pattern 'no_such_parameter' matches no parameter of VariationalAutoenc"):
        run.fit(model, data)
    after = dict(model.named_parameters())
    frozen = [n for n in after if n.startswith("encoder.")]
    assert frozen and all(torch.equal(after[n], before[n]) and not after[n].requires_grad for n in frozen)
    assert torch.all(after["decoder.fc.bias"] <= 0.25) and not torch.equal(after["decoder.fc.bias"], before[
        "decoder.fc.bias"])  # fmt: skip
    trained = [n for n in after if not n.startswith("encoder.") and n != "decoder.fc.bias"]
    assert any(not torch.equal(after[n], before[n]) for n in trained)


def test_param_manager_reads_upstreams_yaml_and_refuses_a_bad_pattern_in_one_line(image_dataset, tmp_path):
    from spherinator.cli import SpherinatorCLI
    from spherinator.errors import ConfigError
    from tests.test_cli import TINY, data_yaml

    def callbacks(pattern: str) -> str:
        return ("trainer:\n  callbacks:\n    - class_path: spherinator.callbacks.ParamManager\n      init_args:\n"
                f"        configs:\n          - pattern: '{pattern}'\n            max_value: 1.0\n")  # fmt: skip

    args = ["-c", TINY, "-c", data_yaml(tmp_path, image_dataset)]
    cli = SpherinatorCLI(args=[*args, "-c", callbacks(r"encoder\.fc_scale")], run=False)
    (manager,) = [c for c in cli.trainer.callbacks if isinstance(c, ParamManager)]
    assert manager.configs == [ParamConfig(pattern=r"encoder\.fc_scale", max_value=1.0)]
    with pytest.raises(ConfigError, match=r"ParamManager: pattern 'fc_\[scale' is not a regular expression"):
        ParamManager(configs=[ParamConfig(pattern="fc_[scale")])
    with pytest.raises(ConfigError, match="ParamManager: max_value nan for 'x' must be a finite number"):
        ParamManager(configs=[ParamConfig(pattern="x", max_value=float("nan"))])


def test_param_manager_caps_a_frozen_parameter_without_unfreezing_it(tmp_path):
    """Upstream's default (freeze: False) made a capped parameter trainable again; a cap alone leaves it frozen."""
    model = sphere_vae(False)
    model.encoder.fc_scale.requires_grad_(False)  # as fixed_scale or an encoder's freeze: true leave it
    callback = ParamManager(configs=[ParamConfig(pattern=r"^encoder\.fc_scale\.", max_value=0.5)])
    run = trainer(tmp_path, [callback], max_epochs=1)
    run.fit(model, DataLoader(_Rows(), batch_size=50))
    assert not any(p.requires_grad for p in model.encoder.fc_scale.parameters())
    assert all(torch.all(p <= 0.5) for p in model.encoder.fc_scale.parameters())
    ParamManager(configs=[ParamConfig(pattern=r"^encoder\.fc_scale\.", freeze=False)]).on_train_start(run, model)
    assert all(p.requires_grad for p in model.encoder.fc_scale.parameters())  # said explicitly: trainable
