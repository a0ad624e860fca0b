"""Data loading throughput, side by side in one run (a benchmark, not a test).

On one generated dataset of 3x128x128 uint8 galaxy images (batch 64) in the fast layout (fixed-size binary),
written uncompressed and with each other ``--compression`` (default: none and zstd), every loader reads the same
files:

    raw       pyarrow reads every row group's column and views it as one numpy array (one thread, no batches);
              raw+crc the same with the page checksums verified, as the DataModule does on a row group's first read
    naive     the whole table loaded into memory first (not timed), one tensor per row in __getitem__, PyTorch's
              default DataLoader with shuffle, 0 and 2 workers; float32 batches in [0, 1]
    dm        spherinator.data.DataModule's shuffled train loader, 0 and 2 workers: it streams row groups from the
              files every epoch (bounded memory), shards them over workers and mixes rows in a shuffle buffer; it
              hands uint8 batches on, as under a Trainer, whose device scales them to float32
              (DataModule.on_after_batch_transfer). Epoch 1 verifies every row group's page checksums (the
              default page_checksums="first_read"); "dm 0w" is the best later epoch, read unverified
    dm-every  the same with page_checksums="every_read" (0 workers, best later epoch): the checksums every epoch
    dm-cpu    the same, scaling to float32 on the CPU (a DataModule iterated without a Trainer)

Rounds alternate between the loaders (other processes on the machine come and go) and each figure is the best
round; a loader with workers is timed on an epoch after its first (persistent workers, warm caches). Printed:
samples/s, the ratios dm/naive at the same and at 0 workers, and the resident memory while streaming (several
epochs) many times more rows than the shuffle buffer. ``--list`` adds the list layout (fixed-size list of uint8 +
shape metadata, how existing Spherinator data is stored): the fast layout's gain end to end. With ``--float32``
it also stores the images as float32 in [0, 1] (fast layout) and measures what the check of floating columns for
NaN/inf costs: the DataModule with the check and with it switched off, alternately.

    python tools/bench/bench_data.py                 # ~3 minutes on 2 cores (the first run writes the data)
    python tools/bench/bench_data.py --rows 6144 --compression none --list
    python tools/bench/bench_data.py --compression none lz4 zstd snappy --repeats 2   # choose the default
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from spherinator.data import DataModule, ParquetWriter  # noqa: E402
from spherinator.data.writer import COMPRESSIONS, DEFAULT_COMPRESSION  # noqa: E402
from tools.make_dataset import synthetic_galaxies  # noqa: E402

SHAPE = (3, 128, 128)


def make_data(
    root: Path, rows: int, rows_per_group: int, compression: str, layouts: tuple[str, ...] = ("fast", "list"),
    dtype: str = "uint8",
) -> dict[str, Path]:  # fmt: skip
    """The same galaxies in each layout under ``root`` (reused when already there); float32 ones in [0, 1]."""
    paths = {}
    for layout in layouts:
        path = root / (f"{layout}-{compression}-{rows}-{rows_per_group}" + ("" if dtype == "uint8" else f"-{dtype}"))
        paths[layout] = path
        if path.exists():
            continue
        rng = np.random.default_rng(0)
        tmp = path.with_suffix(".tmp")
        with ParquetWriter(
            tmp, rows_per_file=rows // 2, rows_per_group=rows_per_group, compression=compression, layout=layout
        ) as writer:
            for start in range(0, rows, 256):
                n = min(256, rows - start)
                images = synthetic_galaxies(n, SHAPE[-1], rng)["data"]
                if dtype != "uint8":
                    images = (images / np.float32(255)).astype(dtype)
                writer.write({"data": images, "id": np.arange(start, start + n)})
        tmp.rename(path)
    return paths


def raw_limit(path: Path, verify: bool = False) -> float:
    """Images/s of pyarrow reading the column and viewing it as one numpy array per row group (one thread); with
    ``verify``, checking the page checksums (as the DataModule's reader does)."""
    from spherinator.data import ParquetIndex, Where

    index = ParquetIndex(path, ["data"])
    layout = index.layouts["data"]
    _settle()
    start, rows = time.perf_counter(), 0
    for file in index.files:
        with pq.ParquetFile(file, page_checksum_verification=verify) as pf:
            for g in range(pf.num_row_groups):
                column = pf.read_row_group(g, columns=["data"], use_threads=False).column(0)
                rows += len(layout.decode(column, Where(file, g)))  # a view of the Arrow buffer: memcpy-free
    return rows / (time.perf_counter() - start)


def datamodule_rate(
    path: Path, workers: int, batch_size: int, epochs: int = 2, device: bool = False, checksums: str = "first_read"
) -> float:
    """Images/s of the DataModule's shuffled train loader: the best epoch after the first (which starts the
    persistent workers, warms caches and verifies the page checksums); with ``device``, uint8 batches for the
    device to scale."""
    return datamodule_epochs(path, workers, batch_size, epochs, device, checksums)[1]


def datamodule_epochs(
    path: Path, workers: int, batch_size: int, epochs: int = 2, device: bool = False, checksums: str = "first_read"
) -> tuple[float, float]:
    """Images/s of the DataModule's first epoch and of its best later one (see :func:`datamodule_rate`)."""
    dm = DataModule(
        path, columns=["data"], batch_size=batch_size, num_workers=workers, val_fraction=0.0, page_checksums=checksums
    )
    dm.scale_on_device = device
    dm.setup("fit")
    rates = _epoch_rates(dm.train_dataloader(), epochs)
    return rates[0], max(rates[1:] or rates)


class NaiveDataset(Dataset):
    """What a first attempt looks like: whole table in memory, one tensor per row."""

    def __init__(self, path: Path):
        self.table = pq.read_table(path, columns=["data"])

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> torch.Tensor:
        value = self.table.column(0)[i]
        data = value.as_py()
        if isinstance(data, bytes):
            array = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            array = torch.tensor(data, dtype=torch.uint8)
        return array.reshape(SHAPE).float() / 255


def _settle() -> None:
    """Collect the loaders measured before: their persistent workers shut down now, not in the middle of the next
    measurement (a DataModule and its loader form a reference cycle; the workers' shutdown took seconds)."""
    gc.collect()


def _epoch_rates(loader, epochs: int) -> list[float]:
    _settle()
    rates = []
    for _ in range(epochs):
        start, rows = time.perf_counter(), 0
        for batch in loader:
            rows += len(batch)
        rates.append(rows / (time.perf_counter() - start))
    return rates


def _best_epoch(loader, epochs: int) -> float:
    rates = _epoch_rates(loader, epochs)
    return max(rates[1:] or rates)


def naive_rate(dataset: NaiveDataset, workers: int, batch_size: int) -> float:
    """Images/s of the naive loader (its table already in memory): with workers, the best epoch after the first."""
    options = {"num_workers": workers, "persistent_workers": True} if workers else {}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, **options)
    return _best_epoch(loader, 3 if workers else 1)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_while_streaming(path: Path, shuffle_buffer: int, batch_size: int, epochs: int) -> list[tuple[int, float]]:
    """(rows read, RSS MiB) at each eighth of ``epochs`` shuffled epochs with 0 workers, in a fresh process."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from tools.bench.bench_data import _rss_points; "
        "print(json.dumps(_rss_points(sys.argv[2], *map(int, sys.argv[3:]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(path), str(shuffle_buffer), str(batch_size), str(epochs)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [tuple(p) for p in json.loads(out.stdout.strip().splitlines()[-1])]


def _rss_points(path: str, shuffle_buffer: int, batch_size: int, epochs: int) -> list[tuple[int, float]]:
    torch.set_num_threads(1)
    dm = DataModule(path, columns=["data"], batch_size=batch_size, val_fraction=0.0, shuffle_buffer=shuffle_buffer)
    dm.setup("fit")
    total = dm.split_rows("train") * epochs
    marks, rows, points = [total * k // 8 for k in range(1, 9)], 0, [(0, rss_mb())]
    loader = dm.train_dataloader()
    for _ in range(epochs):
        for batch in loader:
            rows += len(batch)
            while marks and rows >= marks[0]:
                points.append((marks.pop(0), rss_mb()))
    return points


def check_cost(path: Path, batch_size: int, repeats: int) -> dict[str, float]:
    """Images/s of the DataModule on float data with the NaN/inf check and with it switched off (0 and 2 workers,
    measured alternately; forked workers inherit the switch), and the check's own time per batch."""
    from spherinator.data import reader

    check = reader.check_values
    rates: dict[str, list[float]] = {}
    for _ in range(repeats):
        for on in (True, False):
            reader.check_values = check if on else (lambda *args: None)
            try:
                for workers in (0, 2):
                    key = f"dm{workers}_{'on' if on else 'off'}"
                    rates.setdefault(key, []).append(datamodule_rate(path, workers, batch_size))
            finally:
                reader.check_values = check
    out = {key: max(values) for key, values in rates.items()}
    from spherinator.data import ParquetIndex, Where

    index = ParquetIndex(path, ["data"])
    layout, where = index.layouts["data"], Where(index.files[0], 0)
    with pq.ParquetFile(index.files[0]) as pf:
        array = layout.decode(pf.read_row_group(0, columns=["data"]).column(0), where)[:batch_size]
    start, n = time.perf_counter(), 50
    for _ in range(n):
        check(array, layout, where)
    out["check_ms"] = (time.perf_counter() - start) / n * 1e3
    return out


