"""The ``spherinator`` command end to end on tiny data: fit, resume, predict, inference of sizes, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from lightning.pytorch import Callback

from spherinator.cli import SpherinatorCLI, main
from spherinator.data import write_dataset
from spherinator.models import VariationalAutoencoder

CONFIGS = Path(__file__).parent / "configs"
TINY = str(CONFIGS / "vae_tiny.yaml")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Runs log to ./runs by default: keep every test's logs in its own temporary directory."""
    monkeypatch.chdir(tmp_path)


def data_yaml(tmp_path: Path, path: Path, **init_args) -> str:
    """A data overlay reading ``path`` with small batches and no workers."""
    args = {"path": str(path), "batch_size": 16, "num_workers": 0, "val_fraction": 0.25, **init_args}
    out = tmp_path / f"data-{len(list(tmp_path.glob('data-*.yaml')))}.yaml"
    out.write_text(yaml.safe_dump({"data": {"class_path": "spherinator.data.DataModule", "init_args": args}}))
    return str(out)


def only_version_dir(root: Path) -> Path:
    (version,) = sorted((root / "runs" / "spherinator").glob("version_*"))
    return version


def test_fit_saves_resolved_config_and_checkpoint(image_dataset, tmp_path):
    cli = SpherinatorCLI(
        args=["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset), "--model.init_args.z_dim", "5"]
    )
    version = only_version_dir(tmp_path)
    saved = yaml.safe_load((version / "config.yaml").read_text())
    model = saved["model"]["init_args"]
    # What was inferred is in the saved config: the next run rebuilds exactly this model.
    assert model["z_dim"] == 5
    assert model["decoder"]["init_args"]["input_dim"] == 5
    assert model["encoder_out_dim"] == 16
    assert model["encoder"]["init_args"]["input_dim"] == [3, 32, 32]
    assert model["decoder"]["init_args"]["output_dim"] == [3, 32, 32]
    (ckpt,) = (version / "checkpoints").glob("*.ckpt")
    restored = VariationalAutoencoder.load_from_checkpoint(ckpt, map_location="cpu")
    assert restored.z_dim == 5
    restored.eval()
    trained = cli.model.eval()
    x = torch.rand(4, 3, 32, 32)
    z = restored.encode(x)
    assert z.shape == (4, 5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    # save -> load gives the very model that was trained
    torch.testing.assert_close(z, trained.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(restored(x), trained(x), rtol=0, atol=0)


def test_resume_continues_epoch_count(image_dataset, tmp_path):
    data = data_yaml(tmp_path, image_dataset)
    main(["fit", "-c", TINY, "-c", data, "--trainer.max_epochs", "1"])
    (ckpt,) = (only_version_dir(tmp_path) / "checkpoints").glob("*.ckpt")
    assert torch.load(ckpt, weights_only=False)["epoch"] == 0
    main(["fit", "-c", TINY, "-c", data, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt)])
    latest = max((tmp_path / "runs").rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    state = torch.load(latest, weights_only=False)
    assert state["epoch"] == 1
    assert state["global_step"] > torch.load(ckpt, weights_only=False)["global_step"]


def _fit_and_predict(tmp_path: Path, data: str) -> pa.Table:
    """``spherinator fit`` on the ``data`` overlay, then ``predict`` with the EmbeddingWriter: its table."""
    main(["fit", "-c", TINY, "-c", data])
    (ckpt,) = (only_version_dir(tmp_path) / "checkpoints").glob("*.ckpt")
    out = tmp_path / "emb.parquet"
    main(
        [
            "predict", "-c", TINY, "-c", data, "--ckpt_path", str(ckpt),
            "--trainer.callbacks+=spherinator.callbacks.EmbeddingWriter",
            f"--trainer.callbacks.output_path={out}",
        ]
    )  # fmt: skip
    return pq.read_table(out)


def test_predict_writes_embeddings_with_ids(image_dataset, tmp_path):
    table = _fit_and_predict(tmp_path, data_yaml(tmp_path, image_dataset, columns=["data", "id"], return_dict=True))
    assert sorted(table.column("id").to_pylist()) == list(range(96))  # every row once
    location = torch.tensor(table.column("location").to_pylist())
    assert location.shape == (96, 3)
    torch.testing.assert_close(location.norm(dim=1), torch.ones(96))


def test_predict_writes_string_ids_as_a_string_column(tmp_path):
    # survey object names pass through the loader and `spherinator predict` into embeddings.parquet, row by row
    rng = np.random.default_rng(0)
    names = np.array([f"SDSS J{i:06d}.78+123456.7" for i in range(40)])
    images = rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
    write_dataset(tmp_path / "named", [{"data": images, "name": names}], rows_per_file=20, rows_per_group=8)
    data = data_yaml(tmp_path, tmp_path / "named", columns=["data", "name"], return_dict=True, num_workers=2)
    table = _fit_and_predict(tmp_path, data)
    assert table.schema.field("name").type == pa.string()
    assert table.column("name").to_pylist() == names.tolist()  # predict keeps file order


def test_z_dim_override_follows_into_decoder(image_dataset, tmp_path):
    cli = SpherinatorCLI(
        args=["-c", TINY, "-c", data_yaml(tmp_path, image_dataset), "--model.init_args.z_dim", "8"], run=False
    )
    assert cli.model.z_dim == 8
    assert cli.model.decode(torch.randn(2, 8)).shape == (2, 3, 32, 32)


def test_explicit_decoder_input_dim_disagreeing_with_z_dim_is_an_error(image_dataset, tmp_path, capsys):
    args = ["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset), "--model.init_args.z_dim", "8"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--model.init_args.decoder.init_args.input_dim", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "input_dim is 3" in err and "z_dim is 8" in err


def test_encoder_out_dim_mismatch_is_an_error(image_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset), "--model.init_args.encoder_out_dim", "7"])
    err = capsys.readouterr().err
    assert "encoder_out_dim is 7" in err and "output_dim is 16" in err


def test_input_shape_disagreeing_with_data_is_an_error(image_dataset, tmp_path, capsys):
    args = ["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset)]
    with pytest.raises(SystemExit):
        main([*args, "--model.init_args.encoder.init_args.input_dim", "[3, 64, 64]"])
    err = capsys.readouterr().err
    assert "[3, 64, 64]" in err and "[3, 32, 32]" in err


def test_unknown_class_path_is_an_error(image_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset),
                "--model.init_args.encoder.class_path", "spherinator.models.NoSuchEncoder",
            ]
        )  # fmt: skip
    assert "NoSuchEncoder" in capsys.readouterr().err


def test_training_lowers_the_validation_loss(image_dataset, tmp_path):
    args = ["-c", TINY, "-c", data_yaml(tmp_path, image_dataset), "--trainer.max_epochs", "6"]
    cli = SpherinatorCLI(args=args, run=False)
    (before,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (after,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    assert after["val_recon"] < 0.5 * before["val_recon"], (before, after)
    assert torch.isfinite(torch.tensor(after["val_loss"]))


def test_resume_says_which_given_model_values_the_checkpoint_replaces(image_dataset, tmp_path):
    data = data_yaml(tmp_path, image_dataset)
    main(["fit", "-c", TINY, "-c", data])
    (ckpt,) = (only_version_dir(tmp_path) / "checkpoints").glob("*.ckpt")
    args = ["-c", TINY, "-c", data, "--model.init_args.beta", "0.5"]
    with pytest.warns(UserWarning, match=r"model.init_args.beta: 0.5 -> 0.001"):
        cli = SpherinatorCLI(args=["fit", *args, "--ckpt_path", str(ckpt)])
    assert cli.model.beta == 1e-3  # the run resumes the model it saved


class _RecordIds(Callback):
    def __init__(self) -> None:
        self.ids: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids += batch["id"].tolist()


class _SaveAfterBatch(Callback):
    def __init__(self, batch_idx: int, path: Path) -> None:
        self.batch_idx, self.path = batch_idx, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_the_middle_of_an_epoch_trains_on_the_rest_of_it(image_dataset, tmp_path, workers):
    """A checkpoint taken mid-epoch (a requeued job) resumes with exactly the rows that epoch had not seen."""
    data = data_yaml(tmp_path, image_dataset, columns=["data", "id"], return_dict=True, batch_size=8,
                     num_workers=workers, shuffle=True)  # fmt: skip
    args = ["-c", TINY, "-c", data, "--trainer.limit_val_batches", "0"]
    first, rest = _RecordIds(), _RecordIds()
    ckpt = tmp_path / "mid-epoch.ckpt"
    cli = SpherinatorCLI(args=[*args, "--trainer.max_steps", "4"], run=False)
    cli.trainer.callbacks += [first, _SaveAfterBatch(3, ckpt)]  # as the requeue callback saves: after a batch
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_rows = cli.datamodule.split_rows("train")
    assert len(first.ids) == 4 * 8 < train_rows

    cli = SpherinatorCLI(args=[*args, "--trainer.max_epochs", "1"], run=False)
    cli.trainer.callbacks.append(rest)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    assert not set(first.ids) & set(rest.ids)  # nothing twice
    assert len(first.ids) + len(rest.ids) == train_rows  # nothing left out


def test_drop_last_with_too_few_rows_for_one_batch_is_an_error(image_dataset, tmp_path, capsys):
    data = data_yaml(tmp_path, image_dataset, drop_last=True, batch_size=128)
    with pytest.raises(SystemExit):
        main(["fit", "-c", TINY, "-c", data])
    err = capsys.readouterr().err
    assert "batch_size=128" in err and "the train split has 72 rows" in err


def test_inline_config_text_still_parses(image_dataset, tmp_path):
    inline = "trainer:\n  callbacks:\n    - class_path: spherinator.callbacks.KLAnnealing\n" + "#\n" * 200
    cli = SpherinatorCLI(args=["-c", TINY, "-c", data_yaml(tmp_path, image_dataset), "-c", inline], run=False)
    assert [c.class_path for c in cli.config.trainer.callbacks] == ["spherinator.callbacks.KLAnnealing"]


# ---- bad input ends in one line that names the value and the fix, never in a traceback -------------------------

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def one_line_error(capsys, args: list[str], *needles: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "spherinator: error:" in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_class_refusing_its_arguments_is_a_one_line_error(image_dataset, tmp_path, capsys):
    # jsonargparse wraps what a class raises while it builds it; the refusal itself is the message
    data = data_yaml(tmp_path, image_dataset)
    one_line_error(capsys, ["fit", "-c", TINY, "-c", data, "--model.init_args.z_dim", "1"], "z_dim must be >= 2")
    one_line_error(capsys, ["fit", "-c", TINY, "-c", data, "--data.init_args.batch_size", "-4"], "batch_size=-4")
    # vae_cnn3's decoder starts from 8x8 and doubles four times: 32x32 data cannot be reached, and it says so
    args = ["fit", "-c", str(EXPERIMENTS / "vae_cnn3.yaml"), "-c", data]
    one_line_error(capsys, args, "cnn_input_dim [128, 8, 8]", "[3, 32, 32]")


def test_a_config_file_that_is_not_yaml_is_named(image_dataset, tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epochs: 1\n   limit_train_batches: 2\n")
    args = ["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset), "-c", str(typo)]
    one_line_error(capsys, args, f"-c {typo}: not valid YAML", "line 3")


def test_a_ckpt_path_that_is_no_checkpoint_is_a_one_line_error(image_dataset, tmp_path, capsys):
    data = data_yaml(tmp_path, image_dataset)
    one_line_error(capsys, ["fit", "-c", TINY, "-c", data, "--ckpt_path", "nope.ckpt"], "'nope.ckpt' is no file")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    args = ["fit", "-c", TINY, "-c", data, "--ckpt_path", "notes.ckpt"]
    one_line_error(capsys, args, "'notes.ckpt' cannot be read as a Lightning checkpoint")


def test_predicting_on_data_of_another_shape_than_the_checkpoint_blames_the_checkpoint(image_dataset, tmp_path, capsys):
    from spherinator.data import write_dataset

    main(["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset)])
    (ckpt,) = (only_version_dir(tmp_path) / "checkpoints").glob("*.ckpt")
    larger = tmp_path / "larger"
    write_dataset(larger, [{"data": torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8).numpy()}])
    args = ["predict", "-c", TINY, "-c", data_yaml(tmp_path, larger), "--ckpt_path", str(ckpt)]
    err = one_line_error(capsys, args, f"in the checkpoint {ckpt}", "[3, 64, 64]", "without --ckpt_path")
    assert "leave the encoder's input_dim out" not in err  # the user never wrote it


def fitted_checkpoint(tmp_path: Path, data: str) -> Path:
    """The checkpoint of a one-step fit of the tiny VAE on ``data``."""
    main(["fit", "-c", TINY, "-c", data, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    return max((tmp_path / "runs").rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)


def test_an_accelerator_whose_package_is_missing_is_one_line(image_dataset, tmp_path, capsys):
    # was: a 16-frame traceback ending in ModuleNotFoundError: Requirement 'torch_xla>=1.13' not met
    data = data_yaml(tmp_path, image_dataset)
    one_line_error(capsys, ["fit", "-c", TINY, "-c", data, "--trainer.accelerator", "tpu"], "trainer: ", "torch_xla")


def printed_save_dir(capsys) -> str:
    return yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]["init_args"]["save_dir"]


def test_default_root_dir_holds_the_default_loggers_run_and_checkpoints(image_dataset, tmp_path, capsys, monkeypatch):
    # was: --trainer.default_root_dir D changed nothing: events and checkpoints still went to ./runs/spherinator
    data = data_yaml(tmp_path, image_dataset)
    root = tmp_path / "scratch"
    main(["fit", "-c", TINY, "-c", data, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
          "--trainer.default_root_dir", str(root)])  # fmt: skip
    assert not (tmp_path / "runs").exists()
    (version,) = (root / "spherinator").glob("version_*")
    assert list(version.glob("events.out.tfevents.*")) and list(version.glob("checkpoints/*.ckpt"))
    assert (version / "config.yaml").is_file()
    # `~` as the logger expands it (its checkpoints went to a folder named `~`), and with only the run's name given
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    main(["fit", "-c", TINY, "-c", data, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
          "--trainer.default_root_dir", "~/scratch", "--trainer.logger.init_args.name", "mine"])  # fmt: skip
    (version,) = (tmp_path / "home" / "scratch" / "mine").glob("version_*")
    assert list(version.glob("events.out.tfevents.*")) and list(version.glob("checkpoints/*.ckpt"))
    assert not (tmp_path / "~").exists() and not (tmp_path / "runs").exists()
    # --print_config prints the folder the run uses (was: save_dir: runs)
    with pytest.raises(SystemExit):
        main(["fit", "-c", TINY, "-c", data, "--trainer.default_root_dir", str(root), "--print_config"])
    assert printed_save_dir(capsys) == str(root)
    # a root that YAML would read as no string prints as given (was: "Expected a str. Got value: {...}")
    with pytest.raises(SystemExit):
        main(["fit", "-c", TINY, "-c", data, f"--trainer.default_root_dir={tmp_path}/x: y", "--print_config"])
    assert printed_save_dir(capsys) == f"{tmp_path}/x: y"
    # a command without a checkpoint names the folder a fit with that root wrote to
    empty = tmp_path / "empty_root"
    one_line_error(capsys, ["validate", "-c", TINY, "-c", data, "--trainer.default_root_dir", str(empty)],
                   f"{empty}/spherinator/version_<n>/checkpoints/last.ckpt")  # fmt: skip
    one_line_error(capsys, ["validate", "-c", TINY, "-c", data, "--trainer.default_root_dir", str(empty),
                            "--ckpt_path", "last"], f"under the logger's folder {empty}/spherinator;")  # fmt: skip
    # without a logger, checkpoints go to the root's checkpoints/ (was: the hint named runs/<name>/version_<n>)
    one_line_error(capsys, ["validate", "-c", TINY, "-c", data, "--trainer.default_root_dir", str(empty),
                            "--trainer.logger", "false"], f"{empty}/checkpoints/last.ckpt")  # fmt: skip
    # a logger the config names keeps its own save_dir
    logger = tmp_path / "logger.yaml"
    logger.write_text("trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.TensorBoardLogger\n"
                      f"    init_args: {{save_dir: {tmp_path / 'mine'}, name: x}}\n")  # fmt: skip
    main(["fit", "-c", TINY, "-c", data, "-c", str(logger), "--trainer.max_steps", "1",
          "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root)])  # fmt: skip
    assert list((tmp_path / "mine" / "x").glob("version_0/checkpoints/*.ckpt"))


def test_test_without_a_test_split_says_how_to_make_one(image_dataset, tmp_path, capsys):
    data = data_yaml(tmp_path, image_dataset)
    ckpt = fitted_checkpoint(tmp_path, data)
    one_line_error(capsys, ["test", "-c", TINY, "-c", data, "--ckpt_path", str(ckpt)], "test_fraction (e.g. 0.1)")


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused_naming_one(image_dataset, tmp_path, capsys, subcommand):
    # predict and validate without --ckpt_path ran a randomly initialised model and reported success
    data = data_yaml(tmp_path, image_dataset, test_fraction=0.25)
    args = [subcommand, "-c", TINY, "-c", data]
    one_line_error(
        capsys, args, f"{subcommand} without --ckpt_path", "runs/spherinator/version_<n>/checkpoints/last.ckpt"
    )
    ckpt = fitted_checkpoint(tmp_path, data)
    one_line_error(capsys, args, f"--ckpt_path {ckpt.relative_to(tmp_path)} (the newest checkpoint under")
    main([*args, "--ckpt_path", str(ckpt)])  # with it, it runs


@pytest.mark.parametrize(
    ("text", "says"),
    [("", "is empty"), ("# model: later\n", "is empty"), ("- a\n- b\n", "holds a YAML list, not settings")],
)
def test_a_config_file_without_settings_is_named(image_dataset, tmp_path, capsys, text, says):
    # jsonargparse printed the content ("Unexpected config: - a") but not the file
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(text)
    args = ["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset), "-c", str(overlay)]
    one_line_error(capsys, args, f"-c {overlay} {says}")


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (["--model.init_args.betaa", "3"], "model.init_args: Option 'betaa' is not accepted; did you mean 'beta'?"),
        (["--model.init_args.z_dim", "abc"], "model.init_args.z_dim: Expected an int. Got value: abc"),
        (["--model.init_args.beta", "high"], "model.init_args.beta: Expected a float. Got value: high"),
        (
            ["--model.init_args.encoder.class_path", "spherinator.models.Nope"],
            "model.init_args.encoder: class_path 'spherinator.models.Nope': module 'spherinator.models' has no "
            "attribute 'Nope'",
        ),
        (
            ["--model.init_args.encoder.init_args.cnn_layers", "[{class_path: torch.nn.Conv2d, init_args: {x: 1}}]"],
            "model.init_args.encoder.init_args.cnn_layers[...].init_args: Option 'x' is not accepted",
        ),
        (["--trainer.max_epocs", "3"], "unrecognized arguments: --trainer.max_epocs 3"),
        (["-c", "trainer: {max_epoch: 3}"], "does not accept option 'trainer.max_epoch'; did you mean 'max_epochs'?"),
    ],
)
def test_a_parse_error_is_one_line_without_the_usage_text(image_dataset, tmp_path, capsys, override, says):
    # jsonargparse printed ~50 lines of usage before the message, which itself spread over 10 nested lines
    args = ["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset), *override]
    err = one_line_error(capsys, args, says, "(see spherinator fit --help)")
    assert "usage:" not in err and len(err.strip().splitlines()) == 1, err


def test_init_args_for_a_section_without_a_class_path_asks_for_the_class_path(tmp_path, capsys):
    # was: "data.init_args: Option 'batch_size' is not accepted; LightningDataModule takes  (see ...)": the list of
    # what the abstract base takes was empty
    err = one_line_error(
        capsys,
        ["fit", "-c", TINY, "--data.init_args.batch_size", "8"],
        "data.init_args: Option 'batch_size' is not accepted",
        "give data.class_path first",
    )
    assert "takes  " not in err, err


def test_a_bad_z_dim_is_named_as_z_dim_not_as_the_decoder_input_dim(image_dataset, tmp_path, capsys):
    data = data_yaml(tmp_path, image_dataset)
    for z_dim in ("0", "-3"):
        err = one_line_error(capsys, ["fit", "-c", TINY, "-c", data, "--model.init_args.z_dim", z_dim], "z_dim")
        assert f"got {z_dim}" in err and "input_dim" not in err, err


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (["--model.init_args.beta", "-1"], "beta (the weight of the KL divergence"),
        (["--model.init_args.beta", ".nan"], "must be a finite number >= 0, got nan"),  # and no resume warning
        (["--optimizer.init_args.lr", "-0.1"], "optimizer torch.optim.Adam refuses its init_args"),
        (["--optimizer.init_args.lr", ".inf"], "optimizer.init_args.lr is inf"),
        (["--trainer.max_epochs", "-3"], "trainer: `max_epochs` must be a non-negative integer"),
        (["--trainer.accelerator", "gpux"], "trainer: You selected an invalid accelerator name"),
        (
            ["--model.init_args.encoder.init_args.cnn_layers", "[{class_path: spherinator.models.ConsecutiveConv2DLayer"
             ", init_args: {out_channels: [8, -4]}}]"],
            "ConsecutiveConv2DLayer: out_channels [8, -4] has -4",
        ),
    ],
)  # fmt: skip
def test_a_hyperparameter_out_of_range_is_a_one_line_error(image_dataset, tmp_path, capsys, recwarn, override, says):
    # each of these trained (a negative loss, NaNs) or ended in a long traceback
    one_line_error(capsys, ["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset), *override], says)
    # beta nan != nan had read as a value that the (absent) checkpoint replaced
    assert not [w for w in recwarn if "checkpoint's model hyperparameters" in str(w.message)]


@pytest.mark.parametrize("subcommand", ["validate", "predict"])
def test_ckpt_path_last_is_the_newest_checkpoint_of_the_latest_run_or_refused(
    image_dataset, tmp_path, capsys, subcommand
):
    # Lightning looks `last` up in the new run's empty folder: validate/predict ran a random model and exited 0
    data = data_yaml(tmp_path, image_dataset)
    args = [subcommand, "-c", TINY, "-c", data, "--ckpt_path", "last"]
    one_line_error(capsys, args, "--ckpt_path last: no checkpoint found", "randomly initialised")
    one_line_error(capsys, [subcommand, "-c", TINY, "-c", data, "--ckpt_path", "best"], "--ckpt_path best names")
    one_line_error(capsys, [subcommand, "-c", TINY, "-c", data, "--ckpt_path", "hpc"], "no hpc_ckpt_<n>.ckpt")
    ckpt = fitted_checkpoint(tmp_path, data)
    cli = SpherinatorCLI(args=args, parser_kwargs={"exit_on_error": False})
    assert Path(cli.config[subcommand].ckpt_path).resolve() == ckpt.resolve()


def test_a_log_directory_that_is_a_file_is_one_line_naming_it(image_dataset, tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    args = ["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset), "--trainer.max_steps", "1"]
    one_line_error(capsys, args, "runs/spherinator (Not a directory)")
    assert (tmp_path / "runs").read_text() == "not a folder"


def test_a_disk_error_is_one_line_and_other_os_errors_keep_their_traceback(capsys):
    import errno

    from spherinator.errors import one_line_errors

    with pytest.raises(SystemExit) as exit_info, one_line_errors("spherinator", []):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(FileNotFoundError), one_line_errors("spherinator", []):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "spherinator/missing_module_file.py")
