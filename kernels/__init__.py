"""EAD's sampling kernel: per-row scheduled temperatures (installed as ``ead_kernels``),
and in :mod:`ead_kernels.target_stats` the per-row ``lse`` and entropy that the in-pass
target log-probs and the entropy-driven schedules need, alone or taken in the scale's
own pass (``apply_schedule_with_stats_``).

Importing this package needs torch only; Triton is imported when the Triton path is
first used (see :mod:`ead_kernels.temperature`).
"""

from . import temperature
from .target_stats import apply_schedule_with_stats_
from .temperature import *  # noqa: F403 - the public API is temperature.__all__ and the fused scale

__all__ = [*temperature.__all__, "apply_schedule_with_stats_"]
