"""The catalog of an atlas: where every row of the data lands on the sphere, streamed batch by batch.

``catalog.parquet`` holds every row: ``row`` (its position in the data, file order), the data's own per-row
columns (``id``, labels, parameters, string names), ``ra``/``dec`` (degrees, see :mod:`spherinator.atlas.sky`),
``healpix`` (NESTED index at the HiPS's deepest order), ``x``/``y``/``z`` (the unit vector) and, for a VAE encoded
with its checkpoint, ``concentration`` (the Power Spherical scale). ``catalog.vot`` (VOTable, TABLEDATA) holds the
same columns but x/y/z for a seeded sample of at most ``max_sources`` rows (other clients' quick look); ``catalog/``
the progressive catalog of every row (:mod:`spherinator.atlas.progressive`), the layer the page draws. The first
``thumbnails`` sampled rows get small pictures of their input and of the decoder's output at their position
(``thumbs/input/<row>.png``, ``thumbs/decoded/<row>.png``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from spherinator.atlas import AtlasError
from spherinator.atlas.model import SphereModel
from spherinator.atlas.progressive import CATALOG_DIR, is_row_column, write_progressive_catalog, write_votable
from spherinator.atlas.render import TileRenderer
from spherinator.atlas.sky import healpix_index, unit_to_radec
from spherinator.atlas.source import ParquetRows, load_datamodule  # noqa: F401 (load_datamodule: re-exported)

# Columns the atlas computes; a data column of the same name is kept renamed (see _CatalogNames).
COMPUTED = ("row", "ra", "dec", "healpix", "x", "y", "z", "concentration", "thumbnail")


def add_row_columns(datamodule: Any) -> list[str]:
    """Make a spherinator DataModule return dicts, and name the per-row columns of its files (numbers, booleans,
    strings such as object names, dictionary-encoded ones) that the catalog carries beside the model input. Returns
    those names; other data modules are left as they are (their batches' own per-row columns still reach the
    catalog).

    The columns the DataModule does not load already are read straight from the files (:class:`FileColumns`), not
    through the training reader: a catalog column keeps its stored type and its nulls, which the model never sees.
    """
    if not reads_files(datamodule):
        return []
    from spherinator.data.reader import find_parquet_files

    names = datamodule.column_names
    schema = pq.read_schema(find_parquet_files(datamodule.path)[0])
    if datamodule.columns is None:  # every tensor column: the model input is the one the catalog needs loaded
        from spherinator.data import Column

        datamodule.columns = [Column(names[0])]
    datamodule.return_dict = True
    return [f.name for f in schema if f.name != names[0] and is_row_column(f.type)]


def reads_files(datamodule: Any) -> bool:
    """Whether ``datamodule`` reads spherinator's Parquet files (a ``spherinator.data.DataModule``, or the
    :class:`~spherinator.atlas.source.ParquetRows` of an ONNX export's atlas): the catalog's per-row columns come
    from its files. Told without importing Lightning: a DataModule exists only once its module is loaded."""
    loaded = sys.modules.get("spherinator.data.datamodule")
    return isinstance(datamodule, ParquetRows) or (loaded is not None and isinstance(datamodule, loaded.DataModule))


def _batches(datamodule: Any) -> tuple[Iterator[Any], int | None, int | None]:
    """The predict batches (every row once, file order), the row count and the batch count where known."""
    datamodule.setup("predict")
    rows = datamodule.split_rows("predict") if callable(getattr(datamodule, "split_rows", None)) else None
    loader = datamodule.predict_dataloader()
    batches = len(loader) if hasattr(loader, "__len__") else None
    return iter(loader), rows, batches


def _column_values(value: Any, n: int) -> np.ndarray | None:
    """A per-row column of a batch as a 1-D numpy array, or None when it is not one value per row."""
    if isinstance(value, np.ndarray):
        value = value if value.ndim == 1 else None
    elif isinstance(value, list | tuple):
        value = np.asarray(value, dtype=object) if all(v is None or isinstance(v, str) for v in value) else None
    elif hasattr(value, "detach"):  # a torch tensor (a DataModule's batch)
        value = value.detach().cpu()
        value = value.numpy() if value.dim() == 1 else None
    else:
        return None
    return value if value is not None and len(value) == n else None


class FileColumns:
    """Per-row columns read straight from a spherinator DataModule's Parquet files, in file order (the order of
    its predict batches): every one its batches do not carry. Each keeps the type it has in the first file
    (dictionaries decoded) and its nulls; a file without the column gives nulls.
    """

    def __init__(self, datamodule: Any, carried: set[str]) -> None:
        from spherinator.data.reader import find_parquet_files

        self.types: dict[str, pa.DataType] = {}
        self.left_out: list[str] = []
        self._files: list[Path] = []
        if reads_files(datamodule):
            self._files = find_parquet_files(datamodule.path)
            for f in pq.read_schema(self._files[0]):
                if f.name in carried:
                    continue
                if is_row_column(f.type):
                    self.types[f.name] = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
                else:
                    self.left_out.append(f"{f.name} ({f.type})")
        self.names = list(self.types)
        self._stream = self._read() if self.names else iter(())
        self._held: list[pa.RecordBatch] = []
        self._rows = 0

    def _read(self) -> Iterator[pa.RecordBatch]:
        """The columns batch by batch, decoded to plain values of the first file's types."""
        for file in self._files:
            parquet = pq.ParquetFile(file)
            present = [name for name in self.names if name in parquet.schema_arrow.names]
            if not present:  # no batches to read the row count from
                yield self._batch(file, {}, parquet.metadata.num_rows)
                continue
            for batch in parquet.iter_batches(columns=present):
                yield self._batch(file, {name: batch.column(name) for name in present}, batch.num_rows)

    def _batch(self, file: Path, columns: dict[str, pa.Array], rows: int) -> pa.RecordBatch:
        arrays = []
        for name, type_ in self.types.items():
            column = columns.get(name)
            if column is None:
                column = pa.nulls(rows, type_)
            if pa.types.is_dictionary(column.type):  # files may encode a column with other dictionaries
                column = column.dictionary_decode()
            if column.type != type_:
                try:
                    column = column.cast(type_)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                    raise AtlasError(f"column {name!r} is {column.type} in '{file}' but {type_} in "
                                     f"'{self._files[0]}' ({err}); give every file the same type") from err  # fmt: skip
            arrays.append(column)
        return pa.RecordBatch.from_arrays(arrays, names=self.names)

    def notes(self) -> list[str]:
        """What the catalog left out of the data, in one line."""
        if not self.left_out:
            return []
        return [f"left out of the catalog (not one number, boolean or string per row): {', '.join(self.left_out)}"]

    def take(self, n: int) -> dict[str, pa.Array]:
        """The next ``n`` rows of each column."""
        if not self.names:
            return {}
        while self._rows < n:
            batch = next(self._stream, None)
            if batch is None:
                raise AtlasError(f"the data's files hold fewer rows than its batches ({self.names[0]!r} ran out)")
            self._held.append(batch)
            self._rows += batch.num_rows
        table = pa.Table.from_batches(self._held)
        rest = table.slice(n)
        self._held, self._rows = rest.to_batches(), rest.num_rows
        head = table.slice(0, n)
        return {name: head.column(name).combine_chunks() for name in self.names}


