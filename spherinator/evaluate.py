"""``spherinator evaluate``: how good is the sphere a checkpoint learned? Encodes every row of the data and reports
coverage, concentration, kNN accuracy of a label, kNN R^2 of per-row columns and trustworthiness, beside the same
figures for PCA of the inputs onto S^2 and kNN on the raw inputs (see :mod:`spherinator.metrics`).

``spherinator evaluate -c model.yaml -c data.yaml --ckpt_path last.ckpt --label-column label --columns a,b``
composes the configs exactly as ``spherinator fit`` does (the model comes from the checkpoint), prints a table and
writes ``sphere_report.json`` and, beside it, pictures: the positions on a Mollweide map (``sphere_map.png``, and
``sphere_map_<column>.png`` coloured by the label and each column), the decoder's images over the sphere
(``sphere_decoded.png``, images on S^2) and eight rows beside their reconstructions (``reconstructions.png``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPORT_NAME = "sphere_report.json"


def build_parser() -> argparse.ArgumentParser:
    """The arguments ``spherinator evaluate`` takes itself; everything else goes to the config parser of fit."""
    parser = argparse.ArgumentParser(
        prog="spherinator evaluate",
        description="Figures of the sphere a checkpoint learned, beside PCA of the inputs onto S^2. Other "
        "arguments (-c files, --data.init_args.path ...) compose as for 'spherinator fit'.",
        allow_abbrev=False,
    )
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="checkpoint written by 'spherinator fit'")
    parser.add_argument("--label-column", "--label_column", default=None, help="class label column: kNN-5 accuracy")
    parser.add_argument(
        "--columns", default="", help="comma-separated per-row columns (e.g. bulge_fraction,axis_ratio): kNN-10 R^2"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"directory for {REPORT_NAME} (default: the checkpoint's run directory)"
    )
    parser.add_argument(
        "--max-rows", "--max_rows", type=int, default=5000,
        help="use at most this many rows, drawn with --seed (the baselines hold their inputs in memory; "
        "default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the row sample (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device to encode on (default: cuda if available)")
    return parser


def load(cli_args: list[str], ckpt_path: str, extra_columns: list[str]) -> tuple[Any, Any]:
    """The checkpoint's model (weights loaded, eval mode) and the configs' datamodule, composed as ``spherinator
    fit`` composes them (:func:`spherinator.runs.build`); the datamodule returns dicts holding ``extra_columns``."""
    from spherinator.runs import build
    from spherinator.shapes import ConfigError

    if not Path(ckpt_path).is_file():
        what = "names no file" if not Path(ckpt_path).exists() else "is a directory"
        raise ConfigError(
            f"--ckpt_path {ckpt_path!r} {what}; evaluate needs the checkpoint file, e.g. "
            "runs/<name>/version_<n>/checkpoints/last.ckpt"
        )
    model, datamodule = build(cli_args, ckpt_path, extra_columns)
    check_columns(datamodule, extra_columns)
    return model, datamodule


def check_columns(datamodule: Any, names: list[str]) -> None:
    """Refuse, before anything is encoded, a column the data lacks or one that holds no numbers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spherinator.data import find_parquet_files
    from spherinator.shapes import ConfigError

    if not names or not hasattr(datamodule, "path"):
        return
    schema = pq.read_schema(find_parquet_files(datamodule.path)[0])
    for name in names:
        if name not in schema.names:
            raise ConfigError(f"column {name!r} is not in the data under {datamodule.path} (found: "
                              f"{', '.join(repr(n) for n in schema.names)}); give one of those")  # fmt: skip
        kind = schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise ConfigError(f"column {name!r} holds {kind}, not numbers: --label-column and --columns take "
                              "numeric per-row columns (a class label as an integer)")  # fmt: skip


