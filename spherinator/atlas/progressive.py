"""The catalog as a HiPS progressive catalog (IVOA HiPS 1.0, section 4.2.2): every row of the data browsable in
Aladin Lite (``A.catalogHiPS``), the sky's most typical rows first and the rest as one zooms in.

Layout of the catalog directory (``<atlas>/catalog``)::

    properties                 dataproduct_type = catalog, hips_order, hips_cat_nrows, ... (HiPS 1.0 keys)
    Metadata.xml               a VOTable without rows naming the tiles' columns, with units and UCDs (RA/Dec);
                               metadata.xml is the same file under the standard's own name
    NorderK/DirD/NpixN.tsv     the rows of cell N at order K: a comment line, the header line, then one line per
                               row (TAB-separated, empty = null); D = N // 10000 * 10000. The siblings of a
                               tile with rows are there without rows (a client asks for a view's cells)
    Norder1/Allsky.tsv         the tiles of order 1 in one file, and Norder2/Allsky.tsv those of order 2 (Aladin
                               Lite loads both first)
    rows/C.bin                 where each row is: row r is uint32 number r % 65536 (little-endian) of C = r // 65536,
                               ``npix << 4 | order`` of its tile, 0xFFFFFFFF for a row id not in the data

A catalog of at most ``whole_rows`` rows is all at order 1. Otherwise a cell at order 1 or 2 keeps its
``allsky_rows`` most typical rows, a cell at order 3 or deeper its ``tile_rows``
most typical rows not shown at a coarser order; the rest go to its four sub-cells, down to the first order where
every cell's rest fits (at most :data:`MAX_ORDER`, whose tiles take all that is left). Most typical: the highest
``concentration`` (the encoder is surest of the place), ties and data without one in a seeded random order.

Built out of core: the rows stream from the Parquet input into a staged Parquet file with each row's HEALPix cell
at :data:`MAX_ORDER`; DuckDB (with a memory limit, spilling to a temporary directory) ranks the rows within their
cells order by order and sorts them into tiles, which stream back batch by batch. TSV has no quoting: a TAB or a
line break inside a string becomes a space in the tiles, a double quote a single one (the Parquet catalog keeps the
values as they are).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from spherinator.atlas import AtlasError
from spherinator.atlas.sky import healpix_index, unit_to_radec

HIPS_VERSION = "1.4"  # as spherinator.atlas.hips (which imports torch through render: not here, the catalog needs none)
CATALOG_DIR = "catalog"  # the progressive catalog in an atlas directory
MAX_ORDER = 11  # deepest order of a progressive catalog: 25 million cells, finer than any embedding resolves
ROW_CHUNK = 65536  # rows per file of the row index (256 KiB)
ROW_NAMES = ("row", "row_id")  # the row id column of the catalog / of predict's shards, in that preference
LEFT_OUT = ("x", "y", "z", "location", "_cell", "_priority")  # vectors and the staging's own columns
BATCH_ROWS = 65536
NOT_A_ROW = 0xFFFFFFFF  # row index: no row of that id
NO_PLACE = 0xFFFFFFFE  # row index: a row without a place on the sphere (a zero or non-finite latent)
DESCRIPTIONS = {
    "row": "position of the row in the data (file order)",
    "ra": "right ascension of the row's unit vector: atan2(y, x) in [0, 360)",
    "dec": "declination of the row's unit vector: asin(z)",
    "concentration": "Power Spherical concentration (scale) of the row's posterior",
    "thumbnail": "picture of the row's input (thumbs/decoded/ holds the decoder's output at its position)",
}


def read_rows(source: str | Path) -> tuple[ds.Dataset, list[str]]:
    """The embedding rows of ``source``: a Parquet file (the atlas's ``catalog.parquet``) or a directory of Parquet
    shards (``spherinator predict``'s embeddings: ``location`` and per-row columns; files whose name starts with
    ``.`` or ``_``, such as a shard being written, are skipped). Returns the dataset and notes.

    Raises:
        AtlasError: no Parquet there, shards of clashing schemas, or no place on the sphere (neither ``ra``/``dec``
            nor ``location``).
    """
    path = Path(source)
    if not path.exists():
        raise AtlasError(f"embeddings '{path}': no such file or directory; give catalog.parquet or a directory of "
                         "Parquet shards")  # fmt: skip
    try:
        dataset = ds.dataset(path, format="parquet", exclude_invalid_files=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as err:
        raise AtlasError(f"embeddings '{path}' cannot be read as Parquet ({err}); give Parquet files of one "
                         "schema") from err  # fmt: skip
    if not dataset.files:
        raise AtlasError(f"embeddings '{path}': no Parquet files there (hidden and _-prefixed ones are skipped)")
    names = dataset.schema.names
    if not ({"ra", "dec"} <= set(names) or "location" in names):
        raise AtlasError(f"embeddings '{path}' have no place on the sphere: no ra/dec or location columns (found: "
                         f"{', '.join(names)}); give spherinator predict's embeddings or catalog.parquet")  # fmt: skip
    notes = []
    if not any(name in names for name in ROW_NAMES):
        notes.append(f"embeddings '{path}' have no row column: rows are numbered in file order")
    return dataset, notes


def _place(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """RA and Dec (degrees, NaN where the latent vector has no direction) of a batch's rows."""
    names = batch.schema.names
    if "ra" in names and "dec" in names:
        ra = batch.column("ra").to_numpy(zero_copy_only=False).astype(np.float64)
        dec = batch.column("dec").to_numpy(zero_copy_only=False).astype(np.float64)
        return ra, dec
    location = batch.column("location")
    width = location.type.list_size if pa.types.is_fixed_size_list(location.type) else 0
    if width != 3:
        raise AtlasError(f"embeddings' location is {location.type}, not a fixed-size list of 3 (a point of S2); "
                         "the atlas shows a 3-dimensional latent space")  # fmt: skip
    vectors = location.flatten().to_numpy(zero_copy_only=False).reshape(-1, 3).astype(np.float64)
    norm = np.linalg.norm(vectors, axis=1)
    ra, dec = unit_to_radec(vectors)
    lost = ~((norm > 0) & np.isfinite(norm))
    ra[lost], dec[lost] = np.nan, np.nan
    return ra, dec


def _text(column: pa.Array) -> pa.Array:
    """A string column that a TSV line can hold: no TAB, line break or double quote (see the module docstring)."""
    column = pc.replace_substring_regex(column, r"[\t\r\n]", " ")
    return pc.replace_substring(column, '"', "'")


def _stage_batch(batch: pa.RecordBatch, first_row: int, thumbnails: pa.Array | None, seed: int) -> pa.Table:
    """One input batch as the staged table: ``row``, the per-row columns, ``ra``, ``dec``, ``concentration``,
    ``thumbnail`` and the staging's ``_cell`` (NESTED index at :data:`MAX_ORDER`, -1: no place) and ``_priority``."""
    ra, dec = _place(batch)
    row_name = next((name for name in ROW_NAMES if name in batch.schema.names), None)
    if row_name is not None:
        rows = batch.column(row_name).cast(pa.int64())
    else:
        rows = pa.array(np.arange(first_row, first_row + batch.num_rows, dtype=np.int64))
    columns: dict[str, pa.Array] = {"row": rows}
    for field, column in zip(batch.schema, batch.columns, strict=True):
        if field.name in (*ROW_NAMES, "ra", "dec", "scale", *LEFT_OUT) or not is_row_column(field.type):
            continue
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        columns[field.name] = _text(column) if text else column
    columns["ra"], columns["dec"] = pa.array(ra), pa.array(dec)
    if "scale" in batch.schema.names and "concentration" not in columns:  # predict's name for it
        columns["concentration"] = batch.column("scale").cast(pa.float32())
    if thumbnails is not None:
        shown = pc.is_in(rows, value_set=thumbnails)
        columns["thumbnail"] = pc.if_else(shown, pc.binary_join_element_wise("thumbs/input/", rows.cast(pa.string()),
                                                                             ".png", ""), "")  # fmt: skip
    placed = np.isfinite(ra) & np.isfinite(dec)
    cell = np.full(batch.num_rows, -1, dtype=np.int64)
    if placed.any():
        cell[placed] = healpix_index(ra[placed], dec[placed], MAX_ORDER)
    columns["_cell"] = pa.array(cell)
    columns["_priority"] = _priority(batch, rows, seed)
    return pa.table(columns)


def tile_path(root: Path, order: int, npix: int) -> Path:
    """``root/NorderK/DirD/NpixN.tsv`` of tile ``npix`` at ``order`` (D = N // 10000 * 10000), as HiPS 1.0 lays out
    tiles (:func:`spherinator.atlas.hips.tile_path` for pictures)."""
    return Path(root) / f"Norder{order}" / f"Dir{npix // 10000 * 10000}" / f"Npix{npix}.tsv"


def is_row_column(type_: pa.DataType) -> bool:
    """Whether a Parquet column of this type holds one catalog value per row: numbers, booleans, strings, and
    dictionary-encoded ones (pandas categoricals, e.g. object names or classes)."""
    if pa.types.is_dictionary(type_):
        return is_row_column(type_.value_type)
    kinds = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_string,
             pa.types.is_large_string)  # fmt: skip
    return any(kind(type_) for kind in kinds)


