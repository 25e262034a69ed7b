"""The processor under both of vLLM's loaders, and under Model Runner V2's interface.

MRV2 is vLLM 0.32's default on every GPU and cannot run here (it needs Triton with a
GPU backend), but its loader, its params validator and its processor interface are
plain Python: they are driven here with vLLM's own ``LogitsContext`` and
``LogitsProcRequestState`` built from real CPU tensors. The per-slot buffers vLLM's
model runner keeps (``UvaBackedTensor``) need pinned memory, so ``prompt_len`` is a
stand-in with the same ``.np`` / ``.gpu`` views. Each row is checked against the
schedule module, through the PyTorch path and through the Triton kernel under
``TRITON_INTERPRET=1``.

The same file runs against every vLLM with MRV2's interface (``make test-compat``: 0.31,
0.33 and 0.34 beside the suite's 0.32); the V1 loader's checks are skipped where that
vLLM has no V1 runner (0.34).
"""

from __future__ import annotations

import os
import random
from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from ead_server.vllm_adapter import compat  # noqa: E402

if compat.V2 is None:
    pytest.skip("this vLLM has no Model Runner V2 logits-processor interface", allow_module_level=True)

from vllm.v1.worker.gpu.sample.logits_processor import loader as v2_loader  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.interface import (  # noqa: E402
    LogitsContext,
    LogitsProcRequestState,
)

import ead_kernels  # noqa: E402
from ead_kernels import temperature as T  # noqa: E402
from ead_server.schedule import parse_schedule  # noqa: E402
from ead_server.vllm_adapter import EADLogitsProcessor  # noqa: E402

MAX_SLOTS = 8
VOCAB = 300
SCHEDULES = [{"type": "ead", "warmup": 1, "decay": 3}, {"type": "reverse", "warmup": 2, "decay": 2},
             {"type": "constant", "tau": 0.5}, {"preset": "released-code", "decay": 0.2, "tau_min": 0.3}]
OUR_ENTRY = "ead_server.vllm_adapter:EADLogitsProcessor"
v1_loader = None
if compat.V1 is not None:
    from vllm.v1.sample import logits_processor as v1_loader
needs_v1 = pytest.mark.skipif(v1_loader is None, reason="this vLLM has no V1 model runner")


class _Buffer:
    """A stand-in for vLLM's ``UvaBackedTensor``: host array ``np``, device view ``gpu``."""

    def __init__(self, size: int) -> None:
        self.gpu = torch.zeros(size, dtype=torch.int32)
        self.np = self.gpu.numpy()


def _req_states() -> LogitsProcRequestState:
    return LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=MAX_SLOTS, vocab_size=VOCAB,
                                  all_token_ids=None, prompt_len=_Buffer(MAX_SLOTS), prefill_len=_Buffer(MAX_SLOTS),
                                  total_len=None)


def _config() -> SimpleNamespace:
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=MAX_SLOTS), speculative_config=None,
                           model_config=SimpleNamespace(max_model_len=1024))


def _params(schedule: dict | None, temperature: float = 1.0) -> SamplingParams:
    return SamplingParams(temperature=temperature, extra_args={"temperature_schedule": schedule} if schedule else None)


def _context(rows: list[tuple[int, int]]) -> LogitsContext:
    """rows: (slot, pos) per logits row, in batch order (one row per request: the host's
    sequence lengths are then exact, ``pos + 1``)."""
    slots = torch.tensor([s for s, _ in rows], dtype=torch.int32)
    batch_slots = np.array(sorted({s for s, _ in rows}, key=[s for s, _ in rows].index), dtype=np.int32)
    return LogitsContext(
        expanded_idx_mapping=slots, idx_mapping=torch.from_numpy(batch_slots), idx_mapping_np=batch_slots,
        expanded_local_pos=torch.zeros(len(rows), dtype=torch.int32), input_ids=torch.zeros(len(rows), dtype=torch.int32),
        pos=torch.tensor([p for _, p in rows], dtype=torch.int64),
        seq_lens_upper_bound_np=np.array([p + 1 for _, p in rows] if len(rows) == len(batch_slots) else
                                         [0] * len(batch_slots), dtype=np.int32),
    )


# ----------------------------------------------------------------------- loaders


