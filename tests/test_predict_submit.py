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
from tests.test_submit import TINY_VAE, fake_slurm, no_queue  # noqa: F401 (fixtures)

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


# ------------------------------------------------------------------------------ what the last adversarial pass found
def encoder_of_input(path: Path, shape: list, node: tuple | None = None, outputs: int = 1) -> None:
    """An ONNX graph ``encoder.onnx`` in ``path`` taking ``x`` of ``shape`` (None: a free axis) to each row's values
    flattened (one location per row), or to what ``node`` (op, attributes) gives; ``outputs`` copies of it."""
    import onnx
    from onnx import TensorProto, helper

    op, attributes = node or ("Flatten", {"axis": 1})
    names = ["location"] + [f"copy{i}" for i in range(1, outputs)]
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["location"], **attributes)]
        + [helper.make_node("Identity", ["location"], [name]) for name in names[1:]],
        "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names],
    )
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path / "encoder.onnx"))


def test_a_garbage_onnx_encoder_is_refused_before_anything_is_queued(trained, tmp_path, fake_slurm, capsys):  # noqa: F811
    """Not an ONNX file, an empty one, a graph that takes other images than the data's: one line at submit, nothing
    queued (the task would fail only after its wait in the queue)."""
    config, checkpoint = trained
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "encoder.onnx").write_text("not an onnx file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "encoder.onnx").write_bytes(b"")
    encoder_of_input(tmp_path / "gray", [None, 1, 32, 32])  # one channel where the data has three
    encoder_of_input(tmp_path / "flat", [None, 3072])  # a rank-2 input
    cases = [
        ("garbage", "does not open in onnxruntime"), ("empty", "does not open in onnxruntime"),
        ("gray", "encoder.onnx takes x [None, 1, 32, 32], the data gives batches of [16, 3, 32, 32]"),
        ("flat", "encoder.onnx takes x [None, 3072], the data gives batches of [16, 3, 32, 32]"),
    ]  # fmt: skip
    for name, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "-c", str(config), "--ckpt_path", str(checkpoint), "--onnx", str(tmp_path / name),
                  "--name", name, "--run-root", str(tmp_path / "runs")])  # fmt: skip
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and f"--onnx {tmp_path / name}" in err, err
    assert not list((fake_slurm / "scripts").iterdir()) and not (tmp_path / "runs").exists()
    encoder_of_input(tmp_path / "fits", [None, 3, 32, 32])  # a graph of the data's input is accepted
    main(["predict", "-c", str(config), "--ckpt_path", str(checkpoint), "--onnx", str(tmp_path / "fits"),
          "--name", "fits", "--run-root", str(tmp_path / "runs")])  # fmt: skip
    assert len(list((fake_slurm / "scripts").iterdir())) == 1


def hand_made_shards(out: Path) -> None:
    """Shard 0 left out, shard 1 an empty file, shard 2 no Parquet file, shard 3 a Parquet file of fewer rows and
    shard 4 one of the right count but other row ids (as a copy of another shard would be)."""
    import pyarrow as pa

    (out / "shard-00001.parquet").write_bytes(b"")
    (out / "shard-00002.parquet").write_text("id,location\n1,2\n")
    pq.write_table(pa.table({"location": [0.0] * 3, "row": pa.array([60, 61, 62], pa.int64())}),
                   out / "shard-00003.parquet")  # fmt: skip
    plan = read_embedding_set(out)
    other = pa.array(np.arange(plan.shards[4].rows, dtype=np.int64))  # shard 0's ids
    pq.write_table(pa.table({"location": [0.0] * len(other), "row": other}), out / "shard-00004.parquet")


