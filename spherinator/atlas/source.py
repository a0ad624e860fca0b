"""The data an atlas encodes: the ``data:`` sections of ``-c`` files and ``--data.*`` overrides, composed as for
``spherinator fit`` (:func:`load_datamodule`), and for an ONNX export the same rows read without torch
(:class:`ParquetRows`).

An ONNX export encodes with onnxruntime; what it needs of the data is the rows in file order as the model sees them,
which the data layer's own :class:`~spherinator.data.reader.ParquetReader` gives as numpy arrays (the same decoding
and checks as training: :class:`~spherinator.data.layout.ColumnLayout`). So a plain ``spherinator.data.DataModule``
section (a path, column names, a batch size) is read here in numpy and the atlas imports neither torch nor
Lightning. A section this cannot read the same way (column transforms, which are torch modules; another data class;
a Hub dataset id; an option it does not know) is built as ``spherinator fit`` builds it, with torch, and the atlas
says why in one line (:func:`open_data`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from spherinator.atlas import AtlasError
from spherinator.errors import ConfigError

DATAMODULES = ("spherinator.data.DataModule", "spherinator.data.datamodule.DataModule")
# DataModule options that do not change what its predict batches hold (every row once, file order, unshuffled).
PREDICT_NEUTRAL = {"return_dict", "shuffle", "num_workers", "val_fraction", "test_fraction", "seed", "shuffle_buffer",
                   "drop_last", "pin_memory", "persistent_workers", "prefetch_factor", "validation_size", "test_size",
                   "in_gpu_memory"}  # fmt: skip


class ParquetRows:
    """The predict batches of a ``spherinator.data.DataModule`` section, as numpy arrays (no torch): every row once,
    in file order, ``{column: array}`` with the model input first (uint8 arrays scaled to float32 in [0, 1], other
    arrays float32, integer scalars int64, strings lists of ``str``), as the DataModule's batches hold them.

    Args:
        path: Directory holding the Parquet files (searched recursively), or one ``.parquet`` file.
        columns: Column names to load, the model input first; None: the first column that can be a tensor.
        batch_size: Rows per batch.
        page_checksums: When the page checksums are verified, as the DataModule's option of that name.
    """

    def __init__(self, path: str | Path, columns: list[str] | None = None, batch_size: int = 32,
                 page_checksums: str = "first_read") -> None:  # fmt: skip
        self.path = Path(path)
        self.columns = list(columns) if columns is not None else None
        self.batch_size = batch_size
        self.page_checksums = page_checksums
        self.return_dict = True
        self._reader: Any = None

    @property
    def column_names(self) -> list[str]:
        """Names of the loaded columns, the model input first."""
        if self.columns is None:
            from spherinator.data.reader import ParquetIndex

            self.columns = list(ParquetIndex(self.path, None, first_file_only=True).layouts)[:1]
        return list(self.columns)

    def setup(self, stage: str | None = None) -> None:
        """Scan the file footers (raises DataError on bad data, as the DataModule does)."""
        from spherinator.data.layout import DataError
        from spherinator.data.plan import Segment
        from spherinator.data.reader import ParquetIndex, ParquetReader

        if self._reader is not None:
            return
        index = ParquetIndex(self.path, self.column_names)
        if index.num_rows == 0:
            raise DataError(f"the parquet files under {str(self.path)!r} hold no rows; write some data first")
        first = index.layouts[self.column_names[0]]
        if not first.is_tensor:
            raise DataError(f"column {first.name!r} holds {first.kind} values, so it cannot be the model input (the "
                            "first of `columns`); put an array column first, e.g. columns: [data]")  # fmt: skip
        segments = [Segment(f, g, 0, rows) for f, g, rows in index.groups if rows]
        self._reader = ParquetReader(index, segments, batch_size=self.batch_size, shuffle=False,
                                     page_checksums=self.page_checksums)  # fmt: skip

    def split_rows(self, split: str) -> int:
        """Rows of the data (every split of the atlas is ``predict``: all rows)."""
        self.setup(split)
        return self._reader.num_rows

    def predict_dataloader(self) -> _Batches:
        self.setup("predict")
        return _Batches(self._reader)


class _Batches:
    """The batches of a :class:`ParquetRows` in file order, with their count."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.num_batches(0, 1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        layouts = self.reader.layouts
        for batch in self.reader.batches(epoch=0):
            yield {name: as_model_sees(array, layouts[name]) for name, array in batch.items()}


