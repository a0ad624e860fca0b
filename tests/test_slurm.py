"""spherinator-submit on a real Slurm cluster (``bash slurm/local_cluster.sh start``): sweeps, 2 nodes, requeue, resume.

Everything runs on this one host (two slurmd nodes), so tmp_path is the "shared storage" the jobs read and write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import spherinator
import spherinator.submit.launch as launch
import spherinator.submit.task as task
from spherinator.submit import RunSummary, main
from tests.test_submit import tiny_config

pytestmark = pytest.mark.slurm

STATE_DIR = Path(os.environ.get("SPHERINATOR_SLURM_DIR", "/var/tmp/spherinator-slurm"))


@pytest.fixture(scope="module")
def cluster():
    """SLURM_CONF of a cluster that answers (the environment's, else the local test cluster's); skip otherwise."""
    conf = os.environ.get("SLURM_CONF") or str(STATE_DIR / "etc" / "slurm.conf")
    if not Path(conf).is_file():
        pytest.skip(f"no Slurm config at {conf}: start the local cluster with: bash slurm/local_cluster.sh start")
    env = {**os.environ, "SLURM_CONF": conf}
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"no Slurm cluster answers ({err}); start one with: bash slurm/local_cluster.sh start")
    if probe.returncode != 0 or not probe.stdout.strip():
        pytest.skip(f"sinfo failed with SLURM_CONF={conf} ({probe.stderr.strip()}); bash slurm/local_cluster.sh start")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", conf)  # sbatch exports the environment: the jobs' scontrol/sacct find it too
        yield conf


def wait_for(sweep: Path, done, timeout: float, poll: float = 3.0) -> list[dict]:
    """Poll the sweep's task rows until ``done(rows)``; fail with the last rows after ``timeout`` seconds."""
    _, manifest = launch.read_manifest(sweep)
    deadline = time.monotonic() + timeout
    while True:
        rows, _ = launch.task_rows(sweep, manifest)
        if done(rows):
            return rows
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-2000:] for p in sorted(sweep.glob("submitit/*.err"))[-2:])
            pytest.fail(f"timed out after {timeout}s: {[(r.task, r.state, r.epoch) for r in rows]}\n{logs}")
        time.sleep(poll)


def all_in(state: str):
    return lambda rows: all(r.state == state and r.summary_state in (state, None) for r in rows) and rows


def completed(rows: list[dict]) -> bool:
    return all(r.state == "COMPLETED" and r.summary_state == "COMPLETED" for r in rows)


def submit(tmp_path: Path, config: Path, name: str, *args: str, atlas_order: int | None = None) -> Path:
    """Submit a sweep; its tasks write no atlas unless ``atlas_order`` is given (the time-limit tests time training)."""
    atlas = ["--no-atlas"] if atlas_order is None else ["--atlas-order", str(atlas_order)]
    main(["-c", str(config), "--preset", "local", "--run-root", str(tmp_path / "runs"), "--name", name, *atlas, *args])
    return tmp_path / "runs" / name


