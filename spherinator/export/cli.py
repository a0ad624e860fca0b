"""``spherinator export``: checkpoint -> encoder.onnx, decoder.onnx, reconstruction.onnx (+ validation report)."""

from __future__ import annotations

import argparse
import sys

from spherinator.export.checkpoint import ExportError
from spherinator.export.onnx_export import MIN_OPSET, export_onnx
from spherinator.staging import exit_on_sigterm


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``spherinator export``."""
    parser = argparse.ArgumentParser(
        prog="spherinator export",
        description="Export a trained spherinator checkpoint to ONNX (encoder.onnx, decoder.onnx, "
        "reconstruction.onnx) and validate the graphs against torch with onnxruntime.",
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) written by 'spherinator fit'")
    parser.add_argument(
        "-o", "--export_path", "--export-path", required=True, help="directory to write the ONNX files into"
    )
    parser.add_argument(
        "-c", "--config", default=None, help="the run's config.yaml (optional: the checkpoint alone suffices)"
    )
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help="ONNX opset, >= 18 (default: %(default)s)")
    parser.add_argument("--no-validate", dest="validate", action="store_false", help="skip the onnxruntime check")
    parser.add_argument(
        "--batch_sizes", "--batch-sizes", type=int, nargs="+", default=[1, 7, 64],
        help="batch sizes to validate at (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default: %(default)s)")
    parser.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace the export files in an existing directory")
    parser.add_argument(
        "--trust-checkpoint", "--trust_checkpoint", dest="trust", action="store_true",
        help="read a checkpoint that holds pickled Python objects (a model built in Python stores its modules in "
        "the hyper-parameters); unpickling runs code from the file, so only for files you trust",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run ``spherinator export``; prints one line per graph; a bad input ends in one line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        with exit_on_sigterm():  # a kill (scancel) removes the staged files on its way out
            report = _export(args)
    except ExportError as err:
        print(f"spherinator export: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None  # a user error, as in every other command
    except OSError as err:  # a full or read-only disk while writing: the staged files are gone, nothing published
        where = err.filename or args.export_path
        print(
            f"spherinator export: error: cannot write the export to {where} ({err.strerror or err}); free space or "
            "give -o a writable directory",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    print(
        f"wrote {', '.join(g['file'] for g in report['graphs'].values())} and export_report.json to {args.export_path}"
    )


def _export(args: argparse.Namespace) -> dict:
    """:func:`export_onnx` with the parsed command line."""
    return export_onnx(
        args.checkpoint,
        args.export_path,
        config=args.config,
        opset=args.opset,
        validate=args.validate,
        batch_sizes=args.batch_sizes,
        atol=args.atol,
        rtol=args.rtol,
        overwrite=args.overwrite,
        progress=print,
        trust=args.trust,
    )
