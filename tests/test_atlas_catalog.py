"""The atlas's progressive catalog (IVOA HiPS 1.0 catalogue tiles): every row once, in its cell, typical first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spherinator.atlas import AtlasError
from spherinator.atlas.hips import read_properties, tile_path
from spherinator.atlas.progressive import MAX_ORDER, NO_PLACE, NOT_A_ROW, ROW_CHUNK, write_progressive_catalog
from spherinator.atlas.sky import healpix_index

REQUIRED = ["creator_did", "obs_title", "dataproduct_type", "hips_version", "hips_release_date", "hips_status",
            "hips_tile_format", "hips_order", "hips_frame"]  # fmt: skip


def write_shards(root: Path, n: int, shards: int = 3, seed: int = 0, clustered: bool = True) -> Path:
    """``spherinator predict``-like shards: ``location`` (3), ``scale``, ``id``, a string ``name`` and ``row``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        rows = np.arange(s, n, shards, dtype=np.int64)
        vectors = rng.normal(size=(len(rows), 3)).astype(np.float32)
        if clustered:  # a dense cap around the north pole: cells there go deeper than elsewhere
            vectors[: len(rows) // 2, 2] += 4.0
        table = pa.table({
            "location": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 3),
            "scale": rng.uniform(1, 100, len(rows)).astype(np.float32),
            "id": rows * 10,
            "name": [f"obj {r}\twith \"quotes\"" for r in rows],
            "row": rows,
        })  # fmt: skip
        pq.write_table(table, root / f"part-{s:03d}.parquet")
    (root / ".part-999.parquet.partial").write_bytes(b"torn")  # a shard being written: skipped
    return root


def read_tile(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line and not line.startswith("#")]
    names = lines[0].split("\t")
    return [dict(zip(names, line.split("\t"), strict=True)) for line in lines[1:]]


def all_tiles(root: Path) -> dict[tuple[int, int], list[dict[str, str]]]:
    tiles = {}
    for path in root.glob("Norder*/Dir*/Npix*.tsv"):
        order, npix = int(path.parts[-3][6:]), int(path.stem[4:])
        tiles[order, npix] = read_tile(path)
    return tiles


