"""Embed a dataset on the cluster: ``spherinator-submit predict`` as a Slurm array of shards, one Parquet file each.

The rows are split with the data layer's own plan: shard ``k`` of ``n`` is what rank ``k`` of ``n`` reads of the
DataModule's ``predict`` split (:func:`spherinator.data.plan.pass_plan`, unshuffled, one worker), without the rows
that plan repeats to even out ranks. Each array task writes its shard under a staged name and renames it when whole
(:func:`spherinator.staging.staged_file`): a task killed or requeued mid-shard leaves no shard file, and its next
attempt redoes that shard (and only that one; a shard already written is left as it is). Every row is in exactly one
shard.

The sweep dir (``RUN_ROOT/NAME``) holds ``sweep.json`` (its :class:`~spherinator.submit.records.PredictJob` says what
is embedded), ``code/``, ``submitit/`` and ``embeddings/``, the embedding set::

    embeddings/
      shard-00000.parquet   the columns `spherinator predict` writes (location, scale for a VAE, the per-row
      shard-00001.parquet   columns the data section loads such as id) plus `row`, the row id (int64)
      ...
      _manifest.json        which rows are where (EmbeddingSet): pyarrow and duckdb skip "_" files

``_manifest.json`` (:class:`~spherinator.submit.records.EmbeddingSet`)::

    {"data": "/abs/data", "files": ["part-0.parquet", ...],      # source files, relative to data
     "row_groups": [[16, 16], ...],                                # rows per row group per file, when planned
     "rows": 96, "batch_size": 16, "row_column": "row", "checkpoint": "/abs/x.ckpt", "onnx": null,
     "shards": [{"index": 0, "file": "shard-00000.parquet", "rows": 48,
                 "segments": [{"file": 0, "group": 0, "start": 0, "stop": 16, "row": 0}, ...]}, ...]}

A segment is rows ``[start, stop)`` of row group ``group`` of source file ``files[file]``, whose row ids are
``row ..``; a shard's rows are its segments' rows in order. Row ids number the rows of the source files in file
order (files sorted, row groups in order): ``0 .. rows - 1``. A task's shard file exists only whole; the set is
complete when every shard's file is whole (:meth:`~spherinator.submit.records.EmbeddingSet.damage`: its Parquet
footer holds the shard's rows), so a file made or cut by hand is written again.

A training task submitted with ``--predict`` writes the same set into its run dir after its export, one shard after
another in its own process (:func:`embed_run`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spherinator.errors import DataError, OutputError
from spherinator.submit.records import (
    EmbeddingSet,
    EmbeddingShard,
    EmbeddingsResult,
    ShardSegment,
    read_embedding_set,
    write_embedding_set,
)
from spherinator.submit.sweep import SubmitError

if TYPE_CHECKING:
    from spherinator.data.plan import Segment

# Importing this module costs no torch (``spherinator-submit status`` imports it): the data layer is imported where
# it is used, inside the functions that plan and write shards.
EMBEDDINGS_DIR = "embeddings"
SHARD_NAME = "shard-{:05d}.parquet"
MAX_DEFAULT_TASKS = 32  # default: one task per row group, up to this many
_FIT_ONLY_KEYS = ("ckpt_path", "weights_only")  # in a run's config.yaml: arguments of `fit`, not of the model or data
_INHERITED_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


# What to do when what encodes an embedding set changed since it was planned.
REPLAN = "embed with a checkpoint that nothing writes any more (copy it) and submit the predict again"


def shard_rows(reader: Any, shard: int, tasks: int) -> list[Segment]:
    """The rows shard ``shard`` of ``tasks`` holds: what rank ``shard`` of ``tasks`` reads of ``reader`` (a
    :class:`~spherinator.data.reader.ParquetReader` of the predict split) in one unshuffled pass, cut to its own rows
    (the plan repeats rows from the start of the epoch where a rank has fewer rows than batches)."""
    from spherinator.data.plan import Segment, pass_plan

    segments, _ = pass_plan(
        reader.segments, reader.batch_size, shard, tasks, 0, 1, drop_last=False, shuffle=False
    )  # fmt: skip
    own = reader.num_rows // tasks + (shard < reader.num_rows % tasks)
    kept: list[Segment] = []
    for seg in segments:
        if own <= 0:
            break
        kept.append(Segment(seg.file, seg.group, seg.start, seg.start + min(seg.rows, own)))
        own -= kept[-1].rows
    return kept


def _row_bases(groups: list[tuple[int, int, int]]) -> dict[tuple[int, int], int]:
    """The row id of the first row of each (file, row group): rows numbered in file order."""
    bases, total = {}, 0
    for file, group, rows in groups:
        bases[(file, group)] = total
        total += rows
    return bases


def _shard_segments(segments: list[Segment], bases: dict[tuple[int, int], int]) -> list[ShardSegment]:
    return [ShardSegment(s.file, s.group, s.start, s.stop, bases[(s.file, s.group)] + s.start) for s in segments]


def plan_embedding_set(datamodule: Any, tasks: int | None = None, flag: str = "--tasks") -> EmbeddingSet:
    """The shards of ``datamodule``'s predict split over ``tasks`` array tasks (default: one per row group, at most
    :data:`MAX_DEFAULT_TASKS`), and which rows each holds.

    Raises:
        SubmitError: more tasks than rows, or fewer than one (named as the option ``flag`` that gave them).
    """
    index = datamodule.index
    total = index.num_rows
    if tasks is None:
        tasks = max(1, min(MAX_DEFAULT_TASKS, sum(1 for _, _, rows in index.groups if rows)))
    if not 1 <= tasks <= total:
        raise SubmitError(f"{flag} {tasks}: give 1 to {total} (the rows under {str(index.path)!r})")
    bases = _row_bases(index.groups)
    shards = []
    for k in range(tasks):
        reader = datamodule.dataset("predict", rank=k, world_size=tasks).reader
        segments = _shard_segments(shard_rows(reader, k, tasks), bases)
        shards.append(EmbeddingShard(k, SHARD_NAME.format(k), sum(s.stop - s.start for s in segments), segments))
    _check_every_row_once(shards, total)
    data, files, per_file = _source(index)
    return EmbeddingSet(
        data=data, files=files, row_groups=per_file, rows=total, batch_size=reader.batch_size, shards=shards
    )  # fmt: skip


def _source(index: Any) -> tuple[str, list[str], list[list[int]]]:
    """The data dir (absolute), its files (relative to it) and the rows of each row group of each file."""
    root = index.path if index.path.is_dir() else index.path.parent
    per_file: list[list[int]] = [[] for _ in index.files]
    for file, _, rows in index.groups:
        per_file[file].append(rows)
    return str(root.resolve()), [str(f.relative_to(root)) for f in index.files], per_file


def _check_every_row_once(shards: list[EmbeddingShard], total: int) -> None:
    """The shards' row ids are ``0 .. total - 1``, each once (the plan's promise, checked before anything runs)."""
    spans = sorted((seg.row, seg.row + seg.stop - seg.start) for shard in shards for seg in shard.segments)
    end = 0
    for start, stop in spans:
        if start != end:
            raise RuntimeError(f"the shard plan {'repeats' if start < end else 'misses'} row {min(start, end)}")
        end = stop
    if end != total:
        raise RuntimeError(f"the shard plan holds {end} of {total} rows")


def row_ids(shard: EmbeddingShard) -> Any:
    """The row ids of a shard's rows, in its file's order: (rows,) int64."""
    import numpy as np

    parts = [np.arange(s.row, s.row + s.stop - s.start, dtype=np.int64) for s in shard.segments]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- inside a task
def _torch_encoder(model: Any, datamodule: Any) -> Callable[[Any], Any]:
    """``predict_step`` of the checkpoint's model, each batch moved as Lightning moves it (the DataModule's
    transfer hooks): the columns ``spherinator predict`` writes."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    def encode(batch: Any) -> Any:
        batch = datamodule.on_before_batch_transfer(batch, 0)
        batch = datamodule.transfer_batch_to_device(batch, device, 0)
        batch = datamodule.on_after_batch_transfer(batch, 0)
        with torch.inference_mode():
            return model.predict_step(batch, 0)

    return encode


