"""The RL client against real servers: fail-over when one dies mid-batch, and reloads."""

from __future__ import annotations

import threading

import pytest

from ead_client import AsyncEADClient, EADClient, ServerUnavailableError
from server_process import running_server

pytestmark = pytest.mark.engine


@pytest.fixture
def doomed(tiny_model_dir, tmp_path):
    """A second server of the same model, which the test kills; it logs each request it takes."""
    with running_server(tmp_path, "--model", str(tiny_model_dir), "--served-model-name", "tiny",
                        "--max-model-len", "512", "--enable-log-requests") as srv:
        yield srv


def test_client_survives_one_of_two_servers_dying_mid_batch(server, doomed):
    prompts = [f"prompt {i}: " for i in range(24)]
    stop = threading.Event()

    def kill_with_requests_in_flight() -> None:
        while not stop.wait(0.01):
            if b"Added request" in doomed.log.read_bytes():  # its engine has taken work
                doomed.kill()
                return

    killer = threading.Thread(target=kill_with_requests_in_flight)
    with EADClient([doomed.url, server.url], max_concurrency=8, chunk_size=1, max_retries=4, timeout=120,
                   backoff=0.2) as client:
        killer.start()
        try:
            batch = client.rollouts(prompts, n=2, max_tokens=96, schedule={"type": "ead", "decay": 8})
        finally:
            stop.set()
            killer.join()
        assert doomed.process.poll() is not None, "the doomed server never took a request"
        assert [(r.prompt_index, r.sample_index) for r in batch.rollouts] == [(p, s) for p in range(24) for s in range(2)]
        assert all(len(r.token_ids) == len(r.behavior_logprobs) > 0 for r in batch.rollouts)
        assert client.health() == {doomed.url: False, server.url: True}


def test_async_client_and_a_dead_only_server(server, tiny_model_dir):
    async def run():
        async with AsyncEADClient([server.url], max_retries=0) as client:
            return await client.rollouts(["a", "b", "c"], n=3, max_tokens=6, seed=11)

    import asyncio

    batch = asyncio.run(run())
    assert len(batch.rollouts) == 9 and batch.weight_version == 0
    with EADClient(["http://127.0.0.1:9"], max_retries=1, backoff=0.01, timeout=5) as client:
        with pytest.raises(ServerUnavailableError):
            client.weight_versions()