def test_every_row_is_in_one_tile_of_its_cell_typical_first(tmp_path):
    n = 6000
    shards = write_shards(tmp_path / "shards", n)
    out = tmp_path / "catalog"
    info = write_progressive_catalog(shards, out, tile_rows=40, allsky_rows=4, whole_rows=0,
                                     properties={"obs_title": "test"})  # fmt: skip
    assert (info["rows"], info["placed"]) == (n, n) and 4 <= info["order"] < MAX_ORDER
    keys = read_properties(out / "properties")
    assert all(keys.get(k) for k in REQUIRED) and keys["dataproduct_type"] == "catalog"
    assert (keys["hips_tile_format"], keys["hips_cat_nrows"], keys["obs_title"]) == ("tsv", str(n), "test")
    assert keys["hips_order"] == str(info["order"]) and keys["hips_order_min"] == "1"

    tiles = all_tiles(out)
    seen = [int(r["row"]) for rows in tiles.values() for r in rows]
    assert sorted(seen) == list(range(n))  # every row once
    index = np.concatenate([np.frombuffer((out / "rows" / f"{c}.bin").read_bytes(), "<u4")
                            for c in range(n // ROW_CHUNK + 1)])  # fmt: skip
    for (order, npix), rows in tiles.items():
        assert len(rows) <= (4 if order <= 2 else 40)
        ra, dec = np.array([[float(r["ra"]), float(r["dec"])] for r in rows]).reshape(-1, 2).T
        assert (healpix_index(ra, dec, order) == npix).all()  # in its cell
        levels = [int(float(r["concentration"])) for r in rows]
        assert levels == sorted(levels, reverse=True)  # the surest first
        assert all(index[int(r["row"])] == npix * 16 + order for r in rows)  # the row index finds it
        if order > 1 and rows:  # a cell's rows below a full parent are no surer than the parent's least sure
            parent = tiles[order - 1, npix // 4]
            assert len(parent) == (4 if order - 1 <= 2 else 40)
            assert max(levels) <= min(int(float(r["concentration"])) for r in parent)
        if order > 3:  # the siblings of a tile are there (empty or not): a view asks for all of them
            assert all((order, npix // 4 * 4 + i) in tiles for i in range(4))
    assert (out / "Norder3" / "Dir0" / "Npix0.tsv").is_file()
    # Allsky.tsv of order 1 and 2: their tiles' rows in one file; the string survives without TAB or quote
    for order in (1, 2):
        allsky = read_tile(out / f"Norder{order}" / "Allsky.tsv")
        assert sorted(int(r["row"]) for r in allsky) == sorted(int(r["row"]) for (o, _), t in tiles.items()
                                                               if o == order for r in t)  # fmt: skip
    row = tiles[1, 0][0] if tiles.get((1, 0)) else next(r for (o, _), t in tiles.items() if o == 1 for r in t)
    assert row["name"] == f"obj {row['row']} with 'quotes'" and row["id"] == str(10 * int(row["row"]))

    from astropy.io.votable import parse_single_table

    fields = parse_single_table(str(out / "Metadata.xml")).fields
    header = (out / "Norder1" / "Allsky.tsv").read_text().split("\n")[1].split("\t")
    assert [f.name for f in fields] == header == ["row", "id", "name", "ra", "dec", "concentration"]
    assert {f.name: f.ucd for f in fields}["ra"].startswith("pos.eq.ra")
    assert (out / "metadata.xml").read_bytes() == (out / "Metadata.xml").read_bytes()


def test_a_small_catalog_is_whole_at_order_1_and_rows_without_a_place_are_named(tmp_path):
    table = pa.table({"row": pa.array([0, 1, 2, 5], pa.int64()), "ra": [10.0, 200.0, float("nan"), 33.0],
                      "dec": [5.0, -40.0, float("nan"), 80.0], "healpix": [1, 2, -1, 3]})  # fmt: skip
    pq.write_table(table, tmp_path / "catalog.parquet")
    info = write_progressive_catalog(tmp_path / "catalog.parquet", tmp_path / "catalog", healpix_order=3)
    assert (info["rows"], info["placed"], info["order"]) == (4, 3, 1)
    assert "1 of 4 rows have no place" in info["notes"][0]
    assert len(read_tile(tmp_path / "catalog" / "Norder1" / "Allsky.tsv")) == 3
    assert read_tile(tmp_path / "catalog" / "Norder2" / "Allsky.tsv") == []  # there: Aladin Lite waits for it
    codes = np.frombuffer((tmp_path / "catalog" / "rows" / "0.bin").read_bytes(), "<u4")
    assert codes[2] == NO_PLACE and codes[3] == codes[4] == NOT_A_ROW
    assert tile_path(tmp_path / "catalog", 1, int(codes[5]) >> 4, "tsv").is_file()


def test_bad_embeddings_are_one_line(tmp_path):
    shards = write_shards(tmp_path / "shards", 30)
    pq.write_table(pq.read_table(shards / "part-000.parquet"), shards / "part-copy.parquet")
    with pytest.raises(AtlasError, match=r"row 0 appears 2 times in the embeddings; give each row once"):
        write_progressive_catalog(shards, tmp_path / "out")
    pq.write_table(pa.table({"id": [1, 2]}), tmp_path / "flat.parquet")
    with pytest.raises(AtlasError, match=r"no ra/dec or location columns \(found: id\)"):
        write_progressive_catalog(tmp_path / "flat.parquet", tmp_path / "out")
    with pytest.raises(AtlasError, match=r"no such file or directory"):
        write_progressive_catalog(tmp_path / "missing", tmp_path / "out")
    z4 = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(8, np.float32)), 4)
    pq.write_table(pa.table({"location": z4}), tmp_path / "z4.parquet")
    with pytest.raises(AtlasError, match=r"not a fixed-size list of 3"):
        write_progressive_catalog(tmp_path / "z4.parquet", tmp_path / "out")


def embedding_set(directory: Path, tables: list[pa.Table]) -> Path:
    """``tables`` as the shards of a ``spherinator-submit predict`` run (``directory/embeddings``, manifest)."""
    from spherinator.submit.records import EmbeddingSet, EmbeddingShard, ShardSegment, write_embedding_set

    (directory / "embeddings").mkdir(parents=True)
    shards = []
    for k, table in enumerate(tables):
        first = sum(t.num_rows for t in tables[:k])  # the planner's row ids: 0 .. rows - 1 across the shards
        segment = ShardSegment(file=0, group=k, start=0, stop=table.num_rows, row=first)
        shards.append(EmbeddingShard(k, f"shard-{k:05d}.parquet", table.num_rows, [segment]))
        pq.write_table(table, directory / "embeddings" / shards[-1].file)
    rows = sum(t.num_rows for t in tables)
    write_embedding_set(directory / "embeddings", EmbeddingSet(str(directory), [], [], rows, 8, shards))
    return directory


def locations(values: list, type_: pa.DataType | None = None) -> pa.Array:
    return pa.array(values, type_ or pa.list_(pa.float32(), 3))


def test_bad_predict_shards_are_one_line_before_any_work(tmp_path):
    # (before: a 4-d, 2-d or string location, a shard that is no Parquet file and a manifest of no rows went on to
    # the catalog, ending in a traceback there: reshape, "expected length 80 but got 40", "magic bytes")
    from spherinator.atlas.source import open_embeddings

    def refused(name: str, table: pa.Table | None, match: str) -> None:
        run = embedding_set(tmp_path / name, [table] if table is not None else [])
        with pytest.raises(AtlasError, match=match):
            open_embeddings(run)

    z6 = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(12, np.float32)), 6)
    refused("z6", pa.table({"location": z6, "row": [0, 1]}), r"shard-00000.parquet: its locations are 6-d, but")
    refused("text", pa.table({"location": ["1,2,3"], "row": [0]}), r"location column is string, not a list of 3")
    refused("none", None, r"_manifest.json lists no rows; embed the data first")
    run = embedding_set(tmp_path / "garbage", [pa.table({"location": locations([[1, 0, 0]]), "row": [0]})])
    (run / "embeddings" / "shard-00000.parquet").write_bytes(b"")
    with pytest.raises(AtlasError, match=r"shard-00000.parquet is no Parquet file \(.*\); remove it and"):
        open_embeddings(run)


def test_the_catalog_of_shards_keeps_their_row_ids_and_places_no_null_location(tmp_path):
    # (before: a shard's rows were numbered by position, so hand-shuffled rows got the wrong row ids; a null
    # location was dropped, shifting every later row; a list of other length than 3 was a reshape traceback)
    from spherinator.atlas.catalog import write_embedding_catalog
    from spherinator.atlas.source import open_embeddings

    variable = pa.list_(pa.float64())
    first = pa.table({"location": locations([[0, 0, 1], None, [1, 0, 0]]), "id": [12, 11, 10], "row": [2, 1, 0]})
    second = pa.table({"location": locations([[0, 1, 0], [0, 0, -2]], variable), "id": [13, 14], "row": [3, 4]})
    embedded = open_embeddings(embedding_set(tmp_path / "run", [first, second]))
    (tmp_path / "atlas").mkdir()
    summary = write_embedding_catalog(embedded.shards, embedded.rows, tmp_path / "atlas", 1, progress=False)
    catalog = pq.read_table(tmp_path / "atlas" / "catalog.parquet")
    assert catalog["row"].to_pylist() == [2, 1, 0, 3, 4] and catalog["id"].to_pylist() == [12, 11, 10, 13, 14]
    assert catalog["dec"].to_pylist()[0] == pytest.approx(90) and np.isnan(catalog["dec"].to_pylist()[1])
    assert catalog["dec"].to_pylist()[4] == pytest.approx(-90) and "1 of 5 rows have a zero" in summary["notes"][0]
    short = pa.table({"location": locations([[0, 1, 0], [0, 1]], variable), "row": [0, 1]})
    embedded = open_embeddings(embedding_set(tmp_path / "short", [short]))
    (tmp_path / "atlas-2").mkdir()
    with pytest.raises(AtlasError, match=r"shard-00000.parquet': a location holds 2 values, not 3"):
        write_embedding_catalog(embedded.shards, embedded.rows, tmp_path / "atlas-2", 1, progress=False)


def test_an_atlas_inside_its_embeddings_is_refused(tmp_path):
    # (before: -o <run>/embeddings/atlas was written there, its catalog.parquet beside the shards)
    from spherinator.atlas import write_atlas

    run = embedding_set(tmp_path / "run", [pa.table({"location": locations([[1, 0, 0]]), "row": [0]})])
    for out in (run / "embeddings" / "atlas", run / "embeddings" / "deeper" / "atlas"):
        with pytest.raises(AtlasError, match=r"is inside the embeddings .*, where its catalog.parquet would join"):
            write_atlas(tmp_path / "no-model", out=out, embeddings=run, workers=1)
    assert sorted(p.name for p in (run / "embeddings").iterdir()) == ["_manifest.json", "shard-00000.parquet"]


def test_embeddings_of_another_model_are_said(tmp_path):
    # (before: the catalog of one model's embeddings was drawn over another model's sphere without a word)
    from spherinator.atlas.build import _made_by_another
    from spherinator.atlas.model import SphereModel
    from spherinator.atlas.source import Embeddings

    model = SphereModel(input_shape=(3, 8, 8), z_dim=3, name="run", checkpoint=tmp_path / "a.ckpt")
    embedded = Embeddings(tmp_path, [], 1, "row", (str(tmp_path / "b.ckpt"),))
    assert (
        "embedded by " + str(tmp_path / "b.ckpt") + ", not by this atlas's model"
        in _made_by_another(model, embedded)[0]
    )
    assert _made_by_another(model, Embeddings(tmp_path, [], 1, "row", (str(tmp_path / "x" / ".." / "a.ckpt"),))) == []
    assert _made_by_another(model, Embeddings(tmp_path, [], 1, "row")) == []  # the manifest names none
