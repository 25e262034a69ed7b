"""``ead-bench overhead``: what a schedule costs end to end, measured side by side.

Machines here are noisy and absolute throughput drifts, so the variants run in
alternating rounds against the same server (the order rotates every round) and the
report is the ratio of their median throughputs. Every variant samples at temperature 1
with no truncation and ``ignore_eos``, so they generate the same number of tokens and
differ only in the schedule the processor applies: none, EAD, and the two entropy-driven
schedules (whose step also takes each row's entropy, and whose per-token numbers the
server collects from the engine once a request has finished).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from openai import AsyncOpenAI

from ead_server.request_contract import NEUTRAL_SAMPLING, SCHEDULE_KEY

VARIANTS = {
    "temperature 1.0": {},
    "ead (paper)": {SCHEDULE_KEY: {"preset": "paper"}},
    "ead, entropy clock": {SCHEDULE_KEY: {"preset": "paper", "clock": "entropy"}},
    "entropy": {SCHEDULE_KEY: {"type": "entropy"}},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="OpenAI-style base URL ending in /v1")
    parser.add_argument("--model", default=None, help="served model name (default: the server's first)")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests per round")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)


async def _round(client: AsyncOpenAI, model: str, extra: dict, args: argparse.Namespace) -> float:
    """Generated tokens per second of one round of concurrent requests."""
    start = time.perf_counter()
    replies = await asyncio.gather(*(
        client.completions.create(
            model=model, prompt=f"Write a long story about the number {i}.", max_tokens=args.max_tokens,
            temperature=1.0, seed=i, extra_body={**NEUTRAL_SAMPLING, "ignore_eos": True, **extra},
        )
        for i in range(args.requests)
    ))
    elapsed = time.perf_counter() - start
    return sum(r.usage.completion_tokens for r in replies) / elapsed


async def _measure(args: argparse.Namespace) -> dict[str, list[float]]:
    client = AsyncOpenAI(base_url=args.base_url, api_key="unused", max_retries=0)
    model = args.model or (await client.models.list()).data[0].id
    await _round(client, model, {}, argparse.Namespace(**{**vars(args), "requests": 2, "max_tokens": 8}))  # warm-up
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(await _round(client, model, VARIANTS[name], args))
            print(f"round {r + 1}/{args.rounds} {name:>18}: {results[name][-1]:8.1f} tokens/s", flush=True)
    return results


def run(args: argparse.Namespace) -> int:
    results = asyncio.run(_measure(args))
    medians = {name: statistics.median(values) for name, values in results.items()}
    base, ead = medians["temperature 1.0"], medians["ead (paper)"]
    print(f"\n{args.requests} concurrent requests x {args.max_tokens} tokens, median of {args.rounds} rounds")
    print(f"  {'':>18}  {'tokens/s':>8}  {'/ T=1.0':>7}  {'/ ead':>7}")
    for name, value in medians.items():
        print(f"  {name:>18}  {value:8.1f}  {value / base:7.3f}  {value / ead:7.3f}")
    return 0
