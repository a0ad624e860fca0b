"""``spherinator-submit predict`` without Slurm: the shard plan, one shard written by a direct call of the task, a task
killed mid-shard and redone, the embedding set's manifest and ``status``. On the cluster: tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import spherinator.submit.launch as launch
import spherinator.submit.predict as predict
from spherinator.data import DataModule
from spherinator.submit import main
from spherinator.submit.records import EMBEDDING_SET_NAME, read_embedding_set, write_embedding_set
from tests.conftest import write_fast_layout
from tests.test_submit import TINY_VAE, fake_slurm  # noqa: F401 (fixture)

ROWS = 100  # not a multiple of the row groups (16) nor of the batch size


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (ROWS, 3, 32, 32), dtype=np.uint8)
    ids = 1000 + np.arange(ROWS, dtype=np.int64)  # not the row ids: the test tells them apart
    return write_fast_layout(tmp_path_factory.mktemp("data"), {"data": images, "id": ids}, files=2, rows_per_group=16)


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A config that loads ``data`` and ``id`` and a checkpoint of it after one training step."""
    from spherinator.cli import main as cli_main

    root = tmp_path_factory.mktemp("run")
    config = root / "tiny.yaml"
    text = TINY_VAE.format(data=dataset, epochs=1)
    config.write_text(text.replace("columns: [data]", "columns: [data, id]\n    return_dict: true"))
    args = ["fit", "-c", str(config), "--trainer.logger", "false", "--trainer.default_root_dir", str(root / "fit"),
            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]  # fmt: skip
    cli_main(args)
    (checkpoint,) = (root / "fit" / "checkpoints").glob("*.ckpt")
    return config, checkpoint


def row_ids_of(directory: Path) -> np.ndarray:
    return np.concatenate(
        [pq.read_table(p, columns=["row"])["row"].to_numpy() for p in sorted(directory.glob("*.parquet"))]
    )


@pytest.mark.parametrize(("tasks", "batch_size"), [(1, 16), (3, 16), (7, 5), (9, 1), (ROWS, 32)])
def test_the_shards_hold_every_row_exactly_once(dataset, tasks, batch_size):
    """Shard k is what rank k of the predict split reads, cut to its own rows: with batch_size 1 the plan repeats
    rows to even out the ranks, and those must not be doubled."""
    plan = predict.plan_embedding_set(DataModule(dataset, batch_size=batch_size), tasks)
    assert len(plan.shards) == tasks and plan.rows == ROWS
    assert [s.rows for s in plan.shards] == [ROWS // tasks + (k < ROWS % tasks) for k in range(tasks)]
    ids = np.concatenate([predict.row_ids(s) for s in plan.shards])
    assert sorted(ids) == list(range(ROWS))  # every row once, and each shard in file order
    assert all(np.all(np.diff(predict.row_ids(s)) == 1) for s in plan.shards)
    assert plan.row_groups == [[16, 16, 16, 2], [16, 16, 16, 2]] and plan.files == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]


def test_more_tasks_than_rows_is_one_line(dataset):
    with pytest.raises(launch.SubmitError, match=rf"--tasks {ROWS + 1}: give 1 to {ROWS}"):
        predict.plan_embedding_set(DataModule(dataset), ROWS + 1)


def plan_dir(tmp_path: Path, config: Path, checkpoint: Path, tasks: int) -> tuple[Path, list[str]]:
    from spherinator.runs import build

    args = ["-c", str(config)]
    _, datamodule = build(args, checkpoint)
    out = tmp_path / "embeddings"
    out.mkdir()
    write_embedding_set(out, predict.plan_embedding_set(datamodule, tasks))
    return out, args


