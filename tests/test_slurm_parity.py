"""Learning parity on a real Slurm cluster: a task learns what ``spherinator fit`` learns from the same files.

The tiny VAE (tests/configs/vae_tiny.yaml, whose last decoder block says ``norm: null``) trains for a few epochs
with one seed: once with ``spherinator fit`` in this process, once as a 1-node task and once as a 2-node DDP task.
The 1-node task runs the same model on the same batches in the same order; it differs only in the number of CPU
threads of its process (float sums in another order), so its losses agree to a fraction of a percent. The 2-node
task trains each rank on half the rows at half the batch size (the same global batch and number of steps); its
gradients are averaged over the ranks as over one batch, but batch norm sees 4 rows per rank instead of 8 and the
random draws differ, so its loss lands near fit's, not on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from spherinator.cli import SpherinatorCLI
from tests.test_slurm import cluster, completed, submit, wait_for  # noqa: F401  (cluster is a fixture)

pytestmark = pytest.mark.slurm

TINY = Path(__file__).parent / "configs" / "vae_tiny.yaml"
EPOCHS = 4
# Measured on the local cluster (val_loss after 4 epochs): fit 0.04455, 1 node 0.04455, 2 nodes 0.04063.
ONE_NODE_RTOL = 0.01
TWO_NODE_RTOL = 0.25


def data_overlay(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "data.yaml"
    data_section = {"path": str(data), "columns": ["data"], "batch_size": 8, "num_workers": 0, "val_fraction": 0.25}
    config = {
        "data": {"class_path": "spherinator.data.DataModule", "init_args": data_section},
        "seed_everything": 7,
        "trainer": {"max_epochs": EPOCHS},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def fit_metrics(tmp_path: Path, overlay: Path) -> dict[str, float]:
    root = tmp_path / "fit"
    args = ["fit", "-c", str(TINY), "-c", str(overlay), "--trainer.default_root_dir", str(root)]
    args += ["--trainer.logger.init_args.save_dir", str(root)]
    cli = SpherinatorCLI(args=args)
    return {key: float(value) for key, value in cli.trainer.callback_metrics.items()}


def task_metrics(run_dir: Path) -> dict[str, float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "COMPLETED" and summary["epoch"] == EPOCHS, summary
    return summary["metrics"]


@pytest.mark.usefixtures("cluster")
def test_one_node_task_learns_what_fit_learns_and_two_nodes_land_close(tmp_path, image_dataset):
    overlay = data_overlay(tmp_path, image_dataset)
    one = submit(tmp_path, TINY, "one", "-c", str(overlay), "--time", "10", "--no-export")
    # Half the rows per rank at half the batch size: the same global batch and the same number of steps as fit.
    two = submit(
        tmp_path, TINY, "two", "-c", str(overlay), "--time", "10", "--no-export", "--nodes", "2",
        "--data.init_args.batch_size", "4",
    )  # fmt: skip
    fit = fit_metrics(tmp_path, overlay)  # runs here while the cluster trains the tasks
    wait_for(one, completed, timeout=420)
    wait_for(two, completed, timeout=420)
    one_node, two_nodes = task_metrics(one / "run"), task_metrics(two / "run")
    for key in ("val_loss", "val_recon", "train_loss"):
        assert key in fit and key in one_node, (key, sorted(fit), sorted(one_node))
    print(f"val_loss fit {fit['val_loss']:.5f}  1 node {one_node['val_loss']:.5f}  2 nodes {two_nodes['val_loss']:.5f}")
    assert one_node["val_loss"] == pytest.approx(fit["val_loss"], rel=ONE_NODE_RTOL)
    assert one_node["val_recon"] == pytest.approx(fit["val_recon"], rel=ONE_NODE_RTOL)
    assert two_nodes["val_loss"] == pytest.approx(fit["val_loss"], rel=TWO_NODE_RTOL)
