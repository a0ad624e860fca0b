"""``spherinator-submit``: compose, check and submit a sweep as one Slurm array; ``status``, ``cancel``, resume."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from spherinator.submit.compose import compose_task
from spherinator.submit.resources import Resources, check_script_path, load_preset, parse_sbatch_extra, parse_time
from spherinator.submit.sweep import SubmitError, Task, expand_sweep
from spherinator.submit.task import TrainingTask, code_hash, git_state, read_summary

MANIFEST_NAME = "sweep.json"
CODE_DIR = "code"  # the sweep's copy of the spherinator package, which its tasks import
SUBMITIT_DIR = "submitit"

USAGE = """\
spherinator-submit -c CONFIG [-c CONFIG ...] [--key.path VALUE ...] [resources] [--sweep KEY=V1,V2 ...]
       spherinator-submit --resume RUN_DIR [resources]
       spherinator-submit status RUN_DIR
       spherinator-submit cancel RUN_DIR"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spherinator-submit",
        usage=USAGE,
        allow_abbrev=False,
        description="Train spherinator models on a Slurm cluster: every task runs `spherinator fit` on its composed "
        "config; a sweep is one Slurm array. Options not listed here (--model.init_args.z_dim 16, "
        "--trainer.max_epochs 10) override the config exactly as with `spherinator fit`.",
    )
    parser.add_argument("-c", "--config", action="append", default=[], help="config file (repeat to layer)")
    group = parser.add_argument_group("sweep")
    group.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="swept key (grid)")
    group.add_argument("--sweep-file", help="YAML: 'key: [values]' (grid) or a list of mappings (one task each)")
    group.add_argument("--name", help="sweep name (default: first config's name + time)")
    group.add_argument("--run-root", default="runs", help="run dirs go to RUN_ROOT/NAME/TASK (default: ./runs)")
    group.add_argument("--dry-run", action="store_true", help="check and print the sbatch script, submit nothing")
    group.add_argument("--resume", metavar="RUN_DIR", help="resubmit the unfinished tasks of a sweep")
    group.add_argument("--no-validate", action="store_true", help="skip building the model and a batch locally")
    group.add_argument("--no-export", action="store_true", help="no ONNX export after training")
    res = parser.add_argument_group("Slurm resources (override the preset)")
    res.add_argument("--preset", help="site preset: a name (see $SPHERINATOR_PRESET_PATH) or a YAML file")
    res.add_argument("--nodes", type=int, help="nodes per task (trainer.num_nodes)")
    res.add_argument("--devices", type=int, help="processes per node (trainer.devices)")
    res.add_argument("--gpus-per-node", type=int, help="GPUs per node (sets devices and accelerator gpu)")
    res.add_argument("--partition")
    res.add_argument("--time", help="time limit per run: minutes or [D-]HH:MM:SS")
    res.add_argument("--cpus-per-task", type=int)
    res.add_argument("--mem", help="memory per node, e.g. 32G")
    res.add_argument("--account")
    res.add_argument("--qos")
    res.add_argument("--constraint")
    res.add_argument("--sbatch-extra", action="append", default=[], metavar="OPT=VALUE", help="extra #SBATCH option")
    res.add_argument("--parallelism", type=int, help="tasks running at once (array %%N)")
    res.add_argument("--max-requeues", type=int, help="requeues after hitting the time limit (default 3)")
    res.add_argument("--signal-delay", type=int, dest="signal_delay_s", help="seconds before the limit to checkpoint")
    return parser


def _resources(ns: argparse.Namespace, base: dict[str, Any] | None = None) -> Resources:
    """Resources from (lowest first) defaults, ``base`` (a resumed sweep's), the preset and the command line."""
    values: dict[str, Any] = dict(base or {})
    if ns.preset:
        values.update(load_preset(ns.preset))
    explicit = {
        name: getattr(ns, name, None)
        for name in ("nodes", "devices", "gpus_per_node", "partition", "cpus_per_task", "mem", "account", "qos",
                     "constraint", "parallelism", "max_requeues", "signal_delay_s")
    }  # fmt: skip
    values.update({k: v for k, v in explicit.items() if v is not None})
    if ns.time is not None:
        values["time"] = parse_time(ns.time)
    if ns.sbatch_extra:
        values["sbatch_extra"] = {**values.get("sbatch_extra", {}), **parse_sbatch_extra(ns.sbatch_extra)}
    if ns.devices is not None and ns.gpus_per_node is None and values.get("gpus_per_node") is not None:
        values["gpus_per_node"] = ns.devices  # on a GPU preset, devices are GPUs
    return Resources(**values)


