"""HiPS tiles on one core against all cores: the same decoder.onnx, the same tiles, side by side in one run.

    .venv/bin/python tools/bench/bench_tiles.py                  # vae_cnn3 at 3x128x128, orders 0..6 (65,532 tiles)
    .venv/bin/python tools/bench/bench_tiles.py --max-order 4    # a quicker look

The model of ``--model-config`` gets random weights (the time does not depend on them) and is exported through
``spherinator.export.export_onnx``; the HiPS is written by ``write_hips`` in this process (``--workers 1``: one
onnxruntime session on every core) and by a pool of worker processes, each with a one-thread session. Rounds
alternate so both see the same machine load. Target: at least 1.8x on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_atlas import add_model_arguments, exported  # noqa: E402

TARGET = 1.8  # on 2 cores


def main(argv: list[str] | None = None) -> None:
    from spherinator.atlas.hips import available_cores

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, max_order=6, rounds=1, per="setting")
    parser.add_argument("--workers", type=int, default=available_cores(), help="default: the cores of the affinity")
    args = parser.parse_args(argv)

    from spherinator.atlas import open_model
    from spherinator.atlas.hips import write_hips
    from spherinator.atlas.render import TileRenderer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = open_model(exported(args, work)[2])
        renderer = TileRenderer(model.input_shape)
        settings = {"1 process": 1, f"{args.workers} workers": args.workers}
        seconds: dict[str, list[float]] = {name: [] for name in settings}
        load = []
        for _ in range(args.rounds):
            for name, workers in settings.items():
                out = work / "hips"
                result = write_hips(model.decode, renderer, out, args.max_order, progress=False, workers=workers,
                                    worker_decoder=model.worker_decoder())  # fmt: skip
                seconds[name].append(result["seconds"])
                load.append(os.getloadavg()[0])
                shutil.rmtree(out)
    tiles = result["tiles"]
    print(f"HiPS of {args.model_config.name} at {'x'.join(map(str, args.input_dim))}: orders 0..{args.max_order}, "
          f"{tiles:,} tiles of {renderer.width} px, {available_cores()} cores in the affinity")  # fmt: skip
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, value in medians.items():
        print(f"{name:<12} {value:8.1f} s  {1000 * value / tiles:6.2f} s per 1k tiles")
    one, many = medians.values()
    target = TARGET if args.workers >= 2 else 1.0
    verdict = "met" if one / many >= target else "missed"
    print(f"speed-up {one / many:.2f}x with {args.workers} workers (target >= {target:.1f}x on 2 cores: {verdict})")
    print(f"load average during the rounds {min(load):.1f}..{max(load):.1f} (1 min)")


if __name__ == "__main__":
    main()
