"""``/v1/rollouts`` through the RL client, and TRL's own client, against the shared server."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from ead_client import BadRequestError, EADClient, ScheduleError, tis_weights
from ead_server.schedule import parse_schedule
from oracle import behaviour_logprobs, completion_logits

pytestmark = pytest.mark.engine

SCHEDULE = {"type": "ead", "warmup": 2, "decay": 5, "tau_min": 0.4}
STEPPED = {"type": "ead", "warmup": 2, "tau_min": 0.4}  # decay from the step-aware schedule


def _check_exact(model_dir, rollout, schedule, top_k=None) -> None:
    temps = parse_schedule(schedule).temperatures(len(rollout.token_ids))
    assert rollout.temperatures == temps
    want_b = behaviour_logprobs(model_dir, rollout.prompt_token_ids, rollout.token_ids, temps, top_k=top_k)
    torch.testing.assert_close(torch.tensor(rollout.behavior_logprobs), want_b, atol=2e-4, rtol=1e-5)
    h = completion_logits(model_dir, rollout.prompt_token_ids, rollout.token_ids)
    want_t = h.log_softmax(-1).gather(1, torch.tensor(rollout.token_ids).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor(rollout.target_logprobs), want_t, atol=2e-4, rtol=1e-5)


def test_behaviour_and_target_logprobs_match_transformers(server, tiny_model_dir):
    with EADClient(server.url, max_retries=0) as client:
        text = client.rollouts(["Hello there", "abc"], n=3, max_tokens=14, schedule=SCHEDULE, seed=5,
                               return_target_logprobs=True)
        ids = client.rollouts([[47, 18, 25, 25, 28]], n=2, max_tokens=10, schedule=SCHEDULE, top_k=6,
                              return_target_logprobs=True)
        chat = client.rollouts(messages=[[{"role": "user", "content": "hi"}]], n=2, max_tokens=10,
                               schedule=STEPPED, step=3, return_target_logprobs=True)
    assert [(r.prompt_index, r.sample_index) for r in text.rollouts] == [(p, s) for p in range(2) for s in range(3)]
    assert text.weight_version == 0 and text.schedule == parse_schedule(SCHEDULE)
    for r in text.rollouts:  # no truncation: target log-probs from the sampling pass itself
        assert r.target_logprobs_source == "sampling"
        _check_exact(tiny_model_dir, r, SCHEDULE)
    assert ids.rollouts[0].prompt_token_ids == [47, 18, 25, 25, 28]
    for r in ids.rollouts:  # top-k changes the logits after the processor: the scoring pass
        assert r.target_logprobs_source == "scoring"
        _check_exact(tiny_model_dir, r, SCHEDULE, top_k=6)
    resolved = {**STEPPED, "decay_schedule": {"step": 3}}
    assert chat.schedule == parse_schedule(resolved) and chat.schedule.decay == 25 + 5 * 3
    for r in chat.rollouts:
        assert r.prompt_token_ids[-1] == 2  # the chat template's generation prompt, <|assistant|>
        assert r.target_logprobs_source == "sampling"
        _check_exact(tiny_model_dir, r, resolved)
    # The trainer-side view: padded arrays and TIS weights against the engine's targets.
    arrays = text.to_numpy()
    assert arrays["behavior_logprobs"].shape == arrays["mask"].shape
    weights = tis_weights(arrays["behavior_logprobs"], arrays["target_logprobs"], arrays["mask"], cap=2.0)
    assert np.all(weights.weights[~arrays["mask"]] == 0) and 0 < weights.ess <= 1


def test_rollout_seed_reproducible_and_seed_i_equals_prompt_i(server):
    with EADClient(server.url, max_retries=0) as client:
        a = client.rollouts(["x", "y"], n=2, max_tokens=8, schedule=SCHEDULE, seed=40)
        b = client.rollouts(["y"], n=2, max_tokens=8, schedule=SCHEDULE, seed=41)
    assert [r.token_ids for r in a.rollouts[2:]] == [r.token_ids for r in b.rollouts]


def test_rollout_errors(server, tiny_model_dir):
    with EADClient(server.url, max_retries=0) as client:
        with pytest.raises(ScheduleError) as local:  # checked before anything is sent
            client.rollouts(["x"], schedule={"type": "ead", "tau_min": 3.0})
        with pytest.raises(BadRequestError) as remote:
            client.rollouts(["x"], top_p=0.0)
    assert local.value.param == "tau_min"
    assert "top_p" in str(remote.value)
    raw = httpx.post(f"{server.base_url}/rollouts", json={"prompts": ["x"], "temperature_schedule": {"tau_min": 3}})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "temperature_schedule.tau_min"
    both = httpx.post(f"{server.base_url}/rollouts", json={"prompts": ["x"], "messages": [[]]})
    assert both.status_code == 400
    disabled = httpx.post(f"{server.base_url}/weights/reload", json={"path": "anything"})
    assert disabled.status_code == 403 and "--weights-root" in disabled.json()["error"]["message"]
    assert httpx.get(f"{server.base_url}/weights").json() == {"weight_version": 0, "label": None,
                                                             "path": str(tiny_model_dir)}


def test_trl_vllm_client_generate_returns_behaviour_logprobs(server, tiny_model_dir):
    from trl.generation.vllm_client import VLLMClient

    trl_client = VLLMClient(base_url=server.url, connection_timeout=30)
    out = trl_client.generate(["Hello there", "abc"], n=2, max_tokens=12, logprobs=0,
                              generation_kwargs={"temperature_schedule": SCHEDULE, "seed": 3})
    temps = parse_schedule(SCHEDULE).temperatures
    assert len(out["completion_ids"]) == 4
    for i, completion in enumerate(out["completion_ids"]):
        prompt = out["prompt_ids"][i // 2]
        got = torch.tensor([step[0] for step in out["logprobs"][i]])
        assert [step[0] for step in out["logprob_token_ids"][i]] == completion
        want = behaviour_logprobs(tiny_model_dir, prompt, completion, temps(len(completion)))
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5)