def test_status_and_resume_count_a_hand_made_shard_as_not_written(trained, tmp_path, fake_slurm, capsys):  # noqa: F811
    """A shard file counts as written only when its Parquet footer holds the manifest's rows (and row ids, by its
    statistics): `status` names the others and `--resume` writes them again."""
    config, checkpoint = trained
    main(["predict", "-c", str(config), "--ckpt_path", str(checkpoint), "--tasks", "6", "--name", "emb",
          "--run-root", str(tmp_path / "runs")])  # fmt: skip
    sweep = tmp_path / "runs" / "emb"
    out = sweep / "embeddings"
    _, loaded = launch.read_manifest(sweep)
    launch._predict_tasks(loaded)(5)()  # shard 5 written whole by its task
    hand_made_shards(out)
    plan = read_embedding_set(out)
    assert [s.index for s in plan.written(out)] == [5]
    damaged = plan.damaged(out)
    assert sorted(damaged) == [f"shard-0000{k}.parquet" for k in (1, 2, 3, 4)], damaged
    assert "not a Parquet file" in damaged["shard-00001.parquet"] and "not a Parquet" in damaged["shard-00002.parquet"]
    assert damaged["shard-00003.parquet"] == "3 rows where the manifest has 17"
    assert damaged["shard-00004.parquet"] == "row ids 0..15 where the manifest has 68..83"
    capsys.readouterr()
    main(["status", str(sweep)])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("embeddings:"))
    assert line.startswith(f"embeddings: 1/6 shards, 16/{ROWS} rows in {out} (shard-00001.parquet and 3 more not "
                           "whole: not a Parquet file"), line  # fmt: skip
    main(["--resume", str(sweep)])
    assert list(json.loads((sweep / "sweep.json").read_text())["submissions"][1]["jobs"]) == ["0", "1", "2", "3", "4"]
    assert "resubmitted 5 shard(s) not yet written whole" in capsys.readouterr().out
    assert predict.write_shard(out, 4, ["-c", str(config)], str(checkpoint))["skipped"] is False  # redone by its task
    assert read_embedding_set(out).damage(out, plan.shards[4]) is None


def test_resume_of_a_training_sweep_says_what_its_tasks_do(tmp_path, fake_slurm, capsys, monkeypatch):  # noqa: F811
    """Not "from their last checkpoints": a task without one starts anew."""
    from spherinator.submit.records import Manifest, ManifestTask, write_manifest

    sweep = tmp_path / "runs" / "train"
    (sweep / "a").mkdir(parents=True)
    write_manifest(sweep, Manifest([ManifestTask(0, "a")], name="train", cwd=str(tmp_path)))
    monkeypatch.setattr(launch, "_submit", lambda *args, **kwargs: {"0": "990000_0"})
    main(["--resume", str(sweep)])
    out = capsys.readouterr().out
    assert "from their last checkpoints" not in out
    assert "resubmitted 1 task(s), each resuming from the newest checkpoint in its run dir (or starting anew" in out


# ------------------------------------------------------------------------ --predict: embedding inside a training task
def run_dir_of(trained: tuple[Path, Path], tmp_path: Path) -> Path:
    config, _ = trained
    run = tmp_path / "runs" / "sweep" / "task"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config.read_text() + "ckpt_path: null\nweights_only: null\n")  # as fit saves it
    return run


def test_embed_run_writes_the_set_and_a_requeue_redoes_only_the_shards_not_written(trained, tmp_path, monkeypatch):
    """The step after training: the set `spherinator-submit predict` writes, in RUN/embeddings, shard after shard in
    one process; a requeue mid-shard (SystemExit) and the next attempt write only the shards not yet whole."""
    _, checkpoint = trained
    run = run_dir_of(trained, tmp_path)
    real, calls = predict._batch_rows, []

    def requeued_in_the_third_shard(batch):
        calls.append(1)
        if len(calls) > 5:  # shards of 2, 2 and 1 batches of 16 rows: the 6th batch is in the third shard
            raise SystemExit(-1)  # what Submitit's USR2 handler raises once it has requeued the task
        return real(batch)

    monkeypatch.setattr(predict, "_batch_rows", requeued_in_the_third_shard)
    with pytest.raises(SystemExit):
        predict.embed_run(run, str(checkpoint), shards=4)
    out = run / "embeddings"
    assert sorted(p.name for p in out.iterdir()) == [EMBEDDING_SET_NAME, "shard-00000.parquet", "shard-00001.parquet"]
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    monkeypatch.setattr(predict, "_batch_rows", real)
    result = predict.embed_run(run, str(checkpoint), shards=4)
    assert (result.shards, result.planned, result.rows, result.error) == (4, 4, ROWS, None)
    assert {p: (out / p).stat().st_mtime_ns for p in first} == first  # the shards written whole are left alone
    assert sorted(row_ids_of(out)) == list(range(ROWS))
    plan = read_embedding_set(out)
    assert plan.checkpoint == str(checkpoint) and len(plan.shards) == 4
    assert pq.read_table(out / "shard-00000.parquet").column_names == ["location", "scale", "id", "row"]
    assert predict.embeddings_line(str(out))[0] == f"embeddings: 4/4 shards, {ROWS}/{ROWS} rows in {out}"


