"""One way from a run to its objects (:mod:`spherinator.runs`): run directories, checkpoints ordered by the step
they hold, the resume fallback kept to a run's own intact checkpoints, and one clear line for files that are no
checkpoint."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

import spherinator.submit.task as task
from spherinator.atlas.build import default_out
from spherinator.checkpoints import CheckpointError, check_checkpoint, resume_checkpoint
from spherinator.cli import main
from spherinator.runs import newest_checkpoint, open_run, resume_point, run_dir_of

TINY = str(Path(__file__).parent / "configs" / "vae_tiny.yaml")


def checkpoint(path: Path, step: int, z_dim: int = 3, mtime: float | None = None) -> Path:
    """A small Lightning-style checkpoint of a model with a ``z_dim`` latent, saved at ``step``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "pytorch-lightning_version": "2.6",
            "global_step": step,
            "state_dict": {"encoder.fc.weight": torch.zeros(z_dim, 4)},
            "hyper_parameters": {"_class_path": "spherinator.models.VariationalAutoencoder", "z_dim": z_dim},
        },
        path,
    )
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def torn(path: Path, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 cut short")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


class RunsOnLoad:
    """Pickles to a call of Path.write_text: unpickling it in full writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "ran")


def test_no_fallback_to_a_checkpoint_of_another_run_in_a_shared_folder(tmp_path):
    shared = tmp_path / "shared"
    checkpoint(shared / "b.ckpt", step=40, z_dim=8)  # another run's model
    damaged = torn(shared / "a.ckpt")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint is beside it \(only a run's own checkpoints/"):
        resume_checkpoint(damaged)


def test_random_bytes_or_a_crafted_pickle_beside_a_torn_checkpoint_are_not_intact(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    intact = checkpoint(folder / "epoch=0-step=4.ckpt", step=4, mtime=1000)
    damaged = torn(folder / "last.ckpt", mtime=2000)
    (folder / "noise.ckpt").write_bytes(os.urandom(4096))
    marker = tmp_path / "marker"
    crafted = folder / "crafted.ckpt"
    crafted.write_bytes(pickle.dumps({"state_dict": {}, "x": RunsOnLoad(marker)}))
    torch.save({"pytorch-lightning_version": "2.6", "x": RunsOnLoad(marker)}, folder / "crafted2.ckpt")
    for name in ("noise.ckpt", "crafted.ckpt", "crafted2.ckpt"):
        os.utime(folder / name, (1500, 1500))  # newer than the intact one
    chosen, warning = resume_checkpoint(damaged)
    assert chosen == intact and str(intact) in warning and "step (4" in warning, warning
    assert not marker.exists()


def test_after_a_copy_of_the_run_the_fallback_takes_the_highest_step_not_the_newest_file(tmp_path):
    folder = tmp_path / "copy" / "checkpoints"
    checkpoint(folder / "epoch=0-step=4.ckpt", step=4, mtime=3000)  # cp -r wrote it last
    step12 = checkpoint(folder / "epoch=2-step=12.ckpt", step=12, mtime=1000)
    damaged = torn(folder / "last.ckpt", mtime=2000)
    chosen, warning = resume_checkpoint(damaged)
    assert chosen == step12 and "(12;" in warning, warning
    assert newest_checkpoint(folder) == step12


def test_the_fallback_keeps_to_the_model_of_the_run(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    step12 = checkpoint(folder / "epoch=2-step=12.ckpt", step=12)
    checkpoint(folder / "epoch=1-step=8.ckpt", step=8)
    checkpoint(folder / "stray.ckpt", step=9, z_dim=8)  # another model's file dropped in
    damaged = torn(folder / "last.ckpt")
    assert resume_checkpoint(damaged)[0] == step12
    with pytest.raises(CheckpointError, match="intact ones beside it: epoch=2-step=12.ckpt, epoch=1-step=8.ckpt$"):
        resume_checkpoint(damaged, fallback=False)


def test_a_task_resumes_from_the_higher_step_and_past_a_damaged_newest_file(tmp_path, capsys):
    run = tmp_path / "run"
    requeue = checkpoint(run / "checkpoints" / "requeue.ckpt", step=12, mtime=1000)
    checkpoint(run / "checkpoints" / "last.ckpt", step=4, mtime=2000)  # a copy's mtimes say nothing
    assert task.newest_checkpoint(run) == requeue
    assert task.resume_point(run) == (requeue, None)
    damaged = torn(run / "checkpoints" / "requeue.ckpt", mtime=3000)
    chosen, passed = task.resume_point(run)
    assert chosen == run / "checkpoints" / "last.ckpt" and passed == str(damaged)
    assert f"{damaged} does not load" in capsys.readouterr().err
    assert resume_point(tmp_path / "nowhere") == (None, None)


def test_a_checkpoint_without_weights_is_no_checkpoint(tmp_path):
    empty = tmp_path / "empty.ckpt"
    torch.save({"pytorch-lightning_version": "2.6", "global_step": 3}, empty)
    with pytest.raises(CheckpointError, match="without model weights \\(no 'state_dict'\\)"):
        check_checkpoint(empty)


def test_a_text_file_as_ckpt_path_is_one_line(image_dataset, tmp_path, capsys):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("epoch: 3\nthis is not a checkpoint\n")
    data = ["--data", "spherinator.data.DataModule", "--data.init_args.path", str(image_dataset)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", TINY, *data, "--trainer.logger", "false", "--ckpt_path", str(notes)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"checkpoint {notes} cannot be read" in err, err


def test_a_run_dir_and_its_checkpoint_onnx_and_config(tmp_path):
    run = tmp_path / "runs" / "tiny" / "version_0"
    (run / "onnx").mkdir(parents=True)
    (run / "onnx" / "decoder.onnx").write_bytes(b"")
    (run / "config.yaml").write_text("model: {}\n")
    older = checkpoint(run / "checkpoints" / "epoch=0-step=4.ckpt", step=4)
    newer = checkpoint(run / "checkpoints" / "epoch=1-step=8.ckpt", step=8, mtime=1000)
    torn(run / "checkpoints" / "last.ckpt")
    opened = open_run(run)
    assert (opened.run_dir, opened.checkpoint, opened.onnx_dir, opened.config) == (
        run,
        newer,
        run / "onnx",
        run / "config.yaml",
    )
    assert open_run(older).checkpoint == older and open_run(older).run_dir == run
    assert open_run(run / "onnx").run_dir is None
    for path in (run, older, run / "onnx"):
        assert run_dir_of(path) == run and default_out(path) == run / "atlas"
