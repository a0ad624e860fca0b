"""Cutting a stream of decoded chunks into batches, with a shuffle buffer: the reader's last step.

:func:`rebatch` works on ``{column: array}`` chunks of any content: :class:`~spherinator.data.reader.ParquetReader`
feeds it decoded row groups (and, through ``into``, the arrays a batch is gathered into, such as a worker's shared
slot), :func:`~spherinator.data.plan.unread_rows` feeds it row numbers to replay which rows each batch held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np


def _rows(chunk: dict[str, np.ndarray]) -> int:
    return len(next(iter(chunk.values())))


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    return {n: np.concatenate([c[n] for c in chunks]) for n in chunks[0]}


def _take_rows(
    chunks: list[dict[str, np.ndarray]], idx: np.ndarray, into: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The rows ``idx`` of ``_concat(chunks)`` per column, in ascending order, without concatenating: each row is
    copied once, into ``into[column]`` where given (an array of ``len(idx)`` rows), else into a new array.

    Ascending, so that the rows of each chunk are one run of the result, copied by one ``np.take`` (a batch drawn
    from a shuffle buffer is a random set of its rows either way): scattering them to random places of the batch
    took twice as long (3x128x128 uint8 rows, batches of 64 drawn from 9 row groups of 128).
    """
    into = into or {}
    idx = np.sort(idx)
    sizes = [_rows(c) for c in chunks]
    starts = np.cumsum([0, *sizes])
    runs = np.searchsorted(idx, starts)  # the rows of chunk c: idx[runs[c]:runs[c + 1]]
    out = {}
    for name, first in chunks[0].items():
        column = into[name] if name in into else np.empty((len(idx), *first.shape[1:]), dtype=first.dtype)
        for c, chunk in enumerate(chunks):
            if runs[c] < runs[c + 1]:
                # mode="clip": the rows are in range; with the default mode numpy copies ``out`` through a buffer
                rows = idx[runs[c] : runs[c + 1]] - starts[c]
                np.take(chunk[name], rows, axis=0, out=column[runs[c] : runs[c + 1]], mode="clip")
        out[name] = column
    return out


def _keep_rows(chunks: list[dict[str, np.ndarray]], idx: np.ndarray) -> dict[str, np.ndarray]:
    """The rows ``idx`` of ``_concat(chunks)`` in the order of ``idx``: the rows a shuffle buffer keeps for its next
    window stay in the order drawn, so that every batch holds the rows it held before batches were gathered in the
    buffer's order (a checkpoint saved mid-epoch is resumed by replaying which rows each batch held; fewer rows than
    one batch, so the second copy costs little)."""
    back = np.argsort(np.argsort(idx))  # where each row of ``idx`` is among the rows gathered in ascending order
    return {name: column[back] for name, column in _take_rows(chunks, idx).items()}


def rebatch(
    chunks: Iterator[dict[str, np.ndarray]],
    sizes: Sequence[int],
    window: int,
    rng: np.random.Generator | None,
    into: Callable[[int], dict[str, np.ndarray]] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Cut a stream of decoded chunks into batches of the given sizes.

    Without ``rng`` batches are slices of the chunks (no copy unless a batch spans two chunks). With ``rng``,
    chunks are buffered until at least ``window`` rows (and one batch) are there; every full batch is then drawn
    from a random permutation of the buffer (a random set of its rows, in the buffer's order; rows copied
    straight from their chunks, into the arrays ``into(rows)`` gives for some columns if it is given) and the few
    rows left over join the next window, in the order drawn.
    """
    pending: list[dict[str, np.ndarray]] = []
    have, k = 0, 0
    while k < len(sizes):
        need = max(window, sizes[k]) if rng is not None else sizes[k]
        while have < need:
            chunk = next(chunks, None)
            if chunk is None:
                break
            if _rows(chunk):
                pending.append(chunk)
                have += _rows(chunk)
        if have < sizes[k]:
            return  # fewer rows than planned: the files changed while reading
        if rng is None:
            if _rows(pending[0]) < sizes[k]:  # the batch spans chunks
                pending = [_concat(pending)]
            head, size = pending[0], sizes[k]
            yield {n: a[:size] for n, a in head.items()}
            if _rows(head) == size:
                pending.pop(0)
            else:
                pending[0] = {n: a[size:] for n, a in head.items()}
            have -= size
            k += 1
            continue
        perm = rng.permutation(have)  # over the rows of ``pending`` in order
        pos = 0
        while k < len(sizes) and have - pos >= sizes[k]:
            yield _take_rows(pending, perm[pos : pos + sizes[k]], into(sizes[k]) if into is not None else None)
            pos += sizes[k]
            k += 1
        rest = perm[pos:]
        pending = [_keep_rows(pending, rest)] if rest.size else []
        have = rest.size