def retrained_copy(checkpoint: Path, path: Path) -> None:
    """Write at ``path`` a checkpoint of the same run whose model's weights moved (what training on writes)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["state_dict"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, path)


def test_embed_run_plans_anew_when_its_checkpoint_file_was_rewritten(trained, tmp_path):
    """The same path, another model (last.ckpt after a resume trained on): the shards of the old model are not kept
    as if the new one had written them."""
    import shutil

    _, checkpoint = trained
    run = run_dir_of(trained, tmp_path)
    last = tmp_path / "last.ckpt"
    shutil.copy(checkpoint, last)
    predict.embed_run(run, str(last), shards=2)
    before = pq.read_table(run / "embeddings" / "shard-00000.parquet")
    retrained_copy(checkpoint, last)
    assert predict.embed_run(run, str(last), shards=2).shards == 2
    after = pq.read_table(run / "embeddings" / "shard-00000.parquet")
    assert not np.allclose(np.stack(before["location"].to_numpy(zero_copy_only=False)),
                           np.stack(after["location"].to_numpy(zero_copy_only=False)))  # fmt: skip


def test_a_predict_shard_is_not_written_by_a_checkpoint_rewritten_since_the_set_was_planned(trained, tmp_path):
    """A predict sweep over a checkpoint that training still writes would embed its shards with different models:
    the shards not yet written are refused, naming the checkpoint; those written whole stay."""
    import shutil

    from spherinator.errors import DataError
    from spherinator.runs import build

    config, checkpoint = trained
    ckpt = tmp_path / "last.ckpt"
    shutil.copy(checkpoint, ckpt)
    args = ["-c", str(config)]
    out = tmp_path / "embeddings"
    out.mkdir()
    plan = predict.plan_embedding_set(build(args, str(ckpt))[1], 2)
    plan.encoded_by(str(ckpt))
    write_embedding_set(out, plan)
    predict.write_shard(out, 0, args, str(ckpt))
    retrained_copy(checkpoint, ckpt)
    with pytest.raises(DataError, match=r"last\.ckpt. changed since this embedding set was planned"):
        predict.write_shard(out, 1, args, str(ckpt))
    assert predict.write_shard(out, 0, args, str(ckpt))["skipped"]
    assert sorted(p.name for p in out.glob("*.parquet")) == ["shard-00000.parquet"]


def test_a_predict_sweep_whose_checkpoint_changed_is_told_by_status_refused_by_resume_and_by_its_tasks(
    trained, tmp_path, fake_slurm, capsys, monkeypatch  # noqa: F811
):  # fmt: skip
    """status says why the shards left cannot be written, --resume refuses before queueing tasks that would fail,
    a checkpoint deleted is named as such, and one written again while a task reads it is caught after the read."""
    import shutil

    import spherinator.runs
    from spherinator.errors import DataError

    config, checkpoint = trained
    ckpt = tmp_path / "last.ckpt"
    shutil.copy(checkpoint, ckpt)
    main(["predict", "-c", str(config), "--ckpt_path", str(ckpt), "--tasks", "3", "--name", "emb",
          "--run-root", str(tmp_path / "runs")])  # fmt: skip
    sweep, args = tmp_path / "runs" / "emb", ["-c", str(config)]
    out = sweep / "embeddings"
    _, loaded = launch.read_manifest(sweep)
    launch._predict_tasks(loaded)(0)()
    real_build = spherinator.runs.build

    def rewritten_while_read(*a, **k):  # training wrote last.ckpt again while the task loaded it
        built = real_build(*a, **k)
        retrained_copy(checkpoint, ckpt)
        return built

    monkeypatch.setattr(spherinator.runs, "build", rewritten_while_read)
    with pytest.raises(DataError, match="changed since this embedding set was planned"):
        predict.write_shard(out, 1, args, str(ckpt))
    monkeypatch.setattr(spherinator.runs, "build", real_build)
    assert sorted(p.name for p in out.glob("*.parquet")) == ["shard-00000.parquet"]
    capsys.readouterr()
    main(["status", str(sweep)])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("embeddings:"))
    assert "last.ckpt' changed since this embedding set was planned" in line and "copy it" in line, line
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(sweep)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "changed since this embedding set was planned" in err, err
    assert len(json.loads((sweep / "sweep.json").read_text())["submissions"]) == 1  # nothing queued
    ckpt.unlink()
    with pytest.raises(DataError, match="last.ckpt', which embeds this set, no longer exists"):
        predict.write_shard(out, 2, args, str(ckpt))


def test_embed_run_plans_anew_for_another_checkpoint(trained, tmp_path):
    """A set of another checkpoint's model (the task trained on after a --resume) is not mixed with this one's."""
    import shutil

    _, checkpoint = trained
    run = run_dir_of(trained, tmp_path)
    other = tmp_path / "other.ckpt"
    shutil.copy(checkpoint, other)
    predict.embed_run(run, str(other), shards=2)
    assert predict.embed_run(run, str(checkpoint), shards=3).shards == 3
    assert read_embedding_set(run / "embeddings").checkpoint == str(checkpoint)
    assert len(list((run / "embeddings").glob("*.parquet"))) == 3


def test_a_task_requeued_while_it_embeds_goes_on_embedding_without_training_again(trained, tmp_path, monkeypatch):
    """A TrainingTask whose summary says EMBEDDING (trained, exported, requeued mid-embedding) neither fits nor
    exports again: it writes the shards not yet whole and completes, keeping the export's result."""
    from spherinator.submit import TrainingTask
    from spherinator.submit.records import OnnxResult, RunSummary

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the task pops rendezvous variables
    monkeypatch.chdir(tmp_path)
    _, checkpoint = trained
    run = run_dir_of(trained, tmp_path)
    onnx = OnnxResult(True, str(checkpoint), str(run / "onnx"), graphs=["encoder"])
    summary = RunSummary(attempts=1).embedding(onnx, None)
    summary.requeued().save(run)  # as TrainingTask.checkpoint records a requeue while the task embeds
    assert RunSummary.load(run).state == "EMBEDDING" and RunSummary.load(run).requeues == 1
    job = TrainingTask(run, tmp_path, export=True, predict=2)
    assert job.checkpoint().function.predict == 2  # a requeue embeds again
    monkeypatch.setattr(TrainingTask, "_fit", lambda *args: pytest.fail("the task trained again"))
    monkeypatch.setattr(TrainingTask, "_export", lambda *args: pytest.fail("the task exported again"))
    done = job()
    assert done["state"] == "COMPLETED" and done["attempts"] == 2 and done["onnx"]["checkpoint"] == str(checkpoint)
    assert done["embeddings"]["rows"] == ROWS and done["embeddings"]["shards"] == 2, done["embeddings"]
    assert sorted(row_ids_of(run / "embeddings")) == list(range(ROWS))


