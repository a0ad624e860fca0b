"""The sphere atlas: HiPS validity, tile contents against the decoder, catalog positions, pages, server, CLI."""

from __future__ import annotations

import copy
import json
import re
import shutil
import urllib.request
from pathlib import Path
from threading import Thread

import astropy.units as u
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from astropy_healpix import healpix_to_lonlat
from PIL import Image

from spherinator.atlas import AtlasError, SphereModel, make_server, open_model, write_atlas, write_sweep_page
from spherinator.atlas.catalog import add_row_columns, load_datamodule, write_catalog
from spherinator.atlas.hips import allsky_layout, read_properties, tile_path, write_hips
from spherinator.atlas.render import TileRenderer
from spherinator.atlas.sky import healpix_index, tile_pixel_index, unit_to_radec
from spherinator.commands import main
from spherinator.data import DataModule
from tests.conftest import gaussian_blobs, write_fast_layout

TINY = str(Path(__file__).parent / "configs" / "vae_tiny.yaml")
REQUIRED = ["creator_did", "obs_title", "dataproduct_type", "hips_version", "hips_release_date", "hips_status",
            "hips_tile_format", "hips_order", "hips_frame", "hips_tile_width"]  # fmt: skip


def astropy_vectors(order: int, pixels, dx=None, dy=None) -> np.ndarray:
    """Unit vectors of HEALPix (NESTED) positions, straight from astropy-healpix."""
    lon, lat = healpix_to_lonlat(np.asarray(pixels), 2**order, dx=dx, dy=dy, order="nested")
    lon, lat = lon.to_value(u.rad), lat.to_value(u.rad)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def colour_of(z: np.ndarray) -> np.ndarray:
    """The analytic decoder's colour of unit vectors (B, 3): (z + 1) / 2 in [0, 1]."""
    return (np.asarray(z, dtype=np.float32) + 1) / 2


def plain_decoder(z: np.ndarray) -> np.ndarray:
    """(B, 3) -> (B, 3, 16, 16) images of one colour each, a function of the position."""
    return np.broadcast_to(colour_of(z)[:, :, None, None], (len(z), 3, 16, 16)).copy()


def compass_decoder(z: np.ndarray) -> np.ndarray:
    """The same image everywhere: top half green, bottom half black; left half red, right half blue."""
    image = np.zeros((3, 16, 16), dtype=np.float32)
    image[1, :8, :] = 1.0
    image[0, :, :8] = 1.0
    image[2, :, 8:] = 1.0
    return np.broadcast_to(image, (len(z), 3, 16, 16)).copy()


# -- sky ------------------------------------------------------------------------------------------------------------


def test_unit_vectors_map_to_ra_dec_and_back():
    v = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, 0], [0, 0, -2.0]])
    ra, dec = unit_to_radec(v)
    np.testing.assert_allclose(ra, [0, 90, 0, 225, 0], atol=1e-9)
    np.testing.assert_allclose(dec, [0, 0, 90, 0, -90], atol=1e-9)


def test_tile_pixels_are_the_nested_sub_cells_of_the_tile():
    # Tile pixel [row, col] of tile npix at order k is the sub-cell npix * w^2 + index[row, col] at order k + log2(w):
    # its centre is where astropy puts offset (row + .5, col + .5) / w inside the tile's cell.
    order, npix, w = 2, 37, 8
    index = tile_pixel_index(w)
    assert sorted(index.ravel()) == list(range(w * w))
    rows, cols = np.mgrid[0:w, 0:w]
    sub = astropy_vectors(order + 3, npix * w * w + index.ravel())
    inside = astropy_vectors(order, np.full(w * w, npix), dx=(rows.ravel() + 0.5) / w, dy=(cols.ravel() + 0.5) / w)
    np.testing.assert_allclose(sub, inside, atol=1e-9)


# -- HiPS ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_hips(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hips")
    renderer = TileRenderer((3, 16, 16), width=16, fit="fill")  # a plain colour filling each cell
    write_hips(plain_decoder, renderer, out, max_order=3, tile_format="png", progress=False)
    return out


def test_hips_has_the_required_properties_and_every_tile(plain_hips):
    keys = read_properties(plain_hips / "properties")
    assert [k for k in REQUIRED if k not in keys] == []
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\dZ", keys["hips_release_date"])
    assert keys["creator_did"].startswith("ivo://")
    assert (keys["hips_order"], keys["hips_tile_width"], keys["hips_tile_format"]) == ("3", "16", "png")
    assert (keys["hips_frame"], keys["dataproduct_type"], keys["hips_version"]) == ("equatorial", "image", "1.4")
    for order in range(4):
        found = sorted(int(p.stem[4:]) for p in (plain_hips / f"Norder{order}").glob("Dir*/Npix*.png"))
        assert found == list(range(12 * 4**order)), order
        assert tile_path(plain_hips, order, 5, "png").is_file()
    assert not (plain_hips / "Norder4").exists()


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_each_tile_shows_the_decoder_at_its_cell_centre(plain_hips, order):
    pixels = np.arange(12 * 4**order)
    expected = colour_of(astropy_vectors(order, pixels))  # the decoder, called here at astropy's cell centres
    tiles = np.stack([np.asarray(Image.open(tile_path(plain_hips, order, p, "png"))) for p in pixels]) / 255.0
    np.testing.assert_allclose(tiles.mean(axis=(1, 2)), expected, atol=0.01)
    # and each tile is its own cell's: no other cell's colour is as close
    distance = np.abs(tiles.mean(axis=(1, 2))[:, None, :] - expected[None, :, :]).sum(-1)
    assert (distance.argmin(axis=1) == pixels).all()


def test_allsky_is_the_order_3_tiles_side_by_side(plain_hips):
    allsky = np.asarray(Image.open(plain_hips / "Norder3" / "Allsky.png")).astype(float)
    columns, rows = allsky_layout(3)
    assert (columns, rows) == (27, 29)
    assert allsky.shape == (rows * 16, columns * 16, 3)  # tiles of 16 px kept at 16 (at most 64)
    for npix in (0, 26, 27, 400, 767):
        r, c = divmod(npix, columns)
        block = allsky[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]
        tile = np.asarray(Image.open(tile_path(plain_hips, 3, npix, "png"))).astype(float)
        np.testing.assert_array_equal(block, tile)
    assert allsky[-16:, (768 % 27) * 16 :].max() == 0  # no tile beyond the last


def test_images_appear_upright_with_east_on_the_left(tmp_path):
    # Tile pixels whose sky position (from astropy) lies north of the cell centre show the image's top half (green),
    # those east of it the image's left half (red): upright, not mirrored, as a sky viewer shows the sky.
    renderer = TileRenderer((3, 16, 16), width=32, fit="fill")
    write_hips(compass_decoder, renderer, tmp_path, max_order=2, tile_format="png", progress=False)
    w, order = 32, 2
    rows, cols = np.mgrid[0:w, 0:w]
    checked = 0
    for npix in (3, 70, 100, 150):
        tile = np.asarray(Image.open(tile_path(tmp_path, order, npix, "png"))).astype(float) / 255
        points = astropy_vectors(order, np.full(w * w, npix), dx=(rows.ravel() + 0.5) / w, dy=(cols.ravel() + 0.5) / w)
        centre = astropy_vectors(order, [npix])[0]
        east = np.array([-centre[1], centre[0], 0.0]) / np.hypot(centre[0], centre[1])
        north = np.cross(centre, east)
        e, n = (points @ east).reshape(w, w), (points @ north).reshape(w, w)
        far = np.abs(n) > 0.3 * np.abs(n).max()
        assert (tile[..., 1][far & (n > 0)] > 0.7).all() and (tile[..., 1][far & (n < 0)] < 0.3).all()
        far = np.abs(e) > 0.3 * np.abs(e).max()
        assert (tile[..., 0][far & (e > 0)] > 0.7).all() and (tile[..., 2][far & (e < 0)] > 0.7).all()
        checked += far.sum()
    assert checked > 1000


def test_images_fill_their_cells_by_default_and_spectra_are_contained():
    # a centred object fills the sky seamlessly; a plot keeps both its ends
    assert TileRenderer((3, 16, 16), width=32).fit == "fill"
    assert TileRenderer((1, 64)).fit == "contain"


