"""Per-row scheduled temperature: the one op EAD adds to a sampling step.

Every row of a batch may follow its own schedule (SPEC section 1) and sits at its own
position ``t``, so the temperature is a function of ``(t, kind, params)`` per row. The
rows are described by three small device tensors that the engine keeps up to date:

* ``positions`` int ``[B]``: ``t``, the tokens the completion generated before this one;
* ``kinds`` int ``[B]``: ``KIND_NONE`` / ``KIND_EAD`` / ``KIND_REVERSE`` / ``KIND_CONSTANT``;
* ``params`` float64 ``[B, NUM_PARAMS]``: ``tau_max, tau_min, tau, warmup, scale`` with
  ``scale = time_scale * decay``.

Two implementations with one rounding recipe, so that they agree bit for bit:

1. the schedule in float64 (``exp`` overflows to ``inf`` far past the anneal and the
   clamp then picks ``tau_min`` / ``tau_max``, as the pure-Python reference does);
2. the float64 temperature rounded once to float32;
3. ``row = (row.float() / temp_f32).to(row.dtype)`` with an IEEE round-to-nearest
   division (Triton's ``/`` on float32 is an approximate ``div.full``; ``div_rn`` is not).

The PyTorch path is the CPU path and the test oracle. The Triton path fuses the schedule
into the rescale: one launch, no host work per step and no per-row temperature tensor,
where the PyTorch path needs about twenty tiny ops (launches, on a GPU) to build them.
Triton is imported only when the Triton path is first used, so ``import ead_kernels``
needs torch alone, and ``TRITON_INTERPRET`` only has to be set before that first use.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

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

KIND_NONE = 0  # row untouched: no schedule (or a greedy row)
KIND_EAD = 1
KIND_REVERSE = 2
KIND_CONSTANT = 3
NUM_PARAMS = 5  # params columns, in this order:
P_TAU_MAX, P_TAU_MIN, P_TAU, P_WARMUP, P_SCALE = range(NUM_PARAMS)

_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 1024 elements per program: 8 per thread at 4 warps (two 16-byte fp32 accesses), and
# still ~150 programs for a single row of a 152k vocabulary to spread over the SMs.
_BLOCK_SIZE = 1024


def _check_rows(positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor) -> int:
    """Metadata-only checks (no device sync); returns the batch size."""
    if params.dim() != 2 or params.shape[1] != NUM_PARAMS:
        raise ValueError(f"params must have shape [batch, {NUM_PARAMS}], got {tuple(params.shape)}")
    if params.dtype != torch.float64:
        raise TypeError(f"params must be float64 (the schedule runs in float64), got {params.dtype}")
    batch = params.shape[0]
    for name, tensor in (("positions", positions), ("kinds", kinds)):
        if tensor.shape != (batch,):
            raise ValueError(f"{name} must have shape [{batch}] to match params, got {tuple(tensor.shape)}")
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")
    if not (positions.device == kinds.device == params.device):
        raise ValueError(
            f"positions, kinds and params must be on one device, got "
            f"{positions.device}, {kinds.device}, {params.device}"
        )
    return batch


def _check_inputs(logits: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.dtype not in _LOGITS_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    batch = _check_rows(positions, kinds, params)
    if logits.shape[0] != batch:
        raise ValueError(f"logits have {logits.shape[0]} rows but the schedule tensors describe {batch}")
    if params.device != logits.device:
        raise ValueError(f"schedule tensors are on {params.device} but logits are on {logits.device}")


def schedule_temperatures(positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Float64 temperature of every row, vectorised; ``KIND_NONE`` rows give ``1.0``.

    Uses the same float64 formulas as ``ead_server.schedule.schedule_temperature``
    (``(1 + tau_max) - exp(t / scale)`` and the clamps), so the two agree to the last
    bit up to ``exp``'s own rounding. Unknown kinds are treated as none.
    """
    _check_rows(positions, kinds, params)
    tau_max, tau_min, tau, warmup, scale = params.unbind(1)
    t = positions.to(torch.float64)
    growth = torch.exp(t / scale)  # inf past ~709 * scale: the clamps below absorb it
    is_ead = kinds == KIND_EAD
    ead = torch.maximum(1.0 + tau_max - growth, tau_min)
    reverse = torch.minimum(tau_min + growth, tau_max)
    annealed = torch.where(t < warmup, 1.0, torch.where(is_ead, ead, reverse))
    fixed = torch.where(kinds == KIND_CONSTANT, tau, 1.0)
    return torch.where(is_ead | (kinds == KIND_REVERSE), annealed, fixed)


