"""spherinator-submit without a cluster: sweeps, resources, the dry run, checks before sbatch, and status, logs and
cancel against stand-ins for Slurm's commands (a cluster without accounting, a task that died before Python)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import spherinator.submit
import spherinator.submit.launch as launch
import spherinator.submit.monitor as monitor
from spherinator.submit import Resources, SubmitError, expand_sweep, main, parse_sweep_arg, parse_time
from spherinator.submit.resources import load_preset, parse_sbatch_extra

TINY_VAE = """\
model:
  class_path: spherinator.models.VariationalAutoencoder
  init_args:
    encoder:
      class_path: spherinator.models.ConvolutionalEncoder2D
      init_args:
        output_dim: 16
        cnn_layers:
          - class_path: spherinator.models.ConsecutiveConv2DLayer
            init_args: {{kernel_size: 4, stride: 2, padding: 1, out_channels: [4, 8]}}
    decoder:
      class_path: spherinator.models.ConvolutionalDecoder2D
      init_args:
        cnn_input_dim: [8, 8, 8]
        cnn_layers:
          - class_path: spherinator.models.ConsecutiveConvTranspose2DLayer
            init_args: {{kernel_size: 4, stride: 2, padding: 1, out_channels: [4, 3]}}
    z_dim: 3
data:
  class_path: spherinator.data.DataModule
  init_args:
    path: {data}
    columns: [data]
    batch_size: 16
    num_workers: 0
trainer:
  accelerator: cpu
  max_epochs: {epochs}
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
"""


def tiny_config(directory: Path, data: Path, epochs: int = 1) -> Path:
    """A tiny VAE for 3x32x32 images on ``data`` (the image_dataset fixture)."""
    path = directory / "tiny.yaml"
    path.write_text(TINY_VAE.format(data=data, epochs=epochs))
    return path


@pytest.fixture
def no_queue(monkeypatch: pytest.MonkeyPatch) -> list:
    """Make any attempt to build a Submitit executor or call sbatch fail the test (and record it)."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("a job was about to be queued")

    monkeypatch.setattr(launch, "_executor", refuse)
    real_run = subprocess.run

    def guarded_run(cmd, *args, **kwargs):
        if cmd and str(cmd[0]) in ("sbatch", "scancel"):
            refuse(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", guarded_run)
    return calls


FAKE_SLURM = {
    # Submitit's SlurmExecutor wants srun on the PATH (it never calls it here); sbatch keeps the script it is given.
    "srun": "exit 0\n",
    "sbatch": 'n=$(ls "$FAKE_SLURM/scripts" | wc -l); cp "$1" "$FAKE_SLURM/scripts/$n.sh"; '
    'echo "Submitted batch job $((990000 + n))"\n',
    # a cluster without accounting, as Slurm's sacct says it
    "sacct": 'echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1\n',
    # the queue as squeue.txt lists it, "id|state" per line (squeue's error when none of the ids is queued)
    "squeue": 'if [ -s "$FAKE_SLURM/squeue.txt" ]; then cat "$FAKE_SLURM/squeue.txt"; '
    'else echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; fi\n',
    "scancel": 'echo "$@" >> "$FAKE_SLURM/scancel.txt"\n',
}


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-ins for Slurm's commands first on the PATH; returns their dir (scripts/ holds what sbatch got)."""
    import submitit

    root = tmp_path / "fake-slurm"
    (root / "scripts").mkdir(parents=True)
    for name, body in FAKE_SLURM.items():
        (root / name).write_text("#!/bin/bash\n" + body)
        (root / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{root}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(root))
    submitit.SlurmJob.watcher.clear()  # states another test's jobs left in Submitit's process-wide watcher
    return root


def submitted_script(fake_slurm: Path) -> str:
    (script,) = (fake_slurm / "scripts").iterdir()
    return script.read_text()


# ------------------------------------------------------------------------------------------------ sweeps


def test_sweep_flags_make_a_grid_with_readable_names():
    tasks = expand_sweep(["model.init_args.z_dim=3,8", "model.init_args.beta=1e-3,1e-2"])
    assert [t.params for t in tasks] == [
        {"model.init_args.z_dim": "3", "model.init_args.beta": "1e-3"},
        {"model.init_args.z_dim": "3", "model.init_args.beta": "1e-2"},
        {"model.init_args.z_dim": "8", "model.init_args.beta": "1e-3"},
        {"model.init_args.z_dim": "8", "model.init_args.beta": "1e-2"},
    ]
    assert [t.name for t in tasks] == [
        "z_dim=3_beta=1e-3",
        "z_dim=3_beta=1e-2",
        "z_dim=8_beta=1e-3",
        "z_dim=8_beta=1e-2",
    ]
    assert [t.index for t in tasks] == [0, 1, 2, 3]
    assert tasks[3].cli_args() == ["--model.init_args.z_dim", "8", "--model.init_args.beta", "1e-2"]


def test_no_sweep_is_one_task_named_run():
    (task,) = expand_sweep()
    assert task.name == "run" and task.params == {} and task.cli_args() == []


def test_sweep_values_keep_brackets_and_quotes_together():
    assert parse_sweep_arg("trainer.devices=[0,1],[2,3]") == ("trainer.devices", ["[0,1]", "[2,3]"])
    assert parse_sweep_arg("--a.b='x,y',z") == ("a.b", ["'x,y'", "z"])


@pytest.mark.parametrize("bad", ["model.init_args.z_dim", "=3,4", "model.init_args.z_dim=3,,4"])
def test_malformed_sweep_flag_is_refused(bad):
    with pytest.raises(SubmitError, match="--sweep"):
        parse_sweep_arg(bad)


def test_same_key_swept_twice_is_refused():
    with pytest.raises(SubmitError, match="swept twice"):
        expand_sweep(["model.init_args.z_dim=3", "model.init_args.z_dim=8"])


def test_names_tell_apart_keys_with_the_same_leaf():
    tasks = expand_sweep(
        ["model.init_args.encoder.init_args.output_dim=8", "model.init_args.decoder.init_args.output_dim=9"]
    )
    assert tasks[0].name == "encoder.output_dim=8_decoder.output_dim=9"


def test_sweep_file_grid_and_list(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("model.init_args.z_dim: [3, 16]\nmodel.init_args.beta: [0.001]\n")
    tasks = expand_sweep(["trainer.max_epochs=1,2"], grid)
    assert len(tasks) == 4
    assert tasks[0].params == {"model.init_args.z_dim": "3", "model.init_args.beta": "0.001", "trainer.max_epochs": "1"}
    listed = tmp_path / "list.yaml"
    listed.write_text("- {model.init_args.z_dim: 3}\n- {model.init_args.z_dim: 8, model.init_args.beta: 0.1}\n")
    assert [t.params for t in expand_sweep(sweep_file=listed)] == [
        {"model.init_args.z_dim": "3"},
        {"model.init_args.z_dim": "8", "model.init_args.beta": "0.1"},
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model.init_args.z_dim: 3\n")
    with pytest.raises(SubmitError, match="non-empty list"):
        expand_sweep(sweep_file=bad)


# ------------------------------------------------------------------------------------------------ resources


@pytest.mark.parametrize(
    ("text", "minutes"), [("90", 90), ("1:30:00", 90), ("00:30", 1), ("2-00:00:00", 2880), ("1-12", 2160), (5, 5)]
)
def test_parse_time_reads_slurm_formats(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("bad", ["abc", "1h", "0"])
def test_parse_time_refuses_what_slurm_would(bad):
    with pytest.raises(SubmitError, match="--time"):
        parse_time(bad)


def test_multi_node_resources_become_ddp_unless_a_strategy_is_named():
    res = Resources(nodes=2, devices=1)
    assert res.trainer_settings("auto") == {"num_nodes": 2, "devices": 1, "strategy": "ddp"}
    # Named strategies (DeepSpeed, FSDP) pass through untouched.
    assert "strategy" not in res.trainer_settings("deepspeed_stage_2")
    gpu = Resources(nodes=4, gpus_per_node=4)
    assert gpu.devices == 4
    assert gpu.trainer_settings("auto") == {"num_nodes": 4, "devices": 4, "accelerator": "gpu", "strategy": "ddp"}
    assert Resources().trainer_settings("auto") == {"num_nodes": 1, "devices": 1}


def test_signal_delay_stays_below_short_limits():
    assert Resources(time=60).effective_signal_delay_s() == 90
    assert Resources(time=1).effective_signal_delay_s() == 30  # never at once for a one-minute limit
    assert Resources(time=1, signal_delay_s=45).effective_signal_delay_s() == 45


def test_presets_in_slurm_dir_load_and_unknown_ones_are_named():
    local = load_preset("local")
    assert local["partition"] == "debug"
    site = load_preset("gpu_site_example")
    assert site["time"] == 720 and site["gpus_per_node"] == 4
    with pytest.raises(SubmitError, match="available: .*local"):
        load_preset("nope")


# ------------------------------------------------------------------------------------------------ dry run + checks


DRY_RUN_ARGS = [
    "--trainer.max_epochs", "2", "--nodes", "2", "--devices", "2", "--partition", "debug", "--time", "1:30:00",
    "--parallelism", "2", "--sweep", "model.init_args.z_dim=3,8", "--sweep", "model.init_args.beta=1e-3,1e-2",
    "--sbatch-extra", "reservation=demo", "--mem", "8G", "--name", "dry", "--no-validate",
]  # fmt: skip


def test_dry_run_prints_the_executor_settings_and_configs_and_queues_nothing(tmp_path, image_dataset, capsys, no_queue):
    config = tiny_config(tmp_path, image_dataset)
    main(["-c", str(config), *DRY_RUN_ARGS, "--run-root", str(tmp_path / "runs"), "--dry-run"])
    out = capsys.readouterr().out
    import yaml

    settings = yaml.safe_load(out.split("# task 0:")[0])
    assert settings["executor"] == "submitit.SlurmExecutor" and settings["array_tasks"] == 4
    assert settings["folder"] == str(tmp_path / "runs" / "dry" / "submitit") and settings["max_num_timeout"] == 3
    assert settings["parameters"] == {
        "job_name": "dry", "nodes": 2, "ntasks_per_node": 2, "time": 90, "signal_delay_s": 90, "partition": "debug",
        "mem": "8G", "array_parallelism": 2, "additional_parameters": {"reservation": "demo"},
    }  # fmt: skip
    assert out.count("# task ") == 4
    # Each task's config: its swept values, the Trainer sized to the allocation, the run dir pinned.
    task3 = out.split("# task 3:")[1]
    assert "z_dim: 8" in task3 and "beta: 0.01" in task3
    assert "num_nodes: 2" in task3 and "devices: 2" in task3 and "strategy: ddp" in task3
    assert f"default_root_dir: {tmp_path / 'runs' / 'dry' / 'z_dim=8_beta=1e-2'}" in task3
    assert "auto_requeue: false" in task3 and "spherinator.submit.RequeueOnSignal" in task3
    assert "save_last: true" in task3 and "default_hp_metric: false" in task3
    assert no_queue == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--sweep", "model.init_args.zdim=3,8"], r"task 0 'zdim=3' \(model.init_args.zdim=3\).*zdim"),
        (["--sweep", "model.init_args.z_dim=3,abc"], r"task 1 'z_dim=abc'.*abc"),
        (["--model.init_args.beta", "not-a-number"], r"task 0 'run'.*not-a-number"),
        (["--data.init_args.path", "/nonexistent/data"], r"task 0 'run'.*/nonexistent/data"),
    ],
)
def test_bad_configs_fail_before_sbatch_naming_task_and_value(
    tmp_path, image_dataset, capsys, no_queue, args, expected
):
    config = tiny_config(tmp_path, image_dataset)
    with pytest.raises(SystemExit) as exit_info:
        main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "bad", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "spherinator-submit: error:" in err
    import re

    assert re.search(expected, err), err
    assert no_queue == [] and not (tmp_path / "runs" / "bad").exists()


def test_model_that_cannot_reconstruct_its_input_is_caught_before_sbatch(tmp_path, image_dataset, capsys, no_queue):
    config = tiny_config(tmp_path, image_dataset)
    # The decoder reaches 16x16, not the data's 32x32: building the model or the batch check must say so.
    with pytest.raises(SystemExit):
        main([
            "-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "shape",
            "--model.init_args.decoder.init_args.cnn_input_dim", "[8,4,4]",
        ])  # fmt: skip
    err = capsys.readouterr().err
    assert "task 0 'run'" in err and "32" in err
    assert no_queue == []


def test_unknown_positional_argument_and_missing_config_are_refused(tmp_path, capsys, no_queue):
    with pytest.raises(SystemExit):
        main(["-c", str(tmp_path / "missing.yaml")])
    assert "missing.yaml' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(tmp_path / "x.yaml")])
    assert "unexpected argument 'fit'" in capsys.readouterr().err


def test_submit_writes_run_dirs_and_manifest_then_calls_the_executor_once(tmp_path, image_dataset, monkeypatch):
    """With the executor faked: configs are checked, run dirs written, one array submitted, the manifest kept."""
    config = tiny_config(tmp_path, image_dataset)
    submitted: list = []

    class FakeJob:
        def __init__(self, job_id):
            self.job_id = job_id

    class FakeExecutor:
        def batch(self):
            import contextlib

            return contextlib.nullcontext()

        def submit(self, fn):
            submitted.append(fn)
            return FakeJob(f"77_{len(submitted) - 1}")

    monkeypatch.setattr(launch, "_executor", lambda folder, resources, name: FakeExecutor())
    monkeypatch.setattr(monitor, "job_states", lambda folder, ids: ({i: "PENDING" for i in ids}, None))
    main(
        ["-c", str(config), "--sweep", "model.init_args.z_dim=3,5", "--run-root", str(tmp_path / "runs"), "--name", "s"]
    )
    sweep = tmp_path / "runs" / "s"
    assert [Path(t.run_dir).name for t in submitted] == ["z_dim=3", "z_dim=5"]
    assert [t.atlas_order for t in submitted] == [launch.ATLAS_ORDER] * 2  # each task writes its atlas by default
    for name, z in (("z_dim=3", 3), ("z_dim=5", 5)):
        text = (sweep / name / "config.yaml").read_text()
        assert f"z_dim: {z}" in text and f"save_dir: {sweep / name}" in text
    _, manifest = launch.read_manifest(sweep / "z_dim=3")
    assert manifest.submissions[0].jobs == {"0": "77_0", "1": "77_1"}
    rows, _ = launch.task_rows(sweep, manifest)
    assert [(r.task, r.job, r.state) for r in rows] == [
        ("z_dim=3", "77_0", "PENDING"),
        ("z_dim=5", "77_1", "PENDING"),
    ]
    # A second submission under the same name is refused (it would mix two sweeps in one TensorBoard dir).
    with pytest.raises(SystemExit):
        main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "s"])


