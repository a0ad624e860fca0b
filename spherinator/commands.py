"""The ``spherinator`` command: which subcommand runs, ``--help`` and ``--version``.

This module imports nothing heavy: ``spherinator --help`` and ``--version`` answer without importing torch or
Lightning, and each subcommand imports only what it needs (``export`` onnx, ``fit`` Lightning, never submitit).
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
from pathlib import Path

from spherinator.errors import LIGHTNING_COMMANDS, OutputError, one_line_errors  # noqa: F401 (re-exported)
from spherinator.version import __version__

# One line each, in the order `spherinator --help` lists them. The first four are LightningCLI's.
COMMANDS = {
    "fit": "train a model from -c config files; --ckpt_path resumes a run",
    "validate": "run a trained model (--ckpt_path) on the validation set",
    "test": "run a trained model (--ckpt_path) on the test set",
    "predict": "write each row's place on the sphere to embeddings.parquet",
    "export": "write ONNX files of a checkpoint, checked against torch",
    "evaluate": "figures of the sphere a checkpoint learned, beside PCA",
    "atlas": "a run's sphere as a HiPS and its data as a catalog, in Aladin Lite",
    "examples": "copy the example experiments that ship with spherinator",
    "convert-upstream": "an upstream Spherinator checkpoint (+ its cli-config.yaml) as one of ours",
}


def build_parser() -> argparse.ArgumentParser:
    """The top level of ``spherinator``, for ``--help`` and ``--version``; each command parses its own arguments."""
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {line}" for name, line in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="spherinator",
        usage="spherinator [-h] [--version] COMMAND ...",
        description="Autoencoders with a spherical latent space: train, evaluate and export models.\n\n"
        f"commands:\n{listing}",
        epilog="'spherinator COMMAND --help' lists the options of a command (-c/--config and --print_config\n"
        "go after the command). Runs on a Slurm cluster: spherinator-submit --help.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"spherinator {__version__}")
    return parser


def examples(argv: list[str]) -> None:
    """``spherinator examples [DIR]``: copy the shipped experiments to ``DIR/experiments`` (files already there and
    different are named and left alone), so the README's ``-c experiments/...`` commands run from ``DIR``."""
    from spherinator.packaged import experiments_dir

    parser = argparse.ArgumentParser(prog="spherinator examples", description=COMMANDS["examples"])
    parser.add_argument("dir", nargs="?", default=".", type=Path, help="where experiments/ goes (default: here)")
    target = parser.parse_args(argv).dir / "experiments"
    with one_line_errors("spherinator examples", []):
        sources = sorted(experiments_dir().glob("*.yaml"))
        _check_example_targets(target, [target / source.name for source in sources])
        kept = []
        for source in sources:
            dest = target / source.name
            if dest.exists() and dest.read_bytes() != source.read_bytes():
                kept.append(dest.name)
            elif not dest.exists():
                _copy(source, dest)
    print(f"example experiments in {target}")
    if kept:
        print(f"left as they were (they differ from the shipped ones): {', '.join(kept)}", file=sys.stderr)


def _check_example_targets(target: Path, dests: list[Path]) -> None:
    """Refuse, before anything is written, a ``target`` folder or file in it that would send the copy elsewhere: a
    link that points nowhere (writing through it would make a file outside ``target``), a folder where a file goes."""
    for path in [target.parent, target, *dests]:
        if path.is_symlink() and not path.exists():
            raise OutputError(
                f"{path} is a link to {os.readlink(path)}, which does not exist: spherinator examples writes no file "
                "through it (it would land outside the folder); remove the link or give another DIR"
            )
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} is a file, not a folder: give a DIR without a file named experiments in it")
    for dest in dests:
        if dest.exists() and not dest.is_file():
            raise OutputError(f"{dest} is no file: move it away to get the shipped {dest.name}")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot make the folder {target} ({err.strerror}): give a DIR you can write to") from err


def _copy(source: Path, dest: Path) -> None:
    """Copy under a temporary name and rename: a full disk leaves no cut-short file that a rerun would keep."""
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        shutil.copyfile(source, partial)
        os.replace(partial, dest)
    except OSError as err:
        raise OutputError(f"cannot write {dest} ({err.strerror}): give a DIR you can write to") from err
    finally:
        partial.unlink(missing_ok=True)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``spherinator`` command."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser = build_parser()
        if not argv:
            parser.print_usage(sys.stderr)
            parser.exit(2, f"spherinator: error: give a command: {', '.join(COMMANDS)} (see spherinator --help)\n")
        parser.parse_args(argv[:1])  # prints the help or the version and exits
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        message = f"unknown command {argv[0]!r}; {hint}commands: {', '.join(COMMANDS)}"
        print(f"spherinator: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    if argv[0] == "export":
        from spherinator.export import main as export_main

        export_main(argv[1:])
    elif argv[0] == "evaluate":
        from spherinator.evaluate import main as evaluate_main

        evaluate_main(argv[1:])
    elif argv[0] == "atlas":
        from spherinator.atlas import main as atlas_main

        atlas_main(argv[1:])
    elif argv[0] == "examples":
        examples(argv[1:])
    elif argv[0] == "convert-upstream":
        from spherinator.upstream import main as convert_main

        convert_main(argv[1:])
    else:  # fit, validate, test, predict, and LightningCLI's own options (-c before the command, --print_config)
        from spherinator.cli import main as lightning_main

        lightning_main(argv)


if __name__ == "__main__":
    main()
