"""Export a trained model to three ONNX graphs (encoder, decoder, reconstruction) and prove them against torch."""

from __future__ import annotations

import json
import math
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spherinator.errors import ValidationError  # noqa: F401 (re-exported)
from spherinator.export.checkpoint import ExportError, load_model
from spherinator.staging import move_files, output_dir_contents, staged_dir

GRAPHS = ("encoder", "decoder", "reconstruction")
REPORT_NAME = "export_report.json"
MIN_OPSET = 18
MAX_BATCH_SIZE = 65_536
# Validation inputs are float32 tensors of batch * prod(input shape) elements: 2^26 is 256 MiB (the outputs and
# the model's activations take as much again, several times).
MAX_VALIDATION_ELEMENTS = 2**26


class _Encode(nn.Module):
    """``x -> model.encode(x)``: the unit-normalised location (VAE) or the code (Autoencoder)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)  # (B, z_dim)


class _Decode(nn.Module):
    """``z -> model.decode(z)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z)  # (B, *input_dim)


class _Reconstruct(nn.Module):
    """``x -> model(x)``, the deterministic reconstruction (the VAE decodes its location)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, *input_dim)


def export_onnx(
    checkpoint: str | Path,
    export_path: str | Path,
    config: str | Path | None = None,
    opset: int = MIN_OPSET,
    validate: bool = True,
    batch_sizes: Sequence[int] = (1, 7, 64),
    atol: float = 1e-5,
    rtol: float = 1e-3,
    overwrite: bool = False,
    trace_batch_size: int = 2,
    progress: Callable[[str], None] | None = None,
    trust: bool = False,
) -> dict[str, Any]:
    """Export a checkpoint to ``encoder.onnx``, ``decoder.onnx`` and ``reconstruction.onnx`` under ``export_path``.

    Each graph takes one float32 input with a dynamic batch axis: ``x`` (B, *input_dim) for the encoder and the
    reconstruction, ``z`` (B, z_dim) for the decoder. The encoder outputs ``z`` (the unit-normalised location of
    a VAE, the code of an Autoencoder); the decoder and the reconstruction output ``x_hat``. Each file is
    self-contained (weights inside, below 2 GB) and carries metadata: graph, model_class, z_dim, input_shape,
    spherinator_version, training_config.

    Validation (on by default) runs ``onnx.checker`` and then compares onnxruntime with the torch model in eval
    mode at every batch size in ``batch_sizes``: an element passes when ``|ort - torch| <= atol + rtol*|torch|``.
    The report (returned, and written to ``export_path/export_report.json``) holds the differences per graph
    and batch size.

    Args:
        checkpoint: Lightning checkpoint (.ckpt); alone it suffices to rebuild the model.
        export_path: Directory to write; it must not exist or be empty unless ``overwrite``.
        config: The run's config.yaml (``model`` section), to build the architecture from instead.
        opset: ONNX opset (>= 18).
        validate: Check the graphs against torch.
        batch_sizes: Batch sizes to validate at.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        overwrite: Replace the export files in an existing ``export_path`` (other files are kept).
        trace_batch_size: Batch size of the example input used for tracing; the batch axis stays dynamic.
        progress: Called with one line per graph (export time, validation result), e.g. ``print``.
        trust: Read a checkpoint that holds pickled Python objects (a model built in Python stores its modules
            in the hyper-parameters) in full. Unpickling runs code named by the file: only for files you trust.

    Raises:
        ExportError: bad checkpoint/config (or one that needs ``trust``), an existing ``export_path``, or a graph
            that cannot be exported.
        ValidationError: onnxruntime and torch disagree beyond the tolerances (files and report are written).
    """
    options = ExportOptions(opset=opset, validate=validate, batch_sizes=tuple(batch_sizes), atol=atol, rtol=rtol,
                            overwrite=overwrite, trace_batch_size=trace_batch_size, trust=trust)  # fmt: skip
    return export_model(checkpoint, export_path, options, config=config, progress=progress)


@dataclass(frozen=True)
class ExportOptions:
    """How :func:`export_onnx` exports and validates; a bad value raises :class:`ExportError` naming it.

    Attributes:
        opset: ONNX opset, 18 up to the newest onnx knows.
        validate: Compare onnxruntime with torch.
        batch_sizes: Batch sizes to validate at, each >= 1.
        atol: Absolute tolerance, >= 0.
        rtol: Relative tolerance, >= 0.
        overwrite: Replace the export files in an existing directory (other files are kept).
        trace_batch_size: Batch size of the tracing example, >= 1.
        trust: Read a checkpoint holding pickled Python objects in full.
    """

    opset: int = MIN_OPSET
    validate: bool = True
    batch_sizes: tuple[int, ...] = (1, 7, 64)
    atol: float = 1e-5
    rtol: float = 1e-3
    overwrite: bool = False
    trace_batch_size: int = 2
    trust: bool = False

    def __post_init__(self) -> None:
        _check_arguments(self.opset, self.batch_sizes, self.atol, self.rtol, self.trace_batch_size)


def export_model(
    checkpoint: str | Path,
    export_path: str | Path,
    options: ExportOptions,
    config: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`export_onnx` with its settings in one checked object: load, stage, export each graph, publish."""
    export_path = Path(export_path)
    _check_export_path(export_path, options.overwrite)
    loaded = load_model(checkpoint, config, trust=options.trust)
    model = loaded.model
    if model.input_dim is None or model.z_dim is None:
        raise ExportError(
            f"{loaded.class_path} from {loaded.source} does not know its input shape (input_dim={model.input_dim}) "
            f"or latent size (z_dim={model.z_dim}); set the encoder's input_dim (and output_dim) in the model, or "
            "pass the config.yaml of a 'spherinator fit' run, which fills them from the data"
        )
    elements = max(options.batch_sizes) * math.prod(int(d) for d in model.input_dim)
    if options.validate and elements > MAX_VALIDATION_ELEMENTS:
        raise ExportError(f"batch_sizes {list(options.batch_sizes)}: a batch of {max(options.batch_sizes):,} "
                          f"inputs of shape {tuple(model.input_dim)} is {elements * 4 / 2**30:.1f} GiB; validate at "
                          "smaller batch sizes, e.g. --batch_sizes 1 7 64")  # fmt: skip
    report = _new_report(checkpoint, config, loaded.class_path, model, options)
    metadata = {
        "model_class": loaded.class_path,
        "z_dim": str(report["z_dim"]),
        "input_shape": json.dumps(report["input_shape"]),
        "spherinator_version": report["versions"]["spherinator"],
        "training_config": loaded.training_config,
    }
    failures = []
    with staged_dir(export_path, ExportError, "export") as staging:
        for graph in GRAPHS:
            entry = _export_one(graph, model, staging, options, {**metadata, "graph": graph})
            if options.validate and not entry["validation"]["passed"]:
                failures.append((graph, entry["validation"]))
            report["graphs"][graph] = entry
            if progress is not None:
                progress(_progress_line(entry))
        report["passed"] = not failures if options.validate else None
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        move_files(staging, export_path, replaces=[f"{graph}.onnx*" for graph in GRAPHS])
    if failures:
        raise ValidationError(_failure_message(failures, export_path / REPORT_NAME, options.atol, options.rtol), report)
    return report