def test_atlas_flags_reach_the_tasks_and_a_bad_order_is_refused_before_anything_is_queued(
    tmp_path, image_dataset, monkeypatch, capsys, no_queue
):
    config = tiny_config(tmp_path, image_dataset)
    with pytest.raises(SystemExit):
        main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "a", "--atlas-order", "12"])
    assert "--atlas-order 12 is out of range: give 0..9 (or --no-atlas)" in capsys.readouterr().err
    assert no_queue == [] and not (tmp_path / "runs" / "a").exists()
    submitted: list = []
    monkeypatch.setattr(launch, "_submit", lambda tasks, sweep_dir, manifest, resources, export, atlas_order=None: (
        submitted.append((export, atlas_order)) or {"0": "1_0"}))  # fmt: skip
    for name, flags in (("b", ["--no-atlas"]), ("c", ["--atlas-order", "2"]), ("d", ["--no-export"])):
        main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", name, *flags])
    assert submitted == [(True, None), (True, 2), (False, launch.ATLAS_ORDER)]


def test_run_root_inside_the_data_is_refused_before_queueing_when_the_atlas_would_write_there(
    tmp_path, image_dataset, monkeypatch, capsys, no_queue
):
    """The atlas's catalog.parquet in RUN/atlas would be read as data by the next fit of that data (and the task's
    atlas step refuses it, after training): refused at submit. Without an atlas nothing Parquet lands there."""
    config = tiny_config(tmp_path, image_dataset)
    with pytest.raises(SystemExit):
        main(["-c", str(config), "--run-root", str(image_dataset / "runs"), "--name", "a"])
    err = capsys.readouterr().err
    assert "is inside the data under" in err and "--no-atlas" in err and "Traceback" not in err, err
    assert no_queue == [] and not (image_dataset / "runs").exists()
    submitted: list = []
    monkeypatch.setattr(launch, "_submit", lambda tasks, sweep_dir, manifest, resources, export, atlas_order=None: (
        submitted.append(atlas_order) or {"0": "1_0"}))  # fmt: skip
    try:
        main(["-c", str(config), "--run-root", str(image_dataset / "runs"), "--name", "b", "--no-atlas"])
    finally:
        shutil.rmtree(image_dataset / "runs", ignore_errors=True)  # the data is shared by the session's tests
    assert submitted == [None]


