"""What a requeued or queued task resumes from and runs: where a requeue stops and what the resumed run does,
atomic saves, damaged and foreign checkpoints, the code snapshot a sweep's tasks import."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

import spherinator
import spherinator.submit.launch as launch
import spherinator.submit.task as task
from spherinator.checkpoints import AtomicCheckpointIO, CheckpointError, check_checkpoint, resume_checkpoint
from spherinator.cli import SpherinatorCLI, main
from spherinator.submit.records import RunSummary
from spherinator.submit.requeue import REQUEUE_SIGNAL

TINY = str(Path(__file__).parent / "configs" / "vae_tiny.yaml")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs log to ./runs by default


def run_config(tmp_path: Path, dataset: Path, epochs: int = 3, **trainer) -> list[str]:
    """TINY on ``dataset`` (4 training and 3 validation batches), logging and checkpointing into tmp_path/run as a
    spherinator-submit task does (same TensorBoard run after a resume, last.ckpt, RequeueOnSignal)."""
    run = tmp_path / "run"
    data = {"path": str(dataset), "batch_size": 16, "num_workers": 0, "val_fraction": 0.4}
    config = {
        "data": {"class_path": "spherinator.data.DataModule", "init_args": data},
        "trainer": {
            "max_epochs": epochs, "default_root_dir": str(run), **trainer,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run), "name": "", "version": "", "default_hp_metric": False}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True}},
                {"class_path": "spherinator.submit.RequeueOnSignal"},
            ],
        },
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["-c", TINY, "-c", str(path)]


class _SignalAt(Callback):
    """Raises the USR2 flag (as the handler would) when the given training or validation batch starts."""

    def __init__(self, stage: str, epoch: int, batch: int) -> None:
        self.stage, self.epoch, self.batch = stage, epoch, batch

    def _maybe(self, trainer, stage: str, batch_idx: int) -> None:
        if (stage, trainer.current_epoch, batch_idx) == (self.stage, self.epoch, self.batch):
            REQUEUE_SIGNAL.pending = signal.SIGUSR2

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe(trainer, "train", batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._maybe(trainer, "val", batch_idx)


def val_losses(run: Path) -> list[int]:
    return list(logged(run, "val_loss"))


def logged(run: Path, tag: str) -> dict[int, float]:
    """The values of ``tag`` in the TensorBoard events under ``run``, by step (sorted)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[int, float] = {}
    for events_file in sorted(run.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(events_file))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            found.update({e.step: e.value for e in events.Scalars(tag)})
    return dict(sorted(found.items()))


