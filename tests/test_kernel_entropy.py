"""The entropy-aware schedules in the kernel (the ``entropy`` type and the entropy clock)
and the row statistics that feed them, against ``ead_server.schedule`` and float64 torch.

The Triton kernels run as in tests/test_kernel.py (under the interpreter without a GPU,
set up there: importing it sets ``TRITON_INTERPRET`` and its warning filters). Every
comparison with the pure-Python reference is within one float32 ulp of the temperature:
the kernel's power is ``exp(exponent * log(r))`` and the reference's libm ``pow``, and
torch's ``exp`` may round its last float64 bit differently from libm's. Everything the
recipe fixes (selections, clamps, ``h_ref = 0`` rows, the PyTorch and Triton paths
against each other) is compared bit for bit.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_kernel import (  # the interpreter's set-up and the shared helpers
    DEVICE,
    KIND_NAMES,
    assert_bits_equal,
    make_slot_batch,
    needs_triton,
    random_logits,
    reference_temperature,
)
from test_kernel import pytestmark as kernel_marks

import ead_kernels
from ead_kernels import (
    KIND_CONSTANT,
    KIND_EAD,
    KIND_ENTROPY,
    KIND_NONE,
    KIND_REVERSE,
    KINDS,
    NUM_PARAMS,
    P_H_REF,
    PARAM_COLUMNS,
    apply_schedule_,
    apply_schedule_torch_,
    apply_schedule_triton_,
    schedule_temperatures,
)
from ead_kernels import target_stats as S
from ead_kernels import temperature as T
from ead_kernels.gpu_check import reference_row_stats

CPU = torch.device("cpu")
LOG_V = math.log(151936)

# test_kernel's filters, and the interpreter's numpy warnings on the NaN and +inf rows.
pytestmark = [*kernel_marks, *(pytest.mark.filterwarnings(f"ignore:{message}:RuntimeWarning") for message in (
    "invalid value encountered", "All-NaN slice encountered"))]


@pytest.fixture(autouse=True, scope="module")
def _fresh_kernels():
    """Build both modules' kernels under this process's TRITON_INTERPRET setting."""
    T._triton_kernel.cache_clear()
    S._triton_kernels.cache_clear()
    yield
    T._triton_kernel.cache_clear()
    S._triton_kernels.cache_clear()


# --------------------------------------------------------------------------- helpers


def entropy_rows(rng: random.Random, batch: int):
    """Rows of every kind (an unknown one too), a third of the annealed ones on the entropy
    clock, with per-row entropies and clocks at typical values and at the extremes."""
    positions, kinds, params, entropy, clock = [], [], [], [], []
    for _ in range(batch):
        tau_max = rng.choice([1.2, 2.0, rng.uniform(0.3, 3.0)])
        tau_min = rng.choice([0.1, rng.uniform(0.01, tau_max)])
        warmup = rng.choice([0, 10, rng.randrange(0, 100)])
        scale = rng.choice([25.0, 500.0, rng.uniform(0.5, 2000.0)])
        h_max = rng.choice([3.0, rng.uniform(0.1, 12.0)])
        exponent = rng.choice([1.0, 0.5, 2.0, rng.uniform(0.1, 5.0)])
        h_ref = rng.choice([0.0, 0.0, 1.5, rng.uniform(0.05, 4.0)])
        positions.append(rng.choice([0, max(warmup - 1, 0), warmup, rng.randrange(0, 4096), 10**9]))
        kinds.append(rng.choice([KIND_NONE, KIND_EAD, KIND_REVERSE, KIND_CONSTANT, KIND_ENTROPY, KIND_ENTROPY, 7]))
        params.append([tau_max, tau_min, rng.uniform(0.05, 2.0), float(warmup), scale, h_max, exponent, h_ref])
        entropy.append(rng.choice([0.0, -0.0, 1e-30, LOG_V, math.nan, math.inf, -math.inf, h_max,
                                   rng.uniform(0, 2 * h_max), rng.uniform(0, 2 * h_max)]))
        clock.append(rng.choice([0.0, 1e300, math.inf, h_ref * scale * math.log(1 + tau_max - tau_min),
                                 rng.uniform(0, 50), rng.uniform(0, 5000)]))
    return (torch.tensor(positions, dtype=torch.int64), torch.tensor(kinds, dtype=torch.int32),
            torch.tensor(params, dtype=torch.float64), torch.tensor(entropy, dtype=torch.float32),
            torch.tensor(clock, dtype=torch.float64))


def reference_temperatures(positions, kinds, params, entropy, clock) -> torch.Tensor:
    return torch.tensor([reference_temperature(k, t, p, e, c) for k, t, p, e, c in zip(
        kinds.tolist(), positions.tolist(), params.tolist(), entropy.tolist(), clock.tolist())], dtype=torch.float64)


def assert_within_one_float32_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """Positive temperatures: float32 bit patterns that differ by at most one."""
    got32, want32 = got.to(torch.float32), want.to(torch.float32)
    assert bool((got32 > 0).all() and got32.isfinite().all()), got32
    steps = (got32.view(torch.int32).long() - want32.view(torch.int32).long()).abs()
    assert int(steps.max()) <= 1, [(g, w) for g, w, s in zip(got.tolist(), want.tolist(), steps.tolist()) if s > 1]


def todays_temperatures(positions, kinds, params) -> torch.Tensor:
    """The token-clock schedule as the kernel computed it before the entropy kinds (its
    five columns), to show that ``h_ref = 0`` rows keep their bits."""
    tau_max, tau_min, tau, warmup, scale = params[:, :5].unbind(1)
    t = positions.to(torch.float64)
    growth = torch.exp(t / scale)
    is_ead = kinds == KIND_EAD
    ead = torch.maximum(1.0 + tau_max - growth, tau_min)
    reverse = torch.minimum(tau_min + growth, tau_max)
    annealed = torch.where(t < warmup, 1.0, torch.where(is_ead, ead, reverse))
    return torch.where(is_ead | (kinds == KIND_REVERSE), annealed, torch.where(kinds == KIND_CONSTANT, tau, 1.0))


def recipe(logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    return (logits.float() / temps.to(torch.float32).to(logits.device).unsqueeze(1)).to(logits.dtype)


# ------------------------------------------------------------------------ the schedule


def test_the_kind_and_column_names() -> None:
    assert KINDS["entropy"] == KIND_ENTROPY == 4 and KIND_NAMES[KIND_ENTROPY] == "entropy"
    assert PARAM_COLUMNS == ("tau_max", "tau_min", "tau", "warmup", "scale", "h_max", "exponent", "h_ref")
    assert NUM_PARAMS == 8 and PARAM_COLUMNS[P_H_REF] == "h_ref"
    assert {"KIND_ENTROPY", "P_H_MAX", "P_EXPONENT", "P_H_REF"} <= set(ead_kernels.__all__)


def test_entropy_schedules_match_the_reference_row_by_row() -> None:
    """Host and device paths against ``schedule_temperature``: the same bits for each other,
    within one float32 ulp of the reference, and equal to it wherever the recipe only
    selects (none, constant, warm-up, the entropy ratio clamped at 0 or 1 or NaN)."""
    rows = entropy_rows(random.Random(0), 3000)
    positions, kinds, params, entropy, clock = rows
    host = schedule_temperatures(positions, kinds, params, entropy=entropy, clock=clock)
    device = T._device_temperatures(positions, kinds, params, entropy, clock)
    assert torch.equal(host.view(torch.int64), device.view(torch.int64))
    want = reference_temperatures(*rows)
    assert_within_one_float32_ulp(host, want)
    ratio = entropy.double() / params[:, 5]
    selected = ((kinds != KIND_EAD) & (kinds != KIND_REVERSE) & (kinds != KIND_ENTROPY)) | (
        (kinds != KIND_ENTROPY) & (positions < params[:, 3])) | (
        (kinds == KIND_ENTROPY) & (ratio.isnan() | (ratio <= 0) | (ratio >= 1)))
    assert int(selected.sum()) > 500
    assert torch.equal(host[selected], want[selected])


def test_token_clock_rows_keep_their_bits() -> None:
    """``h_ref = 0``: the entropy and clock inputs change nothing, and the temperatures are
    those of the kernel before this change, bit for bit."""
    positions, kinds, params, entropy, clock = entropy_rows(random.Random(1), 2000)
    params[:, P_H_REF] = 0.0
    kinds[kinds == KIND_ENTROPY] = KIND_EAD
    before = todays_temperatures(positions, kinds, params)
    for inputs in ({}, {"entropy": entropy, "clock": clock}):
        got = schedule_temperatures(positions, kinds, params, **inputs)
        assert torch.equal(got.view(torch.int64), before.view(torch.int64))
        assert torch.equal(T._device_temperatures(positions, kinds, params, **inputs), before)


def test_none_reads_as_zeros() -> None:
    positions, kinds, params, _, _ = entropy_rows(random.Random(2), 500)
    zeros = {"entropy": torch.zeros(500), "clock": torch.zeros(500, dtype=torch.float64)}
    assert torch.equal(schedule_temperatures(positions, kinds, params), schedule_temperatures(
        positions, kinds, params, **zeros))
    logits = random_logits(500, 64, torch.float32, seed=2).cpu()
    assert_bits_equal(apply_schedule_torch_(logits.clone(), positions, kinds, params),
                      apply_schedule_torch_(logits.clone(), positions, kinds, params, **zeros))


# tau_max 2.0, tau_min 0.25 (exact in binary), h_max 3, exponent 1.5, warm-up 10, k * d 25.
EXTREMES = [
    # (kind, t, h_ref, entropy, clock, temperature)
    (KIND_ENTROPY, 0, 0.0, 0.0, 0.0, 0.25),
    (KIND_ENTROPY, 0, 0.0, LOG_V, 0.0, 2.0),
    (KIND_ENTROPY, 0, 0.0, math.nan, 0.0, 0.25),
    (KIND_ENTROPY, 0, 0.0, math.inf, 0.0, 2.0),
    (KIND_ENTROPY, 0, 0.0, -math.inf, 0.0, 0.25),
    (KIND_ENTROPY, 0, 0.0, 3.0, 0.0, 2.0),
    (KIND_EAD, 50, 1.5, 0.0, 0.0, 2.0),  # the clock at 0: 1 + tau_max - exp(0)
    (KIND_EAD, 50, 1.5, 0.0, 1e300, 0.25),
    (KIND_EAD, 50, 1.5, 0.0, math.inf, 0.25),
    (KIND_EAD, 5, 1.5, 0.0, 1e300, 1.0),  # the warm-up counts tokens
    (KIND_EAD, 10**9, 1.5, 0.0, 0.0, 2.0),  # the clock, not t, drives the anneal
    (KIND_REVERSE, 50, 1.5, 0.0, 0.0, 1.25),
    (KIND_REVERSE, 50, 1.5, 0.0, 1e300, 2.0),
    # The token clock: the clock is not read (torch's exp, as the kernel's).
    (KIND_EAD, 10, 0.0, 0.0, 1e300, 3.0 - torch.exp(torch.tensor(10 / 25, dtype=torch.float64)).item()),
]


@pytest.mark.parametrize("path", ["host", "device", pytest.param("triton", marks=needs_triton)])
def test_extremes_give_finite_positive_temperatures(path) -> None:
    n = len(EXTREMES)
    kinds = torch.tensor([e[0] for e in EXTREMES], dtype=torch.int32)
    positions = torch.tensor([e[1] for e in EXTREMES])
    params = torch.tensor([[2.0, 0.25, 1.0, 10.0, 25.0, 3.0, 1.5, e[2]] for e in EXTREMES], dtype=torch.float64)
    entropy = torch.tensor([e[3] for e in EXTREMES], dtype=torch.float32)
    clock = torch.tensor([e[4] for e in EXTREMES], dtype=torch.float64)
    want = torch.tensor([e[5] for e in EXTREMES], dtype=torch.float64)
    if path == "triton":
        logits = torch.ones(n, 3, device=DEVICE)
        args = (positions, kinds, params)
        apply_schedule_triton_(logits, *(a.to(DEVICE) for a in args), entropy=entropy.to(DEVICE),
                               clock=clock.to(DEVICE))
        assert_bits_equal(logits, recipe(torch.ones(n, 3, device=DEVICE), want))
        return
    fn = schedule_temperatures if path == "host" else T._device_temperatures
    got = fn(positions, kinds, params, entropy=entropy, clock=clock)
    assert torch.equal(got, want), (got, want)
    assert_within_one_float32_ulp(got, reference_temperatures(positions, kinds, params, entropy, clock))


# ------------------------------------------------------------------------ the kernel


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_layout_with_entropy_inputs(path, dtype) -> None:
    """Each row scaled by its float32 temperature (the recipe), the entropy inputs read by
    row; the PyTorch and Triton paths give the same bits, ``KIND_NONE`` rows untouched."""
    positions, kinds, params, entropy, clock = (x.to(DEVICE) for x in entropy_rows(random.Random(3), 48))
    logits = random_logits(48, 1000, dtype, seed=3)
    original = logits.clone()
    temps = schedule_temperatures(*(x.cpu() for x in (positions, kinds, params)), entropy=entropy.cpu(),
                                  clock=clock.cpu())
    fn = apply_schedule_torch_ if path == "torch" else apply_schedule_triton_
    assert fn(logits, positions, kinds, params, entropy=entropy, clock=clock) is logits
    assert_bits_equal(logits, recipe(original, temps))
    none_rows = (kinds == KIND_NONE) | (kinds == 7)
    assert none_rows.any()
    assert_same_logits(logits[none_rows], original[none_rows])


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
def test_slot_layout_reads_entropy_inputs_by_row(path) -> None:
    """V2: ``kinds``/``params`` by slot, ``entropy``/``clock`` by row (a request's several
    rows under speculative decoding each have their own)."""
    slots, pos, prompt_len, kinds, params, want_t = make_slot_batch(9, 6, 30)
    rng = random.Random(9)
    _, slot_kinds, slot_params, _, _ = entropy_rows(rng, 6)
    _, _, _, entropy, clock = entropy_rows(rng, 30)
    kinds.copy_(slot_kinds.to(DEVICE))
    params.copy_(slot_params.to(DEVICE))
    logits = random_logits(30, 517, torch.float32, seed=9)
    original = logits.clone()
    index = slots.long().cpu()
    temps = schedule_temperatures(want_t.cpu(), slot_kinds[index], slot_params[index], entropy=entropy, clock=clock)
    assert_within_one_float32_ulp(temps, reference_temperatures(want_t.cpu(), slot_kinds[index], slot_params[index],
                                                                entropy, clock))
    inputs = {"entropy": entropy.to(DEVICE), "clock": clock.to(DEVICE)}
    if path == "torch":
        apply_schedule_torch_(logits, pos, kinds, params, slots, prompt_len, **inputs)
    else:
        apply_schedule_triton_(logits, pos, kinds, params, slots, prompt_len, **inputs, block_size=1024)
    assert_bits_equal(logits, recipe(original, temps))
    expected = ead_kernels.apply_schedule_slots_(original.clone(), slots, pos, prompt_len, kinds, params, **inputs)
    assert_bits_equal(logits, expected)


@needs_triton
def test_triton_reads_strided_entropy_inputs_and_none_as_zeros() -> None:
    """``entropy`` as a column of ``row_stats``' output (stride 2); left out, zeros."""
    positions, kinds, params, entropy, clock = (x.to(DEVICE) for x in entropy_rows(random.Random(4), 16))
    stats = torch.stack([torch.zeros_like(entropy), entropy], 1)
    logits = random_logits(16, 300, torch.float32, seed=4)
    want = apply_schedule_torch_(logits.clone(), positions, kinds, params, entropy=entropy, clock=clock)
    wide_clock = torch.stack([clock, clock], 1)[:, 0]
    got = apply_schedule_triton_(logits.clone(), positions, kinds, params, entropy=stats[:, 1], clock=wide_clock)
    assert_bits_equal(got, want)
    zeros = {"entropy": torch.zeros_like(entropy), "clock": torch.zeros_like(clock)}
    assert_bits_equal(apply_schedule_triton_(logits.clone(), positions, kinds, params),
                      apply_schedule_torch_(logits.clone(), positions, kinds, params, **zeros))