def test_data_and_run_root_given_with_a_tilde_and_data_of_one_file(tmp_path, image_dataset, monkeypatch, capsys,
                                                                   no_queue):  # fmt: skip
    """`~` is the home folder in the data path (as fit reads it) and in --run-root (a quoted ~ the shell left), so the
    run-inside-the-data check sees through it; a data path of one file reads that file only, so a run dir beside it
    is no data."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "data").symlink_to(image_dataset)
    monkeypatch.setenv("HOME", str(home))
    config = tiny_config(tmp_path, Path("~/data"))
    main(["-c", str(config), "--run-root", "~/runs", "--name", "a", "--dry-run"])  # validated: the data is found
    assert "dry run" in capsys.readouterr().err and not (tmp_path / "~").exists()
    with pytest.raises(SystemExit):
        main(["-c", str(config), "--run-root", "~/data/runs", "--name", "b", "--no-validate", "--dry-run"])
    assert "is inside the data under" in capsys.readouterr().err
    one_file = tiny_config(tmp_path, next(image_dataset.glob("*.parquet")))
    main(["-c", str(one_file), "--run-root", str(image_dataset / "runs"), "--name", "c", "--dry-run"])
    assert "dry run" in capsys.readouterr().err


def test_deepspeed_strategy_passes_the_check_and_constructs_on_cpu(tmp_path, image_dataset, capsys, no_queue):
    """Only construction can be checked on a CPU machine: DeepSpeed training itself needs CUDA GPUs."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install --no-build-isolation deepspeed)")
    from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry

    config = tiny_config(tmp_path, image_dataset)
    main([
        "-c", str(config), "--trainer.strategy", "deepspeed_stage_2", "--nodes", "2", "--gpus-per-node", "4",
        "--run-root", str(tmp_path / "runs"), "--name", "ds", "--dry-run",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "strategy: deepspeed_stage_2" in out and "accelerator: gpu" in out and "gpus_per_node: 4" in out
    strategy = StrategyRegistry.get("deepspeed_stage_2")
    assert isinstance(strategy, DeepSpeedStrategy) and strategy.config["zero_optimization"]["stage"] == 2


def test_submit_package_imports_submitit_only_when_used():
    # every task config names spherinator.submit.RequeueOnSignal: importing it must not pull in submitit
    code = "import sys, spherinator.submit; assert 'submitit' not in sys.modules, 'submitit imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    task = spherinator.submit.TrainingTask("runs/x/run")
    resubmission = task.checkpoint()  # what Submitit calls on USR2: the same task again
    assert resubmission.function.run_dir == task.run_dir


# ---- refused before anything is queued (found by an adversarial review): YAML traps in presets, sbatch options
# ---- the launcher manages, resources sbatch would refuse, aliased or colliding sweep keys, names that escape the
# ---- run root, a changed layout on --resume, and sbatch's own refusal


def _dry(tmp_path, config, *args):
    return main([
        "-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "t", "--dry-run", "--no-validate", *args
    ])  # fmt: skip


# ----------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize(("written", "minutes"), [("12:00:00", 720), ("1:30:00", 90), ("30:00", 30)])
def test_unquoted_preset_time_is_read_as_slurm_time_not_yaml_sexagesimal(tmp_path, written, minutes):
    # YAML 1.1 (PyYAML) reads unquoted 12:00:00 as the base-60 int 43200 -> 43200 *minutes* (30 days).
    preset = tmp_path / "site.yaml"
    preset.write_text(f"time: {written}\n")
    assert load_preset(str(preset))["time"] == minutes


def test_preset_with_yaml_syntax_error_is_a_submit_error_not_a_traceback(tmp_path):
    preset = tmp_path / "broken.yaml"
    preset.write_text("partition: [\n")
    with pytest.raises(SubmitError, match="broken.yaml"):
        load_preset(str(preset))


def test_preset_setup_as_a_string_is_refused_or_taken_as_one_line(tmp_path):
    # `setup: module load x` (a string) once became one batch-script line per *character*.
    preset = tmp_path / "site.yaml"
    preset.write_text("setup: module load cuda\n")
    try:
        resources = Resources(**load_preset(str(preset)))
    except SubmitError:
        return
    assert resources.submitit_parameters()["setup"] == ["module load cuda"]


@pytest.mark.parametrize("body", ["gpus_per_node: '4'\n", "parallelism: '2'\n", "sbatch_extra: [a]\n"])
def test_preset_values_of_the_wrong_type_are_submit_errors(tmp_path, body):
    preset = tmp_path / "site.yaml"
    preset.write_text(body)
    with pytest.raises(SubmitError):
        Resources(**load_preset(str(preset))).submitit_parameters()


# ----------------------------------------------------------------------------------------------- resources


@pytest.mark.parametrize(
    "kwargs",
    [
        {"signal_delay_s": -5},
        {"signal_delay_s": 0},
        {"time": 1, "signal_delay_s": 120},  # signal before the job even starts: immediate requeue loop
        {"cpus_per_task": 0},
        {"cpus_per_task": -3},
        {"mem": "lots"},
        {"mem": ""},
    ],
)
def test_resources_refuse_values_sbatch_would_reject_or_that_break_requeue(kwargs):
    with pytest.raises(SubmitError):
        Resources(**kwargs)


@pytest.mark.parametrize("item", ["time=10", "nodes=3", "ntasks-per-node=4", "array=0-9", "signal=USR1@60"])
def test_sbatch_extra_cannot_silently_override_managed_options(item):
    # `--sbatch-extra nodes=3` gives `#SBATCH --nodes=3` while trainer.num_nodes stays 1;
    # `--sbatch-extra time=10` replaces --time but the signal delay was computed for the old limit.
    with pytest.raises(SubmitError, match=item.split("=")[0]):
        parse_sbatch_extra([item])


def test_gpus_per_node_and_a_different_devices_is_a_conflict_not_silently_dropped(tmp_path, image_dataset, no_queue):
    config = tiny_config(tmp_path, image_dataset)
    with pytest.raises(SystemExit):
        _dry(tmp_path, config, "--gpus-per-node", "2", "--devices", "4")


# ----------------------------------------------------------------------------------------------- sweeps / names


def test_aliased_keys_swept_twice_are_refused():
    # model.z_dim and model.init_args.z_dim are the same parameter for jsonargparse: both were swept,
    # the later won, and tasks 'model.z_dim=3_model.z_dim=4' / 'model.z_dim=8_model.z_dim=4' both trained z_dim=4.
    with pytest.raises(SubmitError, match="z_dim"):
        expand_sweep(["model.init_args.z_dim=3,8", "model.z_dim=4"])


def test_task_names_are_unique_even_when_a_value_looks_like_a_suffix():
    names = [t.name for t in expand_sweep(["data.init_args.columns=[x_1],[x],[ x]"])]  # [x] and [ x] both read x
    assert len(set(names)) == len(names), names  # the suffix _1 must not repeat the first name


@pytest.mark.parametrize("name", [".", ".."])
def test_sweep_name_cannot_escape_the_run_root(tmp_path, image_dataset, name, no_queue):
    # `--name ..` once passed the name check and put sweep.json and the task dirs beside the run root.
    config = tiny_config(tmp_path, image_dataset)
    with pytest.raises(SystemExit):
        main(["-c", str(config), "--name", name, "--run-root", str(tmp_path / "runs"), "--dry-run", "--no-validate"])


def test_bad_inline_override_names_its_value(tmp_path, image_dataset, capsys, no_queue):
    config = tiny_config(tmp_path, image_dataset)
    with pytest.raises(SystemExit):
        main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "b", "--trainer.max_epochs", "two"])
    err = capsys.readouterr().err
    # was: "... Errors: - Expected a <class 'int'>" -- the value 'two' is cut off by compose._error_text
    assert "two" in err, err