class _Sample:
    """The rows of the VOTable: a seeded sample of ``size`` of ``total`` rows, or the first ``size`` rows when the
    data have no more (or do not tell their count); the first ``thumbnails`` of them get pictures."""

    def __init__(self, total: int | None, size: int, thumbnails: int, seed: int) -> None:
        self.size, self.thumbnails = size, thumbnails
        self.chosen: np.ndarray | None = None  # None: the first ``size`` rows (no arange of ``size``: it may be huge)
        if total is not None and total > size:
            self.chosen = np.sort(np.random.default_rng(seed).choice(total, size, replace=False))
            self.thumbed = set(self.chosen[:thumbnails].tolist())

    def rows(self, start: int, n: int) -> np.ndarray:
        """Positions within the batch of rows ``start .. start + n - 1`` that are in the sample."""
        if self.chosen is None:
            return np.arange(max(0, min(n, self.size - start)))
        return self.chosen[(self.chosen >= start) & (self.chosen < start + n)] - start

    def has_thumbnail(self, row: int) -> bool:
        if self.chosen is None:
            return row < min(self.thumbnails, self.size)
        return row in self.thumbed

    def thumbnail_count(self, rows: int) -> int:
        if self.chosen is None:
            return min(self.thumbnails, self.size, rows)
        return int((self.chosen[: self.thumbnails] < rows).sum())


