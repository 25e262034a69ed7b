"""Entropy-driven schedules and per-token entropies through the server, against transformers.

Every number the server reports here comes from the sampling pass: the entropies of
``softmax(h_t)`` and of the distribution sampled from, and the temperatures of the
entropy-driven schedules, which the host cannot recompute. An independent transformers
forward pass checks them all, and the behaviour and target log-probs under them.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from ead_client import EADClient
from ead_server.schedule import parse_schedule
from oracle import behaviour_logprobs, completion_logits

pytestmark = pytest.mark.engine

ENTROPIC = {"type": "entropy", "h_max": 2.0, "tau_min": 0.3}
CLOCKED = {"type": "ead", "warmup": 2, "decay": 4, "clock": "entropy", "h_ref": 1.5, "tau_min": 0.3}
PLAIN = {"type": "ead", "warmup": 2, "decay": 5, "tau_min": 0.4}


def _entropies(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), -1)
    return -(p * torch.log(p)).nan_to_num().sum(-1)


def check_sampling_pass(model_dir, prompt_ids, token_ids, schedule, temperatures, entropies, behavior_entropies,
                        behavior_logprobs, target_logprobs=None) -> None:
    """One completion's reported numbers against a transformers pass over the same weights
    (the entropies where reported: ``None`` skips them)."""
    h = completion_logits(model_dir, prompt_ids, token_ids)
    want_h = _entropies(h)
    temps = torch.tensor(temperatures, dtype=torch.float64)
    if entropies is not None:
        torch.testing.assert_close(torch.tensor(entropies, dtype=torch.float64), want_h, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(behavior_entropies, dtype=torch.float64),
                                   _entropies(h / temps.float().unsqueeze(1)), atol=1e-4, rtol=1e-4)
    resolved = parse_schedule(schedule)
    clocks = torch.cat([torch.zeros(1, dtype=torch.float64), want_h.cumsum(0)[:-1]])
    want_t = [resolved.temperature(t, entropy=float(want_h[t]), clock=float(clocks[t])) for t in range(len(token_ids))]
    torch.testing.assert_close(temps, torch.tensor(want_t, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    want_b = behaviour_logprobs(model_dir, prompt_ids, token_ids, temperatures)
    torch.testing.assert_close(torch.tensor(behavior_logprobs), want_b, atol=2e-4, rtol=1e-5)
    if target_logprobs is not None:
        want = h.log_softmax(-1).gather(1, torch.tensor(token_ids).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(target_logprobs), want, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("schedule", [ENTROPIC, CLOCKED, PLAIN], ids=["entropy", "entropy-clock", "ead"])
def test_rollouts_report_the_sampling_pass_numbers_exactly(server, tiny_model_dir, schedule):
    with EADClient(server.url, max_retries=0) as client:
        batch = client.rollouts(["Hello there", "abc"], n=2, max_tokens=16, schedule=schedule, seed=3,
                                return_target_logprobs=True, return_entropy=True)
    assert batch.schedule == parse_schedule(schedule)
    for r in batch.rollouts:
        assert r.target_logprobs_source == "sampling"
        check_sampling_pass(tiny_model_dir, r.prompt_token_ids, r.token_ids, schedule, r.temperatures, r.entropies,
                            r.behavior_entropies, r.behavior_logprobs, r.target_logprobs)
    if schedule is not PLAIN:  # the temperatures follow the rollout, not the position
        assert len({tuple(r.temperatures[:4]) for r in batch.rollouts}) > 1


def test_completions_and_chat_carry_entropies_beside_the_logprobs(server, tiny_model_dir):
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 12, "seed": 4, "logprobs": 0,
            "return_token_ids": True, "return_entropy": True, "return_target_logprobs": True,
            "temperature_schedule": CLOCKED}
    response = httpx.post(f"{server.base_url}/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    lp = choice["logprobs"]
    check_sampling_pass(tiny_model_dir, choice["prompt_token_ids"], choice["token_ids"], CLOCKED, lp["temperatures"],
                        lp["entropies"], lp["behavior_entropies"], lp["token_logprobs"], lp["target_logprobs"])
    chat = httpx.post(f"{server.base_url}/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "seed": 4, "logprobs": True,
        "return_entropy": True, "temperature_schedule": ENTROPIC})
    assert chat.status_code == 200, chat.text
    items = chat.json()["choices"][0]["logprobs"]["content"]
    assert items and all({"temperature", "entropy", "behavior_entropy"} <= set(item) for item in items)
    resolved = parse_schedule(ENTROPIC)
    for item in items:
        assert item["temperature"] == pytest.approx(resolved.temperature(0, entropy=item["entropy"]), rel=1e-5)


@pytest.mark.parametrize(("path", "change", "param"), [
    ("completions", {"stream": True}, "stream"),
    ("completions", {"top_p": 0.9}, "top_p"),
    ("completions", {"logit_bias": {"5": 2.0}}, "logit_bias"),
    ("completions", {"temperature_schedule": None, "return_entropy": True}, "return_entropy"),
    ("completions", {"temperature_schedule": PLAIN, "return_entropy": True, "logprobs": None}, "return_entropy"),
    ("rollouts", {"top_k": 5}, "top_k"),
    ("rollouts", {"temperature_schedule": None, "return_entropy": True}, "return_entropy"),
])
def test_where_the_engine_cannot_report_them_the_request_is_refused(server, path, change, param):
    body = {"model": "tiny", "max_tokens": 4, "logprobs": 0, "temperature_schedule": ENTROPIC}
    body = {**({"prompt": "x"} if path == "completions" else {"prompts": ["x"]}), **body, **change}
    if path == "rollouts":
        body.pop("logprobs"), body.pop("model")
    body = {k: v for k, v in body.items() if v is not None}
    response = httpx.post(f"{server.base_url}/{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_token_route_and_sglangs_generate_report_the_engines_temperatures(server, tiny_model_dir):
    """vLLM's token route (SkyRL, prime-rl) and SGLang's ``/generate`` (slime, AReaL) bring
    an entropy-driven schedule's temperatures back from the engine, beside the behaviour
    log-probs; what they cannot (a stream, truncation) is refused naming their own field."""
    prompt = [47, 18, 25, 25, 28]
    params = {"max_tokens": 12, "logprobs": 0, "seed": 5, "n": 2, "extra_args": {"temperature_schedule": CLOCKED}}
    reply = httpx.post(f"{server.url}/inference/v1/generate", json={"token_ids": prompt, "sampling_params": params},
                       timeout=120)
    assert reply.status_code == 200, reply.text
    for choice in reply.json()["choices"]:
        items = choice["logprobs"]["content"]
        check_sampling_pass(tiny_model_dir, prompt, choice["token_ids"], CLOCKED, [i["temperature"] for i in items],
                            None, None, [i["logprob"] for i in items])
    sglang = httpx.post(f"{server.url}/generate", timeout=120, json={
        "input_ids": prompt, "return_logprob": True,
        "sampling_params": {"max_new_tokens": 12, "sampling_seed": 6, "custom_params": {"temperature_schedule": ENTROPIC}}})
    assert sglang.status_code == 200, sglang.text
    meta = sglang.json()["meta_info"]
    ids = [item[1] for item in meta["output_token_logprobs"]]
    check_sampling_pass(tiny_model_dir, prompt, ids, ENTROPIC, meta["temperatures"], None, None,
                        [item[0] for item in meta["output_token_logprobs"]])
    for body, param in (({"stream": True}, "stream"), ({"sampling_params": {**params, "top_p": 0.9}},
                                                       "sampling_params.top_p")):
        refused = httpx.post(f"{server.url}/inference/v1/generate", timeout=60,
                             json={"token_ids": prompt, "sampling_params": params, **body})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
    refused = httpx.post(f"{server.url}/generate", timeout=60, json={"input_ids": prompt, "sampling_params": {
        "min_new_tokens": 2, "custom_params": {"temperature_schedule": ENTROPIC}}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "sampling_params.min_new_tokens"
