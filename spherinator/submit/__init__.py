"""``spherinator-submit``: train spherinator models on Slurm clusters through Submitit.

Sweeps become one Slurm array; every task runs ``spherinator fit`` on its composed config in its own run dir
(``<run-root>/<name>/<task>``: config.yaml, checkpoints, TensorBoard events, logs, onnx/, summary.json),
requeues itself from a checkpoint on time limit or preemption, and exports its model to ONNX when done.
"""

from spherinator.submit.compose import compose_task
from spherinator.submit.launch import main, read_manifest, sbatch_script, slurm_states, task_rows
from spherinator.submit.resources import Resources, load_preset, parse_time
from spherinator.submit.sweep import SubmitError, Task, expand_sweep, parse_sweep_arg
from spherinator.submit.task import RequeueOnSignal, TrainingTask, newest_checkpoint, read_summary

__all__ = [
    "RequeueOnSignal",
    "Resources",
    "SubmitError",
    "Task",
    "TrainingTask",
    "compose_task",
    "expand_sweep",
    "load_preset",
    "main",
    "newest_checkpoint",
    "parse_sweep_arg",
    "parse_time",
    "read_manifest",
    "read_summary",
    "sbatch_script",
    "slurm_states",
    "task_rows",
]