def test_sweep_2x2_is_one_array_with_four_complete_run_dirs(cluster, tmp_path, image_dataset, capsys):
    config = tiny_config(tmp_path, image_dataset, epochs=2)
    sweep = submit(
        tmp_path, config, "grid", "--time", "10", "--parallelism", "2", "--trainer.enable_progress_bar", "true",
        "--sweep", "model.init_args.z_dim=3,4", "--sweep", "model.init_args.beta=1e-3,1e-2", atlas_order=1,
    )  # fmt: skip
    scripts = list((sweep / "submitit").glob("*_submission.sh"))
    assert len(scripts) == 1 and "#SBATCH --array=0-3%2" in scripts[0].read_text()
    wait_for(sweep, completed, timeout=420)

    names = sorted(p.name for p in sweep.iterdir() if (p / "config.yaml").exists())
    assert names == ["z_dim=3_beta=1e-2", "z_dim=3_beta=1e-3", "z_dim=4_beta=1e-2", "z_dim=4_beta=1e-3"]
    for name in names:
        run = sweep / name
        summary = json.loads((run / "summary.json").read_text())
        assert summary["state"] == "COMPLETED" and summary["epoch"] == 2
        assert summary["onnx"]["validated"] is True, summary["onnx"]
        assert {"encoder.onnx", "decoder.onnx", "reconstruction.onnx"} <= {p.name for p in (run / "onnx").iterdir()}
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert list(run.glob("events.out.tfevents.*")), "TensorBoard events belong directly in the run dir"
        assert list((run / "logs").glob("*_log.out"))
        assert f"z_dim: {name.split('_beta')[0].split('=')[1]}" in (run / "config.yaml").read_text()
        # after the export, the task's atlas: a valid HiPS and the catalog of every row, which summary.json names
        atlas = summary["atlas"]
        if name.startswith("z_dim=4"):
            assert atlas["written"] is False and "4-d latent space" in atlas["skipped"], atlas
            continue
        assert atlas["written"] is True and atlas["path"] == str(run / "atlas"), atlas
        hips = Path(atlas["path"]) / "hips"
        properties = dict(line.split("=", 1) for line in (hips / "properties").read_text().splitlines())
        assert {k.strip() for k in properties} >= {"creator_did", "hips_release_date", "hips_order", "hips_frame"}
        assert [len(list(hips.glob(f"Norder{k}/Dir0/Npix*.jpg"))) for k in (0, 1)] == [12, 48]
        assert (hips / "Norder3" / "Allsky.jpg").is_file() and (Path(atlas["path"]) / "index.html").is_file()
        assert pq.read_metadata(Path(atlas["path"]) / "catalog.parquet").num_rows == atlas["rows"] == 96
    assert (sweep / "atlas.html").read_text().count('"page": "z_dim=3_beta=') == 2  # the spheres side by side
    capsys.readouterr()
    main(["status", str(sweep)])
    table = capsys.readouterr().out.splitlines()
    assert sum(" COMPLETED " in line for line in table) == 4, table
    assert sum(bool(re.search(r"\satlas/(\s|$)", line)) for line in table) == 2, table
    assert sum(bool(re.search(r"\sn/a(\s|$)", line)) for line in table) == 2, table
    assert f"atlases: spherinator atlas serve {sweep}" in "\n".join(table)
    main(["status", str(sweep), "--json"])
    status = json.loads(capsys.readouterr().out)
    assert status["note"] is None  # sacct answered
    assert all(t["elapsed_s"] > 0 and t["requeues"] == 0 and t["error"] is None for t in status["tasks"]), status
    assert sorted(str(t["atlas"]["path"]) for t in status["tasks"] if t["atlas"]["written"]) == [
        str(sweep / n / "atlas") for n in names if n.startswith("z_dim=3")
    ]
    # Progress in the Slurm log: one line per epoch, nothing redrawn in place
    main(["logs", str(sweep), names[0]])
    log = capsys.readouterr().out
    assert "\r" not in log
    assert [line.split(":")[0] for line in log.splitlines() if line.startswith("Epoch ")] == ["Epoch 0/1", "Epoch 1/1"]


def test_a_task_that_dies_before_python_starts_says_why(cluster, tmp_path, image_dataset, capsys):
    preset = tmp_path / "broken.yaml"  # the local preset, with a setup line that fails (a module that is not there)
    preset.write_text("partition: debug\ncpus_per_task: 1\nsetup: ['ls /no/such/module || exit 3']\n")
    config = tiny_config(tmp_path, image_dataset, epochs=1)
    main(["-c", str(config), "--preset", str(preset), "--run-root", str(tmp_path / "runs"), "--name", "broken",
          "--no-validate", "--time", "5"])  # fmt: skip
    sweep = tmp_path / "runs" / "broken"
    (row,) = wait_for(sweep, lambda rows: all(r.state == "FAILED" for r in rows), timeout=180)
    assert row.summary_state is None  # the task never ran
    assert row.error == "ls: cannot access '/no/such/module': No such file or directory", row
    capsys.readouterr()
    main(["logs", str(sweep), "--tail", "5"])
    assert "ls: cannot access '/no/such/module'" in capsys.readouterr().out


