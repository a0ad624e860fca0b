"""The pages that show an atlas in Aladin Lite: ``index.html`` of one atlas and the sweep page of many.

Aladin Lite (the ``aladin-lite`` npm package, an ES module) is loaded from the public CDN by default
(:data:`ALADIN_LITE_CDN`); given a local copy (its ``aladin.js``, the package directory or a ``node_modules``
holding it) the file is copied beside the page, which then works without internet.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from spherinator.atlas import AtlasError
from spherinator.staging import staged_file

ALADIN_LITE_VERSION = "3.8.2"
ALADIN_LITE_CDN = f"https://cdn.jsdelivr.net/npm/aladin-lite@{ALADIN_LITE_VERSION}/dist/aladin.js"
ALADIN_LITE_ENV = "SPHERINATOR_ALADIN_LITE"
LOCAL_COPY = "aladin-lite/aladin.js"
ATLAS_JSON = "atlas.json"
SWEEP_PAGE = "atlas.html"
LIVE_SKIES = 12  # spheres a sweep page starts at once (a browser keeps about 16 WebGL contexts)


def find_aladin_lite(spec: str | Path | None) -> str | Path:
    """What a page loads Aladin Lite from: a URL, or the local ``aladin.js`` file to copy beside it.

    ``spec``: None (then ``$SPHERINATOR_ALADIN_LITE``, else the CDN), a URL, or a path to ``aladin.js``, to the
    npm package directory or to a directory holding ``node_modules/aladin-lite``.
    """
    if spec is None:
        spec = os.environ.get(ALADIN_LITE_ENV) or ALADIN_LITE_CDN
    text = str(spec)
    if text.startswith(("https://", "http://")):
        return text
    path = Path(text).expanduser()
    for candidate in (path, path / "aladin.js", path / "dist" / "aladin.js",
                      path / "node_modules" / "aladin-lite" / "dist" / "aladin.js"):  # fmt: skip
        if candidate.is_file() and candidate.name == "aladin.js":
            return candidate
    raise AtlasError(
        f"--aladin-lite {text}: no aladin.js there; give the file, the npm package directory (npm install "
        f"aladin-lite@{ALADIN_LITE_VERSION}) or a URL (default: {ALADIN_LITE_CDN})"
    )


def place_aladin_lite(source: str | Path, out: Path) -> str:
    """The import URL of Aladin Lite for pages in ``out``: ``source`` itself if it is a URL, else a copy of the
    file at ``out/aladin-lite/aladin.js``."""
    if isinstance(source, str):
        return source
    target = out / LOCAL_COPY
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return "./" + LOCAL_COPY


def _sweep_card(atlas: Path, root: Path) -> dict[str, Any] | str:
    """The sweep page's card of one atlas, from its ``atlas.json``; a line saying why not when that is damaged."""
    try:
        info = json.loads((atlas / ATLAS_JSON).read_text())
        ra, dec, card = float(info["initial"]["ra"]), float(info["initial"]["dec"]), info.get("card", [])
        if not (math.isfinite(ra) and math.isfinite(dec)):  # NaN in the page's JSON would blank every sphere
            raise ValueError(f"initial ra/dec {ra}, {dec} are not finite")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"left out {atlas}: its {ATLAS_JSON} cannot be read ({type(err).__name__}: {err}); write it again"
    rel = atlas.relative_to(root).as_posix()
    return {
        "name": atlas.parent.name if atlas.name == "atlas" else atlas.name,
        "page": f"{rel}/index.html",
        "hips": f"{rel}/hips",
        "catalog": f"{rel}/catalog.vot",
        "ra": ra,
        "dec": dec,
        "facts": card if isinstance(card, list) else [],
    }


def _align(
    tasks: list[dict[str, Any]], atlases: dict[str, Path], root: Path, log: Callable[[str], None] | None
) -> dict[str, Any] | None:
    """Rotate the spheres onto the first task's (``root/alignment.json``, see :mod:`spherinator.align`): each card
    gets its ``rotation`` onto the reference and its kNN agreement with it, and starts centred where the reference
    is (the page keeps the views turned alike as one is dragged). None, said to ``log``, when it cannot be done."""
    if len(atlases) < 2:
        return None
    from spherinator.align import AlignmentError, align_sweep

    try:
        alignment = align_sweep(atlases, root)
    except (AlignmentError, OSError, ValueError) as err:
        if log is not None:
            log(f"spheres not aligned: {err}")
        return None
    for line in alignment.notes if log is not None else []:
        log(f"not aligned: {line}")
    reference = next(t for t in tasks if t["name"] == alignment.reference)
    centre = _unit(reference["ra"], reference["dec"])
    for task in tasks:
        aligned = alignment.tasks.get(task["name"])
        if aligned is None:
            continue
        task["rotation"] = aligned.rotation
        # the reference's centre, in this task's frame: p @ R = q on the reference sphere, so p = q @ R.T
        x, y, z = (sum(centre[i] * aligned.rotation[j][i] for i in range(3)) for j in range(3))
        task["ra"], task["dec"] = math.degrees(math.atan2(y, x)) % 360.0, math.degrees(math.asin(max(-1, min(1, z))))
        if aligned.agreement is not None:
            task["facts"] = [
                *task["facts"],
                f"kNN-{alignment.k} agreement with {alignment.reference} {aligned.agreement:.2f}",
            ]
    return {"reference": alignment.reference, "k": alignment.k, "stability": alignment.stability}