def as_model_sees(array: np.ndarray, layout: Any) -> Any:
    """A decoded column as the DataModule's batches hold it (:func:`spherinator.data.transport.to_tensor`'s values,
    in numpy): arrays of uint8 to float32 in [0, 1] (times float32 1/255, the same rounding), other arrays float32,
    integer and boolean scalars int64, floating scalars as stored, strings a list of ``str``."""
    if layout.kind == "string":
        return array.tolist()
    if layout.is_tensor and array.dtype == np.uint8:
        return np.multiply(array, np.float32(1 / 255), dtype=np.float32)
    if layout.is_tensor:
        return array.astype(np.float32)
    return array if array.dtype.kind == "f" else array.astype(np.int64)


def plain_section(args: list[str]) -> tuple[dict[str, Any] | None, str]:
    """The ``init_args`` of a DataModule section composed of ``args`` (``--config=<YAML with data:>`` and
    ``--data.*`` items, as :func:`compose_data_args` gives them), when
    :class:`ParquetRows` reads it as the DataModule would; else None and why not."""
    section: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--config="):
            data = yaml.safe_load(arg.split("=", 1)[1]).get("data")
            if not isinstance(data, dict) or set(data) - {"class_path", "init_args"}:
                return None, "its data section is not a class_path with init_args"
            if section and data.get("class_path", section["class_path"]) != section["class_path"]:
                return None, "its data sections name two classes"
            section = {"class_path": data.get("class_path", section.get("class_path")),
                       "init_args": {**section.get("init_args", {}), **(data.get("init_args") or {})}}  # fmt: skip
            i += 1
            continue
        if "=" in arg:
            (key, value), i = arg.split("=", 1), i + 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value, i = arg, args[i + 1], i + 2
        else:
            return None, f"it gives {arg} without a value"
        name = key.removeprefix("--data.").removeprefix("init_args.")
        if key == "--data" or "." in name or not section:
            return None, f"it overrides {key}"
        section["init_args"][name] = yaml.safe_load(value)
    return _plain_init_args(section)