PROBE = '''
import json, os
from pathlib import Path
from lightning.pytorch import Callback

class RecordIds(Callback):
    """Writes the row ids each rank trained on, with its world size and Slurm node."""
    def __init__(self):
        self.ids = []
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids += batch["id"].tolist()
    def on_train_epoch_end(self, trainer, pl_module):
        out = {"world_size": trainer.world_size, "node": os.environ.get("SLURMD_NODENAME"), "ids": self.ids}
        Path(trainer.default_root_dir, f"ids_rank{trainer.global_rank}.json").write_text(json.dumps(out))
'''


def test_two_nodes_train_with_world_size_two_on_disjoint_data(cluster, tmp_path, image_dataset, monkeypatch):
    (tmp_path / "rankprobe.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))  # the local check builds the callback too
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    overlay = tmp_path / "probe.yaml"
    overlay.write_text(
        "data:\n  init_args:\n    columns: [data, id]\n    return_dict: true\n"
        "trainer:\n  callbacks:\n    - class_path: rankprobe.RecordIds\n"
    )
    config = tiny_config(tmp_path, image_dataset, epochs=1)
    main([
        "-c", str(config), "-c", str(overlay), "--preset", "local", "--nodes", "2", "--time", "10",
        "--run-root", str(tmp_path / "runs"), "--name", "ddp", "--atlas-order", "1",
    ])  # fmt: skip
    sweep = tmp_path / "runs" / "ddp"
    wait_for(sweep, completed, timeout=300)
    ranks = [json.loads((sweep / "run" / f"ids_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert {r["node"] for r in ranks} == {"node1", "node2"}
    ids0, ids1 = set(ranks[0]["ids"]), set(ranks[1]["ids"])
    assert ids0 and ids1 and not ids0 & ids1, (sorted(ids0), sorted(ids1))
    assert len(ranks[0]["ids"]) == len(ids0)  # no row twice within a rank either
    atlas = RunSummary.read(sweep / "run").atlas  # rank 0 writes the atlas after a 2-node job
    assert atlas.written is True and (sweep / "run" / "atlas" / "index.html").is_file(), atlas


SLOW = """
import json, time
from pathlib import Path
from lightning.pytorch import Callback

class Slow(Callback):
    \"\"\"In a task's first attempt only: sleeps after every training batch, so that the attempt lasts at least a known
    time however fast the machine is; with ``validation``, also in every validation batch from epoch 1 on, after
    touching ``validating`` in the run dir. Later attempts (after a requeue or --resume) run at full speed.\"\"\"
    def __init__(self, seconds: float = 0.1, validation: float = 0.0):
        self.seconds, self.validation, self.first = seconds, validation, True
    def on_train_start(self, trainer, pl_module):
        summary = Path(trainer.default_root_dir, "summary.json")  # the task counts attempts before training
        self.first = not summary.is_file() or json.loads(summary.read_text()).get("attempts", 1) <= 1
    def on_train_batch_end(self, *args, **kwargs):
        if self.first:
            time.sleep(self.seconds)
    def on_validation_batch_start(self, trainer, *args, **kwargs):
        if self.first and self.validation and not trainer.sanity_checking and trainer.current_epoch >= 1:
            Path(trainer.default_root_dir, "validating").touch()
            time.sleep(self.validation)
"""


def slow_overlay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seconds: float, validation: float = 0.0) -> Path:
    """An overlay adding the Slow callback (importable by this process and, through PYTHONPATH, by the jobs)."""
    (tmp_path / "slowdown.py").write_text(SLOW)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    overlay = tmp_path / "slow.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: slowdown.Slow\n      init_args:\n"
        f"        seconds: {seconds}\n        validation: {validation}\n"
    )
    return overlay


def _events(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path))
    events.Reload()
    return events


def val_loss_steps(path: Path) -> list[int]:
    """Steps of the val_loss events in a run dir, or in one events file."""
    events = _events(path)
    return [e.step for e in events.Scalars("val_loss")] if "val_loss" in events.Tags()["scalars"] else []


def assert_one_val_loss_per_epoch(run: Path, epochs: int) -> None:
    steps = val_loss_steps(run)
    assert len(steps) == epochs and steps == sorted(set(steps)), f"each epoch logged once, steps continue: {steps}"
    assert sorted({e.value for e in _events(run).Scalars("epoch")}) == [float(e) for e in range(epochs)]


def test_short_time_limit_requeues_and_resumes_into_the_same_run(cluster, tmp_path, image_dataset, monkeypatch):
    """A 2-minute limit with the checkpoint signal 30 s before it (Slurm may send it up to 60 s earlier, so it
    lands 30-90 s into a run): the first attempt's 60 epochs take at least 6 x 0.5 s each, far longer, so the task
    is requeued however fast the machine; the later attempts are not slowed, so however slow the machine, each one
    makes progress. Where in an epoch the signal lands is chance: every epoch must still have one val_loss."""
    epochs = 60
    config = tiny_config(tmp_path, image_dataset, epochs=epochs)
    slow = slow_overlay(tmp_path, monkeypatch, 0.5)
    sweep = submit(
        tmp_path, config, "requeue", "-c", str(slow), "--time", "2", "--signal-delay", "30", "--max-requeues", "5"
    )
    wait_for(sweep, completed, timeout=560, poll=5)

    run = sweep / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["attempts"] >= 2, summary
    assert summary["resumed_from"] and summary["epoch"] == epochs
    assert (run / "checkpoints" / "requeue.ckpt").is_file()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["code", "run", "submitit"]
    # One writer per attempt, all in the run dir (an attempt signalled before its logger started writes none).
    assert 2 <= len(list(run.glob("events.out.tfevents.*"))) <= summary["attempts"]
    assert_one_val_loss_per_epoch(run, epochs)


def test_a_signal_during_a_long_validation_requeues_from_inside_it(cluster, tmp_path, image_dataset, monkeypatch):
    """A validation longer than the signal delay (3 batches of 10 s in the first attempt): the signal is acted on
    after the validation batch it lands in, and the requeued run redoes that epoch's validation in full."""
    epochs = 4
    config = tiny_config(tmp_path, image_dataset, epochs=epochs)
    slow = slow_overlay(tmp_path, monkeypatch, 0.0, validation=10.0)
    data = tmp_path / "val.yaml"
    data.write_text("data:\n  init_args:\n    val_fraction: 0.4\n")  # 38 rows: 3 validation batches of 16
    sweep = submit(tmp_path, config, "longval", "-c", str(slow), "-c", str(data), "--time", "10", "--no-export")
    run = sweep / "run"
    deadline = time.monotonic() + 300
    while not (run / "validating").exists():
        assert time.monotonic() < deadline, "the first attempt never reached epoch 1's validation"
        time.sleep(1)
    _, manifest = launch.read_manifest(sweep)
    (job,) = manifest.submissions[0].jobs.values()
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)  # as Slurm's --signal does
    wait_for(sweep, completed, timeout=400)
    summary = RunSummary.read(run)
    assert summary.requeued_during == "validation" and summary.attempts == 2 and summary.requeues == 1, summary
    assert summary.epoch == epochs
    first, *_ = sorted(run.glob("events.out.tfevents.*"))
    assert val_loss_steps(first) == [val_loss_steps(run)[0]], "the first attempt left during epoch 1's validation"
    assert_one_val_loss_per_epoch(run, epochs)


