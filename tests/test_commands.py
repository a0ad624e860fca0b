"""The ``spherinator`` command's own surface: --help and --version without the heavy imports, every command listed,
--print_config with the sizes that are inferred, callbacks layered without duplicates, the shipped examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spherinator import __version__
from spherinator.cli import SpherinatorCLI
from spherinator.commands import COMMANDS, LIGHTNING_COMMANDS, main

CONFIGS = Path(__file__).parent / "configs"
TINY = str(CONFIGS / "vae_tiny.yaml")
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
HEAVY = ("torch", "lightning", "transformers", "onnx", "onnxruntime", "submitit", "deepspeed", "wandb")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def data_yaml(tmp_path: Path, path: Path) -> str:
    args = {"path": str(path), "batch_size": 16, "num_workers": 0, "val_fraction": 0.25}
    out = tmp_path / "data.yaml"
    out.write_text(yaml.safe_dump({"data": {"class_path": "spherinator.data.DataModule", "init_args": args}}))
    return str(out)


# ------------------------------------------------------------------------------------- --help, --version


def heavy_modules_after(code: str) -> list[str]:
    """Which of HEAVY a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_command(args: list[str]) -> str:
    return (
        "import contextlib, io\nfrom spherinator.commands import main\n"
        f"with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main({args!r})"
    )


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["examples", "--help"]])
def test_help_and_version_import_neither_torch_nor_lightning(args):
    assert heavy_modules_after(run_command(args)) == []


@pytest.mark.slow
def test_fit_help_imports_nothing_heavy_beyond_what_lightning_itself_imports():
    """``fit --help`` needs Lightning (its options are the Trainer's); onnx, onnxruntime and submitit it never needs.
    Lightning imports torchmetrics, which imports transformers whenever it is installed (torchmetrics issue 2242):
    that one is allowed only when ``import lightning`` alone brings it."""
    lightning_alone = set(heavy_modules_after("import lightning.pytorch"))
    fit_help = set(heavy_modules_after(run_command(["fit", "--help"])))
    assert {"torch", "lightning"} <= fit_help
    assert not fit_help & {"onnx", "onnxruntime", "submitit", "deepspeed", "wandb"}, fit_help
    assert fit_help <= lightning_alone | {"torch", "lightning"}, fit_help - lightning_alone


def test_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("  -")]
    assert listed == list(COMMANDS)
    assert set(LIGHTNING_COMMANDS) == set(SpherinatorCLI.subcommands())  # the list keeps up with Lightning's
    assert {"export", "evaluate", "atlas"} <= set(COMMANDS)
    assert all(len(line) <= 100 for line in out.splitlines())


def test_version_is_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.split() == ["spherinator", __version__]


def test_an_unknown_command_is_one_line_naming_the_closest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["exprot", "x.ckpt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spherinator: error: unknown command 'exprot'; did you mean 'export'?") and "\n" not in err


def test_examples_copies_the_shipped_experiments_and_leaves_edited_ones_alone(tmp_path, capsys):
    edited = tmp_path / "experiments" / "demo.yaml"
    edited.parent.mkdir()
    edited.write_text("trainer: {max_epochs: 1}\n")
    main(["examples", str(tmp_path)])
    assert sorted(p.name for p in edited.parent.glob("*.yaml")) == sorted(p.name for p in EXPERIMENTS.glob("*.yaml"))
    assert (edited.parent / "vae_cnn3.yaml").read_text() == (EXPERIMENTS / "vae_cnn3.yaml").read_text()
    assert edited.read_text() == "trainer: {max_epochs: 1}\n"
    assert "demo.yaml" in capsys.readouterr().err


