"""``spherinator-submit``: compose, check and submit a sweep as one Slurm array; ``status``, ``cancel``, resume."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from spherinator.submit.compose import ComposedTask, compose_task
from spherinator.submit.monitor import (
    NOT_SUBMITTED,
    SUBMITIT_DIR,
    TaskStatus,
    cancel,
    logs,
    print_table,
    status,
    task_rows,
)
from spherinator.submit.predict import (
    EMBEDDINGS_DIR,
    REPLAN,
    PredictTask,
    check_onnx_encoder,
    check_predict_target,
    check_run_outside_data,
    plan_embedding_set,
)
from spherinator.submit.records import (
    COMPLETED,
    MANIFEST_NAME,
    EmbeddingSet,
    Manifest,
    ManifestTask,
    PredictJob,
    Submission,
    find_sweep,
    read_embedding_set,
    read_manifest,
    write_embedding_set,
    write_manifest,
)
from spherinator.submit.resources import Resources, check_script_path, load_preset, parse_sbatch_extra, parse_time
from spherinator.submit.slurm import FINAL
from spherinator.submit.sweep import SubmitError, Task, expand_sweep
from spherinator.submit.task import TrainingTask, code_hash, git_state

CODE_DIR = "code"  # the sweep's copy of the spherinator package, which its tasks import
ATLAS_ORDER = 4  # each task's atlas: HiPS orders 0..4, 4,092 tiles

USAGE = """\
spherinator-submit -c CONFIG [-c CONFIG ...] [--key.path VALUE ...] [resources] [--sweep KEY=V1,V2 ...] [--predict]
       spherinator-submit --resume RUN_DIR [resources]
       spherinator-submit predict -c CONFIG [-c CONFIG ...] --ckpt_path CKPT [--tasks N] [--onnx DIR] [resources]
       spherinator-submit status RUN_DIR [--json]
       spherinator-submit logs RUN_DIR [TASK] [--tail N]
       spherinator-submit cancel RUN_DIR"""


def _parser(command: str, description: str | None = None, usage: str | None = None) -> argparse.ArgumentParser:
    """A parser of ``spherinator-submit [command]``: no abbreviated options (an override such as ``--data.x`` must
    never be taken for one of ours); with ``description``, ``-c`` files as for ``spherinator fit``."""
    prog = f"spherinator-submit {command}".strip()
    parser = argparse.ArgumentParser(prog=prog, usage=usage, allow_abbrev=False, description=description)
    if description is not None:
        parser.add_argument("-c", "--config", action="append", default=[], help="config file (repeat to layer)")
    return parser


def _build_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "",
        "Train spherinator models on a Slurm cluster: every task runs `spherinator fit` on its composed config; a "
        "sweep is one Slurm array. Options not listed here (--model.init_args.z_dim 16, --trainer.max_epochs 10) "
        "override the config exactly as with `spherinator fit`.",
        USAGE,
    )
    group = parser.add_argument_group("sweep")
    group.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="swept key (grid)")
    group.add_argument("--sweep-file", help="YAML: 'key: [values]' (grid) or a list of mappings (one task each)")
    group.add_argument("--name", help="sweep name (default: first config's name + time)")
    group.add_argument("--run-root", default="runs", help="run dirs go to RUN_ROOT/NAME/TASK (default: ./runs)")
    group.add_argument("--dry-run", action="store_true", help="check, print Slurm settings and configs")
    group.add_argument("--resume", metavar="RUN_DIR", help="resubmit the unfinished tasks of a sweep")
    group.add_argument("--no-validate", action="store_true", help="skip building the model and a batch locally")
    group.add_argument("--no-export", action="store_true", help="no ONNX export after training")
    group.add_argument("--no-atlas", action="store_true", help="no atlas (spherinator atlas) after the export")
    group.add_argument("--atlas-order", type=int, default=ATLAS_ORDER, metavar="K",
                       help=f"deepest HiPS order of each task's atlas (default: {ATLAS_ORDER})")  # fmt: skip
    group.add_argument("--predict", action="store_true",
                       help="after the export, embed every row into RUN/embeddings as `spherinator-submit predict` "
                       "would, in the same task")  # fmt: skip
    group.add_argument("--predict-shards", type=int, metavar="N",
                       help="shards of that embedding (default: one per row group, at most 32)")  # fmt: skip
    add_resource_args(parser)
    return parser


def add_resource_args(parser: argparse.ArgumentParser) -> None:
    """The Slurm resource options, shared by training and predict submissions."""
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


def _atlas_order(order: int) -> int:
    from spherinator.atlas import MAX_ORDER

    if not 0 <= order <= MAX_ORDER:
        raise SubmitError(f"--atlas-order {order} is out of range: give 0..{MAX_ORDER} (or --no-atlas)")
    return order


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


def _predict_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "predict",
        "Embed every row on a Slurm cluster: one array task per shard of rows, each writing its own Parquet file of "
        "what `spherinator predict` writes (plus the row id) to RUN_ROOT/NAME/embeddings, with _manifest.json saying "
        "which rows are where. Other options (--data.init_args.batch_size 256) override the configs as with "
        "`spherinator predict`.",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint whose model embeds")
    parser.add_argument("--tasks", type=int, help="array tasks (shards; default: one per row group, at most 32)")
    parser.add_argument("--onnx", metavar="DIR", help="encode with DIR/encoder.onnx (onnxruntime; no scale column)")
    parser.add_argument("--name", help="name of the predict sweep (default: first config's name + time)")
    parser.add_argument("--run-root", default="runs", help="the sweep goes to RUN_ROOT/NAME (default: ./runs)")
    parser.add_argument("--dry-run", action="store_true", help="plan the shards and print them; queue nothing")
    add_resource_args(parser)
    return parser


def submit_predict(ns: argparse.Namespace, overrides: list[str]) -> int:
    """``spherinator-submit predict``: plan the shards, write the embedding set's manifest, queue one array."""
    for path in ns.config:
        if not Path(path).is_file():
            raise SubmitError(f"config '{path}' does not exist")
    ns.onnx = str(Path(ns.onnx).expanduser()) if ns.onnx else None  # a quoted ~ as the shell would give it
    ns.ckpt_path = str(Path(ns.ckpt_path).expanduser())
    if ns.onnx and not (Path(ns.onnx) / "encoder.onnx").is_file():
        raise SubmitError(f"--onnx {ns.onnx}: no encoder.onnx there; give an export dir (spherinator export)")
    resources = _resources(ns)
    if resources.nodes != 1 or resources.devices != 1:
        raise SubmitError("each shard is one process: leave out --nodes/--devices and give more --tasks instead")
    name, sweep_dir = _sweep_dir(ns)
    configs = [str(Path(p).resolve()) for p in ns.config]
    ckpt = str(Path(ns.ckpt_path).resolve())
    cli_args = [arg for path in configs for arg in ("-c", path)] + overrides
    plan = _plan_predict(cli_args, ckpt, ns.tasks, ns.onnx)
    if sweep_dir.is_relative_to(plan.data):  # the index reads every .parquet below the data dir: the shards too
        raise SubmitError(
            f"--run-root {ns.run_root!r}: the sweep dir '{sweep_dir}' is inside the data under '{plan.data}', whose "
            "shards the next tasks would read as data; give a run root outside it"
        )
    print(f"{plan.rows:,} rows of {plan.data} in {len(plan.shards)} shard(s) of about "
          f"{plan.rows // len(plan.shards):,} rows", file=sys.stderr)  # fmt: skip
    if ns.dry_run:
        print(dry_run_text(sweep_dir / SUBMITIT_DIR, resources, name, len(plan.shards)))
        print(f"dry run: nothing submitted ({len(plan.shards)} shards)", file=sys.stderr)
        return 0
    embeddings = sweep_dir / EMBEDDINGS_DIR
    plan.encoded_by(ckpt, str(Path(ns.onnx).resolve()) if ns.onnx else None)
    try:
        embeddings.mkdir(parents=True, exist_ok=True)
        write_embedding_set(embeddings, plan)
    except OSError as err:
        raise SubmitError(f"cannot write '{embeddings}' ({err.strerror or err}); nothing was queued") from err
    manifest = Manifest(
        tasks=[ManifestTask(s.index, Path(s.file).stem) for s in plan.shards], name=name, cwd=str(Path.cwd()),
        configs=configs, overrides=overrides, export=False,
        predict=PredictJob(ckpt, str(embeddings), plan.onnx, plan.rows),
    )  # fmt: skip
    job_ids = _queue(_predict_tasks(manifest), [s.index for s in plan.shards], sweep_dir, manifest, resources)
    array = sorted({j.split("_")[0] for j in job_ids.values()})
    print(f"submitted {len(job_ids)} shard(s) as Slurm job {', '.join(array)} -> {embeddings}")
    print(f"  spherinator-submit status {sweep_dir}")
    return 0