def _check_overrides(extra: list[str]) -> list[str]:
    if extra and not extra[0].startswith("--"):
        raise SubmitError(
            f"unexpected argument '{extra[0]}'; configs go after -c, overrides look like --model.init_args.z_dim 16"
        )
    return extra


def python_command(code: Path | None = None) -> str:
    """How srun starts Python: this interpreter, with USR2 ignored until Submitit installs its handler.

    Slurm may send the ``--signal`` up to 60 s before the time asked for; a USR2 during Python's start-up would
    otherwise kill the task (the default action of USR2) instead of requeueing it.

    With ``code`` (the sweep's :func:`code_snapshot`), Python starts in that directory: ``python -m`` puts its
    working directory first on ``sys.path``, ahead of a checkout in the submit dir and of an editable install, so
    ``spherinator`` is the copy made at submit time. The task then changes to the submit dir (and puts it last on
    ``sys.path``, so that modules there stay importable).
    """
    script = 'trap "" USR2; ' + (f"cd {shlex.quote(str(code))} || exit 1; " if code is not None else "")
    script += 'exec "$0" "$@"'
    return f"bash -c {shlex.quote(script)} {shlex.quote(sys.executable)}"


def code_snapshot(sweep_dir: Path, recorded: str | None = None) -> tuple[Path, str]:
    """The sweep's copy of the spherinator package and its code version (``sha256:...`` and the git state).

    Made at the first submission and reused after (``recorded`` is the manifest's version): queued tasks, their
    requeues and ``--resume`` import the code of that submission, whatever the checkout holds by then. Only the
    package is copied (about 0.5 MB), not data, runs or other code the config names.
    """
    import spherinator

    code = sweep_dir / CODE_DIR
    if recorded and (code / "spherinator").is_dir():
        return code, recorded
    source = Path(spherinator.__file__).resolve().parent
    partial = sweep_dir / f".{CODE_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial / "spherinator", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.rmtree(code, ignore_errors=True)
    partial.replace(code)
    git = git_state(source)
    return code, code_hash(code / "spherinator") + (f" (git {git})" if git else "")


def _executor(folder: Path, resources: Resources, name: str) -> Any:
    import submitit

    python = python_command(folder.parent / CODE_DIR)  # folder is SWEEP/submitit, the snapshot SWEEP/code
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=resources.max_requeues, python=python)
    executor.update_parameters(job_name=name, **resources.submitit_parameters())
    return executor


def sbatch_script(folder: Path, resources: Resources, name: str, n_tasks: int) -> str:
    """The batch script Submitit writes for this sweep (one array of ``n_tasks``), for --dry-run."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = python_command(folder.parent / CODE_DIR)  # as _executor
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(
        command=command,
        folder=folder,
        job_name=name,
        map_count=n_tasks if n_tasks > 1 else None,
        **resources.submitit_parameters(),
    )


def _write_manifest(sweep_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = sweep_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(sweep_dir / MANIFEST_NAME)


def read_manifest(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The sweep dir and manifest for ``run_dir`` (a sweep dir, or one task's run dir inside it)."""
    path = Path(run_dir)
    if not path.exists():
        raise SubmitError(f"'{run_dir}' does not exist; pass a sweep dir made by spherinator-submit (RUN_ROOT/NAME)")
    for candidate in (path, path.parent):
        if (candidate / MANIFEST_NAME).is_file():
            return candidate.resolve(), json.loads((candidate / MANIFEST_NAME).read_text())
    raise SubmitError(f"'{run_dir}' holds no {MANIFEST_NAME}; pass a sweep dir made by spherinator-submit")


def _submit(
    tasks: list[Task], sweep_dir: Path, manifest: dict[str, Any], resources: Resources, export: bool
) -> dict[str, str]:
    """Queue ``tasks`` as one Slurm array; returns {task index: Slurm job id}."""
    from submitit.core.utils import FailedJobError

    code, manifest["code_version"] = code_snapshot(sweep_dir, manifest.get("code_version"))
    print(f"tasks import spherinator {manifest['code_version']} from {code}", file=sys.stderr)
    executor = _executor(sweep_dir / SUBMITIT_DIR, resources, manifest["name"])
    try:
        with executor.batch():
            pending = [
                executor.submit(TrainingTask(sweep_dir / t.name, manifest["cwd"], export, manifest["code_version"]))
                for t in tasks
            ]
    except FailedJobError as err:  # sbatch said no (an unknown partition, a limit of the site): nothing is queued
        message = " ".join(str(err).split())
        raise SubmitError(f"sbatch refused the job, nothing was queued: {message}") from err
    job_ids = {str(t.index): job.job_id for t, job in zip(tasks, pending, strict=True)}
    manifest.setdefault("submissions", []).append(
        {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "jobs": job_ids, "resources": resources.to_dict()}
    )
    _write_manifest(sweep_dir, manifest)
    return job_ids


