"""ead-server: Exploratory Annealed Decoding for vLLM (schedules, sampler, server)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ead-server")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

