"""Gozon order and payment platform."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gozon")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