def _plan_predict(cli_args: list[str], ckpt: str, tasks: int | None, onnx: str | None = None) -> EmbeddingSet:
    """The shards of the configs' predict split, every error of the configs or the data as one line; with ``onnx``,
    its encoder checked against the data (:func:`check_onnx_encoder`), before anything is queued."""
    from spherinator.errors import one_line, parse_error_line, user_error
    from spherinator.runs import build

    try:
        _, datamodule = build(cli_args, ckpt)
        plan = plan_embedding_set(datamodule, tasks)
        if onnx:
            check_onnx_encoder(onnx, datamodule)
        return plan
    except argparse.ArgumentError as err:  # a parse error of an override (--data.init_args.batch_size x)
        raise SubmitError(parse_error_line(err, cli_args)) from err
    except SubmitError:
        raise
    except Exception as err:  # a class that refuses its arguments reaches us wrapped by jsonargparse
        cause = user_error(err)
        if cause is None:
            raise
        raise SubmitError(one_line(cause)) from err


def _predict_tasks(manifest: Manifest) -> Callable[[int], PredictTask]:
    """The :class:`PredictTask` of each shard of a predict sweep."""
    job = manifest.predict
    cli_args = [arg for path in manifest.configs for arg in ("-c", path)] + manifest.overrides
    return lambda i: PredictTask(job.embeddings, i, manifest.cwd, cli_args, job.checkpoint, job.onnx)


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