def test_the_entry_point_is_ours_and_both_loaders_return_our_class():
    assert OUR_ENTRY in {ep.value for ep in entry_points(group="vllm.logits_processors")}
    assert EADLogitsProcessor in v2_loader._load_v2_logitsprocs_plugins()
    if v1_loader is not None:
        assert EADLogitsProcessor in v1_loader._load_custom_logitsprocs(None)


def test_every_plugin_we_ship_is_accepted_by_both_loaders():
    """Stock ``vllm serve`` loads every plugin of the group on either runner: one that
    a loader refuses stops the server from starting, ours or not."""
    ours = [ep for ep in entry_points(group="vllm.logits_processors") if ep.value.startswith("ead_server.")]
    assert ours
    v2_loader._load_v2_logitsprocs_by_fqcns([ep.value for ep in ours])
    if v1_loader is not None:
        v1_loader._load_custom_logitsprocs([ep.value for ep in ours])
    # The one-liner of the GPU-readiness issue: vLLM's V2 validator builds without error.
    v2_loader.build_custom_logits_processors_params_validator(())


@needs_v1
def test_both_loaders_build_it_with_their_own_constructor():
    v2 = v2_loader.build_custom_logits_processors(
        _config(), SimpleNamespace(**{f: getattr(_req_states(), f) for f in LogitsProcRequestState.__dataclass_fields__}),
        is_pooling_model=False, custom_logitsprocs=(EADLogitsProcessor,))
    ours = [p for p in v2 if isinstance(p, EADLogitsProcessor)]
    assert len(ours) == 2 and ours[0]._slots is not None  # entry point + explicit: one live, one inert
    assert [p._duplicate for p in ours] == [False, True]
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():  # a GPU wheel on this machine: V1's builtins need the GPU
        return
    v1 = v1_loader.build_logitsprocs(_config(), torch.device("cpu"), False, False, (EADLogitsProcessor,))
    ours = [p for p in v1.all if isinstance(p, EADLogitsProcessor)]
    assert len(ours) == 2 and ours[0]._rows is not None and [p._duplicate for p in ours] == [False, True]
    # Not argmax-invariant, so V1 runs it before min-p (as V2 does): see the processor's docstring.
    assert all(p in v1.non_argmax_invariant for p in ours)


@pytest.mark.parametrize("validator", ["v2", pytest.param("v1", marks=needs_v1)])
def test_the_validators_refuse_a_bad_schedule_naming_the_field(validator):
    validate = (v2_loader.build_custom_logits_processors_params_validator(()) if validator == "v2" else
                lambda p: v1_loader.validate_logits_processors_parameters(None, p))
    validate(_params(SCHEDULES[0]))
    validate(_params(None, temperature=0.0))
    with pytest.raises(VLLMValidationError, match=r"tau_min.*parameter=temperature_schedule\.tau_min"):
        validate(_params({"tau_min": 3.0}))
    with pytest.raises(VLLMValidationError, match=r"parameter=temperature_schedule\.warmup"):
        validate(_params({"warmup": -1}))
    with pytest.raises(VLLMValidationError, match=r"greedy.*parameter=temperature"):
        validate(_params(SCHEDULES[0], temperature=0.0))


# --------------------------------------------------------------------- V2 apply


def _v2_processor(prompt_lens: dict[int, int]) -> tuple[EADLogitsProcessor, LogitsProcRequestState]:
    states = _req_states()
    for slot, n in prompt_lens.items():
        states.prompt_len.np[slot] = n
    return EADLogitsProcessor(_config(), states), states


def _expected(logits: torch.Tensor, rows: list[tuple[int, int]], slot_schedule: dict, prompt_len) -> torch.Tensor:
    out = logits.clone()
    for i, (slot, pos) in enumerate(rows):
        schedule = slot_schedule.get(slot)
        if schedule is not None:
            t = max(pos + 1 - int(prompt_len.np[slot]), 0)
            out[i] /= torch.tensor(parse_schedule(schedule).temperature(t), dtype=torch.float64).to(torch.float32)
    return out