@pytest.fixture(scope="module")
def uninterrupted(image_dataset, tmp_path_factory) -> Path:
    """The run dir of run_config trained for its 3 epochs without a requeue."""
    base = tmp_path_factory.mktemp("uninterrupted")
    cli = SpherinatorCLI(args=run_config(base, image_dataset), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return base / "run"


@pytest.mark.parametrize(
    "stage, batch, during",
    [
        pytest.param("train", 1, "training", marks=pytest.mark.slow),  # the middle of an epoch
        ("train", 3, "validation"),  # the epoch's last batch: the validation after it still runs after the resume
        pytest.param("val", 0, "validation", marks=pytest.mark.slow),
        ("val", 2, "validation"),  # the last validation batch
    ],
)
def test_a_requeue_anywhere_in_an_epoch_resumes_with_one_val_loss_per_epoch(
    image_dataset, tmp_path, monkeypatch, stage, batch, during, uninterrupted
):
    monkeypatch.setattr(REQUEUE_SIGNAL, "pending", None)
    args = run_config(tmp_path, image_dataset)
    run = tmp_path / "run"
    cli = SpherinatorCLI(args=args, run=False)
    cli.trainer.callbacks.append(_SignalAt(stage, 1, batch))
    with pytest.raises(SystemExit):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # A signal in a validation is acted on in it (it does not wait for the validation and the next batch).
    assert val_losses(run) == [3], val_losses(run)
    summary = RunSummary.read(run)
    assert summary.state == "REQUEUEING" and summary.requeued_during == during and summary.requeues == 1, summary

    ckpt = task.newest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "requeue.ckpt"
    cli = SpherinatorCLI(args=[*args], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    assert cli.trainer.current_epoch == 3 and cli.trainer.global_step == 12
    # each epoch validated once, at its last step (sorted: the two runs' event files may be read in either order)
    assert sorted(val_losses(run)) == [3, 7, 11]
    assert torch.load(ckpt, weights_only=True)["callbacks"]  # the generators' state is plain data
    if during == "validation":
        # the same run as one never stopped: the random generators (the sampled latents) continue where they were
        # (was: val_loss 0.17217 for 0.17252 after a requeue in epoch 1, and every later value off too). A requeue
        # in the middle of an epoch trains the epoch's rows left in another order (Loader.resume), so not there.
        for tag in ("val_loss", "train_loss"):
            assert logged(run, tag) == logged(uninterrupted, tag), tag


# ---- atomic saves ----------------------------------------------------------------------------------------------


def small_checkpoint(n: int) -> dict:
    return {"pytorch-lightning_version": "2.6", "state_dict": {"w": torch.zeros(n)}}


SAVE = """
import os, resource, signal, sys, torch
from spherinator.checkpoints import AtomicCheckpointIO
if len(sys.argv) > 2:  # the kernel kills the writer at this file size (SIGXFSZ, which Python ignores by default)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
AtomicCheckpointIO().save_checkpoint({"pytorch-lightning_version": "2.6", "state_dict": {"w": torch.rand(10_000_000)}},
                                     sys.argv[1])
"""


def kill_while_a_file_is_partial(target: Path, env: dict) -> int:
    """Run SAVE and SIGKILL it as soon as the checkpoint dir holds part of a file (the target, or a temporary)."""
    child = subprocess.Popen([sys.executable, "-c", SAVE, str(target)], env=env, stderr=subprocess.PIPE)
    full = target.stat().st_size
    while child.poll() is None:
        sizes = {p.name: p.stat().st_size for p in target.parent.iterdir() if p.is_file()}
        if sizes.get(target.name, full) != full or len(sizes) > 1:
            child.kill()
            break
    return child.wait()


@pytest.mark.parametrize(
    "kill", ["file size limit", pytest.param("SIGKILL while a file is partial", marks=pytest.mark.slow)]
)
def test_a_save_killed_halfway_leaves_the_previous_checkpoint_intact(tmp_path, kill):
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(small_checkpoint(10_000_000), target)  # as large as the one SAVE writes
    # $TMPDIR on another filesystem than the run dir (node-local /tmp, shared runs/): Lightning's own IO writes its
    # temporary file there and *copies* it over the target, which a kill tears (7 in 12 random kills here)
    shm = Path("/dev/shm")
    if shm.is_dir() and shm.stat().st_dev != tmp_path.stat().st_dev:
        env = {**os.environ, "TMPDIR": str(shm)}
    else:
        env = dict(os.environ)
    if kill == "file size limit":
        done = subprocess.run([sys.executable, "-c", SAVE, str(target), "4000000"], env=env, capture_output=True)
        assert done.returncode == -signal.SIGXFSZ, done.stderr.decode()[-2000:]
    else:
        assert kill_while_a_file_is_partial(target, env) == -signal.SIGKILL
    check_checkpoint(target)  # still loads
    assert not torch.load(target, weights_only=True)["state_dict"]["w"].any()  # and is the old one
    assert {p.name for p in target.parent.iterdir()} <= {"last.ckpt", ".last.ckpt.partial"}
    AtomicCheckpointIO().save_checkpoint(small_checkpoint(2), target)
    assert torch.load(target, weights_only=True)["state_dict"]["w"].shape == (2,)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # a killed save's partial file is reused


def test_the_cli_saves_through_the_atomic_io_unless_another_is_configured(image_dataset, tmp_path):
    args = run_config(tmp_path, image_dataset)
    cli = SpherinatorCLI(args=args, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    mine = tmp_path / "io.yaml"
    mine.write_text("trainer:\n  plugins:\n    - class_path: lightning.pytorch.plugins.io.AsyncCheckpointIO\n")
    cli = SpherinatorCLI(args=[*args, "-c", str(mine)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AsyncCheckpointIO"


# ---- damaged and foreign checkpoints ---------------------------------------------------------------------------


def two_epochs_then_truncate_last(image_dataset, tmp_path) -> tuple[list[str], Path, Path]:
    """A 2-epoch run with an epoch-1 checkpoint beside a last.ckpt cut in half (as a kill during a copy leaves it)."""
    args = run_config(tmp_path, image_dataset, epochs=2)
    main(["fit", *args])
    checkpoints = tmp_path / "run" / "checkpoints"
    last = checkpoints / "last.ckpt"
    (earlier,) = [p for p in checkpoints.glob("epoch=*.ckpt")]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    return args, last, earlier


@pytest.mark.parametrize("ckpt", ["file", pytest.param("last", marks=pytest.mark.slow)])
def test_fit_from_a_truncated_last_ckpt_resumes_from_the_newest_intact_one_and_says_so(image_dataset, tmp_path, ckpt):
    args, last, earlier = two_epochs_then_truncate_last(image_dataset, tmp_path)
    given = str(last) if ckpt == "file" else "last"
    with pytest.warns(UserWarning) as record:
        cli = SpherinatorCLI(args=["fit", *args, "--trainer.max_epochs", "3", "--ckpt_path", given])
    messages = [str(w.message) for w in record if str(last) in str(w.message)]
    assert messages and str(earlier) in messages[0] and "cannot be read" in messages[0], messages
    assert cli.trainer.current_epoch == 3


def test_evaluating_a_truncated_checkpoint_is_a_one_line_error_naming_the_intact_ones(image_dataset, tmp_path, capsys):
    args, last, earlier = two_epochs_then_truncate_last(image_dataset, tmp_path)
    with pytest.raises(SystemExit):
        main(["validate", *args, "--ckpt_path", str(last)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"checkpoint {last} cannot be read" in err and earlier.name in err, err


def test_a_plain_torch_save_file_is_a_one_line_error_not_a_key_error(image_dataset, tmp_path, capsys):
    plain = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, plain)
    with pytest.raises(SystemExit):
        main(["fit", *run_config(tmp_path, image_dataset), "--ckpt_path", str(plain)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyError" not in err, err
    assert f"{plain} is not a Lightning checkpoint" in err and "'state_dict'" in err, err


def test_resume_checkpoint_without_an_intact_one_beside_it_says_so(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(CheckpointError, match="no intact checkpoint is beside it"):
        resume_checkpoint(tmp_path / "last.ckpt")


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # torch's zip writer reports a short write as RuntimeError ("unexpected pos"): a 60-line traceback
    from spherinator.errors import OutputError

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(small_checkpoint(3), target)
    before = target.read_bytes()

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 26560 vs 26456")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError, match="cannot write the checkpoint .*last.ckpt .*unexpected pos"):
        AtomicCheckpointIO().save_checkpoint(small_checkpoint(4), target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_fallback_passes_over_a_checkpoint_of_another_model_copied_into_the_run(tmp_path):
    # a z_dim 8 checkpoint copied into the run's checkpoints/ at a higher step was resumed as "this run's"
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (tmp_path / "run" / "hparams.yaml").write_text(yaml.safe_dump({"_instantiator": "x", "z_dim": 3, "dims": [1, 2]}))
    for name, step, z_dim, n in [("own.ckpt", 6, 3, 3), ("foreign.ckpt", 100, 8, 3)]:
        hparams = {"_class_path": "spherinator.models.VariationalAutoencoder", "z_dim": z_dim, "dims": (1, 2)}
        torch.save({**small_checkpoint(n), "global_step": step, "hyper_parameters": hparams}, folder / name)
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 cut")
    chosen, warning = resume_checkpoint(folder / "last.ckpt")
    assert chosen == folder / "own.ckpt" and "(6;" in warning
    (folder / "own.ckpt").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint is beside it"):
        resume_checkpoint(folder / "last.ckpt")


# ---- the code a queued or requeued task runs -------------------------------------------------------------------

FIND_SPHERINATOR = "import importlib.util; print(importlib.util.find_spec('spherinator').origin)"


def test_tasks_start_in_the_sweeps_code_snapshot_and_import_it_not_the_checkout(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    code, version = launch.code_snapshot(sweep)
    assert [p.name for p in code.iterdir()] == ["spherinator"] and not list(code.rglob("__pycache__"))
    assert version.split()[0] == task.code_hash(code / "spherinator")
    assert launch.code_snapshot(sweep, version) == (code, version)  # --resume keeps the submission's code
    # srun starts Python this way, in the submit dir; here the repository root, which holds the live checkout
    repo = Path(spherinator.__file__).resolve().parents[1]
    command = f"{launch.python_command(code)} -c {shlex.quote(FIND_SPHERINATOR)}"
    found = subprocess.run(["bash", "-c", command], cwd=repo, capture_output=True, text=True, timeout=120)
    assert Path(found.stdout.strip()) == code / "spherinator" / "__init__.py", found


def test_a_task_refuses_to_run_other_code_than_it_was_submitted_with(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    run = tmp_path / "run"
    run.mkdir()
    job = task.TrainingTask(run, tmp_path, export=False, code_version="sha256:0123456789abcdef (git 0abc123)")
    with pytest.raises(RuntimeError, match="submitted with spherinator sha256:0123456789abcdef"):
        job()
    summary = RunSummary.read(run)
    assert summary.state == "FAILED" and "submit the sweep again" in summary.error, summary
    assert job.checkpoint().function.code_version == job.code_version  # a requeue keeps the version


def test_random_bytes_are_not_described_as_a_checkpoint_naming_python_objects(tmp_path):
    # the weights-only refusal of bytes that are no pickle read "it names Python objects" alone
    from spherinator.checkpoints import DamagedCheckpointError, read_info

    (tmp_path / "noise.ckpt").write_bytes(bytes([0x80, 0x02, 0x4C, 0x00, 0x17]) + os.urandom(64))
    with pytest.raises(DamagedCheckpointError, match=r"\(torch: Unsupported operand \d+; no checkpoint, or one nam"):
        read_info(tmp_path / "noise.ckpt")


def requeue_at(args: list[str], run: Path, stage: str, epoch: int, batch: int) -> None:
    """Fit (resuming the run's newest checkpoint, if any) until the signal at ``stage`` batch ``batch`` of
    ``epoch`` makes it requeue."""
    cli = SpherinatorCLI(args=args, run=False)
    cli.trainer.callbacks.append(_SignalAt(stage, epoch, batch))
    with pytest.raises(SystemExit):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=task.newest_checkpoint(run))


def fit_to_the_end(args: list[str], run: Path) -> None:
    cli = SpherinatorCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=task.newest_checkpoint(run))


def test_a_validation_cut_twice_runs_once_after_the_second_resume(image_dataset, tmp_path, monkeypatch, uninterrupted):
    # was: the second cut's checkpoint resumed past that validation: epoch 1 had no val_loss, and the run went on
    # with other values
    monkeypatch.setattr(REQUEUE_SIGNAL, "pending", None)
    args, run = run_config(tmp_path, image_dataset), tmp_path / "run"
    requeue_at(args, run, "val", 1, 0)
    requeue_at(args, run, "val", 1, 1)  # in the validation the resumed run runs again
    fit_to_the_end(args, run)
    for tag in ("val_loss", "train_loss"):
        assert logged(run, tag) == logged(uninterrupted, tag), tag


def test_a_requeue_at_the_end_of_an_epoch_without_validation_continues_the_same_run(
    image_dataset, tmp_path, monkeypatch
):
    # was: the run resumed from last.ckpt (saved at the epoch's end) trained its next epoch in the finished epoch's
    # order (its loader's iterator was made while that epoch was current), and the loader drew its workers' seed
    # from the generators the model samples with, before they were set: every later train_loss differed
    monkeypatch.setattr(REQUEUE_SIGNAL, "pending", None)
    (tmp_path / "base").mkdir()
    fit_to_the_end(run_config(tmp_path / "base", image_dataset, limit_val_batches=0), tmp_path / "base" / "run")
    args, run = run_config(tmp_path, image_dataset, limit_val_batches=0), tmp_path / "run"
    requeue_at(args, run, "train", 1, 3)
    fit_to_the_end(args, run)
    assert logged(run, "train_loss") == logged(tmp_path / "base" / "run", "train_loss")


def test_a_damaged_random_state_in_a_checkpoint_is_a_warning_not_a_crash(monkeypatch):
    from spherinator.submit.requeue import RequeueOnSignal

    callback = RequeueOnSignal()
    callback.load_state_dict({"validation_cut": None, "random_state": {"at": "training", "torch": "not a tensor"}})
    before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="random generator state cannot be set"):
        callback.on_train_batch_start(None, None, None, 0)  # where a requeue after a training batch resumes
    assert torch.equal(torch.get_rng_state(), before)
    callback.on_train_batch_start(None, None, None, 1)  # said once
