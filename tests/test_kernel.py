"""The scheduled-temperature kernel against the pure-Python schedule and the torch oracle.

Without a GPU the Triton kernel runs under Triton's interpreter on CPU tensors. Triton
reads ``TRITON_INTERPRET`` when a kernel is decorated, and ``ead_kernels`` decorates
its kernel on first use, so setting the variable here (and dropping any kernel built
earlier in this process) is enough. With a GPU the same tests run the compiled kernel.
"""

from __future__ import annotations

import functools
import math
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ead_kernels  # noqa: E402
from ead_kernels import temperature as T  # noqa: E402
from ead_kernels import (  # noqa: E402
    KIND_CONSTANT,
    KIND_EAD,
    KIND_ENTROPY,
    KIND_NONE,
    KIND_REVERSE,
    NUM_PARAMS,
    apply_schedule_,
    apply_schedule_torch_,
    apply_schedule_triton_,
    schedule_temperatures,
)
from ead_server.schedule import effective_decay, schedule_temperature  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
KIND_NAMES = {KIND_EAD: "ead", KIND_REVERSE: "reverse", KIND_CONSTANT: "constant", KIND_ENTROPY: "entropy"}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

# Triton's interpreter evaluates exp, log and division with numpy, which warns where
# float64 overflows, at log(0) = -inf and at 0 / 0 (a select then drops the NaN).
pytestmark = [pytest.mark.filterwarnings(f"ignore:{message}:RuntimeWarning") for message in (
    "overflow encountered in exp", "divide by zero encountered in log", "invalid value encountered in divide")]

needs_triton = pytest.mark.skipif(not T.triton_available(), reason="triton is not installed")


@pytest.fixture(autouse=True, scope="module")
def _fresh_kernel():
    """Rebuild the kernel under this module's TRITON_INTERPRET setting."""
    T._triton_kernel.cache_clear()
    yield
    T._triton_kernel.cache_clear()


# --------------------------------------------------------------------------- helpers


def reference_temperature(kind: int, t: int, row: list[float], entropy: float = 0.0, clock: float = 0.0) -> float:
    """The formulas (docs/design.md) through ead_server.schedule; KIND_NONE is temperature 1."""
    if kind not in KIND_NAMES:
        return 1.0
    tau_max, tau_min, tau, warmup, scale, h_max, exponent, h_ref = row
    return schedule_temperature(
        KIND_NAMES[kind], t, tau_max=tau_max, tau_min=tau_min, tau=tau, warmup=int(warmup), scale=scale,
        h_max=h_max, exponent=exponent, h_ref=h_ref, entropy=entropy, clock=clock,
    )


def random_rows(rng: random.Random, batch: int) -> tuple[list[int], list[int], list[list[float]]]:
    """Rows that hit every branch: warm-up edges, the anneal, the clamps, exp overflow."""
    positions, kinds, params = [], [], []
    for _ in range(batch):
        tau_max = rng.choice([1.2, 1.0, 2.0, rng.uniform(0.3, 3.0)])
        tau_min = rng.choice([0.1, 0.8, rng.uniform(0.01, tau_max)])
        tau = rng.uniform(0.05, 2.0)
        warmup = rng.choice([0, 1, 10, rng.randrange(0, 500)])
        k = rng.choice([1.0, 20.0])  # the paper's text and the released code
        d = rng.choice([25.0, effective_decay(25.0, 5.0, 40000.0, rng.randrange(0, 10_000)), rng.uniform(0.5, 100)])
        scale = k * d
        t = rng.choice(
            [
                0,
                max(warmup - 1, 0),
                warmup,
                warmup + 1,
                rng.randrange(0, 4096),
                int(scale * math.log(1 + tau_max - tau_min)),  # where the ead clamp kicks in
                int(scale * 709.8) + rng.randrange(0, 3),  # exp overflows float64
                10**9,
                2**40,
            ]
        )
        positions.append(t)
        kinds.append(rng.choice([KIND_NONE, KIND_EAD, KIND_REVERSE, KIND_CONSTANT]))
        params.append([tau_max, tau_min, tau, float(warmup), scale, 3.0, 1.0, 0.0])  # the token clock
    return positions, kinds, params


def make_rows(seed: int, batch: int, device: torch.device = DEVICE):
    positions, kinds, params = random_rows(random.Random(seed), batch)
    return (
        torch.tensor(positions, dtype=torch.int64, device=device),
        torch.tensor(kinds, dtype=torch.int32, device=device),
        torch.tensor(params, dtype=torch.float64, device=device).reshape(-1, NUM_PARAMS),
    )


