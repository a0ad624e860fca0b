"""``spherinator evaluate`` end to end: fit a tiny VAE, then report on its sphere beside PCA->S^2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from spherinator.commands import main
from tests.conftest import gaussian_blobs, write_fast_layout

TINY = str(Path(__file__).parent / "configs" / "vae_tiny.yaml")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """120 blobs (3x32x32 uint8) with their centre ``cx`` as a column and ``label`` = left / right half."""
    n = 120
    blob, cx, _ = gaussian_blobs(n)
    images = np.repeat((255 * blob[:, None]).astype(np.uint8), 3, axis=1)
    names = np.array([f"J{i:04d}" for i in range(n)])
    columns = {"data": images, "label": (cx > 16).astype(np.int64), "cx": cx, "id": np.arange(n, dtype=np.int64),
               "name": names}  # fmt: skip
    return write_fast_layout(tmp_path_factory.mktemp("labelled"), columns)


@pytest.fixture(scope="module")
def trained(labelled, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, data overlay) of a tiny VAE fitted for a few steps."""
    root = tmp_path_factory.mktemp("fit")
    overlay = root / "data.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "class_path": "spherinator.data.DataModule",
                    "init_args": {"path": str(labelled), "columns": ["data"], "batch_size": 16, "val_fraction": 0.2},
                },
                "trainer": {"max_steps": 4, "default_root_dir": str(root), "logger": False},
            }
        )
    )
    main(["fit", "-c", TINY, "-c", str(overlay)])
    (checkpoint,) = root.rglob("*.ckpt")
    return checkpoint, overlay


