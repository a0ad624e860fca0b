"""tools/make_dataset.py and spherinator.data.writer produce datasets the DataModule reads back exactly."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spherinator.data import DataError, DataModule, ParquetWriter
from tools import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def _all_rows(path: Path, columns: list[str]) -> dict[str, torch.Tensor]:
    dm = DataModule(path, columns=columns, return_dict=True, batch_size=64, val_fraction=0.0)
    batches = list(dm.predict_dataloader())
    return {c: torch.cat([b[c] for b in batches]) for c in columns}


def _groups(path: Path) -> list[list[int]]:
    out = []
    for file in sorted(path.glob("*.parquet")):
        meta = pq.ParquetFile(file).metadata
        out.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    return out


@pytest.mark.parametrize("compression", ["none", "snappy", "zstd"])
def test_writer_streams_batches_into_files_and_row_groups(tmp_path, compression):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 2, 5, 3), dtype=np.uint8)
    values = rng.normal(size=(50, 7)).astype(np.float64)
    with ParquetWriter(tmp_path, rows_per_file=20, rows_per_group=8, compression=compression) as writer:
        for lo in range(0, 50, 13):  # batches that do not line up with groups or files
            writer.write(
                {"data": images[lo : lo + 13], "values": values[lo : lo + 13], "id": np.arange(lo, min(50, lo + 13))}
            )
    assert _groups(tmp_path) == [[8, 8, 4], [8, 8, 4], [8, 2]]
    schema = pq.read_schema(writer.files[0])
    assert schema.field("data").type == pa.binary(30)
    assert schema.metadata[b"data_shape"] == b"(2,5,3)" and schema.metadata[b"values_dtype"] == b"float64"
    assert pq.ParquetFile(writer.files[0]).metadata.row_group(0).column(0).compression == compression.upper().replace(
        "NONE", "UNCOMPRESSED"
    )
    rows = _all_rows(tmp_path, ["data", "values", "id"])
    torch.testing.assert_close(rows["data"], torch.from_numpy(images).float() / 255)
    torch.testing.assert_close(rows["values"], torch.from_numpy(values).float())
    assert rows["id"].tolist() == list(range(50))


def test_writer_rejects_inconsistent_batches(tmp_path):
    writer = ParquetWriter(tmp_path)
    writer.write({"data": np.zeros((2, 3, 4), np.uint8)})
    with pytest.raises(DataError, match=r"rows of shape \(3, 5\).*first batch had \(3, 4\)"):
        writer.write({"data": np.zeros((2, 3, 5), np.uint8)})
    with pytest.raises(DataError, match="compression='lz5'"):
        ParquetWriter(tmp_path, compression="lz5")


def test_synthetic_galaxies_look_like_galaxies(tmp_path):
    assert (
        make_dataset.main(
            ["synthetic", "--out", str(tmp_path), "--count", "40", "--size", "32", "--quiet", "--rows-per-group", "16"]
        )
        == 0
    )
    rows = _all_rows(tmp_path, ["data", "id", "bulge_fraction", "axis_ratio"])
    images = rows["data"]
    assert images.shape == (40, 3, 32, 32) and rows["id"].tolist() == list(range(40))
    centre, edge = images[:, :, 12:20, 12:20].mean(), images[:, :, :4, :4].mean()
    assert centre > 4 * edge  # light concentrated in the middle, on a dark sky
    assert images.std(0).mean() > 0.01  # the images differ
    bulgy = rows["bulge_fraction"] > rows["bulge_fraction"].median()
    red_minus_blue = images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))
    assert red_minus_blue[bulgy].mean() > red_minus_blue[~bulgy].mean()  # bulges are redder, as generated
    assert rows["axis_ratio"].min() >= 0.25 and rows["axis_ratio"].max() <= 1.0


def test_synthetic_photometry_columns_measure_the_images(tmp_path):
    make_dataset.main(["synthetic", "--out", str(tmp_path), "--count", "60", "--size", "32", "--quiet"])
    rows = _all_rows(tmp_path, ["data", "log_flux", "b_minus_r"])
    light = rows["data"].double() - 0.02  # above the sky level (the noise averages out over the stamp)
    measured_flux = torch.log10(light.sum((1, 2, 3)))
    measured_colour = 2.5 * torch.log10(light[:, 0].sum((1, 2)) / light[:, 2].sum((1, 2)))
    assert torch.corrcoef(torch.stack([measured_flux, rows["log_flux"].double()]))[0, 1] > 0.9  # sky noise clipped at 0
    assert torch.corrcoef(torch.stack([measured_colour, rows["b_minus_r"].double()]))[0, 1] > 0.9
    # pixel values in [0, 1] summed over 32x32 pixels and 3 bands
    assert (measured_flux - rows["log_flux"]).abs().median() < 0.1


def test_synthetic_is_seeded(tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        make_dataset.main(
            ["synthetic", "--out", str(tmp_path / name), "--count", "8", "--size", "16", "--quiet", "--seed", seed]
        )
    a, b, c = (_all_rows(tmp_path / n, ["data"])["data"] for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hubble_cutouts(tmp_path):
    pytest.importorskip("skimage")
    assert make_dataset.main(["hubble", "--out", str(tmp_path), "--size", "32", "--min-area", "200", "--quiet"]) == 0
    rows = _all_rows(tmp_path, ["data", "x", "y", "area"])
    assert len(rows["data"]) >= 10 and rows["data"].shape[1:] == (3, 32, 32)
    assert (rows["area"] >= 200).all()
    centre, edge = rows["data"][:, :, 12:20, 12:20].mean(), rows["data"][:, :, :4, :].mean()
    assert centre > 2 * edge  # stamps are centred on sources


def test_images_folder_png_npy_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    pictures = rng.integers(0, 256, (3, 12, 10, 3), dtype=np.uint8)
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(folder / "sub" / f"p{i}.png")
    assert make_dataset.main(["images", "--input", str(folder), "--out", str(tmp_path / "png"), "--quiet"]) == 0
    rows = _all_rows(tmp_path / "png", ["data"])
    torch.testing.assert_close(rows["data"], torch.from_numpy(pictures.transpose(0, 3, 1, 2)).float() / 255)
    names = pq.read_table(tmp_path / "png", columns=["filename"])["filename"].to_pylist()
    assert names == ["sub/p0.png", "sub/p1.png", "sub/p2.png"]

    np.save(folder / "sub" / "z.npy", rng.integers(0, 256, (3, 20, 20), dtype=np.uint8))
    assert make_dataset.main(["images", "--input", str(folder), "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    args = ["images", "--input", str(folder), "--out", str(tmp_path / "sized"), "--size", "8", "--quiet"]
    assert make_dataset.main(args) == 0
    assert _all_rows(tmp_path / "sized", ["data"])["data"].shape == (4, 3, 8, 8)


def test_images_folder_fits(tmp_path):
    fits = pytest.importorskip("astropy.io.fits")
    (tmp_path / "in").mkdir()
    arrays = np.random.default_rng(0).normal(size=(2, 6, 6)).astype(">f4")  # FITS is big-endian
    for i, array in enumerate(arrays):
        fits.PrimaryHDU(array).writeto(tmp_path / "in" / f"g{i}.fits")
    assert make_dataset.main(["images", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    torch.testing.assert_close(_all_rows(tmp_path / "o", ["data"])["data"], torch.from_numpy(arrays.astype("<f4")))


def _legacy_list_dataset(root: Path, images: np.ndarray) -> None:
    root.mkdir(parents=True)
    data = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), int(np.prod(images.shape[1:])))
    table = pa.table({"data": data, "id": np.arange(len(images)), "name": [f"g{i}" for i in range(len(images))]})
    table = table.replace_schema_metadata({b"data_shape": b"(3,8,8)"})
    pq.write_table(table, root / "legacy.parquet", row_group_size=9)


def test_convert_list_layout_to_fast_layout_with_check(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (30, 3, 8, 8), dtype=np.uint8)
    _legacy_list_dataset(tmp_path / "legacy", images)
    args = [
        "convert",
        "--input",
        str(tmp_path / "legacy"),
        "--out",
        str(tmp_path / "fast"),
        "--quiet",
        "--compression",
        "zstd",
        "--rows-per-group",
        "8",
    ]
    assert make_dataset.main(args) == 0
    schema = pq.read_schema(next((tmp_path / "fast").glob("*.parquet")))
    assert pa.types.is_fixed_size_binary(schema.field("data").type) and schema.metadata[b"data_dtype"] == b"uint8"
    assert pq.read_table(tmp_path / "fast", columns=["name"])["name"].to_pylist()[:2] == ["g0", "g1"]
    old, new = _all_rows(tmp_path / "legacy", ["data", "id"]), _all_rows(tmp_path / "fast", ["data", "id"])
    assert torch.equal(old["data"], new["data"]) and torch.equal(old["id"], new["id"])


def test_convert_encoded_images_and_detects_damaged_output(tmp_path, monkeypatch):
    blobs = []
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(np.full((6 + i, 6, 3), 40 * i, np.uint8)).save(buf, format="PNG")  # different heights
        blobs.append(buf.getvalue())
    (tmp_path / "png").mkdir()
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary())}), tmp_path / "png" / "x.parquet")
    assert (
        make_dataset.main(["convert", "--input", str(tmp_path / "png"), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    )
    args = ["convert", "--input", str(tmp_path / "png"), "--out", str(tmp_path / "b"), "--size", "4", "--quiet"]
    assert make_dataset.main(args) == 0
    rows = _all_rows(tmp_path / "b", ["image"])["image"]
    assert rows.shape == (5, 3, 4, 4)
    torch.testing.assert_close(rows[:, 0, 0, 0] * 255, torch.arange(5).float() * 40, atol=1, rtol=0)

    from spherinator.data import convert

    real_verify = convert.verify
    monkeypatch.setattr(convert, "verify", lambda path, cols: {**real_verify(path, cols), "checksum": 0})
    args[4] = str(tmp_path / "c")
    assert make_dataset.main(args) == 2  # a mismatch between written and read-back data is an error


def test_make_dataset_runs_as_a_script_with_help(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_dataset.py"), "synthetic", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert "--count" in out.stdout and "--rows-per-group" in out.stdout and "--compression" in out.stdout


def test_digits_are_upsampled_with_their_labels(tmp_path):
    from sklearn.datasets import load_digits

    assert make_dataset.main(["digits", "--out", str(tmp_path), "--quiet"]) == 0
    schema = pq.read_schema(sorted(tmp_path.glob("*.parquet"))[0])
    assert schema.field("data").type == pa.binary(32 * 32) and schema.metadata[b"data_shape"] == b"(1,32,32)"
    rows = _all_rows(tmp_path, ["data", "label", "id"])
    digits = load_digits()
    assert rows["data"].shape == (1797, 1, 32, 32) and rows["id"].tolist() == list(range(1797))
    assert rows["label"].tolist() == digits.target.tolist()
    # each 4x4 block's mean follows the 8x8 digit (bilinear upsampling blurs it a little; 16 -> 1 after scaling)
    blocks = rows["data"].reshape(1797, 8, 4, 8, 4).mean((2, 4))
    original = torch.from_numpy(digits.images).float() / 16
    assert torch.corrcoef(torch.stack([blocks.flatten(), original.flatten()]))[0, 1] > 0.95
    assert rows["data"].max() == 1.0
    assert make_dataset.main(["digits", "--out", str(tmp_path / "eight"), "--size", "8", "--quiet"]) == 0
    torch.testing.assert_close(_all_rows(tmp_path / "eight", ["data"])["data"][:, 0], original, atol=0.6 / 255, rtol=0)


@pytest.mark.parametrize(("flag", "value"), [("--count", "0"), ("--length", "3")])
def test_spectra_refuses_a_bad_size_in_one_line_naming_it_and_leaves_no_output(tmp_path, capsys, flag, value):
    out = tmp_path / "spectra"
    assert make_dataset.main(["spectra", "--out", str(out), flag, value, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} {value} must be" in err
    assert not out.exists()  # no empty output directory left behind


def test_an_out_that_holds_a_dataset_or_is_a_file_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "spectra"
    assert make_dataset.main(["spectra", "--out", str(out), "--count", "48", "--rows-per-file", "16", "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # used to replace part-00000 only: 10 new rows of length 100 mixed with 32 old ones of length 344, exit 0
    assert make_dataset.main(["spectra", "--out", str(out), "--count", "10", "--length", "100", "--quiet"]) == 2
    assert "already holds 3 .parquet files" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "file").write_text("x")
    assert make_dataset.main(["spectra", "--out", str(tmp_path / "file"), "--count", "10", "--quiet"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
