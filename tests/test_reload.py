"""Weight reload in a running server: exactness, versions, refusals, and requests in flight.

The class starts its own server (it reloads weights); with the shared session server that
makes two engines at most. A tied model's reload is checked on the reload server of
``tests/test_default_schedule.py``, which serves one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open

from ead_server.schedule import parse_schedule
from oracle import behaviour_logprobs, completion_logits
from server_process import running_server
from tiny_model import write_tiny_llama

pytestmark = pytest.mark.engine

KEY = "test-admin-key"
SCHEDULE = {"type": "ead", "warmup": 2, "decay": 5, "tau_min": 0.4}
# Two of the rollouts: an anneal still running when the weights switch (the tiny model's entropies are
# about 5 nats), so a restarted or recomputed clock would show.
CLOCKED = {"type": "ead", "warmup": 2, "decay": 100, "tau_min": 0.4, "clock": "entropy", "h_ref": 5.0}
AUTH = {"Authorization": f"Bearer {KEY}"}


def _serve(tmp_path_factory, root, model):
    return running_server(tmp_path_factory.mktemp("reload-logs"), "--model", str(model), "--weights-root", str(root),
                          "--admin-key", KEY, "--max-model-len", "1024")


def _rollout(url: str, seed: int = 1, **extra) -> dict:
    body = {"prompts": ["Hello there", "abc"], "n": 2, "max_tokens": 12, "seed": seed, "temperature_schedule": SCHEDULE,
            "return_target_logprobs": True, **extra}
    response = httpx.post(f"{url}/v1/rollouts", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def _assert_matches(model_dir, response: dict) -> None:
    """Behaviour and target log-probs equal an independent transformers pass on ``model_dir``."""
    for r in response["rollouts"]:
        want_b = behaviour_logprobs(model_dir, r["prompt_token_ids"], r["token_ids"], r["temperatures"])
        torch.testing.assert_close(torch.tensor(r["behavior_logprobs"]), want_b, atol=2e-4, rtol=1e-5)
        h = completion_logits(model_dir, r["prompt_token_ids"], r["token_ids"])
        want_t = h.log_softmax(-1).gather(1, torch.tensor(r["token_ids"]).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(r["target_logprobs"]), want_t, atol=2e-4, rtol=1e-5)


def _reload(url: str, path: str, headers: dict | None = AUTH) -> httpx.Response:
    return httpx.post(f"{url}/v1/weights/reload", json={"path": path}, headers=headers, timeout=300)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A weights root with good, damaged and foreign checkpoints, and an escape hatch."""
    base = tmp_path_factory.mktemp("weights")
    write_tiny_llama(base / "base", seed=0)
    write_tiny_llama(base / "b", seed=7)
    shutil.copytree(base / "b", base / "corrupt")
    weights = base / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    shutil.copytree(base / "b", base / "wide")
    config = (base / "wide" / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    (base / "wide" / "config.json").write_text(config)
    # A sharded save still being written: the index names a second shard not there yet. Our
    # checks read the safetensors headers and the config; only vLLM's loader reads the index,
    # so this one fails inside the engine (the restore path).
    shutil.copytree(base / "b", base / "incomplete")
    with safe_open(str(base / "b" / "model.safetensors"), "pt") as f:
        names = sorted(f.keys())
    weight_map = {name: "model.safetensors" for name in names} | {names[0]: "model-00002-of-00002.safetensors"}
    (base / "incomplete" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    outside = tmp_path_factory.mktemp("outside")
    write_tiny_llama(outside / "model", seed=9)
    os.symlink(outside / "model", base / "escape")
    return base, outside / "model"


class TestUntied:
    @pytest.fixture(scope="class")
    def server(self, tmp_path_factory, root):
        with _serve(tmp_path_factory, root[0], root[0] / "base") as srv:
            yield srv

    def test_refusals_leave_the_old_weights_serving(self, server, root):
        base, outside = root
        assert _reload(server.url, "b", headers=None).status_code == 401
        assert _reload(server.url, "b", headers={"Authorization": "Bearer wrong"}).status_code == 401
        for path, status, words in [
            ("../" + outside.parent.name + "/model", 403, "outside"),
            (str(outside), 403, "outside"),
            ("escape", 403, "outside"),
            ("missing", 404, "does not exist"),
            ("corrupt", 400, "truncated"),
            ("wide", 400, "architecture"),
        ]:
            response = _reload(server.url, path)
            assert response.status_code == status, (path, response.text)
            error = response.json()["error"]
            assert words in error["message"] and error["param"] == "path", (path, error)
        assert httpx.get(f"{server.url}/v1/weights").json() == {"weight_version": 0, "label": None,
                                                                "path": str(base / "base")}
        _assert_matches(base / "base", _rollout(server.url))

    def test_reload_changes_outputs_exactly_and_bumps_the_version(self, server, root):
        base = root[0]
        before = _rollout(server.url)
        response = _reload(server.url, "b")
        assert response.status_code == 200, response.text
        assert response.json() == {"weight_version": 1, "label": None, "path": str(base / "b")}
        after = _rollout(server.url)
        assert after["weight_version"] == 1
        assert [r["token_ids"] for r in after["rollouts"]] != [r["token_ids"] for r in before["rollouts"]]
        _assert_matches(base / "b", after)
        completion = httpx.post(f"{server.url}/v1/completions",
                                json={"model": str(base / "base"), "prompt": "x", "max_tokens": 2}).json()
        assert completion["weight_version"] == 1

    def test_reload_during_16_concurrent_rollouts(self, server, root):
        base = root[0]

        async def run() -> tuple[list[dict], httpx.Response]:
            async with httpx.AsyncClient(timeout=600) as http:
                async def one(i: int) -> dict:
                    body = {"prompts": [f"p{i} "], "n": 2, "max_tokens": 40, "seed": i, "return_target_logprobs": True,
                            "temperature_schedule": SCHEDULE}
                    response = await http.post(f"{server.url}/v1/rollouts", json=body)
                    assert response.status_code == 200, response.text
                    return response.json()

                tasks = [asyncio.create_task(one(i)) for i in range(16)]
                await _until_running(http, server.url)  # the engine holds rollouts: the reload must wait for them
                reload = await http.post(f"{server.url}/v1/weights/reload", json={"path": "base"}, headers=AUTH)
                return await asyncio.gather(*tasks), reload

        results, reload = asyncio.run(run())
        assert reload.status_code == 200 and reload.json()["weight_version"] == 2
        versions = [r["weight_version"] for r in results]
        assert set(versions) <= {1, 2} and len(results) == 16
        assert 1 in versions, "the reload should have waited for requests in flight"
        for result in results:  # every response comes whole from the weights of its version
            _assert_matches(base / ("b" if result["weight_version"] == 1 else "base"), result)
        assert _rollout(server.url)["weight_version"] == 2


    # ---------------------------------------------------------------- asynchronous RL

    def test_keep_reload_switches_mid_response_exactly(self, server, root):
        """A long seeded stream spans a ``keep`` reload triggered after 8 of its tokens, with
        8 concurrent n=4 rollouts in flight: each switches version at one token, and every
        token's behaviour log-prob is that of the weights its span names, over the whole
        prefix (checked against transformers on both checkpoints)."""
        base = root[0]
        old_version = httpx.get(f"{server.url}/v1/weights").json()["weight_version"]
        old, new = ("base", "b") if _serving(server) == base / "base" else ("b", "base")
        stream, rollouts, reload = asyncio.run(_reload_during_traffic(server, new, "keep", after_tokens=8))
        assert reload.status_code == 200, reload.text
        assert reload.json()["weight_version"] == old_version + 1
        spans = stream["weight_versions"]
        assert [s["version"] for s in spans] == [old_version, old_version + 1], spans
        switch = spans[0]["end"]
        assert 8 <= switch < len(stream["token_ids"]) and spans[1]["start"] == switch
        _assert_spans_exact({old_version: base / old, old_version + 1: base / new}, stream["prompt_token_ids"],
                            stream["token_ids"], stream["logprobs"], spans)
        switched = clocked = 0
        models = {old_version: base / old, old_version + 1: base / new}
        for result in rollouts:
            for r in result["rollouts"]:
                versions = [s["version"] for s in r["weight_versions"]]
                assert versions in ([old_version], [old_version + 1], [old_version, old_version + 1]), versions
                switched += len(versions) == 2
                _assert_spans_exact(models, r["prompt_token_ids"], r["token_ids"], r["behavior_logprobs"],
                                    r["weight_versions"], r["temperatures"])
                assert result["weight_version"] <= versions[0]
                if r["entropies"] is not None:
                    clocked += len(versions) == 2
                    _assert_clock_continues(models, r)
        assert switched > 0, "no rollout was in flight across the switch"
        assert clocked > 0, "no entropy-clock rollout was in flight across the switch"

    def test_abort_reload_ends_requests_with_their_tokens(self, server, root):
        base = root[0]
        version = httpx.get(f"{server.url}/v1/weights").json()["weight_version"]
        new = "b" if _serving(server) == base / "base" else "base"
        stream, rollouts, reload = asyncio.run(_reload_during_traffic(server, new, "abort", after_tokens=6))
        assert reload.status_code == 200 and reload.json()["weight_version"] == version + 1
        assert stream["finish_reason"] == "abort"
        assert 6 <= len(stream["token_ids"]) < 1000
        # A rollout the engine had taken ends now, with old tokens only; one still on its way
        # to the engine at the swap runs whole on the new weights. None mixes the two.
        for r in (r for result in rollouts for r in result["rollouts"]):
            versions = [s["version"] for s in r["weight_versions"] or []]
            allowed = (("abort", [version]), ("abort", []), ("length", [version + 1]))
            assert (r["finish_reason"], versions) in allowed, (r["finish_reason"], versions)
        assert [s["version"] for s in stream["weight_versions"]] == [version]
        after = _rollout(server.url, seed=11)
        assert after["weight_version"] == version + 1
        _assert_matches(base / new, after)

    def test_sglang_and_vllm_weight_routes(self, server, root):
        base = root[0]
        version = httpx.get(f"{server.url}/v1/weights").json()["weight_version"]
        # SGLang's client payload (sglang/srt/managers/io_struct.py UpdateWeightFromDiskReqInput).
        payload = {"model_path": "base", "load_format": None, "abort_all_requests": False, "weight_version": "step-7",
                   "torch_empty_cache": False, "recapture_cuda_graph": False, "token_step": 0}
        assert httpx.post(f"{server.url}/update_weights_from_disk", json=payload).status_code == 401
        reply = httpx.post(f"{server.url}/update_weights_from_disk", json=payload, headers=AUTH, timeout=300)
        assert reply.status_code == 200 and reply.json()["success"] is True, reply.text
        assert httpx.get(f"{server.url}/get_weight_version").json() == {
            "weight_version": "step-7", "version": version + 1, "label": "step-7"}
        info = httpx.get(f"{server.url}/v1/weights").json()
        assert info == {"weight_version": version + 1, "label": "step-7", "path": str(base / "base")}
        escape = httpx.post(f"{server.url}/update_weights_from_disk", json={**payload, "model_path": "escape"},
                            headers=AUTH)
        assert escape.status_code == 403
        # vLLM's RL routes, behind the admin key, as its own clients call them.
        assert httpx.post(f"{server.url}/pause", params={"mode": "keep"}).status_code == 401
        assert httpx.get(f"{server.url}/server_info").status_code == 401  # TRL reads it before a weight sync
        info = httpx.get(f"{server.url}/server_info", params={"config_format": "json"}, headers=AUTH, timeout=120)
        assert info.status_code == 200 and "vllm_config" in info.json(), info.text
        assert httpx.post(f"{server.url}/pause", params={"mode": "keep"}, headers=AUTH).status_code == 200
        assert httpx.get(f"{server.url}/is_paused", headers=AUTH).json() == {"is_paused": True}
        assert httpx.post(f"{server.url}/resume", headers=AUTH).status_code == 200
        assert httpx.get(f"{server.url}/is_paused", headers=AUTH).json() == {"is_paused": False}
        # A label is a name, not a version: the number stays, the label shows.
        relabel = httpx.post(f"{server.url}/update_weight_version", json={"new_version": "step-8"}, headers=AUTH)
        assert relabel.status_code == 200, relabel.text
        assert relabel.json() == {"success": True, "new_version": "step-8", "weight_version": version + 1,
                                  "label": "step-8"}
        assert httpx.get(f"{server.url}/v1/weights").json()["weight_version"] == version + 1
        assert httpx.get(f"{server.url}/weight_info", headers=AUTH).json() == {"weight_version": f"{version + 1}:step-8"}
        spans = _rollout(server.url)["rollouts"][0]["weight_versions"]
        assert spans[0]["version"] == version + 1 and spans[0]["label"] == "step-8"
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 2}).json()
        assert chat["weight_version"] == version + 1
        for c in chat["choices"]:
            (span,) = c["weight_versions"]
            assert span["version"] == version + 1 and span["label"] == "step-8" and span["start"] == 0
            assert 0 < span["end"] <= 5
        # No transfer in progress: refused, and no new version.
        finish = httpx.post(f"{server.url}/finish_weight_update", json={}, headers=AUTH)
        assert finish.status_code == 409 and "error" in finish.json()
        assert httpx.get(f"{server.url}/v1/weights").json()["weight_version"] == version + 1
        assert httpx.post(f"{server.url}/reset_prefix_cache", headers=AUTH).status_code == 200
        # vLLM's weight checker: checksums pass through; "reset" (zeroes the weights) is refused.
        reset = httpx.post(f"{server.url}/weight_checker", json={"action": "reset"}, headers=AUTH)
        assert reset.status_code == 400 and reset.json()["error"]["param"] == "action"
        sums = httpx.post(f"{server.url}/weight_checker", json={"action": "checksum"}, headers=AUTH, timeout=120)
        assert sums.status_code == 200 and sums.json()["checksums"], sums.text
        _assert_matches(base / "base", _rollout(server.url, seed=21))  # still serving the real weights


    def test_reload_failing_inside_the_engine_restores_the_old_weights(self, server, root):
        """In every mode: a 500 naming the failure, the old weights and version serving again
        (exact), and under ``keep`` the frozen requests go on, on the old weights only."""
        base = root[0]
        before = httpx.get(f"{server.url}/v1/weights").json()
        old, version = _serving(server), before["weight_version"]
        for mode in ("wait", "abort"):
            reply = httpx.post(f"{server.url}/v1/weights/reload", json={"path": "incomplete", "mode": mode},
                               headers=AUTH, timeout=300)
            assert reply.status_code == 500, reply.text
            assert "missing" in reply.json()["error"]["message"] and "serving again" in reply.json()["error"]["message"]
            assert httpx.get(f"{server.url}/v1/weights").json() == before
        stream, rollouts, reload = asyncio.run(_reload_during_traffic(server, "incomplete", "keep", after_tokens=8,
                                                                      rollouts=2))
        assert reload.status_code == 500, reload.text
        assert stream["finish_reason"] == "length" and len(stream["token_ids"]) == 1000
        assert [(s["version"], s["start"], s["end"]) for s in stream["weight_versions"]] == [(version, 0, 1000)]
        _assert_spans_exact({version: old}, stream["prompt_token_ids"], stream["token_ids"], stream["logprobs"],
                            stream["weight_versions"])
        for r in (r for result in rollouts for r in result["rollouts"]):
            assert r["finish_reason"] == "length" and [s["version"] for s in r["weight_versions"]] == [version]
        r = rollouts[0]["rollouts"][0]
        _assert_spans_exact({version: old}, r["prompt_token_ids"], r["token_ids"], r["behavior_logprobs"],
                            r["weight_versions"], r["temperatures"])
        assert httpx.get(f"{server.url}/v1/weights").json() == before
        _assert_matches(old, _rollout(server.url, seed=31))


