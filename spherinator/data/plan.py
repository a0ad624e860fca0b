"""Which rows an epoch reads, in which order, and how they are cut into batches: pure functions of row counts.

:func:`split_rows` cuts the rows of a dataset into train/val/test :class:`Segment` lists. :func:`shard` plans one
epoch for one (rank, worker): which rows it reads and the sizes of the batches it yields, such that every row is
read exactly once per epoch and every rank yields the same number of batches; :func:`pass_plan` is the one way a
pass over an epoch's rows is sharded, for the reader and for :func:`unread_rows`, which replays a pass on row
numbers alone (with the reader's own :func:`~spherinator.data.batching.rebatch`) to tell which rows of an epoch a
loader had not handed out (a run resumed mid-epoch).

Nothing here reads a file or touches memory it did not allocate: :mod:`spherinator.data.reader` executes the plans.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spherinator.data.batching import rebatch


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of row group ``group`` of file number ``file`` of a :class:`ParquetIndex`."""

    file: int
    group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        """Number of rows in the segment."""
        return self.stop - self.start


def split_rows(
    groups: Sequence[tuple[int, int, int]], fractions: dict[str, float], seed: int
) -> dict[str, list[Segment]]:
    """Cut all rows into named splits of exact sizes (``round(fraction * rows)``; the rest goes to ``"train"``).

    Row groups are taken in a seeded random order, so a split is a random set of whole row groups plus at most one
    part of a row group at each boundary: cheap to stream, the same for the same seed. Within a split, segments
    keep file order.
    """
    total = sum(rows for _, _, rows in groups)
    names = [*fractions, "train"]
    bounds = np.cumsum([0] + [round(fractions[n] * total) for n in fractions] + [total])  # split i: [b_i, b_i+1)
    bounds[-1] = max(bounds[-1], bounds[-2])
    splits: dict[str, list[Segment]] = {name: [] for name in names}
    pos = 0
    for gi in np.random.default_rng(seed).permutation(len(groups)):
        file, group, rows = groups[gi]
        for name, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True):
            a, b = max(lo, pos), min(hi, pos + rows)
            if a < b:
                splits[name].append(Segment(file, group, int(a - pos), int(b - pos)))
        pos += rows
    for segments in splits.values():
        segments.sort(key=lambda s: (s.file, s.group, s.start))
    return splits


