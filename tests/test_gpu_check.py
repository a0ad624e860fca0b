"""tools/bench/gpu_check.py: its reduced CPU mode runs every check and produces its figures (the full mode needs a
GPU, see README "GPU check")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "bench" / "gpu_check.py"
CHECKS = [
    "demo data", "demo fit, bf16-mixed", "demo fit, 32", "bf16-mixed / 32", "loader alone, 2 workers",
    "pinned memory", "DeepSpeed ZeRO stage 2", "ONNX Runtime",
]  # fmt: skip


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reduced CPU mode; on a GPU run the full one")
def test_reduced_mode_runs_every_check_and_prints_its_figures(tmp_path):
    report_path = tmp_path / "report.json"
    done = run("--cpu", "--json", str(report_path), "--workdir", str(tmp_path / "work"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    report = json.loads(report_path.read_text())
    rows = {row["check"]: row for row in report["rows"]}
    assert list(rows) == CHECKS
    for name in ("demo fit, bf16-mixed", "demo fit, 32"):
        figures = rows[name]["figures"]
        assert rows[name]["verdict"] == "ok", rows[name]
        assert figures["img_per_s"] > 0 and figures["steps"] >= 5
        assert 0 <= figures["loader_wait_share"] < 1 and figures["loader_wait_p95_ms"] >= 0
        assert figures["weights_changed"] and figures["gpu_busy_percent"] is None  # no GPU to sample
    assert rows["bf16-mixed / 32"]["figures"]["x"] > 0
    assert rows["loader alone, 2 workers"]["figures"]["img_per_s"] > 0
    pinned = rows["pinned memory"]
    assert pinned["verdict"] == "n/a" and pinned["figures"]["pinned"]["gb_per_s"] > 0  # the path runs, unpinned
    deepspeed = rows["DeepSpeed ZeRO stage 2"]
    assert deepspeed["verdict"] == "n/a" and deepspeed["figures"]["zero_stage"] == 2
    onnx = rows["ONNX Runtime"]
    assert onnx["verdict"] == "ok" and onnx["figures"]["provider"] == "CPUExecutionProvider"
    assert onnx["figures"]["img_per_s"] > 0 and onnx["figures"]["max_abs_diff"] <= 1e-4
    table = done.stdout.splitlines()
    assert table[0].startswith("gpu_check (cpu mode) on CPU only")
    assert [line.split("  ")[0].strip() for line in table[1:]] == CHECKS
    assert (tmp_path / "work" / "onnx" / "reconstruction.onnx").is_file()  # all of it in the work folder
    assert list((tmp_path / "work" / "runs" / "demo").glob("version_*/checkpoints/last.ckpt"))


def test_checks_past_the_time_budget_are_skipped_not_run(tmp_path):
    report_path = tmp_path / "report.json"
    done = run("--cpu", "--budget-s", "0", "--json", str(report_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(report_path.read_text())["rows"]
    assert [row["check"] for row in rows] == [
        "demo data", "demo fit", "loader alone", "pinned memory", "DeepSpeed ZeRO stage 2", "ONNX Runtime"
    ]  # fmt: skip
    assert all(row["verdict"] == "skipped" and "time budget" in row["summary"] for row in rows)
    assert list(tmp_path.iterdir()) == [report_path]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the full mode runs")
def test_the_full_mode_without_a_gpu_says_to_use_the_reduced_one(tmp_path):
    done = run(cwd=tmp_path)
    assert done.returncode == 2 and "no CUDA GPU here; run the reduced check with --cpu" in done.stderr