def _unit(ra: float, dec: float) -> tuple[float, float, float]:
    ra, dec = math.radians(ra), math.radians(dec)
    return math.cos(dec) * math.cos(ra), math.cos(dec) * math.sin(ra), math.sin(dec)


def render_template(name: str, title: str, config: dict[str, Any], aladin_lite: str) -> str:
    """A page template with its title, its JSON config and the Aladin Lite import URL filled in."""
    import html

    templates = files("spherinator.atlas").joinpath("templates")
    text = templates.joinpath(name).read_text(encoding="utf-8")
    sizing = templates.joinpath("sizing.js").read_text(encoding="utf-8").strip()
    return (
        text.replace("__TITLE__", html.escape(title))
        .replace('"__ALADIN_LITE__"', script_json(aladin_lite))
        .replace("__SIZING_JS__", sizing)
        .replace("__CONFIG__", script_json(config, indent=1))
    )


def script_json(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON that can stand inside a ``<script>`` element, as a JS literal or a JSON block: ``<``,
    ``>`` and ``&`` escaped as ``\\u003c`` ..., so no value (a URL, a run's name) can end the element or open a
    comment there; ``ensure_ascii`` escapes the line separators JavaScript strings may not hold."""
    text = json.dumps(value, indent=indent, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_index(out: Path, config: dict[str, Any], aladin_lite: str) -> Path:
    """``out/index.html`` of one atlas (``config``: title, name, hips, catalog, ra, dec, fov, facts).

    Where ``out`` holds a progressive catalog (``catalog/properties``), the page draws it instead of the VOTable
    sample and opens any row (``index.html?row=N``) through its row index.
    """
    from spherinator.atlas.progressive import CATALOG_DIR, ROW_CHUNK

    if (out / CATALOG_DIR / "properties").is_file():
        config = {**config, "catalog_hips": CATALOG_DIR, "row_chunk": ROW_CHUNK}
    path = out / "index.html"
    path.write_text(render_template("index.html", config["title"], config, aladin_lite), encoding="utf-8")
    return path


def write_sweep_page(
    root: str | Path,
    aladin_lite: str | Path | None = None,
    title: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """``root/atlas.html``: the spheres of every atlas under ``root`` (``*/atlas/atlas.json``, e.g. the tasks of a
    sweep) side by side, each linking to its own page. Written atomically; safe to call from several tasks.

    Aladin Lite comes from ``aladin_lite`` (see :func:`find_aladin_lite`), else from the first atlas's local copy,
    else from the CDN. An atlas whose ``atlas.json`` cannot be read is left out, said in one line to ``log``.

    Raises:
        AtlasError: ``root`` holds no (readable) atlas.
    """
    root = Path(root)
    atlases = sorted(p.parent for p in root.glob(f"*/atlas/{ATLAS_JSON}"))
    atlases += [p.parent for p in sorted(root.glob(f"*/{ATLAS_JSON}")) if p.parent not in atlases]
    if not atlases:
        raise AtlasError(f"no atlas under '{root}' (looked for */atlas/{ATLAS_JSON}); write them with "
                         "'spherinator atlas RUN_DIR' first")  # fmt: skip
    tasks, local, damaged, found = [], None, [], {}
    for atlas in atlases:
        task = _sweep_card(atlas, root)
        if isinstance(task, str):
            damaged.append(task)
            continue
        tasks.append(task)
        found[task["name"]] = atlas
        if local is None and (atlas / LOCAL_COPY).is_file():
            local = f"./{atlas.relative_to(root).as_posix()}/{LOCAL_COPY}"
    if not tasks:
        raise AtlasError(f"no readable atlas under '{root}': {damaged[0]} (and {len(damaged) - 1} more)")
    for line in damaged if log is not None else []:
        log(line)
    if aladin_lite is not None:
        url = place_aladin_lite(find_aladin_lite(aladin_lite), root)
    else:
        url = local or ALADIN_LITE_CDN
    title = title or f"{root.resolve().name}: {len(tasks)} spheres"
    config = {"title": title, "tasks": tasks, "live": LIVE_SKIES, "alignment": _align(tasks, found, root, log)}
    path = root / SWEEP_PAGE
    with staged_file(path, AtlasError, "sweep page") as tmp:
        tmp.write_text(render_template("sweep.html", title, config, url), encoding="utf-8")
    return path