def test_a_queued_task_runs_the_code_it_was_submitted_with(cluster, tmp_path, image_dataset):
    """Submitted from the root of a checkout that is also on PYTHONPATH (as an editable install puts it on the path;
    sbatch passes the environment on to the job); the checkout is broken while the task is held in the queue: the
    task still runs the code of its submission, and says which."""
    checkout = tmp_path / "checkout"
    source = Path(spherinator.__file__).resolve().parent
    shutil.copytree(source, checkout / "spherinator", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(source.parent / "slurm" / "presets", checkout / "slurm" / "presets")  # --preset local
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")])}
    config = tiny_config(tmp_path, image_dataset, epochs=1)
    args = ["-c", str(config), "--preset", "local", "--run-root", str(tmp_path / "runs"), "--name", "held",
            "--time", "10", "--no-export", "--sbatch-extra", "hold"]  # fmt: skip
    code = "import sys; from spherinator.submit import main; main(sys.argv[1:])"
    done = subprocess.run(  # from the checkout's root, as a developer submits (jobs start in the submit dir)
        [sys.executable, "-c", code, *args], cwd=checkout, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "runs" / "held"
    init = checkout / "spherinator" / "__init__.py"
    init.write_text(init.read_text() + "\nraise RuntimeError('the edited checkout was imported')\n")
    _, manifest = launch.read_manifest(sweep)
    (job,) = manifest.submissions[0].jobs.values()
    subprocess.run(["scontrol", "release", job], check=True, timeout=30)
    wait_for(sweep, completed, timeout=300)
    summary = RunSummary.read(sweep / "run")
    assert summary.code_version == manifest.code_version
    assert summary.code_version.split()[0] == task.code_hash(sweep / "code" / "spherinator")


def test_resume_continues_a_cancelled_sweep_from_its_checkpoints(cluster, tmp_path, image_dataset, capsys, monkeypatch):
    epochs = 30
    config = tiny_config(tmp_path, image_dataset, epochs=epochs)
    slow = slow_overlay(tmp_path, monkeypatch, 0.1)  # >= 0.6 s per epoch: still running when cancelled
    sweep = submit(tmp_path, config, "cancel", "-c", str(slow), "--time", "10", "--sweep", "model.init_args.z_dim=3,4")
    wait_for(sweep, lambda rows: all((r.epoch or 0) >= 2 for r in rows), timeout=300, poll=1)
    main(["cancel", str(sweep)])
    rows = wait_for(sweep, lambda rows: all(r.state == "CANCELLED" for r in rows), timeout=120)
    stopped_at = {r.task: r.epoch for r in rows}
    assert all(epoch < epochs for epoch in stopped_at.values()), stopped_at

    main(["--resume", str(sweep)])
    wait_for(sweep, completed, timeout=420)
    _, manifest = launch.read_manifest(sweep)
    assert len(manifest.submissions) == 2
    for name in stopped_at:
        summary = json.loads((sweep / name / "summary.json").read_text())
        assert summary["epoch"] == epochs and summary["attempts"] == 2
        assert summary["resumed_from"].endswith(".ckpt"), summary
        assert summary["onnx"]["validated"] is True
        assert_one_val_loss_per_epoch(sweep / name, epochs)
    capsys.readouterr()
    main(["--resume", str(sweep)])
    assert "nothing to resume" in capsys.readouterr().out


def test_two_node_job_is_requeued_and_resumes_on_both_ranks(cluster, tmp_path, image_dataset, monkeypatch):
    """The requeue path under DDP: Slurm's signal reaches both ranks (sent here with scancel once the first epoch is
    done, as --signal sends it, to every process of the job's steps), both agree to stop, save one checkpoint
    together, and the requeued job resumes on two nodes from it up to the full epoch count. The first attempt's 12
    epochs of 3 batches of at least 1 s per rank outlast the signal; the signal of a real time limit is
    test_short_time_limit_requeues_and_resumes_into_the_same_run's."""
    epochs = 12
    config = tiny_config(tmp_path, image_dataset, epochs=epochs)
    slow = slow_overlay(tmp_path, monkeypatch, 1.0)
    sweep = submit(tmp_path, config, "requeue2", "-c", str(slow), "--nodes", "2", "--time", "10")
    run = sweep / "run"
    deadline = time.monotonic() + 300
    while not (run / "summary.json").is_file() or (RunSummary.read(run).epoch or 0) < 1:
        assert time.monotonic() < deadline, "the first attempt never finished its first epoch"
        time.sleep(1)
    _, manifest = launch.read_manifest(sweep)
    (job,) = manifest.submissions[0].jobs.values()
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    wait_for(sweep, completed, timeout=400)
    summary = RunSummary.read(run)
    assert (summary.attempts, summary.requeues, summary.epoch) == (2, 1, epochs), summary
    assert summary.resumed_from and summary.requeued_during in ("training", "validation"), summary


SLOW_TRANSFORM = """
import os, time

class SlowFirstAttempt:
    \"\"\"The identity, sleeping per batch in an array task's first run only (Slurm counts restarts), so that the
    test can kill or requeue a task while it writes its shard; the attempt that redoes it runs at full speed.\"\"\"
    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds
    def __call__(self, x):
        if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) == 0:
            time.sleep(self.seconds)
        return x
"""


SLOW_COLUMNS = '[{"name": "data", "transform": {"class_path": "slowtransform.SlowFirstAttempt"}}]'


def _predict_sweep(tmp_path: Path, image_dataset: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """A predict sweep of the 96 image rows over 2 shards (2 nodes), each of 12 batches that are slow at first."""
    from spherinator.cli import main as cli_main

    (tmp_path / "slowtransform.py").write_text(SLOW_TRANSFORM)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    config = tiny_config(tmp_path, image_dataset)
    cli_main(["fit", "-c", str(config), "--trainer.logger", "false", "--trainer.max_steps", "1",
              "--trainer.default_root_dir", str(tmp_path / "fit"), "--trainer.limit_val_batches", "0"])  # fmt: skip
    (checkpoint,) = (tmp_path / "fit" / "checkpoints").glob("*.ckpt")
    main(["predict", "-c", str(config), "--ckpt_path", str(checkpoint), "--tasks", "2", "--preset", "local",
          "--run-root", str(tmp_path / "runs"), "--name", name, "--data.init_args.batch_size", "4",
          "--data.init_args.columns", SLOW_COLUMNS])  # fmt: skip
    return tmp_path / "runs" / name


def _wait_for_partial(embeddings: Path, shard: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not list(embeddings.glob(f".{shard}.partial-*")):
        if time.monotonic() > deadline:
            pytest.fail(f"shard {shard} was not being written after {timeout}s: {sorted(os.listdir(embeddings))}")
        time.sleep(0.5)


def _every_row_once(embeddings: Path) -> None:
    names = sorted(p.name for p in embeddings.iterdir())
    assert names == ["_manifest.json", "shard-00000.parquet", "shard-00001.parquet"], names  # nothing torn left
    rows = [pq.read_table(embeddings / n, columns=["row"])["row"].to_pylist() for n in names[1:]]
    assert sorted(rows[0] + rows[1]) == list(range(96)) and len(rows[0]) == len(rows[1]) == 48


def test_predict_array_task_requeued_mid_shard_redoes_it(cluster, tmp_path, image_dataset, monkeypatch, capsys):
    sweep = _predict_sweep(tmp_path, image_dataset, monkeypatch, "embed")
    job = json.loads((sweep / "sweep.json").read_text())["submissions"][0]["jobs"]["1"]
    _wait_for_partial(sweep / "embeddings", "shard-00001.parquet", timeout=180)
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)  # killed while it writes
    wait_for(sweep, lambda rows: all(r.state == "COMPLETED" for r in rows), timeout=240)
    _every_row_once(sweep / "embeddings")
    restarts = subprocess.run(["sacct", "-j", job, "-n", "-X", "-D", "-o", "State"], capture_output=True, text=True)
    assert "REQUEUED" in restarts.stdout, restarts.stdout  # the shard was written by the second run
    capsys.readouterr()
    main(["status", str(sweep)])
    assert f"embeddings: 2/2 shards, 96/96 rows in {sweep / 'embeddings'}" in capsys.readouterr().out


def test_predict_array_task_killed_mid_shard_is_redone_by_resume(cluster, tmp_path, image_dataset, monkeypatch):
    sweep = _predict_sweep(tmp_path, image_dataset, monkeypatch, "embed-kill")
    job = json.loads((sweep / "sweep.json").read_text())["submissions"][0]["jobs"]["0"]
    _wait_for_partial(sweep / "embeddings", "shard-00000.parquet", timeout=180)
    subprocess.run(["scancel", "--signal=KILL", job], check=True, capture_output=True)  # no handler runs
    rows = wait_for(sweep, lambda rows: all(r.state in launch.FINAL for r in rows), timeout=240)
    assert [r.state for r in rows][1] == "COMPLETED" and rows[0].state != "COMPLETED", rows
    assert not (sweep / "embeddings" / "shard-00000.parquet").exists()
    main(["--resume", str(sweep)])  # only shard 0 again; its torn partial file is removed
    resubmitted = json.loads((sweep / "sweep.json").read_text())["submissions"][1]["jobs"]
    assert list(resubmitted) == ["0"], resubmitted
    wait_for(sweep, lambda rows: all(r.state == "COMPLETED" for r in rows), timeout=240)
    _every_row_once(sweep / "embeddings")
