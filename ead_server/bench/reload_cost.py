"""``ead-bench reload-cost``: what a ``keep`` reload costs against a ``wait`` reload,
measured side by side.

Run against a server started with ``--weights-root`` and ``--admin-key``::

    ead-bench reload-cost --base-url http://127.0.0.1:8000 --admin-key k \\
        --path CHECKPOINT [--path CHECKPOINT2] --requests 8 --max-tokens 256 --after-tokens 64

One round of a variant: ``--requests`` seeded rollouts (``ignore_eos``, so every one
generates ``--max-tokens`` tokens) and one streamed completion are sent at once; when
the stream has received ``--after-tokens`` tokens, the variant's reload is sent (the
next ``--path``, cycling). Variants, in an order that rotates every round:

* ``none``: no reload (the baseline);
* ``wait``: the reload waits for every request in flight to finish on the old weights;
* ``keep``: the requests in flight are frozen, the weights swapped, and they go on under
  the new weights. The KV cache is dropped, so each one prefills its prompt and every
  token it already has again: ``refilled`` counts those tokens (from the responses'
  weight-version spans).

Reported per variant, as medians over the rounds: ``reload`` (seconds the reload call
took: how long a trainer waits for its new weights to serve) and ``in flight`` (seconds
until the last request in flight finished: how long the rollouts took). On a shared
machine the load drifts between rounds, so the cost of a mode is also given as the median
over rounds of ``in flight`` minus that of the same round's ``none``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx

__all__ = ["add_arguments", "run"]

VARIANTS = ("none", "wait", "keep")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--admin-key", required=True, help="the server's --admin-key")
    parser.add_argument("--path", action="append", required=True,
                        help="checkpoint folder under the server's --weights-root; repeat to alternate")
    parser.add_argument("--requests", type=int, default=8, help="rollouts in flight besides the stream")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--after-tokens", type=int, default=64, help="reload once the stream has this many tokens")
    parser.add_argument("--rounds", type=int, default=3)


async def _round(http: httpx.AsyncClient, args: argparse.Namespace, mode: str, path: str, seed: int) -> dict:
    url, auth = args.base_url.rstrip("/"), {"Authorization": f"Bearer {args.admin_key}"}
    start = time.perf_counter()

    async def rollout(i: int) -> list[dict]:
        body = {"prompts": [f"Tell a long story about the number {i}."], "n": 1, "max_tokens": args.max_tokens,
                "seed": seed + i, "ignore_eos": True}
        response = await http.post(f"{url}/v1/rollouts", json=body)
        response.raise_for_status()
        return response.json()["rollouts"]

    tasks = [asyncio.create_task(rollout(i)) for i in range(args.requests)]
    model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": args.max_tokens, "seed": seed, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    async def reload() -> float:
        sent = time.perf_counter()
        reply = await http.post(f"{url}/v1/weights/reload", json={"path": path, "mode": mode}, headers=auth)
        reply.raise_for_status()
        return time.perf_counter() - sent

    received, reloading, spans, prompt_len = 0, None, None, 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            prompt_len = prompt_len or len(choice.get("prompt_token_ids") or [])
            received += len(choice.get("token_ids") or [])
            spans = choice.get("weight_versions") or spans
            if mode != "none" and reloading is None and received >= args.after_tokens:
                reloading = asyncio.create_task(reload())  # a "wait" reload returns only after this stream ends
                await asyncio.sleep(0)  # let it send now, before the chunks already buffered are read
    rollouts = [r for rs in await asyncio.gather(*tasks) for r in rs]
    inflight_s = time.perf_counter() - start
    reload_s = await reloading if reloading else 0.0
    sequences = [(len(r["prompt_token_ids"]), r["weight_versions"]) for r in rollouts] + [(prompt_len, spans)]
    refilled = sum(p + s[0]["end"] for p, s in sequences if s and len(s) > 1)
    switched = sum(1 for _, s in sequences if s and len(s) > 1)
    return {"reload_s": reload_s, "inflight_s": inflight_s, "refilled": refilled, "switched": switched,
            "tokens": sum(len(r["token_ids"]) for r in rollouts) + received}


async def _measure(args: argparse.Namespace) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    reloads = 0
    async with httpx.AsyncClient(timeout=3600) as http:
        await _round(http, argparse.Namespace(**{**vars(args), "requests": 1, "max_tokens": 8}), "none", "", 0)
        for r in range(args.rounds):
            order = VARIANTS[r % 3:] + VARIANTS[: r % 3]
            for mode in order:
                path = args.path[reloads % len(args.path)]
                reloads += mode != "none"
                result = await _round(http, args, mode, path, seed=1000 * r)
                results[mode].append(result)
                print(f"round {r + 1}/{args.rounds} {mode:>4}: reload {result['reload_s']:6.2f} s, in flight "
                      f"{result['inflight_s']:6.2f} s, {result['tokens']} tokens generated, "
                      f"{result['switched']} switched, {result['refilled']} tokens refilled", flush=True)
    return results


def run(args: argparse.Namespace) -> int:
    results = asyncio.run(_measure(args))
    print(f"\n{args.requests + 1} requests x {args.max_tokens} tokens in flight, reload after "
          f"{args.after_tokens} streamed tokens; medians of {args.rounds} rounds")
    for mode, rounds in results.items():
        med = {key: statistics.median(r[key] for r in rounds) for key in ("reload_s", "inflight_s", "refilled")}
        extra = [r["inflight_s"] - base["inflight_s"] for r, base in zip(rounds, results["none"])]
        print(f"  {mode:>4}: reload {med['reload_s']:6.2f} s, in flight {med['inflight_s']:6.2f} s "
              f"({statistics.median(extra):+.2f} s against the same round's none), refilled {med['refilled']:.0f} "
              "tokens")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