def _priority(batch: pa.RecordBatch, rows: pa.Array, seed: int) -> pa.Array:
    """How typical each row is: its concentration when known (NaN last), plus a seeded random fraction below one
    unit that orders ties and data without one."""
    ids = rows.to_numpy(zero_copy_only=False).astype(np.uint64)
    mixed = (ids + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix-like
    mixed ^= mixed >> np.uint64(31)
    noise = (mixed >> np.uint64(11)).astype(np.float64) / float(2**53)
    name = "concentration" if "concentration" in batch.schema.names else "scale"
    if name in batch.schema.names:
        scale = batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        return pa.array(np.where(np.isfinite(scale), np.floor(scale) + noise, -1.0))
    return pa.array(noise)


def stage_rows(dataset: ds.Dataset, path: Path, thumbnails: Iterable[int] = (), seed: int = 0) -> int:
    """Stream ``dataset`` into the staged Parquet file ``path`` (see :func:`_stage_batch`); returns its rows."""
    shown = pa.array(sorted(int(r) for r in thumbnails), pa.int64()) if thumbnails else None
    writer: pq.ParquetWriter | None = None
    rows = 0
    try:
        for batch in dataset.to_batches(batch_size=BATCH_ROWS):
            if batch.num_rows == 0:
                continue
            table = _stage_batch(batch, rows, shown, seed)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            elif table.schema != writer.schema:
                table = table.cast(writer.schema)
            writer.write_table(table)
            rows += batch.num_rows
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as err:  # ValueError: a shard's columns differ
        raise AtlasError(f"embeddings cannot be read ({err}); give every shard the same columns and types") from err
    finally:
        if writer is not None:
            writer.close()
    if rows == 0:
        raise AtlasError("the embeddings hold no rows; the catalog needs at least one")
    return rows


def write_votable(table: pa.Table, path: Path, order: int | None) -> None:
    """``table`` as a VOTable (TABLEDATA, so every client reads it), with units and UCDs on the position columns."""
    from astropy.io.votable import from_table
    from astropy.table import Table

    astro = Table({name: _astropy_column(table.column(name)) for name in table.column_names})
    votable = from_table(astro)
    resource = votable.get_first_table()
    resource.name = "spherinator_atlas"
    descriptions = dict(DESCRIPTIONS)
    if order is not None:
        descriptions["healpix"] = f"NESTED HEALPix index at order {order} (nside {2**order})"
    for field in resource.fields:
        if field.name in ("ra", "dec"):
            field.unit = "deg"
            field.ucd = f"pos.eq.{field.name};meta.main"
        elif field.name == "row":
            field.ucd = "meta.id;meta.main" if "id" not in table.column_names else "meta.number"
        elif field.name == "id":
            field.ucd = "meta.id;meta.main"
        elif field.name == "healpix":
            field.ucd = "pos.healpix"
        if field.name in descriptions:
            field.description = descriptions[field.name]
        if field.datatype in ("char", "unicodeChar") and table.num_rows == 0:
            field.arraysize = "*"  # no values to size it by (the metadata of a progressive catalog)
    votable.to_xml(str(path), tabledata_format="tabledata")


# Types a VOTable cannot hold, widened to one it can (astropy writes no int8, uint16/32/64 or float16).
_WIDER = {pa.int8(): pa.int16(), pa.uint16(): pa.int32(), pa.uint32(): pa.int64(), pa.float16(): pa.float32()}


def _astropy_column(column: pa.ChunkedArray) -> np.ndarray:
    """A catalog column as astropy takes it for a VOTable: nulls masked (written as empty cells), types widened
    where a VOTable has no such type; uint64 values beyond int64 are written as their decimal text."""
    column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_uint64(column.type):
        fits = (pc.max(column).as_py() or 0) < 2**63
        column = column.cast(pa.int64() if fits else pa.string())
    column = column.cast(_WIDER.get(column.type, column.type))
    mask = column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = np.asarray(["" if v is None else v for v in column.to_pylist()], dtype=str)
    elif mask.any():
        values = column.fill_null(pa.scalar(False if pa.types.is_boolean(column.type) else 0, column.type))
        values = values.to_numpy(zero_copy_only=False)
    else:
        return column.to_numpy(zero_copy_only=False)
    return np.ma.MaskedArray(values, mask=mask) if mask.any() else values


def _connect(scratch: Path, memory_limit: str) -> Any:
    """A DuckDB connection that spills to ``scratch`` beyond ``memory_limit`` and keeps no insertion order."""
    import duckdb

    config = {"memory_limit": memory_limit, "temp_directory": str(scratch / "duckdb"),
              "preserve_insertion_order": False}  # fmt: skip
    return duckdb.connect(config=config)


def _check_rows(con: Any, staged: str) -> None:
    """Refuse row ids given twice (overlapping shards) or negative ones: ``?row=N`` must name one row."""
    twice = con.execute(f"SELECT row, count(*) FROM read_parquet('{staged}') GROUP BY row HAVING count(*) > 1 "
                        "LIMIT 1").fetchall()  # fmt: skip
    if twice:
        raise AtlasError(f"row {twice[0][0]} appears {twice[0][1]} times in the embeddings; give each row once (shards "
                         "that overlap, or a row column with repeated values)")  # fmt: skip
    lowest = con.execute(f"SELECT min(row) FROM read_parquet('{staged}')").fetchall()[0][0]
    if lowest is not None and lowest < 0:
        raise AtlasError(f"row ids must be >= 0 (found {lowest}); give the rows' positions in the data")


def assign_tiles(con: Any, staged: str, allsky_rows: int, tile_rows: int) -> int:
    """The table ``placed (row, ord, npix)``: the tile of every row that has a place (see the module docstring);
    returns the deepest order used."""
    con.execute(f"CREATE TABLE rest AS SELECT row, _cell, _priority FROM read_parquet('{staged}') WHERE _cell >= 0")
    con.execute("CREATE TABLE placed (row BIGINT, ord TINYINT, npix BIGINT)")
    order = 1
    for order in range(1, MAX_ORDER + 1):
        limit = allsky_rows if order <= 2 else tile_rows
        shift = 2 * (MAX_ORDER - order)  # NESTED: the cell at ``order`` holding a cell is its index >> 2 * depth
        if order == MAX_ORDER:
            con.execute(f"INSERT INTO placed SELECT row, {order}, _cell >> {shift} FROM rest")
            break
        con.execute(f"CREATE TABLE ranked AS SELECT *, row_number() OVER (PARTITION BY _cell >> {shift} ORDER BY "
                    "_priority DESC, row) AS rank FROM rest")  # fmt: skip
        con.execute(f"INSERT INTO placed SELECT row, {order}, _cell >> {shift} FROM ranked WHERE rank <= {limit}")
        con.execute(f"CREATE OR REPLACE TABLE rest AS SELECT row, _cell, _priority FROM ranked WHERE rank > {limit}")
        con.execute("DROP TABLE ranked")
        if con.execute("SELECT count(*) FROM rest").fetchall()[0][0] == 0:
            break
    return order


class _TileWriter:
    """Writes the sorted rows of the tiles into ``NorderK/DirD/NpixN.tsv`` files, one open at a time, and the tiles
    of orders 1 and 2 also into their order's ``Allsky.tsv``."""

    def __init__(self, root: Path, names: list[str]) -> None:
        self.root = root
        self.header = ("\t".join(names) + "\n").encode()
        self.key: tuple[int, int] | None = None
        self.file: Any = None
        self.allsky: dict[int, Any] = {}
        self.tiles = 0

    def _open(self, order: int, npix: int) -> None:
        if self.file is not None:
            self.file.close()
        path = tile_path(self.root, order, npix)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("wb")
        self.file.write(f"# spherinator progressive catalog: order {order}, cell {npix}\n".encode() + self.header)
        if order <= 2 and order not in self.allsky:
            self.allsky[order] = (self.root / f"Norder{order}" / "Allsky.tsv").open("wb")
            self.allsky[order].write(f"# spherinator progressive catalog: the tiles of order {order}\n".encode()
                                     + self.header)  # fmt: skip
        self.key = (order, npix)
        self.tiles += 1

    def write(self, batch: pa.RecordBatch) -> None:
        """Rows of one batch (sorted by tile) with their ``_ord`` and ``_npix`` in the first two columns."""
        orders = batch.column(0).to_numpy(zero_copy_only=False)
        pixels = batch.column(1).to_numpy(zero_copy_only=False)
        body = _tsv(pa.Table.from_batches([batch]).drop_columns(["_ord", "_npix"]))
        lines = body.split(b"\n")
        starts = np.flatnonzero((np.diff(orders) != 0) | (np.diff(pixels) != 0)) + 1
        for a, b in zip(np.r_[0, starts], np.r_[starts, len(orders)], strict=True):
            key = (int(orders[a]), int(pixels[a]))
            if key != self.key:
                self._open(*key)
            text = b"\n".join(lines[a:b]) + b"\n"
            self.file.write(text)
            if key[0] in self.allsky:
                self.allsky[key[0]].write(text)

    def empty(self, order: int, npix: int) -> None:
        """A tile without rows: the sibling of a tile with rows, which a client asks for in the same view."""
        path = tile_path(self.root, order, npix)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"# spherinator progressive catalog: order {order}, cell {npix}\n".encode() + self.header)
        self.tiles += 1

    def close(self) -> None:
        for order in (1, 2):  # Aladin Lite waits for both Allsky files, even an empty one
            if order not in self.allsky:
                (self.root / f"Norder{order}").mkdir(parents=True, exist_ok=True)
                self.allsky[order] = (self.root / f"Norder{order}" / "Allsky.tsv").open("wb")
                self.allsky[order].write(f"# spherinator progressive catalog: the tiles of order {order}\n".encode()
                                         + self.header)  # fmt: skip
        for file in [self.file, *self.allsky.values()]:
            if file is not None:
                file.close()


