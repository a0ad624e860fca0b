"""The sphere atlas: a trained model's decoded sphere as a HiPS, its data as a catalog, browsable in Aladin Lite.

``spherinator atlas RUN -c data.yaml`` (or :func:`write_atlas`) writes ``RUN/atlas/``; ``spherinator atlas serve
DIR`` serves it on 127.0.0.1; ``spherinator atlas sweep DIR`` (:func:`write_sweep_page`) puts a sweep's spheres side
by side. See :mod:`spherinator.atlas.build` for the layout and :mod:`spherinator.atlas.sky` for the RA/Dec
convention. The heavy parts (torch, onnxruntime, astropy) load on first use: ``spherinator atlas --help`` is quick.
"""

from importlib import import_module

from spherinator.errors import AtlasError, NotASphereError  # noqa: F401 (re-exported)

MAX_ORDER = 9  # deepest HiPS order the atlas writes: 3.1 million tiles at order 9


_LAZY = {
    "SphereModel": "model",
    "default_out": "build",
    "main": "cli",
    "make_server": "serve",
    "open_model": "model",
    "serve": "serve",
    "write_atlas": "build",
    "write_sweep_page": "page",
}

__all__ = ["MAX_ORDER", "AtlasError", "NotASphereError", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"spherinator.atlas.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'spherinator.atlas' has no attribute {name!r}")
