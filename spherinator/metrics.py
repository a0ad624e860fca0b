"""Figures of a learned sphere: how much of S^2 it uses, how concentrated the posteriors are, and how much of the
data (labels, per-row columns, neighbourhoods) its positions keep, beside the PCA->S^2 baseline.

Pure functions: numpy arrays in, floats and dicts out. ``sphere_report`` collects them all; ``collapse_warnings``
turns collapsed figures into one-line messages with the fix.

A figure the data cannot define (kNN R^2 of a constant column, kNN accuracy of one class, too few rows with a value)
raises :class:`UndefinedFigure` with the reason rather than returning a number that looks like a result (a constant
column's R^2 would read 1.0); ``sphere_report`` records such a figure as ``None`` with its reason in ``warnings``.
Rows without a value (NaN, None) are left out of a label's or column's figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

SCALE_FLOOR = 1.0  # the encoder's concentration is softplus + 1
# Thresholds of collapse_warnings; the KL of a Power Spherical on S^2 at its floor (scale 1) is 0.19 nats, 0.43 at
# scale 2, 4.7 at scale 300, and telling one of 100 cells apart takes about ln 100 = 4.6 nats.
FLOOR_MARGIN = 0.1  # a scale below floor + this counts as at the floor
KL_NEAR_ZERO = 0.5  # nats per sample
# Coverage below this fraction of a uniform sample's is far below it. Healthy demo runs start in one region and
# spread: most stayed above 0.27 of uniform's validation coverage from the second epoch on, but the shipped demo
# recipe dipped to 0.18-0.24 of it for epochs 2-4 before reaching 0.74, where runs that never spread sat at 0.1-0.2
# of it throughout; so SphereQuality gives coverage alone twice the patience of the other signs.
COVERAGE_FRACTION = 0.25
CLUMP_RESULTANT = 0.8  # mean resultant length above this: one cap of about 10% of the sphere holds the points
# Numbers are class labels when they are whole and take at most this many values (the digits' 10, a morphology
# class); other numbers (a redshift, a flux) are quantities, scored by kNN R^2 instead of accuracy.
MAX_CLASSES = 20


class UndefinedFigure(ValueError):
    """A figure the data cannot define (a constant column, one class, too few rows with a value); the message says
    which and why."""


def check_nside(nside: int) -> int:
    """``nside`` if it is a HEALPix NESTED resolution (a power of two: 1, 2, 4, 8, ...), else a ValueError naming it:
    other values do not tile the sphere in the nested scheme, and the cells counted would be wrong."""
    if isinstance(nside, bool) or not isinstance(nside, int | np.integer) or nside < 1 or nside & (nside - 1):
        raise ValueError(
            f"nside {nside!r} is not a power of two; HEALPix (nested) needs nside 1, 2, 4, 8, ... (4: 192 cells)"
        )
    return int(nside)


def _points(points: ArrayLike, dim: int | None = None) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, d)"
        raise ValueError(f"points must be an array of shape {want} (unit vectors), got shape {array.shape}")
    if len(array) == 0:
        raise ValueError("points is empty: give at least one point")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    bad = np.flatnonzero(~(np.isfinite(norms[:, 0]) & (norms[:, 0] > 0)))
    if len(bad):  # a zero or non-finite vector has no direction; normalising would place it at lon 0, lat 0
        raise ValueError(
            f"points has {len(bad)} row(s) of length 0 or not finite (first: row {bad[0]}, {array[bad[0]].tolist()});"
            " give unit vectors"
        )
    return array / norms


def present(values: ArrayLike) -> np.ndarray:
    """Which rows of a per-row column (N,) hold a value: not NaN for numbers, neither None nor NaN otherwise; (N,)
    bool."""
    array = np.asarray(values)
    if array.dtype.kind in "fc":
        return ~np.isnan(array)
    if array.dtype.kind == "O":
        return np.array([not (v is None or (isinstance(v, float) and math.isnan(v))) for v in array], dtype=bool)
    return np.ones(len(array), dtype=bool)


def is_continuous(values: ArrayLike) -> bool:
    """Whether a per-row column (N,) is a quantity (scored by :func:`knn_r2`) rather than class labels (scored by
    :func:`knn_accuracy`): numbers are class labels when every value is whole and there are at most
    ``MAX_CLASSES`` (20) distinct ones, so a redshift or a flux is a quantity and a digit or a 0/1 flag a label;
    booleans and strings are labels. Missing values (NaN) do not count."""
    array = np.asarray(values)
    if array.dtype.kind not in "iuf":
        return False
    kept = array[present(array)]
    return not (np.array_equal(kept, np.round(kept)) and len(np.unique(kept)) <= MAX_CLASSES)


def _rows(array: ArrayLike, n: int, name: str) -> np.ndarray:
    out = np.asarray(array)
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} rows but points has {n}; give one value per point")
    return out


def lonlat(points: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Longitude in (-pi, pi] and latitude in [-pi/2, pi/2] (radians) of unit vectors (N, 3)."""
    xyz = _points(points, 3)
    return np.arctan2(xyz[:, 1], xyz[:, 0]), np.arcsin(np.clip(xyz[:, 2], -1.0, 1.0))


