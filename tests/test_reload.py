"""Weight reload in a running server: exactness, versions, refusals, and requests in flight.

Each class starts its own server (they reload weights); with the shared session server
that makes two engines at most.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import httpx
import pytest
import torch

from oracle import behaviour_logprobs, completion_logits
from server_process import running_server
from tiny_model import write_tiny_llama

pytestmark = pytest.mark.engine

KEY = "test-admin-key"
SCHEDULE = {"type": "ead", "warmup": 2, "decay": 5, "tau_min": 0.4}
AUTH = {"Authorization": f"Bearer {KEY}"}


def _serve(tmp_path_factory, root, model):
    return running_server(tmp_path_factory.mktemp("reload-logs"), "--model", str(model), "--weights-root", str(root),
                          "--admin-key", KEY, "--max-model-len", "512")


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
    write_tiny_llama(base / "tied-base", tie_word_embeddings=True, seed=1)
    write_tiny_llama(base / "tied-b", tie_word_embeddings=True, seed=8)
    shutil.copytree(base / "b", base / "corrupt")
    weights = base / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    shutil.copytree(base / "b", base / "wide")
    config = (base / "wide" / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    (base / "wide" / "config.json").write_text(config)
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
        assert httpx.get(f"{server.url}/v1/weights").json() == {"weight_version": 0, "path": str(base / "base")}
        _assert_matches(base / "base", _rollout(server.url))

    def test_reload_changes_outputs_exactly_and_bumps_the_version(self, server, root):
        base = root[0]
        before = _rollout(server.url)
        response = _reload(server.url, "b")
        assert response.status_code == 200, response.text
        assert response.json() == {"weight_version": 1, "path": str(base / "b")}
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
                await asyncio.sleep(1.0)
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


class TestTied:
    @pytest.fixture(scope="class")
    def server(self, tmp_path_factory, root):
        with _serve(tmp_path_factory, root[0], root[0] / "tied-base") as srv:
            yield srv

    def test_tied_checkpoint_without_lm_head_reloads_exactly(self, server, root):
        from safetensors import safe_open

        base = root[0]
        with safe_open(str(base / "tied-b" / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()  # as transformers saves tied models
        _assert_matches(base / "tied-base", _rollout(server.url))
        response = _reload(server.url, "tied-b")
        assert response.status_code == 200, response.text
        _assert_matches(base / "tied-b", _rollout(server.url, seed=3))
