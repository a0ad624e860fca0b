"""One-GPU check of the demo recipe and the GPU paths, in under 8 minutes; a reduced mode runs on the CPU (CI).

    python tools/bench/gpu_check.py                     # on a machine with a CUDA GPU (make gpu-check)
    python tools/bench/gpu_check.py --cpu --json f.json # reduced: 96 images, batch 8, one epoch, on the CPU

Each check is one row of the table it prints (and of ``--json``), measured side by side in this one run:

- demo fit, bf16-mixed and 32: ``experiments/vae_cnn3.yaml`` + ``experiments/demo.yaml`` on freshly written demo
  data (``tools/make_dataset.py synthetic``, 2048 images of 3x128x128) with 8 loader workers: images per second
  over the training steps after a warm-up, the GPU's busy share while they ran (nvidia-smi), and the loader wait:
  the time between one step's end and the next one's start (the next batch and its copy to the GPU) as a share of
  the step time. The loader starves the GPU when that share is above 5 % (judged on a GPU only: in the reduced CPU
  mode the workers and the training share the same cores).
- the loader alone: the demo DataModule with 8 workers and nothing else, against the images per second the bf16
  fit used.
- DeepSpeed ZeRO stage 2 (``experiments/deepspeed.yaml``, bf16): one epoch; the loss stays finite and the weights
  change. Without CUDA only its strategy is built (DeepSpeed trains on CUDA only).
- pinned memory: batches of the DataModule with ``pin_memory`` on and off, copied to the GPU: GB/s each, and
  whether the batches arrive in page-locked memory.
- ONNX Runtime: the fp32 fit's checkpoint exported (``spherinator.export.export_onnx``); ``reconstruction.onnx``
  run by onnxruntime's CUDAExecutionProvider against the torch model on the GPU (TF32 off on both sides): images
  per second each and the largest difference. On the CPU: CPUExecutionProvider against torch on the CPU.

A check that fails is a FAIL row with its error, the others still run; the exit status is 1 when any row failed.
``--budget-s`` (default 450 s) skips the checks that would start after it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "experiments" / "vae_cnn3.yaml"
DEMO = REPO / "experiments" / "demo.yaml"
DEEPSPEED = REPO / "experiments" / "deepspeed.yaml"
STARVING = 0.05  # loader wait above this share of the step time: the loader starves the GPU


@dataclass
class Mode:
    """How big each check is: the full one for a GPU, a reduced one that shows every path works on a CPU."""

    name: str
    accelerator: str
    rows: int  # demo images written
    workers: int  # DataLoader workers
    epochs: int  # demo fit epochs
    warmup: int  # training steps left out of the figures
    batches: int  # batches read by the loader-only and pinned-memory checks
    onnx_batch: int
    onnx_rounds: int
    batch_size: int | None = None  # None: the recipe's (32)


FULL = Mode("gpu", "gpu", rows=2048, workers=8, epochs=3, warmup=20, batches=300, onnx_batch=64, onnx_rounds=50)
REDUCED = Mode(
    "cpu", "cpu", rows=96, workers=2, epochs=1, warmup=2, batches=10, onnx_batch=8, onnx_rounds=3, batch_size=8
)


@dataclass
class Row:
    check: str
    verdict: str  # ok | FAIL | n/a (the path needs what this machine lacks) | skipped
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ measuring


class GpuBusy:
    """Samples the GPU's busy share (``nvidia-smi --query-gpu=utilization.gpu``, every 100 ms) while it is open;
    :meth:`mean` averages the samples that fall into given time windows. Without nvidia-smi it samples nothing."""

    def __init__(self, enabled: bool) -> None:
        self.samples: list[tuple[float, float]] = []  # (perf_counter, percent)
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        if self.enabled:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"  # index or UUID
            self._proc = subprocess.Popen(
                ["nvidia-smi", f"--id={visible}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.perf_counter(), float(line.strip())))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def mean(self, windows: list[tuple[float, float]]) -> float | None:
        inside = [p for t, p in self.samples if any(a <= t <= b for a, b in windows)]
        return sum(inside) / len(inside) if inside else None


def _step_clock(warmup: int) -> Any:
    from lightning.pytorch import Callback

    class StepClock(Callback):
        """Start and end of every training step; the figures use consecutive steps of one epoch after ``warmup``
        (the gap at an epoch's end holds validation, not loading)."""

        def __init__(self) -> None:
            self.steps: list[tuple[int, int, float, float, int]] = []  # epoch, batch_idx, start, end, images
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            images = batch.shape[0] if hasattr(batch, "shape") else len(batch)
            self.steps.append((trainer.current_epoch, batch_idx, self._start, time.perf_counter(), images))

        def figures(self) -> dict[str, Any]:
            pairs = [
                (a, b)
                for i, (a, b) in enumerate(zip(self.steps, self.steps[1:], strict=False))
                if i >= warmup and b[0] == a[0] and b[1] == a[1] + 1
            ]
            if not pairs:
                raise RuntimeError(f"no training steps after the {warmup} warm-up steps to measure")
            time_s = sum(b[2] - a[2] for a, b in pairs)
            gaps = sorted(b[2] - a[3] for a, b in pairs)
            windows: dict[int, tuple[float, float]] = {}
            for a, b in pairs:
                lo, hi = windows.get(a[0], (a[2], b[2]))
                windows[a[0]] = (min(lo, a[2]), max(hi, b[2]))
            return {
                "steps": len(pairs),
                "img_per_s": sum(a[4] for a, _ in pairs) / time_s,
                "loader_wait_share": sum(gaps) / time_s,
                "loader_wait_p95_ms": 1e3 * gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))],
                "windows": list(windows.values()),
            }

    return StepClock()