def reference_output(logits: torch.Tensor, positions, kinds, params) -> torch.Tensor:
    """``(row.float() / float32(temperature)).to(dtype)`` from the pure-Python schedule."""
    temps = [reference_temperature(k, t, p) for k, t, p in zip(kinds.tolist(), positions.tolist(), params.tolist())]
    temps32 = torch.tensor(temps, dtype=torch.float64).to(torch.float32).to(logits.device)
    return (logits.float() / temps32.unsqueeze(1)).to(logits.dtype)


def random_logits(batch: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * 8
    x[:, ::13] = -math.inf  # masked tokens (allowed-token lists, bad words)
    x[:, 1::97] = 0.0
    return x.to(dtype).to(DEVICE)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    a, e = actual.view(BITS[actual.dtype]), expected.view(BITS[expected.dtype])
    mismatches = (a != e).sum().item()
    assert mismatches == 0, f"{mismatches} of {a.numel()} elements differ"


# ------------------------------------------------------------- schedule_temperatures


def _assert_close_to_reference(got: float, want: float, row: list[float]) -> None:
    # torch.exp may round differently from math.exp in the last bit, and for ead that
    # bit is on the scale of 1 + tau_max, not of the (smaller) result.
    tolerance = 2 * math.ulp(1.0 + row[0]) + 2 * math.ulp(want)
    assert abs(got - want) <= tolerance, (got, want, row)


def test_schedule_temperatures_match_reference_rows() -> None:
    positions, kinds, params = make_rows(seed=0, batch=5000, device=torch.device("cpu"))
    temps = schedule_temperatures(positions, kinds, params)
    assert temps.dtype == torch.float64 and temps.shape == (5000,)
    for t, kind, row, got in zip(positions.tolist(), kinds.tolist(), params.tolist(), temps.tolist()):
        want = reference_temperature(kind, t, row)
        _assert_close_to_reference(got, want, row)
        if kind == KIND_NONE or kind == KIND_CONSTANT or t < row[3]:
            assert got == want  # selections, no arithmetic


def test_overflow_clamps() -> None:
    """exp(t / scale) = inf far past the anneal: ead ends at tau_min, reverse at tau_max."""
    positions = torch.tensor([10**9, 10**9, 2**50, 2**50])
    kinds = torch.tensor([KIND_EAD, KIND_REVERSE, KIND_EAD, KIND_REVERSE])
    rows = [[1.2, 0.1, 1.0, 10.0, 25.0, 3.0, 1.0, 0.0]] * 2 + [[1.5, 0.8, 1.0, 0.0, 500.0, 3.0, 1.0, 0.0]] * 2
    params = torch.tensor(rows, dtype=torch.float64)
    assert schedule_temperatures(positions, kinds, params).tolist() == [0.1, 1.2, 0.8, 1.5]


def test_paper_schedule_values() -> None:
    """Spot values of the paper preset (k = 1, d = 25) and the released code (k = 20)."""
    positions = torch.tensor([0, 9, 10, 11, 30, 10, 370, 400])
    kinds = torch.full((8,), KIND_EAD)
    paper, released = [1.2, 0.1, 1.0, 10.0, 25.0, 3.0, 1.0, 0.0], [1.2, 0.1, 1.0, 10.0, 500.0, 3.0, 1.0, 0.0]
    params = torch.tensor([paper] * 5 + [released] * 3, dtype=torch.float64)
    got = schedule_temperatures(positions, kinds, params).tolist()
    assert got[:2] == [1.0, 1.0]  # warm-up
    assert got[2] == pytest.approx(2.2 - math.exp(10 / 25))
    assert got[4] == 0.1  # clamped after ~18 tokens at k = 1
    assert got[5] == pytest.approx(2.2 - math.exp(10 / 500))
    assert got[6] > 0.1 and got[7] == 0.1  # about 370 tokens at k = 20


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from([KIND_NONE, KIND_EAD, KIND_REVERSE, KIND_CONSTANT]),
    t=st.one_of(st.integers(0, 64), st.integers(0, 2**45)),
    tau_max=st.floats(0.05, 5.0),
    tau_min_frac=st.floats(0.0, 1.0),
    tau=st.floats(0.01, 5.0),
    warmup=st.integers(0, 64),
    k=st.sampled_from([1.0, 20.0]),
    d=st.floats(0.1, 40000.0),
)
def test_schedule_temperatures_property(kind, t, tau_max, tau_min_frac, tau, warmup, k, d) -> None:
    tau_min = max(tau_max * tau_min_frac, 1e-3)
    row = [tau_max, tau_min, tau, float(warmup), k * d, 3.0, 1.0, 0.0]
    got = schedule_temperatures(
        torch.tensor([t]), torch.tensor([kind]), torch.tensor([row], dtype=torch.float64)
    ).item()
    _assert_close_to_reference(got, reference_temperature(kind, t, row), row)


