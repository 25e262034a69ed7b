"""Per-row scheduled temperature: the one op EAD adds to a sampling step.

Every row of a batch may follow its own schedule (docs/design.md, "Temperature
schedules") and sits at its own position ``t``, so the temperature is a function of
``(t, kind, params)`` per row, and for the entropy-driven schedules of the row's entropy
too. A schedule is a *kind* and a *params* row:

* ``kinds`` int: ``KIND_NONE`` / ``KIND_EAD`` / ``KIND_REVERSE`` / ``KIND_CONSTANT`` /
  ``KIND_ENTROPY``;
* ``params`` float64 ``[., NUM_PARAMS]``, columns named by :data:`PARAM_COLUMNS`
  (``tau_max, tau_min, tau, warmup, scale, h_max, exponent, h_ref`` with
  ``scale = time_scale * decay``, and ``h_ref = 0`` for the token clock).
  ``ead_server.schedule.ResolvedSchedule.kernel_params`` fills a row by these names.

Two optional per-*row* inputs (one value per row of the logits, in both layouts) carry
what only the engine sees, the model's entropies (:func:`ead_kernels.target_stats.row_stats`):

* ``entropy`` float32: ``H_t`` of the row at temperature 1, read by ``KIND_ENTROPY``:
  ``tau_min + (tau_max - tau_min) * min(1, max(H / h_max, 0)) ** exponent``, a ``NaN``
  ``H`` counting as 0;
* ``clock`` float64: ``sum_{i<t} H_i``, read by ``KIND_EAD`` and ``KIND_REVERSE`` rows
  whose ``h_ref > 0`` (the entropy clock): their anneal runs on
  ``exp((clock / h_ref) / scale)`` instead of ``exp(t / scale)``; the warm-up still counts
  tokens (``t < warmup``). ``h_ref == 0`` is the token clock, bit for bit as before.

Either left out (``None``) reads as zeros: an ``entropy`` row then sits at ``tau_min``, a
clocked row at the start of its anneal. The caller passes them whenever a row needs them.

Two batch layouts, one per vLLM model runner:

* rows (V1 runner): row ``i`` of the logits owns ``kinds[i]``, ``params[i]`` and
  ``positions[i] = t``, kept up to date by the engine (:func:`apply_schedule_`);
* slots (V2 runner): a row is not a request. ``slots[i]`` is row ``i``'s persistent
  request slot, which owns ``kinds``, ``params`` and ``prompt_len``, and the row's
  position in its sequence ``pos[i]`` gives ``t = pos[i] + 1 - prompt_len[slot]``: right
  after preemption, and for the several rows of a request under speculative decoding
  (:func:`apply_schedule_slots_`). Rows of an unfinished chunked prefill have ``t < 0``;
  they are not sampled, and get ``t = 0``'s finite, positive temperature.

Two implementations with one rounding recipe, so that they agree bit for bit:

1. the schedule in float64 (``exp`` overflows to ``inf`` far past the anneal and the
   clamp then picks ``tau_min`` / ``tau_max``, as the pure-Python reference does); the
   entropy type's power is ``exp(exponent * log(r))`` with ``r`` clamped to ``[0, 1]``
   (``log 0 = -inf`` gives ``0``, ``log 1 = 0`` gives ``1`` exactly): Triton has no
   ``pow`` that its interpreter runs, and so every path uses the same two functions it
   already trusts. Against the reference's ``r ** exponent`` (libm's ``pow``) this is a
   few float64 ulps off (at most 4 over 200k random rows), which the float32 rounding
   below hides unless the value lies that close to a float32 rounding midpoint (then
   one float32 ulp: never seen), as for ``exp``'s last bit;
2. the float64 temperature rounded once to float32;
3. ``row = (row.float() / temp_f32).to(row.dtype)`` with an IEEE round-to-nearest
   division (Triton's ``/`` on float32 is an approximate ``div.full``; ``div_rn`` is not).

The PyTorch path is the CPU path and the test oracle. The Triton path fuses the schedule
into the rescale: one launch, no host work per step and no per-row temperature tensor,
where the PyTorch path needs about twenty tiny ops (launches, on a GPU) to build them;
:func:`ead_kernels.target_stats.apply_schedule_with_stats_` fuses the row statistics
(``lse``, entropy) before and after the rescale into that same pass.
On CPU tensors the PyTorch path builds them with numpy instead (the same IEEE ops and
torch's own ``exp`` and ``log``, so the same bits), whose calls on batch-sized vectors
cost less than torch's dispatch (docs/performance.md).
Triton is imported only when the Triton path is first used, so ``import ead_kernels``
needs torch alone, and ``TRITON_INTERPRET`` only has to be set before that first use.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

__all__ = [
    "KIND_CONSTANT",
    "KIND_EAD",
    "KIND_ENTROPY",
    "KIND_NONE",
    "KIND_REVERSE",
    "KINDS",
    "NUM_PARAMS",
    "P_EXPONENT",
    "P_H_MAX",
    "P_H_REF",
    "P_SCALE",
    "P_TAU",
    "P_TAU_MAX",
    "P_TAU_MIN",
    "P_WARMUP",
    "PARAM_COLUMNS",
    "apply_schedule_",
    "apply_schedule_slots_",
    "apply_schedule_torch_",
    "apply_schedule_triton_",
    "schedule_temperatures",
    "slot_positions",
    "triton_available",
]

KIND_NONE = 0  # row untouched: no schedule (or a greedy row)
KIND_EAD = 1
KIND_REVERSE = 2
KIND_CONSTANT = 3
KIND_ENTROPY = 4
KINDS = {"ead": KIND_EAD, "reverse": KIND_REVERSE, "constant": KIND_CONSTANT, "entropy": KIND_ENTROPY}
"""Kind number of each schedule ``type``."""
PARAM_COLUMNS = ("tau_max", "tau_min", "tau", "warmup", "scale", "h_max", "exponent", "h_ref")
"""The names of the ``params`` columns, in order."""
NUM_PARAMS = len(PARAM_COLUMNS)
P_TAU_MAX, P_TAU_MIN, P_TAU, P_WARMUP, P_SCALE, P_H_MAX, P_EXPONENT, P_H_REF = range(NUM_PARAMS)

_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 1024 elements per program: 8 per thread at 4 warps (two 16-byte fp32 accesses), and
# still ~150 programs for a single row of a 152k vocabulary to spread over the SMs.
_BLOCK_SIZE = 1024


def _check_index(name: str, tensor: torch.Tensor, size: int | None = None) -> None:
    if tensor.dim() != 1 or (size is not None and tensor.shape[0] != size):
        want = f"[{size}]" if size is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")


def _check_table(kinds: torch.Tensor, params: torch.Tensor) -> int:
    """Metadata-only checks (no device sync) of a schedule table; returns its length."""
    if params.dim() != 2 or params.shape[1] != NUM_PARAMS:
        raise ValueError(f"params must have shape [batch, {NUM_PARAMS}], got {tuple(params.shape)}")
    if params.dtype != torch.float64:
        raise TypeError(f"params must be float64 (the schedule runs in float64), got {params.dtype}")
    _check_index("kinds", kinds, params.shape[0])
    return params.shape[0]


def _check_per_row(name: str, tensor: torch.Tensor | None, batch: int, dtype: torch.dtype,
                   device: torch.device) -> None:
    """Metadata-only checks of an optional per-row input (``entropy``, ``clock``)."""
    if tensor is None:
        return
    if tensor.dim() != 1 or tensor.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one value per row), got {tuple(tensor.shape)}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must be {str(dtype).removeprefix('torch.')}, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")


def _check_rows(positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor) -> int:
    batch = _check_table(kinds, params)
    _check_index("positions", positions, batch)
    if not (positions.device == kinds.device == params.device):
        raise ValueError(
            f"positions, kinds and params must be on one device, got "
            f"{positions.device}, {kinds.device}, {params.device}"
        )
    return batch


def _check_inputs(
    logits: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor,
    slots: torch.Tensor | None, prompt_len: torch.Tensor | None,
    entropy: torch.Tensor | None, clock: torch.Tensor | None,
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.dtype not in _LOGITS_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if slots is None:
        batch = _check_rows(positions, kinds, params)
        tensors = (positions, kinds, params)
    else:
        if prompt_len is None:
            raise ValueError("the slot layout needs prompt_len")
        num_slots = _check_table(kinds, params)
        _check_index("prompt_len", prompt_len, num_slots)
        _check_index("slots", slots)
        batch = slots.shape[0]
        _check_index("pos", positions, batch)
        tensors = (slots, positions, prompt_len, kinds, params)
    if logits.shape[0] != batch:
        raise ValueError(f"logits have {logits.shape[0]} rows but the schedule tensors describe {batch}")
    if any(t.device != logits.device for t in tensors):
        raise ValueError(f"schedule tensors must be on the logits' device {logits.device}, got "
                         f"{[str(t.device) for t in tensors]}")
    _check_per_row("entropy", entropy, batch, torch.float32, logits.device)
    _check_per_row("clock", clock, batch, torch.float64, logits.device)


def schedule_temperatures(
    positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor, *,
    entropy: torch.Tensor | None = None, clock: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 temperature of every row, vectorised; ``KIND_NONE`` rows give ``1.0``.

    Uses the same float64 formulas as ``ead_server.schedule.schedule_temperature``
    (``(1 + tau_max) - exp(t / scale)`` and the clamps), so the two agree to the last
    bit up to ``exp``'s own rounding (and the entropy type's power, see the module
    docstring). ``entropy`` (float32) and ``clock`` (float64) are per row, ``None``
    reading as zeros. Unknown kinds are treated as none. CPU tensors take the host path
    (:func:`_host_temperatures`), others the device path; both give the same bits.
    """
    batch = _check_rows(positions, kinds, params)
    _check_per_row("entropy", entropy, batch, torch.float32, positions.device)
    _check_per_row("clock", clock, batch, torch.float64, positions.device)
    if positions.is_cpu:
        return torch.from_numpy(_host_temperatures(positions.numpy(), kinds.numpy(), params.numpy(),
                                                   _numpy(entropy), _numpy(clock)))
    return _device_temperatures(positions, kinds, params, entropy, clock)


