"""Start-up time of ``spherinator-submit status|logs|cancel|--help`` beside a bare ``python -c pass``.

Each command runs as its own process (as a user types it), in alternating rounds; the median wall time and the
CPU time (user + system, of the child) are printed with the ratio to the bare interpreter measured in the same
rounds. The sweep is made up here: its ``sweep.json``, two tasks' ``summary.json`` and Slurm log files, and
stand-ins for ``sacct`` (a cluster without accounting) and ``squeue`` first on the PATH, so it runs on any
machine; ``--sweep DIR`` measures a real sweep on a real cluster instead (then ``cancel`` is left out).

    python tools/bench/bench_startup.py [--rounds 7] [--sweep runs/NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAKES = {
    "sacct": 'echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1\n',
    "squeue": 'echo "1001_0|RUNNING"\n',
    "scancel": "exit 0\n",
    "srun": "exit 0\n",
}


def made_up_sweep(root: Path) -> Path:
    sweep = root / "runs" / "bench"
    (sweep / "submitit").mkdir(parents=True)
    tasks = [
        {"index": i, "name": f"beta={b}", "params": {"model.init_args.beta": b}} for i, b in enumerate(["1e-4", "1e-3"])
    ]
    manifest = {
        "name": "bench",
        "cwd": str(root),
        "tasks": tasks,
        "submissions": [{"jobs": {"0": "1001_0", "1": "1001_1"}}],
    }
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    for task, state in zip(tasks, ["RUNNING", "COMPLETED"], strict=True):
        (sweep / task["name"]).mkdir()
        summary = {"state": state, "attempts": 1, "attempt_started": time.strftime("%Y-%m-%dT%H:%M:%S"), "epoch": 3}
        (sweep / task["name"] / "summary.json").write_text(json.dumps(summary))
    for job in ("1001_0", "1001_1"):
        (sweep / "submitit" / f"{job}_0_log.out").write_text("Epoch 0/9: 10/10 batches in 0:00:01\n" * 50)
        (sweep / "submitit" / f"{job}_0_log.err").write_text("a warning\n" * 50)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return sweep


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``command``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sweep", help="a real sweep dir (default: a made-up one with stand-in Slurm commands)")
    args = parser.parse_args()
    submit = shutil.which("spherinator-submit", path=str(Path(sys.executable).parent)) or "spherinator-submit"
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if args.sweep:
            sweep = Path(args.sweep)
            task = json.loads((sweep / "sweep.json").read_text())["tasks"][0]["name"]
        else:
            sweep, task = made_up_sweep(Path(tmp)), "beta=1e-4"
            env["PATH"] = f"{Path(tmp) / 'bin'}{os.pathsep}{env['PATH']}"
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import submitit'": [sys.executable, "-c", "import submitit"],
            "spherinator-submit --help": [submit, "--help"],
            "spherinator-submit status": [submit, "status", str(sweep)],
            "spherinator-submit status --json": [submit, "status", str(sweep), "--json"],
            "spherinator-submit logs --tail 20": [submit, "logs", str(sweep), task, "--tail", "20"],
        }
        if not args.sweep:
            commands["spherinator-submit cancel"] = [submit, "cancel", str(sweep)]
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                runs[name].append(timed(command, env))
    base = statistics.median(w for w, _ in runs["python -c pass"])
    print(f"{'command':36} {'wall s':>8} {'cpu s':>8} {'x bare python (wall)':>21}")
    for name, values in runs.items():
        wall, cpu = statistics.median(w for w, _ in values), statistics.median(c for _, c in values)
        print(f"{name:36} {wall:8.3f} {cpu:8.3f} {wall / base:21.1f}")
    load = os.getloadavg()[0]
    print(f"median of {args.rounds} alternating rounds; load average now {load:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