def test_evaluate_reports_the_sphere_beside_pca_and_raw_inputs(trained, tmp_path, capsys):
    checkpoint, overlay = trained
    args = ["evaluate", "-c", TINY, "-c", str(overlay), "--ckpt_path", str(checkpoint)]
    main([*args, "--label-column", "label", "--columns", "cx,id", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "every row of the data (96 train + 24 val)" in out
    assert "PCA->S^2" in out and "raw (3072-d)" in out
    assert "kNN-5 accuracy label (chance 0.5" in out and "kNN-10 R^2 cx" in out and "coverage (192 cells)" in out
    report = json.loads((tmp_path / "sphere_report.json").read_text())
    assert report["rows_in_data"] == report["rows_used"] == report["rows"] == 120
    assert report["splits"] == {"train": 96, "val": 24} and report["beta"] == 1e-3
    sphere, pca, raw = report["sphere"], report["pca_sphere"], report["raw"]
    assert 0 < sphere["coverage"] <= 1 and sphere["uniform_coverage"] == pytest.approx(1 - (191 / 192) ** 120)
    assert sphere["concentration"]["p10"] >= 1.0 and sphere["kl_per_sample"] > 0.19
    assert raw["knn_accuracy"]["label"] > 0.9 and raw["knn_r2"]["cx"] > 0.9  # the pixels tell where the blob is
    assert pca["knn_r2"]["cx"] > 0.5
    assert set(sphere["knn_r2"]) == {"cx", "id"} and isinstance(report["warnings"], list)
    names = {"sphere_map.png", "sphere_map_label.png", "sphere_map_cx.png", "sphere_map_id.png",
             "reconstructions.png", "sphere_decoded.png"}  # fmt: skip
    assert set(report["pictures"]) == names and f"{len(names)} pictures" in out
    for name in names:
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.mode == "RGB"
            assert picture.width > 200 and picture.height > 60 and len(set(picture.get_flattened_data())) > 10, name
    with Image.open(tmp_path / "reconstructions.png") as grid:  # 8 originals above their 8 reconstructions
        assert grid.size == (8 * (32 + 2) + 2, 2 * (32 + 2) + 2)


def test_evaluate_samples_rows_and_writes_beside_the_checkpoint_by_default(trained, capsys):
    checkpoint, overlay = trained
    main(["evaluate", "-c", TINY, "-c", str(overlay), "--ckpt_path", str(checkpoint), "--max-rows", "50"])
    assert "50 of 120 rows (seed 0)" in capsys.readouterr().out
    report = json.loads((checkpoint.parents[1] / "sphere_report.json").read_text())
    assert report["rows_used"] == 50 and report["sphere"]["knn_accuracy"] == {} and "pca_sphere" in report


def test_evaluate_names_a_missing_column_in_one_line(trained, capsys):
    checkpoint, overlay = trained
    args = ["evaluate", "-c", TINY, "-c", str(overlay), "--ckpt_path", str(checkpoint), "--label-column", "digit"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("spherinator evaluate: error:") and "'digit'" in error


def test_pictures_follow_the_model_spectra_as_line_plots_and_no_decoded_sphere_off_s2(tmp_path):
    """A 1-D VAE: line plots, a decoded sphere only for images; an Autoencoder's free 3-d code is not on S^2."""
    import torch

    from spherinator.evaluate import write_pictures
    from spherinator.models import Autoencoder, UpsamplingDecoder2D
    from tests.test_models import encoder_2d, vae_1d

    torch.manual_seed(0)
    for name, model, x in (
        ("vae1d", vae_1d().eval(), torch.rand(12, 1, 32)),
        ("ae", Autoencoder(encoder_2d(output_dim=3), UpsamplingDecoder2D(base_channels=8, seed_size=4)).eval(),
         torch.rand(12, 3, 16, 16)),
    ):  # fmt: skip
        with torch.no_grad():
            location = model.encode(x)
        rows = {"location": location.numpy(), "inputs": x.flatten(1).numpy(), "flux/total": x.flatten(1).sum(1).numpy()}
        written = write_pictures(model, rows, ["flux/total"], tmp_path / name)
        assert set(written) == {"sphere_map.png", "sphere_map_flux_total.png", "reconstructions.png"}, name
        for path in written.values():
            with Image.open(path) as picture:
                assert picture.format == "PNG" and picture.width > 100


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--columns", "name"], "column 'name' holds string, not numbers"),
        (["--columns", "nowhere"], "column 'nowhere' not in parquet files"),
        (["--seed", "-1"], "--seed -1 is out of range"),
        (["--ckpt_path", "last"], "--ckpt_path 'last' names no file"),
        (["--device", "bogus"], "--device 'bogus' is no torch device"),
        (["--device", "cuda:99"], "--device 'cuda:99': this machine has"),
    ],
)
def test_bad_evaluate_arguments_are_one_line_before_anything_is_encoded(trained, tmp_path, capsys, extra, named):
    checkpoint, overlay = trained
    args = ["evaluate", "-c", TINY, "-c", str(overlay), "--ckpt_path", str(checkpoint), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main([*args, *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "encode" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("spherinator evaluate: error:") and named in line, line
    assert not list(tmp_path.iterdir())


def test_evaluate_takes_a_huge_max_rows_as_all_rows_and_an_unwritable_out_is_one_line(trained, tmp_path, capsys):
    checkpoint, overlay = trained
    args = ["evaluate", "-c", TINY, "-c", str(overlay), "--ckpt_path", str(checkpoint)]
    main([*args, "--max-rows", str(10**10), "--out", str(tmp_path / "report")])  # no index array of 10**10 rows
    assert "every row of the data" in capsys.readouterr().out
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--out", str(blocker / "report")])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "cannot write the report into" in line and "--out" in line, line


def test_a_column_named_twice_is_scored_once(trained, tmp_path):
    # --columns cx,cx stacked the column twice: a ValueError traceback ("240 rows but points has 120")
    from spherinator.evaluate import evaluate

    checkpoint, overlay = trained
    report = evaluate(["-c", TINY, "-c", str(overlay)], str(checkpoint), "label", ["cx", "cx", "label"], tmp_path)
    assert set(report["sphere"]["knn_r2"]) == {"cx", "label"} and set(report["sphere"]["knn_accuracy"]) == {"label"}
