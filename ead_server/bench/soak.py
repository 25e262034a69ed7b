"""``ead-bench soak``: mixed traffic, dropped clients and weight reloads for a fixed time.

A rollout backend serves training runs that last days. This drives a running server
the way such a run does, all at once, and counts what happened to every request:

* workers send, round-robin, completions and chat (with a schedule and log-probs),
  streaming chat, and rollouts with target log-probs; every answer is checked (the
  schedule echoed, one temperature per token, every rollout present);
* some streams are dropped after their first chunk, on purpose;
* a reloader swaps the weights every ``--reload-every`` seconds, alternating two
  checkpoints (``mode: wait``), and checks that no response mixes weight versions;
* before and after the traffic, each checkpoint is loaded and one seeded rollout is sent
  alone: the same checkpoint must give the same tokens and log-probs (to ``--atol``).

A request is *lost* when it gets neither an answer nor an error within
``--request-timeout`` (a timeout, or a connection closed without an answer), not counting
the deliberate drops. A 429 is *shed* load: the request waits ``Retry-After`` and is sent
again. The report (stdout, and ``--out`` as JSON) gives requests served, errors by status,
lost, shed, p50/p99 latency per kind, the server's memory (RSS) at the start, every 30 s
and at the end, and how many requests the engine still runs once the traffic stops. The
exit code is 1 when anything was lost, answered 5xx, failed its checks, mixed versions,
drifted, or was left running in the engine.

Keys come from the environment: ``$OPENAI_API_KEY`` (as ``ead-bench majority``) and
``$EAD_ADMIN_KEY`` for the reloads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = ["SoakReport", "add_arguments", "run", "soak"]

KINDS = ("completions", "chat", "chat_stream", "rollouts", "disconnect")
SCHEDULE = {"type": "ead", "warmup": 2, "decay": 5, "tau_min": 0.4}
PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):", "1, 2, 3,", "Hello"]


@dataclass
class SoakReport:
    """Counts of one soak. ``lost``, ``errors_5xx``, ``mixed_versions`` and
    ``logprob_drift`` over their bounds make the run fail; the rest describe it."""

    duration_s: float = 0.0
    served: Counter = field(default_factory=Counter)  # kind -> answered 2xx and checked
    errors: Counter = field(default_factory=Counter)  # "kind status" -> count
    bad_answers: list[str] = field(default_factory=list)  # 2xx whose body failed a check
    lost: Counter = field(default_factory=Counter)  # kind -> timed out / dropped without answer
    lost_reasons: list[str] = field(default_factory=list)
    shed: int = 0  # 429s (retried after Retry-After)
    disconnects: int = 0  # deliberate drops
    reloads: int = 0
    reload_errors: list[str] = field(default_factory=list)
    mixed_versions: int = 0
    versions_seen: set[int] = field(default_factory=set)
    logprob_drift: dict[str, float] = field(default_factory=dict)  # checkpoint -> max |diff|
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    rss_start: dict[str, int] = field(default_factory=dict)
    rss_end: dict[str, int] = field(default_factory=dict)
    rss_trace: list[dict[str, float]] = field(default_factory=list)  # {"t": s, "api_server": B, ...} every 30 s
    running_after: float | None = None  # vLLM's num_requests_running once the traffic stopped

    @property
    def errors_5xx(self) -> int:
        return sum(c for key, c in self.errors.items() if key.split()[-1].startswith("5"))

    def failures(self, atol: float) -> list[str]:
        """Why the soak failed, one line per reason (empty: it passed)."""
        out = []
        if sum(self.lost.values()):
            out.append(f"lost requests: {dict(self.lost)}")
        if self.errors_5xx:
            out.append(f"5xx answers: {dict(self.errors)}")
        if self.bad_answers:
            out.append(f"{len(self.bad_answers)} answers failed their checks, first: {self.bad_answers[0]}")
        if self.running_after:
            out.append(f"{self.running_after:.0f} requests still running in the engine after the traffic stopped")
        if self.mixed_versions:
            out.append(f"{self.mixed_versions} responses mixed weight versions in wait mode")
        if self.reload_errors:
            out.append(f"reloads failed: {self.reload_errors[:3]}")
        drift = {k: v for k, v in self.logprob_drift.items() if not v <= atol}
        if drift:
            out.append(f"the same checkpoint gave different log-probs: {drift}")
        return out

    def as_dict(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 4)

        return {
            "duration_s": round(self.duration_s, 1),
            "served": dict(self.served), "served_total": sum(self.served.values()),
            "errors": dict(self.errors), "errors_5xx": self.errors_5xx, "bad_answers": self.bad_answers[:10],
            "lost": sum(self.lost.values()), "lost_by_kind": dict(self.lost), "lost_reasons": self.lost_reasons[:10],
            "shed_429": self.shed, "deliberate_disconnects": self.disconnects,
            "reloads": self.reloads, "reload_errors": self.reload_errors[:10],
            "mixed_versions": self.mixed_versions, "versions_seen": sorted(self.versions_seen),
            "logprob_drift": self.logprob_drift,
            "latency_s": {k: {"n": len(v), "p50": pct(v, 0.5), "p99": pct(v, 0.99)}
                          for k, v in sorted(self.latencies.items())},
            "rss_bytes_start": self.rss_start, "rss_bytes_end": self.rss_end, "rss_trace": self.rss_trace,
            "engine_running_after": self.running_after,
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="the server (http://host:port, with or without /v1)")
    parser.add_argument("--model", default=None, help="served model name (default: the server's first)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                        help="twice: the two checkpoints to alternate (paths the server's --weights-root takes); "
                             "without them nothing is reloaded")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=8, help="workers sending requests")
    parser.add_argument("--reload-every", type=float, default=5.0, help="seconds between reloads")
    parser.add_argument("--disconnect-every", type=int, default=5,
                        help="every k-th request of a worker is a stream dropped after its first chunk")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="seconds after which a request with no answer counts as lost")
    parser.add_argument("--atol", type=float, default=1e-5, help="log-prob tolerance of the reload check")
    parser.add_argument("--server-pid", type=int, default=None,
                        help="the server's process group (same host): its memory is reported as well")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the report here as JSON")


def run(args: argparse.Namespace) -> int:
    """``ead-bench soak``: print the report; 1 when the soak found a failure."""
    if args.checkpoint and len(args.checkpoint) != 2:
        print("ead-bench soak: give --checkpoint exactly twice (or not at all)", file=sys.stderr)
        return 2
    report = asyncio.run(soak(
        args.base_url, model=args.model, checkpoints=args.checkpoint, duration=args.duration,
        concurrency=args.concurrency, reload_every=args.reload_every, disconnect_every=args.disconnect_every,
        max_tokens=args.max_tokens, request_timeout=args.request_timeout, server_pid=args.server_pid,
        seed=args.seed, api_key=os.environ.get("OPENAI_API_KEY"), admin_key=os.environ.get("EAD_ADMIN_KEY"),
    ))
    text = json.dumps(report.as_dict(), indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    failures = report.failures(args.atol)
    for line in failures:
        print(f"ead-bench soak: FAILED: {line}", file=sys.stderr)
    return 1 if failures else 0


class _Soak:
    def __init__(self, http: httpx.AsyncClient, root: str, model: str, report: SoakReport, *, max_tokens: int,
                 admin_headers: dict[str, str]) -> None:
        self.http = http
        self.root = root
        self.model = model
        self.report = report
        self.max_tokens = max_tokens
        self.admin_headers = admin_headers

    async def request(self, kind: str, rng: random.Random) -> None:
        """One request of ``kind``, sent again after each 429; its outcome goes to the report."""
        while True:
            start = time.monotonic()
            try:
                status, retry_after = await getattr(self, f"_{kind}")(rng)
            except httpx.TimeoutException:
                self.report.lost[kind] += 1
                return
            except httpx.TransportError as exc:  # closed without an answer
                self.report.lost[kind] += 1
                self.report.lost_reasons.append(f"{kind}: {type(exc).__name__}: {exc}")
                return
            if status == 429:
                self.report.shed += 1
                await asyncio.sleep(retry_after)
                continue
            if status == 200:
                self.report.served[kind] += 1
                self.report.latencies[kind].append(time.monotonic() - start)
            elif status != 0:  # 0: a deliberate drop
                self.report.errors[f"{kind} {status}"] += 1
            return

    def _check(self, kind: str, ok: bool, what: str) -> None:
        if not ok:
            self.report.bad_answers.append(f"{kind}: {what}")

    def _versions(self, kind: str, body: dict[str, Any], spans: list[list[dict[str, Any]] | None]) -> None:
        """Record the versions an answer reports; more than one in a response is a mix."""
        versions = {s["version"] for group in spans if group for s in group}
        if not versions and isinstance(body.get("weight_version"), int):
            versions = {body["weight_version"]}
        self.report.versions_seen |= versions
        if len(versions) > 1:
            self.report.mixed_versions += 1
            self.report.bad_answers.append(f"{kind}: versions {sorted(versions)} in one response")

    async def _completions(self, rng: random.Random) -> tuple[int, float]:
        body = {"model": self.model, "prompt": rng.choice(PROMPTS), "max_tokens": self.max_tokens, "logprobs": 0,
                "n": 2, "temperature_schedule": SCHEDULE}
        r = await self.http.post(f"{self.root}/v1/completions", json=body)
        if r.status_code == 200:
            data = r.json()
            for c in data["choices"]:
                lp = c["logprobs"]
                self._check("completions", c.get("temperature_schedule") is not None, "no schedule echo")
                self._check("completions", len(lp["temperatures"]) == len(lp["token_logprobs"]),
                            "temperatures do not match the tokens")
            self._versions("completions", data, [c.get("weight_versions") for c in data["choices"]])
        return r.status_code, _retry_after(r)

    async def _chat(self, rng: random.Random) -> tuple[int, float]:
        body = {"model": self.model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": self.max_tokens, "logprobs": True, "temperature_schedule": SCHEDULE}
        r = await self.http.post(f"{self.root}/v1/chat/completions", json=body)
        if r.status_code == 200:
            data = r.json()
            c = data["choices"][0]
            self._check("chat", c.get("temperature_schedule") is not None, "no schedule echo")
            self._check("chat", all("temperature" in t for t in c["logprobs"]["content"]), "a token has no temperature")
            self._versions("chat", data, [c.get("weight_versions")])
        return r.status_code, _retry_after(r)

    async def _chat_stream(self, rng: random.Random, drop: bool = False) -> tuple[int, float]:
        body = {"model": self.model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": self.max_tokens, "stream": True, "temperature_schedule": SCHEDULE}
        async with self.http.stream("POST", f"{self.root}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, _retry_after(r)
            done, chunks, versions = False, 0, set()
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if drop:  # the first chunk arrived: go away mid-stream
                    self.report.disconnects += 1
                    return 0, 0.0
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[len("data: "):])
                chunks += 1
                if "error" in chunk:
                    self.report.bad_answers.append(f"chat_stream: error event {chunk['error']}")
                for c in chunk.get("choices") or ():
                    versions |= {s["version"] for s in c.get("weight_versions") or ()}
            self._check("chat_stream", done and chunks > 0, f"stream ended without [DONE] after {chunks} chunks")
            self._versions("chat_stream", {}, [[{"version": v} for v in versions]])
            return 200, 0.0

    async def _disconnect(self, rng: random.Random) -> tuple[int, float]:
        return await self._chat_stream(rng, drop=True)

    async def _rollouts(self, rng: random.Random) -> tuple[int, float]:
        body = {"prompts": rng.sample(PROMPTS, 2), "n": 2, "max_tokens": self.max_tokens,
                "temperature_schedule": SCHEDULE, "return_target_logprobs": True}
        r = await self.http.post(f"{self.root}/v1/rollouts", json=body)
        if r.status_code == 200:
            data = r.json()
            rollouts = data["rollouts"]
            self._check("rollouts", len(rollouts) == 4, f"{len(rollouts)} rollouts for 2 prompts x n=2")
            for x in rollouts:
                self._check("rollouts", len(x["behavior_logprobs"]) == len(x["token_ids"]) == len(x["temperatures"]),
                            "per-token lists differ in length")
            self._versions("rollouts", data, [x.get("weight_versions") for x in rollouts])
        return r.status_code, _retry_after(r)

    async def reload(self, path: str) -> None:
        try:
            r = await self.http.post(f"{self.root}/v1/weights/reload", json={"path": path, "mode": "wait"},
                                     headers=self.admin_headers)
        except httpx.HTTPError as exc:
            self.report.reload_errors.append(f"{path}: {type(exc).__name__}: {exc}")
            return
        if r.status_code == 200:
            self.report.reloads += 1
        else:
            self.report.reload_errors.append(f"{path}: {r.status_code} {r.text[:200]}")

    async def probe(self) -> dict[str, Any]:
        """One seeded rollout, sent alone: tokens and log-probs to compare across reloads."""
        body = {"prompts": ["The capital of France is"], "n": 2, "max_tokens": self.max_tokens, "seed": 1234,
                "temperature_schedule": SCHEDULE, "return_target_logprobs": True}
        r = await self.http.post(f"{self.root}/v1/rollouts", json=body)
        r.raise_for_status()
        return r.json()


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _drift(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest log-prob difference between two probes (inf when the tokens differ)."""
    worst = 0.0
    for x, y in zip(a["rollouts"], b["rollouts"], strict=True):
        if x["token_ids"] != y["token_ids"]:
            return math.inf
        for key in ("behavior_logprobs", "target_logprobs"):
            for u, v in zip(x[key] or [], y[key] or [], strict=True):
                if u is not None and v is not None:
                    worst = max(worst, abs(u - v))
    return worst


