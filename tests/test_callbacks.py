"""KLAnnealing schedule, reconstruction images and the latent sphere map, read back from the loggers."""

from __future__ import annotations

import io

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from spherinator.callbacks import KLAnnealing, LogLatentSphere, LogReconstructionCallback
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
    options = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    return pl.Trainer(**{**options, **kwargs})


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
    from spherinator.callbacks.latent_sphere import decoded_map, sphere_grid

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