def test_examples_refuses_to_write_through_a_link_out_of_dir(tmp_path, capsys):
    outside = tmp_path / "outside" / "demo.yaml"  # where the dangling link points: not inside DIR
    (tmp_path / "dir" / "experiments").mkdir(parents=True)
    (tmp_path / "dir" / "experiments" / "demo.yaml").symlink_to(outside)
    with pytest.raises(SystemExit) as exit_info:
        main(["examples", str(tmp_path / "dir")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "demo.yaml is a link to" in err and str(outside) in err
    assert not outside.exists() and not (tmp_path / "outside").exists()
    assert list((tmp_path / "dir" / "experiments").iterdir()) == [tmp_path / "dir" / "experiments" / "demo.yaml"]


def test_examples_where_a_file_or_folder_is_in_the_way_is_one_line(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "experiments").write_text("not a folder")
    (tmp_path / "b" / "experiments" / "demo.yaml").mkdir(parents=True)
    for where in ("a", "b"):
        with pytest.raises(SystemExit) as exit_info:
            main(["examples", str(tmp_path / where)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("spherinator examples: error: "), err
    assert (tmp_path / "a" / "experiments").read_text() == "not a folder"


# ---------------------------------------------------------------------------------------------- --print_config


def print_config(capsys, args: list[str]) -> tuple[dict, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    return yaml.safe_load(captured.out), captured.err


def test_print_config_shows_the_sizes_that_are_inferred(image_dataset, tmp_path, capsys):
    printed, _ = print_config(capsys, ["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset)])
    model = printed["model"]["init_args"]
    assert model["encoder"]["init_args"]["input_dim"] == [3, 32, 32]  # from the data
    assert model["decoder"]["init_args"]["output_dim"] == [3, 32, 32]
    assert model["decoder"]["init_args"]["input_dim"] == 3  # z_dim
    assert model["encoder_out_dim"] == 16  # the encoder's output_dim
    assert printed["trainer"]["max_epochs"] == 1  # the rest as composed


def test_print_config_shows_an_override_followed_into_the_sizes(image_dataset, tmp_path, capsys):
    args = ["fit", "-c", TINY, "-c", data_yaml(tmp_path, image_dataset), "--model.init_args.z_dim", "7"]
    printed, _ = print_config(capsys, args)
    assert printed["model"]["init_args"]["decoder"]["init_args"]["input_dim"] == 7


def test_print_config_without_the_data_prints_the_rest_and_says_why(tmp_path, capsys):
    printed, err = print_config(capsys, ["fit", "-c", TINY, "-c", data_yaml(tmp_path, tmp_path / "absent")])
    model = printed["model"]["init_args"]
    assert model["encoder"]["init_args"]["input_dim"] is None
    assert model["decoder"]["init_args"]["input_dim"] == 3 and model["encoder_out_dim"] == 16
    assert "sizes taken from the data are left null" in err and "absent" in err


def test_print_config_without_a_data_section_prints_the_model_with_its_sizes_left_null(tmp_path, capsys):
    # no data: section at all: "required: fit.data" stopped --print_config, which had printed such a config
    printed, err = print_config(capsys, ["fit", "-c", TINY, "--model.init_args.z_dim", "16"])
    model = printed["model"]["init_args"]
    assert model["z_dim"] == 16 and model["encoder"]["init_args"]["input_dim"] is None
    assert printed["data"] is None
    assert "fit.data" in err and "null" in err


# ---------------------------------------------------------------------------------------- callbacks layered


def callback_names(cli: SpherinatorCLI, subcommand: str | None = None) -> list[str]:
    config = cli.config[subcommand] if subcommand else cli.config
    return [c.class_path.rsplit(".", 1)[-1] for c in config.trainer.callbacks]


def test_a_saved_run_config_layered_with_its_overlays_keeps_one_of_each_callback(image_dataset, tmp_path, capsys):
    overlays = ["-c", str(EXPERIMENTS / "callback_best_model.yaml")]
    overlays += ["-c", str(EXPERIMENTS / "callback_latent_sphere.yaml")]
    data = data_yaml(tmp_path, image_dataset)
    main(["fit", "-c", TINY, "-c", data, *overlays, "--trainer.limit_train_batches", "1"])
    (saved,) = (tmp_path / "runs" / "spherinator").glob("version_*/config.yaml")
    layered = ["fit", "-c", str(saved), "-c", TINY, "-c", data, *overlays]  # a saved config is a fit config
    cli = SpherinatorCLI(args=[*layered, "--trainer.max_epochs", "0"])
    assert callback_names(cli, "fit") == ["ModelCheckpoint", "LogLatentSphere"]
    built = [type(c).__name__ for c in cli.trainer.callbacks]
    assert built.count("ModelCheckpoint") == 1 and built.count("LogLatentSphere") == 1
    printed, _ = print_config(capsys, layered)
    assert [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]] == callback_names(cli, "fit")


def test_callbacks_that_differ_in_an_argument_are_all_kept(image_dataset, tmp_path):
    def overlay(name: str, monitor: str) -> str:
        path = tmp_path / f"{name}.yaml"
        checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": monitor}}
        path.write_text(yaml.safe_dump({"trainer": {"callbacks": [checkpoint]}}))
        return str(path)

    data = data_yaml(tmp_path, image_dataset)
    val, train, val_again = overlay("a", "val_loss"), overlay("b", "train_loss"), overlay("c", "val_loss")
    cli = SpherinatorCLI(args=["-c", TINY, "-c", data, "-c", val, "-c", train, "-c", val_again], run=False)
    assert [c.init_args.monitor for c in cli.config.trainer.callbacks] == ["val_loss", "train_loss"]
    added = "--trainer.callbacks+=spherinator.callbacks.KLAnnealing"
    cli = SpherinatorCLI(args=["-c", TINY, "-c", data, "-c", val, added, added], run=False)
    assert callback_names(cli) == ["ModelCheckpoint", "KLAnnealing"]


# ------------------------------------------------------------------------------------------ YAML read strictly


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def one_error_line(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("spherinator: error: "), err
    return err


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("trainer:\n  max_epochs: 1\nmodel: {}\ntrainer:\n  max_epochs: 2\n", "trainer", "lines 1 and 4"),
        ("trainer:\n  max_epochs: 1\n  logger: false\n  max_epochs: 2\n", "trainer.max_epochs", "lines 2 and 4"),
        (
            "trainer:\n  callbacks:\n  - class_path: a\n    init_args: {monitor: x, monitor: y}\n",
            "trainer.callbacks[0].init_args.monitor",
            "lines 4 and 4",
        ),
    ],
)
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, capsys, text, key, lines):
    config = write(tmp_path / "twice.yaml", text)
    err = one_error_line(capsys, ["fit", "-c", TINY, "-c", config, "--print_config"])
    assert f"-c {config}: {key} is given twice ({lines})" in err


def test_a_key_given_twice_in_a_file_named_by_an_option_is_refused(tmp_path, capsys):
    data = write(tmp_path / "data.yaml", "class_path: spherinator.data.DataModule\ninit_args:\n  path: x\n"
                                         "  batch_size: 4\n  batch_size: 8\n")  # fmt: skip
    err = one_error_line(capsys, ["fit", "-c", TINY, "--data", data, "--print_config"])
    assert "init_args.batch_size is given twice (lines 4 and 5)" in err


def test_an_integer_with_a_leading_zero_in_a_config_file_is_refused(tmp_path, capsys):
    # YAML 1.1 reads 010 as the octal 8 where the command line reads 10: neither is taken silently
    config = write(tmp_path / "octal.yaml", "model:\n  init_args:\n    z_dim: 010\n")
    err = one_error_line(capsys, ["fit", "-c", TINY, "-c", config, "--print_config"])
    assert f"-c {config} line 3: model.init_args.z_dim: 010 has a leading zero" in err
    assert "octal number 8" in err and "reads 10" in err


def test_numbers_that_read_alike_everywhere_are_taken(tmp_path, capsys):
    config = write(tmp_path / "fine.yaml", "model:\n  init_args:\n    z_dim: 10\ntrainer: {max_epochs: 0, "
                                           "logger: false}\n")  # fmt: skip
    printed, _ = print_config(capsys, ["fit", "-c", TINY, "-c", config])
    assert printed["model"]["init_args"]["z_dim"] == 10 and printed["trainer"]["max_epochs"] == 0


def test_the_shared_loader_reads_a_file_as_the_cli_does(tmp_path):
    from spherinator.config import load_config_file
    from spherinator.errors import ConfigError

    assert load_config_file(write(tmp_path / "a.yaml", "a: {b: 0x10, c: '010', d: 0, e: 0.5, f: 07}\n")) == {
        "a": {"b": 16, "c": "010", "d": 0, "e": 0.5, "f": 7}
    }
    with pytest.raises(ConfigError, match=r"a\.b is given twice \(lines 1 and 1\)"):
        load_config_file(write(tmp_path / "b.yaml", "a: {b: 1, b: 2}\n"))
    with pytest.raises(ConfigError, match=r"sweep.yaml line 3: x\[1\]: -010 has a leading zero"):
        load_config_file(write(tmp_path / "c.yaml", "x:\n- 1\n- -010\n"), source="sweep.yaml")
    assert load_config_file(write(tmp_path / "d.yaml", "base: &b {x: 1}\nrun:\n  <<: *b\n  y: 2\n")) == {
        "base": {"x": 1}, "run": {"x": 1, "y": 2}
    }  # fmt: skip


def test_print_config_with_a_wrong_value_names_it_as_without_the_flag(capsys):
    err = one_error_line(capsys, ["fit", "-c", TINY, "--model.init_args.z_dim", "abc", "--print_config"])
    assert "error: model.init_args.z_dim: Expected an int. Got value: abc" in err


def test_examples_on_a_full_disk_leave_no_cut_short_file_that_a_rerun_would_keep(tmp_path, monkeypatch, capsys):
    # shutil.copyfile on a full disk left an empty wandb.yaml, which the rerun then kept as "edited"
    import shutil

    original = shutil.copyfile

    def full_after_one(source, dest, *args, **kwargs):
        if list(Path(dest).parent.glob("*.yaml")):
            Path(dest).write_text("")  # what a full disk leaves: the file made, nothing in it
            raise OSError(28, "No space left on device")
        return original(source, dest, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full_after_one)
    with pytest.raises(SystemExit):
        main(["examples", str(tmp_path)])
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "experiments").iterdir()] == ["ae_cnn3.yaml"]
    monkeypatch.undo()
    main(["examples", str(tmp_path)])
    assert "left as they were" not in capsys.readouterr().err