def _numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy()


def _device_temperatures(
    positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor,
    entropy: torch.Tensor | None = None, clock: torch.Tensor | None = None,
) -> torch.Tensor:
    """The schedule as torch ops on the tensors' device (about twenty small launches)."""
    return _schedule(torch, positions.to(torch.float64), kinds, params.unbind(1),
                     None if entropy is None else entropy.to(torch.float64), clock)


def _host_temperatures(
    positions: np.ndarray, kinds: np.ndarray, params: np.ndarray,
    entropy: np.ndarray | None = None, clock: np.ndarray | None = None,
) -> np.ndarray:
    """The schedule of :func:`_device_temperatures` in numpy, for CPU tensors.

    Why: on a CPU each torch op on a batch-sized vector costs a few microseconds of
    dispatch (more right after the model's forward has evicted the caches), and the
    twenty of the device path are most of the step's fixed cost; numpy's calls cost
    less (the schedule: about 35 instead of 50 us warm, ``python -m ead_kernels.benchmark
    --breakdown``). Why it is bit-identical:
    every op but ``exp`` and ``log`` (float64 ``+ - * /``, min/max, compares, selects) is
    exact IEEE arithmetic in both libraries, and ``exp`` and ``log`` are still torch's, on
    contiguous float64 vectors as in the device path.
    """
    with np.errstate(divide="ignore", invalid="ignore"):  # torch's arithmetic does not warn either
        return _schedule(_HOST, positions.astype(np.float64), kinds, params.T,
                         None if entropy is None else entropy.astype(np.float64), clock)


