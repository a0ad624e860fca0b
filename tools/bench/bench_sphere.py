"""What the sphere learns: the shipped recipes trained on the CPU, their S^2 beside PCA->S^2 and the raw inputs.

Trains, with ``spherinator fit`` exactly as a user runs it, the demo recipe (experiments/vae_cnn3.yaml +
experiments/demo.yaml on 2048 synthetic 3x128x128 galaxies, as `make demo` writes them) and the digits recipe
(experiments/vae_digits.yaml on scikit-learn's 1,797 digits), then encodes every row (``spherinator evaluate``)
and prints, side by side in one table per recipe: the learned sphere, PCA of the same model inputs normalised
onto S^2, and kNN on the raw inputs, with the targets of issue #12:

- demo: coverage of the 192 HEALPix cells >= 60 %, median concentration well above its floor of 1, kNN-10 R^2
  from the S^2 positions >= 0.9 for log_flux and >= 0.5 for bulge_fraction and the colour b_minus_r;
- digits: kNN-5 accuracy of the digit from the S^2 positions >= 0.93.

    python tools/bench/bench_sphere.py [--only demo|digits] [--epochs N] [--seeds 0,1] [--keep DIR]

Everything is written to a temporary directory (``--keep DIR`` keeps runs, reports and the pictures ``spherinator
evaluate`` draws there: the sphere coloured by each column, the decoded sphere, reconstructions).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FLOOR_MARGIN = 10.0  # "well above the floor of 1": a median concentration of at least this


def recipes(work: Path) -> dict[str, dict]:
    """Configs, data and what to measure of each recipe."""
    return {
        "demo": {
            "configs": ["experiments/vae_cnn3.yaml", "experiments/demo.yaml"],
            "data": ["synthetic", "--count", "2048", "--size", "128"],
            "columns": ["log_flux", "bulge_fraction", "b_minus_r", "axis_ratio", "disk_radius"],
            "label": None,
            "targets": {
                "coverage": 0.6,
                "scale_p50": FLOOR_MARGIN,
                "log_flux": 0.9,
                "bulge_fraction": 0.5,
                "b_minus_r": 0.5,
            },  # fmt: skip
        },
        "digits": {
            "configs": ["experiments/vae_digits.yaml"],
            "data": ["digits"],
            "columns": [],
            "label": "label",
            "targets": {"label": 0.93},
        },
    }


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repository root, output to ``log``; its wall time, or exit naming the log."""
    start = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    with log.open("w") as out:
        code = subprocess.call(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code:
        sys.exit(f"bench_sphere: {' '.join(cmd[:4])} ... failed (exit {code}); its output: {log}")
    return time.perf_counter() - start


def train_and_evaluate(name: str, recipe: dict, work: Path, seed: int, epochs: int | None) -> dict:
    data = work / "data" / name
    if not data.exists():
        run([sys.executable, "tools/make_dataset.py", *recipe["data"], "--out", str(data), "--quiet"],
            work / f"{name}_data.log")  # fmt: skip
    configs = [arg for path in recipe["configs"] for arg in ("-c", path)]
    overrides = ["--data.init_args.path", str(data), "--seed_everything", str(seed)]
    overrides += ["--trainer.logger.init_args.save_dir", str(work / "runs")]
    overrides += ["--trainer.logger.init_args.name", f"{name}_seed{seed}", "--trainer.logger.init_args.version", "0"]
    if epochs is not None:
        overrides += ["--trainer.max_epochs", str(epochs)]
    spherinator = [sys.executable, "-c", "from spherinator.commands import main; main()"]
    fit_s = run([*spherinator, "fit", *configs, *overrides], work / f"{name}_seed{seed}_fit.log")
    run_dir = work / "runs" / f"{name}_seed{seed}" / "version_0"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    evaluate = ["evaluate", *configs, "--data.init_args.path", str(data), "--ckpt_path", str(ckpt)]
    if recipe["label"]:
        evaluate += ["--label-column", recipe["label"]]
    if recipe["columns"]:
        evaluate += ["--columns", ",".join(recipe["columns"])]
    run([*spherinator, *evaluate, "--out", str(run_dir)], work / f"{name}_seed{seed}_evaluate.log")
    report = json.loads((run_dir / "sphere_report.json").read_text())
    warned = "SphereQuality" in (work / f"{name}_seed{seed}_fit.log").read_text()
    return {"report": report, "fit_s": fit_s, "collapse_warning": warned}


def figure_rows(report: dict, recipe: dict) -> list[tuple[str, list[float | None], float | None, str]]:
    """(figure, [sphere, PCA->S^2, raw], target, format) rows of one report."""
    sphere, pca, raw = report["sphere"], report.get("pca_sphere") or {}, report.get("raw") or {}
    targets = recipe["targets"]
    rows = [("coverage (192 cells)", [sphere.get("coverage"), pca.get("coverage"), None],
             targets.get("coverage"), ".0%")]  # fmt: skip
    if "concentration" in sphere:
        rows.append(("scale median", [sphere["concentration"]["p50"], None, None], targets.get("scale_p50"), ".3g"))
    for name in sphere["knn_accuracy"]:
        methods = [m.get("knn_accuracy", {}).get(name) for m in (sphere, pca, raw)]
        rows.append((f"kNN-5 accuracy {name}", methods, targets.get(name), ".3f"))
    for name in sphere["knn_r2"]:
        methods = [m.get("knn_r2", {}).get(name) for m in (sphere, pca, raw)]
        rows.append((f"kNN-10 R^2 {name}", methods, targets.get(name), ".3f"))
    rows.append(("trustworthiness (k=10)", [sphere.get("trustworthiness"), pca.get("trustworthiness"), None], None,
                 ".3f"))  # fmt: skip
    return rows


def print_table(name: str, results: list[dict], recipe: dict) -> bool:
    """The recipe's figures (mean over seeds, each seed's value beside), PCA->S^2 and raw; True when every target
    is met on every seed."""
    per_seed = [figure_rows(r["report"], recipe) for r in results]
    header = ["figure", "sphere", "PCA->S^2", "raw", "sphere/PCA", "target"]
    lines = [header]
    all_met = True
    for i, (figure, methods, target, spec) in enumerate(per_seed[0]):
        values = [rows[i][1][0] for rows in per_seed]
        shown = [v for v in values if v is not None]
        mean = sum(shown) / len(shown) if shown else None
        cell = "" if mean is None else format(mean, spec)
        if len(shown) > 1:
            cell += " (" + ", ".join(format(v, spec) for v in shown) + ")"
        ratio = "" if mean is None or not methods[1] else f"{mean / methods[1]:.2f}x"
        met = ""
        if target is not None:
            ok = bool(shown) and all(v >= target for v in shown)
            all_met &= ok
            met = f">= {format(target, spec)} {'met' if ok else 'MISSED'}"
        others = ["" if v is None else format(v, spec) for v in methods[1:]]
        lines.append([figure, cell, *others, ratio, met])
    widths = [max(len(row[c]) for row in lines) for c in range(len(header))]
    fit = ", ".join(f"{r['fit_s']:.0f}" for r in results)
    rows_used = results[0]["report"]["rows_used"]
    print(f"\n{name}: {' + '.join(recipe['configs'])}; {rows_used} rows; fit wall time {fit} s")
    for j, row in enumerate(lines):
        cells = (v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths, strict=True)))
        print("  ".join(cells).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))
    warned = [r["collapse_warning"] for r in results]
    print(f"collapse warning in the fit log: {', '.join('yes' if w else 'no' for w in warned)}")
    return all_met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["demo", "digits"], default=None, help="one recipe (default: both)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' max_epochs")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, one run each (default: 0)")
    parser.add_argument("--keep", type=Path, default=None, help="keep data, runs and reports in this directory")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        met = True
        for name, recipe in recipes(work).items():
            if args.only and name != args.only:
                continue
            results = [train_and_evaluate(name, recipe, work, seed, args.epochs) for seed in seeds]
            met &= print_table(name, results, recipe)
            if args.keep:
                pictures = results[0]["report"]["pictures"]
                print(f"pictures ({', '.join(pictures)}): {Path(next(iter(pictures.values()))).parent}")
        print(f"\nall targets met: {'yes' if met else 'no'}")


if __name__ == "__main__":
    main()