def write_catalog(
    model: SphereModel,
    datamodule: Any,
    out: Path,
    renderer: TileRenderer,
    order: int,
    max_sources: int = 20000,
    thumbnails: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every row of ``datamodule`` with ``model`` and write ``catalog.parquet``, ``catalog.vot`` and the
    thumbnails under ``out`` (see the module docstring). Returns a summary: rows, sources, columns, the mean
    position, the sampled positions' unit vectors (``sample``) and ``notes`` (data columns renamed or left
    out)."""
    batches, total, count = _batches(datamodule)
    names = _CatalogNames()
    files = FileColumns(datamodule, set(getattr(datamodule, "column_names", None) or []))

    def encoded() -> Iterator[tuple[pa.Table, np.ndarray, Any]]:
        start = 0
        for batch in batches:
            table, location, x = _encode_batch(model, batch, start, order, names, files)
            start += table.num_rows
            yield table, location, x

    sample = _Sample(total, max_sources, thumbnails, seed)
    return _write_rows(encoded(), count, sample, _Drawing(model, renderer, out, order, seed, progress),
                       lambda: names.notes() + files.notes())  # fmt: skip


def write_embedding_catalog(
    shards: list[Path],
    rows: int,
    out: Path,
    order: int,
    max_sources: int = 20000,
    seed: int = 0,
    progress: bool = True,
    row_column: str = "row",
) -> dict[str, Any]:
    """:func:`write_catalog` of rows embedded already: ``spherinator-submit predict``'s shards (``row_column``,
    ``location``, ``scale`` for a VAE, the data's per-row columns), in order of their row ids ``0 .. rows - 1``
    (:func:`~spherinator.atlas.source.open_embeddings` checks the shards against their manifest). No thumbnails:
    the inputs are not read."""
    names = _CatalogNames()
    own = (row_column, "location", "scale")

    def embedded() -> Iterator[tuple[pa.Table, np.ndarray, Any]]:
        start = 0
        for shard in shards:
            for batch in pq.ParquetFile(shard).iter_batches():
                data = {n: batch.column(n) for n in batch.schema.names if n not in own}
                location = _shard_locations(batch.column("location"), shard)
                scale = batch.column("scale") if "scale" in batch.schema.names else None
                table, unit = _catalog_table(start, data, location, scale, order, names)
                # the row ids the shard holds, not its positions: a shard's rows need not be in order
                table = table.set_column(0, "row", _shard_rows(batch.column(row_column), shard))
                start += batch.num_rows
                yield table, unit, None

    sample = _Sample(rows, max_sources, 0, seed)
    count = sum(pq.ParquetFile(shard).metadata.num_row_groups for shard in shards)
    return _write_rows(embedded(), count, sample, _Drawing(None, None, out, order, seed, progress), names.notes)


def _shard_locations(column: pa.Array, shard: Path) -> np.ndarray:
    """A shard's ``location`` column as (B, 3) float64; a null row is NaN (no place on the sphere), a row of
    another length one line naming the shard."""
    import pyarrow.compute as pc

    from spherinator.atlas.source import check_location_type

    check_location_type(column.type, f"'{shard}'")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)  # NaN for a null row
    valid = lengths == 3
    other = lengths[~valid & ~np.isnan(lengths)]
    if len(other):
        raise AtlasError(f"'{shard}': a location holds {int(other[0])} values, not 3; give the embeddings of a model "
                         "with z_dim 3, as spherinator-submit predict writes them")  # fmt: skip
    location = np.full((len(column), 3), np.nan)
    values = pc.list_flatten(column.filter(pa.array(valid)))
    location[valid] = values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, 3)
    return location


def _shard_rows(column: pa.Array, shard: Path) -> pa.Array:
    """A shard's row ids as int64, or one line naming the shard."""
    try:
        return column.cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise AtlasError(f"'{shard}': its row ids are {column.type}, not whole numbers ({err}); give the "
                         "embeddings spherinator-submit predict wrote") from err  # fmt: skip


