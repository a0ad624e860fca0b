"""The progressive catalog of a synthetic embedding set: time and peak RSS at each size, side by side.

    .venv/bin/python tools/bench/bench_catalog.py                          # 1M and 10M rows
    .venv/bin/python tools/bench/bench_catalog.py --rows 100000 1000000    # quicker

Each size runs in its own process (so its peak RSS is its own): it writes ``spherinator predict``-like Parquet
shards (``location`` on S2, ``scale``, ``id``, a string ``name``, ``row``; 1M rows a shard, generated shard by
shard), then the progressive catalog of them (:func:`spherinator.atlas.progressive.write_progressive_catalog`).
Half the rows sit in a dense cap, so cells there go deeper than elsewhere. Target (issue 21): peak RSS flat from
the smallest to the largest size (within 25 %) and under 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD_ROWS = 1_000_000
TARGET_GIB = 2.0
FLAT = 1.25  # "flat": the largest size's peak RSS at most this many times the smallest's


def write_shards(root: Path, rows: int, seed: int = 0) -> None:
    """``rows`` embedding rows as Parquet shards of at most :data:`SHARD_ROWS` rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, rows, SHARD_ROWS)):
        ids = np.arange(start, min(rows, start + SHARD_ROWS), dtype=np.int64)
        vectors = rng.normal(size=(len(ids), 3)).astype(np.float32)
        vectors[: len(ids) // 2, 2] += 3.0
        table = pa.table({
            "location": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 3),
            "scale": rng.gamma(4.0, 10.0, len(ids)).astype(np.float32),
            "id": ids + 10**9,
            "name": pa.array(ids).cast(pa.string()),
            "row": ids,
        })  # fmt: skip
        pq.write_table(table, root / f"part-{shard:05d}.parquet")


def one_size(rows: int, work: Path) -> dict:
    """Shards, then the progressive catalog, in this process; the timings and this process's peak RSS."""
    from spherinator.atlas.progressive import write_progressive_catalog

    started = time.perf_counter()
    write_shards(work / "shards", rows)
    shards_s = time.perf_counter() - started
    started = time.perf_counter()
    info = write_progressive_catalog(work / "shards", work / "catalog")
    catalog_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    return {"rows": rows, "shards_s": round(shards_s, 1), "catalog_s": round(catalog_s, 1), "peak_gib": round(peak, 3),
            "tiles": info["tiles"], "order": info["order"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a size, in its own process
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.work)))
        return
    results = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for rows in args.rows:
            work = Path(tmp) / str(rows)
            done = subprocess.run([sys.executable, __file__, "--one", str(rows), "--work", str(work)],
                                  capture_output=True, text=True, check=True)  # fmt: skip
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{r['rows']:>11,} rows: shards {r['shards_s']:7.1f} s, catalog {r['catalog_s']:7.1f} s "
                  f"({r['rows'] / max(r['catalog_s'], 1e-9):,.0f} rows/s), peak RSS {r['peak_gib']:.2f} GiB, "
                  f"{r['tiles']:,} tiles to order {r['order']}", flush=True)  # fmt: skip
    low, high = results[0], results[-1]
    ratio = high["peak_gib"] / low["peak_gib"]
    flat = ratio <= FLAT
    under = high["peak_gib"] < TARGET_GIB
    print(f"peak RSS {high['rows']:,} / {low['rows']:,} rows: {ratio:.2f}x (target <= {FLAT}x: "
          f"{'met' if flat else 'missed'}); {high['peak_gib']:.2f} GiB (target < {TARGET_GIB} GiB: "
          f"{'met' if under else 'missed'})")  # fmt: skip


if __name__ == "__main__":
    main()