def _onnx_encoder(onnx_dir: str, datamodule: Any) -> Callable[[Any], Any]:
    """The export's ``encoder.onnx`` in onnxruntime: ``location`` and the batch's per-row columns."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from spherinator.models.autoencoder import model_input

    session = ort.InferenceSession(str(Path(onnx_dir) / "encoder.onnx"), providers=ort.get_available_providers())
    name = session.get_inputs()[0].name

    def encode(batch: Any) -> dict[str, Any]:
        batch = datamodule.on_after_batch_transfer(batch, 0)  # on the CPU: any scaling the DataModule does there
        x = model_input(batch)
        (location,) = session.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        out = {"location": location}
        for key, column in list(batch.items())[1:] if isinstance(batch, dict) else ():
            if isinstance(column, torch.Tensor) and column.dim() == 1 or isinstance(column, list):
                out[key] = column  # ids, labels, object names: as predict_step carries them
        return out

    return encode


def _batch_rows(batch: Any) -> int:
    from spherinator.models.autoencoder import model_input

    return len(model_input(batch))


def _write(path: Path, batches: Iterator[Any], encode: Callable[[Any], Any], ids: Any, column: str) -> int:
    """Encode ``batches`` into the Parquet file ``path`` (the ids' rows, in order); returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spherinator.callbacks.embeddings import prediction_table

    writer, done = None, 0
    try:
        for batch in batches:
            n = min(_batch_rows(batch), len(ids) - done)
            if n <= 0:  # the plan's repeated rows, past this shard's own
                break
            table = prediction_table(encode(batch)).slice(0, n)
            if column in table.column_names:  # two columns of one name: no reader tells them apart
                raise DataError(f"the embeddings already have a column '{column}' (the row id's); rename that column")
            table = table.append_column(column, pa.array(ids[done : done + n]))
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            done += n
    finally:
        if writer is not None:
            writer.close()
    return done


def write_shard(
    embeddings: str | Path, shard: int, cli_args: list[str], checkpoint: str, onnx: str | None = None
) -> dict[str, Any]:
    """Write shard ``shard`` of the embedding set in ``embeddings`` (what an array task runs); a shard already
    written whole is left as it is. Returns ``{"shard", "file", "rows", "skipped"}``.

    Raises:
        DataError: the data changed since the set was planned (other rows would land in this shard), or the set
            has no shard ``shard``.
        OutputError: the shard cannot be written (full or read-only disk).
    """
    plan = read_embedding_set(embeddings)
    if not 0 <= shard < len(plan.shards):  # not plan.shards[-1]: another task's shard
        raise DataError(f"shard {shard}: {embeddings} holds shards 0 to {len(plan.shards) - 1}")
    return write_shards(embeddings, cli_args, checkpoint, onnx, [shard])[0]


def write_shards(
    embeddings: str | Path, cli_args: list[str], checkpoint: str, onnx: str | None = None,
    shards: list[int] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Write the shards ``shards`` (default: all) of the embedding set in ``embeddings`` one after another in this
    process, the model built once; a shard already written whole (:meth:`EmbeddingSet.damage`) is left as it is.
    Returns one ``{"shard", "file", "rows", "skipped"}`` per shard. Raises as :func:`write_shard`."""
    from spherinator.runs import build

    embeddings = Path(embeddings)
    plan = read_embedding_set(embeddings)
    results = []
    for k in range(len(plan.shards)) if shards is None else shards:
        record = plan.shards[k]
        whole = plan.damage(embeddings, record) is None
        results.append({"shard": k, "file": str(embeddings / record.file), "rows": record.rows, "skipped": whole})
    todo = [result["shard"] for result in results if not result["skipped"]]
    if todo:
        _check_encoder(plan, checkpoint, onnx)
        model, datamodule = build(cli_args, checkpoint)
        _check_encoder(plan, checkpoint, onnx)  # written again while it was being read
        encode = _onnx_encoder(onnx, datamodule) if onnx else _torch_encoder(model, datamodule)
        for k in todo:
            _write_planned(embeddings, plan, k, datamodule, encode)
    return results


def _check_encoder(plan: EmbeddingSet, checkpoint: str, onnx: str | None) -> None:
    problem = plan.encoder_problem(checkpoint, onnx)
    if problem:
        raise DataError(f"{problem}; {REPLAN}")


def _write_planned(embeddings: Path, plan: EmbeddingSet, shard: int, datamodule: Any, encode: Callable) -> None:
    """Write shard ``shard`` of ``plan`` whole (staged, then renamed), after checking that the data still gives it
    the rows it was planned with."""
    from spherinator.staging import exit_on_sigterm, staged_file

    record = plan.shards[shard]
    for stale in embeddings.glob(f".{record.file}.partial-*"):  # an attempt killed mid-shard (SIGKILL) left it
        stale.unlink(missing_ok=True)
    stream = datamodule.dataset("predict", rank=shard, world_size=len(plan.shards))
    planned = _shard_segments(shard_rows(stream.reader, shard, len(plan.shards)), _row_bases(datamodule.index.groups))
    _, files, row_groups = _source(datamodule.index)
    if planned != record.segments or (files, row_groups) != (plan.files, plan.row_groups):  # a file renamed too
        raise DataError(
            f"the data under {plan.data} changed since this predict was planned (shard {shard} would hold other "
            "rows); submit the predict again"
        )
    with exit_on_sigterm(), staged_file(embeddings / record.file, OutputError, "embeddings shard") as staged:
        done = _write(staged, iter(stream), encode, row_ids(record), plan.row_column)
        if done != record.rows:
            raise DataError(f"shard {shard} read {done} of its {record.rows} rows from {plan.data}; submit again")


def embed_run(run_dir: str | Path, checkpoint: str, shards: int | None = None) -> EmbeddingsResult:
    """Embed every row of a training task's data with ``checkpoint`` into ``run_dir/embeddings``, in this process:
    the step a training task submitted with ``--predict`` runs after its export. The set is what ``spherinator-submit
    predict`` writes (same shards, same ``_manifest.json``), planned over ``shards`` shards (default: one per row
    group, at most :data:`MAX_DEFAULT_TASKS`) and written one shard after another; a requeued task keeps the set it
    planned and writes only the shards not yet whole. A set planned with another checkpoint is planned anew.

    Raises:
        DataError, OutputError, SubmitError: as :func:`write_shards` and :func:`plan_embedding_set`; OutputError
            also where ``run_dir/embeddings`` is a file or a link to be planned anew, or cannot be written.
        ConfigError: as :func:`run_config_args`.
    """
    from spherinator.runs import build

    started = time.monotonic()
    embeddings, cli_args = Path(run_dir) / EMBEDDINGS_DIR, run_config_args(run_dir)
    plan = _plan_of(embeddings, checkpoint)
    if plan is None:
        _check_replaceable(embeddings)
        _, datamodule = build(cli_args, checkpoint)
        plan = plan_embedding_set(datamodule, shards, "--predict-shards")
        plan.encoded_by(checkpoint)
        shutil.rmtree(embeddings, ignore_errors=True)  # shards of another checkpoint's model
        try:
            embeddings.mkdir(parents=True)
            write_embedding_set(embeddings, plan)
        except OSError as err:
            raise OutputError(
                f"cannot write '{embeddings}' ({err.strerror or err}); free space or make it writable"
            ) from err
    write_shards(embeddings, cli_args, checkpoint)
    written = plan.written(embeddings)
    if len(written) != len(plan.shards):  # each shard is checked as it is written: a file changed under us
        missing = next(shard for shard in plan.shards if shard not in written)
        raise DataError(f"{missing.file} in {embeddings} is not whole after writing it: "
                        f"{plan.damage(embeddings, missing)}")  # fmt: skip
    return EmbeddingsResult(
        str(embeddings), checkpoint, len(written), len(plan.shards), sum(shard.rows for shard in written),
        round(time.monotonic() - started, 1),
    )  # fmt: skip


def _check_replaceable(embeddings: Path) -> None:
    """Refuse to plan a new set where ``embeddings`` is no directory of this run (a file, or a link: what it points
    to is not this run's to clear)."""
    if embeddings.is_symlink() or embeddings.exists() and not embeddings.is_dir():
        what = "a link" if embeddings.is_symlink() else "a file"
        raise OutputError(f"'{embeddings}' is {what}, where this run's embeddings go; move it away")


def run_config_args(run_dir: str | Path) -> list[str]:
    """``-c`` of a task's ``config.yaml`` (the config ``spherinator fit`` ran) as :func:`spherinator.runs.build`
    takes it: without the keys of the ``fit`` subcommand itself (``ckpt_path``, ``weights_only``), which a config of
    no subcommand does not accept.

    Raises:
        ConfigError: the run dir has no ``config.yaml``, or it is no YAML mapping.
    """
    import yaml

    from spherinator.errors import ConfigError

    path = Path(run_dir) / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        why = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise ConfigError(f"'{path}' cannot be read as YAML ({why}); restore the run's config.yaml") from err
    if not isinstance(config, dict):
        raise ConfigError(f"'{path}' holds {type(config).__name__}, not a config; restore the run's config.yaml")
    for key in _FIT_ONLY_KEYS:
        config.pop(key, None)
    return ["-c", yaml.safe_dump(config, sort_keys=False)]


def check_predict_target(config_text: str, run_dir: Path, shards: int | None, count_rows: bool = True) -> None:
    """For ``--predict``, before anything is queued: the task of ``config_text`` (its composed config) would write
    its embeddings outside the data it reads, and (``count_rows``) that data holds at least ``shards`` rows. A data
    path that is no local path (a Hub dataset id, another DataModule's argument) is left to the task.

    Raises:
        SubmitError: naming the run dir or ``--predict-shards`` and the data.
    """
    path = check_run_outside_data(config_text, run_dir, "whose embedding shards a requeued task would read as data")
    if path is not None and count_rows and shards is not None:
        import pyarrow.parquet as pq

        from spherinator.data.reader import find_parquet_files

        rows = sum(pq.read_metadata(file).num_rows for file in find_parquet_files(path))
        if shards > rows:
            raise SubmitError(f"--predict-shards {shards}: give 1 to {rows} (the rows under {path!r})")


def check_run_outside_data(config_text: str, run_dir: Path, why: str) -> str | None:
    """Refuse a run dir inside the data the task of ``config_text`` reads: the data index reads every .parquet below
    the data's folder, so what the task writes there as Parquet (``why``) would join the data. Returns the data path
    when it is a local path (None for a Hub dataset id or another DataModule's argument, left to the task).

    Raises:
        SubmitError: naming the run dir, the data folder and ``why``.
    """
    import yaml

    data = yaml.safe_load(config_text).get("data")
    path = (data.get("init_args") or {}).get("path") if isinstance(data, dict) else None
    if not isinstance(path, str) or not Path(path).expanduser().exists():
        return None
    root = Path(path).expanduser().resolve()  # one file is all the data reads: what lands beside it is no data
    if root.is_dir() and run_dir.resolve().is_relative_to(root):
        raise SubmitError(f"--run-root: the run dir '{run_dir}' is inside the data under '{root}', {why}; give a run "
                          "root outside it")  # fmt: skip
    return path


def _plan_of(embeddings: Path, checkpoint: str) -> EmbeddingSet | None:
    """The set planned in ``embeddings`` for ``checkpoint``; None for none, another checkpoint's or a damaged one."""
    try:
        plan = read_embedding_set(embeddings)
    except SubmitError:
        return None
    return plan if plan.checkpoint == checkpoint and plan.encoder_problem(checkpoint) is None else None


class PredictTask:
    """One array task of a predict sweep: writes one shard (:func:`write_shard`).

    Submitit requeues a callable with a ``checkpoint`` method on Slurm's signal (time limit, preemption): the
    requeued task redoes its shard from the start (a shard is the unit of work; its partial file is removed).

    Args:
        embeddings: The embedding set's directory (its ``_manifest.json`` was written at submit).
        shard: The shard this task writes.
        cwd: Working directory of the submission (relative paths in the configs are relative to it).
        cli_args: ``-c`` files and overrides, as for ``spherinator fit``.
        ckpt_path: The checkpoint whose model embeds.
        onnx: An ONNX export dir to encode with (onnxruntime) instead of the checkpoint's model in torch.
    """

    def __init__(
        self, embeddings: str | Path, shard: int, cwd: str | Path, cli_args: list[str], ckpt_path: str,
        onnx: str | None = None,
    ) -> None:  # fmt: skip
        self.embeddings = str(embeddings)
        self.shard = shard
        self.cwd = str(cwd)
        self.cli_args = list(cli_args)
        self.ckpt_path = ckpt_path
        self.onnx = onnx

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by Submitit on USR2: requeue this task; it redoes its shard."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)

    def __call__(self) -> dict[str, Any]:
        os.chdir(self.cwd)
        if self.cwd not in sys.path:  # Python started in the code snapshot: modules of the submit dir, last
            sys.path.append(self.cwd)
        for var in _INHERITED_DIST_VARS:  # one process per task: no rendezvous from the submitting shell
            os.environ.pop(var, None)
        argv, sys.argv = sys.argv, sys.argv[:1]  # Submitit's own arguments are not for the CLI
        try:
            result = write_shard(self.embeddings, self.shard, self.cli_args, self.ckpt_path, self.onnx)
        finally:
            sys.argv = argv
        print(f"shard {self.shard}: {result['rows']} rows in {result['file']}", flush=True)
        return result


def embeddings_line(embeddings: str) -> tuple[str, dict[str, Any]]:
    """What ``status`` says of an embedding set: one line, and the figures for ``--json``. A shard file that is not
    whole (made or cut by hand: no Parquet file, other rows than planned) counts as not written and is named."""
    try:
        plan = read_embedding_set(embeddings)
    except SubmitError as err:
        return f"embeddings: {err}", {"dir": embeddings, "error": str(err)}
    written = plan.written(embeddings)
    damaged = plan.damaged(embeddings)
    rows = sum(shard.rows for shard in written)
    missing = [shard.file for shard in plan.shards if shard not in written]
    figures = {"dir": embeddings, "shards": len(plan.shards), "written": len(written), "rows": plan.rows,
               "rows_written": rows, "missing": missing, "damaged": damaged}  # fmt: skip
    line = f"embeddings: {len(written)}/{len(plan.shards)} shards, {rows:,}/{plan.rows:,} rows in {embeddings}"
    problem = plan.encoder_problem() if missing else None
    if problem:
        figures["error"] = problem
        line += f" ({problem}; {REPLAN})"
    if damaged:
        file, why = next(iter(damaged.items()))
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        line += f" ({file}{more} not whole: {why}; --resume writes it again)"
    return line, figures


def check_onnx_encoder(onnx_dir: str | Path, datamodule: Any) -> None:
    """Open ``onnx_dir/encoder.onnx`` in onnxruntime and run it on the data's first batch, as each task would: a file
    that is no ONNX model, or one that takes other input than the data gives, is told before anything is queued.

    Raises:
        SubmitError: naming the file, what is wrong and what to do.
    """
    import numpy as np
    import onnxruntime as ort

    from spherinator.models.autoencoder import model_input

    path = Path(onnx_dir) / "encoder.onnx"
    fix = "give the export dir of a model trained on this data (spherinator export)"
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no public base but Exception
        raise SubmitError(
            f"--onnx {onnx_dir}: '{path}' does not open in onnxruntime ({_first_line(err)}); {fix}"
        ) from err
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.dataset("predict", rank=0, world_size=1))), 0)
    x = np.ascontiguousarray(model_input(batch).numpy(), dtype=np.float32)  # (B, C, H, W) or (B, L)
    inputs = session.get_inputs()
    shape = list(inputs[0].shape)  # an int per fixed axis, a name (or None) per free one
    fits = len(shape) == x.ndim and all(not isinstance(d, int) or d == n for d, n in zip(shape, x.shape, strict=True))
    if len(inputs) != 1 or not fits:
        takes = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise SubmitError(f"--onnx {onnx_dir}: encoder.onnx takes {takes}, the data gives batches of {list(x.shape)}; "
                          f"{fix}")  # fmt: skip
    outputs = session.get_outputs()
    if len(outputs) != 1 or isinstance(shape[0], int) and len(x) > 1:  # each task's last batch is shorter
        gives = ", ".join(f"{o.name} {o.shape}" for o in outputs)
        raise SubmitError(f"--onnx {onnx_dir}: encoder.onnx takes {inputs[0].shape} and gives {gives}, where each "
                          f"batch needs a free batch axis and one output, the location; {fix}")  # fmt: skip
    for rows in (x, x[:1]):  # the full first batch and one row: a graph that fixes the batch inside fails one
        try:
            (location,) = session.run(None, {inputs[0].name: rows})
        except Exception as err:
            raise SubmitError(
                f"--onnx {onnx_dir}: encoder.onnx fails on a batch of {len(rows)} of the data's rows "
                f"({_first_line(err)}); {fix}"
            ) from err
        if location.ndim != 2 or len(location) != len(rows):
            raise SubmitError(f"--onnx {onnx_dir}: encoder.onnx gives {list(location.shape)} for a batch of "
                              f"{len(rows)} rows, not one location per row; {fix}")  # fmt: skip


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