@dataclass
class _Drawing:
    """Where and how :func:`_write_rows` writes: the model and renderer of the thumbnails (None: no thumbnails),
    the atlas staging directory, the HEALPix order, the seed and whether to show progress."""

    model: SphereModel | None
    renderer: TileRenderer | None
    out: Path
    order: int
    seed: int
    progress: bool


def _write_rows(tables: Iterator[tuple[pa.Table, np.ndarray, Any]], count: int | None, sample: _Sample,
                drawing: _Drawing, said: Any) -> dict[str, Any]:  # fmt: skip
    """Write ``catalog.parquet`` of ``tables`` (each: catalog rows in row order, their unit vectors, their inputs or
    None), the thumbnails of the sample's rows, ``catalog.vot`` and the progressive catalog; ``said()``: the notes
    about the data columns, known once every row was read."""
    from tqdm import tqdm

    out, thumbnails = drawing.out, sample.thumbnails
    if thumbnails:
        (out / "thumbs" / "input").mkdir(parents=True, exist_ok=True)
        (out / "thumbs" / "decoded").mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    kept: list[pa.Table] = []
    start, mean, undirected = 0, np.zeros(3), 0
    try:
        for table, location, x in tqdm(tables, total=count, desc="catalog", unit="batch", file=sys.stderr,
                                       disable=not drawing.progress):  # fmt: skip
            n = table.num_rows
            mean += np.nansum(location, axis=0)
            undirected += int(np.isnan(location[:, 0]).sum())
            rows = sample.rows(start, n)
            thumbs = [int(r) for r in rows if sample.has_thumbnail(start + int(r))]
            if thumbs:
                _write_thumbnails(drawing.model, drawing.renderer, out, x[thumbs], location[thumbs],
                                  [start + r for r in thumbs])  # fmt: skip
            if writer is None:
                writer = pq.ParquetWriter(out / "catalog.parquet", table.schema)
            writer.write_table(table)
            if len(rows):
                shown = [f"thumbs/input/{start + r}.png" if sample.has_thumbnail(start + int(r)) else "" for r in rows]
                kept.append(table.take(pa.array(rows)).append_column("thumbnail", pa.array(shown, pa.string())))
            start += n
    finally:
        if writer is not None:
            writer.close()
    if start == 0:
        raise AtlasError("the data hold no rows; the catalog needs at least one")
    notes = said()
    if undirected:
        notes.append(f"{undirected} of {start} rows have a zero or non-finite latent vector, so no place on the "
                     "sphere: their ra, dec, x, y, z are NaN and healpix is -1")  # fmt: skip
    summary = _finish_catalog(pa.concat_tables(kept), out, drawing.order, start, mean,
                              sample.thumbnail_count(start), notes)  # fmt: skip
    thumbed = [int(p.stem) for p in (out / "thumbs" / "input").glob("*.png")] if thumbnails else []
    progressive = write_progressive_catalog(out / "catalog.parquet", out / CATALOG_DIR, thumbnails=thumbed,
                                            healpix_order=drawing.order, seed=drawing.seed)  # fmt: skip
    progressive.pop("notes")  # rows without a place are said above; catalog.parquet has a row column
    summary["progressive"] = {"path": CATALOG_DIR, **progressive}
    return summary


def _finish_catalog(sample: pa.Table, out: Path, order: int, rows: int, mean: np.ndarray, thumbnails: int,
                    notes: list[str]) -> dict[str, Any]:  # fmt: skip
    """Write the VOTable of the sampled rows; the summary :func:`write_catalog` returns."""
    write_votable(sample.drop_columns(["x", "y", "z"]), out / "catalog.vot", order)
    vectors = np.stack([sample.column(c).to_numpy() for c in ("x", "y", "z")], axis=1)
    vectors = vectors[np.isfinite(vectors).all(axis=1)]  # rows without a place on the sphere cover nothing
    return {
        "rows": rows,
        "sources": sample.num_rows,
        "thumbnails": thumbnails,
        "columns": [c for c in sample.column_names if c not in ("x", "y", "z")],
        "mean_vector": (mean / rows).tolist(),
        "sample": vectors,
        "notes": notes,
    }