def _tsv(table: pa.Table) -> bytes:
    """Rows as TAB-separated lines without a header (nulls empty)."""
    import io

    buffer = io.BytesIO()
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    pacsv.write_csv(table, buffer, options)
    return buffer.getvalue()


def write_tiles(con: Any, staged: str, root: Path, names: list[str]) -> int:
    """Every placed row into its tile, most typical first; returns the number of tiles."""
    query = (f"SELECT p.ord AS _ord, p.npix AS _npix, {', '.join(_quoted(n) for n in names)} FROM placed p JOIN "
             f"read_parquet('{staged}') s USING (row) ORDER BY p.ord, p.npix, s._priority DESC, s.row")  # fmt: skip
    siblings = ("SELECT DISTINCT p.ord, p.npix // 4 * 4 + t.i FROM placed p, range(4) t(i) WHERE p.ord >= 3 "
                "EXCEPT SELECT DISTINCT ord, npix FROM placed")  # fmt: skip
    writer = _TileWriter(root, names)
    try:
        for batch in con.sql(query).to_arrow_reader(BATCH_ROWS):
            writer.write(batch)
        for order, npix in con.execute(siblings).fetchall():
            writer.empty(int(order), int(npix))
    finally:
        writer.close()
    return writer.tiles


def _quoted(name: str) -> str:
    return "s." + '"' + name.replace('"', '""') + '"'