@pytest.mark.parametrize(
    ("override", "says"),
    [
        # was: "Parser key "model": Does not validate against any of the Union subtypes Subtypes: [...] Errors: -
        # Problem with given class_path ...": jsonargparse's nesting, where `spherinator fit` names the key
        (
            ["--model.init_args.z_dim", "abc"],
            "model.init_args.z_dim: Expected an int. Got value: abc (see spherinator fit --help)",
        ),
        # was: "Does not validate against any of the Union subtypes Subtypes: [<class '...LightningDataModule'>, ...]
        # Errors: - batch_size=0 must be at least 1"
        (["--data.init_args.batch_size", "0"], "batch_size=0 must be at least 1"),
        # was: the dry run passed, and the task would have failed on the cluster
        (
            ["--trainer.max_epochs", "-2"],
            "trainer: `max_epochs` must be a non-negative integer or -1. You passed in -2.",
        ),
        (['--trainer.max_time={"hourz": 1}'], "trainer: 'hourz' is an invalid keyword argument for __new__()"),
    ],
)
def test_a_bad_value_in_a_task_reads_as_spherinator_fit_says_it(
    tmp_path, image_dataset, capsys, no_queue, override, says
):
    config = tiny_config(tmp_path, image_dataset)
    with pytest.raises(SystemExit):
        main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "b", *override])
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"error: task 0 'run': {says}"), err
    assert len(err.splitlines()) == 1 and "Union" not in err, err


# ----------------------------------------------------------------------------------------------- submit / resume


class _FakeJob:
    def __init__(self, job_id):
        self.job_id = job_id


class _FakeExecutor:
    def __init__(self):
        self.submitted = []

    def batch(self):
        return contextlib.nullcontext()

    def submit(self, fn):
        self.submitted.append(fn)
        return _FakeJob(f"77_{len(self.submitted) - 1}")


def test_sbatch_failure_is_reported_without_a_traceback(tmp_path, image_dataset, monkeypatch, capsys):
    from submitit.core.utils import FailedJobError

    class Refusing(_FakeExecutor):
        def submit(self, fn):
            raise FailedJobError("sbatch: error: invalid account or account/partition combination specified")

    monkeypatch.setattr(launch, "_executor", lambda folder, resources, name: Refusing())
    config = tiny_config(tmp_path, image_dataset)
    with pytest.raises(SystemExit) as info:
        main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "s", "--no-validate",
              "--account", "nope"])  # fmt: skip
    assert info.value.code == 2
    assert "invalid account" in capsys.readouterr().err


def test_resume_with_another_layout_is_refused(tmp_path, image_dataset, monkeypatch, capsys):
    executor = _FakeExecutor()
    monkeypatch.setattr(launch, "_executor", lambda folder, resources, name: executor)
    monkeypatch.setattr(monitor, "job_states", lambda folder, ids: ({i: "TIMEOUT" for i in ids}, None))
    config = tiny_config(tmp_path, image_dataset)
    sweep = tmp_path / "runs" / "s"
    main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "s", "--no-validate"])
    # sbatch would ask for 2 nodes while the task's config says num_nodes 1: DDP rendezvous would break
    with pytest.raises(SystemExit) as info:
        main(["--resume", str(sweep), "--nodes", "2"])
    assert info.value.code == 2
    assert "nodes 1 -> 2" in capsys.readouterr().err
    assert len(executor.submitted) == 1  # only the first submission


def test_resume_honours_a_preset_given_with_it(tmp_path, image_dataset, monkeypatch):
    executor = _FakeExecutor()
    monkeypatch.setattr(launch, "_executor", lambda folder, resources, name: executor)
    monkeypatch.setattr(monitor, "job_states", lambda folder, ids: ({i: "TIMEOUT" for i in ids}, None))
    config = tiny_config(tmp_path, image_dataset)
    main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "s", "--no-validate"])
    main(["--resume", str(tmp_path / "runs" / "s"), "--preset", "local"])
    _, manifest = launch.read_manifest(tmp_path / "runs" / "s")
    assert manifest.submissions[-1].resources["partition"] == "debug"  # the preset, not the last submission


def test_status_of_a_missing_dir_says_it_does_not_exist(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["status", str(tmp_path / "nope")])
    assert re.search(r"does not exist|no such", capsys.readouterr().err, re.I)


def test_a_value_swept_twice_and_a_sweep_file_typo_are_named(tmp_path):
    with pytest.raises(SubmitError, match="'model.init_args.z_dim' sweeps 3 twice"):
        expand_sweep(["model.init_args.z_dim=3,8,3"])
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("model.init_args.z_dim: [3, 8]\nmodel.init_args.beta: [1e-3\n")
    with pytest.raises(SubmitError, match=r"sweep.yaml' is not valid YAML \(line 3, column 1\)"):
        expand_sweep(sweep_file=sweep_file)


# ------------------------------------------------------------------------------- values that reach the sbatch script
# Submitit writes each value into an `#SBATCH --key='value'` line: a line break there ends the directive, and
# the rest of the value ran as shell on the compute node (`--partition 'gpu\nrm -rf ~'`).

INJECTED = "x\ntouch /tmp/spherinator-injected #"


def _script_lines(script: str) -> list[str]:
    """The `# Parameters` block of an sbatch script, split only where bash splits lines."""
    return script.split("# Parameters")[1].split("# setup")[0].split("# command")[0].strip().split("\n")


@pytest.mark.parametrize(
    "args",
    [
        ["--partition", INJECTED], ["--account", INJECTED], ["--qos", INJECTED], ["--constraint", INJECTED],
        ["--mem", INJECTED], ["--time", INJECTED], ["--sbatch-extra", f"comment={INJECTED}"],
        ["--sbatch-extra", f"comment{INJECTED}=1"], ["--partition", "gpu\rx"], ["--partition", "gpu\x1b[2J"],
        ["PRESET", 'partition: "gpu\\ntouch /tmp/spherinator-injected #"\n'],
        ["PRESET", 'sbatch_extra: {comment: "a\\ntouch /tmp/spherinator-injected #"}\n'],
        ["RUN_ROOT", INJECTED],
    ],
)  # fmt: skip
@pytest.mark.parametrize("dry_run", [True, False])
def test_control_characters_in_script_values_are_refused_in_one_line(
    tmp_path, image_dataset, capsys, no_queue, args, dry_run
):
    config = tiny_config(tmp_path, image_dataset)
    run_root = tmp_path / "runs"
    if args[0] == "PRESET":
        (tmp_path / "site.yaml").write_text(args[1])
        args = ["--preset", str(tmp_path / "site.yaml")]
    elif args[0] == "RUN_ROOT":
        run_root, args = tmp_path / args[1], []
    argv = ["-c", str(config), "--run-root", str(run_root), "--name", "t", "--no-validate", *args]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--dry-run"] if dry_run else argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("spherinator-submit: error: ") and ("\\n" in line or "\\r" in line or "\\x1b" in line)
    assert captured.out == ""  # nothing was shown as if it would be submitted
    assert no_queue == [] and not run_root.exists()


def test_quotes_spaces_and_hashes_reach_the_script_as_one_directive(tmp_path, image_dataset, fake_slurm):
    import shlex

    config = tiny_config(tmp_path, image_dataset)
    value = 'it\'s #1 of "two" runs'
    main(["-c", str(config), "--run-root", str(tmp_path / "my runs"), "--name", "t", "--no-validate",
          "--sbatch-extra", f"comment={value}", "--constraint", "[rack1*2&rack2*4]"])  # fmt: skip
    lines = _script_lines(submitted_script(fake_slurm))
    assert all(line.startswith("#SBATCH --") for line in lines), lines
    (comment,) = [line for line in lines if line.startswith("#SBATCH --comment=")]
    assert shlex.split(comment.removeprefix("#SBATCH --comment=")) == [value]
    assert "#SBATCH --constraint='[rack1*2&rack2*4]'" in lines


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"partition": "gpu x"}, r"--partition 'gpu x' is not a partition name"),
        ({"partition": "gpu'x"}, "is not a partition name"),
        ({"account": "a;b"}, r"--account 'a;b' is not an account name"),
        ({"qos": "$(id)"}, "is not a QOS name"),
        ({"constraint": "a100 | v100"}, "is not a feature expression"),
        ({"constraint": "[a100|v100"}, "is not a feature expression"),
        ({"constraint": "a100&"}, "is not a feature expression"),
        ({"mem": "16B"}, "is not a Slurm memory size"),  # sbatch reads B only after a unit
        ({"partition": "gpu\tx"}, r"holds '\\t'"),
    ],
)
def test_slurm_values_follow_slurms_grammar(kwargs, expected):
    with pytest.raises(SubmitError, match=expected):
        Resources(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"partition": "gpu,cpu"}, {"constraint": "(a100|h100)&ib"}, {"constraint": "[rack1*2&rack2*4]"},
        {"mem": "0"}, {"mem": "4000M"}, {"mem": "16gb"}, {"account": "proj_a-1.x"},
    ],
)  # fmt: skip
def test_valid_slurm_values_pass(kwargs):
    Resources(**kwargs)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("n=8", r"'n' is sbatch's short option -n; .*write ntasks=VALUE"),  # was `#SBATCH --n=8`
        ("J=x", "short option -J"),
        ("nod=2", r"'nod' is not an sbatch option; did you mean nodes\?"),  # sbatch reads --nod=2 as --nodes=2
        ("reservaton=x", r"did you mean reservation\?"),
        ("foo=1", "'foo' is not an sbatch option"),
    ],
)
def test_sbatch_extra_takes_only_real_long_option_names(item, expected):
    with pytest.raises(SubmitError, match=expected):
        parse_sbatch_extra([item])