# ------------------------------------------------------------------------ the kernel

# (batch, vocab, block_size, layout). The interpreter pays ~4 ms per program, so the big
# cases raise the block size; the default block (1024) is covered by the small ones.
CASES = [
    (1, 1000, None, "contiguous"),
    (1, 32003, None, "contiguous"),
    (3, 4099, None, "contiguous"),
    (257, 1000, None, "contiguous"),
    (257, 4099, 8192, "contiguous"),
    (64, 1000, None, "slice"),  # big[:, :V]: row stride != V
    (64, 4099, 8192, "every_other_row"),  # big[::2]
    (32, 1000, None, "transposed"),  # column stride != 1
]


def make_layout(batch: int, vocab: int, dtype: torch.dtype, layout: str, seed: int):
    """Returns (storage, view): the view is the logits, the storage shows stray writes."""
    if layout == "contiguous":
        storage = random_logits(batch, vocab, dtype, seed)
        return storage, storage
    if layout == "slice":
        storage = random_logits(batch, vocab + 37, dtype, seed)
        return storage, storage[:, :vocab]
    if layout == "every_other_row":
        storage = random_logits(2 * batch, vocab, dtype, seed)
        return storage, storage[::2]
    if layout == "transposed":
        storage = random_logits(vocab, batch, dtype, seed)
        return storage, storage.t()
    raise AssertionError(layout)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("batch", "vocab", "block_size", "layout"), CASES)
def test_triton_matches_torch_and_reference(batch, vocab, block_size, layout, dtype) -> None:
    seed = batch * 100_003 + vocab
    positions, kinds, params = make_rows(seed, batch)
    if batch == 1:
        kinds.fill_(KIND_EAD)
    storage, logits = make_layout(batch, vocab, dtype, layout, seed)
    original_storage = storage.clone()
    original = logits.clone()

    expected = apply_schedule_torch_(original.clone(), positions, kinds, params)
    out = apply_schedule_triton_(logits, positions, kinds, params, block_size=block_size)

    assert out is logits
    assert_bits_equal(logits, expected)
    assert_bits_equal(logits, reference_output(original, positions, kinds, params))
    none_rows = kinds == KIND_NONE
    assert batch == 1 or (none_rows.any() and not none_rows.all())
    assert_bits_equal(logits[none_rows], original[none_rows])
    # Nothing outside the view was touched.
    outside = torch.ones_like(storage, dtype=torch.bool)
    if layout == "transposed":
        outside.t()[:, :] = False
    else:
        outside[(slice(None, None, 2) if layout == "every_other_row" else slice(None)), :vocab] = False
    assert_bits_equal(storage[outside], original_storage[outside])


@needs_triton
def test_triton_strided_schedule_tensors() -> None:
    """positions, kinds and params may be views into larger engine buffers."""
    batch, vocab = 16, 1000
    positions, kinds, params = make_rows(7, 2 * batch)
    wide = torch.zeros(batch, NUM_PARAMS + 4, dtype=torch.float64, device=DEVICE)
    wide[:, 2:-2] = params[::2]
    args = (positions[::2], kinds[::2], wide[:, 2:-2])
    logits = random_logits(batch, vocab, torch.float32, seed=7)
    expected = apply_schedule_torch_(logits.clone(), *args)
    assert_bits_equal(apply_schedule_triton_(logits, *args), expected)


@needs_triton
def test_triton_all_none_rows_and_empty_batch() -> None:
    logits = random_logits(4, 1000, torch.bfloat16, seed=1)
    original = logits.clone()
    positions, _, params = make_rows(1, 4)
    kinds = torch.full((4,), KIND_NONE, dtype=torch.int32, device=DEVICE)
    assert_bits_equal(apply_schedule_triton_(logits, positions, kinds, params), original)
    empty = torch.empty(0, 1000, device=DEVICE)
    rows = make_rows(1, 0)
    assert apply_schedule_triton_(empty, *rows).shape == (0, 1000)


def test_torch_path_none_rows_untouched() -> None:
    logits = random_logits(64, 517, torch.bfloat16, seed=3)
    original = logits.clone()
    positions, kinds, params = make_rows(3, 64)
    apply_schedule_torch_(logits, positions, kinds, params)
    none_rows = kinds == KIND_NONE
    assert_bits_equal(logits[none_rows], original[none_rows])
    assert_bits_equal(logits, reference_output(original, positions, kinds, params))