def submit(ns: argparse.Namespace, overrides: list[str]) -> int:
    if not ns.config:
        raise SubmitError("no config given; pass at least one -c CONFIG (e.g. -c experiments/vae_cnn3.yaml)")
    for path in ns.config:
        if not Path(path).is_file():
            raise SubmitError(f"config '{path}' does not exist")
    resources = _resources(ns)
    tasks = expand_sweep(ns.sweep, ns.sweep_file)
    name = ns.name or f"{Path(ns.config[0]).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name) or set(name) == {"."}:
        raise SubmitError(f"--name {name!r} may only hold letters, digits and . _ + = - (and not be only dots)")
    sweep_dir = (Path(ns.run_root) / name).resolve()
    check_script_path(sweep_dir, f"--run-root {ns.run_root!r} gives the sweep dir")  # its logs' path is in the script
    if (sweep_dir / MANIFEST_NAME).exists() and not ns.dry_run:
        raise SubmitError(f"sweep '{sweep_dir}' exists; use --resume {sweep_dir} or another --name")

    configs = [str(Path(p).resolve()) for p in ns.config]
    composed = {}
    for task in tasks:  # everything is checked before anything is written or queued
        composed[task.index] = compose_task(
            configs, overrides, task, resources, sweep_dir / task.name, f"{name}-{task.name}",
            validate=not ns.no_validate,
        )  # fmt: skip
        print(f"checked task {task.index} {task.name}", file=sys.stderr)
    # What a task runs beyond `spherinator fit` of the same files: said once, before anything is queued.
    first = composed[tasks[0].index]
    print(f"the launcher sets, on top of `spherinator fit` of these files ({tasks[0].name}):", file=sys.stderr)
    for line in first.changes:
        print(f"  {line}", file=sys.stderr)

    if ns.dry_run:
        print(f"# sbatch script (one array of {len(tasks)} tasks):")
        print(sbatch_script(sweep_dir / SUBMITIT_DIR, resources, name, len(tasks)))
        for task in tasks:
            print(f"# task {task.index}: {sweep_dir / task.name}/config.yaml")
            print(composed[task.index].text)
        print(f"dry run: nothing submitted ({len(tasks)} tasks)", file=sys.stderr)
        return 0

    for task in tasks:
        run_dir = sweep_dir / task.name
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(composed[task.index].text)
    manifest = {
        "name": name,
        "cwd": str(Path.cwd()),
        "configs": configs,
        "overrides": overrides,
        "export": not ns.no_export,
        "tasks": [
            {"index": t.index, "name": t.name, "params": t.params, "launcher_changes": composed[t.index].changes}
            for t in tasks
        ],
    }
    job_ids = _submit(tasks, sweep_dir, manifest, resources, export=not ns.no_export)
    array = sorted({j.split("_")[0] for j in job_ids.values()})
    print(f"submitted {len(tasks)} task(s) as Slurm job {', '.join(array)} -> {sweep_dir}")
    print(f"  spherinator-submit status {sweep_dir}")
    print(f"  tensorboard --logdir {sweep_dir}")
    return 0


# --------------------------------------------------------------------------------------------------- status
_FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
          "DEADLINE"}  # fmt: skip


def _expand_array(job_id: str) -> list[str]:
    """``123_[0-2,5%2]`` -> ``["123_0", "123_1", "123_2", "123_5"]``; other ids unchanged."""
    match = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not match:
        return [job_id]
    base, spec = match.group(1), match.group(2).split("%")[0]
    ids = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        ids += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm state of each job id (``123`` or ``123_4``), from ``sacct`` (``squeue`` as a fallback)."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    states: dict[str, str] = {}
    if not bases:
        return states
    try:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(bases)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        job, _, state = line.partition("|")
        for one in _expand_array(job.strip()):
            states[one] = state.split()[0] if state.strip() else "UNKNOWN"
    return states


_SPHERE_FIGURES = (("val_coverage", "coverage", ".0%"), ("val_knn_accuracy", "knn", ".3f"))


