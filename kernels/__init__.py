"""EAD's sampling kernel: per-row scheduled temperatures (installed as ``ead_kernels``).

Importing this package needs torch only; Triton is imported when the Triton path is
first used (see :mod:`ead_kernels.temperature`).
"""

from .temperature import (
    KIND_CONSTANT,
    KIND_EAD,
    KIND_NONE,
    KIND_REVERSE,
    NUM_PARAMS,
    P_SCALE,
    P_TAU,
    P_TAU_MAX,
    P_TAU_MIN,
    P_WARMUP,
    apply_schedule_,
    apply_schedule_torch_,
    apply_schedule_triton_,
    schedule_temperatures,
    triton_available,
)

__all__ = [
    "KIND_CONSTANT",
    "KIND_EAD",
    "KIND_NONE",
    "KIND_REVERSE",
    "NUM_PARAMS",
    "P_SCALE",
    "P_TAU",
    "P_TAU_MAX",
    "P_TAU_MIN",
    "P_WARMUP",
    "apply_schedule_",
    "apply_schedule_torch_",
    "apply_schedule_triton_",
    "schedule_temperatures",
    "triton_available",
]
