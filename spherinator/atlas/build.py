"""``write_atlas``: a run's sphere as a HiPS, its data as a catalog, and the page that shows both.

Layout of the atlas directory (default: ``<run dir>/atlas``)::

    index.html          Aladin Lite: the HiPS with the catalog on top, a panel with the selected source
    atlas.json          what was written, from what, with the timings
    hips/               the HiPS (IVOA HiPS 1.0): properties, Moc.fits, Norder*/Dir*/Npix*.jpg, Norder3/Allsky.jpg
    catalog.parquet     every row: row, the data's per-row columns, ra, dec, healpix, x, y, z, concentration
    catalog.vot         VOTable of a seeded sample of rows (the layer the page draws)
    thumbs/             input/<row>.png and decoded/<row>.png of the first sampled rows
    aladin-lite/        a local copy of Aladin Lite, when one was given

The atlas is written into a temporary directory beside it and moved into place at the end: an interrupted run
leaves the previous atlas as it was. ``--overwrite`` replaces only an atlas (a directory holding ``atlas.json``),
never the model's files, the data or a directory around them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from spherinator.atlas import AtlasError
from spherinator.atlas.catalog import add_row_columns, reads_files, write_catalog, write_embedding_catalog
from spherinator.atlas.hips import ALLSKY_ORDER, write_hips
from spherinator.atlas.model import SphereModel, open_model
from spherinator.atlas.options import (
    AtlasOptions,
    check_data_path,
    check_embeddings_path,
    check_out,
    resolve_run_data,
)
from spherinator.atlas.page import ATLAS_JSON, find_aladin_lite, place_aladin_lite, write_index
from spherinator.atlas.render import UNIT_RANGE, TileRenderer, value_range
from spherinator.atlas.sky import cell_centres, cells, unit_to_radec
from spherinator.atlas.source import Embeddings, open_data, open_embeddings
from spherinator.runs import EXPORT_REPORT, run_dir_of
from spherinator.staging import replace_dir, staged_dir


def default_out(path: str | Path) -> Path:
    """Where an atlas of ``path`` goes by default: ``atlas/`` in the run directory (for a checkpoint, the run
    directory holding ``checkpoints/``; for an ONNX directory, the directory above it; see
    :func:`spherinator.runs.run_dir_of`)."""
    return run_dir_of(path) / "atlas"


def write_atlas(
    path: str | Path,
    data_args: list[str] | None = None,
    out: str | Path | None = None,
    max_order: int = 5,
    tile_width: int | None = None,
    tile_fit: str | None = None,
    tile_format: str = "jpeg",
    max_sources: int = 20000,
    thumbnails: int = 1000,
    aladin_lite: str | Path | None = None,
    batch_size: int = 64,
    device: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    trust: bool = False,
    progress: bool = True,
    log: Any = print,
    workers: int | None = None,
    embeddings: str | Path | None = None,
) -> dict[str, Any]:
    """Write the atlas of a run directory, a checkpoint or an ONNX export directory (see the module docstring).

    Args:
        path: Run directory, ``.ckpt`` file or ONNX export directory (:func:`~spherinator.atlas.model.open_model`).
        data_args: ``-c`` files and ``--data.*`` overrides as for ``spherinator fit``; their ``data:`` section is
            the data the catalog encodes. Empty: the run's ``config.yaml``.
        out: Atlas directory; default ``<run dir>/atlas``.
        max_order: Deepest HiPS order (12 * 4^k tiles at order k; order 6: 49,152).
        tile_width: Tile width, a power of two up to 1024; None: images' size rounded up in [64, 512], spectra 256.
        tile_fit: ``fill`` (images' default: each picture covers its cell, a seamless sky of centred objects) or
            ``contain`` (spectra's default: the whole picture inside its cell).
        tile_format: ``jpeg`` or ``png``.
        max_sources: Rows in the VOTable (a seeded sample when the data have more); the Parquet file has all.
        thumbnails: Sampled rows that get pictures of their input and of its decoding.
        aladin_lite: Where the page loads Aladin Lite from: None (``$SPHERINATOR_ALADIN_LITE``, else the CDN), a
            URL, or a local ``aladin.js`` / npm package directory to copy into the atlas.
        batch_size: Cells decoded at once.
        device: Torch device of a checkpoint's model (default: cuda if available).
        overwrite: Replace an existing atlas at ``out`` (only an atlas: a directory holding ``atlas.json``).
        seed: Seed of the VOTable's row sample.
        trust: Read a checkpoint holding pickled Python objects in full (see ``spherinator export``).
        progress: Progress bars on stderr.
        log: Called with one line per step (None: quiet).
        workers: Processes drawing tiles (None: the cores this process may use; see :func:`write_hips`).
        embeddings: ``spherinator-submit predict``'s run directory: the catalog's rows (no thumbnails), not the data.

    Returns:
        The contents of ``atlas.json``, plus ``path`` (the atlas directory).

    Raises:
        AtlasError: a bad setting, path, model or data config; raised before anything is written. Also a full or
            read-only disk (nothing is published then).
    """
    options = AtlasOptions(out=out, max_order=max_order, tile_width=tile_width, tile_fit=tile_fit,
                           tile_format=tile_format, max_sources=max_sources, thumbnails=thumbnails,
                           aladin_lite=aladin_lite, batch_size=batch_size, device=device, overwrite=overwrite,
                           seed=seed, trust=trust, progress=progress, workers=workers,
                           embeddings=embeddings)  # fmt: skip
    return build_atlas(path, options, data_args, log)


def build_atlas(
    path: str | Path, options: AtlasOptions, data_args: list[str] | None = None, log: Any = print
) -> dict[str, Any]:
    """:func:`write_atlas` with its settings in one checked object: open, check, stage, write, publish."""
    say = log or (lambda line: None)
    out = Path(options.out) if options.out is not None else default_out(path)
    check_out(out, options.overwrite, [Path(path)])  # before anything is read: a bad -o answers at once
    embeddings = None
    if options.embeddings is not None:  # checked before any work: the shards against their manifest
        if data_args:
            raise AtlasError(f"--embeddings gives the catalog's rows, so {data_args[0]} is not read; leave out -c and "
                             "--data.* (or --embeddings, to encode the data)")  # fmt: skip
        embeddings = open_embeddings(options.embeddings)
        check_out(out, options.overwrite, [embeddings.directory])
        check_embeddings_path(out, embeddings.directory)
    aladin_source = find_aladin_lite(options.aladin_lite)
    model = open_model(path, device=options.device, trust=options.trust)
    check_out(out, options.overwrite, [p for p in (model.checkpoint, model.onnx_dir, model.config) if p])
    check_export_passed(model)
    if embeddings is not None:
        notes = [f"catalog from the {embeddings.rows:,} rows embedded in {embeddings.directory}"]
        source, added, notes = embeddings, [], notes + _made_by_another(model, embeddings)
    else:
        source, added, notes = _open_data(model, out, data_args or [])
    for note in notes:
        say(f"atlas: {note}")
    say(f"atlas: encoder {model.encoder_source}; decoder {model.decoder_source}")

    renderer = TileRenderer(model.input_shape, width=options.tile_width, fit=options.tile_fit)
    renderer.low, renderer.high = _value_range(model, renderer.kind, options.batch_size)
    with staged_dir(out, AtlasError, "atlas") as staging:
        info = _write_contents(model, source, renderer, staging, options, say, added, notes)
        info["aladin_lite"] = place_aladin_lite(aladin_source, staging)
        write_index(staging, page_config(info), info["aladin_lite"])
        (staging / ATLAS_JSON).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(staging, out)
    say(f"atlas: wrote {out} (view it: spherinator atlas serve {out})")
    return {**info, "path": str(out)}


def _made_by_another(model: SphereModel, embeddings: Embeddings) -> list[str]:
    """A note when the manifest names the model that embedded the rows and it is not the atlas's: the catalog's
    places are that model's, the HiPS this one's."""
    ours = {p.resolve() for p in (model.checkpoint, model.onnx_dir) if p is not None}
    if not embeddings.made_by or any(Path(p).resolve() in ours for p in embeddings.made_by):
        return []
    return [f"the rows were embedded by {' and '.join(embeddings.made_by)}, not by this atlas's model: the catalog "
            "places them where that model does; draw the atlas of that model for the two to agree"]  # fmt: skip


def _open_data(model: SphereModel, out: Path, data_args: list[str]) -> tuple[Any, list[str], list[str]]:
    """The data the catalog encodes, the data columns it carries beside the model input, and notes."""
    # an encoder run by onnxruntime: a plain DataModule section is read in numpy, and the atlas imports no torch
    datamodule, notes = open_data(data_args, model.config, numpy_only=model.torch_model is None)
    if model.config is not None and not _gives_data_path(data_args):
        notes += [note for note in [resolve_run_data(datamodule, model.config.parent)] if note]
    check_data_path(out, datamodule)
    added = add_row_columns(datamodule)
    if not added and not reads_files(datamodule):
        notes.append(f"{type(datamodule).__name__} is not spherinator.data.DataModule: the catalog has the columns "
                     "its batches carry")  # fmt: skip
    return datamodule, added, notes


def _value_range(model: SphereModel, kind: str, batch_size: int) -> tuple[float, float]:
    """One value range for the whole atlas (:func:`~spherinator.atlas.render.value_range`), from the decoder's
    outputs at the 768 cell centres of order 3, decoded in batches as the tiles are (one batch of 768 made
    onnxruntime take 0.5 GB for its activations). Images within [0, 1] (the usual decoder) are told from each batch's
    extremes; only other outputs are held all at once (150 MB for 3x128x128), for their percentiles."""
    centres = cell_centres(ALLSKY_ORDER, np.arange(cells(ALLSKY_ORDER))).astype(np.float32)

    def decoded() -> Iterator[np.ndarray]:
        return (model.decode(centres[i : i + batch_size]) for i in range(0, len(centres), batch_size))

    if kind == "image":
        low, high = np.inf, -np.inf  # of the finite values; none finite: [0, 1] as value_range says
        for out in decoded():
            finite = out[np.isfinite(out)]
            if finite.size:
                low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        if low >= UNIT_RANGE[0] and high <= UNIT_RANGE[1] or low > high:
            return 0.0, 1.0
    return value_range(np.concatenate(list(decoded())), kind)


def _gives_data_path(data_args: list[str]) -> bool:
    """Whether the command line gives the data (a ``-c`` file or a ``--data...path`` override): its relative paths
    are the user's, relative to the current directory."""
    return any(arg in ("-c", "--config", "--data") or arg.startswith("--config=")
               or (arg.startswith("--data.") and "path" in arg.split("=", 1)[0]) for arg in data_args)  # fmt: skip


def check_export_passed(model: SphereModel) -> None:
    """Refuse an ONNX export whose own ``export_report.json`` says onnxruntime disagreed with torch."""
    if model.onnx_dir is None:
        return
    report = model.onnx_dir / EXPORT_REPORT
    try:
        passed = json.loads(report.read_text()).get("passed")
    except (OSError, ValueError, AttributeError):
        return  # an export without a (readable) report: nothing says it failed
    if passed is False:
        raise AtlasError(
            f"'{model.onnx_dir}' failed its validation ({report}: onnxruntime differs from torch); export the "
            "checkpoint again (spherinator export --overwrite) or give the .ckpt instead"
        )


def _write_contents(model: SphereModel, source: Any, renderer: TileRenderer, staging: Path,
                    options: AtlasOptions, say: Any, added: list[str], notes: list[str]) -> dict[str, Any]:  # fmt: skip
    """The catalog, the HiPS and its MOC under ``staging``; returns ``atlas.json``'s contents less the page's
    (``source``: the data module to encode, or :class:`~spherinator.atlas.source.Embeddings`; ``added``: the data
    columns the catalog carries; ``notes``: what was said about the data)."""
    started = time.perf_counter()
    if isinstance(source, Embeddings):
        catalog = write_embedding_catalog(source.shards, source.rows, staging, options.max_order, options.max_sources,
                                          options.seed, options.progress, source.row_column)  # fmt: skip
    else:
        catalog = write_catalog(model, source, staging, renderer, options.max_order, options.max_sources,
                                options.thumbnails, options.seed, options.progress)  # fmt: skip
    catalog_seconds = time.perf_counter() - started
    sample = catalog.pop("sample")
    initial = _initial_view(np.asarray(catalog["mean_vector"]))
    properties = {
        "creator_did": f"ivo://spherinator/P/atlas/{_did_safe(model.name)}",
        "obs_title": f"spherinator atlas: {model.name}",
        # the decoder's file name, not its path: a HiPS is published, the writing machine's paths are not
        "obs_description": f"The decoder of {model.model_class or 'a spherinator model'} ({_decoder_name(model)})"
        " drawn at the centre of every HEALPix cell",
        "hips_initial_ra": f"{initial['ra']:.4f}",
        "hips_initial_dec": f"{initial['dec']:.4f}",
        "hips_initial_fov": str(initial["fov"]),
    }
    hips = write_hips(model.decode, renderer, staging / "hips", options.max_order, options.tile_format,
                      options.batch_size, properties, options.progress, workers=options.workers or 1,
                      worker_decoder=model.worker_decoder())  # fmt: skip
    write_moc(staging / "hips" / "Moc.fits")
    say(f"atlas: {hips['tiles']} tiles in {hips['seconds']:.1f} s ({hips['seconds_per_1k_tiles']:.2f} s per 1k "
        f"tiles, {hips['decode_seconds']:.1f} s decoding, {hips['workers']} process(es)); catalog of "
        f"{catalog['rows']} rows in {catalog_seconds:.1f} s")  # fmt: skip
    for note in catalog.get("notes", []):
        say(f"atlas: {note}")
    notes = notes + catalog.pop("notes", [])
    info = _describe(model, renderer, hips, catalog, sample, initial, options.max_order, added, notes)
    info["catalog"]["seconds"] = round(catalog_seconds, 2)
    return info


def _decoder_name(model: SphereModel) -> str:
    if model.decoder_session is not None:
        return "decoder.onnx, onnxruntime"
    return f"{model.checkpoint.name if model.checkpoint else 'checkpoint'}, torch"


def _did_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-._~" else "_" for c in name) or "run"


def _initial_view(mean: np.ndarray) -> dict[str, float]:
    """Look at the mean direction of the data (if they lean to one side), the whole hemisphere in view."""
    if not np.all(np.isfinite(mean)) or np.linalg.norm(mean) < 0.05:
        return {"ra": 0.0, "dec": 0.0, "fov": 180}
    ra, dec = unit_to_radec(mean[None])
    return {"ra": round(float(ra[0]), 4), "dec": round(float(dec[0]), 4), "fov": 180}


def write_moc(path: Path) -> None:
    """A MOC (IVOA MOC 1.1, FITS) of the whole sphere: every tile of the HiPS exists."""
    from astropy.io import fits

    uniq = fits.Column(name="UNIQ", format="K", array=4 + np.arange(12, dtype=np.int64))  # order 0: 4 * 4^0 + ipix
    hdu = fits.BinTableHDU.from_columns([uniq])
    for key, value in (("PIXTYPE", "HEALPIX"), ("ORDERING", "NUNIQ"), ("COORDSYS", "C"), ("MOCORDER", 0),
                       ("MOCTOOL", "spherinator"), ("MOCDIM", "SPACE")):  # fmt: skip
        hdu.header[key] = value
    hdu.writeto(path, overwrite=True)


def _describe(model: SphereModel, renderer: TileRenderer, hips: dict, catalog: dict, sample: np.ndarray,
              initial: dict, max_order: int, added: list[str], notes: list[str]) -> dict[str, Any]:  # fmt: skip
    from spherinator import __version__
    from spherinator.metrics import coverage

    cover = coverage(sample) if len(sample) else {}
    card = [f"{catalog['rows']:,} rows"]
    if cover:
        card.append(f"coverage {cover['coverage']:.0%} of {cover['cells']} cells")
    return {
        "spherinator_version": __version__,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "name": model.name,
        "model_class": model.model_class,
        "input_shape": list(model.input_shape),
        "z_dim": model.z_dim,
        "kind": renderer.kind,
        "checkpoint": str(model.checkpoint.resolve()) if model.checkpoint else None,
        "onnx_dir": str(model.onnx_dir.resolve()) if model.onnx_dir else None,
        "encoder": model.encoder_source,
        "decoder": model.decoder_source,
        "value_range": [renderer.low, renderer.high],
        "hips": {"path": "hips", "max_order": max_order, **hips},
        "catalog": {
            "parquet": "catalog.parquet",
            "votable": "catalog.vot",
            "healpix_order": max_order,
            "data_columns": added,
            **catalog,
        },  # fmt: skip
        "coverage": cover,
        "initial": initial,
        "card": card,
        "notes": notes,
    }


def page_config(info: dict[str, Any]) -> dict[str, Any]:
    """What ``index.html`` shows, from the contents of ``atlas.json``."""
    hips, catalog = info["hips"], info["catalog"]
    shown = f"{catalog['sources']:,}" + (" (a seeded sample)" if catalog["sources"] < catalog["rows"] else "")
    lo, hi = info["value_range"]
    drawn = "black … white" if info["kind"] == "image" else "plot bottom … top"
    shape = "x".join(map(str, info["input_shape"]))
    facts = [
        ["model", f"{info['model_class'].rsplit('.', 1)[-1] or 'model'}, input {shape}"],
        ["weights", Path(info["checkpoint"] or info["onnx_dir"]).name],
        ["rows", f"{catalog['rows']:,}"],
        ["sources shown", shown],
    ]  # fmt: skip
    if info["coverage"]:
        facts.append(["coverage", f"{info['coverage']['coverage']:.0%} of {info['coverage']['cells']} cells "
                      f"(uniform: {info['coverage']['uniform_coverage']:.0%})"])  # fmt: skip
    facts += [
        ["HiPS", f"orders 0–{hips['max_order']}, {hips['tiles']:,} tiles of {hips['tile_width']} px"],
        ["values", f"{lo:.3g} … {hi:.3g} → {drawn}"],
        ["decoded by", "onnxruntime" if info["decoder"].endswith("(onnxruntime)") else "torch"],
        ["written", info["created"].replace("T", " ").rstrip("Z") + " UTC"],
    ]
    return {
        "title": f"atlas · {info['name']}",
        "name": info["name"],
        "hips": "hips",
        "catalog": "catalog.vot",
        "catalog_name": "data",
        "ra": info["initial"]["ra"],
        "dec": info["initial"]["dec"],
        "fov": info["initial"]["fov"],
        "facts": facts,
    }
