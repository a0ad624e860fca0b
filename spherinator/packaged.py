"""Files that ship with spherinator: the example experiments and the Slurm site presets.

In a checkout (and an editable install of it) they are the top-level folders ``experiments/`` and
``slurm/presets/``. A wheel carries copies of both inside the package, under ``spherinator/_share/``
(``pyproject.toml``, ``force-include``), so an installed spherinator finds them without a checkout.

Site presets are looked up along a search path: the folders in ``$SPHERINATOR_PRESET_PATH`` (separated by
``os.pathsep``, the first match wins), then the presets that ship with spherinator.
"""

from __future__ import annotations

import os
from pathlib import Path

PRESET_PATH_ENV = "SPHERINATOR_PRESET_PATH"

_PACKAGE = Path(__file__).resolve().parent


def shipped(*parts: str) -> Path:
    """The shipped folder ``parts`` (``"experiments"``, ``"slurm", "presets"``): the wheel's copy inside the package
    when there is one, else that folder of the checkout the package is imported from."""
    inside = _PACKAGE.joinpath("_share", *parts)
    return inside if inside.is_dir() else _PACKAGE.parent.joinpath(*parts)


def experiments_dir() -> Path:
    """The example experiments (``vae_cnn3.yaml``, ``demo.yaml``, ...)."""
    return shipped("experiments")


def preset_dirs() -> list[Path]:
    """Where ``--preset NAME`` looks for ``NAME.yaml``, first match first: ``$SPHERINATOR_PRESET_PATH``, then the
    presets that ship with spherinator."""
    extra = [Path(p).expanduser() for p in os.environ.get(PRESET_PATH_ENV, "").split(os.pathsep) if p]
    return [*extra, shipped("slurm", "presets")]
