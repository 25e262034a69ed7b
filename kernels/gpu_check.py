"""The GPU check: the Triton kernel compiled for a real GPU, against the PyTorch oracle.

Made for a machine that has a GPU, PyTorch and Triton but no vLLM, pytest or pydantic
and no network (``scripts/gpu-check.sh`` runs it from a bare checkout). It needs torch,
triton and this package only, and writes its results into ``OUT`` as it goes:

1. ``correctness.json``: both layouts (V1 rows, V2 slots) and fp32 (what both vLLM
   runners hand to logits processors), bf16 and fp16, over random batches that hit every
   branch of the schedule (the entropy type and the entropy clock included, at extreme
   entropies and clocks), without and with the per-row ``entropy`` and ``clock``
   inputs, compiled kernel on the GPU against the PyTorch path on the CPU.
   Bit-identical is the expectation; a float64 ``exp`` or ``log`` that rounds
   differently in its last bit may flip a float32 temperature by one ulp, so up to one
   ulp of the temperature is accepted and counted. The cases with the per-row inputs
   (``--quick``: of the smallest shape) also run the scale with its row statistics
   (``apply_schedule_with_stats_``, overlapping row sets before and after): the logits
   must be the plain kernel's bits, the statistics within :data:`STATS_TOLERANCE` of
   float64 (relative, for the scaled rows' large ``lse``), and whether they are the
   bits of ``row_stats_triton`` at the scale's block size is counted.
2. ``target_stats.json``: ``row_stats`` (the Triton split reduction) on the GPU against
   float64 ``logsumexp`` and ``-sum p log p`` on the CPU, within 1e-5 nats, the edge
   rows (all ``-inf``, one-hot, ``NaN``) by their definitions.
3. ``benchmark.txt`` / ``benchmark.json``: ``ead_kernels.benchmark`` on the GPU: time
   per step against vLLM's plain temperature division, and the kernel's bandwidth as a
   share of a device-to-device copy of the same bytes (target >= 85 %).
4. ``entropy.txt`` / ``entropy.json``: ``ead_kernels.benchmark --entropy``: the
   entropy-clock and in-pass targets steps (their statistics in the scale's pass) and
   the entropy-type step (``row_stats`` first) against the plain EAD step (target for
   the entropy clock: at most 1.10x, reported, not part of the verdict).
5. ``summary.txt``: one line.

    python -m ead_kernels.gpu_check OUT [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from . import benchmark
from .target_stats import _apply_schedule_with_stats_triton, row_stats, row_stats_triton
from .temperature import _BLOCK_SIZE as SCALE_BLOCK_SIZE
from .temperature import (
    KIND_CONSTANT,
    KIND_EAD,
    KIND_ENTROPY,
    KIND_NONE,
    KIND_REVERSE,
    NUM_PARAMS,
    apply_schedule_torch_,
    apply_schedule_triton_,
)

BANDWIDTH_TARGET = 85.0  # % of a device-to-device copy, at the largest batch and vocabulary
CLOCK_TARGET = 1.10  # the entropy-clock step over the plain EAD step
STATS_TOLERANCE = 1e-5  # nats: fp32 sums of up to 152k terms, against float64


def _random_rows(rng: random.Random, count: int) -> tuple[list[int], list[int], list[list[float]]]:
    """Rows over warm-up edges, the anneal, both clamps and float64 ``exp`` overflow; the
    entropy type, and the annealed kinds on the entropy clock (``h_ref > 0``) a third
    of the time."""
    positions, kinds, params = [], [], []
    for _ in range(count):
        tau_max = rng.choice([1.2, 1.0, rng.uniform(0.3, 3.0)])
        tau_min = rng.choice([0.1, 0.8, rng.uniform(0.01, tau_max)])
        warmup = rng.choice([0, 10, rng.randrange(0, 500)])
        scale = rng.choice([1.0, 20.0]) * rng.choice([25.0, rng.uniform(0.5, 100)])
        positions.append(rng.choice([0, warmup, warmup + 1, rng.randrange(0, 4096),
                                     int(scale * math.log(1 + tau_max - tau_min)), int(scale * 709.8) + 1, 10**9]))
        kinds.append(rng.choice([KIND_NONE, KIND_EAD, KIND_REVERSE, KIND_CONSTANT, KIND_ENTROPY]))
        h_ref = rng.choice([0.0, 0.0, rng.uniform(0.1, 3.0)])
        params.append([tau_max, tau_min, rng.uniform(0.05, 2.0), float(warmup), scale,
                       rng.choice([3.0, rng.uniform(0.1, 12.0)]), rng.choice([1.0, rng.uniform(0.2, 4.0)]), h_ref])
    return positions, kinds, params


def random_entropies(rng: random.Random, count: int, vocab: int) -> tuple[list[float], list[float]]:
    """Per-row ``entropy`` (float32 values) and ``clock``: typical values and the extremes
    (0, ``log V``, ``NaN``, ``inf``; a clock of 0, past ``exp``'s overflow, ``inf``)."""
    entropy = [rng.choice([0.0, math.log(vocab), math.nan, math.inf, rng.uniform(0.0, 6.0), rng.uniform(0.0, 1.0)])
               for _ in range(count)]
    clock = [rng.choice([0.0, 1e300, math.inf, rng.uniform(0.0, 50.0), rng.uniform(0.0, 5000.0)]) for _ in range(count)]
    return entropy, clock


def reference_row_stats(rows: torch.Tensor) -> torch.Tensor:
    """``[n, 2]`` float64 ``(lse, entropy)`` of ``rows`` on the CPU: ``torch.logsumexp`` and
    ``-sum p log p`` with ``0 log 0 = 0`` (``torch.special.entr``), a row of all ``-inf``
    given entropy 0 (``target_stats``' definition; its softmax is NaN)."""
    x = rows.cpu().double()
    entropy = torch.special.entr(torch.softmax(x, -1)).sum(-1)
    entropy = torch.where(x.amax(-1) == -math.inf, 0.0, entropy)
    return torch.stack([torch.logsumexp(x, -1), entropy], 1)


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


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.cpu().contiguous().view(torch.int8), b.cpu().contiguous().view(torch.int8)))


def _stats_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest ``|got - want| / max(1, |want|)`` over the finite values of float64 ``want``;
    ``inf`` where the non-finite values differ."""
    got, want = got.cpu().double(), want.cpu().double()
    if not (torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
            and torch.equal(got[want.isinf()], want[want.isinf()])):
        return math.inf
    finite = want.isfinite()
    return float(((got - want).abs() / want.abs().clamp_min(1.0))[finite].max()) if finite.any() else 0.0


def check_fused_stats(logits: torch.Tensor, args: tuple[torch.Tensor, ...], per_row: dict[str, torch.Tensor],
                      want: torch.Tensor, got: torch.Tensor, device: torch.device, g: torch.Generator) -> dict:
    """``apply_schedule_with_stats_``'s Triton path on ``device`` for one correctness case:
    ``logits`` and ``want`` (the PyTorch path's result) on the CPU, ``got`` the plain
    kernel's on ``device``. The rows in a shuffled order: the first half (and one) before,
    all but the first quarter after, so the sets overlap (``KIND_NONE`` rows among them)."""
    batch = logits.shape[0]
    order = torch.randperm(batch, generator=g)
    raw_rows, scaled_rows = order[: batch // 2 + 1], order[batch // 4:]
    fused = logits.to(device, copy=True)
    raw, scaled = _apply_schedule_with_stats_triton(
        fused, *(a.to(device) for a in args), **{k: v.to(device) for k, v in per_row.items()},
        raw_rows=raw_rows.to(device), scaled_rows=scaled_rows.to(device))
    assert scaled is not None
    error = max(_stats_error(raw, reference_row_stats(logits[raw_rows])),
                _stats_error(scaled, reference_row_stats(want[scaled_rows])))
    as_row_stats = (_same_bits(raw, row_stats_triton(logits.to(device), raw_rows.to(device),
                                                     block_size=SCALE_BLOCK_SIZE))
                    and _same_bits(scaled, row_stats_triton(got, scaled_rows.to(device), block_size=SCALE_BLOCK_SIZE)))
    return {"fused_logits_as_kernel": _same_bits(fused, got), "fused_stats_max_rel_diff": error,
            "fused_stats_as_row_stats_triton": as_row_stats}


def check_correctness(device: torch.device, quick: bool) -> list[dict]:
    """Every (layout, dtype, batch, vocab, inputs) case: the Triton kernel on ``device``
    (compiled on a GPU; under ``TRITON_INTERPRET=1`` on the CPU, as the test suite runs
    it) vs the PyTorch path on the CPU. ``inputs`` is ``none`` (no ``entropy``/``clock``:
    the plain step's kernel) or ``entropy`` (both given); with ``entropy`` also the scale
    with its statistics (:func:`check_fused_stats`; ``quick``: the smallest shape only)."""
    cases = []
    shapes = [(1, 151936), (7, 49152), (64, 32003), (256, 4099)] if not quick else [(3, 2053), (16, 1000)]
    fused_shapes = shapes if not quick else shapes[:1]
    for dtype, layout, (batch, vocab), inputs in itertools.product(
            (torch.float32, torch.bfloat16, torch.float16), ("rows", "slots"), shapes, ("none", "entropy")):
        rng = random.Random(hash((str(dtype), layout, batch, vocab, inputs)) & 0xFFFF)
        positions, kinds, params = _random_rows(rng, batch if layout == "rows" else 2 * batch)
        entropy, clock = random_entropies(rng, batch, vocab)
        per_row = {} if inputs == "none" else {
            "entropy": torch.tensor(entropy, dtype=torch.float32), "clock": torch.tensor(clock, dtype=torch.float64)}
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
        want = apply_schedule_torch_(logits.clone(), *args, **per_row)
        got = apply_schedule_triton_(logits.to(device, copy=True), *(a.to(device) for a in args),
                                     **{k: v.to(device) for k, v in per_row.items()})
        result = {"layout": layout, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "vocab": vocab,
                  "inputs": inputs, **_compare(got, want)}
        result["ok"] = result["within_one_ulp_of_temperature"] == result["elements"]
        untouched = (kinds_t if layout == "rows" else kinds_t[slots.long()]) == KIND_NONE
        result["none_rows_identical"] = bool(torch.equal(got.cpu()[untouched].view(torch.int8),
                                                         logits[untouched].view(torch.int8)))
        result["ok"] &= result["none_rows_identical"]
        if inputs == "entropy" and (batch, vocab) in fused_shapes:  # Triton's interpreter is slow: fewer in tests
            result.update(check_fused_stats(logits, args, per_row, want, got, device, g))
            result["ok"] &= result["fused_logits_as_kernel"] and result["fused_stats_max_rel_diff"] <= STATS_TOLERANCE
        cases.append(result)
    return cases


def check_target_stats(device: torch.device, quick: bool) -> list[dict]:
    """``row_stats`` on ``device`` (every row or a subset, fp32 and bf16 logits, masked
    entries, a fully masked row, a one-hot row and a row with a ``NaN``) against
    :func:`reference_row_stats`: both columns within :data:`STATS_TOLERANCE`, the
    non-finite values equal."""
    cases = []
    shapes = [(1, 151936), (64, 49152), (256, 151936)] if not quick else [(3, 2053), (16, 1000)]
    for dtype in (torch.float32, torch.bfloat16):
        for batch, vocab in shapes:
            g = torch.Generator().manual_seed(batch * 7 + vocab)
            logits = torch.randn(batch, vocab, generator=g) * 8
            logits[:, ::11] = -math.inf
            if batch > 1:
                logits[-1] = -math.inf  # a fully masked row
                logits[0, :] = -math.inf  # a one-hot row
                logits[0, vocab // 2] = 3.0
            if batch > 2:
                logits[1, 7] = math.nan
            logits = logits.to(dtype)
            rows = torch.arange(batch) if batch < 4 else torch.randperm(batch, generator=g)[: batch // 2 + 1]
            if batch >= 4:
                rows[:3] = torch.tensor([0, 1, batch - 1])  # the edge rows, the rest a subset
            want = reference_row_stats(logits[rows])
            got = row_stats(logits.to(device), rows.to(device)).cpu().double()
            same = bool(torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()))
            finite = want.isfinite()
            diff = (got - want).abs().where(finite, 0.0)
            cases.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "vocab": vocab,
                          "rows": rows.numel(), "max_abs_diff_lse": float(diff[:, 0].max()),
                          "max_abs_diff_entropy": float(diff[:, 1].max()),
                          "ok": same and float(diff.max()) <= STATS_TOLERANCE})
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
    fused = [c["fused_stats_as_row_stats_triton"] for c in cases if "fused_stats_as_row_stats_triton" in c]
    fused_bits = f"{sum(fused)}/{len(fused)}"
    print(f"correctness: {len(cases) - len(failed)}/{len(cases)} cases ok; {exact:.6%} of elements bit-identical; "
          f"fused statistics bit-identical to row_stats_triton in {fused_bits} "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    for c in failed:
        print(f"  FAILED {c}", flush=True)

    stats = check_target_stats(device, args.quick)
    (args.out / "target_stats.json").write_text(json.dumps(stats, indent=1))
    stats_failed = [c for c in stats if not c["ok"]]
    worst = max(max(c["max_abs_diff_lse"], c["max_abs_diff_entropy"]) for c in stats)
    print(f"target statistics: {len(stats) - len(stats_failed)}/{len(stats)} cases within {STATS_TOLERANCE} nats "
          f"(max {worst:.2e})", flush=True)
    for c in stats_failed:
        print(f"  FAILED {c}", flush=True)

    sizes = ([1, 8, 64, 256], [49152, 151936]) if not args.quick else ([1, 64], [49152])
    results = benchmark.run(*sizes, torch.float32, warmup=20, repeats=50 if args.quick else 200, device=device)
    table = benchmark.format_table(results)
    print(table, flush=True)
    (args.out / "benchmark.txt").write_text(f"device: {name}\n{table}\n")
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=1))

    sizes = ([64, 128, 256], [49152, 151936]) if not args.quick else ([64], [49152])
    steps = benchmark.entropy_steps(*sizes, torch.float32, warmup=20, repeats=50 if args.quick else 200,
                                    device=device)
    table = benchmark.format_entropy_table(steps)
    print(table, flush=True)
    (args.out / "entropy.txt").write_text(f"device: {name}\n{table}\n")
    (args.out / "entropy.json").write_text(json.dumps(steps, indent=1))

    big = max(results, key=lambda r: (r["vocab"], r["batch"]))
    share = 100 * big["copy"] / big["triton"]
    verdict = "PASS" if not failed and not stats_failed and share >= BANDWIDTH_TARGET else "FAIL"
    step = max(steps, key=lambda r: (r["vocab"], r["batch"]))
    clock = "met" if step["clock/ead"] <= CLOCK_TARGET else "missed"
    summary = (f"gpu-check {verdict}: {name}; kernel vs oracle {len(cases) - len(failed)}/{len(cases)} cases "
               f"({exact:.4%} bit-identical; fused statistics as row_stats_triton's bits in {fused_bits}); "
               f"target statistics {len(stats) - len(stats_failed)}/{len(stats)}; batch {big['batch']} x vocab {big['vocab']} fp32: triton "
               f"{big['triton'] * 1e3:.1f} us = {big['triton'] / big['baseline']:.2f}x vLLM's division, "
               f"{share:.0f}% of copy bandwidth (target {BANDWIDTH_TARGET:.0f}%); batch {step['batch']} x vocab "
               f"{step['vocab']}: entropy-clock step (fused) {step['clock/ead']:.2f}x the EAD step "
               f"(target {CLOCK_TARGET:.2f}x: {clock}), entropy type {step['entropy/ead']:.2f}x, "
               f"in-pass targets (fused) {step['targets/ead']:.2f}x; "
               f"{time.monotonic() - started:.0f} s")
    print(summary, flush=True)
    (args.out / "summary.txt").write_text(summary + "\n")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