def sbatch_parameters(resources: Resources, name: str) -> dict[str, Any]:
    """The parameters Submitit's ``SlurmExecutor.update_parameters`` gets; it writes the sbatch script from them."""
    return {"job_name": name, **resources.submitit_parameters()}


def _executor(folder: Path, resources: Resources, name: str) -> Any:
    import submitit

    python = python_command(folder.parent / CODE_DIR)  # folder is SWEEP/submitit, the snapshot SWEEP/code
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=resources.max_requeues, python=python)
    executor.update_parameters(**sbatch_parameters(resources, name))
    return executor


def dry_run_text(folder: Path, resources: Resources, name: str, n_tasks: int) -> str:
    """What --dry-run shows of the submission: the Submitit executor's settings, as YAML.

    Not the sbatch script itself: Submitit has no public way to render it without submitting (``SlurmExecutor``
    writes it inside ``submit``, with the module-private ``_make_sbatch_string``). These are the values it is
    rendered from; after a submission the script is ``SWEEP/submitit/<job id>_submission.sh``.
    """
    settings = {
        "executor": "submitit.SlurmExecutor",
        "folder": str(folder),
        "array_tasks": n_tasks,
        "max_num_timeout": resources.max_requeues,
        "python": python_command(folder.parent / CODE_DIR),
        "parameters": sbatch_parameters(resources, name),
    }
    return yaml.safe_dump(settings, sort_keys=False, width=1000)


