"""Embedding throughput of one ``spherinator-submit predict`` array task vs a bare onnxruntime loop, side by side.

    .venv/bin/python tools/bench/bench_embed.py                    # vae_cnn3 at 3x128x128, 2,048 rows
    .venv/bin/python tools/bench/bench_embed.py --rows 8192 --repeats 3

Both read the same Parquet rows (fast layout, one file) with the same ``encoder.onnx``: the bare loop reads record
batches with pyarrow, scales uint8 to float32 and runs the session, writing nothing; the task
(:func:`spherinator.submit.predict.write_shard`, what each array task runs) builds the DataModule and model from the
config and checkpoint, reads through the data layer, encodes, and writes its staged shard with the row ids. Its rows/s
are given over its whole run and without its setup (building the DataModule and model, timed on its own). The torch
engine (the default, which also writes the ``scale`` column) is timed the same way. Runs alternate; medians.
Target: the task at >= 0.8x the bare loop's rows/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TARGET = 0.8

DATA_SECTION = """\
data:
  class_path: spherinator.data.DataModule
  init_args:
    path: {path}
    columns: [data]
    batch_size: {batch_size}
    num_workers: 0
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""


def make_run(workdir: Path, rows: int, size: int, batch_size: int, model_config: Path) -> tuple[list[str], Path, Path]:
    """A dataset, a config, a checkpoint after one training step and its ONNX export: (cli args, ckpt, onnx dir)."""
    from spherinator.cli import main as cli_main
    from spherinator.data.writer import write_dataset
    from spherinator.export import export_onnx

    images = np.random.default_rng(0).integers(0, 255, (rows, 3, size, size), dtype=np.uint8)
    write_dataset(workdir / "data", [{"data": images}], rows_per_file=rows, rows_per_group=512)
    data = workdir / "data.yaml"
    data.write_text(DATA_SECTION.format(path=workdir / "data", batch_size=batch_size))
    args = ["-c", str(model_config), "-c", str(data)]
    cli_main(["fit", *args, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
              "--trainer.default_root_dir", str(workdir / "fit")])  # fmt: skip
    (checkpoint,) = (workdir / "fit" / "checkpoints").glob("*.ckpt")
    export_onnx(checkpoint, workdir / "onnx", batch_sizes=[batch_size])
    return args, checkpoint, workdir / "onnx"


def bare_loop(files: list[Path], encoder: Path, batch_size: int) -> Callable[[], int]:
    """Read, scale, encode: the rows of ``files`` through ``encoder`` with nothing else; returns rows done."""
    import onnxruntime as ort
    import pyarrow.parquet as pq

    session = ort.InferenceSession(str(encoder), providers=ort.get_available_providers())

    def run() -> int:
        done = 0
        for file in files:
            parquet = pq.ParquetFile(file)
            shape = tuple(int(n) for n in parquet.schema_arrow.metadata[b"data_shape"].decode().strip("()").split(","))
            for batch in parquet.iter_batches(batch_size=batch_size, columns=["data"]):
                column = batch.column(0)
                width = column.type.byte_width
                raw = np.frombuffer(column.buffers()[1], np.uint8, len(column) * width, column.offset * width)
                x = raw.reshape(len(column), *shape).astype(np.float32) * np.float32(1 / 255)
                session.run(None, {"x": x})
                done += len(column)
        return done

    return run


def task_run(workdir: Path, args: list[str], checkpoint: Path, onnx: Path | None) -> Callable[[], int]:
    """One array task over every row (1 shard): what ``spherinator-submit predict`` runs per task."""
    from spherinator.runs import build
    from spherinator.submit.predict import plan_embedding_set, write_shard
    from spherinator.submit.records import write_embedding_set

    out = workdir / ("emb-onnx" if onnx else "emb-torch")
    out.mkdir()
    write_embedding_set(out, plan_embedding_set(build(args, checkpoint)[1], 1))

    def run() -> int:
        (out / "shard-00000.parquet").unlink(missing_ok=True)
        return write_shard(out, 0, args, str(checkpoint), str(onnx) if onnx else None)["rows"]

    return run


def timed(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple[float, int]]:
    """Median seconds of each function and the rows it did; calls alternate so that all see the same load."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    rows: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            rows[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), rows[name]) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--size", type=int, default=128, help="images are 3 x SIZE x SIZE uint8")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model-config", type=Path, default=REPO / "experiments" / "vae_cnn3.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    ns = parser.parse_args(argv)

    from spherinator.runs import build

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        args, checkpoint, onnx = make_run(workdir, ns.rows, ns.size, ns.batch_size, ns.model_config)
        files = sorted((workdir / "data").glob("*.parquet"))
        fns = {
            "bare onnxruntime loop": bare_loop(files, onnx / "encoder.onnx", ns.batch_size),
            "task, --onnx": task_run(workdir, args, checkpoint, onnx),
            "task, torch (default)": task_run(workdir, args, checkpoint, None),
            "task setup (DataModule + model)": lambda: (build(args, checkpoint), 0)[1],
        }
        figures = timed(fns, ns.repeats)
    setup = figures.pop("task setup (DataModule + model)")[0]
    bare_s, rows = figures["bare onnxruntime loop"]
    print(f"{rows:,} rows of 3x{ns.size}x{ns.size} uint8, {ns.model_config.name} encoder, batch {ns.batch_size}, "
          f"median of {ns.repeats} alternating runs; task setup {setup:.2f} s")  # fmt: skip
    print(f"  {'bare onnxruntime loop':24s} {bare_s:7.2f} s  {rows / bare_s:8.0f} rows/s")
    for name in ("task, --onnx", "task, torch (default)"):
        seconds, done = figures[name]
        whole, steady = done / seconds, done / max(seconds - setup, 1e-9)
        ratio, ratio_steady = whole / (rows / bare_s), steady / (rows / bare_s)
        verdict = "met" if ratio_steady >= TARGET else "missed"
        print(f"  {name:24s} {seconds:7.2f} s  {whole:8.0f} rows/s ({ratio:.2f}x); without setup {steady:8.0f} "
              f"rows/s ({ratio_steady:.2f}x): target >= {TARGET}x {verdict}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
