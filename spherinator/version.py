"""The installed spherinator's version, in a module that imports nothing of spherinator (any module may use it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spherinator")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
