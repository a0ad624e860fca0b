"""Slurm as ``spherinator-submit`` sees a sweep's jobs: their states, cancelling them, their log files.

Through Submitit's public ``SlurmJob(folder, job_id)``: ``.state`` (Submitit's watcher asks ``sacct`` once for all
jobs), ``.cancel()`` and ``.paths`` (the job's stdout/stderr files, which Slurm writes from the batch script's first
line on, also when the task dies before Python starts). Submitit knows no other source of states than ``sacct``; on
a cluster without accounting every state it gives is ``UNKNOWN``, and those are asked of ``squeue`` here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path

# Slurm's states of a job that will not run again (sacct's names), and ENDED: the job is in neither the accounting
# nor the queue (a cluster without accounting forgets a job when it leaves the queue), so it ended somehow.
ENDED = "ENDED"
FINAL = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "REVOKED", ENDED,
})  # fmt: skip
UNKNOWN = "UNKNOWN"


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Collect what this process and its children (``sacct``) write to file descriptor 2, instead of showing it."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += [line.strip() for line in sink.read().splitlines() if line.strip()]


def job_states(folder: str | Path, job_ids: list[str]) -> tuple[dict[str, str], str | None]:
    """The Slurm state of each job id (``123`` or ``123_4``) and, when ``sacct`` could not tell, why and where the
    states came from instead (a line for the user; None when sacct answered).

    States are sacct's words (``RUNNING``, ``COMPLETED``, ``CANCELLED``, ...), without sacct's additions
    (``CANCELLED by 0`` is ``CANCELLED``); ``ENDED`` for a job that neither sacct nor squeue knows any more, and
    ``UNKNOWN`` when neither answers.
    """
    if not job_ids:
        return {}, None
    import submitit

    jobs = {job_id: submitit.SlurmJob(folder=folder, job_id=job_id) for job_id in job_ids}  # one watcher for all
    watcher = logging.getLogger("submitit")
    level = watcher.level
    watcher.setLevel(logging.ERROR)  # its "Bypassing sacct error" warning: the fallback below says it in one line
    try:
        with _stderr_captured() as sacct_said:
            states = {job_id: (job.state or UNKNOWN).split()[0] for job_id, job in jobs.items()}
    finally:
        watcher.setLevel(level)
    unknown = [job_id for job_id, state in states.items() if state == UNKNOWN]
    if not unknown:
        return states, None
    queued, squeue_said = squeue_states(unknown)
    if queued is not None:
        states.update({job_id: queued.get(job_id, ENDED) for job_id in unknown})
    why = f" ({sacct_said[0]})" if sacct_said else ""
    source = "from squeue" if queued is not None else f"unknown: squeue failed too ({squeue_said})"
    return states, f"sacct did not know {len(unknown)} job(s){why}; their states are {source}"


def squeue_states(job_ids: list[str]) -> tuple[dict[str, str] | None, str]:
    """States of the jobs among ``job_ids`` that are still queued or running, by ``squeue`` (Submitit has no squeue
    reader); (None, squeue's error) when squeue does not answer."""
    bases = sorted({job_id.split("_")[0] for job_id in job_ids})
    command = ["squeue", "--noheader", "--array", "--format=%i|%T", f"--jobs={','.join(bases)}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return None, str(err)
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:  # none of them is in the queue any more
            return {}, ""
        return None, done.stderr.strip().splitlines()[0] if done.stderr.strip() else f"exit status {done.returncode}"
    states = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id and state:
            states[job_id] = state.split()[0]
    return states, ""


def cancel_jobs(folder: str | Path, job_ids: list[str]) -> None:
    import submitit

    for job_id in job_ids:
        submitit.SlurmJob(folder=folder, job_id=job_id).cancel(check=True)


def log_paths(folder: str | Path, job_id: str) -> tuple[Path, Path]:
    """Slurm's stdout and stderr files of rank 0 of ``job_id``, where the batch script, srun and the task write
    (a requeued job appends to them)."""
    import submitit

    paths = submitit.SlurmJob(folder=folder, job_id=job_id).paths
    return paths.stdout, paths.stderr


def tail(path: Path, lines: int | None) -> list[str]:
    """The last ``lines`` lines of ``path`` (all for None) without holding the whole file."""
    with path.open(errors="replace") as handle:
        if lines is None or lines >= sys.maxsize:  # more lines than any file holds (deque takes no more)
            return handle.readlines()
        return list(deque(handle, maxlen=lines))


# A line that says what went wrong: Python's "SomeError: ...", Slurm's "error:", a shell's "No such file".
_ERROR_LINE = re.compile(
    r"\b\w*(Error|Exception)\b|error:|\*\*\*|No such file|not found|Killed|Permission denied|oom", re.IGNORECASE
)


def error_line(path: Path, max_lines: int = 2000) -> str | None:
    """The line of a stderr file that best says why a task stopped: the last error-like line, preferring the task's
    own (a Python exception, the shell's "python: No such file or directory") over srun's summary of it."""
    try:
        lines = [line.strip() for line in tail(path, max_lines) if line.strip()]
    except OSError:
        return None
    hits = [line for line in lines if _ERROR_LINE.search(line)]
    own = [line for line in hits if not line.startswith(("srun:", "slurmstepd:"))]
    return (own or hits or [None])[-1]
