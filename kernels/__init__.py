"""EAD's sampling kernel: per-row scheduled temperatures (installed as ``ead_kernels``),
and in :mod:`ead_kernels.target_stats` the per-row ``lse`` and entropy that the in-pass
target log-probs and the entropy-driven schedules need.

Importing this package needs torch only; Triton is imported when the Triton path is
first used (see :mod:`ead_kernels.temperature`).
"""

from . import temperature
from .temperature import *  # noqa: F403 - the public API is temperature.__all__

__all__ = temperature.__all__