def test_contain_shows_the_whole_picture_inside_the_cell(tmp_path):
    renderer = TileRenderer((3, 16, 16), width=32, fit="contain")
    assert renderer.fit == "contain"
    write_hips(compass_decoder, renderer, tmp_path, max_order=1, tile_format="png", progress=False)
    for npix in (5, 20, 40):
        tile = np.asarray(Image.open(tile_path(tmp_path, 1, npix, "png"))).astype(int)
        assert tile[[0, 0, -1, -1], [0, -1, 0, -1]].max() < 30  # the cell's corners: background
        corners = {"red+green": [255, 255, 0], "blue+green": [0, 255, 255], "red": [255, 0, 0], "blue": [0, 0, 255]}
        for colour in corners.values():  # every quadrant of the image is drawn
            assert (np.abs(tile - colour).sum(-1) < 60).sum() > 20


def test_spectra_are_drawn_as_line_plots():
    renderer = TileRenderer((1, 64), low=0.0, high=1.0)
    assert (renderer.kind, renderer.width) == ("spectrum", 256)
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None, None]  # rising line
    picture = renderer.thumbnails(ramp, size=128)[0].astype(float)  # (64, 128, 3)
    line = picture.sum(-1) > 1.5 * 255  # the bright line
    rows = [np.flatnonzero(line[:, x]).mean() for x in (10, 64, 117)]
    assert rows[0] > rows[1] > rows[2]  # higher values are drawn higher up


# -- a trained model: catalog, atlas, pages ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    """80 blobs (3x32x32 uint8) with an ``id``, an object ``name``, a ``label`` and the blob's centre ``cx``."""
    n = 80
    blob, cx, rng = gaussian_blobs(n)
    images = (255 * blob[:, None] * rng.uniform(0.3, 1, (n, 3, 1, 1))).astype(np.uint8)
    names = np.array([f"J{i:04d}+{i % 7:02d}" for i in range(100, 100 + n)])
    columns = {"data": images, "id": np.arange(100, 100 + n, dtype=np.int64), "name": names,
               "label": (cx > 16).astype(np.int64), "cx": cx}  # fmt: skip
    return write_fast_layout(tmp_path_factory.mktemp("blobs"), columns)


@pytest.fixture(scope="module")
def run_dir(blobs, tmp_path_factory) -> Path:
    """A ``spherinator fit`` run directory (config.yaml, checkpoints/) of a tiny VAE and its ONNX export."""
    from spherinator import export_onnx

    root = tmp_path_factory.mktemp("fit")
    overlay = root / "data.yaml"
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(root / "runs"), "name": "tiny"}}  # fmt: skip
    overlay.write_text(yaml.safe_dump({
        "data": {"class_path": "spherinator.data.DataModule",
                 "init_args": {"path": str(blobs), "columns": ["data"], "batch_size": 16, "val_fraction": 0.2}},
        "trainer": {"max_steps": 4, "logger": logger},
    }))  # fmt: skip
    main(["fit", "-c", TINY, "-c", str(overlay)])
    run = root / "runs" / "tiny" / "version_0"
    (checkpoint,) = run.glob("checkpoints/*.ckpt")
    export_onnx(checkpoint, run / "onnx")
    return run


def test_the_catalog_places_a_row_at_its_unit_vector(tmp_path):
    # The encoder stub returns each row's stored vector: cell centres of order 2 read straight from astropy.
    pixels = np.array([0, 5, 77, 130, 191, 64, 100, 12])
    vectors = astropy_vectors(2, pixels).astype(np.float32)
    data = np.zeros((len(pixels), 1, 2, 2), dtype=np.float32)
    data.reshape(len(pixels), 4)[:, :3] = vectors * 0.5  # any length: the catalog normalises
    root = write_fast_layout(tmp_path / "data", {"data": data, "id": np.arange(len(pixels), dtype=np.int64) * 10},
                             files=1, rows_per_group=4)  # fmt: skip

    class Stub(torch.nn.Module):
        def predict_step(self, x, batch_idx):
            return {"location": x.flatten(1)[:, :3], "scale": torch.full((len(x),), 7.0)}

        def decode(self, z):
            return torch.from_numpy(plain_decoder(z.numpy())[:, :1, :2, :2])

    model = SphereModel(input_shape=(1, 2, 2), z_dim=3, name="stub", torch_model=Stub())
    datamodule = DataModule(root, columns=["data"], batch_size=3, val_fraction=0.0, shuffle=False)
    assert add_row_columns(datamodule) == ["id"]
    renderer = TileRenderer((1, 2, 2), width=8)
    summary = write_catalog(model, datamodule, tmp_path, renderer, order=2, max_sources=5, thumbnails=2,
                            progress=False)  # fmt: skip
    table = pq.read_table(tmp_path / "catalog.parquet").to_pydict()
    lon, lat = healpix_to_lonlat(pixels, 4, order="nested")
    np.testing.assert_allclose(table["ra"], lon.to_value(u.deg), atol=1e-4)
    np.testing.assert_allclose(table["dec"], lat.to_value(u.deg), atol=1e-4)
    assert table["healpix"] == pixels.tolist()
    assert table["row"] == list(range(len(pixels))) and table["id"] == [10 * i for i in range(len(pixels))]
    np.testing.assert_allclose(np.stack([table[a] for a in "xyz"], 1), vectors, atol=1e-6)
    assert table["concentration"] == [7.0] * len(pixels)
    assert (summary["rows"], summary["sources"], summary["thumbnails"]) == (8, 5, 2)
    assert len(list((tmp_path / "thumbs" / "input").glob("*.png"))) == 2

    from astropy.io.votable import parse_single_table

    vot = parse_single_table(str(tmp_path / "catalog.vot"))
    assert len(vot.array) == 5
    ucds = {f.name: f.ucd for f in vot.fields}
    assert ucds["ra"] == "pos.eq.ra;meta.main" and ucds["dec"] == "pos.eq.dec;meta.main"
    for row in vot.array:  # the sample's rows are rows of the catalog
        i = int(row["row"])
        assert (int(row["id"]), int(row["healpix"])) == (10 * i, pixels[i])
        assert abs(float(row["ra"]) - table["ra"][i]) < 1e-9


def test_atlas_of_a_run_directory(run_dir, blobs, tmp_path, capsys):
    out = tmp_path / "atlas"
    info = write_atlas(run_dir, out=out, max_order=3, max_sources=50, thumbnails=5, progress=False)
    assert info["path"] == str(out)
    # the run's ONNX decoder draws the tiles, its checkpoint encodes (so the concentration is known)
    assert info["decoder"].endswith("(onnxruntime)") and "(torch" in info["encoder"]
    assert (info["hips"]["tiles"], info["catalog"]["rows"], info["catalog"]["sources"]) == (1020, 80, 50)
    assert info["catalog"]["data_columns"] == ["id", "name", "label", "cx"]
    assert json.loads((out / "atlas.json").read_text())["hips"]["tiles"] == 1020
    assert read_properties(out / "hips" / "properties")["hips_order"] == "3"
    table = pq.read_table(out / "catalog.parquet")
    assert table.num_rows == 80
    assert set(table.column_names) >= {"row", "id", "name", "label", "cx", "ra", "dec", "healpix", "concentration"}
    # string ids (survey object names) stay with their rows, in the Parquet file and in the VOTable
    ids, names = table["id"].to_pylist(), table["name"].to_pylist()
    assert names == [f"J{i:04d}+{i % 7:02d}" for i in ids] and sorted(ids) == list(range(100, 180))
    from astropy.io.votable import parse_single_table

    vot = parse_single_table(str(out / "catalog.vot")).array
    assert len(vot) == 50 and all(str(r["name"]) == f"J{int(r['id']):04d}+{int(r['id']) % 7:02d}" for r in vot)
    np.testing.assert_array_equal(table["healpix"].to_numpy(), healpix_index(table["ra"].to_numpy(),
                                                                             table["dec"].to_numpy(), 3))  # fmt: skip
    page = (out / "index.html").read_text()
    assert "cdn.jsdelivr.net/npm/aladin-lite@" in page  # the public CDN by default
    assert '"catalog": "catalog.vot"' in page
    # every row also in the progressive catalog the page draws: 80 rows, all at order 1, with their thumbnails
    assert info["catalog"]["progressive"] == {**info["catalog"]["progressive"], "path": "catalog", "rows": 80,
                                              "placed": 80, "order": 1}  # fmt: skip
    assert '"catalog_hips": "catalog"' in page
    assert read_properties(out / "catalog" / "properties")["hips_cat_nrows"] == "80"
    allsky = (out / "catalog" / "Norder1" / "Allsky.tsv").read_text().splitlines()
    assert len(allsky) == 2 + 80 and "thumbs/input/" in "".join(allsky[2:])

    # tile (order, npix) holds the decoder's image at the cell centre: its central pixels are the image's centre
    model = open_model(run_dir)
    decoded = model.decode(astropy_vectors(1, np.arange(48)).astype(np.float32))  # (48, 3, 32, 32)
    tiles = np.stack([np.asarray(Image.open(tile_path(out / "hips", 1, p, "jpg"))) for p in range(48)]) / 255.0
    np.testing.assert_allclose(tiles[:, 31:33, 31:33].mean(axis=(1, 2)), decoded[:, :, 15:17, 15:17].mean(axis=(2, 3)),
                               atol=0.06)  # fmt: skip


