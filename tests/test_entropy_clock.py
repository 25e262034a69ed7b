"""The entropy-driven schedules inside the processor, under both runners' interfaces.

The entropy clock must survive what the runners do to a request: Model Runner V2 frees a
preempted request's slot and adds it again (maybe elsewhere) with no id, V1 removes and
re-adds its row; a ``keep`` reload goes on under new weights after a refill. Each test
drives the real processor through vLLM's own ``LogitsContext`` / ``BatchUpdate`` and
compares with the schedule module's formula over entropies computed here in float64.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams

from ead_server.schedule import parse_schedule
from ead_server.vllm_adapter import EADLogitsProcessor, compat, targets
from ead_server.vllm_adapter.entropy_clock import CLOCKS, EntropyClocks

VOCAB = 50
SLOTS = 8
CLOCKED = {"type": "ead", "warmup": 1, "decay": 4, "clock": "entropy", "h_ref": 2.0, "tau_min": 0.3}
ENTROPIC = {"type": "entropy", "h_max": 3.0, "exponent": 0.5}


def _entropy(row: torch.Tensor) -> float:
    p = torch.softmax(row.double(), -1)
    return float(-(p * torch.log(p)).nan_to_num().sum())


def _params(schedule: dict, key: str | None) -> SamplingParams:
    extra = {"temperature_schedule": schedule, **({"ead_target_id": key} if key else {})}
    return SamplingParams(temperature=1.0, extra_args=extra)


def _config() -> SimpleNamespace:
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=SLOTS), speculative_config=None,
                           model_config=SimpleNamespace(max_model_len=256))


def _steps(seed: int, count: int, scale: float = 3.0) -> list[torch.Tensor]:
    """Logits of ``count`` steps with entropies far apart (some near 0: forced tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, VOCAB, generator=g) * (scale * (1 + 4 * (i % 3 == 0))) for i in range(count)]


def _divisor(before: torch.Tensor, after: torch.Tensor) -> float:
    """The temperature the row was divided by (float32), read off the output."""
    mask = before.abs() > 1e-3
    return float((before[mask] / after[mask]).double().median())


def _want(schedule: dict, t: int, history: list[torch.Tensor], row: torch.Tensor) -> float:
    resolved = parse_schedule(schedule)
    return resolved.temperature(t, entropy=_entropy(row), clock=sum(_entropy(h) for h in history[:t]))


# ------------------------------------------------------------------------- Model Runner V2

needs_v2 = pytest.mark.skipif(compat.V2 is None, reason="this vLLM has no Model Runner V2 interface")


class _Buffer:
    def __init__(self) -> None:
        self.gpu = torch.zeros(SLOTS, dtype=torch.int32)
        self.np = self.gpu.numpy()


def _v2() -> tuple[EADLogitsProcessor, SimpleNamespace]:
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState

    states = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=SLOTS, vocab_size=VOCAB,
                                    all_token_ids=None, prompt_len=_Buffer(), prefill_len=_Buffer(), total_len=None)
    return EADLogitsProcessor(_config(), states), states


def _row(slot: int, pos: int):
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

    slots = np.array([slot], dtype=np.int32)
    return LogitsContext(expanded_idx_mapping=torch.from_numpy(slots), idx_mapping=torch.from_numpy(slots),
                         idx_mapping_np=slots, expanded_local_pos=torch.zeros(1, dtype=torch.int32),
                         input_ids=torch.zeros(1, dtype=torch.int32), pos=torch.tensor([pos]),
                         seq_lens_upper_bound_np=np.array([pos + 1], dtype=np.int32))


def _v2_add(proc, states, slot: int, params: SamplingParams, prompt: int, generated: int) -> None:
    states.prompt_len.np[slot], states.prefill_len.np[slot] = prompt, prompt + generated
    proc.add_request(slot, params)
    proc.apply_staged_writes()


def _v2_sample(proc, slot: int, prompt: int, t: int, logits: torch.Tensor) -> float:
    return _divisor(logits, proc.apply(logits.clone(), _row(slot, prompt + t - 1)))


@needs_v2
@pytest.mark.parametrize("reload", [False, True], ids=["preempted", "keep-reload"])
def test_v2_a_preempted_request_continues_its_clock_in_another_slot(reload, kernel_path):
    """Sampled t = 0..5 in slot 1, preempted, re-added in slot 6 (prefilled again, in a
    chunk that samples nothing), then t = 6..11: every temperature is the formula over the
    entropies of the logits that sampled each earlier token -- the old weights' before a
    ``keep`` reload, the new ones' after."""
    proc, states = _v2()
    old, new = _steps(1, 12), [x * 0.5 for x in _steps(2, 12)]
    params = _params(CLOCKED, "clock-v2")
    _v2_add(proc, states, 1, params, prompt=5, generated=0)
    history = []
    for t in range(6):
        assert _v2_sample(proc, 1, 5, t, old[t]) == pytest.approx(_want(CLOCKED, t, history, old[t]), rel=1e-5)
        history.append(old[t])
    _v2_add(proc, states, 3, _params(CLOCKED, "other"), prompt=2, generated=0)  # slot 1 reused meanwhile
    _v2_sample(proc, 3, 2, 0, old[0] * 9)
    _v2_add(proc, states, 6, params, prompt=5, generated=6)
    proc.apply(old[0] * 7, _row(6, 8))  # a refill chunk ending inside the output: samples nothing
    steps = new if reload else old
    for t in range(6, 12):
        got = _v2_sample(proc, 6, 5, t, steps[t])
        assert got == pytest.approx(_want(CLOCKED, t, history, steps[t]), rel=1e-5), t
        history.append(steps[t])
    targets.STORE.collect(["clock-v2", "other"])
    CLOCKS.release(["clock-v2", "other"])