def test_predict_flags_reach_the_training_tasks(tmp_path, image_dataset, monkeypatch, capsys, no_queue):  # noqa: F811
    from tests.test_submit import tiny_config

    config = tiny_config(tmp_path, image_dataset)
    refused = [
        (["--predict-shards", "2"], "--predict-shards 2: give a number >= 1, with --predict"),
        (["--predict", "--predict-shards", "0"], "--predict-shards 0: give a number >= 1"),
    ]
    for flags, message in refused:
        with pytest.raises(SystemExit):
            main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "a", *flags])
        assert message in capsys.readouterr().err
    made: list = []
    monkeypatch.setattr(launch, "_queue", lambda make, indices, *args: made.extend(make(i) for i in indices) or {})
    for name, flags in (("b", []), ("c", ["--predict"]), ("d", ["--predict", "--predict-shards", "5"])):
        main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", name, "--no-atlas", *flags])
    assert [task.predict for task in made] == [None, 0, 5]


# ----------------------------------------------------------------------- what the adversarial pass of --predict found
@pytest.mark.parametrize(
    ("name", "shape", "node", "outputs", "message"),
    [
        ("fixed", [16, 3, 32, 32], None, 1, "takes [16, 3, 32, 32] and gives location"),
        ("two", [None, 3, 32, 32], None, 2, "where each batch needs a free batch axis and one output"),
        ("pooled", [None, 3, 32, 32], ("ReduceMean", {"axes": [0, 2, 3], "keepdims": 1}), 1, "gives [1, 3, 1, 1]"),
        ("scalar", [None, 3, 32, 32], ("ReduceMean", {"keepdims": 0}), 1, "gives [] for a batch of 16 rows"),
    ],
)
def test_an_onnx_encoder_the_tasks_would_fail_on_is_refused_at_submit(trained, tmp_path, name, shape, node, outputs,
                                                                      message):  # fmt: skip
    """A fixed batch axis (each shard's last batch is shorter), two outputs, a location pooled over the batch or
    not one per row: the first batch ran, and every task failed (or wrote no location per row) after its wait."""
    config, _ = trained
    encoder_of_input(tmp_path / name, shape, node, outputs)
    with pytest.raises(launch.SubmitError, match="not one location per row|free batch axis") as err:
        predict.check_onnx_encoder(tmp_path / name, DataModule(trained_data(config), batch_size=16))
    assert message in str(err.value)