def task_rows(sweep_dir: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: params, latest job id, Slurm state, epoch, best metric, the sphere's last coverage and kNN
    accuracy (logged by ``spherinator.callbacks.SphereQuality``), ONNX validated."""
    latest: dict[str, str] = {}
    for submission in manifest.get("submissions", []):
        latest.update(submission["jobs"])
    states = slurm_states(list(latest.values()))
    rows = []
    for task in manifest["tasks"]:
        summary = read_summary(sweep_dir / task["name"])
        job = latest.get(str(task["index"]))
        state = states.get(job or "", "")
        if not state:  # not (yet) in accounting
            state = summary.get("state", "UNKNOWN") if job else "NOT SUBMITTED"
        best = summary.get("best") or {}
        onnx = summary.get("onnx") or {}
        metrics = summary.get("metrics") or {}
        sphere = [f"{name} {metrics[key]:{spec}}" for key, name, spec in _SPHERE_FIGURES if key in metrics]
        rows.append({
            "index": task["index"], "task": task["name"], "params": task["params"], "job": job or "-",
            "state": state, "summary_state": summary.get("state"), "epoch": summary.get("epoch"),
            "best": f"{best['monitor']}={best['value']:.4g}" if best.get("monitor") else "-",
            "sphere": " ".join(sphere) or "-", "onnx": ("yes" if onnx.get("validated") else "no") if onnx else "-",
        })  # fmt: skip
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    columns = ["task", "job", "state", "epoch", "best", "sphere", "onnx"]
    cells = [[str(r[c] if r[c] is not None else "-") for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def status(run_dir: str) -> int:
    sweep_dir, manifest = read_manifest(run_dir)
    rows = task_rows(sweep_dir, manifest)
    print(f"sweep {manifest['name']} ({sweep_dir})")
    _print_table(rows)
    return 0


def cancel(run_dir: str) -> int:
    sweep_dir, manifest = read_manifest(run_dir)
    rows = task_rows(sweep_dir, manifest)
    active = [r["job"] for r in rows if r["job"] != "-" and r["state"] not in _FINAL]
    if not active:
        print(f"nothing to cancel in {sweep_dir}: no task is pending or running")
        return 0
    subprocess.run(["scancel", *active], check=True, timeout=60)
    print(f"cancelled {len(active)} task(s): {' '.join(active)}")
    return 0


def resume(ns: argparse.Namespace) -> int:
    sweep_dir, manifest = read_manifest(ns.resume)
    check_script_path(sweep_dir, "the sweep dir")
    submissions = manifest.get("submissions") or []
    base = dict(submissions[-1]["resources"]) if submissions else {}
    resources = _resources(ns, base)
    # Each task's config.yaml was composed for its world size (trainer.num_nodes/devices/accelerator).
    before = Resources(**base) if base else None
    if before is not None:
        changed = [
            f"{key} {getattr(before, key)} -> {getattr(resources, key)}"
            for key in ("nodes", "devices", "gpus_per_node")
            if getattr(before, key) != getattr(resources, key)
        ]
        if changed:
            raise SubmitError(
                f"--resume keeps the layout the tasks' configs were made for; it would change {', '.join(changed)}. "
                f"Start a new sweep (without --resume) to train with another layout"
            )
    rows = task_rows(sweep_dir, manifest)
    active = [r for r in rows if r["state"] not in _FINAL and r["state"] != "NOT SUBMITTED"]
    if active:
        names = ", ".join(f"{r['task']} ({r['state']})" for r in active)
        raise SubmitError(f"tasks still queued or running: {names}; wait, or `spherinator-submit cancel {sweep_dir}`")
    todo = [r for r in rows if not (r["state"] == "COMPLETED" and r["summary_state"] == "COMPLETED")]
    if not todo:
        print(f"all {len(rows)} task(s) of {sweep_dir} completed; nothing to resume")
        return 0
    tasks = [Task(index=r["index"], name=r["task"], params=r["params"]) for r in todo]
    if ns.dry_run:
        print(sbatch_script(sweep_dir / SUBMITIT_DIR, resources, manifest["name"], len(tasks)))
        print(f"dry run: would resume {', '.join(t.name for t in tasks)}", file=sys.stderr)
        return 0
    job_ids = _submit(tasks, sweep_dir, manifest, resources, export=manifest.get("export", True))
    print(f"resubmitted {len(tasks)} task(s) from their last checkpoints: {' '.join(job_ids.values())}")
    return 0


def main(args: list[str] | None = None) -> None:
    """Entry point of ``spherinator-submit``."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] in ("status", "cancel"):
            if len(argv) != 2:
                raise SubmitError(f"usage: spherinator-submit {argv[0]} RUN_DIR")
            rc = status(argv[1]) if argv[0] == "status" else cancel(argv[1])
        else:
            ns, extra = _build_parser().parse_known_args(argv)
            overrides = _check_overrides(extra)
            if ns.resume:
                if ns.config or overrides or ns.sweep or ns.sweep_file:
                    raise SubmitError("--resume takes the sweep's own configs; give only resources with it")
                rc = resume(ns)
            else:
                rc = submit(ns, overrides)
    except SubmitError as err:
        print(f"spherinator-submit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if rc:
        raise SystemExit(rc)


__all__ = ["code_snapshot", "main", "read_manifest", "sbatch_script", "slurm_states", "task_rows"]