def _running(root: str, headers: dict[str, str], wait: float = 30.0) -> float | None:
    """vLLM's ``num_requests_running`` once it settles at 0 (or after ``wait`` s): dropped
    streams and finished requests must leave nothing running in the engine."""
    deadline = time.monotonic() + wait
    value: float | None = None
    while True:
        try:
            text = httpx.get(f"{root}/metrics", headers=headers, timeout=30).text
            values = [float(line.split()[-1]) for line in text.splitlines()
                      if line.startswith("vllm:num_requests_running")]
            value = sum(values) if values else None
        except (httpx.HTTPError, ValueError):
            value = None
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def _rss(root: str, headers: dict[str, str], pid: int | None) -> dict[str, int]:
    """The API server's resident memory from its /metrics, and, given the server's process
    group on this host, the whole group's (engine processes included)."""
    out: dict[str, int] = {}
    try:
        text = httpx.get(f"{root}/metrics", headers=headers, timeout=30).text
        for line in text.splitlines():
            if line.startswith("process_resident_memory_bytes"):
                out["api_server"] = int(float(line.split()[-1]))
    except httpx.HTTPError:
        pass
    if pid is not None:
        total = 0
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                if int(fields[2]) == pid:  # process group
                    total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
        out["process_group"] = total
    return out