def trained_data(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["data"]["init_args"]["path"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["shards"][0].update(file="../marker.txt"), "file '../marker.txt' is not a plain .parquet name"),
        (lambda m: m["shards"][0].update(file="/abs/marker.parquet"), "is not a plain .parquet name"),
        (lambda m: m["shards"][1].update(file=m["shards"][0]["file"]), "is not a plain .parquet name of its own"),
        (lambda m: m.update(shards=[]), "'rows' is 100 where the shards hold 0"),
        (lambda m: m["shards"].pop(), "'rows' is 100 where the shards hold 75"),
        (lambda m: m["shards"][1]["segments"][0].update(row=20), "row 20 is in two shards"),
        (lambda m: m["shards"][0].update(index=1), "shard 0 has index 1"),
        (lambda m: m["shards"][0].update(rows=30), "shard 0 has 'rows' 30"),
        (lambda m: m["shards"][0]["segments"][0].update(file=7), "of row group 0 of file 7"),
    ],
)
def test_a_manifest_edited_by_hand_is_one_line_not_a_guide_to_write_elsewhere(trained, tmp_path, edit, message):
    """A shard file outside the set's dir (a task overwrote it), shards that lose or double rows, or a set of no
    shards (embed_run said it complete): `status` names the manifest, and embed_run plans the set anew."""
    config, checkpoint = trained
    out, _ = plan_dir(tmp_path, config, checkpoint, tasks=4)
    content = json.loads((out / EMBEDDING_SET_NAME).read_text())
    edit(content)
    (out / EMBEDDING_SET_NAME).write_text(json.dumps(content))
    with pytest.raises(launch.SubmitError, match="it was edited by hand") as err:
        read_embedding_set(out)
    assert message in str(err.value)
    assert predict.embeddings_line(str(out))[0].startswith(f"embeddings: '{out / EMBEDDING_SET_NAME}': ")