def write_row_index(con: Any, staged: str, root: Path) -> int:
    """``rows/C.bin``: the tile of each row id (see the module docstring); returns the number of files."""
    query = (f"SELECT s.row, coalesce(p.npix * 16 + p.ord, {NO_PLACE}) AS code FROM read_parquet('{staged}') s "
             "LEFT JOIN placed p USING (row) ORDER BY s.row")  # fmt: skip
    (root / "rows").mkdir(parents=True, exist_ok=True)
    chunk, codes, files = -1, np.empty(0, dtype="<u4"), 0
    for batch in con.sql(query).to_arrow_reader(BATCH_ROWS):
        rows = batch.column(0).to_numpy(zero_copy_only=False)
        values = batch.column(1).to_numpy(zero_copy_only=False).astype("<u4")
        for c in np.unique(rows // ROW_CHUNK):
            if c != chunk:
                if chunk >= 0:
                    (root / "rows" / f"{chunk}.bin").write_bytes(codes.tobytes())
                    files += 1
                chunk, codes = int(c), np.full(ROW_CHUNK, NOT_A_ROW, dtype="<u4")
            mine = rows // ROW_CHUNK == c
            codes[rows[mine] % ROW_CHUNK] = values[mine]
    if chunk >= 0:
        (root / "rows" / f"{chunk}.bin").write_bytes(codes.tobytes())
        files += 1
    return files


def write_progressive_catalog(
    source: str | Path,
    out: str | Path,
    tile_rows: int = 200,
    allsky_rows: int = 20,
    whole_rows: int = 2000,
    thumbnails: Iterable[int] = (),
    properties: dict[str, str] | None = None,
    healpix_order: int | None = None,
    seed: int = 0,
    memory_limit: str = "1GB",
) -> dict[str, Any]:
    """Write the progressive catalog of the embeddings ``source`` into the directory ``out`` (see the module
    docstring), out of core.

    Args:
        source: ``catalog.parquet`` of an atlas, or a directory of Parquet embedding shards (:func:`read_rows`).
        out: The catalog directory (made; files in it are overwritten).
        tile_rows: Rows a tile of order 3 or deeper holds at most (except at :data:`MAX_ORDER`).
        allsky_rows: Rows a cell of order 1 or 2 holds at most (all of them load at once).
        whole_rows: A catalog of at most this many rows is all at order 1: drawn at once, as a VOTable would be.
        thumbnails: Row ids that have pictures in ``thumbs/input/<row>.png`` beside ``out``.
        properties: Extra ``properties`` keys (creator_did, obs_title, hips_initial_*, ...).
        healpix_order: The order of the input's ``healpix`` column, for its description.
        seed: Seed of the order among rows equally typical.
        memory_limit: DuckDB's memory limit; beyond it, it spills to a temporary directory.

    Returns:
        rows, placed (rows with a place on the sphere), tiles, order (the deepest), seconds, notes.

    Raises:
        AtlasError: unreadable or clashing input, repeated or negative row ids.
    """
    if tile_rows < 1 or allsky_rows < 1:
        raise AtlasError(f"tile_rows {tile_rows} and allsky_rows {allsky_rows} must be >= 1")
    started = time.perf_counter()
    dataset, notes = read_rows(source)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".catalog-", dir=root.parent) as scratch:
        staged = Path(scratch) / "staged.parquet"
        rows = stage_rows(dataset, staged, thumbnails, seed)
        names = [n for n in pq.read_schema(staged).names if n not in ("_cell", "_priority")]
        first = max(allsky_rows, rows) if rows <= whole_rows else allsky_rows
        order, placed, tiles = _sort_into_tiles(staged, root, names, (first, tile_rows), memory_limit)
        empty = pq.read_schema(staged).empty_table().select(names)
    write_votable(empty, root / "Metadata.xml", healpix_order)
    (root / "metadata.xml").write_bytes((root / "Metadata.xml").read_bytes())
    keys = catalog_properties(order, placed, tiles, properties)  # one ``key = value`` line each, as hips.py writes
    (root / "properties").write_text("".join(f"{k:<20} = {' '.join(str(v).split())}\n" for k, v in keys.items()))
    if placed < rows:
        notes.append(f"{rows - placed} of {rows} rows have no place on the sphere and are not in the tiles")
    return {"rows": rows, "placed": placed, "tiles": tiles, "order": order,
            "seconds": round(time.perf_counter() - started, 2), "notes": notes}  # fmt: skip


