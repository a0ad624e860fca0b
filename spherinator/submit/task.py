"""What runs inside each Slurm task: ``spherinator fit`` on the run dir's config, requeue on USR2, ONNX export, atlas.

Importing this module costs neither torch nor Lightning (Submitit unpickles :class:`TrainingTask` in every task,
and ``spherinator-submit`` imports it to submit); the task imports them when it runs. How a task checkpoints and
requeues on Slurm's signal is in :mod:`spherinator.submit.requeue`.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from spherinator.submit.records import (
    COMPLETED,
    EMBEDDING,
    AtlasResult,
    EmbeddingsResult,
    OnnxResult,
    RunSummary,
)


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: of ``requeue.ckpt`` (saved on a signal) and ``last.ckpt``, the one that loads
    at the higher global step (:func:`spherinator.runs.newest_checkpoint`)."""
    from spherinator.runs import RESUMABLE
    from spherinator.runs import newest_checkpoint as newest

    return newest(Path(run_dir) / "checkpoints", RESUMABLE)


def resume_point(run_dir: Path) -> tuple[Path | None, str | None]:
    """The checkpoint to resume from and, when the newest one is damaged, that one's path (a kill while it was
    written, from before checkpoints were written atomically): the intact one of the run at the highest step is
    used (:func:`spherinator.runs.resume_point`)."""
    from spherinator.runs import resume_point as point

    chosen, damaged = point(run_dir)
    if damaged is not None:
        print(f"warning: {damaged} does not load; resuming from {chosen}", file=sys.stderr)
    return chosen, str(damaged) if damaged is not None else None


def _link_logs(run_dir: Path) -> None:
    """Links to this process's Submitit stdout/stderr files in ``run_dir/logs`` (logs stay in one place)."""
    try:
        import submitit

        env = submitit.JobEnvironment()
        logs = run_dir / "logs"
        logs.mkdir(exist_ok=True)
        for source in (env.paths.stdout, env.paths.stderr):
            link = logs / Path(source).name
            if not link.is_symlink():
                link.symlink_to(Path(source).resolve())
    except (RuntimeError, OSError):
        pass  # not inside a Submitit job, or a link raced with another rank


def _package_dir() -> Path:
    import spherinator

    return Path(spherinator.__file__).resolve().parent


def package_files(package: Path) -> list[Path]:
    """The files of a package dir that make up its code (no byte-code caches)."""
    return sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def code_hash(package: Path | None = None) -> str:
    """``sha256:<16 hex>`` of the spherinator package's files (default: the one imported)."""
    package = package or _package_dir()
    digest = hashlib.sha256()
    for path in package_files(package):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"sha256:{digest.hexdigest()[:16]}"


def git_state(package: Path) -> str | None:
    """``<commit>`` or ``<commit>+uncommitted changes`` of the checkout ``package`` is in; None outside git."""
    try:
        run = {"cwd": package, "capture_output": True, "text": True, "timeout": 20, "check": True}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+uncommitted changes" if dirty else commit


