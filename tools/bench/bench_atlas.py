"""HiPS tiles of the demo model's decoder: seconds per 1k tiles with onnxruntime vs torch decoding, side by side;
and ``spherinator atlas`` of an ONNX export against HiPSter (astro-hipster) on the same ``decoder.onnx``.

    .venv/bin/python tools/bench/bench_atlas.py                 # vae_cnn3 at 3x128x128, orders 0..4 (4,092 tiles)
    .venv/bin/python tools/bench/bench_atlas.py --max-order 6   # 65,532 tiles: time and peak memory at order 6
    .venv/bin/python tools/bench/bench_atlas.py --hipster /work/hipster-venv/bin/hipster --orders 3 5

With ``--hipster`` (or ``$SPHERINATOR_HIPSTER``) both commands run as processes of their own, alternating, at each of
``--orders`` with all cores: wall time and peak memory (the sum of the RSS of the process and its workers, sampled
every 20 ms). spherinator's atlas also encodes a catalog of ``--rows`` rows (HiPSter's HiPSGenerator writes tiles
only). Targets: within 1.5x HiPSter's wall time and memory at order 3, ahead of it from order 5.

The model of ``--model-config`` gets random weights (the time does not depend on them) and is exported through
``spherinator.export.export_onnx``. Each round writes the whole HiPS (decode, draw, JPEG, files) once per decoder,
alternating, so both see the same machine load; the table gives the median round. Peak RSS is read before and after
(tiles are streamed to disk: it should not grow with the order).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import REPO, build_checkpoint  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_model_arguments(parser: argparse.ArgumentParser, max_order: int, rounds: int, per: str) -> None:
    """The options of the model whose decoder the HiPS benchmarks draw, its deepest order and their rounds."""
    parser.add_argument("--model-config", type=Path, default=REPO / "experiments" / "vae_cnn3.yaml")
    parser.add_argument("--input-dim", type=int, nargs="+", default=[3, 128, 128])
    parser.add_argument("--max-order", type=int, default=max_order)
    parser.add_argument("--rounds", type=int, default=rounds, help=f"HiPS written per {per} (default: %(default)s)")


def exported(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path]:
    """The checkpoint and config of ``--model-config`` with random weights (the time does not depend on them), and
    its ONNX export directory, under ``work``."""
    from spherinator.export import export_onnx

    torch.manual_seed(0)
    checkpoint, config = build_checkpoint(args.model_config, args.input_dim, work)
    export_onnx(checkpoint, work / "onnx", config=config, validate=False)
    return checkpoint, config, work / "onnx"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, max_order=4, rounds=2, per="decoder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decoders", nargs="+", choices=["onnxruntime", "torch"], default=["onnxruntime", "torch"])
    parser.add_argument("--hipster", type=Path, default=os.environ.get("SPHERINATOR_HIPSTER"),
                        help="HiPSter's hipster command: compare whole commands instead of decoders")  # fmt: skip
    parser.add_argument("--orders", type=int, nargs="+", default=[3, 5], help="with --hipster (default: 3 5)")
    parser.add_argument("--rows", type=int, default=1000, help="with --hipster: rows of spherinator's catalog")
    args = parser.parse_args(argv)
    if args.hipster:
        from bench_versus_hipster import versus_hipster

        versus_hipster(args)
        return

    import onnxruntime as ort

    from spherinator.atlas import SphereModel
    from spherinator.atlas.hips import write_hips
    from spherinator.atlas.render import TileRenderer
    from spherinator.export import load_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint, config, _ = exported(args, work)
        net = load_model(checkpoint, config).model
        session = ort.InferenceSession(str(work / "onnx" / "decoder.onnx"), providers=["CPUExecutionProvider"])
        common = {"input_shape": tuple(args.input_dim), "z_dim": 3, "name": "bench"}
        decoders = {
            "onnxruntime": SphereModel(**common, onnx_dir=work / "onnx", decoder_session=session),
            "torch": SphereModel(**common, checkpoint=checkpoint, torch_model=net),
        }
        decoders = {name: decoders[name] for name in args.decoders}
        renderer = TileRenderer(tuple(args.input_dim))
        rss_before = peak_rss_mib()
        results: dict[str, list[dict]] = {name: [] for name in decoders}
        for _ in range(args.rounds):
            for name, model in decoders.items():
                out = work / f"hips-{name}"
                with torch.inference_mode():
                    results[name].append(write_hips(model.decode, renderer, out, args.max_order,
                                                    batch_size=args.batch_size, progress=False))  # fmt: skip
                size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                shutil.rmtree(out)
        rss_after = peak_rss_mib()

    tiles = next(iter(results.values()))[0]["tiles"]
    print(f"HiPS of {args.model_config.name} at {'x'.join(map(str, args.input_dim))}: orders 0..{args.max_order}, "
          f"{tiles:,} tiles of {renderer.width} px (JPEG, {size / 2**20:.0f} MiB), batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip
    print(f"{'decoder':<12} {'s / 1k tiles':>13} {'of which decoding':>18} {'tiles/s':>9}")
    medians = {}
    for name, runs in results.items():
        per_1k = statistics.median(r["seconds_per_1k_tiles"] for r in runs)
        decoding = statistics.median(1000 * r["decode_seconds"] / r["tiles"] for r in runs)
        medians[name] = per_1k
        print(f"{name:<12} {per_1k:>13.2f} {decoding:>18.2f} {1000 / per_1k:>9.0f}")
    if len(medians) == 2:
        print(f"torch / onnxruntime: {medians['torch'] / medians['onnxruntime']:.2f}x the time per tile")
    print(f"peak RSS {rss_before:.0f} MiB before the HiPS, {rss_after:.0f} MiB after")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