def test_atlas_from_the_onnx_directory_and_cli_errors(run_dir, blobs, tmp_path, capsys):
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "spherinator.data.DataModule",
                                             "init_args": {"path": str(blobs), "batch_size": 32}}}))  # fmt: skip
    out = tmp_path / "from_onnx"
    main(["atlas", str(run_dir / "onnx"), "-c", str(data), "--data.init_args.batch_size", "8", "-o", str(out),
          "--max-order", "1", "--thumbnails", "0"])  # fmt: skip
    info = json.loads((out / "atlas.json").read_text())
    assert info["encoder"].endswith("(onnxruntime)") and info["decoder"].endswith("(onnxruntime)")
    assert "concentration" not in pq.read_schema(out / "catalog.parquet").names  # encoder.onnx gives no scale
    assert info["hips"]["tiles"] == 60 and not (out / "thumbs").exists()
    # below order 3 the Allsky of order 3 is drawn all the same (Aladin Lite asks for it), and no tile of order 3
    assert [p.name for p in (out / "hips" / "Norder3").iterdir()] == ["Allsky.jpg"]

    def error(*args: str) -> str:
        return atlas_error(capsys, *args)

    assert "already exists; pass --overwrite" in error(str(run_dir / "onnx"), "-c", str(data), "-o", str(out))
    assert "--max-order 12 is out of range" in error(str(run_dir), "--max-order", "12", "-o", str(tmp_path / "x"))
    assert "does not exist" in error(str(tmp_path / "nothing"))
    assert "no data config" in error(str(run_dir / "onnx"), "-o", str(tmp_path / "y"))
    assert "--aladin-lite" in error(str(run_dir), "--aladin-lite", str(tmp_path), "-o", str(tmp_path / "z"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_load_datamodule_keeps_only_the_data_section(blobs, tmp_path):
    config = tmp_path / "all.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "nowhere.Model"}, "trainer": {"max_epochs": 3},
                                      "data": {"class_path": "spherinator.data.DataModule",
                                               "init_args": {"path": str(blobs), "batch_size": 4}}}))  # fmt: skip
    datamodule, notes = load_datamodule(["-c", str(config), "--trainer.max_epochs", "5", "--data.init_args.batch_size",
                                         "6"])  # fmt: skip
    assert datamodule.batch_size == 6
    assert notes == ["left out --trainer.max_epochs 5 (the atlas reads only data)"]
    with pytest.raises(AtlasError, match="has a data: section"):
        load_datamodule(["-c", TINY])
    with pytest.raises(AtlasError, match="-c nowhere.yaml: no such file"):
        load_datamodule(["-c", "nowhere.yaml"])


def z4_checkpoint(directory: Path) -> tuple[Path, dict]:
    """A checkpoint of the tiny VAE with a 4-d latent space."""
    from spherinator.export import build_model

    init_args = yaml.safe_load(Path(TINY).read_text())["model"]["init_args"]
    init_args["z_dim"] = 4
    init_args["encoder"]["init_args"]["input_dim"] = [3, 32, 32]
    class_path = "spherinator.models.VariationalAutoencoder"
    hyper_parameters = {"_class_path": class_path, **copy.deepcopy(init_args)}
    model = build_model(class_path, init_args)
    checkpoint = directory / "z4.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hyper_parameters}, checkpoint)
    return checkpoint, hyper_parameters


def test_a_latent_space_other_than_s2_is_refused(tmp_path):
    checkpoint, _ = z4_checkpoint(tmp_path)
    with pytest.raises(AtlasError, match="4-d latent space; the atlas maps the sphere S\\^2"):
        open_model(checkpoint)
    with pytest.raises(AtlasError, match="file but not a .ckpt"):
        open_model(Path(TINY))


def test_a_finished_task_writes_its_atlas_and_the_sweep_page(run_dir, tmp_path):
    from dataclasses import asdict

    from spherinator.submit.task import TrainingTask

    task_dir = tmp_path / "sweep" / "z_dim=3"
    shutil.copytree(run_dir, task_dir, ignore=shutil.ignore_patterns("atlas"))  # its export names its checkpoint
    result = asdict(TrainingTask(task_dir, atlas_order=1)._atlas(task_dir))  # an AtlasResult
    assert result["written"] is True, result
    assert (result["path"], result["max_order"], result["tiles"], result["rows"]) == (str(task_dir / "atlas"), 1, 60,
                                                                                     80)  # fmt: skip
    assert Path(result["page"]).is_file() and result["sweep_page"] == str(tmp_path / "sweep" / "atlas.html")
    assert read_properties(task_dir / "atlas" / "hips" / "properties")["hips_order"] == "1"
    # a model of another latent size has no sphere to draw: skipped, said why, nothing written
    other = tmp_path / "sweep" / "z_dim=4"
    other.mkdir()
    checkpoint, _ = z4_checkpoint(other)
    (other / "checkpoints").mkdir()
    checkpoint.rename(other / "checkpoints" / "last.ckpt")
    result = asdict(TrainingTask(other, atlas_order=1)._atlas(other))
    assert result["written"] is False and "4-d latent space" in result["skipped"] and not (other / "atlas").exists()


def test_server_and_sweep_page(run_dir, tmp_path):
    sweep = tmp_path / "sweep"
    for task in ("z3_a", "z3_b"):
        write_atlas(run_dir, out=sweep / task / "atlas", max_order=0, thumbnails=0, progress=False, log=None)
    page = write_sweep_page(sweep)
    assert page == sweep / "atlas.html"
    text = page.read_text()
    assert '"page": "z3_a/atlas/index.html"' in text and '"catalog": "z3_b/atlas/catalog.vot"' in text
    with pytest.raises(AtlasError, match="no atlas under"):
        write_sweep_page(tmp_path / "empty")

    server = make_server(sweep, port=0)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/z3_a/atlas/hips/properties") as response:
            assert "hips_order" in response.read().decode()
        with urllib.request.urlopen(f"{base}/z3_a/atlas/catalog.vot") as response:
            assert response.headers["Content-Type"].startswith("application/x-votable+xml")
    finally:
        server.shutdown()
        server.server_close()
    assert server.server_address[0] == "127.0.0.1"
    assert ("/z3_a/atlas/hips/properties", 200) in server.requests


# -- in a real browser ----------------------------------------------------------------------------------------------

ALADIN_LITE = Path(__file__).parents[1] / ".venv/aladin-lite/node_modules/aladin-lite/dist/aladin.js"
MARKER = np.array([255, 176, 0])  # the catalog's colour, #ffb000


def local_aladin_lite() -> Path:
    """The local Aladin Lite (`make aladin-lite`, or $SPHERINATOR_ALADIN_LITE), or a skip saying what is missing."""
    import os

    if shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
    found = os.environ.get("SPHERINATOR_ALADIN_LITE") or ALADIN_LITE
    if not Path(found).is_file():
        pytest.skip(f"needs a local Aladin Lite at {found} (make aladin-lite: npm install aladin-lite)")
    return Path(found)