def _torch_on_numpy(fn: Any) -> Any:
    return lambda x: fn(torch.from_numpy(x)).numpy()


# numpy, but with torch's exp and log: the only ops whose last bit differs between them.
_HOST = SimpleNamespace(where=np.where, maximum=np.maximum, minimum=np.minimum, clip=np.clip,
                        exp=_torch_on_numpy(torch.exp), log=_torch_on_numpy(torch.log))


def _schedule(xp: Any, t: Any, kinds: Any, columns: Any, entropy: Any, clock: Any) -> Any:
    """The schedule, written once for ``xp`` = ``torch`` or :data:`_HOST` (the same names
    and IEEE semantics). ``t``, ``entropy`` and ``clock`` are float64; ``None`` is zeros
    without the arithmetic (``0 / h_ref`` is 0, and the entropy type's ``tau_min + d * 0``
    is ``tau_min``)."""
    tau_max, tau_min, tau, warmup, scale, h_max, exponent, h_ref = columns
    # t itself on the token clock: today's bits.
    elapsed = xp.where(h_ref > 0, 0.0 if clock is None else clock / h_ref, t)
    growth = xp.exp(elapsed / scale)  # inf past ~709 * scale: the clamps absorb it
    is_ead = kinds == KIND_EAD
    ead = xp.maximum(1.0 + tau_max - growth, tau_min)
    reverse = xp.minimum(tau_min + growth, tau_max)
    annealed = xp.where(t < warmup, 1.0, xp.where(is_ead, ead, reverse))
    entropic = tau_min
    if entropy is not None:
        ratio = entropy / h_max
        ratio = xp.where(ratio == ratio, xp.clip(ratio, 0.0, 1.0), 0.0)  # NaN counts as 0
        entropic = tau_min + (tau_max - tau_min) * xp.exp(exponent * xp.log(ratio))
    fixed = xp.where(kinds == KIND_CONSTANT, tau, xp.where(kinds == KIND_ENTROPY, entropic, 1.0))
    return xp.where(is_ead | (kinds == KIND_REVERSE), annealed, fixed)


