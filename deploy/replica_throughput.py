"""Rollout throughput with 1, 2, ... replicas on this machine: a manual run, not a CI test.

For each replica count N it starts N ``ead-server serve`` processes (the embedded model
unless ``--model``), each on its own port, sends one batch of rollouts through
``EADClient(base_urls=[...])`` after a warm-up batch, reports generated tokens per
second, and stops them::

    .venv/bin/python deploy/replica_throughput.py --replicas 1 2 3 --prompts 48 --n 4 --max-tokens 128

On the CPU each replica is an engine with its own cores: ``--cores-per-replica K`` gives
replica i the cores ``i*K .. i*K+K-1`` (vLLM's ``VLLM_CPU_OMP_THREADS_BIND``); without it
every engine binds as vLLM decides, and engines on shared cores slow each other down.
Replicas only add throughput when they add hardware (cores, GPUs): on a machine with C
cores the most this shows is the scaling up to C / K replicas.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

from ead_client import EADClient
from ead_server.launcher import launch, serve_command


def run(replicas: int, args: argparse.Namespace, log_dir: Path) -> dict:
    extra = ["--model", args.model] if args.model else []
    with contextlib.ExitStack() as stack:
        servers = []
        for i in range(replicas):
            env = {}
            if args.cores_per_replica:
                k = args.cores_per_replica
                env["VLLM_CPU_OMP_THREADS_BIND"] = f"{i * k}-{i * k + k - 1}"
            servers.append(stack.enter_context(launch(serve_command(None, extra), log_dir / f"n{replicas}-r{i}.log",
                                                      env=env)))
        prompts = [f"Question {i}: what is {i % 7} + {i % 5}? Answer:" for i in range(args.prompts)]
        with EADClient([s.url for s in servers], max_concurrency=args.concurrency, timeout=1800) as client:
            client.rollouts(prompts[: len(servers) * 2], n=1, max_tokens=8)  # warm-up: every replica
            start = time.monotonic()
            batch = client.rollouts(prompts, n=args.n, max_tokens=args.max_tokens, schedule={"type": "ead"})
            seconds = time.monotonic() - start
    tokens = sum(len(r.token_ids) for r in batch.rollouts)
    return {"replicas": replicas, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cores-per-replica", type=int, default=None)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="ead-replicas-") as tmp:
        for replicas in args.replicas:
            r = run(replicas, args, Path(tmp))
            print(f"{r['replicas']} replica(s): {r['tokens']} tokens in {r['seconds']:.1f} s = "
                  f"{r['tokens_per_s']:.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