def loader_rounds(paths: dict[str, Path], batch_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per dataset, the best of ``repeats`` alternating rounds of every loader (img/s)."""
    results = {}
    for key, path in paths.items():
        naive = NaiveDataset(path)
        rounds = []
        for _ in range(repeats):
            first, later = datamodule_epochs(path, 0, batch_size, epochs=3, device=True)
            rounds.append({
                "raw": raw_limit(path),
                "raw_crc": raw_limit(path, verify=True),
                "naive0": naive_rate(naive, 0, batch_size),
                "dm0_first": first,
                "dm0": later,
                "dm0_every": datamodule_rate(path, 0, batch_size, epochs=3, device=True, checksums="every_read"),
                "dm0cpu": datamodule_rate(path, 0, batch_size, epochs=3),
                "naive2": naive_rate(naive, 2, batch_size),
                "dm2": datamodule_rate(path, 2, batch_size, epochs=3, device=True),
            })  # fmt: skip
        results[key] = {k: max(r[k] for r in rounds) for k in rounds[0]}
        del naive
    return results


def print_loaders(results: dict[str, dict[str, float]], files_mb: dict[str, float]) -> None:
    print(
        f"{'data':<13}{'MiB':>6}{'raw':>8}{'raw+crc':>9}{'naive 0w':>10}{'dm ep1':>8}{'dm 0w':>8}{'dm-every':>10}"
        f"{'dm-cpu 0w':>11}{'naive 2w':>10}{'dm 2w':>8}{'dm0/raw':>9}{'ep1/raw+crc':>13}{'dm0/naive0':>12}"
        f"{'dm2/naive2':>12}"
    )
    for key, r in results.items():
        print(
            f"{key:<13}{files_mb[key]:>6.0f}{r['raw']:>8.0f}{r['raw_crc']:>9.0f}{r['naive0']:>10.0f}"
            f"{r['dm0_first']:>8.0f}{r['dm0']:>8.0f}{r['dm0_every']:>10.0f}{r['dm0cpu']:>11.0f}{r['naive2']:>10.0f}"
            f"{r['dm2']:>8.0f}{r['dm0'] / r['raw']:>8.2f}x{r['dm0_first'] / r['raw_crc']:>12.2f}x"
            f"{r['dm0'] / r['naive0']:>11.2f}x{r['dm2'] / r['naive2']:>11.2f}x"
        )
    print(
        "(img/s; every loader reads the same files of its row; the naive loader holds them in memory; dm ep1: the\n"
        " first epoch, which verifies the page checksums; dm 0w, dm-every, dm-cpu, dm 2w: the best of epochs 2 and 3)"
    )
    fast = results["fast-none"]
    ratio = fast["dm0"] / fast["raw"]
    print(
        f"target: dm 0 workers (epochs 2-3) >= 0.8x raw pyarrow on uncompressed files: {ratio:.2f}x, "
        f"{'met' if ratio >= 0.8 else 'MISSED'}; epoch 1 {fast['dm0_first'] / fast['raw']:.2f}x"
    )
    print(
        f"  the page checksums alone: raw+crc/raw {fast['raw_crc'] / fast['raw']:.2f}x, dm-every/dm "
        f"{fast['dm0_every'] / fast['dm0']:.2f}x; scaling on the CPU: dm-cpu/dm {fast['dm0cpu'] / fast['dm0']:.2f}x"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3072, help="images per layout (default 3072)")
    parser.add_argument("--rows-per-group", type=int, default=128, help="rows per row group (default 128)")
    parser.add_argument(
        "--compression", nargs="+", default=["none", "zstd"], choices=COMPRESSIONS,
        help=f"compressions side by side (default none zstd; none is always there; the writer's default: "
        f"{DEFAULT_COMPRESSION})",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best counts (default 3)")
    parser.add_argument("--list", action="store_true", help="also the list layout (fast/list end to end)")
    parser.add_argument("--shuffle-buffer", type=int, default=256, help="for the memory run (default 256 rows)")
    parser.add_argument("--rss-epochs", type=int, default=4, help="epochs the memory run streams (default 4)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "spherinator-bench")
    parser.add_argument("--float32", action="store_true", help="also: the cost of the NaN/inf check on float32 data")
    parser.add_argument("--only-float32", action="store_true", help="only the float32 check figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    compressions = ["none", *(c for c in args.compression if c != "none")]
    if args.float32 or args.only_float32:
        t0 = time.perf_counter()
        (path,) = make_data(
            args.data_dir, args.rows, args.rows_per_group, compressions[-1], ("fast",), "float32"
        ).values()
        r = check_cost(path, args.batch_size, args.repeats)
        print(
            f"float32 {args.rows} x {SHAPE}, fast layout, {compressions[-1]}, batch {args.batch_size}: NaN/inf check "
            f"{r['check_ms']:.2f} ms per batch; img/s with / without it: 0 workers {r['dm0_on']:.0f} / "
            f"{r['dm0_off']:.0f} ({r['dm0_on'] / r['dm0_off']:.2f}x), 2 workers {r['dm2_on']:.0f} / "
            f"{r['dm2_off']:.0f} ({r['dm2_on'] / r['dm2_off']:.2f}x); {time.perf_counter() - t0:.0f} s\n"
        )
        if args.only_float32:
            return

    t0 = time.perf_counter()
    paths = {}
    for compression in compressions:
        layouts = ("fast", "list") if args.list and compression == "none" else ("fast",)
        made = make_data(args.data_dir, args.rows, args.rows_per_group, compression, layouts)
        paths.update({f"{layout}-{compression}": path for layout, path in made.items()})
    mb = args.rows * np.prod(SHAPE) / 2**20
    files_mb = {key: sum(f.stat().st_size for f in path.glob("*.parquet")) / 2**20 for key, path in paths.items()}
    print(
        f"dataset: {args.rows} x {SHAPE} uint8 ({mb:.0f} MiB raw), row groups of {args.rows_per_group}, "
        f"{', '.join(compressions)}, batch {args.batch_size}; data ready in {time.perf_counter() - t0:.1f} s"
    )
    print(f"cores: {os.cpu_count()}, torch threads: 1, best of {args.repeats} alternating rounds\n")
    results = loader_rounds(paths, args.batch_size, args.repeats)
    print_loaders(results, files_mb)
    fast = results["fast-none"]
    if args.list:
        lst = results["list-none"]
        print(
            f"fast/list end to end: {fast['dm0'] / lst['dm0']:.1f}x (0 workers), {fast['dm2'] / lst['dm2']:.1f}x "
            f"(2 workers); raw: {fast['raw'] / lst['raw']:.1f}x"
        )
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"WARNING: load average {load:.1f} on {os.cpu_count()} cores: other processes share the CPU")

    buffer_mb = args.shuffle_buffer * np.prod(SHAPE) / 2**20
    points = rss_while_streaming(paths["fast-none"], args.shuffle_buffer, args.batch_size, args.rss_epochs)
    trail = ", ".join(f"{rows}: {rss:.0f}" for rows, rss in points)
    streamed = args.rows * args.rss_epochs
    print(
        f"\nRSS (MiB) while streaming {args.rss_epochs} epochs, {streamed} rows ({streamed * mb / args.rows:.0f} MiB) "
        f"= {streamed / args.shuffle_buffer:.0f}x the shuffle buffer ({args.shuffle_buffer} rows, "
        f"{buffer_mb:.0f} MiB as uint8), fresh process, 0 workers, by rows read: {trail}"
    )
    after_first = [rss for _, rss in points[2:]]
    print(
        f"after the first eighth: min {min(after_first):.0f}, max {max(after_first):.0f} MiB "
        f"(spread {max(after_first) - min(after_first):.0f} MiB while reading {streamed * mb / args.rows:.0f} MiB)"
    )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