def slot_positions(slots: torch.Tensor, pos: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """``t`` of each row in the slot layout: ``max(pos + 1 - prompt_len[slot], 0)`` (int64)."""
    return (pos.long() + 1 - prompt_len.long()[slots.long()]).clamp_min(0)


def apply_schedule_torch_(
    logits: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor,
    slots: torch.Tensor | None = None, prompt_len: torch.Tensor | None = None, *,
    entropy: torch.Tensor | None = None, clock: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divide each row of ``logits`` in place by its scheduled temperature (PyTorch).

    Rows layout by default; with ``slots`` and ``prompt_len``, the slot layout, where
    ``positions`` is each row's ``pos`` and ``kinds``/``params`` are per slot.
    ``entropy`` (float32) and ``clock`` (float64) are per row in both layouts, ``None``
    reading as zeros (module docstring).
    ``div_`` by a float32 tensor computes in float32 and rounds once to the logits'
    dtype, which is the recipe of the module docstring. ``KIND_NONE`` rows are divided
    by exactly ``1.0``, which leaves them bit-identical.
    """
    _check_inputs(logits, positions, kinds, params, slots, prompt_len, entropy, clock)
    if logits.is_cpu:  # every schedule tensor is on the logits' device (checked)
        t, kinds_np, params_np = positions.numpy(), kinds.numpy(), params.numpy()
        if slots is not None:
            index = slots.numpy()
            starts = prompt_len.numpy().astype(np.int64)[index]  # type: ignore[union-attr]
            t = np.maximum(t.astype(np.int64) + 1 - starts, 0)
            kinds_np, params_np = kinds_np[index], params_np[index]
        temps = torch.from_numpy(
            _host_temperatures(t, kinds_np, params_np, _numpy(entropy), _numpy(clock)).astype(np.float32))
    else:
        if slots is not None:
            index = slots.long()
            positions, kinds, params = slot_positions(slots, positions, prompt_len), kinds[index], params[index]
        temps = _device_temperatures(positions, kinds, params, entropy, clock).to(torch.float32)
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
    """Build the kernel on first use, so importing this module never imports Triton.

    With ``STATS`` (:func:`ead_kernels.target_stats.apply_schedule_with_stats_`) it also
    writes, for the rows that ``flags`` asks for, the partial row statistics of the block
    it loaded (``flags[0, row]``) and of the block it stores (``flags[1, row]``) into
    ``partials[0 or 1, row, block]``, with ``target_stats``' own block function: a constexpr,
    so the plain launch compiles to the same code as without it.
    """
    import triton
    import triton.language as tl

    from .target_stats import _triton_kernels  # here: target_stats imports this module

    global _block_partials  # a module global, for Triton's interpreter (target_stats says why)
    _block_partials = _triton_kernels().block_partials

    @triton.jit
    def _apply_schedule_kernel(
        logits_ptr,
        stride_row,
        stride_col,
        positions_ptr,
        positions_stride,
        slots_ptr,
        slots_stride,
        prompt_len_ptr,
        prompt_len_stride,
        kinds_ptr,
        kinds_stride,
        params_ptr,
        params_stride_row,
        params_stride_col,
        entropy_ptr,
        entropy_stride,
        clock_ptr,
        clock_stride,
        vocab_size,
        flags_ptr,
        partials_ptr,
        USE_SLOTS: tl.constexpr,
        HAS_ENTROPY: tl.constexpr,
        HAS_CLOCK: tl.constexpr,
        STATS: tl.constexpr,
        EAD: tl.constexpr,
        REVERSE: tl.constexpr,
        CONSTANT: tl.constexpr,
        ENTROPY: tl.constexpr,
        COL_TAU_MAX: tl.constexpr,
        COL_TAU_MIN: tl.constexpr,
        COL_TAU: tl.constexpr,
        COL_WARMUP: tl.constexpr,
        COL_SCALE: tl.constexpr,
        COL_H_MAX: tl.constexpr,
        COL_EXPONENT: tl.constexpr,
        COL_H_REF: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        # One program per (row, block of columns). Each computes its row's temperature
        # itself: a handful of float64 scalar ops, nothing next to the memory traffic.
        row = tl.program_id(0).to(tl.int64)
        if USE_SLOTS:
            entry = tl.load(slots_ptr + row * slots_stride).to(tl.int64)
        else:
            entry = row
        kind = tl.load(kinds_ptr + entry * kinds_stride)
        # KIND_NONE and unknown kinds leave the row alone: not written, and not read unless
        # its statistics are asked for (the same before and after: it stands divided by 1.0).
        unscheduled = (kind != EAD) & (kind != REVERSE) & (kind != CONSTANT) & (kind != ENTROPY)
        if STATS:
            raw_wanted = tl.load(flags_ptr + row) != 0
            scaled_wanted = tl.load(flags_ptr + tl.num_programs(0) + row) != 0
            if unscheduled & ~(raw_wanted | scaled_wanted):
                return
        elif unscheduled:
            return
        p = params_ptr + entry * params_stride_row
        tau_max = tl.load(p + COL_TAU_MAX * params_stride_col)
        tau_min = tl.load(p + COL_TAU_MIN * params_stride_col)
        tau = tl.load(p + COL_TAU * params_stride_col)
        warmup = tl.load(p + COL_WARMUP * params_stride_col)
        scale = tl.load(p + COL_SCALE * params_stride_col)
        h_ref = tl.load(p + COL_H_REF * params_stride_col)
        position = tl.load(positions_ptr + row * positions_stride).to(tl.int64)
        if USE_SLOTS:
            prompt_len = tl.load(prompt_len_ptr + entry * prompt_len_stride).to(tl.int64)
            position = tl.maximum(position + 1 - prompt_len, 0)
        t = position.to(tl.float64)
        # The per-row inputs are read only where the row needs them (masked loads), and
        # not at all without them (constexpr): the plain EAD step reads one more param.
        clocked = h_ref > 0
        if HAS_CLOCK:
            clock = tl.load(clock_ptr + row * clock_stride, mask=clocked, other=0.0)
            elapsed = tl.where(clocked, clock / h_ref, t)
        else:
            elapsed = tl.where(clocked, 0.0, t)  # a clock of zeros
        growth = tl.exp(elapsed / scale)
        ead = tl.maximum(1.0 + tau_max - growth, tau_min)
        reverse = tl.minimum(tau_min + growth, tau_max)
        annealed = tl.where(kind == EAD, ead, reverse)
        annealed = tl.where(t < warmup, 1.0, annealed)
        if HAS_ENTROPY:
            h_max = tl.load(p + COL_H_MAX * params_stride_col)
            exponent = tl.load(p + COL_EXPONENT * params_stride_col)
            entropy = tl.load(entropy_ptr + row * entropy_stride, mask=kind == ENTROPY, other=0.0)
            ratio = entropy.to(tl.float64) / h_max
            ratio = tl.where(ratio == ratio, tl.minimum(tl.maximum(ratio, 0.0), 1.0), 0.0)  # NaN counts as 0
            entropic = tau_min + (tau_max - tau_min) * tl.exp(exponent * tl.log(ratio))
        else:
            entropic = tau_min  # entropy zeros: tau_min + d * 0
        fixed = tl.where(kind == CONSTANT, tau, entropic)
        temp = tl.where((kind == EAD) | (kind == REVERSE), annealed, fixed).to(tl.float32)

        cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = cols < vocab_size
        ptrs = logits_ptr + row * stride_row + cols.to(tl.int64) * stride_col
        x = tl.load(ptrs, mask=mask)
        if STATS:
            temp = tl.where(unscheduled, 1.0, temp)  # what the row's statistics after see
            # partials[half, row, block], three floats each: the raw half, then the scaled.
            raw_out = partials_ptr + (row * tl.num_programs(1) + tl.program_id(1)) * 3
            if raw_wanted:
                _block_partials(x, mask, raw_out)
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
        if STATS:
            tl.store(ptrs, out, mask=cols < tl.where(unscheduled, 0, vocab_size))  # not written
            if scaled_wanted:
                _block_partials(out, mask, raw_out + tl.num_programs(0) * tl.num_programs(1) * 3)
        else:
            tl.store(ptrs, out, mask=mask)

    return _apply_schedule_kernel


def apply_schedule_triton_(
    logits: torch.Tensor,
    positions: torch.Tensor,
    kinds: torch.Tensor,
    params: torch.Tensor,
    slots: torch.Tensor | None = None,
    prompt_len: torch.Tensor | None = None,
    *,
    entropy: torch.Tensor | None = None,
    clock: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Divide each row of ``logits`` in place by its scheduled temperature (Triton).

    The same layouts and arguments as :func:`apply_schedule_torch_`. One launch over a
    ``(batch, cdiv(vocab, BLOCK))`` grid; any row and column stride (of the per-row
    ``entropy`` and ``clock`` too). ``KIND_NONE`` rows are not read or written.
    Bit-identical to the PyTorch path except where ``exp`` or ``log`` rounds differently
    in its last float64 bit and that flips the float32 temperature (1 ulp, practically
    never). ``block_size`` (a power of two) overrides the columns per program; the tests
    raise it because Triton's interpreter pays milliseconds per program.
    """
    _check_inputs(logits, positions, kinds, params, slots, prompt_len, entropy, clock)
    batch, vocab = logits.shape
    if batch == 0 or vocab == 0:
        return logits
    _launch(logits, positions, kinds, params, slots, prompt_len, entropy, clock, _block(vocab, block_size))
    return logits


def _block(vocab: int, block_size: int | None) -> int:
    """Columns per program of the scale kernel (a power of two, at most the vocabulary's)."""
    import triton

    return min(block_size or _BLOCK_SIZE, triton.next_power_of_2(vocab))


def _launch(
    logits: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor,
    slots: torch.Tensor | None, prompt_len: torch.Tensor | None, entropy: torch.Tensor | None,
    clock: torch.Tensor | None, block: int, stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """One launch of the scale kernel over checked inputs with at least one row and column;
    ``stats`` is ``(flags, partials)`` of the fused statistics (:func:`_triton_kernel`)."""
    import triton

    grid = (logits.shape[0], triton.cdiv(logits.shape[1], block))
    # Absent tensors are passed as ``positions``, never read (constexpr flags).
    slot_args = (positions, 0, positions, 0) if slots is None else (
        slots, slots.stride(0), prompt_len, prompt_len.stride(0))  # type: ignore[union-attr]
    row_args = [(positions, 0) if x is None else (x, x.stride(0)) for x in (entropy, clock)]
    _triton_kernel()[grid](
        logits,
        logits.stride(0),
        logits.stride(1),
        positions,
        positions.stride(0),
        *slot_args,
        kinds,
        kinds.stride(0),
        params,
        params.stride(0),
        params.stride(1),
        *row_args[0],
        *row_args[1],
        logits.shape[1],
        *(stats or (positions, positions)),
        USE_SLOTS=slots is not None,
        HAS_ENTROPY=entropy is not None,
        HAS_CLOCK=clock is not None,
        STATS=stats is not None,
        EAD=KIND_EAD,
        REVERSE=KIND_REVERSE,
        CONSTANT=KIND_CONSTANT,
        ENTROPY=KIND_ENTROPY,
        COL_TAU_MAX=P_TAU_MAX,
        COL_TAU_MIN=P_TAU_MIN,
        COL_TAU=P_TAU,
        COL_WARMUP=P_WARMUP,
        COL_SCALE=P_SCALE,
        COL_H_MAX=P_H_MAX,
        COL_EXPONENT=P_EXPONENT,
        COL_H_REF=P_H_REF,
        BLOCK_SIZE=block,
        num_warps=4,
        enable_fp_fusion=False,  # no contraction into FMAs: same rounding as torch
    )


def _use_triton(logits: torch.Tensor) -> bool:
    return logits.is_cuda and triton_available()


def apply_schedule_(
    logits: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor, *,
    entropy: torch.Tensor | None = None, clock: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scale ``logits`` in place, rows layout (V1): Triton on GPU tensors, PyTorch otherwise."""
    fn = apply_schedule_triton_ if _use_triton(logits) else apply_schedule_torch_
    return fn(logits, positions, kinds, params, entropy=entropy, clock=clock)


def apply_schedule_slots_(
    logits: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, prompt_len: torch.Tensor,
    kinds: torch.Tensor, params: torch.Tensor, *,
    entropy: torch.Tensor | None = None, clock: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scale ``logits`` in place, slot layout (V2): Triton on GPU tensors, PyTorch otherwise.

    ``slots[i]`` is row ``i``'s request slot, ``pos[i]`` its position in the sequence;
    ``prompt_len``, ``kinds`` and ``params`` are indexed by slot, ``entropy`` and
    ``clock`` by row.
    """
    fn = apply_schedule_triton_ if _use_triton(logits) else apply_schedule_torch_
    return fn(logits, pos, kinds, params, slots, prompt_len, entropy=entropy, clock=clock)