def apply_schedule_torch_(
    logits: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor
) -> torch.Tensor:
    """Divide each row of ``logits`` in place by its scheduled temperature (PyTorch).

    ``div_`` by a float32 tensor computes in float32 and rounds once to the logits'
    dtype, which is the recipe of the module docstring. ``KIND_NONE`` rows are divided
    by exactly ``1.0``, which leaves them bit-identical.
    """
    _check_inputs(logits, positions, kinds, params)
    temps = schedule_temperatures(positions, kinds, params).to(torch.float32)
    return logits.div_(temps.unsqueeze(1))


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it is optional for CPU-only installs)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _triton_kernel() -> Any:
    """Build the kernel on first use, so importing this module never imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def _apply_schedule_kernel(
        logits_ptr,
        stride_row,
        stride_col,
        positions_ptr,
        positions_stride,
        kinds_ptr,
        kinds_stride,
        params_ptr,
        params_stride_row,
        params_stride_col,
        vocab_size,
        BLOCK_SIZE: tl.constexpr,
    ):
        # One program per (row, block of columns). Each computes its row's temperature
        # itself: a handful of float64 scalar ops, nothing next to the memory traffic.
        row = tl.program_id(0).to(tl.int64)
        kind = tl.load(kinds_ptr + row * kinds_stride)
        # Kinds as literals (Triton kernels cannot read module globals): 1 ead,
        # 2 reverse, 3 constant; KIND_NONE (0) and unknown kinds leave the row alone.
        if (kind < 1) | (kind > 3):
            return
        p = params_ptr + row * params_stride_row
        tau_max = tl.load(p)
        tau_min = tl.load(p + params_stride_col)
        tau = tl.load(p + 2 * params_stride_col)
        warmup = tl.load(p + 3 * params_stride_col)
        scale = tl.load(p + 4 * params_stride_col)
        t = tl.load(positions_ptr + row * positions_stride).to(tl.float64)
        growth = tl.exp(t / scale)
        ead = tl.maximum(1.0 + tau_max - growth, tau_min)
        reverse = tl.minimum(tau_min + growth, tau_max)
        annealed = tl.where(kind == 1, ead, reverse)
        annealed = tl.where(t < warmup, 1.0, annealed)
        temp = tl.where(kind == 3, tau, annealed).to(tl.float32)

        cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = cols < vocab_size
        ptrs = logits_ptr + row * stride_row + cols.to(tl.int64) * stride_col
        x = tl.load(ptrs, mask=mask)
        y = tl.div_rn(x.to(tl.float32), temp)  # IEEE division, as torch's div_
        if x.dtype == tl.bfloat16:
            # Round to nearest even by hand, exactly as c10::round_to_nearest_even (NaN
            # -> 0x7FC0): Triton's interpreter truncates float32 -> bfloat16 casts, so
            # this keeps one code path that is bit-exact on GPU and in the CPU tests.
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(y != y, 0x7FC0, bits)
            out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = y.to(x.dtype)
        tl.store(ptrs, out, mask=mask)

    return _apply_schedule_kernel


def apply_schedule_triton_(
    logits: torch.Tensor,
    positions: torch.Tensor,
    kinds: torch.Tensor,
    params: torch.Tensor,
    *,
    block_size: int | None = None,
) -> torch.Tensor:
    """Divide each row of ``logits`` in place by its scheduled temperature (Triton).

    One launch over a ``(batch, cdiv(vocab, BLOCK))`` grid; any row and column stride.
    ``KIND_NONE`` rows are not read or written. Bit-identical to
    :func:`apply_schedule_torch_` except where ``exp`` rounds differently in its last
    float64 bit and that flips the float32 temperature (1 ulp, practically never).
    ``block_size`` (a power of two) overrides the columns per program; the tests raise
    it because Triton's interpreter pays milliseconds per program.
    """
    _check_inputs(logits, positions, kinds, params)
    import triton

    batch, vocab = logits.shape
    if batch == 0 or vocab == 0:
        return logits
    block = min(block_size or _BLOCK_SIZE, triton.next_power_of_2(vocab))
    grid = (batch, triton.cdiv(vocab, block))
    _triton_kernel()[grid](
        logits,
        logits.stride(0),
        logits.stride(1),
        positions,
        positions.stride(0),
        kinds,
        kinds.stride(0),
        params,
        params.stride(0),
        params.stride(1),
        vocab,
        BLOCK_SIZE=block,
        num_warps=4,
        enable_fp_fusion=False,  # no contraction into FMAs: same rounding as torch
    )
    return logits


def _pick(logits: torch.Tensor) -> Callable[..., torch.Tensor]:
    if logits.is_cuda and triton_available():
        return apply_schedule_triton_
    return apply_schedule_torch_


def apply_schedule_(
    logits: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor
) -> torch.Tensor:
    """Scale ``logits`` in place: the Triton kernel on GPU tensors, PyTorch otherwise."""
    return _pick(logits)(logits, positions, kinds, params)
