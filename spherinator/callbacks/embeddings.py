"""Write the embeddings of ``spherinator predict`` to Parquet, the file a sphere viewer reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException

from spherinator.errors import ConfigError, OutputError

# The exit status of a process ended by SIGTERM (128 + 15), which Slurm's scancel and time limit send.
SIGTERM_EXIT = 143


class EmbeddingWriter(BasePredictionWriter):
    """Stream the predicted latent locations (and any per-row columns such as ``id``) to Parquet.

    Each ``predict_step`` output is a dict of per-row tensors, e.g. ``location`` (B, z_dim), ``scale`` (B,) and
    ``id`` (B,), or lists of ``str`` (object names). Vectors become fixed-size list columns; scalars plain columns;
    strings string columns. One file per rank:
    ``embeddings.parquet`` on a single process, ``embeddings-rank{r}.parquet`` under DDP.

    The file is written under a staged name in the same directory (``.embeddings.parquet.partial``) and renamed to
    its final name once closed: a killed predict never leaves a torn file at the final name. When a batch fails, the
    rows before it are closed and take the final name. On SIGTERM (Slurm's ``scancel`` or time limit) the prediction
    stops after the batch being written, the partial file is removed (an earlier run's file stays as it was) and the
    process exits with status 143.

    Args:
        output_path: File (or directory, then ``embeddings.parquet`` inside) to write; defaults to the trainer's
            log directory, else the working directory.
    """

    def __init__(self, output_path: str | Path | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path) if output_path is not None else None
        self._writer: pq.ParquetWriter | None = None
        self.written_path: Path | None = None
        self._staged: Path | None = None
        self.rows = 0

    def _path(self, trainer: Trainer) -> Path:
        path = self.output_path
        if path is None:
            path = Path(trainer.log_dir or ".")
        if path.suffix != ".parquet":
            path = path / "embeddings.parquet"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        return path

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        table = prediction_table(prediction)
        try:
            if self._writer is None:
                self.written_path = self._path(trainer)
                _refuse_inside_data(trainer, self.written_path)
                self.written_path.parent.mkdir(parents=True, exist_ok=True)
                # not *.parquet: a dataset reader passing over the directory never takes a partial file for data
                self._staged = self.written_path.with_name(f".{self.written_path.name}.partial")
                self._writer = pq.ParquetWriter(self._staged, table.schema)
                self.rows = 0  # a new file: count this run's rows only
            self._writer.write_table(table)
        except OSError as err:  # a read-only or full disk, a file where a directory should be
            raise self._cannot_write(err) from err
        self.rows += table.num_rows
        if trainer.received_sigterm:  # Lightning's predict loop notes a SIGTERM but goes on: stop here
            raise SIGTERMException(SIGTERM_EXIT)

    def _cannot_write(self, err: OSError) -> ConfigError:
        return ConfigError(
            f"cannot write the embeddings to {self.written_path} ({err.strerror or err}); give a writable "
            f"place with free space (EmbeddingWriter's output_path, or --trainer.default_root_dir)"
        )

    def _close(self) -> bool:
        """Close the staged file (its footer written); False where that fails (a full disk): it is then torn."""
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
            return True
        except OSError:
            return False

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._writer is not None:
            staged, self._staged = self._staged, None
            try:
                self._writer.close()
                self._writer = None
                os.replace(staged, self.written_path)  # whole (footer written) before it takes the final name
            except OSError as err:
                self._writer = None
                staged.unlink(missing_ok=True)
                raise self._cannot_write(err) from err
            print(f"spherinator: wrote {self.rows} embeddings to {self.written_path}")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # An error in a batch: the rows before it, closed (footer written), take the final name. SIGTERM (a
        # cancelled or timed-out job, which may be requeued) or a write that failed (a full disk: the file may be
        # torn): the partial file goes, an earlier whole one stays.
        staged, self._staged = self._staged, None
        closed = self._close()
        if staged is None:
            return
        failed_write = isinstance(exception.__cause__, OSError) or isinstance(exception, OSError | OutputError)
        if closed and not (failed_write or isinstance(exception, SIGTERMException)):
            os.replace(staged, self.written_path)
        else:
            staged.unlink(missing_ok=True)


def prediction_table(prediction: torch.Tensor | dict[str, Any]) -> pa.Table:
    """The Parquet table of one ``predict_step`` output (a tensor is the ``location``): the columns
    ``spherinator predict`` writes. Vectors (B, D) become fixed-size lists, scalars (B,) plain columns, lists of
    ``str`` string columns; half-precision floats become float32."""
    if isinstance(prediction, torch.Tensor):
        prediction = {"location": prediction}
    columns = {}
    for name, value in prediction.items():
        if isinstance(value, list):  # per-row strings such as object names
            columns[name] = pa.array(value, type=pa.string())
            continue
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
                value = value.float()  # bfloat16/float16 model outputs; per-row float64 columns stay exact
            value = value.numpy()
        array = np.asarray(value)  # onnxruntime's outputs are numpy arrays already
        if array.ndim == 1:
            columns[name] = pa.array(array)
        else:  # (B, D) vectors: one fixed-size list per row
            flat = pa.array(np.ascontiguousarray(array).reshape(-1))
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(array.shape[1:])))
    return pa.table(columns)


def _refuse_inside_data(trainer: Trainer, path: Path) -> None:
    """Refuse to write ``path`` into the data directory being read: the next fit would read it as data."""
    data = getattr(trainer.datamodule, "path", None) if trainer.datamodule is not None else None
    if not isinstance(data, str | Path) or not Path(data).is_dir():
        return
    root = Path(data).resolve()
    if path.resolve().is_relative_to(root):
        raise OutputError(
            f"the embeddings would go to {path}, inside the data directory {data} being read (the next fit would "
            "read them as data); give another --trainer.default_root_dir or EmbeddingWriter output_path"
        )