class _CatalogNames:
    """The catalog name of each data column: its own, unless the atlas computes one of that name (``row``, ``ra``,
    ...); then ``data_<name>``, or ``data_<name>_2``, ... while that is taken by the data too. Every data column is
    kept, with its values."""

    def __init__(self) -> None:
        self.renamed: dict[str, str] = {}
        self._data: list[str] | None = None

    def map(self, data_names: list[str]) -> dict[str, str]:
        """Catalog names of the data columns ``data_names`` (fixed by the first batch)."""
        if self._data is None:
            self._data = list(data_names)
            taken = set(COMPUTED) | set(data_names)
            for name in data_names:
                if name in COMPUTED:
                    new, k = f"data_{name}", 2
                    while new in taken:
                        new, k = f"data_{name}_{k}", k + 1
                    taken.add(new)
                    self.renamed[name] = new
        return {name: self.renamed.get(name, name) for name in data_names}

    def notes(self) -> list[str]:
        if not self.renamed:
            return []
        pairs = ", ".join(f"{old!r} as {new!r}" for old, new in self.renamed.items())
        return [f"data columns named like the atlas's own are in the catalog renamed: {pairs}"]


def _encode_batch(model: SphereModel, batch: Any, start: int, order: int, names: _CatalogNames,
                  files: FileColumns) -> tuple[pa.Table, np.ndarray, Any]:  # fmt: skip
    """One batch as catalog columns; also its unit vectors (B, 3) and model inputs."""
    from spherinator.atlas.model import batch_input

    x = batch_input(batch)
    n = len(x)
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise AtlasError(f"the model takes inputs of shape {tuple(model.input_shape)} but the data's samples have "
                         f"shape {tuple(x.shape[1:])}: give the data the model was trained on (-c / --data.*), or "
                         "resize them with a transform in data.init_args.columns")  # fmt: skip
    out = model.encode(batch)
    data: dict[str, Any] = {}
    if isinstance(batch, dict):
        for name, value in list(batch.items())[1:]:
            values = _column_values(value, n)
            if values is not None:
                data[name] = pa.array(values.tolist() if values.dtype == object else values)
    data.update(files.take(n))
    table, unit = _catalog_table(start, data, out["location"], out.get("scale"), order, names)
    return table, unit, x


def _catalog_table(start: int, data: dict[str, Any], location: Any, scale: Any, order: int,
                   names: _CatalogNames) -> tuple[pa.Table, np.ndarray]:  # fmt: skip
    """The catalog rows ``start, start + 1, ...`` of the data columns ``data`` placed at ``location`` (B, 3), with
    the concentration ``scale`` (B,) if given; also their unit vectors (B, 3) float32."""
    location = np.asarray(location, dtype=np.float64)
    n = len(location)
    norm = np.linalg.norm(location, axis=1, keepdims=True)
    # A zero or non-finite latent has no direction: NaN, not the point (ra, dec) = (0, 0), and healpix -1.
    unit = np.divide(location, norm, out=np.full_like(location, np.nan), where=(norm > 0) & np.isfinite(norm))
    ra, dec = unit_to_radec(unit)
    dec[np.isnan(unit[:, 0])] = np.nan
    columns: dict[str, Any] = {"row": pa.array(np.arange(start, start + n, dtype=np.int64))}
    columns.update({new: data[name] for name, new in names.map(list(data)).items() if name in data})
    columns["ra"] = pa.array(ra)
    columns["dec"] = pa.array(dec)
    columns["healpix"] = pa.array(healpix_index(ra, dec, order).astype(np.int64))
    for i, axis in enumerate("xyz"):
        columns[axis] = pa.array(unit[:, i].astype(np.float32))
    if scale is not None:
        columns["concentration"] = pa.array(np.asarray(scale, dtype=np.float32).reshape(-1))
    return pa.table(columns), unit.astype(np.float32)


def _write_thumbnails(model: SphereModel, renderer: TileRenderer, out: Path, x: Any, location: np.ndarray,
                      rows: list[int]) -> None:  # fmt: skip
    inputs = renderer.thumbnails(x if isinstance(x, np.ndarray) else x.float().cpu().numpy())  # numpy, or a tensor
    decoded = renderer.thumbnails(model.decode(location))
    for row, a, b in zip(rows, inputs, decoded, strict=True):
        Image.fromarray(a).save(out / "thumbs" / "input" / f"{row}.png")
        Image.fromarray(b).save(out / "thumbs" / "decoded" / f"{row}.png")
