"""The RL client against real servers, as an RL run on several replicas meets them: a
reload that reaches every server, a drain on SIGTERM, a server that restarts, and one that
dies mid-batch.

At most two engines at once: the session's shared server and this module's ``replica``,
one server that the tests below stop, start again and kill, in file order (each step is
one test, so a failure names the step).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from ead_client import AsyncEADClient, BadRequestError, EADClient, ServerUnavailableError
from ead_server.launcher import Launched, free_port, launch, serve_command
from tiny_model import write_tiny_llama

pytestmark = pytest.mark.engine

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "ead-server.yaml"
KEY = "replica-key"


def test_async_client_and_a_dead_only_server(server, tiny_model_dir):
    async def run():
        async with AsyncEADClient([server.url], max_retries=0) as client:
            return await client.rollouts(["a", "b", "c"], n=3, max_tokens=6, seed=11)

    batch = asyncio.run(run())
    assert len(batch.rollouts) == 9 and batch.weight_version == 0
    with EADClient(["http://127.0.0.1:9"], max_retries=1, backoff=0.01, timeout=5) as client:
        with pytest.raises(ServerUnavailableError):
            client.weight_versions()


# ----------------------------------------------------------------------------- replicas as deployed


def _manifest_drain() -> tuple[int, int, int]:
    """The Deployment's ``--shutdown-timeout``, preStop pause and termination grace period."""
    deployment = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    drain = int(args[args.index("--shutdown-timeout") + 1])
    return drain, container["lifecycle"]["preStop"]["sleep"]["seconds"], pod["terminationGracePeriodSeconds"]


class Replica:
    """One reloadable server, run as the deploy manifests run it (``--weights-root``,
    ``--shutdown-timeout`` from the Kubernetes manifest, keys from the environment),
    that a test can stop and start again on the same port, like a pod that restarts."""

    def __init__(self, root: Path, log_dir: Path) -> None:
        self.root, self.log_dir, self.port = root, log_dir, free_port()
        self.drain_s = _manifest_drain()[0]
        self.starts = 0
        self._stack = contextlib.ExitStack()
        self.server: Launched | None = None
        self.memo: dict = {}  # what one test leaves for the next: outputs seen at each version

    def start(self) -> Launched:
        self.starts += 1
        args = ["--model", str(self.root / "base"), "--served-model-name", "tiny", "--max-model-len", "512",
                "--weights-root", str(self.root), "--shutdown-timeout", str(self.drain_s), "--enable-log-requests"]
        # vLLM reads VLLM_API_KEY for /v1; EAD_ADMIN_KEY guards the reload. The same value
        # for both: with two different keys vLLM's /v1 check refuses the admin key.
        env = {"VLLM_API_KEY": KEY, "EAD_ADMIN_KEY": KEY}
        self.server = self._stack.enter_context(launch(
            serve_command(None, args), self.log_dir / f"replica-{self.starts}.log", port=self.port, env=env))
        return self.server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.server is not None and self.server.process.poll() is None:
            self.server.kill()  # a test server: no need to wait for a drain
        self._stack.close()


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("replica-weights")
    write_tiny_llama(root / "base", seed=0)  # the shared server's weights too
    write_tiny_llama(root / "b", seed=7)
    replica = Replica(root, tmp_path_factory.mktemp("replica-logs"))
    replica.start()
    try:
        yield replica
    finally:
        replica.close()


PROMPTS = ["Hello there", "abc", "The cat"]


def _rollout_tokens(client: EADClient, **kwargs) -> tuple[int, list[list[int]]]:
    batch = client.rollouts(PROMPTS, n=2, max_tokens=12, seed=5, schedule={"type": "ead", "decay": 6}, **kwargs)
    return batch.weight_version, [r.token_ids for r in batch.rollouts]