_INHERITED_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def _rank() -> int:
    for var in ("SLURM_PROCID", "RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class TrainingTask:
    """One task of a sweep, as Submitit runs it in every Slurm task (one per process/device).

    Submitit requeues any callable with a ``checkpoint`` method (it checks ``hasattr``), so no Submitit base class
    is needed: ``submitit`` is only imported inside the job, and ``RequeueOnSignal`` (in every task's config)
    stays cheap to import.

    Args:
        run_dir: The task's run dir holding the composed ``config.yaml``.
        cwd: Working directory of the submission (relative data paths in the config are relative to it).
        export: Export the best (else last) checkpoint to ``run_dir/onnx`` after training, and validate it.
        atlas_order: After the export, write ``run_dir/atlas`` (``spherinator atlas``) with HiPS orders 0..this and
            refresh the sweep's ``atlas.html``; None: no atlas.
        code_version: The code the task was submitted with (:func:`code_hash` of the sweep's code snapshot, then
            its git state): a task that would import other code refuses to run.
        predict: After the export (and atlas), embed every row into ``run_dir/embeddings`` as ``spherinator-submit
            predict`` does, in this task, over this many shards (0: one per row group, at most 32); None: no
            embedding. The shards are written one after another in this process (the task holds the node and has
            the model at hand); a requeue mid-embedding goes on with the shards not yet written whole.
    """

    def __init__(
        self,
        run_dir: str | Path,
        cwd: str | Path | None = None,
        export: bool = True,
        code_version: str | None = None,
        atlas_order: int | None = None,
        predict: int | None = None,
    ) -> None:
        self.run_dir = str(Path(run_dir).resolve())
        self.cwd = str(cwd or Path.cwd())
        self.export = export
        self.code_version = code_version
        self.atlas_order = atlas_order
        self.predict = predict

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by Submitit on USR2 (rank 0): resubmit this task; it resumes from the newest checkpoint, or, when
        the signal came while it embedded every row, goes on with the shards not yet written."""
        from submitit.helpers import DelayedSubmission

        summary = RunSummary.read(self.run_dir)
        if summary.state == EMBEDDING:  # while training, RequeueOnSignal records the requeue
            summary.requeued().save(self.run_dir)
        return DelayedSubmission(
            TrainingTask(self.run_dir, self.cwd, self.export, self._code_version, self._atlas_order, self._predict)
        )

    @property
    def _code_version(self) -> str | None:
        return getattr(self, "code_version", None)  # tasks pickled before code versions were recorded have none

    @property
    def _predict(self) -> int | None:
        return getattr(self, "predict", None)  # tasks pickled before --predict existed embed nothing

    @property
    def _atlas_order(self) -> int | None:
        return getattr(self, "atlas_order", None)  # tasks pickled before the atlas existed write none

    def _check_code(self) -> None:
        """Refuse to train with other code than the task was submitted with."""
        expected = self._code_version
        if not expected:
            return
        running = code_hash()
        if running != expected.split()[0]:
            raise RuntimeError(
                f"this task was submitted with spherinator {expected} but imports {running} from {_package_dir()}: "
                "the sweep's code snapshot is missing or was changed; submit the sweep again"
            )

    def __call__(self) -> dict[str, Any] | None:
        from spherinator.submit.requeue import REQUEUE_SIGNAL, best_model, ignore_signal_from_now_on, logged_metrics

        os.chdir(self.cwd)
        if self.cwd not in sys.path:  # Python started in the code snapshot: modules of the submit dir, last
            sys.path.append(self.cwd)
        # sbatch exports the submitting shell's environment: a MASTER_PORT or RANK left there by an earlier
        # torch.distributed run must not steer this job's rendezvous, which Lightning derives from Slurm.
        for var in _INHERITED_DIST_VARS:
            os.environ.pop(var, None)
        run_dir = Path(self.run_dir)
        rank = _rank()
        _link_logs(run_dir)
        REQUEUE_SIGNAL.install()
        if self._predict is not None and RunSummary.read(run_dir).state in (EMBEDDING, COMPLETED):
            return self._embed_only(run_dir, rank)  # trained and exported: a requeue goes on embedding
        trainer = self._fit(run_dir, rank)
        if rank != 0:
            ignore_signal_from_now_on()
            return None
        best, last = best_model(trainer), newest_checkpoint(run_dir)
        summary = RunSummary.read(run_dir)
        summary.trained(trainer.current_epoch, trainer.global_step, logged_metrics(trainer), best, str(last or ""))
        summary.save(run_dir)
        onnx = self._export(run_dir, trainer, best.checkpoint if best else None) if self.export else None
        atlas = self._atlas(run_dir) if self._atlas_order is not None else None
        embeddings = None
        if self._predict is not None:
            embeddings = self._embed(run_dir, RunSummary.read(run_dir).embedding(onnx, atlas).save(run_dir))
        done = RunSummary.read(run_dir).completed(onnx, atlas, embeddings).save(run_dir)
        ignore_signal_from_now_on()
        return done.to_dict() | {"run_dir": str(run_dir)}

    def _fit(self, run_dir: Path, rank: int) -> Any:
        """``spherinator fit`` of the run dir's config, resumed from its newest checkpoint; the trainer after it."""
        from spherinator.cli import SpherinatorCLI

        argv, sys.argv = sys.argv, sys.argv[:1]  # Submitit's own arguments are not for the CLI
        try:
            self._check_code()
            resume, damaged = resume_point(run_dir)
            args = ["fit", "--config", str(run_dir / "config.yaml")]
            if resume is not None:
                args += ["--ckpt_path", str(resume)]
            if rank == 0:
                summary = RunSummary.read(run_dir)
                summary.start_attempt(
                    os.environ.get("SLURM_JOB_ID"), socket.gethostname(), str(resume) if resume else None, damaged,
                    self._code_version,
                ).save(run_dir)  # fmt: skip
            return SpherinatorCLI(args=args).trainer
        except BaseException as err:
            if rank == 0 and not isinstance(err, SystemExit):
                RunSummary.read(run_dir).failed(err, traceback.format_exc(limit=20)).save(run_dir)
            raise
        finally:
            sys.argv = argv

    def _embed_only(self, run_dir: Path, rank: int) -> dict[str, Any] | None:
        """A new attempt of a task that was embedding every row when it was requeued (or killed and resumed): no
        fit, export or atlas again, only the shards not yet written whole."""
        from spherinator.submit.requeue import ignore_signal_from_now_on

        if rank != 0:  # the other ranks of a multi-node task have nothing to do
            ignore_signal_from_now_on()
            return None
        summary = RunSummary.read(run_dir)
        try:
            self._check_code()
        except RuntimeError as err:
            summary.failed(err, traceback.format_exc(limit=20)).save(run_dir)
            raise
        summary.start_attempt(os.environ.get("SLURM_JOB_ID"), socket.gethostname(), None, None, self._code_version)
        summary.state = EMBEDDING
        embeddings = self._embed(run_dir, summary.save(run_dir))
        done = RunSummary.read(run_dir).completed(summary.onnx, summary.atlas, embeddings).save(run_dir)
        ignore_signal_from_now_on()
        return done.to_dict() | {"run_dir": str(run_dir)}

    def _embed(self, run_dir: Path, summary: RunSummary) -> EmbeddingsResult:
        """Embed every row with the checkpoint exported (else the best, else the last) into ``run_dir/embeddings``
        (:func:`spherinator.submit.predict.embed_run`); failures are reported, not raised (the trained model is what
        the task is for). A requeue or SIGTERM (SystemExit) leaves the shards written whole for the next attempt."""
        from spherinator.submit.predict import EMBEDDINGS_DIR, embed_run

        path = str(run_dir / EMBEDDINGS_DIR)
        checkpoint = (
            (summary.onnx.checkpoint if summary.onnx else None)
            or (summary.best.checkpoint if summary.best else None)
            or summary.last_checkpoint
        )
        if not checkpoint:
            return EmbeddingsResult(path, error=f"no checkpoint under {run_dir / 'checkpoints'} to embed with")
        try:
            return embed_run(run_dir, checkpoint, self._predict or None)
        except Exception as err:
            return EmbeddingsResult(path, checkpoint, error=f"{type(err).__name__}: {err}")

    def _export(self, run_dir: Path, trainer: Any, best: str | None) -> OnnxResult:
        """Export the ``best`` (else last) checkpoint to ONNX and validate it; failures are reported, not raised."""
        from spherinator.export import ExportError, ValidationError, export_onnx

        ckpt = Path(best) if best else None
        if ckpt is None or not ckpt.is_file():
            last = Path(trainer.checkpoint_callback.last_model_path) if trainer.checkpoint_callback else None
            ckpt = last if last is not None and last.is_file() else newest_checkpoint(run_dir)
        if ckpt is None:
            return OnnxResult(validated=False, error=f"no checkpoint under {run_dir / 'checkpoints'} to export")
        out = run_dir / "onnx"
        try:
            report = export_onnx(ckpt, out, config=run_dir / "config.yaml", overwrite=True)
        except ValidationError as err:
            return OnnxResult(False, str(ckpt), str(out), error=str(err), report=err.report)
        except ExportError as err:
            return OnnxResult(False, str(ckpt), str(out), error=str(err))
        graphs = sorted(report.get("graphs", {}))
        return OnnxResult(bool(report.get("passed")), str(ckpt), str(out), graphs=graphs)

    def _atlas(self, run_dir: Path) -> AtlasResult:
        """Write ``run_dir/atlas`` from the run (its ONNX decoder, its checkpoint, its config's data) and refresh
        the sweep's ``atlas.html``; failures are reported, not raised (the trained model is what the task is for)."""
        from spherinator.atlas import NotASphereError, write_atlas, write_sweep_page

        out = run_dir / "atlas"
        try:
            info = write_atlas(run_dir, out=out, max_order=self._atlas_order, overwrite=True, progress=False)
        except NotASphereError as err:  # e.g. a sweep over z_dim: only z_dim 3 is a sphere to draw
            return AtlasResult(written=False, path=None, skipped=str(err))
        except Exception as err:
            return AtlasResult(written=False, path=str(out), error=f"{type(err).__name__}: {err}")
        result = AtlasResult(
            written=True,
            path=info["path"],
            page=str(Path(info["path"]) / "index.html"),
            max_order=info["hips"]["max_order"],
            tiles=info["hips"]["tiles"],
            rows=info["catalog"]["rows"],
            seconds=round(info["hips"]["seconds"] + info["catalog"]["seconds"], 1),
        )
        try:
            result.sweep_page = str(write_sweep_page(run_dir.parent))
        except Exception as err:
            result.sweep_page_error = f"{type(err).__name__}: {err}"
        return result
