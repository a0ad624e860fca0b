"""``spherinator atlas`` of an ONNX export against HiPSter on the same ``decoder.onnx`` (see bench_atlas.py)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from spherinator.atlas.hipster import hipster_config


def run_measured(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak memory (MiB: the largest sum of the RSS of the process and its children, sampled every
    20 ms) of ``command``; its output is dropped, a failure ends the benchmark with its stderr."""
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:  # a process ended while it was read
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} ... failed:\n{process.stderr.read()[-3000:]}")
    return seconds, peak / 2**20


def write_data(root: Path, rows: int, shape: list[int]) -> Path:
    from spherinator.data.writer import write_dataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (rows, *shape), dtype=np.uint8)
    write_dataset(root / "data", [{"data": images, "id": np.arange(rows)}], rows_per_group=256)
    config = root / "data.yaml"
    init = {"path": str(root / "data"), "columns": ["data"], "batch_size": 64, "num_workers": 0}
    config.write_text(yaml.safe_dump({"data": {"class_path": "spherinator.data.DataModule", "init_args": init}}))
    return config


def versus_hipster(args: argparse.Namespace) -> None:
    from bench_atlas import exported

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exported(args, work)
        data = write_data(work, args.rows, args.input_dim)
        rows = []
        for order in args.orders:
            ours = [sys.executable, "-m", "spherinator.commands", "atlas", str(work / "onnx"), "-c", str(data),
                    "-o", str(work / "atlas"), "--max-order", str(order), "--thumbnails", "0"]  # fmt: skip
            config = work / f"hipster-{order}.yaml"
            config.write_text(yaml.safe_dump(hipster_config(work / "onnx" / "decoder.onnx", work / "hipster", order)))
            theirs = [str(args.hipster), "--config", str(config)]
            measured: dict[str, list[tuple[float, float]]] = {"spherinator": [], "hipster": []}
            for _ in range(args.rounds):
                for name, command in (("spherinator", ours), ("hipster", theirs)):
                    measured[name].append(run_measured(command))
                    shutil.rmtree(work / "atlas", ignore_errors=True)
                    shutil.rmtree(work / "hipster", ignore_errors=True)
            medians = {name: [statistics.median(v[i] for v in values) for i in (0, 1)]
                       for name, values in measured.items()}  # fmt: skip
            rows.append((order, medians, os.getloadavg()[0]))
    print(f"spherinator atlas (catalog of {args.rows:,} rows, {args.input_dim} uint8) vs HiPSter, decoder.onnx of "
          f"{args.model_config.name}; median of {args.rounds} alternating round(s), "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(
        f"{'order':>5} {'spherinator s':>14} {'MiB':>6} {'hipster s':>10} {'MiB':>6} {'time x':>7} {'mem x':>6}  target"
    )
    for order, m, load in rows:
        (ours_s, ours_mib), (their_s, their_mib) = m["spherinator"], m["hipster"]
        ratio_s, ratio_mib = ours_s / their_s, ours_mib / their_mib
        if order <= 3:
            goal, met = "<= 1.5x time and memory", ratio_s <= 1.5 and ratio_mib <= 1.5
        else:
            goal, met = "faster (< 1x time)", ratio_s < 1.0
        print(f"{order:>5} {ours_s:>14.1f} {ours_mib:>6.0f} {their_s:>10.1f} {their_mib:>6.0f} {ratio_s:>6.2f}x "
              f"{ratio_mib:>5.2f}x  {goal}: {'met' if met else 'missed'} (load {load:.1f})")  # fmt: skip