def _queue(
    make: Callable[[int], Any], indices: list[int], sweep_dir: Path, manifest: Manifest, resources: Resources
) -> dict[str, str]:
    """Queue ``make(i)`` for each task index ``i`` as one Slurm array (after the code snapshot, whose version
    ``manifest.code_version`` then holds), record the submission in the manifest; returns {task index: job id}."""
    from submitit.core.utils import FailedJobError

    try:
        code, manifest.code_version = code_snapshot(sweep_dir, manifest.code_version)
    except OSError as err:  # a full or read-only disk; shutil.Error lists each file it could not copy
        why = str(err.args[0][0][2]).split(":")[0] if isinstance(err, shutil.Error) else (err.strerror or err)
        shutil.rmtree(sweep_dir / f".{CODE_DIR}.partial", ignore_errors=True)
        raise SubmitError(f"cannot write the code snapshot in '{sweep_dir}' ({why}); nothing was queued") from err
    print(f"tasks import spherinator {manifest.code_version} from {code}", file=sys.stderr)
    executor = _executor(sweep_dir / SUBMITIT_DIR, resources, manifest.name)
    try:
        with executor.batch():
            pending = [executor.submit(make(i)) for i in indices]
    except FailedJobError as err:  # sbatch said no (an unknown partition, a limit of the site): nothing is queued
        message = " ".join(str(err).split())
        raise SubmitError(f"sbatch refused the job, nothing was queued: {message}") from err
    job_ids = {str(i): job.job_id for i, job in zip(indices, pending, strict=True)}
    manifest.submissions.append(Submission(time.strftime("%Y-%m-%dT%H:%M:%S"), job_ids, resources.to_dict()))
    write_manifest(sweep_dir, manifest)
    return job_ids


def _submit(
    tasks: list[Task], sweep_dir: Path, manifest: Manifest, resources: Resources, export: bool,
    atlas_order: int | None = None,
) -> dict[str, str]:  # fmt: skip
    """Queue the :class:`TrainingTask` of each of ``tasks`` as one Slurm array (:func:`_queue`), embedding every
    row after the export where the manifest says so (``--predict``); returns {task index: job id}."""
    names = {t.index: t.name for t in tasks}
    embed = (manifest.predict_shards or 0) if manifest.predict_after_fit else None

    def make(i: int) -> TrainingTask:
        return TrainingTask(sweep_dir / names[i], manifest.cwd, export, manifest.code_version, atlas_order, embed)

    return _queue(make, [t.index for t in tasks], sweep_dir, manifest, resources)


def _sweep_dir(ns: argparse.Namespace) -> tuple[str, Path]:
    """The sweep's name and dir, checked: a new sweep, a name that stays inside the run root."""
    name = ns.name or f"{Path(ns.config[0]).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name) or set(name) == {"."}:
        raise SubmitError(f"--name {name!r} may only hold letters, digits and . _ + = - (and not be only dots)")
    sweep_dir = (Path(ns.run_root).expanduser() / name).resolve()
    check_script_path(sweep_dir, f"--run-root {ns.run_root!r} gives the sweep dir")  # its logs' path is in the script
    existing = next(p for p in (sweep_dir, *sweep_dir.parents) if p.exists())
    if not existing.is_dir():  # found before anything is composed, not as a traceback when the run dirs are made
        raise SubmitError(f"--run-root {ns.run_root!r}: '{existing}' is a file; give a directory (or a new path)")
    if (sweep_dir / MANIFEST_NAME).exists() and not ns.dry_run:
        raise SubmitError(f"sweep '{sweep_dir}' exists; use --resume {sweep_dir} or another --name")
    return name, sweep_dir


def _print_dry_run(tasks: list[Task], composed: dict[int, ComposedTask], sweep_dir: Path, resources: Resources,
                   name: str) -> None:  # fmt: skip
    print(f"# Slurm: one array of {len(tasks)} task(s), submitted through Submitit with these settings")
    print(dry_run_text(sweep_dir / SUBMITIT_DIR, resources, name, len(tasks)))
    for task in tasks:
        print(f"# task {task.index}: {sweep_dir / task.name}/config.yaml")
        print(composed[task.index].text)
    print(f"dry run: nothing submitted ({len(tasks)} tasks)", file=sys.stderr)


