"""Training throughput: ``spherinator fit`` (Lightning) vs a bare PyTorch loop, same model and batches, CPU.

Both run the model of ``--config`` (default experiments/vae_cnn3.yaml) built by the spherinator CLI from the same
seed, on the same in-memory batches of synthetic 3xSxS uint8 images, the same optimizer and the model's own
``training_step``. Lightning runs with logging, checkpointing and the progress bar off, as in a batch job's
inner loop. Rounds alternate between the two; each side's best round counts. Target: fit / bare >= 0.9.

    python tools/bench/bench_fit.py [--batches 30] [--batch-size 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch import Callback

from spherinator.cli import SpherinatorCLI
from spherinator.data.writer import write_dataset

REPO = Path(__file__).resolve().parents[2]


class _Timer(Callback):
    """Wall time from the first batch after the warm-up to the end of training."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = time.perf_counter()


def build(config: str, overlay: str) -> SpherinatorCLI:
    return SpherinatorCLI(args=["-c", config, "-c", overlay, "--seed_everything", "0"], run=False)


def run_lightning(config: str, overlay: str, batches: list[torch.Tensor], warmup: int) -> float:
    cli = build(config, overlay)
    timer = _Timer(warmup)
    cli.trainer.callbacks.append(timer)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    cli.trainer.fit(cli.model, train_dataloaders=loader)
    return (len(batches) - warmup) * len(batches[0]) / (timer.end - timer.start)


def run_bare(config: str, overlay: str, batches: list[torch.Tensor], warmup: int) -> float:
    cli = build(config, overlay)
    model = cli.model.train()
    optimizer = model.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    elif isinstance(optimizer, list | tuple):
        optimizer = optimizer[0]
    start = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = model.training_step(batch, i)
        loss = out["loss"] if isinstance(out, dict) else out
        loss.backward()
        optimizer.step()
    return (len(batches) - warmup) * len(batches[0]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "experiments" / "vae_cnn3.yaml"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    rng = np.random.default_rng(0)
    n = args.batches * args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        images = rng.integers(0, 256, (n, 3, args.size, args.size), dtype=np.uint8)
        write_dataset(Path(tmp) / "data", [{"data": images}], rows_per_file=n, rows_per_group=256)
        overlay = Path(tmp) / "overlay.yaml"
        overlay.write_text(
            yaml.safe_dump(
                {
                    "data": {
                        "class_path": "spherinator.data.DataModule",
                        "init_args": {"path": f"{tmp}/data", "batch_size": args.batch_size, "val_fraction": 0.0},
                    },
                    "trainer": {
                        "accelerator": "cpu",
                        "max_epochs": 1,
                        "logger": False,
                        "enable_checkpointing": False,
                        "enable_progress_bar": False,
                        "enable_model_summary": False,
                        "limit_val_batches": 0,
                        "default_root_dir": tmp,
                    },
                }
            )
        )
        images_t = torch.from_numpy(images).float().div_(255)
        batches = list(images_t.split(args.batch_size))
        fit, bare = [], []
        for _ in range(args.rounds):
            bare.append(run_bare(args.config, str(overlay), batches, args.warmup))
            fit.append(run_lightning(args.config, str(overlay), batches, args.warmup))

    print(f"model: {args.config}  batches: {args.batches} x {args.batch_size} of 3x{args.size}x{args.size}")
    print(f"torch threads: {torch.get_num_threads()}  rounds: {args.rounds} (best of each)")
    print(f"bare PyTorch loop : {max(bare):8.1f} samples/s   rounds: {', '.join(f'{v:.1f}' for v in bare)}")
    print(f"spherinator fit   : {max(fit):8.1f} samples/s   rounds: {', '.join(f'{v:.1f}' for v in fit)}")
    print(f"fit / bare        : {max(fit) / max(bare):8.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