@pytest.mark.parametrize(
    "item",
    ["gpus-per-task=2", "tres-per-task=gres/gpu:2", "gres=gpu:4", "gres=gres/gpu:a100:2,nvme:1", "gpus=8",
     "gpus-per-socket=1", "ntasks-per-gpu=1", "ntasks-per-tres=1", "gpus-per-node=4"],
)  # fmt: skip
def test_gpu_layout_options_in_sbatch_extra_point_to_the_launchers_flags(item):
    # `--gpus-per-node 4 --sbatch-extra gpus-per-task=2` passed: the Trainer ran 4 processes per node while
    # sbatch handed out GPUs per task.
    with pytest.raises(SubmitError, match="--gpus-per-node"):
        parse_sbatch_extra([item])


def test_gpu_layout_in_a_preset_sbatch_extra_is_refused_and_other_gres_pass(tmp_path):
    preset = tmp_path / "site.yaml"
    preset.write_text("gpus_per_node: 4\nsbatch_extra: {gpus_per_task: 1}\n")
    with pytest.raises(SubmitError, match="gpus-per-task.*--gpus-per-node"):
        Resources(**load_preset(str(preset)))
    assert Resources(sbatch_extra=parse_sbatch_extra(["gres=nvme:1"])).sbatch_extra == {"gres": "nvme:1"}


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("tasks-per-node=4", "use --devices"),  # an alias of --ntasks-per-node
        ("no-requeue", "use --max-requeues 0"),
        ("open-mode=truncate", "the run dir's logs"),
        ("parsable", "reads the job id"),
        ("quiet", "reads the job id"),
        ("test-only", "nothing would be queued"),
        ("wait", "would not return"),
        ("wrap=hostname", "writes the batch script itself"),
        ("clusters=other", "local cluster"),
    ],
)
def test_sbatch_options_that_break_the_launcher_are_refused(item, expected):
    with pytest.raises(SubmitError, match=expected):
        parse_sbatch_extra([item])


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"reservation": True}, "reservation needs a value"),
        ({"reservation": ""}, "empty value"),
        ({"hold": "yes"}, "--hold takes no value"),
        ({"exclusive": None}, "has the value None"),
        ({"exclusive": False}, "has the value False"),
        ({"comment": ["a", "b"]}, r"has the value \['a', 'b'\]"),
        ({"comment": "a\\b"}, r"holds '\\\\'"),  # sbatch's reader drops the backslash
    ],
)
def test_sbatch_extra_values_are_what_the_option_takes(extra, expected):
    with pytest.raises(SubmitError, match=expected):
        Resources(sbatch_extra=extra)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"mem": "8G", "sbatch_extra": {"mem_per_cpu": "4G"}}, "'mem-per-cpu' and --mem 8G exclude each other"),
        ({"mem": "8G", "sbatch_extra": {"mem_per_gpu": "4G"}}, "'mem-per-gpu' and --mem 8G"),
        ({"cpus_per_task": 2, "sbatch_extra": {"cpus_per_gpu": 4}}, "'cpus-per-gpu' and --cpus-per-task 2"),
    ],
)
def test_sbatch_extra_that_sbatch_refuses_beside_a_launcher_flag(kwargs, expected):
    with pytest.raises(SubmitError, match=expected):
        Resources(**kwargs)


def test_one_spelling_per_sbatch_option_the_command_line_winning(tmp_path, image_dataset, fake_slurm):
    # a preset's `mail-type` and the command line's `mail_type` were two #SBATCH lines
    preset = tmp_path / "site.yaml"
    preset.write_text("sbatch_extra: {mail-type: END}\n")
    config = tiny_config(tmp_path, image_dataset)
    main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "t", "--no-validate",
          "--preset", str(preset), "--sbatch-extra", "mail_type=FAIL"])  # fmt: skip
    mail = [line for line in _script_lines(submitted_script(fake_slurm)) if "mail" in line]
    assert mail == ["#SBATCH --mail-type=FAIL"]


@pytest.mark.parametrize(("name", "expected"), [("runs%j", "holds '%'"), ("ru\\ns", r"holds '\\\\'")])
def test_run_roots_sbatch_would_read_otherwise_are_refused(tmp_path, image_dataset, capsys, no_queue, name, expected):
    config = tiny_config(tmp_path, image_dataset)
    with pytest.raises(SystemExit):
        main(["-c", str(config), "--run-root", str(tmp_path / name), "--name", "t", "--dry-run", "--no-validate"])
    (line,) = capsys.readouterr().err.splitlines()
    assert re.search(expected, line) and "--run-root" in line


def test_resume_of_a_sweep_dir_with_a_line_break_is_refused(tmp_path, capsys, no_queue):
    sweep = tmp_path / "x\ntouch injected #"
    sweep.mkdir()
    (sweep / "sweep.json").write_text('{"name": "t", "tasks": []}')
    with pytest.raises(SystemExit):
        main(["--resume", str(sweep), "--dry-run"])
    (line,) = capsys.readouterr().err.splitlines()
    assert "the sweep dir" in line and "#SBATCH line" in line


# ----------------------------------------------------------------------------------------------- what is submitted


def test_the_script_submitit_submits_has_what_the_dry_run_showed(tmp_path, image_dataset, capsys, fake_slurm):
    config = tiny_config(tmp_path, image_dataset)
    main(["-c", str(config), *DRY_RUN_ARGS, "--run-root", str(tmp_path / "runs"), "--dry-run"])
    import yaml

    shown = yaml.safe_load(capsys.readouterr().out.split("# task 0:")[0])
    main(["-c", str(config), *DRY_RUN_ARGS, "--run-root", str(tmp_path / "runs")])
    script = submitted_script(fake_slurm)
    lines = _script_lines(script)
    params = dict(shown["parameters"])
    for key in ("job_name", "nodes", "ntasks_per_node", "time", "partition", "mem"):
        assert f"#SBATCH --{key.replace('_', '-')}={params[key]}" in lines, (key, lines)
    assert f"#SBATCH --signal=USR2@{params['signal_delay_s']}" in lines
    assert f"#SBATCH --array=0-{shown['array_tasks'] - 1}%{params['array_parallelism']}" in lines
    assert "#SBATCH --reservation=demo" in lines
    assert shown["python"] in script and shown["folder"] in script
    _, manifest = launch.read_manifest(tmp_path / "runs" / "dry")
    assert manifest.submissions[0].jobs == {str(i): f"990000_{i}" for i in range(4)}


# ----------------------------------------------------------------------------------------------- status, logs, cancel

DIED_BEFORE_PYTHON = (
    "bash: line 1: /gone/venv/bin/python: No such file or directory\n"
    "srun: error: node1: task 0: Exited with exit code 127\n"
)


