"""Tensor layouts in Parquet: how a column stores one array per row, and how to read a record batch of it at once.

Layouts understood (detected from the Arrow field type and the schema metadata):

- ``raw`` (the fast layout, written by :mod:`spherinator.data.writer`): a ``fixed_size_binary`` (or ``binary``)
  column holding the C-order bytes of each row's array; the schema metadata carries ``<column>_shape``
  (e.g. ``b"(3,128,128)"``) and ``<column>_dtype`` (e.g. ``b"uint8"``). Reading is a memcpy.
- ``list``: list / large list / fixed-size list columns, possibly nested, with ``<column>_shape`` metadata
  (how existing Spherinator datasets are written), or without it when every row has the same lengths.
- ``tensor``: Arrow's canonical ``fixed_shape_tensor`` extension type.
- ``encoded``: PNG/JPEG bytes in a ``binary`` column without shape/dtype metadata, or the ``{bytes, path}`` struct
  Hugging Face datasets writes; decoded with torchvision (one call per image: they are compressed one by one).
- ``scalar``: integer, floating or boolean columns (e.g. ``id``, or generating parameters).
- ``string``: string columns (e.g. survey object names), read only when named in ``columns``; a batch holds them as
  a list of Python ``str``, never as a tensor, so they cannot be the model input.

Every decoder returns one numpy array ``(N, *shape)`` per record batch in the stored dtype (a view of the Arrow
buffers where possible). Errors name the place they were found by a :class:`Where` value (file and row group).
Turning arrays into the tensors the model sees is :mod:`spherinator.data.transport`'s business.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from spherinator.errors import DataError  # noqa: F401 (re-exported)

SHAPE_SUFFIX = "_shape"
DTYPE_SUFFIX = "_dtype"


@dataclass(frozen=True)
class Where:
    """A place in a dataset that an error names: a file, and the row group of it when one was being read."""

    file: Path
    group: int | None = None

    def __str__(self) -> str:
        return str(self.file) if self.group is None else f"{self.file} row group {self.group}"


def shape_key(column: str) -> bytes:
    """The schema-metadata key that holds a column's per-row shape."""
    return f"{column}{SHAPE_SUFFIX}".encode()


def dtype_key(column: str) -> bytes:
    """The schema-metadata key that holds a column's dtype (fast layout)."""
    return f"{column}{DTYPE_SUFFIX}".encode()


def format_shape(shape: tuple[int, ...]) -> bytes:
    """``(3, 32, 32)`` -> ``b"(3,32,32)"``, the form the metadata uses."""
    return ("(" + ",".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")").encode()


def parse_shape(raw: bytes | str, column: str, where: Where | str) -> tuple[int, ...]:
    """Parse ``b"(3,32,32)"``, ``b"[3, 32, 32]"``, ``b"3,32,32"`` or ``b"(64,)"`` into a tuple of ints."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    parts = [p for p in re.split(r"[\s,]+", text.strip().strip("()[]").strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise DataError(
            f"{where}: schema metadata {column}{SHAPE_SUFFIX}={text!r} is not a shape; "
            f"write it as positive integers, e.g. b'(3,128,128)'"
        )
    return shape


def parse_dtype(raw: bytes | str, column: str, where: Where | str) -> np.dtype:
    """Parse ``b"uint8"``/``b"float32"``/``b"<f4"`` into a numpy dtype."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        dtype = np.dtype(text)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf":
        raise DataError(
            f"{where}: schema metadata {column}{DTYPE_SUFFIX}={text!r} is not a numeric numpy dtype; "
            f"write one such as b'uint8' or b'float32'"
        )
    return dtype


def _numeric_leaf(type_: pa.DataType) -> pa.DataType | None:
    """The value type under any number of list levels, or None if it is not numeric."""
    while pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_):
        type_ = type_.value_type
    if pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_):
        return type_
    return None


def _is_list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_)