def rank_batch_sizes(rows: int, world: int, batch_size: int, drop_last: bool) -> list[list[int]]:
    """Batch sizes for each rank, such that every rank yields the same number of batches.

    With ``drop_last`` every batch is full and up to ``world * batch_size - 1`` rows are left out. Without it
    every row is used once: rank ``r`` gets ``rows // world`` (+1 for the first ``rows % world`` ranks) rows in
    ``ceil(rows / (world * batch_size))`` batches, full ones first and the shortfall spread over its last
    batches. Only when a rank has fewer rows than batches (fewer rows than ranks, or ``batch_size=1``) are
    rows repeated from the start of the epoch to fill its batches, as ``DistributedSampler`` does.
    """
    if drop_last:
        return [[batch_size] * (rows // (world * batch_size))] * world
    nb = math.ceil(rows / (world * batch_size))
    plans = []
    for r in range(world):
        have = max(rows // world + (r < rows % world), nb)
        excess = nb * batch_size - have
        sizes = [batch_size] * nb
        if excess:
            k = math.ceil(excess / (batch_size - 1))  # last k batches shrink, each keeps >= 1 row
            cut = np.full(k, excess // k) + (np.arange(k) < excess % k)
            for j in range(k):
                sizes[nb - k + j] -= int(cut[j])
        plans.append(sizes)
    return plans


def shard(
    segments: Sequence[Segment],
    *,
    batch_size: int,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = False,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    drop_last: bool = False,
    interleave: bool = False,
) -> tuple[list[Segment], list[int]]:
    """Plan one epoch for one (rank, worker): the segments it reads, in order, and its batch sizes.

    The segments are put in a seeded per-epoch order (the same on every rank), concatenated into one stream of
    rows, and the stream is cut into one contiguous span per rank and, within it, per worker; so a row group is
    read by one (rank, worker), or by two when a span boundary falls inside it. With ``interleave`` the rank's
    batches are dealt to its workers in turn instead, which keeps the stream order through a DataLoader.
    """
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"rank {rank}/{world_size} or worker {worker}/{num_workers} out of range")
    order = epoch_order(segments, epoch, seed, shuffle)
    ends = np.cumsum([s.rows for s in order])
    total = int(ends[-1]) if len(ends) else 0
    plans = rank_batch_sizes(total, world_size, batch_size, drop_last)
    # rank r's rows start after the rows the earlier ranks use (without repeats)
    start = sum(min(sum(p), total // world_size + (r < total % world_size)) for r, p in enumerate(plans[:rank]))
    mine = plans[rank]
    if interleave:
        # Batch j goes to worker j % num_workers: the DataLoader takes batches from its workers in turn, so the
        # rank's batches come out in stream order (each worker then reads the row groups its batches touch).
        offsets = np.concatenate([[0], np.cumsum(mine)]).astype(int) + start
        picks = range(worker, len(mine), num_workers)
        return [s for j in picks for s in _take(order, ends, int(offsets[j]), mine[j])], [mine[j] for j in picks]
    lo, hi = len(mine) * worker // num_workers, len(mine) * (worker + 1) // num_workers
    start += sum(mine[:lo])
    sizes = mine[lo:hi]
    return _take(order, ends, start, sum(sizes)), sizes


def pass_plan(
    order: Sequence[Segment],
    batch_size: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    *,
    drop_last: bool,
    shuffle: bool,
) -> tuple[list[Segment], list[int]]:
    """The segments one (rank, worker) reads in one pass over ``order`` (segments already in the pass's order) and
    its batch sizes. The reader reads by it and :func:`unread_rows` replays it: one function, so that a resume cannot
    drift from what was read. Unshuffled, a rank's batches are dealt to its workers in turn, which keeps the file
    order through a DataLoader; shuffled, each worker reads one contiguous span (fewer row groups read twice)."""
    where = {"rank": rank, "world_size": world_size, "worker": worker, "num_workers": num_workers}
    return shard(order, batch_size=batch_size, **where, drop_last=drop_last, interleave=not shuffle)


def epoch_order(segments: Sequence[Segment], epoch: int, seed: int, shuffle: bool) -> list[Segment]:
    """The segments in the order an epoch reads them: a seeded permutation per epoch with ``shuffle``."""
    order = list(segments)
    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(len(order))
        order = [order[i] for i in perm]
    return order


def _take(order: Sequence[Segment], ends: np.ndarray, start: int, count: int) -> list[Segment]:
    """Rows ``[start, start + count)`` of the stream ``order`` as segments, wrapping around past its end.

    ``ends`` is ``np.cumsum`` of the segments' row counts (a binary search finds the first segment).
    """
    out: list[Segment] = []
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        return out
    start %= total
    i = int(np.searchsorted(ends, start, side="right"))
    while count > 0:
        s = order[i]
        a = s.start + start - (int(ends[i]) - s.rows)
        b = min(s.stop, a + count)
        out.append(Segment(s.file, s.group, a, b))
        count -= b - a
        start = int(ends[i]) % total
        i = (i + 1) % len(order)
    return out


@dataclass(frozen=True)
class Pass:
    """One pass of a training loader over an epoch, or over the rest of one (a run resumed mid-epoch), as the
    loader's state records it: how it cut the rows into batches and how many batches it had handed out."""

    batch_size: int
    num_workers: int
    world_size: int
    shuffle_buffer: int
    batches: int


def pass_rng(seed: int, epoch: int, rank: int, worker: int, pass_index: int) -> np.random.Generator:
    """The shuffle buffer's generator of one (rank, worker) in one pass (pass 0: the epoch as a whole)."""
    return np.random.default_rng([seed, epoch, rank, worker, 1, *([pass_index] if pass_index else [])])


def taken_per_worker(lengths: Sequence[int], batches: int) -> list[int]:
    """Batches taken from each worker when a DataLoader has handed out ``batches``: it takes them from its workers
    in turn, passing over the workers that have none left."""
    taken = [0] * len(lengths)
    while batches > 0 and any(t < n for t, n in zip(taken, lengths, strict=True)):
        for w, n in enumerate(lengths):
            if batches > 0 and taken[w] < n:
                taken[w] += 1
                batches -= 1
    return taken


def unread_rows(
    segments: Sequence[Segment], passes: Sequence[Pass], *, epoch: int, seed: int, shuffle: bool, drop_last: bool
) -> list[Segment]:
    """The rows of one epoch that ``passes`` had not handed out in a batch, in the epoch's order.

    Pass 0 reads the epoch's ``segments``; each later pass reads the rows the passes before it left. A pass is
    replayed on row numbers alone, for every rank and worker it had: which rows a batch holds is a function of the
    seed, the epoch and the sizes (of batches, row groups and the shuffle buffer), never of the values. So the rows
    left are exact whatever batch size, workers or ranks the resumed run has; with a shuffle buffer they are not
    the tail of the epoch's order (the buffer mixes rows from up to ``shuffle_buffer`` rows ahead).
    """
    order = epoch_order(segments, epoch, seed, shuffle)
    # row r of segment s is row base[s] + r of one numbering of this split's rows
    base, total = {}, 0
    for seg in order:
        base[(seg.file, seg.group)] = total - seg.start
        total += seg.rows
    for index, step in enumerate(passes):
        if step.batches <= 0:
            continue
        seen = [np.zeros(0, dtype=np.int64)]
        workers = max(step.num_workers, 1)
        window = step.shuffle_buffer if shuffle else 0
        for rank in range(step.world_size):
            plans = [
                pass_plan(
                    order, step.batch_size, rank, step.world_size, w, workers, drop_last=drop_last, shuffle=shuffle
                )
                for w in range(workers)
            ]
            taken = taken_per_worker([len(sizes) for _, sizes in plans], step.batches)
            for w, ((segs, sizes), n) in enumerate(zip(plans, taken, strict=True)):
                chunks = ({"row": base[(s.file, s.group)] + np.arange(s.start, s.stop)} for s in segs)
                rng = pass_rng(seed, epoch, rank, w, index) if shuffle else None
                seen += [batch["row"] for batch in rebatch(chunks, sizes[:n], window, rng)]
        done = np.zeros(total, dtype=bool)
        done[np.concatenate(seen)] = True
        rest = []
        for seg in order:
            first = base[(seg.file, seg.group)] + seg.start
            keep = np.concatenate([[False], ~done[first : first + seg.rows], [False]])
            edges = np.flatnonzero(np.diff(keep.astype(np.int8)))  # starts and stops of the runs kept
            rest += [
                Segment(seg.file, seg.group, seg.start + int(a), seg.start + int(b)) for a, b in edges.reshape(-1, 2)
            ]
        order = rest
    return order