def three_task_sweep(tmp_path: Path, image_dataset: Path) -> Path:
    """A sweep of three tasks submitted (to the fake sbatch) as array 990000: task 0 runs (squeue lists it, its
    summary says 2 requeues and 10 minutes), task 1 completed and left the queue, task 2 died before Python started
    (no summary; Slurm's stderr file says why)."""
    from spherinator.submit.records import OnnxResult, RunSummary

    config = tiny_config(tmp_path, image_dataset)
    main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "s", "--no-validate",
          "--sweep", "model.init_args.beta=1e-4,1e-3,1e-2"])  # fmt: skip
    sweep = tmp_path / "runs" / "s"
    running = RunSummary().start_attempt("990000_0", "node1", None, None, None)
    running.attempt_started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 600))
    running.requeues, running.epoch = 2, 7
    running.save(sweep / "beta=1e-4")
    done = RunSummary().start_attempt("990000_1", "node2", None, None, None).completed(OnnxResult(validated=True))
    done.save(sweep / "beta=1e-3")
    (sweep / "submitit" / "990000_2_0_log.err").write_text(DIED_BEFORE_PYTHON)
    (sweep / "submitit" / "990000_2_0_log.out").write_text("")
    return sweep


def test_status_without_accounting_asks_squeue_and_shows_time_requeues_and_the_error(
    tmp_path, image_dataset, capfd, fake_slurm
):
    sweep = three_task_sweep(tmp_path, image_dataset)
    (fake_slurm / "squeue.txt").write_text("990000_0|RUNNING\n")
    capfd.readouterr()
    main(["status", str(sweep), "--json"])
    content = json.loads(capfd.readouterr().out)
    rows = {t["task"]: t for t in content["tasks"]}
    assert [rows[n]["state"] for n in ("beta=1e-4", "beta=1e-3", "beta=1e-2")] == ["RUNNING", "COMPLETED", "ENDED"]
    assert rows["beta=1e-4"]["requeues"] == 2 and 600 <= rows["beta=1e-4"]["elapsed_s"] < 3600
    assert rows["beta=1e-2"]["error"] == "bash: line 1: /gone/venv/bin/python: No such file or directory"
    assert rows["beta=1e-3"]["error"] is None and rows["beta=1e-3"]["onnx"] is True
    assert "accounting storage is disabled" in content["note"] and "squeue" in content["note"]

    main(["status", str(sweep)])
    captured = capfd.readouterr()  # sacct's own complaint (on file descriptor 2) is in the note, not beside it
    header, *lines = captured.out.splitlines()[1:]
    assert header.split() == [
        "TASK", "JOB", "STATE", "EPOCH", "ELAPSED", "REQUEUES", "BEST", "SPHERE", "ONNX", "ATLAS", "ERROR"
    ]  # fmt: skip
    assert re.match(r"beta=1e-4\s+990000_0\s+RUNNING\s+7\s+0:1\d:\d\d\s+2\s", lines[0]), lines[0]
    assert lines[2].endswith("No such file or directory")
    (note,) = captured.err.splitlines()
    assert note.startswith("note: sacct did not know 3 job(s) (sacct: error: Slurm accounting storage is disabled)")


def test_logs_show_slurms_files_of_a_task_that_died_before_python(tmp_path, image_dataset, capsys, fake_slurm):
    sweep = three_task_sweep(tmp_path, image_dataset)
    capsys.readouterr()
    main(["logs", str(sweep), "beta=1e-2"])
    out = capsys.readouterr().out
    assert f"==> {sweep / 'submitit' / '990000_2_0_log.err'} <==\n{DIED_BEFORE_PYTHON}" in out
    main(["logs", str(sweep / "beta=1e-2"), "--tail", "1"])  # a task's run dir names the task
    assert capsys.readouterr().out.splitlines()[-1] == "srun: error: node1: task 0: Exited with exit code 127"
    main(["logs", str(sweep), "0"])  # by index; its job has not written any log yet
    assert "(not written yet: job 990000_0 has not started)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["logs", str(sweep)])
    err = capsys.readouterr().err
    assert "has 3 tasks; name one" in err and "beta=1e-4, beta=1e-3, beta=1e-2" in err


def test_logs_takes_a_task_by_its_swept_values(tmp_path, image_dataset, capsys, fake_slurm):
    """In a grid, `logs SWEEP beta=1e-4,z_dim=3` names the task of those values; one value shared by several tasks
    lists them."""
    config = tiny_config(tmp_path, image_dataset)
    main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "g", "--no-validate",
          "--sweep", "model.init_args.z_dim=3,4", "--sweep", "model.init_args.beta=1e-4,1e-3"])  # fmt: skip
    sweep = tmp_path / "runs" / "g"
    capsys.readouterr()
    main(["logs", str(sweep), "beta=1e-3,z_dim=4"])
    assert "(not written yet: job 990000_3 has not started)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["logs", str(sweep), "beta=1e-4"])
    assert "'beta=1e-4' names 2 tasks of sweep g: z_dim=3_beta=1e-4, z_dim=4_beta=1e-4; name one" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["logs", str(sweep), "beta=1e-2"])
    assert "sweep g has no task 'beta=1e-2'" in capsys.readouterr().err


def test_cancel_cancels_only_the_tasks_still_queued_or_running(tmp_path, image_dataset, capsys, fake_slurm):
    sweep = three_task_sweep(tmp_path, image_dataset)
    (fake_slurm / "squeue.txt").write_text("990000_0|RUNNING\n")
    main(["cancel", str(sweep)])
    assert (fake_slurm / "scancel.txt").read_text().split() == ["990000_0"]
    assert "cancelled 1 task(s): 990000_0" in capsys.readouterr().out


# A sweep as the code before typed records wrote it (sweep.json by hand): status must still read it.
OLD_MANIFEST = {
    "name": "old", "cwd": "/tmp", "configs": ["/tmp/tiny.yaml"], "overrides": [], "export": True, "atlas_order": 4,
    "tasks": [{"index": 0, "name": "beta=1e-3", "params": {"model.init_args.beta": "1e-3"},
               "launcher_changes": ["trainer.num_nodes: 1 -> 1"]}],
    "code_version": "sha256:0123456789abcdef",
    "submissions": [{"time": "2026-01-01T00:00:00", "jobs": {"0": "990000_0"}, "resources": {"time": 60}}],
}  # fmt: skip
OLD_SUMMARY = {
    "state": "COMPLETED", "attempts": 1, "requeues": 0, "job_id": "990000_0", "host": "node1",
    "started": "2026-01-01T00:00:00", "attempt_started": "2026-01-01T00:00:00", "earlier_attempts_s": 0.0,
    "attempt_ended": "2026-01-01T00:10:00", "epoch": 3, "global_step": 12, "metrics": {"val_loss": 0.5},
    "best": {"monitor": "val_loss", "value": 0.5, "checkpoint": "x.ckpt", "kind": "monitored"},
    "onnx": {"checkpoint": "x.ckpt", "path": "onnx", "validated": True, "graphs": ["decoder", "encoder"]},
    "atlas": {"written": False, "path": None, "skipped": "a 4-d latent space is no sphere"},
}  # fmt: skip


def old_sweep(tmp_path: Path, summary: dict | None = None, manifest: dict | None = None) -> Path:
    """A sweep dir of one task as the code before typed records left it, with the given summary.json."""
    sweep = tmp_path / "runs" / "old"
    (sweep / "beta=1e-3").mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps(manifest or OLD_MANIFEST, indent=2))
    (sweep / "beta=1e-3" / "summary.json").write_text(json.dumps(summary or OLD_SUMMARY, indent=2))
    return sweep