@needs_v2
def test_v2_without_an_id_a_resumed_clock_counts_earlier_tokens_at_h_ref():
    proc, states = _v2()
    steps = _steps(3, 8)
    _v2_add(proc, states, 2, _params(CLOCKED, None), prompt=4, generated=5)
    got = _v2_sample(proc, 2, 4, 5, steps[5])
    want = parse_schedule(CLOCKED).temperature(5, clock=5 * CLOCKED["h_ref"])
    assert got == pytest.approx(want, rel=1e-5)


@needs_v2
def test_v2_the_entropy_type_follows_each_rows_own_entropy(kernel_path):
    proc, states = _v2()
    _v2_add(proc, states, 0, _params(ENTROPIC, None), prompt=3, generated=0)
    for t, logits in enumerate(_steps(4, 6)):
        assert _v2_sample(proc, 0, 3, t, logits) == pytest.approx(_want(ENTROPIC, t, [], logits), rel=1e-5)


@needs_v2
def test_v2_entropy_rows_record_the_temperature_they_were_divided_by(kernel_path):
    """An entropy-driven row that asks records ``tau`` (the host cannot recompute it) and
    both entropies; only a row that samples records."""
    proc, states = _v2()
    _v2_add(proc, states, 4, _params(ENTROPIC, "rec"), prompt=3, generated=0)
    logits = _steps(5, 1)[0]
    out = proc.apply(logits.clone(), _row(4, 2))
    proc.apply(logits * 5, _row(4, 0))  # t clamps to 0, but the sequence is shorter than the prefill: no record
    (values,) = targets.STORE.collect(["rec"])["rec"].items()
    position, (lse, entropy, lse_tau, entropy_tau, tau) = values
    assert position == 0 and tau == pytest.approx(_divisor(logits, out), rel=1e-5)
    assert entropy == pytest.approx(_entropy(logits[0]), abs=1e-5)
    assert entropy_tau == pytest.approx(_entropy(out[0]), abs=1e-5)
    assert tau == pytest.approx(parse_schedule(ENTROPIC).temperature(0, entropy=entropy), rel=1e-5)


# ------------------------------------------------------------------------------- V1 runner

needs_v1 = pytest.mark.skipif(compat.V1 is None, reason="this vLLM has no V1 runner")


@needs_v1
@pytest.mark.parametrize("reload", [False, True], ids=["preempted", "keep-reload"])
def test_v1_a_removed_and_re_added_request_continues_its_clock(reload):
    from vllm.v1.sample.logits_processor import BatchUpdate

    proc = EADLogitsProcessor(_config(), torch.device("cpu"), False)
    old, new = _steps(6, 10), [x * 0.3 for x in _steps(7, 10)]
    params = _params(CLOCKED, "clock-v1")
    outputs: list[int] = []
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params, [1], outputs)], moved=[]))
    history = []
    for t in range(5):
        got = _divisor(old[t], proc.apply(old[t].clone()))
        assert got == pytest.approx(_want(CLOCKED, t, history, old[t]), rel=1e-5)
        history.append(old[t]), outputs.append(0)
    proc.update_state(BatchUpdate(batch_size=0, removed=[0], added=[], moved=[]))  # preempted
    resumed = list(outputs)
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[(2, params, [1], resumed)], moved=[]))
    steps = new if reload else old
    for t in range(5, 10):
        logits = torch.cat([torch.zeros(2, VOCAB), steps[t]])
        got = _divisor(steps[t][0], proc.apply(logits.clone())[2])
        assert got == pytest.approx(_want(CLOCKED, t, history, steps[t]), rel=1e-5), t
        history.append(steps[t]), resumed.append(0)
    CLOCKS.release(["clock-v1"])


# --------------------------------------------------------------------------- the table


def test_keyed_sums_expire_and_the_table_grows_without_losing_rows():
    now = [0.0]
    clocks = EntropyClocks(ttl_s=10, clock=lambda: now[0])
    clocks.configure(torch.device("cpu"), 8, rows=1)
    first = clocks.open("a", 0, 1.0)
    index, at = torch.tensor([first]), torch.tensor([0])
    clocks.write(index, at, torch.zeros(1, dtype=torch.float64), torch.tensor([0.75]))
    second = clocks.open("b", 3, 2.0)  # full: doubles, "a" kept
    assert second != first and clocks.table.shape[0] == 2
    assert clocks.read(np.array([first, second]), np.array([1, 3]))[0].tolist() == [0.75, 6.0]
    assert clocks.open("a", 1, 1.0) == first  # re-added after a preemption: its own row
    now[0] = 11.0
    clocks.open(None, 0, 1.0)  # opening sweeps ids unused for the TTL
    assert clocks.keys == {}
