"""Encoder throughput on CPU: onnxruntime (the exported encoder.onnx) vs torch eager, side by side, as a ratio.

    .venv/bin/python tools/bench/bench_onnx.py                       # experiments/vae_cnn3.yaml at 3x128x128
    .venv/bin/python tools/bench/bench_onnx.py --checkpoint run.ckpt --config config.yaml   # a trained model

Without a checkpoint the model of ``--model-config`` is built with random weights (throughput does not depend on
them), saved as a checkpoint and exported through ``spherinator.export.export_onnx`` like a trained one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]


def build_checkpoint(model_config: Path, input_dim: list[int], workdir: Path) -> tuple[Path, Path]:
    """Write a run config for ``model_config`` at ``input_dim`` and a checkpoint of that model with fresh weights."""
    from spherinator.export import build_model

    model = yaml.safe_load(model_config.read_text())["model"]
    model["init_args"]["encoder"].setdefault("init_args", {})["input_dim"] = input_dim
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump({"model": model}))
    module = build_model(model["class_path"], model["init_args"], f"'{model_config}'")
    checkpoint = workdir / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {}}, checkpoint)
    return checkpoint, config


def interleaved_seconds(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time per call of each function; calls alternate so that both see the same machine load."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: build --model-config)")
    parser.add_argument("--config", type=Path, help="the run's config.yaml for --checkpoint (optional)")
    parser.add_argument("--model-config", type=Path, default=REPO / "experiments" / "vae_cnn3.yaml")
    parser.add_argument("--input-dim", type=int, nargs="+", default=[3, 128, 128], help="sample shape")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both runtimes")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from spherinator.export import export_onnx, load_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.checkpoint is None:
            checkpoint, config = build_checkpoint(args.model_config, args.input_dim, workdir)
            name = f"{args.model_config.name} at {'x'.join(map(str, args.input_dim))}"
        else:
            checkpoint, config, name = args.checkpoint, args.config, args.checkpoint.name
        report = export_onnx(checkpoint, workdir / "onnx", config=config, batch_sizes=[args.batch_size])
        model = load_model(checkpoint, config).model
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(workdir / "onnx" / "encoder.onnx"), options, providers=["CPUExecutionProvider"]
        )
        x = torch.rand(args.batch_size, *report["input_shape"])
        x_np = x.numpy()

        def run_torch() -> torch.Tensor:
            with torch.inference_mode():
                return model.encode(x)

        def run_ort() -> np.ndarray:
            return session.run(None, {"x": x_np})[0]

        worst = float(np.abs(run_ort() - run_torch().numpy()).max())
        seconds = interleaved_seconds({"torch": run_torch, "ort": run_ort}, args.warmup, args.repeats)
        t_torch, t_ort = seconds["torch"], seconds["ort"]

    b = args.batch_size
    print(
        f"encoder of {name} ({report['model_class']}), batch {b}, {args.threads} CPU threads, "
        f"median of {args.repeats} interleaved calls; max |ort - torch| = {worst:.1e}"
    )
    print(f"  torch eager : {1e3 * t_torch:8.1f} ms/batch  {b / t_torch:8.0f} samples/s")
    print(f"  onnxruntime : {1e3 * t_ort:8.1f} ms/batch  {b / t_ort:8.0f} samples/s")
    print(f"  throughput ratio onnxruntime / torch eager = {t_torch / t_ort:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