# ----------------------------------------------------------------------------------------------------- checks


def write_demo_data(mode: Mode, root: Path) -> Path:
    out = root / "demo"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_dataset.py"), "synthetic", "--out", str(out), "--count",
         str(mode.rows), "--size", "128", "--rows-per-group", "64", "--quiet"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out


def build_cli(
    mode: Mode, data: Path, precision: str, *configs: Path, epochs: int | None = None, extra: tuple[str, ...] = ()
) -> Any:
    """The demo recipe (vae_cnn3 + demo data) as `spherinator fit` composes it, on this run's data and device;
    ``extra``: more command-line arguments."""
    from spherinator.cli import SpherinatorCLI

    args = ["-c", str(MODEL), "-c", str(DEMO)]
    for config in configs:
        args += ["-c", str(config)]
    args += [
        "--data.init_args.path", str(data), "--data.init_args.num_workers", str(mode.workers),
        "--trainer.accelerator", mode.accelerator, "--trainer.devices", "1", "--trainer.precision", precision,
        "--trainer.max_epochs", str(epochs or mode.epochs), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--seed_everything", "0",
    ]  # fmt: skip
    if mode.batch_size is not None:
        args += ["--data.init_args.batch_size", str(mode.batch_size)]
    return SpherinatorCLI(args=[*args, *extra], run=False)


def fit(mode: Mode, data: Path, precision: str, *configs: Path, epochs: int | None = None) -> tuple[dict, Any]:
    """Train the demo recipe; figures of its training steps, the CLI (model, trainer) for the checks after it."""
    import torch

    cli = build_cli(mode, data, precision, *configs, epochs=epochs)
    clock = _step_clock(mode.warmup)
    cli.trainer.callbacks.append(clock)
    before = [p.detach().clone() for p in cli.model.parameters()]
    with GpuBusy(mode.accelerator == "gpu") as busy:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    figures = clock.figures()
    windows = figures.pop("windows")
    figures["gpu_busy_percent"] = busy.mean(windows)
    loss = cli.trainer.callback_metrics.get("train_loss")
    figures["train_loss"] = float(loss) if loss is not None else None
    after = [p.detach().float().cpu() for p in cli.model.parameters()]
    figures["weights_changed"] = any(not torch.equal(a, b.float().cpu()) for a, b in zip(after, before, strict=True))
    return figures, cli


def fit_row(name: str, figures: dict[str, Any], on_gpu: bool) -> Row:
    """Starving is judged on a GPU only: on the CPU the loader's workers and the training share the same cores, so
    the wait measures how busy the machine is, not whether the loader keeps up."""
    busy = figures["gpu_busy_percent"]
    share = figures["loader_wait_share"]
    starving = on_gpu and share > STARVING
    finite = figures["train_loss"] is not None and math.isfinite(figures["train_loss"])
    summary = (
        f"{figures['img_per_s']:,.0f} img/s over {figures['steps']} steps, GPU busy "
        f"{'n/a' if busy is None else f'{busy:.0f}%'}, loader wait {100 * share:.1f}% of step time "
        f"(p95 {figures['loader_wait_p95_ms']:.1f} ms){', STARVING' if starving else ''}"
    )
    ok = finite and figures["weights_changed"] and not starving
    return Row(name, "ok" if ok else "FAIL", summary if finite else summary + ", loss not finite", figures)