def encode(
    model: Any, datamodule: Any, keep: list[str], max_rows: int, seed: int, device: torch.device
) -> tuple[dict[str, np.ndarray], int]:
    """Every row of the data (all splits, file order) through the encoder, with a progress bar.

    Returns ``location``, ``scale`` (VAE), ``kl`` (VAE), ``inputs`` (flattened) and the ``keep`` columns of at most
    ``max_rows`` rows drawn with ``seed``, and the number of rows in the data.
    """
    from tqdm import tqdm

    from spherinator.callbacks.sphere_quality import encode_rows, kl_per_row
    from spherinator.models.autoencoder import model_input

    datamodule.setup("predict")
    # A spherinator DataModule knows its row count up front, so the sample is drawn from all rows; for other data
    # the first max_rows rows are used.
    known = datamodule.split_rows("predict") if callable(getattr(datamodule, "split_rows", None)) else None
    chosen = None  # the first max_rows rows (no index array of max_rows entries: it may be huge)
    if known is not None and known > max_rows:
        chosen = np.sort(np.random.default_rng(seed).choice(known, max_rows, replace=False))
    loader = datamodule.predict_dataloader()
    parts: dict[str, list[np.ndarray]] = {}
    start = 0
    model.to(device)
    batches = len(loader) if hasattr(loader, "__len__") else None
    for batch_idx, batch in enumerate(tqdm(loader, total=batches, desc="encode", unit="batch", file=sys.stderr)):
        x = model_input(batch)
        n = len(x)
        if chosen is None:
            rows = np.arange(min(n, max(0, max_rows - start)))
        else:
            rows = chosen[(chosen >= start) & (chosen < start + n)] - start
        start += n
        if len(rows) == 0:
            continue
        on_device = (
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # lists of str stay
            if isinstance(batch, dict)
            else x.to(device)
        )
        out = encode_rows(model, on_device, batch_idx)
        if "scale" in out:
            out["kl"] = kl_per_row(out["location"], out["scale"])
        out["inputs"] = x.reshape(n, -1)
        index = torch.from_numpy(rows)
        for name in ("location", "scale", "kl", "inputs", *keep):
            if name in out:
                value = out[name].cpu()[index]
                parts.setdefault(name, []).append((value.float() if value.is_floating_point() else value).numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}, start


def split_counts(datamodule: Any) -> dict[str, int]:
    """Rows per split of a DataModule (train/val/test), empty for other data."""
    if not callable(getattr(datamodule, "split_rows", None)):
        return {}
    return {s: datamodule.split_rows(s) for s in ("train", "val", "test") if datamodule.split_rows(s)}


def _cells(methods: list[dict[str, Any] | None], key: str, sub: str | None = None, spec: str = ".3f") -> list[str]:
    """One figure of each method, formatted; blank where a method lacks it."""
    out = []
    for method in methods:
        value = (method or {}).get(key)
        if sub is not None:
            value = (value or {}).get(sub)
        out.append("" if value is None else format(value, spec))
    return out


def format_report(report: dict[str, Any]) -> str:
    """The report as a terminal table: one row per figure, columns sphere | PCA->S^2 | raw inputs."""
    sphere, pca, raw = report["sphere"], report.get("pca_sphere"), report.get("raw")
    methods = [sphere, pca, raw]
    header = ["figure", "sphere", "PCA->S^2" if pca is not None else "", f"raw ({raw['dim']}-d)" if raw else ""]
    rows = []
    if "coverage" in sphere:
        rows.append([f"coverage ({sphere['cells']} cells)", *_cells(methods, "coverage", spec=".0%")])
        rows.append(["  a uniform sample", *_cells([sphere], "uniform_coverage", spec=".0%"), "", ""])
    rows.append(["resultant length (1: a point)", *_cells(methods, "resultant_length")])
    if "trustworthiness" in sphere:
        rows.append(["trustworthiness (k=10)", *_cells(methods, "trustworthiness")])
    for name in sphere["knn_accuracy"]:
        label = f"kNN-5 accuracy {name} (chance {report['chance'][name]:.2f})"
        rows.append([label, *_cells(methods, "knn_accuracy", name)])
    for name in sphere["knn_r2"]:
        rows.append([f"kNN-10 R^2 {name}", *_cells(methods, "knn_r2", name)])
    if "concentration" in sphere:
        c = sphere["concentration"]
        rows.append(["scale p10 / p50 / p90", f"{c['p10']:.3g} / {c['p50']:.3g} / {c['p90']:.3g}", "", ""])
        rows.append(["  at the floor (1)", f"{c['at_floor']:.0%}", "", ""])
    if "kl_per_sample" in sphere:
        rows.append(["KL per sample (nats)", f"{sphere['kl_per_sample']:.3g}", "", ""])
    used = [i for i in range(4) if header[i] or any(r[i] for r in rows)]
    table = [[r[i] for i in used] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(used))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
             for r in table]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"warning: {m}" for m in report["warnings"]]
    return "\n".join(line.rstrip() for line in lines)