async def _until_running(http: httpx.AsyncClient, url: str, timeout_s: float = 120) -> None:
    """Return once the engine reports a running request (vLLM's own gauge, updated each
    engine step): an order set by the engine, not by a sleep."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        metrics = (await http.get(f"{url}/metrics")).text
        if any(line.startswith("vllm:num_requests_running") and float(line.split()[-1]) > 0
               for line in metrics.splitlines()):
            return
        assert asyncio.get_running_loop().time() < deadline, "no request reached the engine"
        await asyncio.sleep(0.02)


def _serving(server):
    return Path(httpx.get(f"{server.url}/v1/weights").json()["path"])


def _assert_spans_exact(models, prompt_ids, token_ids, logprobs, spans, temperatures=None):
    """Each span's tokens against transformers on the checkpoint of its version, full prefix."""
    temps = temperatures or parse_schedule(SCHEDULE).temperatures(len(token_ids))
    for span in spans:
        want = behaviour_logprobs(models[span["version"]], prompt_ids, token_ids, temps)[span["start"]:span["end"]]
        got = torch.tensor(logprobs[span["start"]:span["end"]])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5, msg=f"version {span['version']}")


def _assert_clock_continues(models, r):
    """An entropy-clock rollout across a ``keep`` reload (its request preempted and prefilled
    again under the new weights): each token's entropy is that of the weights its span
    names, and each temperature the schedule's at the sum of all earlier tokens' entropies
    -- the old weights' before the switch, never recomputed, never restarted."""
    entropies = torch.zeros(len(r["token_ids"]), dtype=torch.float64)
    for span in r["weight_versions"]:
        h = completion_logits(models[span["version"]], r["prompt_token_ids"], r["token_ids"])[span["start"]:span["end"]]
        p = torch.softmax(h.double(), -1)
        entropies[span["start"]:span["end"]] = -(p * torch.log(p)).nan_to_num().sum(-1)
    torch.testing.assert_close(torch.tensor(r["entropies"], dtype=torch.float64), entropies, atol=1e-4, rtol=1e-4)
    resolved = parse_schedule(CLOCKED)
    clocks = torch.cat([torch.zeros(1, dtype=torch.float64), entropies.cumsum(0)[:-1]])
    want = [resolved.temperature(t, clock=float(clocks[t])) for t in range(len(entropies))]
    torch.testing.assert_close(torch.tensor(r["temperatures"], dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=1e-4)


async def _reload_during_traffic(server, path, mode, *, after_tokens, rollouts=8):
    """A long streamed completion (ignore_eos) and ``rollouts`` concurrent n=4 rollouts
    (which also keep the tiny model's steps slow enough for the reload to land mid-stream);
    the reload is sent once the stream has received ``after_tokens`` tokens."""
    async with httpx.AsyncClient(timeout=600) as http:
        async def one(i: int) -> dict:
            body = {"prompts": [f"q{i} "], "n": 4, "max_tokens": 600, "seed": 50 + i, "ignore_eos": True,
                    "temperature_schedule": SCHEDULE if i >= 2 else CLOCKED, "return_entropy": i < 2}
            response = await http.post(f"{server.url}/v1/rollouts", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        tasks = [asyncio.create_task(one(i)) for i in range(rollouts)]
        model = (await http.get(f"{server.url}/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "prompt": "Hello there", "max_tokens": 1000, "seed": 5, "stream": True, "logprobs": 0,
                "ignore_eos": True, "return_token_ids": True, "temperature_schedule": SCHEDULE}
        stream = {"token_ids": [], "logprobs": [], "prompt_token_ids": None}
        reload = None
        async with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                stream["prompt_token_ids"] = stream["prompt_token_ids"] or choice.get("prompt_token_ids")
                stream["token_ids"] += choice.get("token_ids") or []
                stream["logprobs"] += (choice.get("logprobs") or {}).get("token_logprobs") or []
                if choice.get("finish_reason"):
                    stream["finish_reason"] = choice["finish_reason"]
                    stream["weight_versions"] = choice.get("weight_versions")
                if reload is None and len(stream["token_ids"]) >= after_tokens:
                    # Sent at once, not as a task: buffered lines would be parsed before a task
                    # ran, and the tiny model can finish the stream in that time.
                    reload = await http.post(f"{server.url}/v1/weights/reload", json={"path": path, "mode": mode},
                                             headers=AUTH)
        return stream, await asyncio.gather(*tasks), reload