def open_in_chromium(url: str, tmp_path: Path, size: str = "1200,800") -> tuple[str, list[str], np.ndarray]:
    """Load ``url`` in headless Chromium: (the DOM after the page's scripts ran, its console lines, a screenshot)."""
    import subprocess

    flags = ["chromium", "--headless", "--no-sandbox", "--enable-unsafe-swiftshader", "--virtual-time-budget=30000",
             f"--window-size={size}", "--enable-logging=stderr", "--v=0"]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=240)
    shot = tmp_path / "screenshot.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=240)
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "GL Driver Message" not in line]
    return dom.stdout, console, np.asarray(Image.open(shot).convert("RGB")).astype(int)


def browse(directory: Path, page: str, tmp_path: Path) -> tuple[dict[str, str], str, np.ndarray, list]:
    """Serve ``directory`` and open ``page`` in Chromium: (the page's status, its DOM, a screenshot, the requests).
    The page said no error, its console none, and every request was answered."""
    server = make_server(directory, port=0)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        dom, console, shot = open_in_chromium(f"http://127.0.0.1:{server.server_address[1]}/{page}", tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    (tag,) = re.findall(r'<div id="atlas-status"[^>]*>', dom)
    status = dict(re.findall(r'data-([\w-]+)="([^"]*)"', tag))
    assert "error" not in status, status["error"]
    assert [line for line in console if re.search(r"error|uncaught|failed|refused|not found|404", line, re.I)] == []
    assert [(p, c) for p, c in server.requests if c != 200] == []
    return status, dom, shot, server.requests


@pytest.mark.slow
def test_the_page_shows_the_hips_and_the_catalog_in_chromium(run_dir, tmp_path):
    aladin = local_aladin_lite()
    out = tmp_path / "atlas"
    write_atlas(run_dir, out=out, max_order=3, thumbnails=3, aladin_lite=aladin, progress=False, log=None)
    assert 'import A from "./aladin-lite/aladin.js"' in (out / "index.html").read_text()
    # zoomed in on row 1, so that tiles of order 2-3 are drawn (not the Allsky), with its source panel open
    status, dom, shot, requests = browse(out, "index.html?row=1&fov=40", tmp_path)
    assert status.get("state") == "ready" and status.get("sources") == "80"  # every row of the VOTable
    tiles = [p for p, _ in requests if re.search(r"/hips/Norder[23]/Dir0/Npix\d+\.jpg$", p)]
    assert len(tiles) >= 4, requests
    assert '<img src="thumbs/input/1.png"' in dom and '<img src="thumbs/decoded/1.png"' in dom
    assert {"/thumbs/input/1.png", "/thumbs/decoded/1.png"} <= {p for p, _ in requests}
    sky = shot[:, : shot.shape[1] - 330]  # left of the side panel
    assert sky.std() > 10  # drawn tiles, not a blank canvas
    marker = (np.abs(sky - MARKER).sum(-1) < 60).sum()
    assert marker > 50  # the catalog's circles are drawn on top


@pytest.mark.slow
def test_the_progressive_catalog_opens_any_row_in_chromium(run_dir, tmp_path):
    from spherinator.atlas.progressive import write_progressive_catalog
    from tests.test_atlas_catalog import write_shards

    aladin = local_aladin_lite()
    out = tmp_path / "atlas"
    write_atlas(run_dir, out=out, max_order=3, thumbnails=0, aladin_lite=aladin, progress=False, log=None)
    # a survey's catalog in place of the run's 80 rows (predict's shards): 20,000 rows, tiles down to order 4
    shutil.rmtree(out / "catalog")
    shards = write_shards(tmp_path / "shards", 20000, clustered=False)
    info = write_progressive_catalog(shards, out / "catalog", tile_rows=12, allsky_rows=3, whole_rows=0)
    assert info["order"] == 4
    codes = np.frombuffer((out / "catalog" / "rows" / "0.bin").read_bytes(), "<u4")
    row = int(np.flatnonzero((codes[:20000] & 15) == 4)[-1])  # a row of the deepest order, beyond any sample
    assert row >= 80

    # the whole sky: the Allsky files of orders 1 and 2 only, 3 rows of each cell
    status, _, whole, requests = browse(out, "index.html", tmp_path)
    assert status.get("state") == "ready" and status.get("sources") == str(3 * (48 + 192))
    tsv = [p for p, _ in requests if p.endswith(".tsv")]
    assert sorted(set(tsv)) == ["/catalog/Norder1/Allsky.tsv", "/catalog/Norder2/Allsky.tsv"]
    assert 0 < int(status["drawn"]) <= int(status["sources"])

    # ?row=N: the row index names its tile, the page loads it, zooms in there and shows the row
    status, dom, shot, requests = browse(out, f"index.html?row={row}", tmp_path)
    npix = int(codes[row]) >> 4
    assert (status.get("state"), status.get("row"), status.get("row-tile")) == ("ready", str(row), f"4/{npix}")
    tiles = {p for p, _ in requests if re.search(r"/catalog/Norder[34]/Dir\d+/Npix\d+\.tsv$", p)}
    assert f"/catalog/Norder4/Dir0/Npix{npix}.tsv" in tiles and f"/catalog/Norder3/Dir0/Npix{npix // 4}.tsv" in tiles
    assert int(status["sources"]) > 3 * (48 + 192)  # the tiles of the view came on top of the Allsky rows
    assert f"<td>row</td><td>{row}</td>" in dom and f"<td>id</td><td>{10 * row}</td>" in dom
    sky = shot[:, : shot.shape[1] - 330]
    assert (np.abs(sky - MARKER).sum(-1) < 60).sum() > 50  # the catalog's sources
    assert (np.abs(sky - np.array([0, 229, 255])).sum(-1) < 60).sum() > 20  # the opened row's ring
    Image.fromarray(shot.astype(np.uint8)).save(tmp_path / "row.png")
    Image.fromarray(whole.astype(np.uint8)).save(tmp_path / "whole.png")


@pytest.mark.slow
def test_the_sweep_page_shows_every_task_in_chromium(run_dir, tmp_path):
    aladin = local_aladin_lite()
    sweep = tmp_path / "sweep"
    for task in ("beta=1e-3", "beta=1e-4"):
        write_atlas(run_dir, out=sweep / task / "atlas", max_order=1, max_sources=30, thumbnails=0,
                    aladin_lite=aladin, progress=False, log=None)  # fmt: skip
    write_sweep_page(sweep)
    status, dom, shot, _ = browse(sweep, "atlas.html", tmp_path)
    assert (status.get("state"), status.get("sources")) == ("ready", "60")
    assert dom.count('class="card"') == 2
    assert (np.abs(shot - MARKER).sum(-1) < 60).sum() > 20


# -- HiPSter (astro-hipster) reads our ONNX exports ----------------------------------------------------------------


def hipster_executable() -> Path:
    """HiPSter's ``hipster`` command ($SPHERINATOR_HIPSTER, else on PATH), or a skip saying how to get it."""
    import os

    found = os.environ.get("SPHERINATOR_HIPSTER") or shutil.which("hipster")
    if not found or not Path(found).is_file():
        pytest.skip("astro-hipster is not installed (it pulls onnxruntime-gpu, healpy, streamlit: pip install "
                    "astro-hipster in a venv of its own and set SPHERINATOR_HIPSTER=<venv>/bin/hipster)")  # fmt: skip
    return Path(found)


@pytest.mark.slow
def test_hipster_reads_our_onnx_export(run_dir, tmp_path):
    import subprocess

    from spherinator.atlas.hipster import hipster_config

    hipster = hipster_executable()
    onnx = run_dir / "onnx"
    config = hipster_config(onnx / "decoder.onnx", tmp_path / "hipster", max_order=1, name="tiny")
    (tmp_path / "hipster.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([str(hipster), "--config", str(tmp_path / "hipster.yaml")], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for order in (0, 1):
        assert len(list((tmp_path / "hipster" / "hips" / f"Norder{order}").glob("Dir0/Npix*.jpg"))) == 12 * 4**order

    # HiPSter's Inference (its input names and its onnxruntime) gives what spherinator's encoder and decoder give
    rng = np.random.default_rng(0)
    z = astropy_vectors(2, np.arange(0, 192, 7)).astype(np.float32)
    x = rng.random((5, 3, 32, 32), dtype=np.float32)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import numpy as np, sys\n"
        "from hipster import Inference\n"
        "d = Inference(sys.argv[1] + '/decoder.onnx', input_name='z')\n"
        "e = Inference(sys.argv[1] + '/encoder.onnx')\n"
        "np.save(sys.argv[2] + '/x_hat.npy', d(np.load(sys.argv[2] + '/z.npy')))\n"
        "np.save(sys.argv[2] + '/z_hat.npy', e(np.load(sys.argv[2] + '/x.npy')))\n"
    )
    done = subprocess.run([str(hipster.parent / "python"), "-c", script, str(onnx), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    model = open_model(run_dir, device="cpu")  # torch encoder from the checkpoint, onnxruntime decoder
    np.testing.assert_allclose(np.load(tmp_path / "x_hat.npy"), model.decode(z), atol=1e-5)
    with torch.no_grad():
        expected = model.torch_model.encode(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "z_hat.npy"), expected, atol=1e-4)


# -- what --overwrite may replace, and what the catalog keeps (issue 19) -------------------------------------------


def atlas_error(capsys, *args: str) -> str:
    """The one line ``spherinator atlas ARGS`` ends with (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["atlas", *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_overwrite_replaces_only_an_atlas(run_dir, blobs, tmp_path, capsys, monkeypatch):
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if "atlas" not in p.parts)
    # -o RUN (one missing /atlas) replaced the run directory: its checkpoints and events were gone
    assert "which the atlas is drawn from" in atlas_error(capsys, str(run_dir), "-o", str(run_dir), "--overwrite")
    assert "which the atlas is drawn from" in atlas_error(capsys, str(run_dir / "onnx"), "-o", str(run_dir / "onnx"),
                                                          "--overwrite")  # fmt: skip
    ckpt = next(run_dir.glob("checkpoints/*.ckpt"))
    assert "which the atlas is drawn from" in atlas_error(capsys, str(ckpt), "-o", str(run_dir.parent), "--overwrite")
    # a user's directory is not an atlas: kept, even with an atlas.json planted in a directory around the run
    mywork = tmp_path / "mywork"
    (mywork / "notes").mkdir(parents=True)
    (mywork / "notes" / "thesis.tex").write_text("years of work")
    assert "is not an atlas" in atlas_error(capsys, str(run_dir), "-o", str(mywork), "--overwrite")
    (run_dir.parent / "atlas.json").write_text("{}")
    try:
        assert "drawn from" in atlas_error(capsys, str(run_dir), "-o", str(run_dir.parent), "--overwrite")
    finally:
        (run_dir.parent / "atlas.json").unlink()
    (tmp_path / "file.txt").write_text("mine")
    assert "is a file" in atlas_error(capsys, str(run_dir), "-o", str(tmp_path / "file.txt"), "--overwrite")
    monkeypatch.chdir(mywork)
    assert "current directory" in atlas_error(capsys, str(run_dir), "-o", ".", "--overwrite")
    assert "current directory" in atlas_error(capsys, str(run_dir), "-o", str(tmp_path), "--overwrite")
    # inside the data, its catalog.parquet would join the dataset the next fit reads
    assert "inside the data directory" in atlas_error(capsys, str(run_dir), "-o", str(blobs / "atlas"))
    assert not (blobs / "atlas").exists()
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if "atlas" not in p.parts) == before
    assert (mywork / "notes" / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_an_export_that_failed_its_validation_is_refused(run_dir, tmp_path, capsys):
    onnx = tmp_path / "onnx"
    shutil.copytree(run_dir / "onnx", onnx)
    report = json.loads((onnx / "export_report.json").read_text())
    (onnx / "export_report.json").write_text(json.dumps({**report, "passed": False}))
    line = atlas_error(capsys, str(onnx), "-c", TINY, "-o", str(tmp_path / "atlas"))
    assert "failed its validation" in line and str(onnx) in line
    assert not (tmp_path / "atlas").exists()


def test_onnx_graphs_unlike_their_metadata_and_repeated_keys_are_one_line(run_dir, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    def identity(name: str, meta: dict[str, str]) -> onnx.ModelProto:
        """A graph passing its one input through: not the export of any spherinator model."""
        graph = helper.make_graph([helper.make_node("Identity", [name], ["out"])], "g",
                                  [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", 3])],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 3])])  # fmt: skip
        model = helper.make_model(graph)
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        return model

    meta = {"input_shape": "[3, 32, 32]", "z_dim": "3"}
    for graph, name, words in (("decoder", "z", r"gives shape \(3,\) per sample where its export metadata say "
                                r"\(3, 32, 32\)"), ("encoder", "z", r"takes \['z'\]; spherinator's encoder takes "
                                r"one input 'x'")):  # fmt: skip
        onnx_dir = tmp_path / graph
        shutil.copytree(run_dir / "onnx", onnx_dir)
        onnx.save(identity(name, meta), onnx_dir / f"{graph}.onnx")
        with pytest.raises(AtlasError, match=words):  # was a traceback from the renderer / onnxruntime
            open_model(onnx_dir)
    twice = tmp_path / "data.yaml"
    twice.write_text("data:\n  class_path: spherinator.data.DataModule\ndata:\n  class_path: x.Y\n")
    line = atlas_error(capsys, str(run_dir / "onnx"), "-c", str(twice), "-o", str(tmp_path / "atlas"))
    assert line.startswith("spherinator atlas: error: ") and "data is given twice (lines 1 and 3)" in line
    assert not (tmp_path / "atlas").exists()


def test_the_catalog_keeps_categoricals_and_clashing_columns(tmp_path):
    import pyarrow as pa

    n = 6
    data = np.zeros((n, 1, 2, 2), dtype=np.float32)
    data[:, 0, 0, 0] = 1.0
    root = write_fast_layout(tmp_path / "data", {"data": data, "id": np.arange(n, dtype=np.int64)}, files=1,
                             rows_per_group=4)  # fmt: skip
    (file,) = root.rglob("*.parquet")
    table = pq.read_table(file)
    kinds = pa.array(["galaxy", "star", "qso", "star", "galaxy", "star"]).dictionary_encode()  # a pandas categorical
    table = table.append_column("kind", kinds).append_column("row", pa.array([10 * i for i in range(n)]))
    table = table.append_column("data_row", pa.array([100 + i for i in range(n)]))
    pq.write_table(table, file, row_group_size=4)

    class Stub(torch.nn.Module):
        def predict_step(self, x, batch_idx):
            return {"location": x.flatten(1)[:, :3] + 0.1}

        def decode(self, z):
            return torch.from_numpy(plain_decoder(z.numpy())[:, :1, :2, :2])

    model = SphereModel(input_shape=(1, 2, 2), z_dim=3, name="stub", torch_model=Stub())
    datamodule = DataModule(root, columns=["data"], batch_size=4, val_fraction=0.0, shuffle=False)
    add_row_columns(datamodule)
    summary = write_catalog(model, datamodule, tmp_path, TileRenderer((1, 2, 2), width=8), order=1, max_sources=4,
                            thumbnails=0, progress=False)  # fmt: skip
    catalog = pq.read_table(tmp_path / "catalog.parquet").to_pydict()
    assert catalog["kind"] == ["galaxy", "star", "qso", "star", "galaxy", "star"]
    assert catalog["row"] == list(range(n))  # the atlas's own
    assert catalog["data_row"] == [100 + i for i in range(n)]  # the data's data_row, not overwritten
    assert catalog["data_row_2"] == [10 * i for i in range(n)]  # the data's row, renamed without loss
    assert summary["notes"] == ["data columns named like the atlas's own are in the catalog renamed: 'row' as "
                                "'data_row_2'"]  # fmt: skip
    assert "kind" in summary["columns"]


def test_the_catalog_keeps_columns_the_training_reader_refuses(tmp_path):
    # Nulls, uint64 ids, float16 and int8 columns, a column one file lacks: the model never reads them, so the
    # atlas takes them as stored (the reader refused nulls and uint64; the VOTable writer crashed on float16).
    import pyarrow as pa
    from astropy.io.votable import parse_single_table

    n = 6
    data = np.zeros((n, 1, 2, 2), dtype=np.float32)
    data[:, 0, 0, 0] = 1.0
    root = write_fast_layout(tmp_path / "data", {"data": data}, files=2, rows_per_group=2)
    first, second = sorted(root.rglob("*.parquet"))
    table = pq.read_table(first)
    k = table.num_rows
    extra = {"redshift": pa.array([None, 0.5, 1.5][:k], pa.float64()), "name": pa.array(["a", None, "c"][:k]),
             "kind": pa.array(["x", None, "y"][:k]).dictionary_encode(), "flag": pa.array([True, None, False][:k]),
             "source_id": pa.array([2**64 - 1, 7, 8][:k], pa.uint64()), "mag": pa.array([1.5, 2.5, 3.5][:k],
             pa.float16()), "tiny": pa.array([-1, 2, 3][:k], pa.int8()), "stamp": pa.array([[1.0]] * k)}  # fmt: skip
    for name, values in extra.items():
        table = table.append_column(name, values)
    pq.write_table(table, first, row_group_size=2)
    later = pq.read_table(second)
    pq.write_table(later.append_column("tiny", pa.array([5] * later.num_rows, pa.int64())), second)

    class Stub(torch.nn.Module):
        def predict_step(self, x, batch_idx):
            return {"location": x.flatten(1)[:, :3]}

        def decode(self, z):
            return torch.from_numpy(plain_decoder(z.numpy())[:, :1, :2, :2])

    model = SphereModel(input_shape=(1, 2, 2), z_dim=3, name="stub", torch_model=Stub())
    datamodule = DataModule(root, columns=["data"], batch_size=4, val_fraction=0.0, shuffle=False)
    assert add_row_columns(datamodule) == ["redshift", "name", "kind", "flag", "source_id", "mag", "tiny"]
    summary = write_catalog(model, datamodule, tmp_path, TileRenderer((1, 2, 2), width=8), order=1, max_sources=n,
                            thumbnails=0, progress=False)  # fmt: skip
    catalog = pq.read_table(tmp_path / "catalog.parquet")
    rest = [None] * (n - k)  # the second file has none of these columns (but tiny)
    assert catalog["redshift"].to_pylist() == [None, 0.5, 1.5][:k] + rest
    assert catalog["name"].to_pylist() == ["a", None, "c"][:k] + rest
    assert catalog["kind"].to_pylist() == ["x", None, "y"][:k] + rest
    assert catalog["flag"].to_pylist() == [True, None, False][:k] + rest
    assert catalog["source_id"].to_pylist() == [2**64 - 1, 7, 8][:k] + rest
    assert catalog.schema.field("source_id").type == pa.uint64() and catalog.schema.field("mag").type == pa.float16()
    assert catalog["tiny"].to_pylist() == [-1, 2, 3][:k] + [5] * (n - k)
    assert "stamp" not in catalog.column_names and any("stamp" in note for note in summary["notes"])
    vot = parse_single_table(str(tmp_path / "catalog.vot")).array
    assert str(vot["source_id"][0]) == str(2**64 - 1) and float(vot["mag"][1]) == 2.5
    assert vot["redshift"].mask[0] and float(vot["redshift"][1]) == 0.5 and vot["flag"].mask[1]


def test_rows_without_a_direction_are_nan_not_ra_0_dec_0(tmp_path, capsys):
    # A dead Autoencoder code (all zeros) or a NaN latent was placed at (ra, dec) = (0, 0), healpix 304 at order 3
    data = np.zeros((4, 1, 2, 2), dtype=np.float32)
    data[:, 0, 0, 0] = [1.0, 0.0, 2.0, 1.0]
    root = write_fast_layout(tmp_path / "data", {"data": data}, files=1)

    class Stub(torch.nn.Module):
        def predict_step(self, x, batch_idx):
            location = x.flatten(1)[:, :3].clone()
            location[location[:, 0] == 2.0] = float("nan")  # a diverged encoder
            return {"location": location}

        def decode(self, z):
            return torch.from_numpy(plain_decoder(z.numpy())[:, :1, :2, :2])

    model = SphereModel(input_shape=(1, 2, 2), z_dim=3, name="stub", torch_model=Stub())
    datamodule = DataModule(root, columns=["data"], batch_size=4, val_fraction=0.0, shuffle=False)
    summary = write_catalog(model, datamodule, tmp_path, TileRenderer((1, 2, 2), width=8), order=3, thumbnails=0,
                            progress=False)  # fmt: skip
    catalog = pq.read_table(tmp_path / "catalog.parquet").to_pydict()
    assert [np.isnan(v) for v in catalog["ra"]] == [False, True, True, False]
    assert [np.isnan(v) for v in catalog["dec"]] == [False, True, True, False]
    assert catalog["healpix"][1:3] == [-1, -1] and summary["mean_vector"] == [0.5, 0.0, 0.0]
    assert "2 of 4 rows have a zero or non-finite latent vector" in summary["notes"][-1]
    # an atlas.json whose initial view is NaN would put NaN into the sweep page's JSON, which then shows nothing
    sweep = tmp_path / "sweep"
    for task, ra in (("good", 10.0), ("nan", float("nan"))):
        (sweep / task / "atlas").mkdir(parents=True)
        (sweep / task / "atlas" / "atlas.json").write_text(json.dumps({"initial": {"ra": ra, "dec": 5.0}}))
    main(["atlas", "sweep", str(sweep)])
    assert "nan/atlas: its atlas.json cannot be read" in capsys.readouterr().err
    assert "NaN" not in (sweep / "atlas.html").read_text()


def test_atlas_options_name_the_bad_value(tmp_path):
    from spherinator.atlas.options import AtlasOptions

    for kwargs, words in [
        ({"seed": -1}, "--seed -1 is out of range: give 0.."),
        ({"max_sources": 10**10}, "--max-sources 10,000,000,000 is out of range"),
        ({"max_sources": 1e10}, "--max-sources 10000000000.0 must be a whole number"),
        ({"tile_width": 16384}, "--tile-width 16,384 is out of range: give 8..1,024"),
        ({"tile_width": 48}, "--tile-width 48 must be a power of two"),
        ({"max_order": 12}, "--max-order 12 is out of range"),
        ({"thumbnails": -1}, "--thumbnails -1 is out of range"),
        ({"tile_format": "gif"}, "--tile-format 'gif'"),
    ]:
        with pytest.raises(AtlasError) as info:
            AtlasOptions(**kwargs)
        assert words in str(info.value), (kwargs, str(info.value))
    # a huge --max-sources over a small data set: the first rows, no arange of 10^7
    from spherinator.atlas.catalog import _Sample

    sample = _Sample(None, 10**7, 3, 0)
    assert sample.chosen is None and sample.rows(0, 5).tolist() == [0, 1, 2, 3, 4] and sample.thumbnail_count(5) == 3


def test_a_bad_device_or_an_out_that_cannot_be_made_is_one_line(run_dir, tmp_path, capsys):
    import os

    from spherinator.atlas.model import torch_device
    from spherinator.atlas.options import check_out

    for device, words in (("nonsense", "is not a torch device"), ("cuda:99", "CUDA device")):
        with pytest.raises(AtlasError, match=words):
            torch_device(device)
    assert "is not a torch device" in atlas_error(capsys, str(run_dir), "-o", str(tmp_path / "a"), "--device", "x")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(AtlasError, match="is a file, so no directory can be made there"):
        check_out(tmp_path / "file" / "atlas" / "deeper", False, [])
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(AtlasError, match="is a link to nothing"):
        check_out(tmp_path / "dangling", True, [])
    assert not (tmp_path / "a").exists() and not (tmp_path / "nowhere").exists()


def test_serve_gives_only_regular_files_under_its_directory(tmp_path, capsys):
    import os
    import urllib.error

    root = tmp_path / "atlas"
    (root / "hips" / "Norder0").mkdir(parents=True)
    (root / "index.html").write_text("<p>atlas</p>")
    (root / "hips" / "properties").write_text("hips_order = 0\n")
    (tmp_path / "secret.txt").write_text("not yours")
    os.symlink("/etc", root / "etc")
    os.symlink(tmp_path / "secret.txt", root / "secret.txt")
    os.symlink(root / "hips" / "properties", root / "props")  # a link inside the directory is fine
    server = make_server(root, port=0)
    Thread(target=server.serve_forever, daemon=True).start()

    def status(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}{path}") as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, ""

    try:
        assert status("/") == (200, "<p>atlas</p>")
        assert status("/props") == (200, "hips_order = 0\n")
        for path in ("/etc/passwd", "/etc/", "/secret.txt", "/hips/", "/hips/Norder0/", "/../secret.txt",
                     "/%2e%2e/secret.txt"):  # fmt: skip
            assert status(path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()
    for port in ("99999", "-1"):
        assert "is not a TCP port" in atlas_error(capsys, "serve", str(root), "--port", port)


def test_aladin_lite_url_and_names_cannot_end_the_script(tmp_path):
    from spherinator.atlas.page import render_template

    evil = "</script><script>alert(1)</script><!--"
    page = render_template("index.html", evil, {"title": evil, "name": evil}, f'https://x.org/a.js"; {evil}')
    template = (Path(__file__).parents[1] / "spherinator/atlas/templates/index.html").read_text()
    assert page.count("</script>") == template.count("</script>") and "<!--" not in page
    (line,) = [x for x in page.splitlines() if x.startswith("import A from")]
    assert json.loads(line[len("import A from ") : -1]) == f'https://x.org/a.js"; {evil}'  # one JS string, intact
    config = re.search(r'<script type="application/json" id="atlas-config">(.*?)</script>', page, re.S).group(1)
    assert json.loads(config)["name"] == evil


def test_a_sweep_page_leaves_out_a_damaged_atlas(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for task, text in (("good", json.dumps({"initial": {"ra": 10.0, "dec": 5.0}, "card": ["80 rows"]})),
                       ("torn", '{"initial": {"ra": 1'), ("odd", "[1, 2]")):  # fmt: skip
        (sweep / task / "atlas").mkdir(parents=True)
        (sweep / task / "atlas" / "atlas.json").write_text(text)
    main(["atlas", "sweep", str(sweep)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("left out" in line and "atlas.json cannot be read" in line for line in err), err
    page = (sweep / "atlas.html").read_text()
    assert '"page": "good/atlas/index.html"' in page and "torn/atlas" not in page
    (sweep / "good" / "atlas" / "atlas.json").write_text("")
    assert "no readable atlas" in atlas_error(capsys, "sweep", str(sweep))


def test_a_full_disk_ends_in_one_line_and_keeps_the_old_atlas(run_dir, tmp_path, capsys, monkeypatch):
    import errno

    import spherinator.atlas.hips as hips

    out = tmp_path / "atlas"
    write_atlas(run_dir, out=out, max_order=0, thumbnails=0, progress=False, log=None)
    before = (out / "atlas.json").read_text()

    def full(picture, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(hips, "_save", full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["atlas", str(run_dir), "-o", str(out), "--overwrite", "--max-order", "0", "--thumbnails", "0"])
    assert exit_info.value.code == 2
    lines = [
        line for line in capsys.readouterr().err.splitlines() if "%|" not in line and line.strip()
    ]  # past the progress bars
    assert len(lines) == 1 and "cannot write the atlas under" in lines[0] and "No space left on device" in lines[0]
    assert (out / "atlas.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["atlas"]  # no staging directory left behind


def test_data_of_another_shape_than_the_model_is_named(tmp_path):
    data = np.zeros((4, 1, 2, 2), dtype=np.float32)
    root = write_fast_layout(tmp_path / "data", {"data": data}, files=1)

    class Stub(torch.nn.Module):
        def predict_step(self, x, batch_idx):
            return {"location": torch.ones(len(x), 3)}

    model = SphereModel(input_shape=(3, 32, 32), z_dim=3, name="stub", torch_model=Stub())
    datamodule = DataModule(root, columns=["data"], batch_size=4, val_fraction=0.0, shuffle=False)
    with pytest.raises(AtlasError, match=r"model takes inputs of shape \(3, 32, 32\) but the data's samples have "
                       r"shape \(1, 2, 2\)"):  # fmt: skip
        write_catalog(model, datamodule, tmp_path, TileRenderer((3, 32, 32)), order=1, thumbnails=0, progress=False)


def test_tiles_drawn_by_worker_processes_are_the_serial_files_byte_for_byte(run_dir, tmp_path, monkeypatch):
    from spherinator.atlas import hips, open_model

    model = open_model(run_dir / "onnx")
    renderer = TileRenderer(model.input_shape, width=16)  # small tiles: the test is about who draws them
    serial = write_hips(model.decode, renderer, tmp_path / "serial", max_order=2, batch_size=16, progress=False)
    monkeypatch.setattr(hips, "TILES_PER_WORKER", 1)  # 1,020 tiles would be one worker's share
    pooled = write_hips(model.decode, renderer, tmp_path / "pooled", max_order=2, batch_size=16, progress=False,
                        workers=2, worker_decoder=model.worker_decoder())  # fmt: skip
    assert (serial["workers"], pooled["workers"], pooled["tiles"]) == (1, 2, 252)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    one, two = files(tmp_path / "serial"), files(tmp_path / "pooled")
    assert sorted(one) == sorted(two) and len(one) == 252 + 2  # the tiles, the Allsky, properties
    assert [name for name in one if name != "properties" and one[name] != two[name]] == []


def test_serve_prints_its_lines_at_once_into_a_pipe_and_imports_no_torch(tmp_path):
    # Under nohup or in a Slurm log stdout is a file: the ssh -L line must not wait in a buffer until the server ends.
    import os
    import selectors
    import subprocess
    import sys
    import time

    (tmp_path / "index.html").write_text("<p>atlas</p>")
    script = "from spherinator.commands import main; main(['atlas', 'serve', '.', '--port', '0'])"
    root = str(Path(__file__).resolve().parents[1])  # this checkout's spherinator, from tmp_path too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("PYTHONUNBUFFERED", None)  # as a batch job has it: stdout block-buffered into a file or pipe
    server = subprocess.Popen([sys.executable, "-X", "importtime", "-c", script], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    printed = b""
    try:
        with selectors.DefaultSelector() as selector:  # what reaches the pipe while the server runs
            selector.register(server.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 60
            while printed.count(b"\n") < 3 and time.monotonic() < deadline:
                if selector.select(deadline - time.monotonic()):
                    printed += os.read(server.stdout.fileno(), 4096) or b"(closed)\n" * 3
    finally:
        server.terminate()
        imported = server.communicate(timeout=30)[1].decode()
    lines = printed.decode().splitlines()
    assert len(lines) == 3 and "serving" in lines[0] and "ssh -N -L" in lines[1], lines
    modules = {line.split("|")[-1].strip() for line in imported.splitlines() if line.startswith("import time:")}
    assert {"torch", "lightning", "onnxruntime"} & modules == set()


def test_a_runs_relative_data_path_is_where_the_run_was_made_and_no_path_is_published(run_dir, blobs, tmp_path,
                                                                                        monkeypatch):  # fmt: skip
    # fit ran in project/ with data.path 'data/blobs'; the atlas is made from elsewhere
    project = tmp_path / "project"
    shutil.copytree(blobs, project / "data" / "blobs")
    run = project / "runs" / "tiny" / "version_0"
    shutil.copytree(run_dir, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["init_args"]["path"] = "data/blobs"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    lines: list[str] = []
    info = write_atlas(run, max_order=0, thumbnails=0, progress=False, log=lines.append, workers=1)
    assert info["catalog"]["rows"] == 80
    assert any("relative to where the run was made" in line for line in lines), lines
    properties = (run / "atlas" / "hips" / "properties").read_text()
    assert str(tmp_path) not in properties and str(run_dir.parents[2]) not in properties, properties


def test_make_demo_ends_on_the_atlas_and_the_line_that_opens_it():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip() for line in recipe.splitlines()[1:]]
    assert "spherinator fit" in commands[0] and "spherinator atlas $$run" in " ".join(commands)
    assert "spherinator atlas serve $$run/atlas" in commands[-1]


# -- the atlas of an ONNX export without torch (issue 21) ------------------------------------------------------------


def test_the_atlas_of_an_onnx_export_imports_neither_torch_nor_lightning(run_dir, blobs, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    import pyarrow as pa

    import spherinator.atlas.source as source

    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "spherinator.data.DataModule",
                                             "init_args": {"path": str(blobs), "columns": ["data", "id", "name"],
                                                           "batch_size": 32, "num_workers": 2}}}))  # fmt: skip
    args = [str(run_dir / "onnx"), "-c", str(data), "--data.init_args.batch_size", "16", "--max-order", "1",
            "--thumbnails", "3", "--workers", "1"]  # fmt: skip
    script = ("import json, sys\nfrom spherinator.commands import main\nmain(['atlas', *sys.argv[1:]])\n"
              "print(json.dumps(sorted(m for m in ('torch', 'lightning') if m in sys.modules)))")  # fmt: skip
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script, *args, "-o", str(tmp_path / "numpy")], env=env, text=True,
                          capture_output=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [], done.stdout  # neither torch nor lightning was imported
    assert "read with torch" not in done.stdout + done.stderr

    # the same catalog as the DataModule's batches (torch) give to the same encoder.onnx
    monkeypatch.setattr(source, "plain_section", lambda args: (None, "asked for by the test"))
    lines: list[str] = []
    write_atlas(args[0], args[1:5], out=tmp_path / "torch", max_order=1, thumbnails=3, progress=False,
                log=lines.append, workers=1)  # fmt: skip
    assert any("the data are read with torch: asked for by the test" in line for line in lines), lines
    ours, theirs = (pq.read_table(tmp_path / name / "catalog.parquet") for name in ("numpy", "torch"))
    assert ours.schema == theirs.schema and ours.num_rows == 80
    for name in ours.column_names:
        if pa.types.is_floating(ours.schema.field(name).type):
            np.testing.assert_allclose(ours[name].to_numpy(), theirs[name].to_numpy(), atol=1e-6)
        else:
            assert ours[name].to_pylist() == theirs[name].to_pylist(), name
    for picture in ("input/0.png", "decoded/0.png"):
        assert (tmp_path / "numpy" / "thumbs" / picture).read_bytes() == (
            tmp_path / "torch" / "thumbs" / picture
        ).read_bytes()


def test_only_a_plain_datamodule_section_is_read_without_torch(blobs):
    from spherinator.atlas.source import plain_section

    def section(init_args: dict, *overrides: str, class_path: str = "spherinator.data.DataModule"):
        config = "--config=" + yaml.safe_dump({"data": {"class_path": class_path, "init_args": init_args}})
        return plain_section([config, *overrides])

    plain = {"path": str(blobs), "columns": ["data", {"name": "id"}], "batch_size": 8}
    assert section(plain) == ({"path": blobs, "columns": ["data", "id"], "batch_size": 8}, "")
    assert section(plain, "--data.init_args.batch_size", "4")[0]["batch_size"] == 4
    assert section(plain, "--data.batch_size=2", "--data.shuffle", "false")[0]["batch_size"] == 2
    resize = {"name": "data", "transform": {"class_path": "torchvision.transforms.v2.Resize"}}
    assert section({**plain, "columns": [resize]}) == (None, "a column has a transform (a torch module)")
    assert "not spherinator.data.DataModule" in section(plain, class_path="my.DataModule")[1]
    assert "the data set return_strings" in section({**plain, "return_strings": True})[1]
    assert "no local file" in section({**plain, "path": "owner/dataset"})[1]
    assert "batch_size 0" in section({**plain, "batch_size": 0})[1]


def test_the_atlas_takes_its_catalog_from_predict_shards(run_dir, blobs, tmp_path, capsys):
    from spherinator.data import DataModule
    from spherinator.submit import predict
    from spherinator.submit.records import write_embedding_set

    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "spherinator.data.DataModule",
                                             "init_args": {"path": str(blobs), "columns": ["data", "id"],
                                                           "return_dict": True, "batch_size": 16}}}))  # fmt: skip
    sweep = tmp_path / "embed"
    embeddings = sweep / "embeddings"
    embeddings.mkdir(parents=True)
    write_embedding_set(
        embeddings, predict.plan_embedding_set(DataModule(blobs, columns=["data", "id"], batch_size=16), 2)
    )
    (checkpoint,) = run_dir.glob("checkpoints/*.ckpt")
    for k in range(2):
        predict.write_shard(embeddings, k, ["-c", TINY, "-c", str(data)], str(checkpoint),
                            str(run_dir / "onnx"))  # fmt: skip
    onnx = str(run_dir / "onnx")
    common = ["--max-order", "1", "--thumbnails", "0", "--workers", "1"]
    main(["atlas", onnx, "--embeddings", str(sweep), "-o", str(tmp_path / "embedded"), *common])
    main(["atlas", onnx, "-c", str(data), "-o", str(tmp_path / "encoded"), *common])
    embedded, encoded = (pq.read_table(tmp_path / name / "catalog.parquet") for name in ("embedded", "encoded"))
    assert embedded.column_names == ["row", "id", "ra", "dec", "healpix", "x", "y", "z"]  # the shards' columns
    assert encoded.column_names == ["row", "id", "name", "label", "cx", "ra", "dec", "healpix", "x", "y", "z"]
    assert embedded["row"].to_pylist() == list(range(80)) and embedded["id"] == encoded["id"]
    assert embedded["healpix"] == encoded["healpix"]
    np.testing.assert_allclose(embedded["dec"].to_numpy(), encoded["dec"].to_numpy(), atol=1e-4)
    info = json.loads((tmp_path / "embedded" / "atlas.json").read_text())
    assert info["catalog"]["rows"] == 80 and info["catalog"]["progressive"]["rows"] == 80

    # the flag is checked before any work, one line each
    (tmp_path / "no-manifest").mkdir()
    short = tmp_path / "short"
    shutil.copytree(embeddings, short)
    pq.write_table(pq.read_table(short / "shard-00001.parquet").slice(1), short / "shard-00001.parquet")
    partial = tmp_path / "partial"
    shutil.copytree(embeddings, partial)
    (partial / "shard-00000.parquet").unlink()
    out = ["-o", str(tmp_path / "never"), *common]
    assert "no such directory" in atlas_error(capsys, onnx, "--embeddings", str(tmp_path / "nowhere"), *out)
    assert "holds no embeddings/_manifest.json" in atlas_error(capsys, onnx, "--embeddings",
                                                               str(tmp_path / "no-manifest"), *out)  # fmt: skip
    assert re.search(r"shard-00001.parquet holds \d+ rows, but _manifest.json says \d+ rows",
                     atlas_error(capsys, onnx, "--embeddings", str(short), *out))  # fmt: skip
    assert "1 of 2 shards are not written yet" in atlas_error(capsys, onnx, "--embeddings", str(partial), *out)
    assert "leave out -c" in atlas_error(capsys, onnx, "--embeddings", str(sweep), "-c", str(data), *out)
    assert not (tmp_path / "never").exists()


def test_the_run_machinery_names_the_export_report_as_the_export_writes_it():
    from spherinator.export import REPORT_NAME
    from spherinator.runs import EXPORT_REPORT

    assert EXPORT_REPORT == REPORT_NAME  # runs.py names it too, so that reading a run imports no torch


def test_a_runs_config_with_page_checksums_is_read_without_torch(blobs):
    # (before: every run's config.yaml names page_checksums, so `-c <run>/config.yaml` fell back to torch)
    from spherinator.atlas.source import ParquetRows, plain_section

    section = {"class_path": "spherinator.data.DataModule",
               "init_args": {"path": str(blobs), "batch_size": 40, "page_checksums": "every_read"}}  # fmt: skip
    init, why = plain_section(["--config=" + yaml.safe_dump({"data": section})])
    assert (init, why) == ({"path": blobs, "columns": None, "batch_size": 40, "page_checksums": "every_read"}, "")
    rows = ParquetRows(**init)
    assert [len(b["data"]) for b in rows.predict_dataloader()] == [40, 40] and rows._reader.every_read