def coverage(points: ArrayLike, nside: int = 4) -> dict[str, float]:
    """Fraction of the 12 * nside^2 equal-area HEALPix cells (NESTED; nside 4: 192 cells) holding at least one of
    the unit vectors ``points`` (N, 3), and what a uniform sample of the same size would cover on average,
    1 - (1 - 1/K)^N: a few hundred points cannot cover every cell.

    Returns:
        ``{"coverage", "uniform_coverage", "cells", "nside"}``.
    """
    import astropy.units as u
    from astropy_healpix import lonlat_to_healpix

    nside = check_nside(nside)
    lon, lat = lonlat(points)
    cells = 12 * nside**2
    occupied = np.unique(lonlat_to_healpix(lon * u.rad, lat * u.rad, nside, order="nested"))
    return {
        "coverage": len(occupied) / cells,
        "uniform_coverage": 1.0 - (1.0 - 1.0 / cells) ** len(lon),
        "cells": cells,
        "nside": nside,
    }


def resultant_length(points: ArrayLike) -> float:
    """Length of the mean of the unit vectors: 1 when all points coincide, about 1/sqrt(N) for a uniform sample;
    for points spread evenly over a cap of angular radius t it is (1 + cos t) / 2."""
    return float(np.linalg.norm(_points(points).mean(axis=0)))


def concentration(scale: ArrayLike, floor: float = SCALE_FLOOR, margin: float = FLOOR_MARGIN) -> dict[str, float]:
    """Percentiles of the Power Spherical concentrations (N,) and the fraction of rows at the floor (below
    ``floor + margin``; the encoder's scale is softplus + 1, so the floor is 1).

    Returns:
        ``{"p10", "p50", "p90", "at_floor"}``.
    """
    values = np.asarray(scale, dtype=np.float64).reshape(-1)
    if len(values) == 0:
        raise ValueError("scale is empty: give the concentration of at least one row")
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    at_floor = float(np.mean(values < floor + margin))
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90), "at_floor": at_floor}


