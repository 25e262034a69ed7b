"""EAD's sampling kernel: per-row scheduled temperatures (installed as ``ead_kernels``).

Importing this package needs torch only; Triton is imported when the Triton path is
first used (see :mod:`ead_kernels.temperature`).
"""

from . import temperature
from .temperature import *  # noqa: F403 - the public API is temperature.__all__

__all__ = temperature.__all__
