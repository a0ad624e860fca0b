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
buffers where possible); :func:`to_tensor` turns it into the tensor the model sees.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

SHAPE_SUFFIX = "_shape"
DTYPE_SUFFIX = "_dtype"


class DataError(ValueError):
    """A dataset that cannot be read as asked; the message names the value and the fix."""


def shape_key(column: str) -> bytes:
    """The schema-metadata key that holds a column's per-row shape."""
    return f"{column}{SHAPE_SUFFIX}".encode()


def dtype_key(column: str) -> bytes:
    """The schema-metadata key that holds a column's dtype (fast layout)."""
    return f"{column}{DTYPE_SUFFIX}".encode()


def format_shape(shape: tuple[int, ...]) -> bytes:
    """``(3, 32, 32)`` -> ``b"(3,32,32)"``, the form the metadata uses."""
    return ("(" + ",".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")").encode()


def parse_shape(raw: bytes | str, column: str, where: str) -> tuple[int, ...]:
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


def parse_dtype(raw: bytes | str, column: str, where: str) -> np.dtype:
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
    def detect(cls, field: pa.Field, metadata: dict[bytes, bytes] | None, where: str) -> ColumnLayout:
        """Work out the layout of ``field`` from its type and the schema metadata of the file at ``where``."""
        name, type_ = field.name, field.type
        metadata = metadata or {}
        raw_shape, raw_dtype = metadata.get(shape_key(name)), metadata.get(dtype_key(name))
        shape = parse_shape(raw_shape, name, where) if raw_shape is not None else None
        dtype = parse_dtype(raw_dtype, name, where) if raw_dtype is not None else None

        if isinstance(type_, pa.FixedShapeTensorType):
            return cls(name, "tensor", tuple(type_.shape), np.dtype(type_.value_type.to_pandas_dtype()))

        if pa.types.is_fixed_size_binary(type_) or pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
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

    # -- decoding ------------------------------------------------------------------------------------------------

    def decode(self, column: pa.ChunkedArray | pa.Array, where: str, first_row: int = 0) -> np.ndarray:
        """One record batch of this column as a numpy array ``(N, *shape)`` (a view of Arrow memory if possible).

        ``where`` names the file and row group for error messages, ``first_row`` the row of it the batch starts at.
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

    def _decode_array(self, arr: pa.Array, where: str, first_row: int = 0) -> np.ndarray:
        if arr.null_count:
            first = first_row + int(np.flatnonzero(~np.asarray(arr.is_valid()))[0])
            raise DataError(
                f"{where}: column {self.name!r} has {arr.null_count} null rows (first: row {first}); "
                f"remove those rows or fill them before training"
            )
        if self.kind == "raw":
            return self._decode_raw(arr, where)
        if self.kind == "list":
            return self._decode_list(arr, where)
        if self.kind == "tensor":
            return arr.to_numpy_ndarray()
        if self.kind == "encoded":
            return decode_images(arr, self.name, where)
        return arr.to_numpy(zero_copy_only=False)

    def _decode_raw(self, arr: pa.Array, where: str) -> np.ndarray:
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
                    f"{where}: column {self.name!r} row {int(bad[0])} holds {int(lengths[bad[0]])} bytes, but shape "
                    f"{self.shape} of {self.dtype} needs {per_row} ({bad.size} rows differ); fix the "
                    f"{self.name}_shape/{self.name}_dtype metadata or re-write the column"
                )
            data = arr.buffers()[2]
            start = int(offsets[0]) if n else 0
        flat = np.frombuffer(data, dtype=self.dtype, count=n * per_row // self.dtype.itemsize, offset=start)
        return flat.reshape(n, *self.shape)

    def _decode_list(self, arr: pa.Array, where: str) -> np.ndarray:
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


FLOAT32_MAX = float(np.finfo(np.float32).max)
INT64_MAX = np.iinfo(np.int64).max


def check_values(array: np.ndarray, layout: ColumnLayout, where: str, first_row: int = 0) -> None:
    """Raise a DataError naming the column, the place and the first bad row when the values of one decoded record
    batch cannot reach the model as they are.

    Floating array columns must be finite, and within float32 (what the model computes in) when stored wider: a NaN
    would otherwise surface mid-epoch as an error about the Power Spherical ``loc``, or train on as NaN weights.
    uint64 scalars must fit int64 (they would wrap to negative ids). ``first_row``: the row of the row group at
    which ``array`` starts. Floating scalar columns (catalogue values such as a redshift) may hold NaN for missing.
    """
    kind = array.dtype.kind
    if not array.size or kind not in "fu":
        return
    if kind == "u":
        if array.dtype.itemsize == 8 and not layout.is_tensor and array.max() > INT64_MAX:
            row = int(np.flatnonzero(array > INT64_MAX)[0])
            raise DataError(
                f"{where}: column {layout.name!r} row {first_row + row} holds {int(array[row])}, beyond int64 (the "
                f"dtype integer columns become); store it as int64 (e.g. ids below 2**63) or leave it out of `columns`"
            )
        return
    if not layout.is_tensor:
        return
    if array.dtype.isnative and array.dtype.itemsize <= 4:
        # a finite sum means finite values (one NaN or inf makes it NaN or inf); torch sums 2x faster than numpy's
        # min and max (measured in tools/bench/bench_data.py --float32); an overflowing sum is checked below
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only view of Arrow memory, only read here
            if math.isfinite(float(torch.from_numpy(array).sum(dtype=torch.float32))):
                return
    elif float(array.min()) >= -FLOAT32_MAX and float(array.max()) <= FLOAT32_MAX:  # NaN fails both
        return
    flat = array.reshape(len(array), -1)
    bad = ~np.isfinite(flat)
    wide = not bad.any()  # finite, but beyond float32 (or only the sum overflowed)
    if wide:
        bad = np.abs(flat) > FLOAT32_MAX
    rows = np.flatnonzero(bad.any(axis=1))
    if not rows.size:
        return
    value = float(flat[rows[0]][bad[rows[0]]][0])
    what = f"{value:g} (beyond float32, which the model computes in)" if wide else f"{value:g}"
    fix = "rescale the column" if wide else "drop or repair those rows (e.g. np.nan_to_num) before training"
    raise DataError(
        f"{where}: column {layout.name!r} row {first_row + int(rows[0])} holds {what}, and {rows.size} of the "
        f"{len(array)} rows read there hold such values; {fix}"
    )


def decode_images(arr: pa.Array, name: str, where: str) -> np.ndarray:
    """Decode PNG/JPEG bytes (or HF ``{bytes, path}`` structs) into one uint8 array ``(N, C, H, W)``."""
    from torchvision.io import ImageReadMode, decode_image

    if pa.types.is_struct(arr.type):
        paths = arr.field("path").to_pylist() if arr.type.get_field_index("path") >= 0 else [None] * len(arr)
        blobs = arr.field("bytes").to_pylist()
        base = Path(where.split(" row group")[0]).parent
        for i, (blob, path) in enumerate(zip(blobs, paths, strict=True)):
            if blob is None:
                if path is None:
                    raise DataError(f"{where}: column {name!r} row {i} has neither bytes nor a path")
                file = Path(path) if Path(path).is_absolute() else base / path
                try:
                    blobs[i] = file.read_bytes()
                except OSError as err:
                    raise DataError(
                        f"{where}: column {name!r} row {i} points to {file}, which cannot be read: {err}"
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
                f"{where}: column {name!r} row {i} is not a PNG/JPEG image ({err}); if it holds raw array bytes, "
                f"add {name}_shape and {name}_dtype schema metadata"
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


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when ``shared`` (a DataLoader worker then hands it to the main
    process without the extra copy its pickler makes of ordinary tensors)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


def to_tensor(array: np.ndarray, layout: ColumnLayout, shared: bool = False) -> torch.Tensor | list[str]:
    """The tensor the model sees: arrays of uint8 scaled to float32 in [0, 1], other arrays as float32;
    integer/boolean scalars as int64, floating scalars as float32. Always a new tensor (never a view of Arrow
    memory); in shared memory with ``shared``. A string column becomes a list of ``str``."""
    if layout.kind == "string":
        return array.tolist()
    dtype = torch.float32 if layout.is_tensor or array.dtype.kind == "f" else torch.int64
    out = _empty(array.shape, dtype, shared)
    if array.dtype == np.uint8 and layout.is_tensor:
        return _scale_into(array, out)
    out.numpy()[...] = array
    return out


def _scale_into(array: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """uint8 ``array`` into float32 ``out`` in [0, 1], in one pass (within 1 ulp of x / 255)."""
    np.multiply(array, np.float32(1 / 255), out=out.numpy())
    return out


def uint8_to_float(array: np.ndarray, pin: bool = False) -> torch.Tensor:
    """uint8 array -> new float32 tensor in [0, 1]; in page-locked memory with ``pin`` (it then copies to the
    GPU asynchronously)."""
    return _scale_into(array, torch.empty(array.shape, dtype=torch.float32, pin_memory=pin))


def scale_uint8(
    batch: torch.Tensor | dict[str, torch.Tensor], pin: bool = False
) -> torch.Tensor | dict[str, torch.Tensor]:
    """uint8 tensors of a batch (from workers that send uint8 to move 4x fewer bytes) to float32 in [0, 1]."""
    if isinstance(batch, dict):
        return {name: scale_uint8(tensor, pin) for name, tensor in batch.items()}
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8:  # lists of str pass as they are
        return batch
    return uint8_to_float(batch.numpy(), pin)