def one_error_line(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run ``spherinator-submit ARGS``; it must exit 2 with one line ``spherinator-submit: error: ...``."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("spherinator-submit: error: "), line
    return line


def test_a_sweep_written_by_the_old_code_still_shows_its_status(tmp_path, capsys, fake_slurm):
    sweep = old_sweep(tmp_path)
    main(["status", str(sweep), "--json"])
    (row,) = json.loads(capsys.readouterr().out)["tasks"]
    assert (row["state"], row["epoch"], row["onnx"], row["best"]["value"]) == ("COMPLETED", 3, True, 0.5)
    assert row["atlas"]["skipped"] == "a 4-d latent space is no sphere" and row["params"] == {
        "model.init_args.beta": "1e-3"
    }
    main(["status", str(sweep / "beta=1e-3")])
    assert re.search(r"beta=1e-3\s+990000_0\s+COMPLETED\s+3\s.*val_loss=0.5\s.*yes\s+n/a", capsys.readouterr().out)


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["cancel"], ["logs"], ["--resume"]])
def test_a_cut_short_sweep_json_is_one_line_naming_the_file(tmp_path, capsys, fake_slurm, no_queue, command):
    sweep = old_sweep(tmp_path)
    text = (sweep / "sweep.json").read_text()
    (sweep / "sweep.json").write_text(text[: len(text) // 2])
    line = one_error_line(capsys, *command[:1], str(sweep), *command[1:])
    assert f"'{sweep / 'sweep.json'}' is not valid JSON" in line and "cut short" in line


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda m: m["tasks"][0].update(params=["beta"]), "'tasks[0].params' is [\"beta\"], not dict[str, str]"),
        (lambda m: m["tasks"][0].pop("name"), "has no 'tasks[0].name'"),
        (lambda m: m.update(tasks={"0": "beta"}), "'tasks' is"),
        (lambda m: m["submissions"][0].update(jobs={"0": 990000}), "'submissions[0].jobs' is"),
        (lambda m: m["tasks"][0].update(name="../../etc"), "'tasks[0].name' '../../etc' is not a task's dir name"),
        (lambda m: m["submissions"][0].update(jobs={"0": "--me"}), "'submissions[0].jobs' holds '--me'"),
    ],
)
def test_a_hand_edited_sweep_json_names_the_bad_key(tmp_path, capsys, fake_slurm, no_queue, edit, key):
    manifest = json.loads(json.dumps(OLD_MANIFEST))
    edit(manifest)
    sweep = old_sweep(tmp_path, manifest=manifest)
    for command in ("status", "cancel"):
        line = one_error_line(capsys, command, str(sweep))
        assert str(sweep / "sweep.json") in line and key in line, line
    assert not (fake_slurm / "scancel.txt").exists()


def test_a_sweep_json_that_is_a_list_or_a_dir_is_one_line(tmp_path, capsys, fake_slurm):
    sweep = old_sweep(tmp_path)
    (sweep / "sweep.json").write_text("[1, 2]\n")
    assert "its content is list, not a mapping" in one_error_line(capsys, "status", str(sweep))
    (sweep / "sweep.json").unlink()
    (sweep / "sweep.json").mkdir()
    assert "cannot be read" in one_error_line(capsys, "status", str(sweep))


def test_resume_with_resources_the_manifest_cannot_hold_is_one_line(tmp_path, capsys, fake_slurm, no_queue):
    manifest = json.loads(json.dumps(OLD_MANIFEST))
    manifest["submissions"][0]["resources"] = {"time": 60, "gpus": 4}
    sweep = old_sweep(tmp_path, summary={"state": "FAILED"}, manifest=manifest)
    assert "hold an unknown key 'gpus'" in one_error_line(capsys, "--resume", str(sweep))
    manifest["submissions"][0]["resources"] = {"time": 0}
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    line = one_error_line(capsys, "--resume", str(sweep))
    assert "the last submission's resources are not valid" in line and "time" in line


def test_a_nan_or_null_best_value_shows_and_status_json_stays_json(tmp_path, capfd, fake_slurm):
    """A diverged run records NaN: the table says nan, --json says null (NaN is no JSON), a null is read back."""
    for value in (float("nan"), None):
        summary = json.loads(json.dumps(OLD_SUMMARY))
        summary["best"]["value"] = value
        summary["metrics"] = {"val_loss": value, "val_coverage": value}
        sweep = old_sweep(tmp_path / str(value), summary=summary)
        main(["status", str(sweep)])
        out = capfd.readouterr().out
        assert "val_loss=nan" in out and "coverage nan" in out, out
        main(["status", str(sweep), "--json"])

        def refuse(constant: str) -> None:
            raise AssertionError(f"status --json printed {constant}, which is not JSON")

        (row,) = json.loads(capfd.readouterr().out, parse_constant=refuse)["tasks"]
        assert row["best"]["value"] is None and row["sphere"] == {"val_coverage": None}


def test_a_summary_json_a_task_writes_is_strict_json(tmp_path):
    from spherinator.submit.records import Best, RunSummary

    summary = RunSummary().progress(1, 4, {"val_loss": float("nan"), "train_loss": 1.0}, Best("val_loss", float("inf")))
    summary.save(tmp_path)
    content = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert content["metrics"] == {"val_loss": None, "train_loss": 1.0} and content["best"]["value"] is None
    assert RunSummary.load(tmp_path).best == Best("val_loss", None)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[1, 2]", "its content is list, not a mapping"),
        ('{"state": "RUNNING", "best": {"monitor": "val_loss", "value": "low"}}', "'best.value' is \"low\""),
        ('{"state": "RUNNING", "best": "val_loss"}', "'best' is \"val_loss\", not"),
        ('{"state": "RUNNING", "earlier_attempts_s": "ten"}', "'earlier_attempts_s' is \"ten\""),
        ('{"state": "RUNNING", "epoch": 7, "onnx": true}', "'onnx' is true"),
        ('{"state": "COMPLETED", "atlas": {"written": "yes"}}', "'atlas.written' is \"yes\", not bool"),
        ('{"state": "RUNN', "is not valid JSON"),
    ],
)
def test_a_damaged_summary_json_is_named_in_its_row_and_the_others_still_show(
    tmp_path, image_dataset, capfd, fake_slurm, content, expected
):
    sweep = three_task_sweep(tmp_path, image_dataset)
    (sweep / "beta=1e-3" / "summary.json").write_text(content)
    (fake_slurm / "squeue.txt").write_text("990000_0|RUNNING\n")
    capfd.readouterr()
    main(["status", str(sweep), "--json"])
    rows = {t["task"]: t for t in json.loads(capfd.readouterr().out)["tasks"]}
    assert str(sweep / "beta=1e-3" / "summary.json") in rows["beta=1e-3"]["error"]
    assert expected in rows["beta=1e-3"]["error"], rows["beta=1e-3"]["error"]
    assert rows["beta=1e-4"]["epoch"] == 7 and rows["beta=1e-4"]["error"] is None
    main(["cancel", str(sweep)])  # the task with the damaged summary does not stop the others' cancel
    assert (fake_slurm / "scancel.txt").read_text().split() == ["990000_0"]


def test_logs_of_a_log_file_that_cannot_be_read_says_so(tmp_path, image_dataset, capsys, fake_slurm):
    sweep = three_task_sweep(tmp_path, image_dataset)
    (sweep / "submitit" / "990000_2_0_log.out").unlink()
    (sweep / "submitit" / "990000_2_0_log.out").mkdir()  # something else where Slurm's log file should be
    capsys.readouterr()
    main(["logs", str(sweep), "beta=1e-2"])
    out = capsys.readouterr().out
    assert "(cannot be read: Is a directory)" in out and DIED_BEFORE_PYTHON in out