@pytest.mark.parametrize(
    ("inputs", "error", "match"),
    [
        ({"entropy": torch.zeros(3)}, ValueError, r"entropy must have shape \[2\]"),
        ({"entropy": torch.zeros(2, dtype=torch.float64)}, TypeError, "entropy must be float32"),
        ({"entropy": torch.zeros(2, 1)}, ValueError, "entropy must have shape"),
        ({"clock": torch.zeros(2)}, TypeError, "clock must be float64"),
        ({"clock": torch.zeros(2, dtype=torch.float64, device="meta")}, ValueError, "clock must be on cpu"),
    ],
)
@pytest.mark.parametrize("fn", [apply_schedule_torch_, apply_schedule_triton_, apply_schedule_])
def test_entropy_input_validation(inputs, error, match, fn) -> None:
    logits = torch.zeros(2, 10)
    rows = (torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.int32),
            torch.ones(2, NUM_PARAMS, dtype=torch.float64))
    with pytest.raises(error, match=match):
        fn(logits, *rows, **inputs)
    if fn is apply_schedule_torch_:
        with pytest.raises(error, match=match):
            schedule_temperatures(*rows, **inputs)


def test_slot_layout_entropy_is_per_row_not_per_slot() -> None:
    slots, pos, prompt_len, kinds, params, _ = make_slot_batch(5, 4, 6)
    logits = random_logits(6, 50, torch.float32, seed=5)
    with pytest.raises(ValueError, match=r"entropy must have shape \[6\]"):
        apply_schedule_torch_(logits, pos, kinds, params, slots, prompt_len, entropy=torch.zeros(4, device=DEVICE))