@pytest.mark.slow
def test_shards_hold_what_spherinator_predict_writes_plus_the_row_id(trained, tmp_path):
    from spherinator.cli import main as cli_main

    config, checkpoint = trained
    out, args = plan_dir(tmp_path, config, checkpoint, tasks=3)
    for k in range(3):
        task = pickle.loads(pickle.dumps(predict.PredictTask(out, k, tmp_path, args, str(checkpoint))))  # as Submitit
        assert task()["rows"] == read_embedding_set(out).shards[k].rows
    cli_main(["predict", "-c", str(config), "--ckpt_path", str(checkpoint), "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path / "single")])  # fmt: skip
    single = pq.read_table(tmp_path / "single" / "embeddings.parquet")
    import pyarrow.dataset as ds

    shards = ds.dataset(out, format="parquet").to_table()  # the directory as one set: _manifest.json is skipped
    assert shards.column_names == [*single.column_names, "row"] == ["location", "scale", "id", "row"]
    shards = shards.sort_by("row")
    assert shards["row"].to_pylist() == list(range(ROWS)) and shards["id"].to_pylist() == single["id"].to_pylist()
    assert shards.schema.field("location").type == single.schema.field("location").type
    np.testing.assert_allclose(np.stack(shards["location"].to_numpy(zero_copy_only=False)),
                               np.stack(single["location"].to_numpy(zero_copy_only=False)), atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(shards["scale"].to_numpy(), single["scale"].to_numpy(), rtol=1e-5)


def test_a_task_killed_mid_shard_redoes_only_its_shard(trained, tmp_path, monkeypatch):
    config, checkpoint = trained
    out, args = plan_dir(tmp_path, config, checkpoint, tasks=2)
    predict.write_shard(out, 0, args, str(checkpoint))
    first = (out / "shard-00000.parquet").stat().st_mtime_ns
    (out / ".shard-00001.parquet.partial-99999").write_bytes(b"PAR1 torn")  # an attempt SIGKILLed while it wrote

    real, calls = predict._batch_rows, []

    def killed_after_two_batches(batch):
        calls.append(1)
        if len(calls) > 2:
            raise SystemExit(143)  # what a SIGTERM (scancel, requeue) raises inside the shard (exit_on_sigterm)
        return real(batch)

    monkeypatch.setattr(predict, "_batch_rows", killed_after_two_batches)
    with pytest.raises(SystemExit):
        predict.write_shard(out, 1, args, str(checkpoint))
    assert sorted(p.name for p in out.iterdir()) == [EMBEDDING_SET_NAME, "shard-00000.parquet"]  # nothing torn left
    monkeypatch.setattr(predict, "_batch_rows", real)
    assert predict.write_shard(out, 0, args, str(checkpoint))["skipped"] is True  # a whole shard is not redone
    assert predict.write_shard(out, 1, args, str(checkpoint))["skipped"] is False
    assert (out / "shard-00000.parquet").stat().st_mtime_ns == first
    assert sorted(row_ids_of(out)) == list(range(ROWS))


def test_submit_writes_the_set_and_status_shows_it(trained, tmp_path, fake_slurm, capsys, monkeypatch):  # noqa: F811
    config, checkpoint = trained
    monkeypatch.chdir(tmp_path)
    main(["predict", "-c", str(config), "--ckpt_path", str(checkpoint), "--tasks", "2", "--name", "emb",
          "--run-root", str(tmp_path / "runs"), "--partition", "debug"])  # fmt: skip
    sweep = tmp_path / "runs" / "emb"
    script = next((fake_slurm / "scripts").iterdir()).read_text()
    assert "#SBATCH --array=0-1" in script
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["shard-00000", "shard-00001"]
    assert manifest["predict"]["embeddings"] == str(sweep / "embeddings") and manifest["predict"]["rows"] == ROWS
    _, loaded = launch.read_manifest(sweep)
    launch._predict_tasks(loaded)(1)()  # the task of shard 1, called directly
    capsys.readouterr()
    main(["status", str(sweep)])
    out = capsys.readouterr().out
    assert f"embeddings: 1/2 shards, 50/{ROWS} rows in {sweep / 'embeddings'}" in out, out
    main(["status", str(sweep), "--json"])
    figures = json.loads(capsys.readouterr().out)["embeddings"]
    assert figures["missing"] == ["shard-00000.parquet"] and figures["rows_written"] == 50


def test_predict_refuses_bad_input_in_one_line(trained, tmp_path, capsys):
    config, checkpoint = trained
    cases = [
        (["--tasks", "0"], f"--tasks 0: give 1 to {ROWS}"),
        (["--nodes", "2"], "each shard is one process"),
        (["--onnx", str(tmp_path)], "no encoder.onnx there"),
        (["--data.init_args.batch_size", "0"], "batch_size=0 must be at least 1"),  # refused by the DataModule
        (["--data.init_args.batch_size", "x"], "data.init_args.batch_size"),  # a parse error of an override
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "-c", str(config), "--ckpt_path", str(checkpoint), "--run-root", str(tmp_path), *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
    assert not any(p.name == "sweep.json" for p in tmp_path.rglob("*")), "nothing written for a refused submission"
    assert os.listdir(tmp_path) == []


def test_a_sweep_inside_the_data_is_refused(trained, dataset, capsys):
    """The index reads every .parquet below the data dir: a shard written there would be data to the next task."""
    config, checkpoint = trained
    before = sorted(dataset.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "-c", str(config), "--ckpt_path", str(checkpoint), "--run-root", str(dataset), "--name", "x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is inside the data under" in err and "Traceback" not in err, err
    assert sorted(dataset.rglob("*")) == before


def test_a_code_snapshot_that_cannot_be_written_is_one_line(trained, tmp_path, fake_slurm, capsys):  # noqa: F811
    config, checkpoint = trained
    sweep = tmp_path / "runs" / "emb"
    sweep.mkdir(parents=True)
    (sweep / ".code.partial").write_text("a file in the way")  # as a full or read-only disk refuses the copy
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "-c", str(config), "--ckpt_path", str(checkpoint), "--name", "emb",
              "--run-root", str(tmp_path / "runs")])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "cannot write the code snapshot in" in err and "Traceback" not in err, err
    assert not list((fake_slurm / "scripts").iterdir())  # nothing queued


def test_a_data_file_replaced_by_another_of_the_same_size_is_told(trained, dataset, tmp_path):
    """Rows of another file in the same row groups would get the planned file's row ids."""
    import shutil

    config, checkpoint = trained
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    args = ["-c", str(config), "--data.init_args.path", str(data)]
    from spherinator.runs import build

    out = tmp_path / "embeddings"
    out.mkdir()
    write_embedding_set(out, predict.plan_embedding_set(build(args, checkpoint)[1], 2))
    (data / "part-00001.parquet").rename(data / "part-00009.parquet")
    with pytest.raises(predict.DataError, match="changed since this predict was planned"):
        predict.write_shard(out, 1, args, str(checkpoint))


def test_a_shard_not_in_the_set_or_damaged_by_hand(trained, tmp_path):
    """A shard number out of range is refused (not -1 as the last shard's); a shard file that is no Parquet file
    of its rows is written again."""
    config, checkpoint = trained
    out, args = plan_dir(tmp_path, config, checkpoint, tasks=2)
    for shard in (-1, 2):
        with pytest.raises(predict.DataError, match=f"shard {shard}: .* holds shards 0 to 1"):
            predict.write_shard(out, shard, args, str(checkpoint))
    assert sorted(p.name for p in out.iterdir()) == [EMBEDDING_SET_NAME]
    (out / "shard-00001.parquet").write_bytes(b"")
    assert predict.write_shard(out, 1, args, str(checkpoint))["skipped"] is False
    assert pq.read_metadata(out / "shard-00001.parquet").num_rows == ROWS // 2


@pytest.mark.slow
def test_onnx_shards_hold_the_locations_torch_writes(trained, tmp_path):
    """``--onnx``: the export's encoder.onnx encodes (onnxruntime); the locations are torch's, the scale is not
    written (the encoder graph gives only the location), the per-row columns and the row id are."""
    from spherinator.export import export_onnx

    config, checkpoint = trained
    export_onnx(checkpoint, tmp_path / "onnx")
    out, args = plan_dir(tmp_path, config, checkpoint, tasks=1)
    predict.write_shard(out, 0, args, str(checkpoint), str(tmp_path / "onnx"))
    by_onnx = pq.read_table(out / "shard-00000.parquet")
    (out / "shard-00000.parquet").unlink()
    predict.write_shard(out, 0, args, str(checkpoint))
    by_torch = pq.read_table(out / "shard-00000.parquet")
    assert by_onnx.column_names == ["location", "id", "row"]
    assert by_onnx["row"].to_pylist() == list(range(ROWS)) and by_onnx["id"] == by_torch["id"]
    np.testing.assert_allclose(np.stack(by_onnx["location"].to_numpy(zero_copy_only=False)),
                               np.stack(by_torch["location"].to_numpy(zero_copy_only=False)), atol=1e-5)  # fmt: skip
