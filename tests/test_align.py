"""A sweep's spheres aligned by an exact rotation, and how stable the sphere is across tasks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spherinator.align import (
    ALIGNMENT_JSON,
    AlignmentError,
    SweepAlignment,
    align_points,
    align_sweep,
    neighbour_agreement,
    procrustes_rotation,
)
from tests.test_atlas import blobs, browse, local_aladin_lite, run_dir  # noqa: F401 (blobs, run_dir: fixtures)
from tests.test_submit import fake_slurm, old_sweep  # noqa: F401 (fake_slurm: a fixture)


def _sphere(n: int, d: int, seed: int = 0) -> np.ndarray:
    points = np.random.default_rng(seed).normal(size=(n, d))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def _rotation(d: int, seed: int = 1) -> np.ndarray:
    """A random rotation of R^d (det +1)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("d", [2, 3, 5, 16])
def test_a_rotated_sphere_comes_back_to_within_1e6(d):
    reference = _sphere(500, d)
    known = _rotation(d)
    rotated = reference @ known  # the same sphere, turned
    found = procrustes_rotation(rotated, reference)
    assert np.abs(rotated @ found - reference).max() < 1e-6
    assert np.abs(found - known.T).max() < 1e-6
    assert np.linalg.det(found) == pytest.approx(1.0) and np.allclose(found.T @ found, np.eye(d))


@pytest.mark.parametrize("d", [2, 3, 6])
def test_a_reflected_sphere_is_not_turned_into_a_reflection(d):
    reference = _sphere(400, d, seed=2)
    mirror = np.eye(d)
    mirror[0, 0] = -1.0
    mirrored = reference @ _rotation(d) @ mirror  # a reflection: no rotation brings it back
    found = procrustes_rotation(mirrored, reference)
    assert np.linalg.det(found) == pytest.approx(1.0)  # an unconstrained fit would be the reflection (det -1)
    assert np.allclose(found.T @ found, np.eye(d))
    assert np.abs(mirrored @ found - reference).max() > 0.1  # the mirror image stays one: its misfit shows


def test_no_scaling():
    reference = _sphere(300, 3)
    found = procrustes_rotation(3.0 * reference @ _rotation(3), reference)
    assert np.allclose(np.linalg.svd(found, compute_uv=False), 1.0)


def test_neighbour_agreement_is_one_for_a_rotation_and_low_for_unrelated_spheres():
    points = _sphere(600, 3)
    assert neighbour_agreement(points, points @ _rotation(3), k=10).mean() == pytest.approx(1.0)
    unrelated = neighbour_agreement(points, _sphere(600, 3, seed=9), k=10).mean()
    assert unrelated < 0.1  # about k / n by chance
    with pytest.raises(AlignmentError, match="k=600"):
        neighbour_agreement(points, points, k=600)


def test_misshaped_points_are_refused_in_one_line():
    with pytest.raises(AlignmentError, match=r"\(4, 3\) and \(4, 2\)"):
        procrustes_rotation(np.ones((4, 3)), np.ones((4, 2)))
    with pytest.raises(AlignmentError, match="not finite"):
        procrustes_rotation(np.full((4, 3), np.nan), np.ones((4, 3)))


def test_align_points_uses_the_shared_rows_only():
    ref = _sphere(200, 3)
    known = _rotation(3)
    rows = np.arange(200)
    other_rows = np.arange(50, 300)  # 150 rows shared, in another order below
    other = np.concatenate([ref[50:], _sphere(100, 3, seed=5)]) @ known
    order = np.random.default_rng(0).permutation(250)
    result = align_points({"a": (rows, ref), "b": (other_rows[order], other[order])})
    b = result.tasks["b"]
    assert result.reference == "a" and b.rows == 150 and b.rms_after < 1e-6 < b.rms_before
    assert np.abs(np.array(b.rotation) - known.T).max() < 1e-6
    assert b.agreement == pytest.approx(1.0) and result.stability == pytest.approx(1.0)
    assert result.tasks["a"].agreement is None


def test_a_task_with_points_that_are_not_finite_is_left_out_with_a_note():
    ref = _sphere(100, 3)
    diverged = ref.copy()
    diverged[7] = np.nan
    rows = np.arange(100)
    result = align_points({"a": (rows, ref), "b": (rows, ref @ _rotation(3)), "c": (rows, diverged)})
    assert set(result.tasks) == {"a", "b"} and result.stability == pytest.approx(1.0)
    assert result.notes == ["c: points that are not finite (NaN/inf)"]