def loader_alone(mode: Mode, data: Path, fit_img_per_s: float | None) -> Row:
    figures = read_batches(mode, data, pin_memory=None, to_device=False)
    summary = f"{figures['img_per_s']:,.0f} img/s with {mode.workers} workers"
    if fit_img_per_s:
        figures["x_fit_bf16"] = figures["img_per_s"] / fit_img_per_s
        summary += f" = {figures['x_fit_bf16']:.1f}x what the bf16 fit used"
    return Row(f"loader alone, {mode.workers} workers", "ok", summary, figures)


def read_batches(mode: Mode, data: Path, pin_memory: bool | None, to_device: bool) -> dict[str, Any]:
    """Read ``mode.batches`` batches of the demo DataModule (after 3 warm-up batches); with ``to_device`` copy each
    to the GPU (non_blocking, synchronised at the end)."""
    import torch

    # composed as the fit composes it (demo.yaml's column transforms included)
    pin = "null" if pin_memory is None else str(pin_memory).lower()
    dm = build_cli(mode, data, "32", extra=("--data.init_args.pin_memory", pin)).datamodule
    dm.setup("fit")
    device = torch.device("cuda") if to_device and torch.cuda.is_available() else None
    pinned, images, nbytes, start = [], 0, 0, 0.0
    warmup, seen = 3, 0
    while seen < mode.batches + warmup:
        for batch in dm.train_dataloader():
            if seen == warmup:
                start = time.perf_counter()
            if seen >= warmup:
                images += batch.shape[0]
                nbytes += batch.numel() * batch.element_size()
                pinned.append(batch.is_pinned() if torch.cuda.is_available() else False)
            if device is not None:
                batch = batch.to(device, non_blocking=True)
            seen += 1
            if seen >= mode.batches + warmup:
                break
    if device is not None:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"img_per_s": images / seconds, "gb_per_s": nbytes / seconds / 1e9, "pinned": all(pinned)}


def pinned_memory(mode: Mode, data: Path) -> Row:
    import torch

    on = read_batches(mode, data, pin_memory=True, to_device=True)
    off = read_batches(mode, data, pin_memory=False, to_device=True)
    figures = {"pinned": on, "pageable": off, "x": on["gb_per_s"] / off["gb_per_s"]}
    where = "to the GPU" if torch.cuda.is_available() else "(no GPU: read only)"
    summary = (
        f"{on['gb_per_s']:.2f} GB/s pinned vs {off['gb_per_s']:.2f} GB/s pageable {where} ({figures['x']:.2f}x); "
        f"batches page-locked: {on['pinned']}"
    )
    if not torch.cuda.is_available():
        return Row("pinned memory", "n/a", summary + "; pinning needs CUDA", figures)
    return Row("pinned memory", "ok" if on["pinned"] and not off["pinned"] else "FAIL", summary, figures)


def deepspeed_stage2(mode: Mode, data: Path) -> Row:
    import torch

    if not torch.cuda.is_available():
        cli = build_cli(mode, data, "32", DEEPSPEED)
        strategy = cli.trainer.strategy
        stage = strategy.config["zero_optimization"]["stage"]
        figures = {"strategy": type(strategy).__name__, "zero_stage": stage}
        summary = f"{type(strategy).__name__} built, ZeRO stage {stage}; training needs CUDA"
        return Row("DeepSpeed ZeRO stage 2", "n/a" if stage == 2 else "FAIL", summary, figures)
    figures, cli = fit(mode, data, "bf16-mixed", DEEPSPEED, epochs=1)
    stage = cli.trainer.strategy.config["zero_optimization"]["stage"]
    figures["zero_stage"] = stage
    row = fit_row("DeepSpeed ZeRO stage 2, bf16", figures, on_gpu=True)
    row.summary = f"stage {stage}: " + row.summary
    if stage != 2:
        row.verdict = "FAIL"
    return row


