"""The sphere atlas: a trained model's decoded sphere as a HiPS, its data as a catalog, browsable in Aladin Lite.

``spherinator atlas RUN -c data.yaml`` (or :func:`write_atlas`) writes ``RUN/atlas/``; ``spherinator atlas serve
DIR`` serves it on 127.0.0.1; ``spherinator atlas sweep DIR`` (:func:`write_sweep_page`) puts a sweep's spheres side
by side. See :mod:`spherinator.atlas.build` for the layout and :mod:`spherinator.atlas.sky` for the RA/Dec
convention.
"""

from spherinator.atlas.build import default_out, write_atlas
from spherinator.atlas.cli import main
from spherinator.atlas.model import AtlasError, SphereModel, open_model
from spherinator.atlas.page import write_sweep_page
from spherinator.atlas.serve import make_server, serve

__all__ = [
    "AtlasError",
    "SphereModel",
    "default_out",
    "main",
    "make_server",
    "open_model",
    "serve",
    "write_atlas",
    "write_sweep_page",
]
