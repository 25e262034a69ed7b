"""The logits processor inside a real vLLM engine on a tiny model.

The engine gets the processor both from the installed entry point and explicitly, so
every exactness check here also proves that it is applied once.
"""

from __future__ import annotations

import gc
import json
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from scipy import stats

from ead_server.schedule import parse_schedule
from oracle import behaviour_logprobs, completion_logits

pytestmark = pytest.mark.engine

SCHEDULES = {
    "ead-k1": {"type": "ead", "warmup": 3, "decay": 6},
    "ead-k20": {"preset": "released-code", "warmup": 2, "decay": 0.5, "tau_min": 0.3},
    "reverse": {"type": "reverse", "warmup": 2, "tau_min": 0.2, "tau_max": 1.6, "decay": 8},
    "constant": {"type": "constant", "tau": 0.7},
}
PROMPT = "Hello there, "


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from vllm import LLM

    from ead_server.vllm_adapter import EADLogitsProcessor
    from ead_server.vllm_adapter.engine import LOGPROBS_MODE

    engine = LLM(
        model=str(tiny_model_dir), enforce_eager=True, dtype="float32", seed=0, max_model_len=256,
        logprobs_mode=LOGPROBS_MODE, logits_processors=[EADLogitsProcessor], max_num_seqs=64,
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()


def _params(schedule: dict | None, **kw):
    from vllm import SamplingParams

    extra = None if schedule is None else {"temperature_schedule": schedule}
    return SamplingParams(**{"temperature": 1.0, "max_tokens": 24, "logprobs": 0, **kw}, extra_args=extra)


def test_entry_point_is_installed():
    names = {ep.value for ep in entry_points(group="vllm.logits_processors")}
    assert "ead_server.vllm_adapter:EADLogitsProcessor" in names


def test_returned_logprobs_are_behaviour_logprobs(llm, tiny_model_dir):
    """(a) A mixed batch: every sampled token's log-prob equals log_softmax(h / tau_t)[y_t]."""
    # Short rows first and long scheduled rows last: as the short ones finish, vLLM moves
    # the last rows into their slots (condense), which the processor must follow.
    requests = [
        ("unscheduled", None, _params(None, seed=13, max_tokens=3)),
        ("greedy", None, _params(None, temperature=0.0, max_tokens=5)),
    ]
    requests += [(name, s, _params(s, seed=i, max_tokens=7 + 4 * i)) for i, (name, s) in enumerate(SCHEDULES.items())]
    requests += [
        ("json-string", SCHEDULES["ead-k1"], _params(json.dumps(SCHEDULES["ead-k1"]), seed=10, max_tokens=20)),
        ("top-k", SCHEDULES["ead-k1"], _params(SCHEDULES["ead-k1"], top_k=5, seed=12, max_tokens=22)),
        # min-p thresholds softmax(h / tau_t), on this V1 runner as on Model Runner V2.
        ("min-p", SCHEDULES["reverse"], _params(SCHEDULES["reverse"], min_p=0.05, seed=14, max_tokens=22)),
        ("n=4", SCHEDULES["reverse"], _params(SCHEDULES["reverse"], n=4, seed=11, max_tokens=24)),
    ]
    outputs = llm.generate([PROMPT] * len(requests), [p for _, _, p in requests], use_tqdm=False)
    checked = 0
    for (name, schedule, params), out in zip(requests, outputs, strict=True):
        assert len(out.outputs) == params.n
        for completion in out.outputs:
            ids = completion.token_ids
            temps = parse_schedule(schedule).temperatures(len(ids)) if schedule else [1.0] * len(ids)
            got = torch.tensor([lp[y].logprob for lp, y in zip(completion.logprobs, ids)])
            want = behaviour_logprobs(tiny_model_dir, out.prompt_token_ids, ids, temps, top_k=params.top_k,
                                      min_p=params.min_p)
            torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5, msg=f"{name}: {got} vs {want}")
            checked += len(ids)
    assert checked > 150


def test_greedy_with_a_schedule_is_refused_at_admission(llm):
    """(c) vLLM runs the processor's validate_params for LLM(...) too, so the request
    policy refuses greedy + schedule here as over HTTP; the processor itself leaves
    greedy rows untouched (tests/test_processor_state.py, tests/test_processor_v2.py)."""
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="parameter=temperature"):
        llm.generate([PROMPT], [_params(SCHEDULES["ead-k1"], temperature=0.0)], use_tqdm=False)
    (plain,) = llm.generate([PROMPT], [_params(None, temperature=0.0)], use_tqdm=False)
    assert len(plain.outputs[0].token_ids) == 24


def _pooled_chi_square(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square p-value with rare cells pooled so every expected count is >= 5."""
    n = counts.sum()
    order = np.argsort(-probs)
    keep = order[probs[order] * n >= min_expected]
    rest = np.setdiff1d(order, keep)
    obs = np.append(counts[keep], counts[rest].sum())
    exp = np.append(probs[keep], probs[rest].sum()) * n
    return float(stats.chisquare(obs, exp).pvalue)


def test_first_token_distribution_is_the_scheduled_one(llm, tiny_model_dir):
    """(b) First tokens under tau_0 = 2.5 follow softmax(h / 2.5), not softmax(h)."""
    schedule = {"type": "ead", "warmup": 0, "tau_max": 2.5, "tau_min": 0.5, "decay": 4}
    tau0 = parse_schedule(schedule).temperature(0)
    assert tau0 == 2.5
    draws = 3000
    outs = llm.generate(
        [PROMPT] * draws, [_params(schedule, max_tokens=1, logprobs=None, seed=s) for s in range(draws)],
        use_tqdm=False,
    )
    first = np.array([o.outputs[0].token_ids[0] for o in outs])
    h = completion_logits(tiny_model_dir, outs[0].prompt_token_ids, [int(first[0])])[0].double()
    counts = np.bincount(first, minlength=h.numel())
    assert _pooled_chi_square(counts, torch.softmax(h / tau0, -1).numpy()) > 1e-3
    assert _pooled_chi_square(counts, torch.softmax(h, -1).numpy()) < 1e-8


def test_later_tokens_follow_their_own_prefix_distribution(llm, tiny_model_dir):
    """(b) Tokens at t >= c: randomised PIT values under each prefix's own distribution
    are i.i.d. uniform only for the scheduled temperatures."""
    schedule = SCHEDULES["ead-k1"]
    resolved = parse_schedule(schedule)
    outs = llm.generate(
        [PROMPT] * 300, [_params(schedule, max_tokens=16, logprobs=None, seed=1000 + s) for s in range(300)],
        use_tqdm=False,
    )
    rng = np.random.default_rng(0)
    pit_true, pit_flat = [], []
    for out in outs:
        ids = list(out.outputs[0].token_ids)
        h = completion_logits(tiny_model_dir, out.prompt_token_ids, ids).double()
        for t in range(resolved.warmup, len(ids)):
            for taus, sink in ((resolved.temperature(t), pit_true), (1.0, pit_flat)):
                p = torch.softmax(h[t] / taus, -1).numpy()
                cdf_below = p[: ids[t]].sum()
                sink.append(cdf_below + rng.uniform() * p[ids[t]])
    assert len(pit_true) > 2000
    assert stats.kstest(pit_true, "uniform").pvalue > 1e-3
    assert stats.kstest(pit_flat, "uniform").pvalue < 1e-8