def test_embed_run_does_not_write_outside_its_set_by_a_manifest_edited_by_hand(trained, tmp_path):
    _, checkpoint = trained
    run = run_dir_of(trained, tmp_path)
    predict.embed_run(run, str(checkpoint), shards=4)
    content = json.loads((run / "embeddings" / EMBEDDING_SET_NAME).read_text())
    content["shards"][0]["file"] = "../marker.txt"
    (run / "embeddings" / EMBEDDING_SET_NAME).write_text(json.dumps(content))
    (run / "embeddings" / "shard-00000.parquet").unlink()
    (run / "marker.txt").write_text("the user's file")
    result = predict.embed_run(run, str(checkpoint), shards=4)
    assert (run / "marker.txt").read_text() == "the user's file"
    assert (result.shards, result.planned, result.rows) == (4, 4, ROWS)
    assert sorted(row_ids_of(run / "embeddings")) == list(range(ROWS))


def test_embed_run_refuses_bad_run_dirs_in_one_line(trained, tmp_path):
    """What a task recorded as a bare FileNotFoundError, TypeError or FileExistsError (and with a link, after
    building the model), and a shard count named as the --tasks of another command."""
    from spherinator.errors import ConfigError, OutputError

    _, checkpoint = trained
    run = run_dir_of(trained, tmp_path)
    good = (run / "config.yaml").read_text()
    for text, message in ((None, "cannot be read as YAML"), ("- a list\n", "holds list, not a config"),
                          ("{{{: x\n", "cannot be read as YAML"), ("", "holds NoneType")):  # fmt: skip
        (run / "config.yaml").unlink(missing_ok=True)
        if text is not None:
            (run / "config.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            predict.embed_run(run, str(checkpoint))
    (run / "config.yaml").write_text(good)
    (run / "embeddings").write_text("in the way")
    with pytest.raises(OutputError, match="is a file, where this run's embeddings go; move it away"):
        predict.embed_run(run, str(checkpoint))
    (run / "embeddings").unlink()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
    (run / "embeddings").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="is a link"):
        predict.embed_run(run, str(checkpoint))
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "keep"
    (run / "embeddings").unlink()
    with pytest.raises(launch.SubmitError, match=f"--predict-shards {ROWS + 1}: give 1 to {ROWS}"):
        predict.embed_run(run, str(checkpoint), shards=ROWS + 1)


def test_a_row_column_of_the_data_is_not_written_twice(trained, tmp_path):
    config, checkpoint = trained
    out, args = plan_dir(tmp_path, config, checkpoint, tasks=2)
    content = json.loads((out / EMBEDDING_SET_NAME).read_text())
    content["row_column"] = "id"  # a column the data gives too
    (out / EMBEDDING_SET_NAME).write_text(json.dumps(content))
    with pytest.raises(predict.DataError, match="already have a column 'id'"):
        predict.write_shard(out, 0, args, str(checkpoint))
    assert sorted(p.name for p in out.iterdir()) == [EMBEDDING_SET_NAME]


def test_predict_after_training_is_checked_against_the_data_at_submit(tmp_path, image_dataset, capsys, no_queue):  # noqa: F811
    """More shards than rows, or run dirs inside the data (a requeued task read its shards as data): refused before
    anything is written or queued, not found by the task after training."""
    from tests.test_submit import tiny_config

    config = tiny_config(tmp_path, image_dataset)
    refused = [
        (["--predict-shards", "97"], "--predict-shards 97: give 1 to 96"),
        (["--run-root", str(image_dataset / "runs")], "is inside the data under"),
    ]
    for flags, message in refused:
        with pytest.raises(SystemExit):
            main(["-c", str(config), "--run-root", str(tmp_path / "runs"), "--name", "a", "--predict", *flags])
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists() and not (image_dataset / "runs").exists()
