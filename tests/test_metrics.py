"""spherinator.metrics on constructed spheres whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from spherinator.metrics import (
    UndefinedFigure,
    collapse_warnings,
    concentration,
    coverage,
    is_continuous,
    knn_accuracy,
    knn_label,
    knn_r2,
    pca_sphere,
    resultant_length,
    sphere_report,
    trustworthiness,
)


def uniform(n: int, seed: int = 0) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=(n, 3))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def clump(n: int, radius_deg: float = 5.0, seed: int = 0) -> np.ndarray:
    """Points within ``radius_deg`` of the north pole."""
    rng = np.random.default_rng(seed)
    t = np.radians(radius_deg) * np.sqrt(rng.random(n))
    phi = rng.uniform(0, 2 * np.pi, n)
    return np.stack([np.sin(t) * np.cos(phi), np.sin(t) * np.sin(phi), np.cos(t)], 1)


def test_coverage_of_a_uniform_sample_matches_the_expected_value_and_a_clump_covers_little():
    figures = coverage(uniform(5000))
    assert figures["cells"] == 192
    assert figures["coverage"] == 1.0 and figures["uniform_coverage"] == pytest.approx(1.0)
    small = coverage(uniform(200))  # 200 points cannot fill 192 cells: about 1 - e^{-200/192} = 65%
    assert small["uniform_coverage"] == pytest.approx(1 - (1 - 1 / 192) ** 200)
    assert abs(small["coverage"] - small["uniform_coverage"]) < 0.08
    assert coverage(clump(5000))["coverage"] <= 4 / 192  # a 5 degree cap touches a few cells
    assert coverage(uniform(5000), nside=8)["cells"] == 768


def test_resultant_length_tells_a_clump_from_a_spread():
    assert resultant_length(clump(500)) > 0.99
    assert resultant_length(uniform(5000)) < 0.05
    both_poles = np.concatenate([clump(500), -clump(500, seed=1)])
    assert resultant_length(both_poles) < 0.05  # two clumps: coverage, not the resultant, catches this


def test_concentration_percentiles_and_the_floor():
    scale = np.concatenate([np.ones(80), np.full(20, 50.0)])
    figures = concentration(scale)
    assert figures["p50"] == 1.0 and figures["p90"] == 50.0 and figures["at_floor"] == 0.8


def test_knn_accuracy_is_near_one_for_a_label_of_position_and_near_chance_when_shuffled():
    points = uniform(1000)
    lon = np.arctan2(points[:, 1], points[:, 0])
    labels = np.digitize(lon, np.linspace(-np.pi, np.pi, 5)[1:-1])  # 4 longitude sectors
    assert knn_accuracy(points, labels) > 0.95
    shuffled = np.random.default_rng(1).permutation(labels)
    assert abs(knn_accuracy(points, shuffled) - 0.25) < 0.06


def test_knn_r2_is_near_one_for_a_column_of_position_and_near_zero_for_noise():
    points = uniform(1000)
    assert knn_r2(points, points[:, 2] + 0.5 * points[:, 0]) > 0.95
    assert knn_r2(points, np.random.default_rng(2).normal(size=1000)) < 0.05
    with_nan = points[:, 2].copy()
    with_nan[::10] = np.nan  # rows without a value are left out, not an error
    assert knn_r2(points, with_nan) > 0.95


def test_trustworthiness_of_an_isometric_embedding_is_one_and_of_a_random_one_lower():
    points = uniform(500)
    rotation, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    inputs = np.concatenate([points @ rotation, np.zeros((500, 5))], 1)  # the same sphere in R^8
    assert trustworthiness(inputs, points) == pytest.approx(1.0)
    assert trustworthiness(inputs, uniform(500, seed=9)) < 0.6
    assert trustworthiness(np.tile(inputs, (5, 1)), np.tile(points, (5, 1)), max_rows=300) > 0.9


def test_pca_sphere_recovers_a_sphere_embedded_in_more_dimensions():
    points = np.concatenate([uniform(200), -uniform(200)])[np.random.default_rng(4).permutation(400)]  # mean 0
    rng = np.random.default_rng(4)
    basis, _ = np.linalg.qr(rng.normal(size=(20, 3)))  # (20, 3) orthonormal columns
    inputs = (points @ basis.T + 5.0).reshape(400, 4, 5)  # offset: the PCA centres it
    projected = pca_sphere(inputs)
    assert projected.shape == (400, 3)
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0)
    gram = points @ points.T  # the same angles between every pair: a rotation of the original sphere
    np.testing.assert_allclose(projected @ projected.T, gram, atol=1e-6)


def test_sphere_report_compares_the_sphere_with_pca_and_raw_inputs():
    rng = np.random.default_rng(5)
    points = uniform(600)
    labels = (points[:, 2] > 0).astype(int)
    inputs = np.concatenate([points, 0.01 * rng.normal(size=(600, 30))], 1)  # the position, plus a little noise
    report = sphere_report(
        points, scale=np.full(600, 40.0), inputs=inputs, labels=labels, columns={"z": points[:, 2]}, kl=np.ones(600)
    )
    assert report["rows"] == 600 and report["z_dim"] == 3
    sphere, pca, raw = report["sphere"], report["pca_sphere"], report["raw"]
    assert sphere["knn_accuracy"]["label"] > 0.95 and pca["knn_accuracy"]["label"] > 0.95
    assert raw["knn_accuracy"]["label"] > 0.95 and raw["dim"] == 33
    assert sphere["knn_r2"]["z"] > 0.95 and sphere["trustworthiness"] > 0.95
    assert sphere["concentration"]["p50"] == 40.0 and sphere["kl_per_sample"] == 1.0
    assert report["chance"]["label"] == pytest.approx(0.5, abs=0.05)
    assert report["warnings"] == []
    only_points = sphere_report(points)
    assert "pca_sphere" not in only_points and "concentration" not in only_points["sphere"]


def test_collapse_warnings_fire_on_collapsed_figures_with_numbers_and_the_fix():
    messages = collapse_warnings(
        scale=np.ones(100), kl=0.19, coverage=0.05, uniform_coverage=0.65, resultant_length=0.97, beta=1e-3
    )
    assert len(messages) == 4
    assert all("model.init_args.beta (now 0.001, try 0.0001)" in m for m in messages)
    assert "median concentration 1" in messages[0] and "100% of rows" in messages[0]
    assert "0.19 nats" in messages[1]
    assert "cover 5%" in messages[2] and "65%" in messages[2]
    assert "0.970" in messages[3]
    assert all("\n" not in m for m in messages)


def test_collapse_warnings_stay_silent_on_a_healthy_sphere():
    points = uniform(300)
    cover = coverage(points)
    assert (
        collapse_warnings(
            scale=np.full(300, 80.0),
            kl=3.0,
            coverage=cover["coverage"],
            uniform_coverage=cover["uniform_coverage"],
            resultant_length=resultant_length(points),
        )
        == []
    )
    assert collapse_warnings() == []


def test_bad_shapes_are_refused_with_the_shape():
    with pytest.raises(ValueError, match=r"shape \(N, 3\).*\(5, 2\)"):
        coverage(np.ones((5, 2)))
    with pytest.raises(ValueError, match="labels has 3 rows but points has 5"):
        knn_accuracy(uniform(5), [0, 1, 0])


@pytest.mark.parametrize("nside", [3, 0, 6, -4, 2.0, True])
def test_nside_that_is_not_a_power_of_two_is_refused(nside):
    """nside 3 counted 1% of a uniform sphere's cells as covered (and warned of a collapse): nested HEALPix needs a
    power of two."""
    with pytest.raises(ValueError, match=f"nside {nside!r} is not a power of two"):
        coverage(uniform(3000), nside=nside)
    with pytest.raises(ValueError, match="not a power of two"):
        sphere_report(uniform(100), nside=nside)


def test_coverage_of_a_uniform_sample_is_near_full_at_every_power_of_two():
    for nside in (1, 2, 4, 8):
        cover = coverage(uniform(20000), nside=nside)
        assert cover["coverage"] > 0.99 and cover["cells"] == 12 * nside**2


def test_figures_the_data_cannot_define_are_undefined_not_perfect():
    points = uniform(200)
    with pytest.raises(UndefinedFigure, match="value is 0.5 in all 200 rows"):
        knn_r2(points, np.full(200, 0.5))  # was 1.0: a perfect score for a column that says nothing
    with pytest.raises(UndefinedFigure, match="at least 4 rows with a finite value, got 0"):
        knn_r2(points, np.full(200, np.nan))
    with pytest.raises(UndefinedFigure, match="one class"):
        knn_accuracy(points, np.ones(200, dtype=int))  # was 1.0
    with pytest.raises(UndefinedFigure, match="no two rows alike"):
        knn_accuracy(points, np.arange(200).astype(str))  # every label different: was sklearn's traceback
    with pytest.raises(UndefinedFigure, match="1 labelled row"):
        knn_accuracy(points[:1], [3])
    with pytest.raises(ValueError, match="needs numbers, got values of dtype <U"):
        knn_r2(points, np.array(["a", "b"] * 100))


def test_knn_accuracy_leaves_out_rows_without_a_label():
    points = uniform(600)
    labels = np.where(points[:, 2] > 0, "north", "south").astype(object)
    labels[::7] = None
    assert knn_accuracy(points, labels) > 0.95
    numeric = (points[:, 2] > 0).astype(float)
    numeric[::5] = np.nan
    assert knn_accuracy(points, numeric) > 0.95


def test_points_without_a_direction_are_refused_with_the_row():
    points = uniform(10)
    points[4] = 0.0
    with pytest.raises(ValueError, match=r"1 row\(s\) of length 0 or not finite \(first: row 4"):
        coverage(points)
    points[4] = np.nan
    with pytest.raises(ValueError, match="first: row 4"):
        resultant_length(points)


def test_class_labels_and_quantities_are_told_apart_by_dtype_and_values():
    assert not is_continuous(np.array([0, 1, 2, 1]))
    assert not is_continuous(np.array([0.0, 1.0, np.nan, 1.0]))  # whole numbers, a value missing: classes
    assert not is_continuous(np.array(["a", "b"])) and not is_continuous(np.array([True, False]))
    assert is_continuous(np.array([0.1, 0.52, np.nan]))  # a redshift
    assert is_continuous(np.arange(100))  # more whole values than MAX_CLASSES: a count, not a class
    points = uniform(400)
    assert knn_label(points, points[:, 2])[0] == "knn_r2"
    assert knn_label(points, (points[:, 2] > 0).astype(int))[0] == "knn_accuracy"


def test_sphere_report_scores_a_continuous_label_by_r2_and_reports_undefined_figures_with_the_reason():
    points = uniform(300)
    redshift = points[:, 2] + 1.5
    redshift[:30] = np.nan  # missing, which the reader allows
    report = sphere_report(
        points, inputs=points, labels={"redshift": redshift}, columns={"flat": np.full(300, 2.0), "z": points[:, 2]}
    )
    sphere = report["sphere"]
    assert sphere["knn_accuracy"] == {} and report["chance"] == {}
    assert sphere["knn_r2"]["redshift"] > 0.95 and sphere["knn_r2"]["z"] > 0.95
    assert sphere["knn_r2"]["flat"] is None and report["raw"]["knn_r2"]["flat"] is None
    warnings = report["warnings"]
    assert "'redshift' has no value in 30 of 300 rows; they are left out of its figures" in warnings
    flat = [w for w in warnings if "'flat'" in w]
    assert flat == ["kNN-10 R^2 of 'flat': kNN R^2 is undefined: the value is 2 in all 300 rows (nothing to predict)"]
    import json

    json.dumps(report, allow_nan=False)  # JSON, no NaN


def test_sphere_report_of_labels_without_any_value_says_so():
    points = uniform(50)
    report = sphere_report(points, labels={"a": np.full(50, np.nan), "b": np.array([None] * 50, dtype=object)})
    assert report["sphere"]["knn_r2"] == {"a": None, "b": None} and report["chance"] == {}
    assert any("'a'" in w and "got 0" in w for w in report["warnings"])
    assert any("'b'" in w and "needs numbers" in w for w in report["warnings"])


def test_knn_r2_of_large_integer_ids_is_not_taken_for_a_constant():
    # float64 holds 2**60 + i as 2**60: the column read as one value in every row, R^2 "undefined"
    rng = np.random.default_rng(3)
    points = rng.normal(size=(200, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    ids = (2**60 + np.arange(200)).astype(np.int64)
    assert knn_r2(points, ids) == pytest.approx(knn_r2(points, np.arange(200)))
    with pytest.raises(UndefinedFigure, match="the value is 1152921504606846976 in all 200 rows"):
        knn_r2(points, np.full(200, 2**60, dtype=np.int64))