def test_status_of_a_file_or_a_dir_without_a_sweep_names_it(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    for given in (tmp_path / "plain", tmp_path / "plain" / "notes.txt"):
        assert f"'{given}' holds no sweep.json" in one_error_line(capsys, "status", str(given))


STARTUP_PROBE = """
import sys
from spherinator.submit import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("HEAVY", sorted(m for m in ("torch", "lightning", "jsonargparse") if m in sys.modules))
"""


@pytest.mark.parametrize("command", [["status", "SWEEP"], ["status", "SWEEP", "--json"], ["cancel", "SWEEP"],
                                     ["logs", "SWEEP", "1", "--tail", "5"], ["--help"]])  # fmt: skip
def test_status_cancel_logs_and_help_import_neither_torch_nor_lightning(tmp_path, image_dataset, fake_slurm, command):
    sweep = tmp_path / "runs" / "s" if command[0] != "--help" else None
    if sweep is not None:
        three_task_sweep(tmp_path, image_dataset)
    args = [str(sweep) if a == "SWEEP" else a for a in command]
    run = subprocess.run([sys.executable, "-c", STARTUP_PROBE, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "HEAVY []" in run.stdout, run.stdout[-2000:]
    assert "usage" in run.stdout or "sweep s" in run.stdout or "==>" in run.stdout or "cancel" in run.stdout


# ----------------------------------------------------------------------------------------------- loggers of a sweep


def test_wandb_runs_are_named_by_task_and_grouped_by_sweep(tmp_path, image_dataset):
    from spherinator.submit.compose import compose_task

    pytest.importorskip("wandb", reason="wandb not installed (pip install -e '.[wandb]')")
    config = tiny_config(tmp_path, image_dataset)
    overlay = tmp_path / "wandb.yaml"
    overlay.write_text("trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.WandbLogger\n"
                       "    init_args: {project: spherinator}\n")  # fmt: skip
    loggers = []
    for task in expand_sweep(["model.init_args.beta=1e-4,1e-3"]):
        composed = compose_task(
            [str(config), str(overlay)], [], task, Resources(), tmp_path / "zbeta" / task.name, "zbeta", validate=False
        )

        loggers.append(yaml.safe_load(composed.text)["trainer"]["logger"]["init_args"])
    # the names were cut at the last '-': both tasks were 'zbeta-beta=1e'
    assert [(lg["name"], lg["group"], lg["id"]) for lg in loggers] == [
        ("beta=1e-4", "zbeta", "zbeta-beta=1e-4"),
        ("beta=1e-3", "zbeta", "zbeta-beta=1e-3"),
    ]


def test_a_tasks_swept_values_reach_tensorboards_hparams_tab(tmp_path, image_dataset, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    from spherinator.cli import SpherinatorCLI
    from tests.test_checkpoints import run_config

    monkeypatch.chdir(tmp_path)
    params = {"model.init_args.beta": "1e-3", "optimizer.init_args.lr": "0.01", "data.init_args.batch_size": "16",
              "model.init_args.encoder.init_args.norm": "null"}  # fmt: skip
    args = run_config(tmp_path, image_dataset, epochs=1)
    # The swept values as spherinator-submit writes them into the task's config: RequeueOnSignal's `swept`.
    run_yaml = Path(args[-1])
    config = yaml.safe_load(run_yaml.read_text())
    (requeue,) = [cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("RequeueOnSignal")]
    requeue["init_args"] = {"swept": params}
    run_yaml.write_text(yaml.safe_dump(config))
    SpherinatorCLI(args=["fit", *args, *[t for k, v in params.items() if k != "model.init_args.encoder.init_args.norm"
                                         for t in (f"--{k}", v)]])  # fmt: skip
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    hparams = metadata.parse_session_start_info_plugin_data(content).hparams
    assert {key: hparams[key].WhichOneof("kind") for key in hparams} == {
        "beta": "number_value", "lr": "number_value", "batch_size": "number_value", "norm": "string_value"
    }  # fmt: skip
    assert (hparams["beta"].number_value, hparams["lr"].number_value, hparams["batch_size"].number_value) == (
        0.001,
        0.01,
        16,
    )
    assert "val_loss" in events.Tags()["scalars"]  # the metric the HParams tab shows beside them


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m.update(tasks=[]), "'tasks' is empty"),  # (before: status's TypeError traceback)
        (lambda m: m["tasks"].append(dict(m["tasks"][0], index=1)), "have the same name 'beta=1e-3'"),
        (lambda m: m["tasks"].append(dict(m["tasks"][0], name="b")), "have the same index 0"),
        (lambda m: m["tasks"][0].update(index=-5), "'tasks[0].index' is -5"),
    ],
)
def test_a_sweep_json_without_tasks_or_with_one_task_twice_is_one_line(tmp_path, capsys, fake_slurm, no_queue, edit,
                                                                        expected):  # fmt: skip
    # (before: two tasks of one name were both resumed into one run dir, two of one index shared one Slurm job)
    manifest = json.loads(json.dumps(OLD_MANIFEST))
    edit(manifest)
    sweep = old_sweep(tmp_path, summary={"state": "FAILED"}, manifest=manifest)
    for command in (["status"], ["cancel"], ["--resume"]):
        assert expected in one_error_line(capsys, command[0], str(sweep))


@pytest.mark.parametrize("written", ["Infinity", "NaN", "1e400", "-Infinity"])
def test_a_summary_with_an_infinite_time_shows_no_time_not_a_traceback(tmp_path, capsys, fake_slurm, written):
    # (before: OverflowError / ValueError from int(round(inf)) in the table)
    text = json.dumps(OLD_SUMMARY).replace('"earlier_attempts_s": 0.0', f'"earlier_attempts_s": {written}')
    sweep = old_sweep(tmp_path)
    (sweep / "beta=1e-3" / "summary.json").write_text(text)
    main(["status", str(sweep)])
    assert re.search(r"beta=1e-3\s+990000_0\s+COMPLETED\s+3\s+-\s", capsys.readouterr().out)


def test_json_nested_too_deep_is_one_line(tmp_path, capsys, fake_slurm):
    # (before: RecursionError's traceback)
    sweep = old_sweep(tmp_path)
    (sweep / "sweep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nests its values too deep" in one_error_line(capsys, "status", str(sweep))


def test_logs_tail_beyond_any_file_shows_the_whole_file(tmp_path, capsys, fake_slurm):
    # (before: OverflowError: Python int too large to convert to C ssize_t)
    sweep = old_sweep(tmp_path)
    (sweep / "submitit").mkdir()
    (sweep / "submitit" / "990000_0_0_log.err").write_text("one\ntwo\n")
    main(["logs", str(sweep), "--tail", str(10**20)])
    assert "one\ntwo\n" in capsys.readouterr().out


def test_a_file_in_place_of_a_tasks_run_dir_is_named_and_not_resumed(tmp_path, capsys, fake_slurm, no_queue):
    # (before: the task showed as never started and --resume queued it, to fail on the cluster)
    sweep = old_sweep(tmp_path, summary={"state": "FAILED"})
    shutil.rmtree(sweep / "beta=1e-3")
    (sweep / "beta=1e-3").write_text("not a dir")
    main(["status", str(sweep), "--json"])
    (row,) = json.loads(capsys.readouterr().out)["tasks"]
    assert row["error"] == f"'{sweep / 'beta=1e-3'}' is a file, where the task's run dir goes; move it away"
    assert "is a file, where task beta=1e-3's run dir goes" in one_error_line(capsys, "--resume", str(sweep))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "model.init_args.beta: [1]\nmodel.init_args.beta: [2]\n",
            "model.init_args.beta is given twice (lines 1 and 2)",
        ),
        ("model.init_args.z_dim: [010, 3]\n", "010 has a leading zero, which YAML reads as the octal number 8"),
        ("- {}\n- {}\n", "tasks 0 and 1 of the sweep set the same values"),
        ("- {model.init_args.beta: 0.001}\n- {model.beta: 1.0e-3}\n", "tasks 0 and 1 of the sweep set the same values"),
    ],
)
def test_a_sweep_file_is_read_as_strictly_as_a_config_and_gives_each_task_once(tmp_path, text, expected):
    # (before: the second key won without a word, 010 became 8, and identical tasks were queued)
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(SubmitError, match=re.escape(expected)):
        expand_sweep(sweep_file=path)


def test_swept_values_of_one_number_and_a_line_break_are_refused():
    with pytest.raises(SubmitError, match="sweeps 1e-3 and 0.001, one number, which makes identical tasks"):
        expand_sweep(["model.init_args.beta=1e-3,0.001"])
    with pytest.raises(SubmitError, match=r"holds the control character '\\n'"):
        expand_sweep(["model.init_args.beta=1\n2,3"])
    assert len(expand_sweep(["model.init_args.beta=1e-3,1e-2", "model.init_args.norm=nan,inf"])) == 4


def test_a_run_root_that_is_a_file_or_a_file_in_a_run_dirs_place_is_one_line(tmp_path, image_dataset, capsys,
                                                                             fake_slurm):  # fmt: skip
    # (before: NotADirectoryError's traceback when the run dirs were made; the dry run said all was well)
    config = tiny_config(tmp_path, image_dataset)
    (tmp_path / "afile").write_text("x")
    for dry in (["--dry-run"], []):
        line = one_error_line(capsys, "-c", str(config), "--run-root", str(tmp_path / "afile"), "--name", "s",
                              "--no-validate", *dry)  # fmt: skip
        assert f"--run-root '{tmp_path / 'afile'}': '{tmp_path / 'afile'}' is a file" in line
    (tmp_path / "runs" / "s").mkdir(parents=True)
    (tmp_path / "runs" / "s" / "run").write_text("x")  # where the task's run dir goes
    with pytest.raises(SystemExit) as exit_info:  # after the tasks were composed (their progress lines)
        main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "s", "--no-validate"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        exit_info.value.code == 2
        and f"cannot write the run dirs in '{tmp_path / 'runs' / 's'}'" in line
        and "nothing was queued" in line
    )
    assert not list((fake_slurm / "scripts").iterdir())
