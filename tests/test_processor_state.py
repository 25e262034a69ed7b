"""The processor's per-row bookkeeping under every kind of ``BatchUpdate``.

An engine run exercises adds, removes and condensing moves only in the orders its
scheduler happens to produce; this drives vLLM's real ``BatchUpdate`` through random
sequences of adds, removes, one-way moves and swaps (as vLLM's own logits-processor
tests do), checking after every step that each row is scaled by the temperature of the
request that occupies it, at that request's own position.

The same file runs against every vLLM with the V1 runner (``make test-compat``: 0.24,
0.27, 0.31 and 0.33 beside the suite's 0.32).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams

from ead_server.schedule import parse_schedule
from ead_server.vllm_adapter import EADLogitsProcessor, compat

if compat.V1 is None:  # vLLM 0.34 on: MRV2 only (tests/test_processor_v2.py)
    pytest.skip("this vLLM has no V1 model runner", allow_module_level=True)

from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

MAX_ROWS = 16
VOCAB = 7
SCHEDULES = [None, {"type": "ead", "warmup": 1, "decay": 3}, {"type": "reverse", "warmup": 2, "decay": 2},
             {"type": "constant", "tau": 0.5}, {"preset": "released-code", "decay": 0.2}]


def _processor() -> EADLogitsProcessor:
    return EADLogitsProcessor(_config(MAX_ROWS), torch.device("cpu"), is_pin_memory=False)


def _config(rows: int) -> SimpleNamespace:
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=rows),
                           model_config=SimpleNamespace(max_model_len=1024))


@pytest.mark.parametrize("seed", range(20))
def test_rows_follow_their_requests_through_random_batch_updates(seed):
    rng = random.Random(seed)
    proc = _processor()
    rows: dict[int, tuple[dict | None, float, list[int]]] = {}  # row -> (schedule, temperature, outputs)
    for _ in range(60):
        removed, added, moved = [], [], []
        for row in [r for r in rows if rng.random() < 0.2]:
            removed.append(row)
            del rows[row]
        free = [r for r in range(MAX_ROWS) if r not in rows]
        for row in rng.sample(free, k=min(len(free), rng.randint(0, 3))):
            schedule = rng.choice(SCHEDULES)
            temperature = 0.0 if rng.random() < 0.15 else 1.0  # greedy rows ignore a schedule
            outputs = [0] * rng.randint(0, 30)  # a preempted request comes back with its tokens
            params = SamplingParams(temperature=temperature, extra_args={"temperature_schedule": schedule}
                                    if schedule else None)
            added.append((row, params, [1, 2], outputs))
            rows[row] = (schedule, temperature, outputs)
        for _ in range(rng.randint(0, 3)):
            a, b = rng.randrange(MAX_ROWS), rng.randrange(MAX_ROWS)
            if a == b or a not in rows:
                continue
            if b in rows and rng.random() < 0.5:
                moved.append((a, b, MoveDirectionality.SWAP))
                rows[a], rows[b] = rows[b], rows[a]
            elif b not in rows:
                moved.append((a, b, MoveDirectionality.UNIDIRECTIONAL))
                rows[b] = rows.pop(a)
        size = max(rows, default=-1) + 1
        proc.update_state(BatchUpdate(batch_size=size, removed=removed, added=added, moved=moved))
        for _, _, outputs in rows.values():  # the step's sampled tokens arrive in the live lists
            outputs.extend([0] * rng.randint(0, 2))
        logits = torch.randn(size, VOCAB)
        expected = logits.clone()
        for row, (schedule, temperature, outputs) in rows.items():
            if schedule and temperature > 0:
                expected[row] /= torch.tensor(parse_schedule(schedule).temperature(len(outputs)), dtype=torch.float32)
        torch.testing.assert_close(proc.apply(logits), expected, atol=0, rtol=0)


def test_a_second_instance_for_the_same_engine_is_inert():
    config = _config(4)
    first = EADLogitsProcessor(config, torch.device("cpu"), False)
    second = EADLogitsProcessor(config, torch.device("cpu"), False)
    params = SamplingParams(temperature=1.0, extra_args={"temperature_schedule": {"type": "constant", "tau": 0.5}})
    update = BatchUpdate(batch_size=1, removed=[], added=[(0, params, [1], [])], moved=[])
    for proc in (first, second):
        proc.update_state(update)
    logits = torch.ones(1, VOCAB)
    assert torch.equal(second.apply(first.apply(logits)), torch.full((1, VOCAB), 2.0))


def test_in_pass_target_numbers_are_recorded_on_the_device_and_collected_once():
    """A row that asks (``ead_target_id``) records lse(h) and H(h) before and lse(h / tau),
    H(h / tau) and tau after the rescale; a row that also sets top-k does not (the formula
    would be inexact); values nobody collects expire."""
    from ead_server.vllm_adapter import targets

    targets.STORE.collect(["a", "b"])  # nothing left over from other tests
    proc = _processor()
    schedule = {"type": "constant", "tau": 0.5}
    asks = SamplingParams(temperature=1.0, extra_args={"temperature_schedule": schedule, "ead_target_id": "a"})
    truncated = SamplingParams(temperature=1.0, top_k=3,
                               extra_args={"temperature_schedule": schedule, "ead_target_id": "b"})
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[(0, asks, [1], [7, 7]), (1, truncated, [1], [])],
                                  moved=[]))
    logits = torch.randn(2, VOCAB)
    raw = torch.logsumexp(logits, -1)
    out = proc.apply(logits.clone())
    got = targets.STORE.collect(["a", "b"])
    assert set(got["a"]) == {2} and got["b"] == {}  # position t = 2 (two tokens generated)
    lse_raw, entropy, lse_tau, entropy_tau, tau = got["a"][2]
    assert lse_raw == pytest.approx(raw[0].item(), abs=1e-6)
    assert lse_tau == pytest.approx(torch.logsumexp(out[0], -1).item(), abs=1e-6)
    for row, value in ((logits[0], entropy), (out[0], entropy_tau)):
        p = torch.softmax(row.double(), -1)
        assert value == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
    assert tau == 0.5
    assert targets.STORE.collect(["a"]) == {"a": {}}  # collected once
    # The identity the server inverts: log softmax(h)[y] = tau * (b + lse(h / tau)) - lse(h).
    y = 3
    b = torch.log_softmax(out[0], -1)[y].item()
    assert targets.targets_from({0: got["a"][2]}, [b], [0.5])[0] == pytest.approx(
        torch.log_softmax(logits[0], -1)[y].item(), abs=1e-5)
    now = [0.0]
    store = targets.TargetStore(ttl_s=0.2, clock=lambda: now[0])
    store.record(["x"], [0], torch.zeros(1, 2))
    now[0] = 0.3  # "x"'s client went away: nobody collects it
    store.record(["y"], [0], torch.zeros(1, 2))  # recording sweeps what outlived the TTL
    assert store.collect(["x", "y"]) == {"x": {}, "y": {0: (0.0, 0.0)}}


def test_target_store_collects_by_id_and_frees_every_step():
    """Collections in any order give each id its own positions (a re-sampled position: the
    later step), and leave nothing behind; an expired step leaves no entry either."""
    from ead_server.vllm_adapter import targets

    store = targets.TargetStore(ttl_s=600)
    store.record(["a", "b"], [0, 0], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    store.record(["a", "b", "c"], [1, 1, 0], torch.tensor([[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]))
    store.record(["c", "a"], [1, 1], torch.tensor([[11.0, 12.0], [13.0, 14.0]]))  # a preempted, sampled again
    assert len(store) == 7
    assert store.collect(["a"]) == {"a": {0: (1.0, 2.0), 1: (13.0, 14.0)}}
    assert len(store) == 4 and len(store._steps) == 3  # the first step still holds b
    assert store.collect(["c", "b", "zz"]) == {"c": {0: (9.0, 10.0), 1: (11.0, 12.0)}, "b": {0: (3.0, 4.0),
                                                                                        1: (7.0, 8.0)}, "zz": {}}
    assert len(store) == 0 and not store._steps and not store._rows
    now = [0.0]
    old = targets.TargetStore(ttl_s=0.2, clock=lambda: now[0])
    old.record(["x", "y"], [0, 0], torch.zeros(2, 2))
    old.record(["x"], [1], torch.ones(1, 2))
    assert old.collect(["y"]) == {"y": {0: (0.0, 0.0)}}
    now[0] = 0.2  # exactly the TTL: still kept
    old.record(["w"], [0], torch.zeros(1, 2))
    assert set(old._rows) == {"x", "w"}
    now[0] = 0.3
    old.record(["z"], [0], torch.zeros(1, 2))  # x's two steps outlived the TTL
    assert len(old) == 2 and set(old._rows) == {"w", "z"}
