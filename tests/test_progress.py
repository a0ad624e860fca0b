"""Progress in log files: ``spherinator`` writes one line per epoch when stdout is not a terminal (a Slurm log),
and leaves a progress bar the config names, or turns off, as it is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar

from spherinator.callbacks import LineProgressBar
from spherinator.callbacks.progress import progress_bar_for_logs
from spherinator.cli import SpherinatorCLI

TINY = str(Path(__file__).parent / "configs" / "vae_tiny.yaml")


def overlay(tmp_path: Path, dataset: Path, epochs: int = 3, **trainer) -> str:
    config = {
        "data": {"class_path": "spherinator.data.DataModule",
                 "init_args": {"path": str(dataset), "batch_size": 16, "num_workers": 0, "val_fraction": 0.25}},
        "trainer": {"max_epochs": epochs, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": True,  # TINY turns it off
                    "default_root_dir": str(tmp_path / "run"), **trainer},
    }  # fmt: skip
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_fit_into_a_file_writes_one_line_per_epoch(tmp_path, image_dataset):
    code = "from spherinator.cli import main; main()"
    args = ["fit", "-c", TINY, "-c", overlay(tmp_path, image_dataset)]
    done = subprocess.run(  # stdout is a pipe, as it is a file under Slurm
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("Epoch ")]
    assert [line.split(":")[0] for line in lines] == ["Epoch 0/2", "Epoch 1/2", "Epoch 2/2"], done.stdout
    assert all(" batches in 0:" in line and "train_loss " in line and "val_loss " in line for line in lines), lines


def test_a_long_epoch_also_reports_within_it(tmp_path, image_dataset, capsys):
    cli = SpherinatorCLI(args=["-c", TINY, "-c", overlay(tmp_path, image_dataset, epochs=1)], run=False)
    cli.trainer.callbacks.remove(cli.trainer.progress_bar_callback)
    cli.trainer.callbacks.append(LineProgressBar(every_s=1e-9))  # every batch is "long ago" enough
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    lines = capsys.readouterr().out.splitlines()
    within = [line for line in lines if "to go" in line]
    assert within and all(line.startswith("Epoch 0/0: ") for line in within), lines
    assert lines[-1].startswith("Epoch 0/0: ") and "to go" not in lines[-1]


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        ({}, LineProgressBar),  # stdout is pytest's capture here, not a terminal
        ({"enable_progress_bar": False}, type(None)),
        ({"callbacks": [{"class_path": "lightning.pytorch.callbacks.TQDMProgressBar",
                         "init_args": {"refresh_rate": 7}}]}, TQDMProgressBar),
    ],
)  # fmt: skip
def test_what_the_config_says_about_the_bar_is_kept(tmp_path, image_dataset, trainer, expected):
    cli = SpherinatorCLI(args=["-c", TINY, "-c", overlay(tmp_path, image_dataset, **trainer)], run=False)
    bar = cli.trainer.progress_bar_callback
    assert type(bar) is expected
    if expected is TQDMProgressBar:
        assert bar.refresh_rate == 7


def test_a_terminal_keeps_lightnings_own_bar():
    assert progress_bar_for_logs({}, interactive=True) is None
    assert [type(cb) for cb in progress_bar_for_logs({}, interactive=False)] == [LineProgressBar]


def test_every_s_must_be_positive():
    with pytest.raises(ValueError, match="every_s must be a positive"):
        LineProgressBar(every_s=0)


def test_validate_and_predict_on_their_own_write_one_line_each(tmp_path, image_dataset, capsys):
    cli = SpherinatorCLI(args=["-c", TINY, "-c", overlay(tmp_path, image_dataset, epochs=1)], run=False)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Validation", "Predicting"], lines
    assert lines[0].startswith("Validation: 2/2 batches in 0:") and "val_loss " in lines[0], lines


def test_max_steps_reports_the_batches_of_the_epoch_not_of_nothing(tmp_path, image_dataset, capsys):
    # --trainer.max_steps with max_epochs left out (-1): the epoch line read "Epoch 0: 1/0 batches"
    args = ["-c", TINY, "-c", overlay(tmp_path, image_dataset, epochs=-1, max_steps=2)]
    cli = SpherinatorCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch ")]
    assert lines and all("/0 batches" not in line for line in lines), lines
    assert re.match(r"Epoch 0 \(step 2/2\): 2/[1-9][0-9]* batches in ", lines[-1]), lines
