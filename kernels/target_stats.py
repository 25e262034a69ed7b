"""Two numbers per row of logits: ``lse = logsumexp(h)`` and the entropy ``H(softmax(h))``.

They serve two consumers:

* in-pass target log-probs: with the behaviour log-prob ``b = log_softmax(h / tau)[y]``
  that vLLM reports, the sampled token's raw logit is ``h[y] = tau * (b + lse(h / tau))``
  and the target (temperature-1) log-prob is ``h[y] - lse(h)`` (docs/design.md, "In-pass
  target statistics"), so the ``lse`` of a row before and after the temperature step
  makes the scoring pass unnecessary;
* the entropy-driven schedules (:mod:`ead_kernels.temperature`): the ``entropy`` type
  needs ``H_t`` of the raw row before it can scale it, the entropy clock adds it up.

One pass over a row gives both. With ``d = x - max(h)``, ``S = sum exp(d)`` and
``Q = sum exp(d) * d``::

    lse = max(h) + log S          H = -sum p log p = log S - Q / S      (p = exp(d) / S)

Definitions at the edges, which every implementation here keeps:

* a row of all ``-inf`` (masked out): ``lse = -inf``, ``H = 0``;
* a row containing ``NaN``: both ``NaN`` (the processor treats a ``NaN`` entropy as 0
  for the schedules, and reports it as null);
* a row containing ``+inf`` (no ``NaN``): ``lse = +inf``, ``H = NaN`` (undefined);
* ``H`` is clamped at ``>= 0``. In exact arithmetic ``log S >= 0`` (the maximum's term is
  1) and ``Q <= 0``; in float32 too (sums of non-negative and of non-positive terms),
  so the clamp only guarantees it whatever the summation order.

The work is to add nothing but the exponentials: no gathered copy of the rows, no
full-size temporaries (``torch.logsumexp`` allocates two), no subnormal floats. On a
CPU the rows go through a scratch block small enough to stay in cache
(:data:`CPU_BLOCK_ROWS` rows: a row is read once from memory, then exponentiated and
summed in cache). On a GPU a Triton kernel reads each row once (:func:`row_stats_triton`),
or the temperature step takes them in its own pass, where it reads the rows anyway
(:func:`apply_schedule_with_stats_`: the entropy clock's ``H_t``, the targets' ``lse``
before and after).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from . import temperature
from .temperature import _block, _check_inputs, _launch, _use_triton, apply_schedule_torch_

__all__ = ["CPU_BLOCK_ROWS", "apply_schedule_with_stats_", "row_stats", "row_stats_torch", "row_stats_triton"]

# Rows per scratch block on a CPU: 8 rows of a 152k vocabulary in fp32 are 4.9 MB, of 49k
# 1.6 MB (the scratch holds two such halves). Two lse and the division at batch 64, vocab
# 49k, 1 thread (medians of 21, one run): blocks of 1 row 12.9 ms, 4: 10.4, 8: 9.5, 16:
# 9.3, all 64: 15.3; torch.logsumexp over gathered rows (before): 17.7; the division
# alone 0.5. The entropy on top (the second half, a product and a sum), batch 16, 1
# thread: 1.24 ms against the lse alone's 1.08 at vocab 49k, 4.21 against 3.61 at 152k.
CPU_BLOCK_ROWS = 8

# Shifted logits below this are raised to it before ``exp``. Their terms (under 1.7e-38)
# would be subnormal floats, which x86 CPUs compute and add some 13 times slower, and a
# scaled row (``h / tau``, tau < 1) easily spans more than 87 nats. The sum holds the
# maximum's term, 1, and fp32 has no room beside 1 for 152k terms of 1.7e-38, so the lse
# is the same to the bit (tested against ``torch.logsumexp``).
#
# The floor also makes ``0 * log 0 = 0`` for ``-inf`` logits (``exp(-inf) * -inf`` would
# be NaN), to fp32 precision. An entry floored at ``d = -87`` adds ``87 e^-87 < 1.5e-36``
# to ``-Q`` and ``e^-87 < 1.7e-38`` to ``S``; its true shares are ``-d e^d`` and ``e^d``,
# between 0 (at ``-inf``) and those same values (``x e^-x`` falls past ``x = 1``). With
# ``S >= 1`` and ``-Q / S <= 87`` (a weighted mean of ``-d``, which the floor caps), ``H``
# moves by at most ``V * (1 + 87 + 87) e^-87 < V * 3e-36`` nats, ``6e-31`` for ``V = 200k``: far
# below float32's resolution of an entropy next to the ``log S`` it is computed from. A
# one-hot row's entropy is ``(V - 1) * 87 e^-87``, not 0 (tested).
_EXP_FLOOR = -87.0

# Triton: logits per program of the first pass, 16 a thread at 4 warps.
_BLOCK_SIZE = 2048


def row_stats(logits: torch.Tensor, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``[len(rows), 2]`` float32 on the logits' device: ``(lse, entropy)`` of each of
    ``logits[rows]`` (module docstring), nothing synced. Triton on GPU tensors, PyTorch
    otherwise. ``rows`` may be a list (copied to the device) or an index tensor."""
    fn = row_stats_triton if _use_triton(logits) else row_stats_torch
    return fn(logits, rows)