# ------------------------------------------------------------------ slot layout (V2)


def make_slot_batch(seed: int, num_slots: int, batch: int):
    """A V2-style batch: per-slot schedules and prompt lengths, rows in shuffled slot
    order, some requests with several rows at consecutive positions (speculative
    decoding), some rows of an unfinished chunked prefill (``t < 0``)."""
    rng = random.Random(seed)
    positions, kinds, params = random_rows(rng, num_slots)
    prompt_len = [rng.randrange(1, 300) for _ in range(num_slots)]
    slots, pos, want_t = [], [], []
    while len(slots) < batch:
        slot = rng.randrange(num_slots)
        t0 = rng.choice([positions[slot], 0, -rng.randrange(1, 50)])  # -: partial prefill
        for j in range(rng.choice([1, 1, 3])):  # one row per draft token
            if len(slots) == batch:
                break
            slots.append(slot)
            pos.append(prompt_len[slot] - 1 + t0 + j)
            want_t.append(max(t0 + j, 0))
    tensor = functools.partial(torch.tensor, device=DEVICE)
    table = (tensor(kinds, dtype=torch.int32), tensor(params, dtype=torch.float64).reshape(-1, NUM_PARAMS))
    return (tensor(slots, dtype=torch.int32), tensor(pos, dtype=torch.int64), tensor(prompt_len, dtype=torch.int32),
            *table, tensor(want_t, dtype=torch.int64))


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(("num_slots", "batch", "vocab"), [(8, 40, 1000), (64, 9, 4099), (3, 1, 517)])
def test_slot_layout_matches_the_schedule(path, num_slots, batch, vocab) -> None:
    """Row i is scaled by its slot's schedule at t = pos + 1 - prompt_len[slot] (>= 0)."""
    slots, pos, prompt_len, kinds, params, want_t = make_slot_batch(num_slots * 7 + batch, num_slots, batch)
    logits = random_logits(batch, vocab, torch.float32, seed=batch)
    original = logits.clone()
    torch.testing.assert_close(T.slot_positions(slots, pos, prompt_len), want_t, rtol=0, atol=0)
    if path == "torch":
        out = apply_schedule_torch_(logits, pos, kinds, params, slots, prompt_len)
    else:
        out = apply_schedule_triton_(logits, pos, kinds, params, slots, prompt_len, block_size=8192)
    assert out is logits
    index = slots.long()
    expected = reference_output(original, want_t, kinds[index], params[index])
    assert_bits_equal(logits, expected)
    assert torch.isfinite(logits[torch.isfinite(original)]).all()
    none_rows = kinds[index] == KIND_NONE
    assert_bits_equal(logits[none_rows], original[none_rows])


def test_slot_dispatch_and_checks() -> None:
    slots, pos, prompt_len, kinds, params, _ = make_slot_batch(5, 4, 6)
    logits = random_logits(6, 300, torch.float32, seed=1)
    expected = apply_schedule_torch_(logits.clone(), pos, kinds, params, slots, prompt_len)
    assert_bits_equal(ead_kernels.apply_schedule_slots_(logits, slots, pos, prompt_len, kinds, params), expected)
    with pytest.raises(ValueError, match="prompt_len must have shape"):
        apply_schedule_torch_(logits, pos, kinds, params, slots, prompt_len[:2])
    with pytest.raises(ValueError, match="pos must have shape"):
        apply_schedule_torch_(logits, pos[:2], kinds, params, slots, prompt_len)
    with pytest.raises(ValueError, match="needs prompt_len"):
        apply_schedule_torch_(logits, pos, kinds, params, slots)


# ------------------------------------------------------------------ dispatch, checks


def test_dispatch_uses_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path must not run on CPU tensors")

    monkeypatch.setattr(T, "apply_schedule_triton_", fail)
    positions, kinds, params = make_rows(5, 8, device=torch.device("cpu"))
    logits = torch.randn(8, 300)
    expected = apply_schedule_torch_(logits.clone(), positions, kinds, params)
    assert_bits_equal(apply_schedule_(logits, positions, kinds, params), expected)


def test_dispatch_picks_triton_for_cuda_tensors() -> None:
    fake_cuda = SimpleNamespace(is_cuda=True)
    assert T._use_triton(fake_cuda) is T.triton_available()  # type: ignore[arg-type]
    assert not T._use_triton(torch.zeros(1, 1))