def _sort_into_tiles(staged: Path, root: Path, names: list[str], limits: tuple[int, int],
                     memory_limit: str) -> tuple[int, int, int]:  # fmt: skip
    """The DuckDB part: check the row ids, place the rows, write the tiles and the row index (scratch files beside
    ``staged``); returns the deepest order, the rows placed and the tiles."""
    con = _connect(staged.parent, memory_limit)
    try:
        _check_rows(con, str(staged))
        order = assign_tiles(con, str(staged), *limits)
        placed = con.execute("SELECT count(*) FROM placed").fetchall()[0][0]
        tiles = write_tiles(con, str(staged), root, names)
        write_row_index(con, str(staged), root)
    finally:
        con.close()
    return order, placed, tiles


def catalog_properties(order: int, rows: int, tiles: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ``properties`` of a progressive catalog: the keys HiPS 1.0 requires and the catalog's own."""
    from datetime import UTC, datetime

    from spherinator import __version__

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ")
    keys = {
        "creator_did": "ivo://spherinator/C/atlas",
        "obs_title": "spherinator atlas catalog",
        "obs_description": "Every row of the data at the place its encoder gives it on the sphere",
        "dataproduct_type": "catalog",
        "hips_version": HIPS_VERSION,
        "hips_builder": f"spherinator {__version__}",
        "hips_creation_date": now,
        "hips_release_date": now,
        "hips_status": "public master clonableOnce",
        "hips_tile_format": "tsv",
        "hips_order": str(order),
        "hips_order_min": "1",
        "hips_frame": "equatorial",
        "hips_cat_nrows": str(rows),
        "hips_nb_tiles": str(tiles),
        "hips_initial_ra": "0",
        "hips_initial_dec": "0",
        "hips_initial_fov": "180",
    }
    keys.update(extra or {})
    return keys