def test_a_reload_reaches_every_server(server, replica):
    """The reload goes to each server and the client reports each outcome: the replica
    loads the checkpoint, the shared server (started without --weights-root) refuses and
    is named in the error, with the replica's success in its notes."""
    assert httpx.get(f"{replica.url}/v1/models").status_code == 401, "VLLM_API_KEY from the environment guards /v1"
    with EADClient([replica.url], api_key=KEY, max_retries=0) as one:
        replica.memo[0] = _rollout_tokens(one)
    with EADClient([replica.url, server.url], api_key=KEY, admin_key=KEY, max_retries=0) as client:
        with pytest.raises(BadRequestError) as refused:
            client.reload_weights("b")
        assert refused.value.url == server.url and refused.value.status == 403
        assert f"{replica.url}: ok (1)" in " ".join(getattr(refused.value, "__notes__", []))
        assert client.weight_versions() == {replica.url: 1, server.url: 0}
    weights = httpx.get(f"{replica.url}/v1/weights", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert (weights["weight_version"], weights["path"]) == (1, str(replica.root / "b"))
    with EADClient([replica.url], api_key=KEY, max_retries=0) as one:
        replica.memo[1] = _rollout_tokens(one)
    assert replica.memo[1][0] == 1 and replica.memo[1][1] != replica.memo[0][1], "new weights, new samples"
    # Servers at different versions (here: one reloaded, one not; in a run: one that
    # restarted on its base weights): one call's samples come from two policies, and the
    # batch says so: its weight_version is the oldest, and each rollout's version spans
    # make the lagging server's samples stale by one version.
    with EADClient([server.url, replica.url], api_key=KEY, max_retries=0, chunk_size=1) as client:
        mixed = client.rollouts(PROMPTS * 4, n=1, max_tokens=4)
    assert mixed.weight_version == 0
    assert sorted({r.staleness(1) for r in mixed.rollouts}) == [0, 1], "both servers served the call"


async def _streams_in_flight(url: str, count: int, max_tokens: int, generating: set[int]) -> list[tuple[float, dict]]:
    """``count`` long streamed completions at once; each adds its index to ``generating`` at
    its first token (then the engine is running it). Returns each one's end time, status,
    finish reason and token count."""
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=300, headers=headers) as http:
        async def one(i: int) -> tuple[float, dict]:
            body = {"model": "tiny", "prompt": f"request {i}:", "max_tokens": max_tokens, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            answer: dict = {"finish_reason": None, "usage": None}
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                answer["status"] = response.status_code
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    for choice in chunk.get("choices", []):
                        generating.add(i)
                        answer["finish_reason"] = choice.get("finish_reason") or answer["finish_reason"]
                    answer["usage"] = chunk.get("usage") or answer["usage"]
            return time.monotonic(), answer

        return await asyncio.gather(*(one(i) for i in range(count)))


def _log_since(log: Path, offset: int) -> bytes:
    with log.open("rb") as f:
        f.seek(offset)
        return f.read()


def _assert_group_gone(pgid: int, timeout: float) -> None:
    """The process group has no process left (its last exited children are reaped by init
    within a moment, so wait a little)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"processes of the stopped server are still running (group {pgid})"
        time.sleep(0.1)


def test_sigterm_drains_then_the_restarted_server_is_back_on_base_weights(server, replica):
    """SIGTERM, as Kubernetes and ``docker stop`` send it to the container's first process,
    with requests in flight: each finishes whole within the manifest's --shutdown-timeout,
    and the server is gone within the grace period. The server then starts again on the
    same port: base weights at version 0, which is how the client notices the restart
    (``weight_versions()``, each batch's ``weight_version``, and each rollout's version
    spans when one call spans servers at different versions: see the test above)."""
    drain, pause, grace = _manifest_drain()
    first = replica.server
    assert first is not None and replica.memo.get(1), "runs after test_a_reload_reaches_every_server"
    max_tokens, results, generating = 440, [], set()
    sender = threading.Thread(
        target=lambda: results.extend(asyncio.run(_streams_in_flight(replica.url, 32, max_tokens, generating))))
    sender.start()
    deadline = time.monotonic() + 60
    # All 32 generating. (A request that the engine has not taken yet at SIGTERM is not
    # drained: vLLM answers it as aborted. "Added request" in the log is not enough: it is
    # logged when the request is sent to the engine process, before that process takes it.)
    while len(generating) < 32:
        assert time.monotonic() < deadline and sender.is_alive(), "the requests never all started"
        time.sleep(0.01)
    first.process.send_signal(signal.SIGTERM)  # the main process only, as a container runtime does
    sigterm = time.monotonic()
    while b"shutdown triggered" not in first.log.read_bytes():
        assert time.monotonic() - sigterm < 30, "the server never logged its shutdown"
        time.sleep(0.05)
    # While it drains, the server takes no new work (why the pod has a preStop pause): a
    # 5xx, a closed port, or an answer that says it was aborted.
    with contextlib.suppress(httpx.TransportError):
        late = httpx.post(f"{replica.url}/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 2},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert late.status_code >= 500 or late.json()["choices"][0]["finish_reason"] == "abort", late.text
    sender.join(timeout=drain + 60)
    first.process.wait(timeout=grace)
    exited = time.monotonic() - sigterm
    assert len(results) == 32
    assert max(arrived for arrived, _ in results) > sigterm, "requests were still running at SIGTERM"
    for arrived, answer in results:
        assert answer["status"] == 200, answer
        assert answer["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == max_tokens, answer
        assert arrived - sigterm < drain, "finished within --shutdown-timeout"
    assert exited < grace - pause, f"gone {exited:.1f} s after SIGTERM; the pod's grace period must cover it"
    _assert_group_gone(first.process.pid, timeout=5)  # nothing of the engine left behind

    replica.start()  # the pod comes back
    with EADClient([replica.url], api_key=KEY, max_retries=0) as client:
        # How the client sees it: the version the trainer's last reload returned (1) is gone.
        assert client.weight_versions() == {replica.url: 0}
        assert _rollout_tokens(client) == replica.memo[0], "base weights again, at version 0"
    # Versions count reloads per server since its start: the restarted server now agrees
    # with the shared one, which never reloaded (both base weights, version 0).
    with EADClient([server.url, replica.url], api_key=KEY, max_retries=0) as client:
        assert client.weight_versions() == {server.url: 0, replica.url: 0}
        assert _rollout_tokens(client)[0] == 0


def test_client_survives_one_of_two_servers_dying_mid_batch(server, replica):
    """The replica, back on the shared server's weights and version, is killed (SIGKILL, a
    crash) as soon as its engine takes a request of the batch; the client fails over."""
    doomed = replica.server
    assert doomed is not None and doomed.process.poll() is None
    seen = doomed.log.stat().st_size  # requests logged before this batch do not count
    prompts = [f"prompt {i}: " for i in range(24)]
    stop = threading.Event()

    def kill_with_requests_in_flight() -> None:
        while not stop.wait(0.01):
            if b"Added request" in _log_since(doomed.log, seen):  # its engine has taken work of this batch
                doomed.kill()
                return

    killer = threading.Thread(target=kill_with_requests_in_flight)
    with EADClient([doomed.url, server.url], api_key=KEY, max_concurrency=8, chunk_size=1, max_retries=4,
                   timeout=120, backoff=0.2) as client:
        killer.start()
        try:
            batch = client.rollouts(prompts, n=2, max_tokens=96, schedule={"type": "ead", "decay": 8})
        finally:
            stop.set()
            killer.join()
        assert doomed.process.poll() is not None, "the doomed server never took a request"
        pairs = [(r.prompt_index, r.sample_index) for r in batch.rollouts]
        assert pairs == [(p, s) for p in range(24) for s in range(2)]
        assert all(len(r.token_ids) == len(r.behavior_logprobs) > 0 for r in batch.rollouts)
        assert batch.weight_version == 0
        assert client.health() == {doomed.url: False, server.url: True}