@dataclass(frozen=True)
class ColumnLayout:
    """How one Parquet column stores its per-row arrays.

    Attributes:
        name: Column name.
        kind: ``raw``, ``list``, ``tensor``, ``encoded``, ``scalar`` or ``string`` (see the module docstring).
        shape: Per-row shape when the schema tells it, else None (ragged-free lists without metadata and
            encoded images: known after decoding a batch). ``()`` for scalars and strings.
        dtype: Stored numpy dtype when the schema tells it (None for encoded images).
    """

    name: str
    kind: str
    shape: tuple[int, ...] | None
    dtype: np.dtype | None

    @property
    def is_tensor(self) -> bool:
        """True for array columns (images, spectra, ...), False for per-row scalars and strings."""
        return self.kind not in ("scalar", "string")

    @staticmethod
    def supports(type_: pa.DataType) -> bool:
        """Whether a column of this Arrow type can become a tensor in some layout."""
        if isinstance(type_, pa.FixedShapeTensorType):
            return True
        if pa.types.is_dictionary(type_):  # e.g. pandas categoricals: what counts is the values' type
            return ColumnLayout.supports(type_.value_type)
        if pa.types.is_struct(type_):
            return type_.get_field_index("bytes") >= 0
        if _is_list(type_):
            return _numeric_leaf(type_) is not None
        return (
            _numeric_leaf(type_) is not None
            or pa.types.is_binary(type_)
            or pa.types.is_large_binary(type_)
            or (pa.types.is_fixed_size_binary(type_))
        )

    # -- detection -----------------------------------------------------------------------------------------------

    @classmethod
    def detect(cls, field: pa.Field, metadata: dict[bytes, bytes] | None, where: Where) -> ColumnLayout:
        """Work out the layout of ``field`` from its type and the schema metadata of the file at ``where``."""
        name, type_ = field.name, field.type
        if pa.types.is_dictionary(type_):  # pandas categoricals (object names, labels): read as their values
            type_ = type_.value_type
        metadata = metadata or {}
        raw_shape, raw_dtype = metadata.get(shape_key(name)), metadata.get(dtype_key(name))
        shape = parse_shape(raw_shape, name, where) if raw_shape is not None else None
        dtype = parse_dtype(raw_dtype, name, where) if raw_dtype is not None else None

        if isinstance(type_, pa.FixedShapeTensorType):
            return cls(name, "tensor", tuple(type_.shape), np.dtype(type_.value_type.to_pandas_dtype()))

        if pa.types.is_fixed_size_binary(type_) or pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
            return cls._detect_bytes(name, type_, shape, dtype, where)

        if _is_list(type_):
            leaf = _numeric_leaf(type_)
            if leaf is None:
                raise DataError(
                    f"{where}: column {name!r} is a list of {type_} values, which cannot become a tensor; "
                    f"store numbers (integers or floats)"
                )
            if shape is None:
                # Fixed-size lists all the way down give their shape in the type itself.
                dims, t = [], type_
                while pa.types.is_fixed_size_list(t):
                    dims.append(t.list_size)
                    t = t.value_type
                if not _is_list(t):
                    shape = tuple(dims)
            return cls(name, "list", shape, np.dtype(leaf.to_pandas_dtype()))

        if pa.types.is_struct(type_) and type_.get_field_index("bytes") >= 0:
            return cls(name, "encoded", None, None)

        if pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_):
            return cls(name, "scalar", (), np.dtype(type_.to_pandas_dtype()))

        if pa.types.is_string(type_) or pa.types.is_large_string(type_):
            return cls(name, "string", (), np.dtype(object))

        raise DataError(
            f"{where}: column {name!r} has type {type_}, which spherinator cannot turn into a tensor; "
            f"drop it from `columns` or store it as numbers, strings, lists of numbers or raw array bytes"
        )

    @classmethod
    def _detect_bytes(
        cls, name: str, type_: pa.DataType, shape: tuple[int, ...] | None, dtype: np.dtype | None, where: Where
    ) -> ColumnLayout:
        """A binary column: encoded images, or raw array bytes described by shape and dtype metadata."""
        fixed = pa.types.is_fixed_size_binary(type_)
        if shape is None and dtype is None and not fixed:
            return cls(name, "encoded", None, None)
        missing = [k.decode() for k, v in ((shape_key(name), shape), (dtype_key(name), dtype)) if v is None]
        if missing:
            raise DataError(
                f"{where}: column {name!r} stores raw array bytes ({type_}) but the schema metadata lacks "
                f"{' and '.join(missing)}; every row group needs both to be read. Re-write the file with "
                f"spherinator.data.writer (or tools/make_dataset.py convert), which records them"
            )
        if fixed:
            expected = math.prod(shape) * dtype.itemsize
            if type_.byte_width != expected:
                raise DataError(
                    f"{where}: column {name!r} holds {type_.byte_width} bytes per row in every row group, but "
                    f"shape {shape} of {dtype} needs {expected}; fix the {name}_shape/{name}_dtype metadata "
                    f"or re-write the column"
                )
        return cls(name, "raw", shape, dtype)

    # -- decoding ------------------------------------------------------------------------------------------------

    def decode(self, column: pa.ChunkedArray | pa.Array, where: Where, first_row: int = 0) -> np.ndarray:
        """One record batch of this column as a numpy array ``(N, *shape)`` (a view of Arrow memory if possible).

        ``where``: the file and row group, for error messages; ``first_row``: the row of it the batch starts at.
        """
        if isinstance(column, pa.ChunkedArray):
            chunks = column.chunks
            if len(chunks) == 1:
                return self._decode_array(chunks[0], where, first_row)
            if not chunks:
                return self._decode_array(pa.array([], type=column.type), where, first_row)
            starts = np.cumsum([0] + [len(c) for c in chunks]) + first_row
            return np.concatenate([self._decode_array(c, where, int(a)) for c, a in zip(chunks, starts, strict=False)])
        return self._decode_array(column, where, first_row)

    def _decode_array(self, arr: pa.Array, where: Where, first_row: int = 0) -> np.ndarray:
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if arr.null_count and self.kind == "scalar" and pa.types.is_floating(arr.type):
            # a missing catalogue value (a redshift) may be a null as well as a NaN: both read as NaN
            return arr.to_numpy(zero_copy_only=False)
        if arr.null_count:
            first = first_row + int(np.flatnonzero(~np.asarray(arr.is_valid()))[0])
            raise DataError(
                f"{where}: column {self.name!r} has {arr.null_count} null rows (first: row {first}); "
                f"remove those rows or fill them before training"
            )
        if self.kind == "raw":
            return self._decode_raw(arr, where, first_row)
        if self.kind == "list":
            return self._decode_list(arr, where)
        if self.kind == "tensor":
            return arr.to_numpy_ndarray()
        if self.kind == "encoded":
            return decode_images(arr, self.name, where, first_row)
        return arr.to_numpy(zero_copy_only=False)

    def _decode_raw(self, arr: pa.Array, where: Where, first_row: int) -> np.ndarray:
        n, per_row = len(arr), math.prod(self.shape) * self.dtype.itemsize
        if pa.types.is_fixed_size_binary(arr.type):
            data = arr.buffers()[1]
            start = arr.offset * per_row
        else:
            offset_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
            offsets = np.frombuffer(arr.buffers()[1], dtype=offset_type)[arr.offset : arr.offset + n + 1]
            lengths = np.diff(offsets)
            bad = np.flatnonzero(lengths != per_row)
            if bad.size:
                raise DataError(
                    f"{where}: column {self.name!r} row {first_row + int(bad[0])} holds {int(lengths[bad[0]])} bytes, "
                    f"but shape {self.shape} of {self.dtype} needs {per_row} ({bad.size} rows differ); fix the "
                    f"{self.name}_shape/{self.name}_dtype metadata or re-write the column"
                )
            data = arr.buffers()[2]
            start = int(offsets[0]) if n else 0
        flat = np.frombuffer(data, dtype=self.dtype, count=n * per_row // self.dtype.itemsize, offset=start)
        return flat.reshape(n, *self.shape)

    def _decode_list(self, arr: pa.Array, where: Where) -> np.ndarray:
        n, dims = len(arr), []
        while _is_list(arr.type):
            if pa.types.is_fixed_size_list(arr.type):
                dims.append(arr.type.list_size)
            else:
                offset_type = np.int64 if pa.types.is_large_list(arr.type) else np.int32
                offsets = np.frombuffer(arr.buffers()[1], dtype=offset_type)[arr.offset : arr.offset + len(arr) + 1]
                lengths = np.diff(offsets)
                if lengths.size and (lengths != lengths[0]).any():
                    lo, hi = int(lengths.min()), int(lengths.max())
                    if self.shape is None:
                        raise DataError(
                            f"{where}: column {self.name!r} is a ragged list (lengths {lo}..{hi} at nesting level "
                            f"{len(dims)}) and the schema has no {self.name}_shape metadata; store equal-length "
                            f"rows (pad or resample them) and record the shape, e.g. b'(1,4096)'"
                        )
                    raise DataError(
                        f"{where}: column {self.name!r} has rows of {lo}..{hi} values at nesting level "
                        f"{len(dims)}, which does not match the shape metadata {self.shape}; fix the metadata or "
                        f"the data so every row holds {math.prod(self.shape)} values"
                    )
                dims.append(int(lengths[0]) if lengths.size else 0)
            arr = arr.flatten()
            if arr.null_count:
                raise DataError(
                    f"{where}: column {self.name!r} has {arr.null_count} null values inside its lists; "
                    f"fill them before training"
                )
        values = arr.to_numpy(zero_copy_only=False)
        if self.shape is not None:
            if n and (values.size != n * math.prod(self.shape)):
                raise DataError(
                    f"{where}: column {self.name!r} has {values.size // n} values per row, but its shape "
                    f"metadata {self.shape} needs {math.prod(self.shape)}; fix the {self.name}_shape metadata"
                )
            return values.reshape(n, *self.shape)
        return values.reshape(n, *dims)


def decode_images(arr: pa.Array, name: str, where: Where, first_row: int = 0) -> np.ndarray:
    """Decode PNG/JPEG bytes (or HF ``{bytes, path}`` structs) into one uint8 array ``(N, C, H, W)``; a relative
    ``path`` is found beside the Parquet file."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    if pa.types.is_struct(arr.type):
        paths = arr.field("path").to_pylist() if arr.type.get_field_index("path") >= 0 else [None] * len(arr)
        blobs = arr.field("bytes").to_pylist()
        base = where.file.parent
        for i, (blob, path) in enumerate(zip(blobs, paths, strict=True)):
            if blob is None:
                if path is None:
                    raise DataError(f"{where}: column {name!r} row {first_row + i} has neither bytes nor a path")
                file = Path(path) if Path(path).is_absolute() else base / path
                try:
                    blobs[i] = file.read_bytes()
                except OSError as err:
                    raise DataError(
                        f"{where}: column {name!r} row {first_row + i} points to {file}, which cannot be read: {err}"
                    ) from err
    else:
        blobs = arr.to_pylist()
    images = []
    for i, blob in enumerate(blobs):
        try:
            with warnings.catch_warnings():  # torchvision 0.29 announces a move of its decoders to torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8), ImageReadMode.UNCHANGED)
            images.append(image)
        except RuntimeError as err:
            raise DataError(
                f"{where}: column {name!r} row {first_row + i} is not a PNG/JPEG image ({err}); if it holds raw array "
                f"bytes, add {name}_shape and {name}_dtype schema metadata"
            ) from err
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise DataError(
            f"{where}: column {name!r} holds images of different shapes {sorted(shapes)}; make them one size, e.g. "
            f"`python tools/make_dataset.py convert --size 128 ...`"
        )
    if not images:
        return np.zeros((0, 0, 0, 0), dtype=np.uint8)
    return torch.stack(images).numpy()