def _new_report(checkpoint: str | Path, config: str | Path | None, class_path: str, model: nn.Module,
                options: ExportOptions) -> dict[str, Any]:  # fmt: skip
    """The export report before any graph is exported."""
    return {
        "checkpoint": str(Path(checkpoint).resolve()),
        "config": str(Path(config).resolve()) if config is not None else None,
        "model_class": class_path,
        "z_dim": int(model.z_dim),
        "input_shape": [int(d) for d in model.input_dim],
        "opset": options.opset,
        "versions": _versions(),
        "validation": {
            "enabled": options.validate,
            "batch_sizes": list(options.batch_sizes),
            "atol": options.atol,
            "rtol": options.rtol,
        },  # fmt: skip
        "graphs": {},
    }


def _export_one(graph: str, model: nn.Module, staging: Path, options: ExportOptions,
                metadata: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """Export one graph into ``staging`` and validate it (if asked): its entry of the report."""
    input_shape = tuple(int(d) for d in model.input_dim)
    module, input_name, output_name = _graph_module(graph, model)
    example = _example_input(graph, model, input_shape, options.trace_batch_size, seed=0)
    file = staging / f"{graph}.onnx"
    start = time.perf_counter()
    _export_graph(module, graph, input_name, output_name, example, file, options.opset, metadata)
    entry: dict[str, Any] = {
        "file": f"{graph}.onnx",
        "input": input_name,
        "output": output_name,
        "export_seconds": round(time.perf_counter() - start, 3),
        "size_bytes": _size_with_sidecars(file),
    }
    if options.validate:
        entry["validation"] = validate_graph(
            file, lambda b: _example_input(graph, model, input_shape, b, seed=b), module, input_name,
            options.batch_sizes, options.atol, options.rtol,
        )  # fmt: skip
    return entry


def validate_graph(
    file: str | Path,
    make_input: Callable[[int], torch.Tensor],
    reference: nn.Module,
    input_name: str,
    batch_sizes: Sequence[int] = (1, 7, 64),
    atol: float = 1e-5,
    rtol: float = 1e-3,
) -> dict[str, Any]:
    """Check one ONNX file and compare onnxruntime with ``reference`` (torch) on ``make_input(b)`` per batch size.

    Returns:
        ``{"checker": "ok", "passed": bool, "batches": [{"batch_size", "max_abs_diff", "max_rel_diff",
        "passed", "worst": {...}}, ...]}``; ``worst`` (index, torch and onnxruntime values, allowed difference)
        is given for the element furthest beyond its tolerance.

    Raises:
        ExportError: the file fails ``onnx.checker``, cannot be loaded by onnxruntime, or has no dynamic batch
            axis on its input ``input_name``.
    """
    import onnx
    import onnxruntime as ort

    file = Path(file)
    try:
        onnx.checker.check_model(str(file), full_check=True)
    except Exception as err:
        raise ExportError(f"{file.name} fails onnx.checker: {err}") from err
    try:
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError(f"onnxruntime {ort.__version__} cannot load {file.name}: {err}") from err
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [input_name]:
        raise ExportError(f"{file.name} has inputs {[i.name for i in inputs]}; expected exactly [{input_name!r}]")
    if isinstance(inputs[0].shape[0], int):
        raise ExportError(
            f"{file.name}: input {input_name!r} has a fixed batch size {inputs[0].shape[0]} instead of a dynamic axis"
        )

    reference.eval()
    batches = []
    for batch_size in batch_sizes:
        x = make_input(batch_size)
        with torch.no_grad():
            expected = reference(x).numpy()
        (actual,) = session.run(None, {input_name: x.numpy()})
        batches.append(_compare(batch_size, expected, actual, atol, rtol))
    return {"checker": "ok", "passed": all(b["passed"] for b in batches), "batches": batches}


def _compare(batch_size: int, expected: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    if expected.shape != actual.shape:
        return {
            "batch_size": batch_size,
            "passed": False,
            "max_abs_diff": None,
            "max_rel_diff": None,
            "worst": {"reason": f"output shape {list(actual.shape)} != torch {list(expected.shape)}"},
        }
    expected64, actual64 = expected.astype(np.float64), actual.astype(np.float64)
    diff = np.abs(actual64 - expected64)
    # NaN/inf where torch has none (or the reverse) counts as an infinite difference.
    diff = np.where(np.isnan(expected64) & np.isnan(actual64), 0.0, np.nan_to_num(diff, nan=np.inf))
    allowed = atol + rtol * np.abs(np.nan_to_num(expected64))
    excess = diff - allowed
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
    return {
        "batch_size": batch_size,
        "passed": bool(np.all(excess <= 0)),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / np.maximum(np.abs(expected64), 1e-12)).max()),
        "worst": {
            "index": [int(i) for i in worst],
            "torch": float(expected64[worst]),
            "onnxruntime": float(actual64[worst]),
            "abs_diff": float(diff[worst]),
            "allowed": float(allowed[worst]),
        },
    }


