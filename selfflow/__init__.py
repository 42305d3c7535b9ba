"""selfflow: Self-Flow training of one transformer trunk on images, video and audio."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("selfflow")  # the installed distribution's (pyproject.toml)
except PackageNotFoundError:
    __version__ = "unknown (not installed)"