async def soak(
    base_url: str, *, model: str | None = None, checkpoints: list[str] | None = None, duration: float = 60.0,
    concurrency: int = 8, reload_every: float = 5.0, disconnect_every: int = 5, max_tokens: int = 24,
    request_timeout: float = 120.0, server_pid: int | None = None, seed: int = 0,
    api_key: str | None = None, admin_key: str | None = None,
) -> SoakReport:
    """Run the soak against ``base_url`` and return its counts (see the module's doc)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    admin_headers = {"Authorization": f"Bearer {admin_key or api_key}"} if (admin_key or api_key) else {}
    report = SoakReport()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=request_timeout, headers=headers, limits=limits) as http:
        if model is None:
            r = await http.get(f"{root}/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        s = _Soak(http, root, model, report, max_tokens=max_tokens, admin_headers=admin_headers)
        report.rss_start = _rss(root, headers, server_pid)
        before: dict[str, dict[str, Any]] = {}
        for path in checkpoints or []:
            await s.reload(path)
            before[path] = await s.probe()

        start = time.monotonic()
        deadline = start + duration

        async def worker(w: int) -> None:
            rng = random.Random(seed * 1000 + w)
            i = w
            while time.monotonic() < deadline:
                kind = "disconnect" if disconnect_every and i % disconnect_every == disconnect_every - 1 \
                    else KINDS[i % 4]
                await s.request(kind, rng)
                i += 1

        async def reloader() -> None:
            k = 0
            while checkpoints and time.monotonic() + reload_every < deadline:
                await asyncio.sleep(reload_every)
                await s.reload(checkpoints[k % 2])
                k += 1

        async def memory() -> None:
            while time.monotonic() < deadline:
                sample = await asyncio.to_thread(_rss, root, headers, server_pid)
                report.rss_trace.append({"t": round(time.monotonic() - start, 1), **sample})
                await asyncio.sleep(min(30.0, max(0.0, deadline - time.monotonic())))

        await asyncio.gather(reloader(), memory(), *(worker(w) for w in range(concurrency)))
        report.duration_s = time.monotonic() - start
        report.running_after = await asyncio.to_thread(_running, root, headers)
        for path in checkpoints or []:
            await s.reload(path)
            report.logprob_drift[path] = _drift(before[path], await s.probe())
        report.rss_end = _rss(root, headers, server_pid)
    return report