# ------------------------------------------------------------------------ row_stats


def edge_logits(batch: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows (``-inf`` entries, a tail 200 nats down) and the edge rows: all ``-inf``,
    one-hot, a ``NaN``, a ``+inf``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * 4
    x[:, ::7] = -math.inf
    x[:, 1:60] -= 200.0
    x[0] = -math.inf
    x[1] = -math.inf
    x[1, vocab // 3] = 5.0
    x[2, vocab // 2] = math.nan
    x[3, 11] = math.inf
    return x.to(dtype)


def assert_stats_close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), (got, want)
    assert torch.equal(got[want.isinf()], want[want.isinf()])
    finite = want.isfinite()
    assert float((got - want).abs()[finite].max()) <= tolerance, (got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch", [6, 19])
def test_row_stats_against_float64(dtype, batch) -> None:
    """``(lse, entropy)`` against float64 ``logsumexp`` and ``-sum p log p`` with
    ``0 log 0 = 0``, the edge rows by definition: all ``-inf`` gives ``(-inf, 0)``, a NaN
    ``(NaN, NaN)``, a ``+inf`` ``(inf, NaN)``; a one-hot row's entropy is the floor's
    ``(V - 1) * 87 e^-87`` (target_stats' proof), and no entropy is negative."""
    vocab = 3001
    logits = edge_logits(batch, vocab, dtype, seed=batch)
    rows = list(range(batch))[::-1]
    got = S.row_stats_torch(logits, rows)
    assert got.dtype == torch.float32 and got.shape == (batch, 2)
    want = reference_row_stats(logits[rows])
    assert torch.isnan(want[batch - 3, 1]) and torch.isnan(want[batch - 4, 1])  # the reference's NaN and +inf rows
    assert_stats_close(got, want, 1e-5)
    assert got[-1].tolist() == [-math.inf, 0.0]
    assert 0.0 < got[-2, 1] <= (vocab - 1) * 87 * math.exp(-87) * 1.001
    assert bool((got[:, 1][~got[:, 1].isnan()] >= 0).all())
    torch.testing.assert_close(got[:, 0], torch.logsumexp(logits[rows].float(), -1), rtol=0, atol=0, equal_nan=True)


def test_row_stats_index_forms_and_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = edge_logits(9, 500, torch.float32, seed=1)

    def fail(*args, **kwargs):
        raise AssertionError("the Triton path must not run on CPU tensors")

    monkeypatch.setattr(S, "row_stats_triton", fail)
    by_list = S.row_stats(logits, [4, 0, 4])
    assert torch.equal(by_list.nan_to_num(), S.row_stats(logits, torch.tensor([4, 0, 4])).nan_to_num())
    assert torch.equal(by_list[0], by_list[2])
    assert S.row_stats(logits, []).shape == (0, 2)


@needs_triton
@pytest.mark.parametrize(("vocab", "block_size", "dtype", "layout"), [
    (1000, 256, torch.float32, "contiguous"),  # 4 blocks, a ragged last one
    (3001, 1024, torch.bfloat16, "contiguous"),
    (777, None, torch.float16, "transposed"),  # one block; column stride != 1
    (1000, 128, torch.float32, "slice"),  # row stride != vocab
])
def test_row_stats_triton_matches_torch(vocab, block_size, dtype, layout) -> None:
    """The split reduction against the PyTorch path, the edge rows included, and a row
    whose middle blocks are all ``-inf`` (they take no part in the merge)."""
    batch = 7
    source = edge_logits(batch, vocab + 5, dtype, seed=vocab)
    source[4, 100:700] = -math.inf
    source[5] = torch.arange(vocab + 5, dtype=dtype) / 50  # the maximum in the last block
    if layout == "transposed":
        logits = source[:, :vocab].t().contiguous().t()
    elif layout == "slice":
        logits = source[:, :vocab]
    else:
        logits = source[:, :vocab].contiguous()
    rows = [6, 0, 1, 2, 3, 4, 5, 4]
    want = S.row_stats_torch(logits, rows)
    got = S.row_stats_triton(logits.to(DEVICE), torch.tensor(rows, device=DEVICE), block_size=block_size)
    assert got.dtype == torch.float32 and got.device == DEVICE
    assert_stats_close(got, want, 2e-5)
    assert_stats_close(got, reference_row_stats(logits[rows]), 1e-5)
    assert 0.0 < float(got[2, 1]) < 1e-30  # one-hot: the floor's share, not 0 log 0 = NaN
    assert S.row_stats_triton(logits.to(DEVICE), []).shape == (0, 2)


# --------------------------------------------------------- the scale with its statistics


def stats_batch(layout: str, dtype: torch.dtype, seed: int, batch: int = 8, vocab: int = 200):
    """A batch for :func:`ead_kernels.apply_schedule_with_stats_`: the edge rows of
    :func:`edge_logits` (all ``-inf``, one-hot, ``NaN``, ``+inf``), every kind with the
    entropy inputs (row 1, the one-hot, of ``KIND_NONE``, row 4 of an unknown kind or
    none), strided logits (a slice in the rows layout, a transposed copy in the slots')."""
    rng = random.Random(seed)
    source = edge_logits(batch, vocab + 3, dtype, seed)
    logits = source[:, :vocab] if layout == "rows" else source[:, :vocab].t().contiguous().t()
    positions, kinds, params, entropy, clock = entropy_rows(rng, batch)
    if layout == "rows":
        index = torch.arange(batch)
        args: tuple[torch.Tensor, ...] = (positions, kinds, params)
    else:
        slots, pos, prompt_len, _, _, _ = make_slot_batch(seed, 6, batch)
        index = slots.long().cpu()
        _, kinds, params, _, _ = entropy_rows(rng, 6)
        args = (pos, kinds, params, slots, prompt_len)
    kinds[index[4]] = 7
    kinds[index[1]] = KIND_NONE
    return logits.to(DEVICE), tuple(a.to(DEVICE) for a in args), {"entropy": entropy.to(DEVICE), "clock": clock.to(DEVICE)}


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit but for NaN payloads: the Triton path writes bfloat16's canonical NaN,
    where torch's CPU division keeps the payload."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert_bits_equal(got.masked_fill(nan, 0), want.masked_fill(nan, 0))


def rows_index(rows: list[int] | None) -> torch.Tensor | None:
    return None if rows is None else torch.tensor(rows, dtype=torch.long, device=DEVICE)


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(("layout", "dtype"), [
    ("rows", torch.float32), ("rows", torch.bfloat16), ("slots", torch.float16), ("slots", torch.bfloat16)], ids=str)
def test_scale_with_stats_is_row_stats_around_the_scale(path, layout, dtype) -> None:
    """Overlapping, unsorted row sets with a repeat, ``KIND_NONE`` and unknown-kind rows
    among them: the logits scaled as by the scale alone (``KIND_NONE`` rows untouched),
    ``raw`` the statistics before it and ``scaled`` after it. The Triton path (ragged
    blocks of 128) gives the bits of :func:`row_stats_triton` with its block size."""
    logits, args, inputs = stats_batch(layout, dtype, seed=11)
    original = logits.clone()
    raw_rows, scaled_rows = rows_index([5, 0, 1, 3, 3, 7, 2, 4]), rows_index([1, 6, 5, 0, 2, 4])
    if path == "torch":
        raw, scaled = ead_kernels.apply_schedule_with_stats_(logits, *args, **inputs, raw_rows=raw_rows,
                                                             scaled_rows=scaled_rows)
    else:
        raw, scaled = S._apply_schedule_with_stats_triton(logits, *args, **inputs, raw_rows=raw_rows,
                                                          scaled_rows=scaled_rows, block_size=128)
    want = apply_schedule_torch_(original.clone(), *args, **inputs)
    assert_same_logits(logits, want)
    none_rows = [1, 4] if layout == "rows" else [i for i in range(8) if int(args[1][args[3][i]]) not in KIND_NAMES]
    assert_same_logits(logits[none_rows], original[none_rows])
    assert raw.shape == (8, 2) and scaled is not None and scaled.shape == (6, 2) and raw.dtype == torch.float32
    if path == "torch":
        assert_bits_equal(raw, S.row_stats_torch(original, raw_rows))
        assert_bits_equal(scaled, S.row_stats_torch(want, scaled_rows))
        return
    assert_bits_equal(logits, apply_schedule_triton_(original.clone(), *args, **inputs, block_size=128))
    assert_bits_equal(raw, S.row_stats_triton(original, raw_rows, block_size=128))
    assert_bits_equal(scaled, S.row_stats_triton(logits, scaled_rows, block_size=128))
    assert_stats_close(raw, S.row_stats_torch(original, raw_rows), 2e-5)
    assert_stats_close(scaled, S.row_stats_torch(want, scaled_rows), 2e-5)


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(("raw_rows", "scaled_rows"), [
    ([], None),  # the plain scale
    ([], [3, 1]),
    ([2, 0], None),
    ([0, 1, 2], [5, 3, 4]),  # disjoint
    ([1], [1]),  # a KIND_NONE row both ways
])
def test_scale_with_stats_row_sets(path, raw_rows, scaled_rows, monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty, absent and disjoint sets through the public function; the Triton path as
    the processor reaches it (the scale's dispatch switched on), one block per row."""
    logits, args, inputs = stats_batch("rows", torch.float32, seed=12, batch=6, vocab=200)
    want = apply_schedule_torch_(logits.clone(), *args, **inputs)
    want_raw, want_scaled = S.row_stats_torch(logits, raw_rows), S.row_stats_torch(want, scaled_rows or [])
    if path == "triton":
        monkeypatch.setattr(T, "_use_triton", lambda logits: True)
        monkeypatch.setattr(S, "row_stats_torch", None)  # not the PyTorch path
    raw, scaled = ead_kernels.apply_schedule_with_stats_(logits, *args, **inputs, raw_rows=rows_index(raw_rows),
                                                         scaled_rows=rows_index(scaled_rows))
    assert_same_logits(logits, want)
    assert raw.shape == (len(raw_rows), 2)
    if raw_rows:
        assert_stats_close(raw, want_raw, 2e-5)
    if scaled_rows is None:
        assert scaled is None
    else:
        assert scaled is not None and scaled.shape == (len(scaled_rows), 2)
        assert_stats_close(scaled, want_scaled, 2e-5)


def test_scale_with_stats_dispatch_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors take the PyTorch path; both paths check the scale's inputs."""
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path must not run on CPU tensors")

    logits, args, inputs = stats_batch("rows", torch.float32, seed=13, batch=6, vocab=50)
    bad = (*args[:2], args[2].float())
    with pytest.raises(TypeError, match="float64"):
        S._apply_schedule_with_stats_triton(logits.clone(), *bad, raw_rows=rows_index([0]))
    monkeypatch.setattr(S, "_apply_schedule_with_stats_triton", fail)
    with pytest.raises(TypeError, match="float64"):
        ead_kernels.apply_schedule_with_stats_(logits.cpu(), *(a.cpu() for a in bad), raw_rows=torch.tensor([0]))
    raw, scaled = ead_kernels.apply_schedule_with_stats_(logits.cpu(), *(a.cpu() for a in args),
                                                         raw_rows=torch.tensor([0, 5]))
    assert raw.shape == (2, 2) and scaled is None


# ------------------------------------------------------------------------ the benchmark


def test_the_entropy_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m ead_kernels.benchmark --entropy`` on a tiny size: every step, and its
    ratio to the plain EAD step."""
    from ead_kernels import benchmark

    benchmark.main(["--entropy", "--batch-sizes", "3", "--vocab-sizes", "200", "--warmup", "0", "--repeats", "2"])
    out = capsys.readouterr().out
    assert "clock us" in out and "entropy us" in out and "targets us" in out
    [row] = benchmark.entropy_steps([2], [100], torch.float32, warmup=0, repeats=1, device=CPU)
    assert {f"{name}/ead" for name in benchmark.ENTROPY_STEPS} <= set(row)