def _good(batch: int = 2, vocab: int = 10):
    return (
        torch.zeros(batch, vocab),
        torch.zeros(batch, dtype=torch.int64),
        torch.ones(batch, dtype=torch.int32),
        torch.ones(batch, NUM_PARAMS, dtype=torch.float64),
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: (a[0][0], *a[1:]), ValueError, "2-D"),
        (lambda a: (a[0].double(), *a[1:]), TypeError, "float32, bfloat16 or float16"),
        (lambda a: (a[0][:1], *a[1:]), ValueError, "rows"),
        (lambda a: (a[0], a[1][:1], *a[2:]), ValueError, "positions must have shape"),
        (lambda a: (a[0], a[1].double(), *a[2:]), TypeError, "positions must be an integer"),
        (lambda a: (a[0], a[1], a[2].float(), a[3]), TypeError, "kinds must be an integer"),
        (lambda a: (*a[:3], a[3][:, :4]), ValueError, r"params must have shape \[batch, 8\]"),
        (lambda a: (*a[:3], a[3].float()), TypeError, "float64"),
    ],
)
@pytest.mark.parametrize("fn", [apply_schedule_torch_, apply_schedule_triton_, apply_schedule_])
def test_input_validation(change, error, match, fn) -> None:
    with pytest.raises(error, match=match):
        fn(*change(_good()))


def test_import_does_not_need_triton() -> None:
    code = "import sys, ead_kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert set(ead_kernels.__all__) >= {"apply_schedule_", "schedule_temperatures", "KIND_NONE", "NUM_PARAMS"}


@needs_triton
def test_the_gpu_check_correctness_pass_runs_here_under_the_interpreter() -> None:
    """scripts/gpu-check.sh's first step, on small shapes (with and without the entropy
    inputs): it must be runnable and green before it is spent on a GPU, and it must catch
    a wrong kernel."""
    from ead_kernels import gpu_check

    cases = gpu_check.check_correctness(DEVICE, quick=True)
    assert len(cases) == 24 and all(c["ok"] for c in cases), [c for c in cases if not c["ok"]]
    assert all(c["none_rows_identical"] for c in cases)
    assert sum(c["bit_identical"] for c in cases) == sum(c["elements"] for c in cases)  # the interpreter is exact
    fused = [c for c in cases if "fused_logits_as_kernel" in c]  # the scale with its statistics
    assert len(fused) == 6 and all(c["fused_logits_as_kernel"] and c["fused_stats_as_row_stats_triton"] for c in fused)


def test_the_gpu_check_target_statistics_pass_runs_here() -> None:
    """The GPU check's in-pass statistics step, on small shapes on this machine's device."""
    from ead_kernels import gpu_check

    cases = gpu_check.check_target_stats(DEVICE, quick=True)
    assert len(cases) == 4 and all(c["ok"] for c in cases), cases


def test_host_and_device_schedule_paths_give_the_same_bits() -> None:
    """CPU tensors take the numpy path, others the torch-op path (the GPU fallback without
    Triton): both must give the same float64 temperatures, bit for bit."""
    positions, kinds, params = make_rows(11, 2000, device=torch.device("cpu"))
    host = torch.from_numpy(T._host_temperatures(positions.numpy(), kinds.numpy(), params.numpy()))
    device = T._device_temperatures(positions, kinds, params)
    assert torch.equal(host.view(torch.int64), device.view(torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5, 19])
def test_in_pass_lse_equals_logsumexp(dtype, batch) -> None:
    """The blockwise ``lse`` column of ``row_stats`` is ``torch.logsumexp`` over the chosen
    rows in fp32, bit for bit, rows of ``-inf`` and terms below fp32's normal range
    included; the processor takes one before the step and one after it."""
    from ead_kernels.target_stats import CPU_BLOCK_ROWS, row_stats_torch

    assert batch < CPU_BLOCK_ROWS or batch > 2 * CPU_BLOCK_ROWS  # one block, and a ragged last one
    gen = torch.Generator().manual_seed(batch)
    logits = (torch.randn(batch, 3001, generator=gen) * 4).to(dtype)
    logits[:, :50] -= 200.0  # a span past the fp32 exp's subnormal range
    logits[0, ::7] = -math.inf
    if batch > 1:
        logits[-1] = -math.inf
    rows = sorted(random.Random(batch).sample(range(batch), max(1, batch - 2)) + [batch - 1])
    want = torch.logsumexp(logits[rows].float(), -1)
    assert torch.equal(row_stats_torch(logits, torch.tensor(rows))[:, 0], want)
    logits.div_(torch.rand(batch, 1, generator=gen).to(dtype) + 0.3)
    assert torch.equal(row_stats_torch(logits, rows)[:, 0], torch.logsumexp(logits[rows].float(), -1))
    assert row_stats_torch(logits, torch.tensor([], dtype=torch.long)).shape == (0, 2)