def _atlas(root, name, rows, xyz):
    atlas = root / name / "atlas"
    atlas.mkdir(parents=True)
    table = pa.table({"row": rows, "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]})
    pq.write_table(table, atlas / "catalog.parquet")
    return atlas


def test_align_sweep_writes_alignment_json_and_says_it_in_one_line(tmp_path):
    ref = _sphere(300, 3)
    atlases = {
        "t0": _atlas(tmp_path, "t0", np.arange(300), ref),
        "t1": _atlas(tmp_path, "t1", np.arange(300), ref @ _rotation(3)),
        "t2": _atlas(tmp_path, "t2", np.arange(300), _sphere(300, 3, seed=4)),
    }
    (tmp_path / "t1" / "events.out.tfevents.1.host").write_bytes(b"")  # t1 logs to TensorBoard
    result = align_sweep(atlases, tmp_path)
    stored = SweepAlignment.load(tmp_path / ALIGNMENT_JSON)
    assert stored == result
    assert json.loads((tmp_path / ALIGNMENT_JSON).read_text())["reference"] == "t0"
    assert stored.tasks["t1"].agreement == pytest.approx(1.0) and stored.tasks["t2"].agreement < 0.2
    line = stored.line()
    assert line.startswith("sphere stability (kNN-10") and "t0" in line and "t1 1.00" in line
    assert list((tmp_path / "t1").glob("events.out.tfevents.*.stability"))  # the HParams tab's scalar
    assert not list((tmp_path / "t2").glob("events.out.tfevents.*"))  # no TensorBoard there: nothing written


def test_stability_reaches_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from spherinator.align import STABILITY_TAG, log_stability

    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"")
    assert log_stability(tmp_path, 0.75, 2)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    (scalar,) = events.Scalars(STABILITY_TAG)
    assert scalar.value == pytest.approx(0.75) and scalar.step == 2


def test_the_sweep_page_shows_the_spheres_rotated_onto_the_first(tmp_path):
    from spherinator.atlas.page import write_sweep_page

    ref = _sphere(200, 3)
    known = _rotation(3)
    for name, xyz in (("a", ref), ("b", ref @ known)):
        atlas = _atlas(tmp_path, name, np.arange(200), xyz)
        (atlas / "atlas.json").write_text(json.dumps({"initial": {"ra": 10.0, "dec": 20.0}, "card": ["z_dim 3"]}))
    page = write_sweep_page(tmp_path).read_text()
    config = json.loads(page.split('id="atlas-config">', 1)[1].split("</script>", 1)[0])
    assert config["alignment"] == {"reference": "a", "k": 10, "stability": pytest.approx(1.0)}
    a, b = config["tasks"]
    assert np.allclose(a["rotation"], np.eye(3)) and (a["ra"], a["dec"]) == (10.0, 20.0)
    assert np.abs(np.array(b["rotation"]) - known.T).max() < 1e-6
    # b starts centred on the point of its sphere that lies at a's centre
    centre = np.array([np.cos(np.radians(20)) * np.cos(np.radians(10)), np.cos(np.radians(20)) * np.sin(np.radians(10)),
                       np.sin(np.radians(20))])  # fmt: skip
    expected = centre @ known
    got = np.radians([b["ra"], b["dec"]])
    assert np.allclose([np.cos(got[1]) * np.cos(got[0]), np.cos(got[1]) * np.sin(got[0]), np.sin(got[1])], expected)
    assert "kNN-10 agreement with a 1.00" in b["facts"]
    assert (tmp_path / ALIGNMENT_JSON).is_file()


@pytest.mark.usefixtures("fake_slurm")
def test_status_says_how_stable_the_sphere_is(tmp_path, capsys):
    from spherinator.submit import main

    sweep = old_sweep(tmp_path)
    ref = _sphere(100, 3)
    atlases = {"beta=1e-3": _atlas(sweep, "beta=1e-3", np.arange(100), ref),
               "beta=1e-4": _atlas(sweep, "beta=1e-4", np.arange(100), ref @ _rotation(3))}  # fmt: skip
    align_sweep(atlases, sweep)
    main(["status", str(sweep)])
    out = capsys.readouterr().out
    assert "sphere stability (kNN-10 neighbours that agree with beta=1e-3" in out and "beta=1e-4 1.00" in out
    for damaged in ("{", '{"reference": "a", "k": 10, "tasks": []}'):  # cut short; edited by hand
        (sweep / ALIGNMENT_JSON).write_text(damaged)
        main(["status", str(sweep)])
        assert "sphere stability: alignment.json cannot be read" in capsys.readouterr().out


_VIEWS_SCRIPT = """
setTimeout(() => {
  const lines = views.map((v) => {
    const [w, h] = v.aladin.getSize();
    const at = (x, y) => toRef(unit(...v.aladin.pix2world(x, y)), v.task.rotation).map((c) => c.toFixed(3)).join(",");
    return `${at(w / 2, h / 2)} ${at(w / 2, h / 2 - 20)} ${at(w / 2 + 20, h / 2)}`;
  });
  document.getElementById("atlas-status").dataset.views = lines.join(";");
}, 6000);
</script>
</body>"""


@pytest.mark.slow
def test_the_aligned_views_show_the_same_place_turned_alike_in_chromium(request, tmp_path):
    """Two tasks whose spheres differ by a rotation: on the page, each view's centre, screen-up and screen-right
    points are the same points of the reference sphere (Aladin's sign of rotation checked, no mirror)."""
    from spherinator.atlas import write_atlas
    from spherinator.atlas.page import write_sweep_page

    aladin = local_aladin_lite()
    run = request.getfixturevalue("run_dir")  # test_atlas's trained run
    sweep = tmp_path / "sweep"
    for task in ("a", "b"):
        write_atlas(run, out=sweep / task / "atlas", max_order=1, max_sources=30, thumbnails=0,
                    aladin_lite=aladin, progress=False, log=None)  # fmt: skip
    catalog = sweep / "b" / "atlas" / "catalog.parquet"
    table = pq.read_table(catalog)
    xyz = np.stack([table.column(c).to_numpy() for c in "xyz"], axis=1) @ _rotation(3)  # b's sphere, turned
    for i, name in enumerate("xyz"):
        column = pa.array(xyz[:, i]).cast(table.schema.field(name).type)
        table = table.set_column(table.column_names.index(name), name, column)
    pq.write_table(table, catalog)
    page = write_sweep_page(sweep)
    page.write_text(page.read_text().replace("</script>\n</body>", _VIEWS_SCRIPT))
    status, _, _, _ = browse(sweep, "atlas.html", tmp_path)
    assert status.get("aligned") == "a"
    first, second = status["views"].split(";")
    assert first == second, (first, second)
