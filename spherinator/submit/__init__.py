"""``spherinator-submit``: train spherinator models on Slurm clusters through Submitit.

Sweeps become one Slurm array; every task runs ``spherinator fit`` on its composed config in its own run dir
(``<run-root>/<name>/<task>``: config.yaml, checkpoints, TensorBoard events, logs, onnx/, summary.json),
requeues itself from a checkpoint on time limit or preemption, and exports its model to ONNX when done.
``spherinator-submit predict`` embeds every row as one array of shard tasks (:mod:`spherinator.submit.predict`).

Importing this package costs neither torch nor Lightning (``status``, ``cancel``, ``logs`` and ``--help`` start at
once); :class:`RequeueOnSignal`, the one name that needs Lightning, is imported when it is first used.
"""

from typing import Any

from spherinator.submit.compose import compose_task
from spherinator.submit.launch import main, sbatch_parameters, task_rows
from spherinator.submit.predict import PredictTask, plan_embedding_set, write_shard
from spherinator.submit.records import (
    AtlasResult,
    Best,
    EmbeddingSet,
    Manifest,
    OnnxResult,
    RunSummary,
    read_embedding_set,
    read_manifest,
)
from spherinator.submit.resources import Resources, load_preset, parse_time
from spherinator.submit.slurm import job_states
from spherinator.submit.sweep import SubmitError, Task, expand_sweep, parse_sweep_arg
from spherinator.submit.task import TrainingTask, newest_checkpoint

__all__ = [
    "AtlasResult",
    "Best",
    "EmbeddingSet",
    "Manifest",
    "OnnxResult",
    "PredictTask",
    "RequeueOnSignal",
    "Resources",
    "RunSummary",
    "SubmitError",
    "Task",
    "TrainingTask",
    "compose_task",
    "expand_sweep",
    "job_states",
    "load_preset",
    "main",
    "newest_checkpoint",
    "parse_sweep_arg",
    "parse_time",
    "plan_embedding_set",
    "read_embedding_set",
    "read_manifest",
    "sbatch_parameters",
    "task_rows",
    "write_shard",
]


def __getattr__(name: str) -> Any:
    # Every task config names spherinator.submit.RequeueOnSignal (a Lightning Callback): load it when it is asked for.
    if name == "RequeueOnSignal":
        from spherinator.submit.requeue import RequeueOnSignal

        return RequeueOnSignal
    raise AttributeError(f"module 'spherinator.submit' has no attribute {name!r}")