def test_rows_reordered_against_slots_and_several_rows_per_request(kernel_path):
    prompt_lens = {0: 5, 3: 12, 5: 1, 6: 40}
    proc, states = _v2_processor(prompt_lens)
    schedules = {0: SCHEDULES[0], 3: SCHEDULES[1], 5: SCHEDULES[3], 6: None}
    for slot, schedule in schedules.items():
        assert proc.add_request(slot, _params(schedule)) is (schedule is not None)
    proc.apply_staged_writes()
    # Slot 3 owns three rows at consecutive positions (speculative decoding); slot 6 is
    # unscheduled; slot 5 sits far past its anneal; rows are not in slot order.
    rows = [(3, 20), (6, 50), (3, 21), (0, 4), (3, 22), (5, 500), (0, 9)]
    logits = torch.randn(len(rows), VOCAB)
    want = _expected(logits, rows, schedules, states.prompt_len)
    torch.testing.assert_close(proc.apply(logits, _context(rows)), want, rtol=0, atol=0)
    assert torch.equal(logits[1], want[1])  # the unscheduled row is bit-identical


def test_a_resumed_request_counts_from_its_prompt_not_its_refill(kernel_path):
    """After preemption a request is prefilled again with its output so far
    (``prefill_len`` > ``prompt_len``); ``t`` still counts from the user's prompt."""
    proc, states = _v2_processor({2: 7})
    states.prefill_len.np[2] = 7 + 15  # refilled with 15 generated tokens
    proc.add_request(2, _params(SCHEDULES[0]))
    proc.apply_staged_writes()
    rows = [(2, 7 + 15 - 1)]  # the first token sampled after the refill: t = 15
    logits = torch.randn(1, VOCAB)
    got = proc.apply(logits.clone(), _context(rows))
    temp = parse_schedule(SCHEDULES[0]).temperature(15)
    assert temp != 1.0
    torch.testing.assert_close(got, _expected(logits, rows, {2: SCHEDULES[0]}, states.prompt_len), rtol=0, atol=0)


def test_a_refill_over_generated_tokens_keeps_their_in_pass_numbers():
    """After a ``keep`` reload (or a preemption) MRV2 prefills a request again, in chunks,
    over the tokens it already generated: a chunk ending inside them is a row with
    ``t >= 0`` that samples nothing. Its numbers come from the new weights, and must not
    replace those recorded when the token was sampled (the behaviour log-prob came from
    the old weights): only the row that samples the next token records."""
    from ead_server.vllm_adapter import targets

    proc, states = _v2_processor({3: 7})
    states.prefill_len.np[3] = 7
    asks = SamplingParams(temperature=1.0, extra_args={"temperature_schedule": SCHEDULES[0], "ead_target_id": "r"})
    proc.add_request(3, asks)
    proc.apply_staged_writes()
    old = torch.randn(1, VOCAB)
    for t in range(15):  # decode: token t sampled with the old weights' logits
        proc.apply(old.clone(), _context([(3, 7 + t - 1)]))
    recorded = targets.STORE.collect(["r"])["r"]
    assert sorted(recorded) == list(range(15))
    # Preempted and prefilled again (prompt + 15 generated) under new weights, in 3 chunks.
    for t in range(15):
        targets.STORE.record(["r"], [t], torch.tensor([recorded[t]], dtype=torch.float64))  # as yet uncollected
    states.prefill_len.np[3] = 7 + 15
    proc.add_request(3, asks)
    proc.apply_staged_writes()
    new = old * 3
    for end in (5, 16, 22):  # chunk ends: inside the prompt, inside the output, the refill's end
        proc.apply(new.clone(), _context([(3, end - 1)]))
    after = targets.STORE.collect(["r"])["r"]
    assert sorted(after) == list(range(16))
    assert all(after[t] == recorded[t] for t in range(15))  # the old weights' numbers, untouched
    lse = torch.logsumexp(new[0].double(), -1).item()
    assert after[15][targets.LSE] == pytest.approx(lse, rel=1e-6)  # t = 15: sampled by the new weights


def test_a_reused_slot_forgets_its_previous_request(kernel_path):
    proc, states = _v2_processor({4: 3})
    proc.add_request(4, _params({"type": "constant", "tau": 0.25}))
    proc.apply_staged_writes()
    rows = [(4, 10)]
    logits = torch.randn(1, VOCAB)
    torch.testing.assert_close(proc.apply(logits.clone(), _context(rows)), logits / 0.25, rtol=0, atol=0)
    # The request finished (V2 has no remove hook); a new, unscheduled one takes the slot.
    states.prompt_len.np[4] = 8
    assert proc.add_request(4, _params(None)) is False
    proc.apply_staged_writes()
    assert torch.equal(proc.apply(logits.clone(), _context(rows)), logits)
    # And a scheduled one with another schedule.
    proc.add_request(4, _params(SCHEDULES[1]))
    proc.apply_staged_writes()
    torch.testing.assert_close(proc.apply(logits.clone(), _context(rows)),
                               _expected(logits, rows, {4: SCHEDULES[1]}, states.prompt_len), rtol=0, atol=0)