def _plain_init_args(section: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The path, column names and batch size of a DataModule section, or None and why :class:`ParquetRows` does
    not read it as the DataModule would."""
    if section.get("class_path") not in DATAMODULES:
        return None, f"the data are {section.get('class_path')}, not spherinator.data.DataModule"
    init = dict(section.get("init_args") or {})
    unknown = sorted(set(init) - PREDICT_NEUTRAL - {"path", "columns", "batch_size", "page_checksums"})
    if unknown:
        return None, f"the data set {', '.join(unknown)}"
    columns = init.get("columns")
    names = None
    if columns is not None:
        if not isinstance(columns, list) or not columns:
            return None, "its columns are not a list of names"
        names = [c if isinstance(c, str) else c.get("name") if isinstance(c, dict) and set(c) <= {"name"} else None
                 for c in columns]  # fmt: skip
        if not all(isinstance(n, str) for n in names):
            return None, "a column has a transform (a torch module)"
    path, batch_size = init.get("path"), init.get("batch_size", 32)
    if not isinstance(path, str) or not Path(path).expanduser().exists():
        return None, "its path is no local file or directory (a Hub dataset id is read through datasets)"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        return None, f"its batch_size {batch_size!r} is not a whole number >= 1"
    plain = {"path": Path(path).expanduser(), "columns": names, "batch_size": batch_size}
    if "page_checksums" in init:  # a run's config.yaml names it (ParquetReader checks the value)
        plain["page_checksums"] = init["page_checksums"]
    return plain, ""


def compose_data_args(cli_args: list[str], default_config: Path | None = None) -> tuple[list[str], list[str]]:
    """The ``data:`` sections of ``-c`` files (each as ``--config=<YAML>``) and the ``--data.*`` overrides, in their
    order; without any ``-c``, ``default_config`` (the run's config.yaml). Other sections and overrides (``model``,
    ``trainer``, ...) are left out: the model comes from the run. Returns those arguments and notes about what was
    left out."""
    args: list[str] = []
    notes: list[str] = []
    configs: list[str] = []
    i = 0
    given = [a for a in cli_args if a in ("-c", "--config") or a.startswith("--config=")]
    if not given:
        if default_config is None:
            raise AtlasError("no data config: give the data as for fit, e.g. -c experiments/vae_cnn3.yaml -c "
                             "experiments/demo.yaml (a run directory with its config.yaml needs none)")  # fmt: skip
        cli_args = ["-c", str(default_config), *cli_args]
        notes.append(f"data from {default_config}")
    while i < len(cli_args):
        arg = cli_args[i]
        if arg in ("-c", "--config") or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else (cli_args[i + 1] if i + 1 < len(cli_args) else None)
            i += 1 if "=" in arg else 2
            if value is None:
                raise AtlasError(f"{arg} needs a config file")
            section = _data_section(value)
            if section is not None:
                args.append("--config=" + yaml.safe_dump({"data": section}, sort_keys=False))
                configs.append(value)
            continue
        key = arg.split("=", 1)[0]
        takes_value = "=" not in arg and i + 1 < len(cli_args) and not cli_args[i + 1].startswith("--")
        if key == "--data" or key.startswith("--data."):
            args += cli_args[i : i + 1 + takes_value]
        else:
            notes.append(f"left out {' '.join(cli_args[i : i + 1 + takes_value])} (the atlas reads only data)")
        i += 1 + takes_value
    if not configs and not any(a.startswith("--data") for a in args):
        raise AtlasError(f"none of {', '.join(given or [str(default_config)])} has a data: section; add the data "
                         "config, e.g. -c experiments/demo.yaml")  # fmt: skip
    return args, notes


def load_datamodule(cli_args: list[str], default_config: Path | None = None) -> tuple[Any, list[str]]:
    """The data module of the ``data:`` sections of ``-c`` files and ``--data.*`` overrides, composed as
    ``spherinator fit`` composes them; without any ``-c``, ``default_config`` (the run's config.yaml).

    Other sections and overrides (``model``, ``trainer``, ...) are left out: the model comes from the run. Returns
    the data module and notes about what was left out.
    """
    from jsonargparse import Namespace
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningArgumentParser

    args, notes = compose_data_args(cli_args, default_config)
    parser = LightningArgumentParser(exit_on_error=False, prog="spherinator atlas")
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True, required=True)
    parser.add_argument("--config", action="config")
    config = parser.parse_args(args)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    data = instantiate(config).data
    if isinstance(data, Namespace):
        raise AtlasError("the data: section names no class_path; use e.g. class_path: spherinator.data.DataModule")
    return data, notes


def _data_section(value: str) -> Any:
    """The ``data:`` section of a ``-c`` value: a YAML file, or YAML text given inline."""
    if Path(value).is_file():
        text = Path(value).read_text()
    elif "\n" in value or ":" in value:
        text = value
    else:
        raise AtlasError(f"-c {value}: no such file; give the data config as for fit, e.g. -c experiments/demo.yaml")
    from spherinator.config import load_yaml

    try:  # as fit reads it: a key given twice or a number with a leading zero is refused
        content = load_yaml(text, f"-c {value}")
    except ConfigError as err:
        raise AtlasError(str(err)) from err
    if not isinstance(content, dict):
        raise AtlasError(f"-c {value}: not a config file (a YAML mapping of sections such as data:)")
    return content.get("data")


def open_data(cli_args: list[str], default_config: Path | None, numpy_only: bool) -> tuple[Any, list[str]]:
    """The rows the catalog encodes, from ``-c`` files and ``--data.*`` overrides as for ``spherinator fit``
    (without any ``-c``: ``default_config``), and notes. With ``numpy_only`` (an encoder run by onnxruntime) a plain
    DataModule section is read by :class:`ParquetRows` without torch; anything else is the data module ``fit``
    builds (:func:`load_datamodule`), with a note saying why when ``numpy_only``."""
    if numpy_only:
        args, notes = compose_data_args(cli_args, default_config)
        init, why = plain_section(args)
        if init is not None:
            return ParquetRows(**init), notes
        datamodule, notes = load_datamodule(cli_args, default_config)
        return datamodule, [*notes, f"the data are read with torch: {why}"]
    return load_datamodule(cli_args, default_config)


@dataclass(frozen=True)
class Embeddings:
    """``spherinator-submit predict``'s embedding shards, checked against their manifest (:func:`open_embeddings`).

    Attributes:
        directory: The shards' directory (``<run>/embeddings``).
        shards: Their files, in order of row ids.
        rows: Rows over all shards (row ids ``0 .. rows - 1``).
        row_column: The shards' row id column.
        made_by: The checkpoint and ONNX export the manifest says embedded the rows (those it names).
    """

    directory: Path
    shards: list[Path]
    rows: int
    row_column: str
    made_by: tuple[str, ...] = ()


def open_embeddings(path: str | Path) -> Embeddings:
    """The embedding shards of a ``spherinator-submit predict`` run directory (or of its ``embeddings/``), every
    shard written and holding the rows its manifest (``_manifest.json``) says; read from the footers only.

    Raises:
        AtlasError: no such directory, no manifest, a shard missing or not of the rows or columns the manifest says.
    """
    import pyarrow.parquet as pq

    from spherinator.submit.predict import EMBEDDINGS_DIR
    from spherinator.submit.records import EMBEDDING_SET_NAME, read_embedding_set
    from spherinator.submit.sweep import SubmitError

    given = Path(path)
    if not given.is_dir():
        raise AtlasError(f"--embeddings {given}: no such directory; give the run directory of spherinator-submit "
                         "predict (or its embeddings/)")  # fmt: skip
    directory = given / EMBEDDINGS_DIR if (given / EMBEDDINGS_DIR / EMBEDDING_SET_NAME).is_file() else given
    if not (directory / EMBEDDING_SET_NAME).is_file():
        raise AtlasError(f"--embeddings {given} holds no {EMBEDDINGS_DIR}/{EMBEDDING_SET_NAME}; give the run "
                         "directory of spherinator-submit predict (its embeddings/ holds the manifest)")  # fmt: skip
    try:
        manifest = read_embedding_set(directory)
    except SubmitError as err:
        raise AtlasError(f"--embeddings {given}: {err}") from err
    missing = [shard.file for shard in manifest.shards if not (directory / shard.file).is_file()]
    if missing:
        raise AtlasError(f"--embeddings {given}: {len(missing)} of {len(manifest.shards)} shards are not written yet "
                         f"(first: {missing[0]}); wait for the tasks, or resubmit them with spherinator-submit "
                         "--resume")  # fmt: skip
    if not manifest.shards or not sum(shard.rows for shard in manifest.shards):
        raise AtlasError(f"--embeddings {given}: {EMBEDDING_SET_NAME} lists no rows; embed the data first "
                         "(spherinator-submit predict)")  # fmt: skip
    for shard in manifest.shards:
        try:
            meta = pq.ParquetFile(directory / shard.file).metadata
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise AtlasError(f"--embeddings {given}: {shard.file} is no Parquet file ({err}); remove it and "
                             "spherinator-submit --resume the run to write it again") from err  # fmt: skip
        schema = meta.schema.to_arrow_schema()
        names = set(schema.names)
        if "location" in names:
            check_location_type(schema.field("location").type, f"--embeddings {given}: {shard.file}")
        if meta.num_rows != shard.rows or not {"location", manifest.row_column} <= names:
            found = f"{meta.num_rows} rows" if meta.num_rows != shard.rows else f"no location or {manifest.row_column}"
            raise AtlasError(f"--embeddings {given}: {shard.file} holds {found}, but {EMBEDDING_SET_NAME} says "
                             f"{shard.rows} rows of location and {manifest.row_column}; remove the shard and "
                             "spherinator-submit --resume the run to write it again")  # fmt: skip
    shards = [directory / shard.file for shard in manifest.shards]
    made_by = tuple(p for p in (manifest.checkpoint, manifest.onnx) if p)
    return Embeddings(directory, shards, sum(shard.rows for shard in manifest.shards), manifest.row_column, made_by)


def check_location_type(type_: Any, where: str) -> None:
    """Refuse a ``location`` column that is no list of numbers, or of fixed size other than 3 (an embedding of a
    model whose latent space is not S^2), in one line naming ``where``."""
    import pyarrow as pa

    is_list = pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_)
    value = type_.value_type if is_list else None
    if value is None or not (pa.types.is_floating(value) or pa.types.is_integer(value)):
        raise AtlasError(f"{where}: its location column is {type_}, not a list of 3 numbers per row; give the "
                         "embeddings spherinator-submit predict wrote")  # fmt: skip
    if pa.types.is_fixed_size_list(type_) and type_.list_size != 3:
        raise AtlasError(f"{where}: its locations are {type_.list_size}-d, but the atlas maps the sphere S^2 (z_dim "
                         "3); give the embeddings of a model with z_dim 3 (the atlas's model)")  # fmt: skip