def knn_accuracy(points: ArrayLike, labels: ArrayLike, k: int = 5, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a k-nearest-neighbour classifier of ``labels`` (N,) from ``points`` (N, d):
    each row's label predicted from its k neighbours among the other folds (stratified, shuffled with ``seed``).

    On unit vectors the Euclidean neighbours are the great-circle ones. Chance is the frequency of the commonest
    label (``1/C`` for C balanced classes). Rows without a label (NaN, None) are left out.

    Raises:
        UndefinedFigure: fewer than two labelled rows, one class only (accuracy 1 by construction), or every label
            different (no neighbour can share it).
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    x = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    y = _rows(labels, len(x), "labels")
    keep = present(y)
    x, y = x[keep], y[keep]
    classes, counts = np.unique(y, return_counts=True) if len(y) else (y, np.zeros(1, int))
    if len(y) < 2 or len(classes) < 2 or counts.max() < 2:
        what = "one class" if len(classes) == 1 else "no two rows alike"
        raise UndefinedFigure(
            f"kNN accuracy is undefined for {len(y)} labelled row(s) with {what} ({len(classes)} distinct labels); "
            "it needs two classes and a class with two rows"
        )
    folds = max(2, min(folds, int(counts.max())))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    k = max(1, min(k, len(x) - math.ceil(len(x) / folds)))  # a training fold must hold k rows
    predicted = cross_val_predict(KNeighborsClassifier(n_neighbors=k), x, y, cv=cv)
    return float(np.mean(predicted == y))


def knn_r2(points: ArrayLike, values: ArrayLike, k: int = 10, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated R^2 of a k-nearest-neighbour regression of ``values`` (N,) from ``points`` (N, d): the
    out-of-fold predictions of all rows against the values (folds shuffled with ``seed``). 1: the position tells
    the value; 0 (or below): no better than the mean. Rows whose value is not finite are left out.

    Raises:
        UndefinedFigure: fewer than 4 rows with a finite value, or one value in every row (R^2 would read 1.0).
        ValueError: values that are not numbers.
    """
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.neighbors import KNeighborsRegressor

    x = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    y = _rows(values, len(x), "values")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"kNN R^2 needs numbers, got values of dtype {y.dtype}; score class labels by knn_accuracy")
    if y.dtype.kind in "iu" and len(y) and np.all(y == y[0]):
        raise UndefinedFigure(f"kNN R^2 is undefined: the value is {y[0]} in all {len(y)} rows (nothing to predict)")
    if y.dtype.kind in "iu" and len(y) and int(y.max()) - int(y.min()) < 2**63:
        y = y - y.min()  # as offsets: float64 holds 2**60 + 1 (an id) as 2**60, and every row would look alike
    y = y.astype(np.float64)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(y) < 4:
        raise UndefinedFigure(f"kNN R^2 needs at least 4 rows with a finite value, got {len(y)}")
    if np.all(y == y[0]):
        raise UndefinedFigure(f"kNN R^2 is undefined: the value is {y[0]:g} in all {len(y)} rows (nothing to predict)")
    folds = max(2, min(folds, len(y) // 2))
    k = max(1, min(k, len(y) - math.ceil(len(y) / folds)))
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(KNeighborsRegressor(n_neighbors=k), x, y, cv=cv)
    return float(r2_score(y, predicted))


def trustworthiness(inputs: ArrayLike, points: ArrayLike, k: int = 10, max_rows: int = 2000, seed: int = 0) -> float:
    """How far the k nearest neighbours on the sphere are neighbours in the input space too (sklearn's
    ``trustworthiness``: 1 when none is an intruder, about 0.5 for a random embedding). At most ``max_rows``
    rows (drawn with ``seed``) are used: the measure holds an N x N distance matrix."""
    from sklearn.manifold import trustworthiness as sk_trustworthiness

    x = np.asarray(inputs, dtype=np.float32).reshape(len(inputs), -1)
    z = _rows(points, len(x), "points").astype(np.float64).reshape(len(x), -1)
    if len(x) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))
        x, z = x[rows], z[rows]
    k = min(k, (len(x) - 1) // 2 - 1)  # sklearn needs n_neighbors < n_samples / 2
    if k < 1:
        raise ValueError(f"trustworthiness needs at least 6 rows, got {len(x)}")
    return float(sk_trustworthiness(x, z, n_neighbors=k))


def pca_sphere(inputs: ArrayLike, dim: int = 3, seed: int = 0) -> np.ndarray:
    """The baseline sphere: the first ``dim`` principal components of the flattened, centred inputs (N, ...),
    each row normalised onto the unit sphere; (N, dim)."""
    from sklearn.decomposition import PCA

    x = np.asarray(inputs, dtype=np.float32).reshape(len(inputs), -1)
    if len(x) < dim or x.shape[1] < dim:
        raise ValueError(f"pca_sphere needs at least {dim} rows and {dim} values per row, got shape {x.shape}")
    projected = PCA(n_components=dim, random_state=seed).fit_transform(x - x.mean(axis=0)).astype(np.float64)
    norms = np.linalg.norm(projected, axis=1, keepdims=True)
    return projected / np.clip(norms, 1e-12, None)


def knn_label(points: ArrayLike, values: ArrayLike, k: int | None = None, seed: int = 0) -> tuple[str, float]:
    """The kNN figure that suits a per-row column (N,) (see :func:`is_continuous`): ``("knn_accuracy", accuracy)``
    for class labels (k 5 unless given), ``("knn_r2", R^2)`` for a quantity (k 10 unless given). Rows without a
    value are left out; raises :class:`UndefinedFigure` where the figure is undefined."""
    if is_continuous(values):
        return "knn_r2", knn_r2(points, values, k=k or 10, seed=seed)
    return "knn_accuracy", knn_accuracy(points, values, k=k or 5, seed=seed)


def _named(values: Mapping[str, ArrayLike] | ArrayLike | None, default: str) -> dict[str, np.ndarray]:
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return {str(name): np.asarray(v) for name, v in values.items()}
    return {default: np.asarray(values)}


class _Skipped:
    """Figures that could not be computed: the figure reads ``None``, the reason is kept once for ``warnings``."""

    def __init__(self) -> None:
        self.reasons: dict[str, None] = {}  # an ordered set: the same reason for sphere, PCA and raw is said once

    def figure(self, what: str, compute: Callable[[], float]) -> float | None:
        try:
            return compute()
        except ValueError as err:  # UndefinedFigure, or data a figure cannot take: a report without it, not none
            self.reasons[f"{what}: {err}"] = None
            return None


def _knn_figures(
    points: np.ndarray, labels: dict[str, np.ndarray], columns: dict[str, np.ndarray], skipped: _Skipped
) -> dict[str, Any]:
    return {
        "knn_accuracy": {
            name: skipped.figure(f"kNN-5 accuracy of {name!r}", lambda y=y: knn_accuracy(points, y))
            for name, y in labels.items()
        },
        "knn_r2": {
            name: skipped.figure(f"kNN-10 R^2 of {name!r}", lambda v=v: knn_r2(points, v))
            for name, v in columns.items()
        },
    }


def _sphere_figures(
    points: np.ndarray,
    labels: dict[str, np.ndarray],
    columns: dict[str, np.ndarray],
    inputs: np.ndarray | None,
    nside: int,
    skipped: _Skipped,
) -> dict[str, Any]:
    """Every figure of one set of positions (N, d)."""
    out: dict[str, Any] = {}
    if points.shape[1] == 3:
        try:
            out.update(coverage(points, nside))
        except ValueError as err:  # e.g. a PCA row at the mean, which has no direction
            skipped.reasons[f"coverage: {err}"] = None
    out["resultant_length"] = resultant_length(points)
    out.update(_knn_figures(points, labels, columns, skipped))
    if inputs is not None:
        out["trustworthiness"] = skipped.figure("trustworthiness", lambda: trustworthiness(inputs, points))
    return out


def _split_labels(
    labels: dict[str, np.ndarray], columns: dict[str, np.ndarray], n: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """Class labels and quantities (a continuous label joins the columns), and a line for each with missing rows."""
    # a label without any value has no classes: scored as a quantity, it is reported undefined with the reason
    classes = {name: y for name, y in labels.items() if not is_continuous(y) and present(y).any()}
    quantities = {**{name: y for name, y in labels.items() if name not in classes}, **columns}
    notes = []
    for name, values in {**labels, **columns}.items():
        missing = n - int(present(values).sum())
        if missing:
            notes.append(f"{name!r} has no value in {missing} of {n} rows; they are left out of its figures")
    return classes, quantities, notes


def sphere_report(
    points: ArrayLike,
    scale: ArrayLike | None = None,
    inputs: ArrayLike | None = None,
    labels: Mapping[str, ArrayLike] | ArrayLike | None = None,
    columns: Mapping[str, ArrayLike] | None = None,
    kl: ArrayLike | None = None,
    nside: int = 4,
    beta: float | None = None,
) -> dict[str, Any]:
    """Every figure of a learned sphere, and of the baselines beside it when ``inputs`` are given.

    Args:
        points: The model's positions (N, d), unit vectors (d = 3: the sphere S^2).
        scale: Power Spherical concentrations (N,), for a VAE.
        inputs: The model inputs (N, ...): the PCA->S^2 baseline is computed from them, kNN on the raw inputs,
            and the trustworthiness of both spheres.
        labels: Class labels (N,) (named ``label``) or ``{name: labels}``: kNN-5 accuracy; a label that is a
            quantity (:func:`is_continuous`: a redshift) is scored as a column instead.
        columns: ``{name: values (N,)}`` of per-row quantities: kNN-10 R^2.
        kl: KL divergence of each row's posterior from the uniform prior (N,), nats.
        nside: HEALPix resolution of the coverage, a power of two (4: 192 cells).
        beta: The KL weight the model trained with, quoted in the warnings' fix.

    Returns:
        ``{"rows", "z_dim", "sphere": {...}, "pca_sphere": {...}, "raw": {...}, "chance": {...}, "warnings"}``:
        ``sphere`` holds ``coverage``, ``uniform_coverage``, ``resultant_length``, ``knn_accuracy`` and
        ``knn_r2`` (per name), ``trustworthiness``, and with ``scale`` its ``concentration`` percentiles and
        ``kl_per_sample``; ``pca_sphere`` the same figures for PCA of the inputs onto S^2 (with ``inputs``),
        ``raw`` the kNN figures of the flattened inputs; ``chance`` the accuracy of always guessing the commonest
        label (of the rows that have one); ``warnings`` what :func:`collapse_warnings` says, then a line for each
        label or column with missing values (left out) and for each figure that is undefined (it reads ``None``:
        a constant column has no R^2).
    """
    z = _points(points)
    n = len(z)
    nside = check_nside(nside)
    named_labels = {name: _rows(y, n, f"labels {name!r}") for name, y in _named(labels, "label").items()}
    named_columns = {name: _rows(v, n, f"column {name!r}") for name, v in _named(columns, "value").items()}
    x = None if inputs is None else _rows(inputs, n, "inputs").reshape(n, -1)
    classes, quantities, notes = _split_labels(named_labels, named_columns, n)
    skipped = _Skipped()

    report: dict[str, Any] = {"rows": n, "z_dim": z.shape[1]}
    report["sphere"] = _sphere_figures(z, classes, quantities, x, nside, skipped)
    sphere = report["sphere"]
    if scale is not None:
        sphere["concentration"] = concentration(_rows(np.reshape(scale, -1), n, "scale"))
    if kl is not None:
        sphere["kl_per_sample"] = float(np.mean(_rows(np.reshape(kl, -1), n, "kl")))
    if x is not None:
        report["pca_sphere"] = _sphere_figures(pca_sphere(x, z.shape[1]), classes, quantities, x, nside, skipped)
        report["raw"] = {"dim": x.shape[1], **_knn_figures(x, classes, quantities, skipped)}
    report["chance"] = {name: _chance(y) for name, y in classes.items()}
    collapsed = collapse_warnings(scale, sphere.get("kl_per_sample"), sphere.get("coverage"),
                                  sphere.get("uniform_coverage"), sphere["resultant_length"], beta)  # fmt: skip
    report["warnings"] = collapsed + notes + list(skipped.reasons)
    return report


def _chance(labels: np.ndarray) -> float:
    """Frequency of the commonest label among the rows that have one (there is one: see _split_labels)."""
    kept = labels[present(labels)]
    return float(np.unique(kept, return_counts=True)[1].max() / len(kept))


def collapse_warnings(
    scale: ArrayLike | None = None,
    kl: float | None = None,
    coverage: float | None = None,
    uniform_coverage: float | None = None,
    resultant_length: float | None = None,
    beta: float | None = None,
    floor: float = SCALE_FLOOR,
) -> list[str]:
    """One-line messages, with the numbers and the fix, for a sphere that has collapsed; empty when healthy.

    Fires when the median concentration sits at its floor (the posterior says nothing about the input), when the
    KL per sample is near zero, when the positions cover far fewer HEALPix cells than a uniform sample of the
    same size would, or when they form one clump (mean resultant length near 1).

    Args:
        scale: Concentrations (N,) of the posteriors.
        kl: Mean KL divergence per sample from the uniform prior, nats.
        coverage: Fraction of cells occupied (:func:`coverage`), with ``uniform_coverage`` that of a uniform
            sample of the same size.
        resultant_length: Length of the mean position (:func:`resultant_length`).
        beta: The KL weight the model trained with, quoted in the fix.
        floor: The lowest concentration the encoder can give.
    """
    now = f" (now {beta:g}, try {beta / 10:g})" if beta else ""
    lower_beta = (
        f"fix: lower model.init_args.beta{now}, the KL's weight against the reconstruction loss, or ramp it up "
        "with -c experiments/kl_annealing.yaml"
    )
    messages = []
    if scale is not None and np.size(scale):
        figures = concentration(scale, floor)
        if figures["p50"] < floor + FLOOR_MARGIN:
            messages.append(
                f"posterior collapse: median concentration {figures['p50']:.3g} is at its floor {floor:g} "
                f"({figures['at_floor']:.0%} of rows; p90 {figures['p90']:.3g}), the encoder tells the decoder "
                f"almost nothing; {lower_beta}"
            )
    if kl is not None and kl < KL_NEAR_ZERO:
        messages.append(
            f"posterior collapse: KL per sample {kl:.3g} nats (< {KL_NEAR_ZERO}; 0.19 at the floor on S^2, telling "
            f"one of 100 cells apart takes ln 100 = 4.6); {lower_beta}"
        )
    if coverage is not None and uniform_coverage and coverage < COVERAGE_FRACTION * uniform_coverage:
        messages.append(
            f"the positions cover {coverage:.0%} of the sphere's cells, a uniform sample of as many points "
            f"{uniform_coverage:.0%}: the sphere is mostly empty; {lower_beta}"
        )
    if resultant_length is not None and resultant_length > CLUMP_RESULTANT:
        messages.append(
            f"the positions form one clump (mean resultant length {resultant_length:.3f}; 1 is a single point, "
            f"a uniform spread about 0); {lower_beta}; a plain Autoencoder has no prior to spread it, use the VAE"
        )
    return messages


__all__ = [
    "MAX_CLASSES",
    "UndefinedFigure",
    "check_nside",
    "collapse_warnings",
    "concentration",
    "coverage",
    "is_continuous",
    "knn_accuracy",
    "knn_label",
    "knn_r2",
    "lonlat",
    "pca_sphere",
    "present",
    "resultant_length",
    "sphere_report",
    "trustworthiness",
]