def _graph_module(graph: str, model: nn.Module) -> tuple[nn.Module, str, str]:
    wrappers = {
        "encoder": (_Encode, "x", "z"),
        "decoder": (_Decode, "z", "x_hat"),
        "reconstruction": (_Reconstruct, "x", "x_hat"),
    }
    cls, input_name, output_name = wrappers[graph]
    return cls(model).eval(), input_name, output_name


def _example_input(graph: str, model: nn.Module, input_shape: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    """Random ``x`` (B, *input_shape) in [0, 1), or for the decoder the latents the encoder gives for such x."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *input_shape), generator=generator)
    if graph != "decoder":
        return x
    with torch.no_grad():
        return model.encode(x).detach().float().contiguous()  # (B, z_dim)


def _export_graph(
    module: nn.Module,
    graph: str,
    input_name: str,
    output_name: str,
    example: torch.Tensor,
    file: Path,
    opset: int,
    metadata: dict[str, str],
) -> None:
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                verbose=False,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes={input_name: {0: torch.export.Dim("batch")}},
                opset_version=opset,
                external_data=False,
            )
    except Exception as err:
        raise ExportError(
            f"{graph}.onnx: torch.onnx.export failed for {type(module.model).__name__}.{_METHOD[graph]} at opset "
            f"{opset}: {_export_failure_summary(err)}\nReplace that op in the model (or try another --opset)"
        ) from err
    produced = program.model.opset_imports.get("", None)
    if produced != opset:
        raise ExportError(
            f"{graph}.onnx: opset {opset} was asked for but the exporter produced opset {produced} (the version "
            f"conversion failed); use an opset from {MIN_OPSET} up"
        )
    program.model.metadata_props.update(metadata)
    program.model.doc_string = f"spherinator {graph}: {input_name} -> {output_name}"
    # external_data only for graphs above 2 GB (protobuf's limit); below that, one self-contained file.
    program.save(file, external_data=None)


def _export_failure_summary(err: Exception) -> str:
    """The useful part of a torch.onnx error: the op without translation, else the exception summary."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # drop terminal colours
    op = re.search(r"op='([\w.]+)'", text)
    if "No ONNX function found" in text and op:
        return f"the op {op.group(1)} has no ONNX translation"
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and line.strip() != "⬆️"]
    return f"{type(err).__name__}: " + " | ".join(lines[:4])