def _index(rows: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.to(device=device, dtype=torch.long, non_blocking=True)
    return torch.tensor(list(rows), dtype=torch.long).to(device, non_blocking=True)


def row_stats_torch(logits: torch.Tensor, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """:func:`row_stats` in PyTorch: the CPU path, and the oracle of the Triton path.

    Block by block through one scratch buffer of two halves, the shifted row ``d`` and
    ``exp(d)``, both needed for ``Q``. The ``lse`` column is
    ``torch.logsumexp(logits[rows].float(), -1)`` to the bit.
    """
    index = _index(rows, logits.device)
    n, vocab = index.numel(), logits.shape[-1]
    out = torch.empty(n, 2, dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    # On a GPU without Triton, one block of every row keeps the launches from growing with n.
    block = n if logits.is_cuda else min(n, CPU_BLOCK_ROWS)
    scratch = torch.empty(2, block, vocab, dtype=torch.float32, device=logits.device)
    for start in range(0, n, block):
        part = index[start:start + block]
        shifted, weights = scratch[0, : part.numel()], scratch[1, : part.numel()]
        if logits.dtype == torch.float32:
            torch.index_select(logits, 0, part, out=shifted)
        else:
            shifted.copy_(logits.index_select(0, part))
        peak = shifted.amax(-1, keepdim=True)  # NaN if the row holds one
        finite = torch.isfinite(peak)
        shift = torch.where(finite, peak, 0.0)
        shifted.sub_(shift).clamp_(min=_EXP_FLOOR)
        total = torch.exp(shifted, out=weights).sum(-1, keepdim=True)
        moment = weights.mul_(shifted).sum(-1, keepdim=True)
        log_total = total.log()
        entropy = log_total - moment / total
        # A row whose maximum is not finite: -inf (masked out) has lse -inf and entropy 0,
        # NaN and +inf have that maximum as lse and entropy NaN.
        out[start:start + block, 0] = torch.where(finite, log_total + shift, peak).squeeze(-1)
        out[start:start + block, 1] = torch.where(
            finite, entropy.clamp_(min=0.0), torch.where(peak == -torch.inf, 0.0, torch.nan)).squeeze(-1)
    return out


class _Kernels(NamedTuple):
    """This module's Triton kernels, and the block function the scale kernel shares."""

    partials: Any
    merge: Any
    block_partials: Any


@functools.cache
def _triton_kernels() -> _Kernels:
    """Build the kernels on first use, so importing this module never imports Triton.

    A split reduction: the first pass reduces ``(row, block of columns)`` programs to
    partial ``(max, S, Q)``, the second merges a row's partials. One program per row
    would stream a whole row through one SM: at batch 1-64 at most half of an H100's
    132 SMs busy, and ``row_stats`` of the raw rows sits on every entropy-driven step
    (the target: that step at most 1.10x the plain EAD step). The first pass's grid is
    shaped like the scale kernel's (rows x column blocks), and so is its occupancy; the
    second is one small program per row over ``cdiv(vocab, BLOCK)`` partials, at the
    cost of a second launch. The scale kernel can take the first pass's place
    (:func:`apply_schedule_with_stats_`) with ``block_partials``: one function of a
    block's partials that both inline, and so the same bits.
    """
    # Module globals, not closures: Triton's interpreter looks up what a kernel calls or
    # reads in its module's globals alone, and runs a callee (the scale kernel calls
    # _block_partials) only if its module's globals hold triton.language.
    global _block_partials, _FLOOR, tl
    import triton
    import triton.language as tl

    _FLOOR = tl.constexpr(_EXP_FLOOR)

    @triton.jit
    def _block_partials(x, mask, out_ptr):
        """``(max, S, Q)`` of the loaded block ``x`` (any float dtype; ``mask`` its columns
        in the row) at ``out_ptr[0:3]``."""
        x = tl.where(mask, x.to(tl.float32), -float("inf"))
        # tl.max ignores NaN (maxnum): a NaN is flagged by hand, as the block's maximum.
        peak = tl.where(tl.max((x != x).to(tl.int32), 0) > 0, float("nan"), tl.max(x, 0))
        shift = tl.where((peak > -float("inf")) & (peak < float("inf")), peak, 0.0)
        d = tl.maximum(x - shift, _FLOOR)  # the CPU path's floor: -inf logits give 0 log 0 = 0
        e = tl.where(mask, tl.exp(d), 0.0)
        tl.store(out_ptr, peak)
        tl.store(out_ptr + 1, tl.sum(e, 0))
        tl.store(out_ptr + 2, tl.sum(e * d, 0))

    @triton.jit
    def _partials_kernel(logits_ptr, stride_row, stride_col, rows_ptr, partials_ptr, vocab_size, num_blocks,
                         BLOCK_SIZE: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        row = tl.load(rows_ptr + i)
        cols = j * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = cols < vocab_size
        x = tl.load(logits_ptr + row * stride_row + cols.to(tl.int64) * stride_col, mask=mask)
        _block_partials(x, mask, partials_ptr + (i * num_blocks + j) * 3)

    @triton.jit
    def _merge_kernel(partials_ptr, out_ptr, num_blocks, rows_ptr, num_rows, more_rows_ptr, more_offset,
                      NUM_BLOCKS: tl.constexpr, INDEXED: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        entry = i
        if INDEXED:
            # The fused scale's two halves in one launch: output i < num_rows merges the
            # partials of row rows[i], the others those of row more_rows[i - num_rows],
            # more_offset rows on.
            if i < num_rows:
                entry = tl.load(rows_ptr + i)
            else:
                entry = tl.load(more_rows_ptr + (i - num_rows)) + more_offset
        j = tl.arange(0, NUM_BLOCKS)
        valid = j < num_blocks
        p = partials_ptr + (entry * num_blocks + j) * 3
        peaks = tl.load(p, mask=valid, other=-float("inf"))
        sums = tl.load(p + 1, mask=valid, other=0.0)
        moments = tl.load(p + 2, mask=valid, other=0.0)
        has_nan = tl.max((peaks != peaks).to(tl.int32), 0) > 0
        peak = tl.max(peaks, 0)
        finite = (peak > -float("inf")) & (peak < float("inf")) & (has_nan == 0)
        # Block b's terms are relative to its own maximum m_b: rescaled by w = exp(m_b - M),
        # S_b w and (Q_b + S_b (m_b - M)) w. Blocks of all -inf (m_b = -inf) take no part.
        # (Where M is not finite the sums are junk, and not used.)
        live = valid & (peaks > -float("inf"))
        delta = tl.where(live, peaks - peak, 0.0)
        w = tl.where(live, tl.exp(delta), 0.0)
        total = tl.sum(w * sums, 0)
        moment = tl.sum(w * (moments + sums * delta), 0)
        log_total = tl.log(tl.where(finite, total, 1.0))
        lse = tl.where(finite, log_total + peak, tl.where(has_nan, float("nan"), peak))
        entropy = tl.where(finite, tl.maximum(log_total - moment / total, 0.0),
                           tl.where(peak == -float("inf"), 0.0, float("nan")))
        entropy = tl.where(has_nan, float("nan"), entropy)
        tl.store(out_ptr + i * 2, lse)
        tl.store(out_ptr + i * 2 + 1, entropy)

    return _Kernels(_partials_kernel, _merge_kernel, _block_partials)


def row_stats_triton(logits: torch.Tensor, rows: torch.Tensor | Sequence[int], *,
                     block_size: int | None = None) -> torch.Tensor:
    """:func:`row_stats` in Triton (two launches, any strides; ``block_size``, a power of
    two, overrides the logits per program of the first, as the tests do under Triton's
    interpreter). The same definitions as :func:`row_stats_torch`, to fp32 rounding: the
    sums run in another order, and a whole block more than 87 nats below the row's
    maximum counts at its true size rather than floored term by term."""
    import triton

    index = _index(rows, logits.device)
    n, vocab = index.numel(), logits.shape[-1]
    out = torch.empty(n, 2, dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    block = min(block_size or _BLOCK_SIZE, triton.next_power_of_2(vocab))
    num_blocks = triton.cdiv(vocab, block)
    partials = torch.empty(n, num_blocks, 3, dtype=torch.float32, device=logits.device)
    kernels = _triton_kernels()
    # No FMA contraction, as in the scale kernel: the fused statistics get the same bits.
    kernels.partials[(n, num_blocks)](logits, logits.stride(0), logits.stride(1), index, partials, vocab, num_blocks,
                                      BLOCK_SIZE=block, num_warps=4, enable_fp_fusion=False)
    _merge(partials, out, num_blocks)
    return out


def _merge(partials: torch.Tensor, out: torch.Tensor, num_blocks: int, rows: torch.Tensor | None = None,
           more_rows: torch.Tensor | None = None, more_offset: int = 0) -> None:
    """The second pass into ``out``, one program per row of it: over ``partials`` as they
    lie, or indexed, over the partials of ``rows`` and then those of ``more_rows``
    (``more_offset`` rows on)."""
    import triton

    if rows is None:
        index: tuple[torch.Tensor, int, torch.Tensor] = (out, 0, out)  # not read
    else:
        index = (rows, rows.numel(), rows if more_rows is None else more_rows)
    _triton_kernels().merge[(out.shape[0],)](
        partials, out, num_blocks, *index, more_offset,
        NUM_BLOCKS=triton.next_power_of_2(num_blocks), INDEXED=rows is not None, num_warps=1)


def apply_schedule_with_stats_(
    logits: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor,
    slots: torch.Tensor | None = None, prompt_len: torch.Tensor | None = None, *,
    entropy: torch.Tensor | None = None, clock: torch.Tensor | None = None,
    raw_rows: torch.Tensor, scaled_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale ``logits`` in place as :func:`ead_kernels.apply_schedule_triton_` (GPU tensors)
    or :func:`ead_kernels.apply_schedule_torch_` (others) does, with the same layouts,
    arguments and bits, and return ``(raw, scaled)``: :func:`row_stats` of
    ``logits[raw_rows]`` before the scale and of ``logits[scaled_rows]`` after it (``None``
    without ``scaled_rows``). The row indices are long tensors on the logits' device, in
    any order, possibly empty; the two sets may overlap.

    Why: an entropy-clock step needs ``H_t`` of the raw rows (the clock of token ``t``
    sums the entropies before it, so the row's own entropy can be taken while it is
    scaled), an in-pass targets step the ``lse`` before and after; apart, they read the
    rows once or twice more than the scale. (The ``entropy`` type cannot use this: its
    row's own entropy sets its temperature, so :func:`row_stats` has to run first.)

    On GPU tensors with Triton, one launch of the scale kernel over its usual grid takes
    the statistics of the rows flagged in a per-row table (built on the device: no host
    sync), of the block it loads and of the block it stores, with :func:`row_stats_triton`'s
    own block function, and one launch of its merge reduces them; a row not flagged costs
    nothing more, and one flagged of ``KIND_NONE`` is read but not written. The results
    are bit-identical to :func:`row_stats_triton` with the scale kernel's block size
    (1024 columns; its own default of 2048 sums in another order, and agrees to fp32
    rounding): tested under Triton's interpreter, checked on a GPU by
    ``python -m ead_kernels.gpu_check``. Elsewhere: ``row_stats``, the PyTorch scale,
    ``row_stats``.

    The dispatch reads :func:`ead_kernels.temperature._use_triton`, the scale's own, so
    that the one switch moves both.
    """
    if temperature._use_triton(logits):
        return _apply_schedule_with_stats_triton(logits, positions, kinds, params, slots, prompt_len, entropy=entropy,
                                                 clock=clock, raw_rows=raw_rows, scaled_rows=scaled_rows)
    raw = row_stats_torch(logits, raw_rows)
    apply_schedule_torch_(logits, positions, kinds, params, slots, prompt_len, entropy=entropy, clock=clock)
    return raw, None if scaled_rows is None else row_stats_torch(logits, scaled_rows)


def _apply_schedule_with_stats_triton(
    logits: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor,
    slots: torch.Tensor | None = None, prompt_len: torch.Tensor | None = None, *,
    entropy: torch.Tensor | None = None, clock: torch.Tensor | None = None,
    raw_rows: torch.Tensor, scaled_rows: torch.Tensor | None = None, block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`apply_schedule_with_stats_` in Triton; ``block_size`` as in
    :func:`ead_kernels.apply_schedule_triton_` (the tests raise it)."""
    import triton

    _check_inputs(logits, positions, kinds, params, slots, prompt_len, entropy, clock)
    device, (batch, vocab) = logits.device, logits.shape
    raw_index = _index(raw_rows, device)
    scaled_index = None if scaled_rows is None else _index(scaled_rows, device)
    num_raw = raw_index.numel()
    out = torch.empty(num_raw + (0 if scaled_index is None else scaled_index.numel()), 2, dtype=torch.float32,
                      device=device)
    if out.shape[0] == 0:  # no statistics: the plain scale
        if batch and vocab:
            _launch(logits, positions, kinds, params, slots, prompt_len, entropy, clock, _block(vocab, block_size))
    else:
        block = _block(vocab, block_size)
        num_blocks = triton.cdiv(vocab, block)
        flags = torch.zeros(2, batch, dtype=torch.int8, device=device)  # [raw, scaled] per row
        for half, index in enumerate((raw_index, scaled_index)):
            if index is not None and index.numel():
                flags[half].index_fill_(0, index, 1)
        partials = torch.empty(2, batch, num_blocks, 3, dtype=torch.float32, device=device)
        _launch(logits, positions, kinds, params, slots, prompt_len, entropy, clock, block, (flags, partials))
        _merge(partials, out, num_blocks, raw_index, scaled_index, batch)
    return out[:num_raw], None if scaled_index is None else out[num_raw:]