def evaluate(
    cli_args: list[str],
    ckpt_path: str,
    label_column: str | None = None,
    columns: list[str] | None = None,
    out: Path | None = None,
    max_rows: int = 5000,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Encode the data of the configs ``cli_args`` with the checkpoint, compute
    :func:`spherinator.metrics.sphere_report` against the PCA->S^2 baseline, write it to ``out/sphere_report.json``
    and return it (with ``path``)."""
    from spherinator.metrics import sphere_report
    from spherinator.runs import run_dir_of
    from spherinator.shapes import ConfigError

    columns = list(dict.fromkeys(c for c in columns or [] if c))  # a column named twice is scored once
    _check_options(max_rows, seed)
    target = _device(device)
    keep = ([label_column] if label_column else []) + [c for c in columns if c != label_column]
    model, datamodule = load(cli_args, ckpt_path, keep)
    rows, total = encode(model, datamodule, keep, max_rows, seed, target)
    if "location" not in rows or len(rows["location"]) < 10:
        raise ConfigError(f"the data hold {total} rows; a sphere report needs at least 10")
    beta = getattr(model, "beta", None)
    beta = float(beta) if isinstance(beta, int | float) else None
    report = sphere_report(
        rows["location"],
        scale=rows.get("scale"),
        inputs=rows["inputs"],
        labels={label_column: rows[label_column]} if label_column else None,
        columns={c: rows[c] for c in columns},
        kl=rows.get("kl"),
        beta=beta,
    )
    report = {
        "checkpoint": str(ckpt_path),
        "rows_in_data": total,
        "rows_used": len(rows["location"]),
        "sample_seed": seed if len(rows["location"]) < total else None,
        "splits": split_counts(datamodule),
        "beta": beta,
        **report,
    }
    directory = out if out is not None else run_dir_of(ckpt_path)
    path = directory / REPORT_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(report, indent=2) + "\n")  # first: a picture that fails loses no figure
        report["pictures"] = write_pictures(model, rows, [c for c in keep if c in rows], directory)
        _write_atomically(path, json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise ConfigError(
            f"cannot write the report into {directory} ({err.strerror or err}); give --out a writable directory "
            "with free space"
        ) from err
    return {**report, "path": str(path)}


def _check_options(max_rows: int, seed: int) -> None:
    from spherinator.shapes import ConfigError

    if max_rows < 10:
        raise ConfigError(f"--max-rows {max_rows} is too few to judge a sphere by; give at least 10 (default 5000)")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"--seed {seed} is out of range; give a seed from 0 to 2**63 - 1 (default 0)")


def _device(name: str | None) -> torch.device:
    """The torch device ``--device`` names (default: cuda if available), refused in one line where there is none."""
    from spherinator.shapes import ConfigError

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"--device {name!r} is no torch device ({err}); give cpu, cuda or cuda:<n>") from err
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(
            f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); give cpu, or leave "
            "--device out"
        )
    return device


def _write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it: a full disk leaves the old file or none."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_pictures(model: Any, rows: dict[str, np.ndarray], columns: list[str], directory: Path) -> dict[str, str]:
    """The pictures of the module docstring, written into ``directory``; {file name: path}."""
    from PIL import Image

    from spherinator.callbacks.latent_sphere import decoded_map, mollweide_map, on_s2, sphere_grid
    from spherinator.callbacks.log_reconstruction import reconstruction_picture

    location = torch.from_numpy(rows["location"]).float()
    pictures = {"sphere_map.png": mollweide_map(location)}
    for column in columns:
        values = torch.from_numpy(np.asarray(rows[column])).double()
        pictures[f"sphere_map_{re.sub(r'[^A-Za-z0-9_.-]', '_', column)}.png"] = mollweide_map(location, values, column)
    device = next(model.parameters()).device
    input_dim = tuple(model.input_dim) if model.input_dim is not None else None
    with torch.no_grad():
        if input_dim is not None and len(input_dim) in (2, 3):
            x = torch.from_numpy(rows["inputs"][:8]).float().reshape(-1, *input_dim)
            x_hat = model(x.to(device)).float().cpu()
            pictures["reconstructions.png"] = reconstruction_picture(x, x_hat)
        if on_s2(location) and input_dim is not None and len(input_dim) == 3:
            points = sphere_grid()
            pictures["sphere_decoded.png"] = decoded_map(points, model.decode(points.to(device)).float().cpu())
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, image in pictures.items():
        partial = directory / f".{name}.partial"
        try:  # a full disk leaves no cut-short picture under its name
            Image.fromarray(image).save(partial, format="PNG")
            partial.replace(directory / name)
        finally:
            partial.unlink(missing_ok=True)
        written[name] = str(directory / name)
    return written


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``spherinator evaluate``: a table on the terminal, ``sphere_report.json`` on disk; bad input
    ends in one line naming the value and the fix (exit status 2)."""
    from spherinator.errors import one_line_errors

    args, rest = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    columns = [c.strip() for c in args.columns.split(",")]
    with one_line_errors("spherinator evaluate", ["predict", *rest]):
        report = evaluate(
            rest, args.ckpt_path, args.label_column, columns, args.out, args.max_rows, args.seed, args.device
        )
    used, total = report["rows_used"], report["rows_in_data"]
    splits = " + ".join(f"{n} {s}" for s, n in report["splits"].items())
    which = f"every row of the data ({splits})" if used == total else f"{used} of {total} rows (seed {args.seed})"
    print(f"sphere report of {args.ckpt_path}: {which}")
    print(format_report(report))
    print(f"wrote {report['path']} and {len(report['pictures'])} pictures: {', '.join(report['pictures'])}")