def submit(ns: argparse.Namespace, overrides: list[str]) -> int:
    if not ns.config:
        raise SubmitError("no config given; pass at least one -c CONFIG (e.g. -c experiments/vae_cnn3.yaml)")
    for path in ns.config:
        if not Path(path).is_file():
            raise SubmitError(f"config '{path}' does not exist")
    resources = _resources(ns)
    atlas_order = None if ns.no_atlas else _atlas_order(ns.atlas_order)
    if ns.predict_shards is not None and (not ns.predict or ns.predict_shards < 1):
        raise SubmitError(f"--predict-shards {ns.predict_shards}: give a number >= 1, with --predict")
    tasks = expand_sweep(ns.sweep, ns.sweep_file)
    name, sweep_dir = _sweep_dir(ns)
    configs = [str(Path(p).resolve()) for p in ns.config]
    composed = {}
    for task in tasks:  # everything is checked before anything is written or queued
        composed[task.index] = compose_task(
            configs, overrides, task, resources, sweep_dir / task.name, name,
            validate=not ns.no_validate,
        )  # fmt: skip
        if ns.predict:
            check_predict_target(
                composed[task.index].text, sweep_dir / task.name, ns.predict_shards, not ns.no_validate
            )
        elif atlas_order is not None:  # --predict's check above refuses the same run dirs
            check_run_outside_data(composed[task.index].text, sweep_dir / task.name, "where the task's atlas "
                                   "would write a catalog.parquet that the next fit reads as data (--no-atlas "
                                   "writes none)")  # fmt: skip
        print(f"checked task {task.index} {task.name}", file=sys.stderr)
    # What a task runs beyond `spherinator fit` of the same files: said once, before anything is queued.
    print(f"the launcher sets, on top of `spherinator fit` of these files ({tasks[0].name}):", file=sys.stderr)
    for line in composed[tasks[0].index].changes:
        print(f"  {line}", file=sys.stderr)
    if ns.dry_run:
        _print_dry_run(tasks, composed, sweep_dir, resources, name)
        return 0

    try:
        for task in tasks:
            run_dir = sweep_dir / task.name
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(composed[task.index].text)
    except OSError as err:  # a read-only or full disk: nothing is queued
        raise SubmitError(f"cannot write the run dirs in '{sweep_dir}' ({err}); nothing was queued") from err
    manifest = Manifest(
        tasks=[ManifestTask(t.index, t.name, t.params, composed[t.index].changes) for t in tasks],
        name=name, cwd=str(Path.cwd()), configs=configs, overrides=overrides, export=not ns.no_export,
        atlas_order=atlas_order, predict_after_fit=ns.predict, predict_shards=ns.predict_shards,
    )  # fmt: skip
    job_ids = _submit(tasks, sweep_dir, manifest, resources, export=not ns.no_export, atlas_order=atlas_order)
    array = sorted({j.split("_")[0] for j in job_ids.values()})
    print(f"submitted {len(tasks)} task(s) as Slurm job {', '.join(array)} -> {sweep_dir}")
    print(f"  spherinator-submit status {sweep_dir}")
    print(f"  tensorboard --logdir {sweep_dir}")
    return 0


def _recorded_resources(sweep_dir: Path, recorded: dict[str, Any]) -> Resources:
    """The resources the sweep's last submission asked for, as its manifest records them."""
    where = f"'{sweep_dir / MANIFEST_NAME}': the last submission's resources"
    unknown = sorted(set(recorded) - {f.name for f in dataclasses.fields(Resources)})
    if unknown:
        raise SubmitError(f"{where} hold an unknown key '{unknown[0]}'; restore the file from a backup")
    try:
        return Resources(**recorded)
    except SubmitError as err:
        raise SubmitError(f"{where} are not valid: {err}") from err