def test_greedy_and_unscheduled_rows_are_bit_identical(kernel_path):
    proc, states = _v2_processor({0: 2, 1: 2, 2: 2})
    assert proc.add_request(0, _params(SCHEDULES[0], temperature=0.0)) is False  # greedy ignores it
    assert proc.add_request(1, _params(None)) is False
    assert proc.add_request(2, _params({"type": "constant", "tau": 0.5})) is True
    proc.apply_staged_writes()
    rows = [(0, 30), (1, 30), (2, 30)]
    logits = torch.randn(3, VOCAB)
    got = proc.apply(logits.clone(), _context(rows))
    assert torch.equal(got[:2], logits[:2])
    torch.testing.assert_close(got[2], logits[2] / 0.5, rtol=0, atol=0)
    # A batch of only such rows is skipped on the host, without touching the kernel.
    assert proc.apply(logits, _context(rows[:2])) is logits


def test_partial_prefill_rows_get_a_finite_positive_temperature(kernel_path):
    proc, states = _v2_processor({1: 100})
    proc.add_request(1, _params({"type": "ead", "warmup": 0, "decay": 2, "tau_min": 0.1}))
    proc.apply_staged_writes()
    rows = [(1, 10)]  # chunk 1 of a 100-token prompt: t = -89, not sampled
    logits = torch.randn(1, VOCAB)
    got = proc.apply(logits.clone(), _context(rows))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, logits / torch.tensor(parse_schedule(
        {"type": "ead", "warmup": 0, "decay": 2, "tau_min": 0.1}).temperature(0), dtype=torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_random_v2_steps_against_the_schedule(seed, kernel_path):
    """Slots come and go (recycled, with no remove hook), rows are shuffled and some
    requests own several rows; every row matches the schedule at its own t."""
    rng = random.Random(seed)
    proc, states = _v2_processor({})
    live: dict[int, tuple[dict | None, int]] = {}  # slot -> (schedule, tokens generated)
    for _ in range(15):
        for slot in [s for s in live if rng.random() < 0.25]:
            del live[slot]
        for slot in [s for s in range(MAX_SLOTS) if s not in live and rng.random() < 0.4]:
            schedule = rng.choice([None, *SCHEDULES])
            states.prompt_len.np[slot] = rng.randrange(1, 60)
            proc.add_request(slot, _params(schedule))
            live[slot] = (schedule, rng.randrange(0, 40))
        proc.apply_staged_writes()
        if not live:
            continue
        rows = [(slot, int(states.prompt_len.np[slot]) - 1 + generated + j)
                for slot, (_, generated) in live.items() for j in range(rng.choice([1, 1, 2, 4]))]
        rng.shuffle(rows)
        logits = torch.randn(len(rows), VOCAB)
        want = _expected(logits, rows, {s: sch for s, (sch, _) in live.items()}, states.prompt_len)
        torch.testing.assert_close(proc.apply(logits, _context(rows)), want, rtol=0, atol=0)
        live = {s: (sch, g + 1) for s, (sch, g) in live.items()}


def test_v2_apply_uses_the_slot_kernel_in_one_call(monkeypatch):
    """No per-row Python: one kernel call per step, whatever the batch."""
    calls = []
    real = ead_kernels.temperature.apply_schedule_torch_

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "apply_schedule_torch_", counting)
    proc, _ = _v2_processor({s: 3 for s in range(MAX_SLOTS)})
    for s in range(MAX_SLOTS):
        proc.add_request(s, _params(SCHEDULES[s % len(SCHEDULES)]))
    proc.apply_staged_writes()
    rows = [(s, 10 + s) for s in range(MAX_SLOTS)] * 3
    proc.apply(torch.randn(len(rows), VOCAB), _context(rows))
    assert len(calls) == 1 and calls[0][0].shape[0] == len(rows)
