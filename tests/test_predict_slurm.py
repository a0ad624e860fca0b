"""``spherinator-submit --predict`` on a real Slurm cluster (``bash slurm/local_cluster.sh start``): a training task
that embeds every row after its export, requeued by Slurm's signal while it embeds. Fixtures: tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spherinator.submit import RunSummary, main
from spherinator.submit.records import read_embedding_set
from tests.test_slurm import cluster, completed, submit, wait_for  # noqa: F401 (fixture)
from tests.test_submit import tiny_config

pytestmark = pytest.mark.slurm

SLOW_WHILE_EMBEDDING = """
import os, time
from pathlib import Path

class SlowWhileEmbedding:
    \"\"\"The identity, sleeping per batch once the task embeds (its embeddings dir exists), in its first run only
    (Slurm counts restarts): training runs at full speed, and the test can requeue the task mid-embedding.\"\"\"
    def __init__(self, embeddings: str, seconds: float = 0.5):
        self.embeddings, self.seconds = embeddings, seconds
    def __call__(self, x):
        if Path(self.embeddings).is_dir() and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) == 0:
            time.sleep(self.seconds)
        return x
"""


def _wait_for(path: Path, pattern: str, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while not (found := sorted(path.glob(pattern))):
        if time.monotonic() > deadline:
            pytest.fail(f"no {pattern} in {path} after {timeout}s: {sorted(os.listdir(path)) if path.is_dir() else []}")
        time.sleep(0.5)
    return found[0]


def test_a_training_task_requeued_while_it_embeds_writes_only_the_shards_left(
    cluster,  # noqa: F811
    tmp_path,
    image_dataset,
    monkeypatch,
    capsys,
):
    (tmp_path / "slowembed.py").write_text(SLOW_WHILE_EMBEDDING)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = tmp_path / "runs" / "fitembed" / "run"
    columns = [{"name": "data", "transform": {"class_path": "slowembed.SlowWhileEmbedding",
                                              "init_args": {"embeddings": str(run / "embeddings")}}}]  # fmt: skip
    config = tiny_config(tmp_path, image_dataset)
    sweep = submit(tmp_path, config, "fitembed", "--time", "10", "--predict", "--predict-shards", "3",
                   "--data.init_args.batch_size", "4", "--data.init_args.columns", json.dumps(columns))  # fmt: skip
    job = json.loads((sweep / "sweep.json").read_text())["submissions"][0]["jobs"]["0"]
    _wait_for(run / "embeddings", "shard-00000.parquet", timeout=300)
    _wait_for(run / "embeddings", ".shard-00001.parquet.partial-*", timeout=60)
    first = (run / "embeddings" / "shard-00000.parquet").stat().st_mtime_ns
    trained = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    assert RunSummary.load(run).state == "EMBEDDING"
    subprocess.run(["scancel", "--signal=USR2", job], check=True, capture_output=True)  # Slurm's requeue signal
    wait_for(sweep, completed, timeout=300)

    summary = RunSummary.load(run)
    assert (summary.attempts, summary.requeues, summary.epoch) == (2, 1, 1), summary
    assert summary.onnx.validated and summary.embeddings.error is None, summary
    assert (summary.embeddings.shards, summary.embeddings.rows) == (3, 96), summary.embeddings
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == trained  # not trained again
    assert (run / "embeddings" / "shard-00000.parquet").stat().st_mtime_ns == first  # nor shard 0 written again
    names = sorted(p.name for p in (run / "embeddings").iterdir())
    assert names == ["_manifest.json", "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"], names
    rows = [r for n in names[1:] for r in pq.read_table(run / "embeddings" / n, columns=["row"])["row"].to_pylist()]
    assert sorted(rows) == list(range(96))  # every row exactly once
    assert read_embedding_set(run / "embeddings").checkpoint == summary.onnx.checkpoint  # the model exported
    restarts = subprocess.run(["sacct", "-j", job, "-n", "-X", "-D", "-o", "State"], capture_output=True, text=True)
    assert "REQUEUED" in restarts.stdout, restarts.stdout
    capsys.readouterr()
    main(["status", str(sweep)])
    table = capsys.readouterr().out.splitlines()
    assert "EMBEDDINGS" in table[1] and "96/96 rows" in table[2], table