_METHOD = {"encoder": "encode(x)", "decoder": "decode(z)", "reconstruction": "forward(x)"}


def _check_arguments(opset: int, batch_sizes: Sequence[int], atol: float, rtol: float, trace_batch_size: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"opset {opset} is not supported: choose {MIN_OPSET}..{newest} (below {MIN_OPSET} the torch exporter "
            "cannot convert graphs with normalize; the default is 18)"
        )
    if not batch_sizes or any(not 1 <= int(b) <= MAX_BATCH_SIZE for b in batch_sizes):
        raise ExportError(f"batch_sizes {list(batch_sizes)} must be a non-empty list of positive integers up to "
                          f"{MAX_BATCH_SIZE:,}")  # fmt: skip
    if not (0 <= atol < math.inf and 0 <= rtol < math.inf):  # NaN fails every comparison; inf checks nothing
        raise ExportError(f"tolerances must be >= 0 and finite (got atol={atol}, rtol={rtol})")
    if trace_batch_size < 1:
        raise ExportError(f"trace_batch_size {trace_batch_size} must be >= 1")


def _check_export_path(export_path: Path, overwrite: bool) -> None:
    contents = output_dir_contents(export_path, f"export_path '{export_path}'", ExportError,
                                   "pass a directory to write the ONNX files into")  # fmt: skip
    if contents and not overwrite:
        shown = ", ".join(contents[:5]) + (f" (+{len(contents) - 5} more)" if len(contents) > 5 else "")
        raise ExportError(
            f"export_path '{export_path}' already exists and is not empty (contains: {shown}); pass overwrite=True "
            "(--overwrite) to replace the export files, or choose a new directory"
        )


def _size_with_sidecars(file: Path) -> int:
    return sum(p.stat().st_size for p in file.parent.glob(f"{file.name}*"))


def _progress_line(entry: dict[str, Any]) -> str:
    line = f"{entry['file']}: exported in {entry['export_seconds']:.1f} s ({entry['size_bytes'] / 1e6:.2f} MB)"
    validation = entry.get("validation")
    if validation is None:
        return line + ", not validated"
    sizes = ", ".join(str(b["batch_size"]) for b in validation["batches"])
    worst = max((b["max_abs_diff"] if b["max_abs_diff"] is not None else np.inf) for b in validation["batches"])
    verdict = "matches torch" if validation["passed"] else "DIFFERS from torch"
    return line + f", onnxruntime {verdict} at batch {sizes} (max |diff| {worst:.2e})"


def _failure_message(failures: list[tuple[str, dict[str, Any]]], report_path: Path, atol: float, rtol: float) -> str:
    lines = ["ONNX validation failed: onnxruntime differs from torch beyond the tolerances"]
    for graph, validation in failures:
        bad = [b for b in validation["batches"] if not b["passed"]]
        worst = max(bad, key=lambda b: np.inf if b["max_abs_diff"] is None else b["max_abs_diff"])
        detail = worst["worst"]
        if "reason" in detail:
            lines.append(f"  {graph}.onnx at batch {worst['batch_size']}: {detail['reason']}")
            continue
        lines.append(
            f"  {graph}.onnx at batch {worst['batch_size']}: worst |diff| {detail['abs_diff']:.3e} at index "
            f"{detail['index']} (torch {detail['torch']:.6g}, onnxruntime {detail['onnxruntime']:.6g}; allowed "
            f"{detail['allowed']:.3e} = atol {atol:g} + rtol {rtol:g} * |torch|); failing batch sizes: "
            f"{[b['batch_size'] for b in bad]}"
        )
    lines.append(
        f"The files are written but not trustworthy; see {report_path}. Loosen atol/rtol only if the difference "
        "is acceptable, else try another opset or report the op."
    )
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from spherinator.version import __version__

    return {
        "spherinator": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }
