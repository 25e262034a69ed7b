"""The GPU check: the Triton kernel compiled for a real GPU, against the PyTorch oracle.

Made for a machine that has a GPU, PyTorch and Triton but no vLLM, pytest or pydantic
and no network (``scripts/gpu-check.sh`` runs it from a bare checkout). It needs torch,
triton and this package only, and writes its results into ``OUT`` as it goes:

1. ``correctness.json``: both layouts (V1 rows, V2 slots) and fp32 (what both vLLM
   runners hand to logits processors), bf16 and fp16, over random batches that hit every
   branch of the schedule, compiled kernel on the GPU against the PyTorch path on the
   CPU. Bit-identical is the expectation; a float64 ``exp`` that rounds differently in
   its last bit may flip a float32 temperature by one ulp, so up to one ulp of the
   temperature is accepted and counted.
2. ``target_stats.json``: the in-pass target statistics (``lse_rows``: one block of every
   row on a GPU, no test here runs that branch) on the GPU against float64
   ``logsumexp`` on the CPU, within 1e-5 nats.
3. ``benchmark.txt`` / ``benchmark.json``: ``ead_kernels.benchmark`` on the GPU: time
   per step against vLLM's plain temperature division, and the kernel's bandwidth as a
   share of a device-to-device copy of the same bytes (target >= 85 %).
4. ``summary.txt``: one line.

    python -m ead_kernels.gpu_check OUT [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from . import benchmark
from .target_stats import lse_rows
from .temperature import (
    KIND_CONSTANT,
    KIND_EAD,
    KIND_NONE,
    KIND_REVERSE,
    NUM_PARAMS,
    apply_schedule_torch_,
    apply_schedule_triton_,
)

BANDWIDTH_TARGET = 85.0  # % of a device-to-device copy, at the largest batch and vocabulary
LSE_TOLERANCE = 1e-5  # nats: fp32 sums of up to 152k terms, against float64


def _random_rows(rng: random.Random, count: int) -> tuple[list[int], list[int], list[list[float]]]:
    """Rows over warm-up edges, the anneal, both clamps and float64 ``exp`` overflow."""
    positions, kinds, params = [], [], []
    for _ in range(count):
        tau_max = rng.choice([1.2, 1.0, rng.uniform(0.3, 3.0)])
        tau_min = rng.choice([0.1, 0.8, rng.uniform(0.01, tau_max)])
        warmup = rng.choice([0, 10, rng.randrange(0, 500)])
        scale = rng.choice([1.0, 20.0]) * rng.choice([25.0, rng.uniform(0.5, 100)])
        positions.append(rng.choice([0, warmup, warmup + 1, rng.randrange(0, 4096),
                                     int(scale * math.log(1 + tau_max - tau_min)), int(scale * 709.8) + 1, 10**9]))
        kinds.append(rng.choice([KIND_NONE, KIND_EAD, KIND_REVERSE, KIND_CONSTANT]))
        params.append([tau_max, tau_min, rng.uniform(0.05, 2.0), float(warmup), scale])
    return positions, kinds, params


def _compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float | int]:
    """Bit-identical elements, and elements within what one ulp of the float32
    temperature can move them (one rounding step of the output dtype)."""
    slack = 2 * torch.finfo(want.dtype).eps
    got, want = got.float().cpu(), want.float().cpu()
    same = (got == want) | (got.isnan() & want.isnan())
    diff = (got - want).abs().where(torch.isfinite(want), torch.zeros_like(want))
    close = same | (diff <= want.abs() * slack)
    return {"elements": want.numel(), "bit_identical": int(same.sum()), "within_one_ulp_of_temperature": int(close.sum()),
            "max_abs_diff": float(diff.max())}


def check_correctness(device: torch.device, quick: bool) -> list[dict]:
    """Every (layout, dtype, batch, vocab) case: the Triton kernel on ``device`` (compiled
    on a GPU; under ``TRITON_INTERPRET=1`` on the CPU, as the test suite runs it) vs the
    PyTorch path on the CPU."""
    cases = []
    shapes = [(1, 151936), (7, 49152), (64, 32003), (256, 4099)] if not quick else [(3, 2053), (16, 1000)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for layout in ("rows", "slots"):
            for batch, vocab in shapes:
                rng = random.Random(hash((str(dtype), layout, batch, vocab)) & 0xFFFF)
                positions, kinds, params = _random_rows(rng, batch if layout == "rows" else 2 * batch)
                pos_t = torch.tensor(positions, dtype=torch.int64)
                kinds_t = torch.tensor(kinds, dtype=torch.int32)
                params_t = torch.tensor(params, dtype=torch.float64).reshape(-1, NUM_PARAMS)
                g = torch.Generator().manual_seed(batch * 31 + vocab)
                logits = (torch.randn(batch, vocab, generator=g) * 8)
                logits[:, ::13] = -math.inf
                logits = logits.to(dtype)
                if layout == "rows":
                    args = (pos_t, kinds_t, params_t)
                else:
                    slots = torch.randperm(2 * batch, generator=g)[:batch].to(torch.int32)
                    prompt_len = torch.randint(1, 300, (2 * batch,), generator=g, dtype=torch.int32)
                    pos = pos_t[slots.long()].clamp_max(2**40) + prompt_len[slots.long()] - 1
                    args = (pos, kinds_t, params_t, slots, prompt_len)
                want = apply_schedule_torch_(logits.clone(), *args)
                got = apply_schedule_triton_(logits.to(device), *(a.to(device) for a in args))
                result = {"layout": layout, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "vocab": vocab,
                          **_compare(got, want)}
                result["ok"] = result["within_one_ulp_of_temperature"] == result["elements"]
                untouched = (kinds_t if layout == "rows" else kinds_t[slots.long()]) == KIND_NONE
                result["none_rows_identical"] = bool(torch.equal(got.cpu()[untouched].view(torch.int8),
                                                                 logits[untouched].view(torch.int8)))
                result["ok"] &= result["none_rows_identical"]
                cases.append(result)
    return cases


def check_target_stats(device: torch.device, quick: bool) -> list[dict]:
    """``lse_rows`` on ``device`` (every row, a subset, fp32 and bf16 logits, masked
    entries and a fully masked row) against float64 ``logsumexp`` on the CPU."""
    cases = []
    shapes = [(1, 151936), (64, 49152), (256, 151936)] if not quick else [(3, 2053), (16, 1000)]
    for dtype in (torch.float32, torch.bfloat16):
        for batch, vocab in shapes:
            g = torch.Generator().manual_seed(batch * 7 + vocab)
            logits = torch.randn(batch, vocab, generator=g) * 8
            logits[:, ::11] = -math.inf
            if batch > 1:
                logits[-1] = -math.inf  # a fully masked row
            logits = logits.to(dtype)
            rows = torch.arange(batch) if batch < 4 else torch.randperm(batch, generator=g)[: batch // 2 + 1]
            want = torch.logsumexp(logits[rows].double(), -1)
            got = lse_rows(logits.to(device), rows.to(device)).cpu().double()
            same_inf = bool(torch.equal(got.isinf(), want.isinf()))
            finite = want.isfinite()
            diff = float((got - want)[finite].abs().max()) if finite.any() else 0.0
            cases.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "vocab": vocab,
                          "rows": rows.numel(), "max_abs_diff": diff, "ok": same_inf and diff <= LSE_TOLERANCE})
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Triton kernel check and benchmark on a GPU")
    parser.add_argument("out", type=Path, help="folder for the results (written as they come)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a smoke run)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    started = time.monotonic()
    print(f"device: {name}; torch {torch.__version__}", flush=True)

    cases = check_correctness(device, args.quick)
    (args.out / "correctness.json").write_text(json.dumps(cases, indent=1))
    failed = [c for c in cases if not c["ok"]]
    exact = sum(c["bit_identical"] for c in cases) / sum(c["elements"] for c in cases)
    print(f"correctness: {len(cases) - len(failed)}/{len(cases)} cases ok; {exact:.6%} of elements bit-identical "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    for c in failed:
        print(f"  FAILED {c}", flush=True)

    stats = check_target_stats(device, args.quick)
    (args.out / "target_stats.json").write_text(json.dumps(stats, indent=1))
    stats_failed = [c for c in stats if not c["ok"]]
    print(f"target statistics: {len(stats) - len(stats_failed)}/{len(stats)} cases within {LSE_TOLERANCE} nats "
          f"(max {max(c['max_abs_diff'] for c in stats):.2e})", flush=True)
    for c in stats_failed:
        print(f"  FAILED {c}", flush=True)

    sizes = ([1, 8, 64, 256], [49152, 151936]) if not args.quick else ([1, 64], [49152])
    results = benchmark.run(*sizes, torch.float32, warmup=20, repeats=50 if args.quick else 200, device=device)
    table = benchmark.format_table(results)
    print(table, flush=True)
    (args.out / "benchmark.txt").write_text(f"device: {name}\n{table}\n")
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=1))

    big = max(results, key=lambda r: (r["vocab"], r["batch"]))
    share = 100 * big["copy"] / big["triton"]
    verdict = "PASS" if not failed and not stats_failed and share >= BANDWIDTH_TARGET else "FAIL"
    summary = (f"gpu-check {verdict}: {name}; kernel vs oracle {len(cases) - len(failed)}/{len(cases)} cases "
               f"({exact:.4%} bit-identical); target statistics {len(stats) - len(stats_failed)}/{len(stats)}; batch {big['batch']} x vocab {big['vocab']} fp32: triton "
               f"{big['triton'] * 1e3:.1f} us = {big['triton'] / big['baseline']:.2f}x vLLM's division, "
               f"{share:.0f}% of copy bandwidth (target {BANDWIDTH_TARGET:.0f}%); {time.monotonic() - started:.0f} s")
    print(summary, flush=True)
    (args.out / "summary.txt").write_text(summary + "\n")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