def onnx_runtime(mode: Mode, checkpoint: str, root: Path) -> Row:
    import numpy as np
    import onnxruntime as ort
    import torch

    from spherinator.export import export_onnx, load_model

    export_onnx(checkpoint, root / "onnx", progress=None)
    cuda = torch.cuda.is_available()
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        summary = (
            f"onnxruntime {ort.__version__} has no {provider} (it has {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu in place of onnxruntime"
        )
        return Row("ONNX Runtime", "FAIL", summary, {"providers": ort.get_available_providers()})
    options = [(provider, {"use_tf32": 0})] if cuda else [provider]
    session = ort.InferenceSession(str(root / "onnx" / "reconstruction.onnx"), providers=options)
    used = session.get_providers()[0]
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 on both sides
    model = load_model(checkpoint).model.to(device).eval()
    x = torch.rand(mode.onnx_batch, *model.input_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x.to(device)).float().cpu().numpy()
    got = session.run(None, {"x": x.numpy()})[0]
    diff = float(np.abs(got - expected).max())

    def rate(call: Callable[[], Any]) -> float:
        call()  # warm-up
        start = time.perf_counter()
        for _ in range(mode.onnx_rounds):
            call()
        return mode.onnx_rounds * mode.onnx_batch / (time.perf_counter() - start)

    def torch_call() -> None:
        with torch.no_grad():
            model(x.to(device)).cpu()  # host in, host out, as onnxruntime's run

    ort_rate = rate(lambda: session.run(None, {"x": x.numpy()}))  # host in, host out, as a user calls it
    torch_rate = rate(torch_call)
    figures = {"provider": used, "img_per_s": ort_rate, "torch_img_per_s": torch_rate, "max_abs_diff": diff}
    summary = (
        f"{used}: {ort_rate:,.0f} img/s vs torch {torch_rate:,.0f} img/s ({ort_rate / torch_rate:.2f}x), "
        f"reconstruction.onnx batch {mode.onnx_batch}, max |diff| {diff:.1e}"
    )
    return Row("ONNX Runtime", "ok" if used == provider and diff <= 1e-4 else "FAIL", summary, figures)


# ------------------------------------------------------------------------------------------------------- run


def run_checks(mode: Mode, root: Path, budget_s: float) -> list[Row]:
    t0 = time.monotonic()
    rows: list[Row] = []
    state: dict[str, Any] = {}

    def check(name: str, fn: Callable[[], Row | list[Row]]) -> None:
        if time.monotonic() - t0 > budget_s:
            rows.append(Row(name, "skipped", f"time budget of {budget_s:.0f} s used up"))
            return
        start = time.monotonic()
        chatter = io.StringIO()  # Lightning's and DeepSpeed's; shown when the check fails
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                made = fn()
        except Exception as err:  # one failed check must not hide the figures of the others
            made = Row(name, "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:300])
            print(chatter.getvalue()[-5000:] + traceback.format_exc(), file=sys.stderr)
        for row in made if isinstance(made, list) else [made]:
            row.figures["seconds"] = round(time.monotonic() - start, 1)
            rows.append(row)
            print(f"  {row.verdict:<7} {row.check}: {row.summary}", file=sys.stderr, flush=True)

    def data() -> Row:
        state["data"] = write_demo_data(mode, root)
        return Row("demo data", "ok", f"{mode.rows} synthetic galaxies, 3x128x128 uint8", {"rows": mode.rows})

    def fits() -> list[Row]:
        made = []
        for precision in ("bf16-mixed", "32"):
            figures, cli = fit(mode, state["data"], precision)
            state[precision] = figures
            made.append(fit_row(f"demo fit, {precision}", figures, on_gpu=mode.accelerator == "gpu"))
            if precision == "32":
                state["checkpoint"] = cli.trainer.checkpoint_callback.last_model_path
        x = state["bf16-mixed"]["img_per_s"] / state["32"]["img_per_s"]
        made.append(Row("bf16-mixed / 32", "ok", f"{x:.2f}x img/s", {"x": x}))
        return made

    check("demo data", data)
    check("demo fit", fits)
    check("loader alone", lambda: loader_alone(mode, state["data"], state.get("bf16-mixed", {}).get("img_per_s")))
    check("pinned memory", lambda: pinned_memory(mode, state["data"]))
    check("DeepSpeed ZeRO stage 2", lambda: deepspeed_stage2(mode, state["data"]))
    check("ONNX Runtime", lambda: onnx_runtime(mode, state["checkpoint"], root))
    return rows


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU only ({os.cpu_count()} cores), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="reduced mode on the CPU (what CI runs)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip checks that would start after this")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and their figures here")
    parser.add_argument("--workdir", type=Path, default=None, help="for data and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; run the reduced check with --cpu")
    mode = REDUCED if args.cpu else FULL
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        here = Path.cwd()
        os.chdir(root)  # the demo recipe logs and checkpoints to ./runs
        try:
            rows = run_checks(mode, root, args.budget_s)
        finally:
            os.chdir(here)
    total = time.monotonic() - started
    print(f"gpu_check ({mode.name} mode) on {machine()}: {total:.0f} s")
    width = max(len(r.check) for r in rows)
    for row in rows:
        print(f"{row.check:<{width}}  {row.verdict:<7}  {row.summary}")
    if args.json:
        report = {"mode": mode.name, "machine": machine(), "seconds": total, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