def resume(ns: argparse.Namespace) -> int:
    check_script_path(find_sweep(ns.resume), "the sweep dir")  # first: the errors about its files name it
    sweep_dir, manifest = read_manifest(ns.resume)
    base = manifest.submissions[-1].resources if manifest.submissions else {}
    before = _recorded_resources(sweep_dir, base) if base else None
    resources = _resources(ns, base)
    # Each task's config.yaml was composed for its world size (trainer.num_nodes/devices/accelerator).
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
    rows, _ = task_rows(sweep_dir, manifest)
    active = [r for r in rows if r.state not in FINAL and r.state != NOT_SUBMITTED]
    if active:
        names = ", ".join(f"{r.task} ({r.state})" for r in active)
        raise SubmitError(f"tasks still queued or running: {names}; wait, or `spherinator-submit cancel {sweep_dir}`")
    if manifest.predict is not None:  # a shard is done when its file is there (whole: staged, then renamed)
        embeddings = manifest.predict.embeddings
        plan = read_embedding_set(embeddings)
        written = {s.index for s in plan.written(embeddings)}
        todo = [r for r in rows if r.index not in written]
        problem = plan.encoder_problem() if todo else None
        if problem:  # each task would refuse its shard, after its wait in the queue
            raise SubmitError(f"{problem}; {REPLAN}")
    else:
        todo = [r for r in rows if not (r.state == COMPLETED and r.summary_state == COMPLETED)]
    if not todo:
        print(f"all {len(rows)} task(s) of {sweep_dir} completed; nothing to resume")
        return 0
    blocked = next((r for r in todo if Path(r.run_dir).exists() and not Path(r.run_dir).is_dir()), None)
    if blocked is not None:  # the task would fail on the cluster, after its wait in the queue
        raise SubmitError(f"'{blocked.run_dir}' is a file, where task {blocked.task}'s run dir goes; move it away")
    tasks = [Task(index=r.index, name=r.task, params=r.params) for r in todo]
    if ns.dry_run:
        print(dry_run_text(sweep_dir / SUBMITIT_DIR, resources, manifest.name, len(tasks)))
        print(f"dry run: would resume {', '.join(t.name for t in tasks)}", file=sys.stderr)
        return 0
    if manifest.predict is not None:
        job_ids = _queue(_predict_tasks(manifest), [t.index for t in tasks], sweep_dir, manifest, resources)
    else:
        job_ids = _submit(tasks, sweep_dir, manifest, resources, manifest.export, manifest.atlas_order)
    print(f"resubmitted {_resumed_what(manifest, len(tasks))}: {' '.join(job_ids.values())}")
    return 0


def _resumed_what(manifest: Manifest, n: int) -> str:
    """What ``--resume`` resubmitted, as each of its tasks will go on."""
    if manifest.predict is not None:
        return f"{n} shard(s) not yet written whole, each written anew (a shard written whole is left as it is)"
    return (
        f"{n} task(s), each resuming from the newest checkpoint in its run dir (or starting anew where there is "
        "none; a task that had finished training goes on with what followed it)"
    )


def _command_parser(command: str) -> argparse.ArgumentParser:
    parser = _parser(command)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a sweep dir (RUN_ROOT/NAME) or a task's run dir in it")
    if command == "status":
        parser.add_argument("--json", action="store_true", help="the rows as JSON")
    if command == "logs":
        parser.add_argument("task", metavar="TASK", nargs="?", help="task name or index (not needed for one task)")
        parser.add_argument("--tail", type=int, metavar="N", help="only the last N lines of each file")
    return parser


def main(args: list[str] | None = None) -> None:
    """Entry point of ``spherinator-submit``."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] == "predict":
            ns, extra = _predict_parser().parse_known_args(argv[1:])
            if not ns.config:
                raise SubmitError("no config given; pass the run's config, e.g. -c runs/NAME/TASK/config.yaml")
            rc = submit_predict(ns, _check_overrides(extra))
        elif argv and argv[0] in ("status", "cancel", "logs"):
            ns = _command_parser(argv[0]).parse_args(argv[1:])
            if argv[0] == "status":
                rc = status(ns.run_dir, as_json=ns.json)
            elif argv[0] == "cancel":
                rc = cancel(ns.run_dir)
            else:
                if ns.tail is not None and ns.tail < 0:
                    raise SubmitError(f"--tail {ns.tail}: give a number of lines >= 0")
                rc = logs(ns.run_dir, ns.task, ns.tail)
        else:
            ns, extra = _build_parser().parse_known_args(argv)
            overrides = _check_overrides(extra)
            if ns.resume:
                if ns.config or overrides or ns.sweep or ns.sweep_file or ns.predict or ns.predict_shards:
                    raise SubmitError("--resume takes the sweep's own configs; give only resources with it")
                rc = resume(ns)
            else:
                rc = submit(ns, overrides)
    except SubmitError as err:
        print(f"spherinator-submit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if rc:
        raise SystemExit(rc)


# status, logs and cancel live in spherinator.submit.monitor; their names stay importable from here.
__all__ = [
    "NOT_SUBMITTED", "TaskStatus", "cancel", "code_snapshot", "dry_run_text", "logs", "main", "print_table",
    "read_manifest", "sbatch_parameters", "status", "task_rows",
]  # fmt: skip
