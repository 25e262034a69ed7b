"""Per-step cost of the scheduled temperature next to vLLM's plain temperature op.

Every sampled step in vLLM already pays ``logits.div_(temp.unsqueeze(1))``; EAD replaces
that op, so the number that matters is its cost relative to that baseline, measured in
one run on one machine. Columns, each a median in microseconds and its ratio to (a) (the
median of the ratios of calls made in one pass, which a shared machine's load hits alike):

(a) ``base``: the baseline division;
(b) ``torch``: our PyTorch path on the V1 runner's row layout (schedule in float64
    plus the same division);
(c) ``slots``: the same on Model Runner V2's slot layout (rows mapped to request
    slots, ``t`` from ``pos`` and ``prompt_len``): Triton on a GPU, PyTorch elsewhere;
(d) ``triton``: the Triton kernel on the row layout (GPU only);
(e) ``naive``: a per-row Python processor in the style of the authors' released code
    (one temperature computed in Python and one division per row), the cost EAD has
    without a batched kernel; ``naive/torch`` is how many times faster our step is;
(f) ``stats``: what the in-pass target statistics add to (b) when every row asks for
    them: :func:`ead_kernels.apply_schedule_with_stats_` with every row before the rescale
    and after it (on a GPU in the scale's own pass, on a CPU ``row_stats``, the scale,
    ``row_stats``), timed in a loop of their own beside the step the processor runs
    (Triton on a GPU, (b) on a CPU), and reported as the difference.

On a GPU it also times a device-to-device copy of the same bytes (``copy``): the
kernel reads and writes each logit once, so ``copy / triton`` is the fraction of the
achievable bandwidth it reaches.

Each timed call starts from a fresh copy of the logits (copied outside the timed region)
so repeated in-place division cannot drift into denormals or infinities.

    python -m ead_kernels.benchmark                      # CPU: small defaults, < 1 min
    python -m ead_kernels.benchmark --batch-sizes 1 8 64 256 --repeats 50 --threads 1

``--entropy`` times instead the sampler steps of the entropy-aware schedules side by side
with the plain EAD step (:func:`entropy_steps`), each as a ratio to it; on a GPU the
target for the entropy-clock step (its statistics taken in the scale's pass) is 1.10x:

    python -m ead_kernels.benchmark --entropy                       # batches 64 128 256
    python -m ead_kernels.benchmark --entropy --batch-sizes 4 --vocab-sizes 1000   # smoke run

On GPU each call is timed with CUDA events on an otherwise idle stream, so host launch
latency counts: that is what the PyTorch path's handful of small ops costs per step.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch

from .temperature import (
    KIND_EAD,
    KIND_ENTROPY,
    NUM_PARAMS,
    P_H_REF,
    apply_schedule_,
    apply_schedule_slots_,
    apply_schedule_torch_,
    _device_temperatures,
    apply_schedule_triton_,
    schedule_temperatures,
    triton_available,
)
from .target_stats import apply_schedule_with_stats_, row_stats

Op = Callable[[torch.Tensor], object]


# Released-code EAD (tau_max, tau_min, tau, warmup, k * d) on the token clock, with the
# presets' h_max and exponent for the entropy type (ead_server.schedule; h_ref = 0 here).
PARAMS = (1.2, 0.1, 1.0, 10.0, 20.0 * 25.0, 4.0, 1.0, 0.0)
H_REF = 1.8  # the presets' h_ref, for the entropy clock


def _rows(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Released-code EAD rows at positions spread over warm-up, anneal and clamp."""
    g = torch.Generator().manual_seed(batch)
    positions = torch.randint(0, 1000, (batch,), generator=g)
    kinds = torch.full((batch,), KIND_EAD, dtype=torch.int32)
    params = torch.tensor([PARAMS], dtype=torch.float64).expand(batch, NUM_PARAMS)
    temps = torch.rand(batch, generator=g) + 0.1  # the baseline's per-row temperatures
    return positions.to(device), kinds.to(device), params.contiguous().to(device), temps.to(device)


def _slots(positions: torch.Tensor, kinds: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same rows in Model Runner V2's layout: a shuffled row -> slot map over a
    table twice the batch, with ``pos`` and ``prompt_len`` that give the same ``t``."""
    batch, device = positions.shape[0], positions.device
    g = torch.Generator().manual_seed(batch + 1)
    slots = torch.randperm(2 * batch, generator=g)[:batch].to(device=device, dtype=torch.int32)
    prompt_len = torch.randint(1, 4000, (2 * batch,), generator=g, dtype=torch.int32).to(device)
    table_kinds = torch.zeros(2 * batch, dtype=torch.int32, device=device)
    table_params = torch.ones(2 * batch, NUM_PARAMS, dtype=torch.float64, device=device)
    index = slots.long()
    table_kinds[index], table_params[index] = kinds, params
    pos = positions + prompt_len[index].long() - 1
    return slots, pos, prompt_len, table_kinds, table_params


def naive_processor(logits: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """One row at a time, the temperature computed in Python per row, as the authors'
    released code does in its vLLM logits processor (``annealed_sampling.py``)."""
    tau_max, tau_min, _, warmup, scale, *_ = PARAMS
    for row, t in enumerate(positions):
        temp = 1.0 if t < warmup else max(1.0 + tau_max - math.exp(t / scale), tau_min)
        logits[row].div_(temp)
    return logits


def with_target_stats(logits: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor,
                      params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The EAD step with the row statistics of the in-pass target log-probs before and
    after it, for every row, as the processor runs it when every request asks for them."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return apply_schedule_with_stats_(logits, positions, kinds, params, raw_rows=rows, scaled_rows=rows)


def _time_ms(op: Op, work: torch.Tensor, source: torch.Tensor) -> float:
    """One call on a fresh copy of the logits; the copy is not timed."""
    work.copy_(source)
    if source.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        op(work)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    op(work)
    return (time.perf_counter() - t0) * 1e3


def _timings_ms(ops: dict[str, Op], source: torch.Tensor, warmup: int, repeats: int) -> dict[str, list[float]]:
    """``repeats`` times per op, calling the ops in turn so that noise from a shared
    machine hits all alike: the ``i``-th times of all ops come from one pass."""
    work = source.clone()
    times: dict[str, list[float]] = {name: [] for name in ops}
    for i in range(warmup + repeats):
        for name, op in ops.items():
            elapsed = _time_ms(op, work, source)
            if i >= warmup:
                times[name].append(elapsed)
    return times


def _median_ms(ops: dict[str, Op], source: torch.Tensor, warmup: int, repeats: int) -> dict[str, float]:
    """Median per op (see :func:`_timings_ms`)."""
    return {name: statistics.median(values) for name, values in _timings_ms(ops, source, warmup, repeats).items()}


def _paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-pass ratios: on a shared machine the ops of one pass see the same
    load, so their ratio is steadier than the ratio of two medians."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def run(
    batch_sizes: list[int], vocab_sizes: list[int], dtype: torch.dtype, warmup: int, repeats: int, device: torch.device
) -> list[dict[str, float | int | None]]:
    """Time the three ops for every (vocab, batch); returns one dict per table row."""
    use_triton = device.type == "cuda" and triton_available()
    results = []
    for vocab in vocab_sizes:
        for batch in batch_sizes:
            positions, kinds, params, temps = _rows(batch, device)
            slot_args = _slots(positions, kinds, params)
            host_positions = positions.tolist()
            logits = (torch.randn(batch, vocab, device=device) * 8).to(dtype)
            copy_target = torch.empty_like(logits)
            ops: dict[str, Op] = {
                "baseline": lambda x: x.div_(temps.unsqueeze(1)),
                "torch": lambda x: apply_schedule_torch_(x, positions, kinds, params),
                "slots": lambda x: apply_schedule_slots_(x, *slot_args),
                "naive": lambda x: naive_processor(x, host_positions),
            }
            if use_triton:
                ops["triton"] = lambda x: apply_schedule_triton_(x, positions, kinds, params)
                ops["copy"] = lambda x: copy_target.copy_(x)
            row: dict[str, float | int | None] = {"batch": batch, "vocab": vocab, "triton": None, "copy": None}
            times = _timings_ms(ops, logits, warmup, repeats)
            row.update({name: statistics.median(values) for name, values in times.items()})
            ours = times["triton" if use_triton else "torch"]
            row.update({f"{name}/base": _paired_ratio(values, times["baseline"]) for name, values in times.items()})
            row["naive/ours"] = _paired_ratio(times["naive"], ours)
            # The statistics in a loop of their own: on a CPU their large temporaries
            # (page faults, evicted caches) would slow whichever op ran next. The step the
            # processor takes is timed beside them, and the difference is their cost.
            step: Op = lambda x: apply_schedule_(x, positions, kinds, params)  # Triton on a GPU
            paired = _median_ms({"step": step, "step+stats": lambda x: with_target_stats(x, positions, kinds, params)},
                                logits, warmup, repeats)
            row["stats"] = paired["step+stats"] - paired["step"]
            results.append(row)
            del logits
    return results


ENTROPY_STEPS = ("stats", "targets", "clock", "entropy")


def entropy_steps(
    batch_sizes: list[int], vocab_sizes: list[int], dtype: torch.dtype, warmup: int, repeats: int, device: torch.device
) -> list[dict[str, float | int]]:
    """The sampler steps of the entropy-aware schedules beside the plain EAD step
    (``--entropy``), every row scheduled and all of them in one pass (Triton on a GPU, the
    PyTorch paths elsewhere):

    * ``ead``: the plain EAD step, :func:`ead_kernels.apply_schedule_` (today's);
    * ``stats``: :func:`ead_kernels.target_stats.row_stats` of the raw rows alone;
    * ``targets``: the in-pass targets step, the EAD scale with ``row_stats`` of the raw and
      of the scaled rows (:func:`ead_kernels.apply_schedule_with_stats_`: one pass on a GPU);
    * ``clock``: the entropy-clock step, the EAD scale on the entropy clock (``h_ref > 0``,
      ``clock = sum_{i<t} H_i``) with ``row_stats`` of the raw rows (``H_t``, to advance
      the clock) in the same pass, and the clock's advance ``clock += H_t`` (one small op);
    * ``entropy``: the ``entropy`` type's step, ``row_stats`` raw first (``H_t`` is needed
      before the row can be scaled), then the scale with that entropy.

    Returns one dict per (vocab, batch): medians in ms and each step's ratio to ``ead``
    (medians of per-pass ratios).
    """
    results: list[dict[str, float | int]] = []
    for vocab in vocab_sizes:
        for batch in batch_sizes:
            positions, kinds, params, _ = _rows(batch, device)
            clocked = params.clone()
            clocked[:, P_H_REF] = H_REF
            clock = positions.to(torch.float64) * H_REF  # as if every token had h_ref nats
            entropic = torch.full_like(kinds, KIND_ENTROPY)
            rows = torch.arange(batch, device=device)
            logits = (torch.randn(batch, vocab, device=device) * 8).to(dtype)

            def clock_step(x: torch.Tensor) -> None:
                raw, _ = apply_schedule_with_stats_(x, positions, kinds, clocked, clock=clock, raw_rows=rows)
                clock.add_(raw[:, 1])

            ops: dict[str, Op] = {
                "ead": lambda x: apply_schedule_(x, positions, kinds, params),
                "stats": lambda x: row_stats(x, rows),
                "targets": lambda x: with_target_stats(x, positions, kinds, params),
                "clock": clock_step,
                "entropy": lambda x: apply_schedule_(x, positions, entropic, params, entropy=row_stats(x, rows)[:, 1]),
            }
            times = _timings_ms(ops, logits, warmup, repeats)
            row: dict[str, float | int] = {"batch": batch, "vocab": vocab}
            row.update({name: statistics.median(values) for name, values in times.items()})
            row.update({f"{name}/ead": _paired_ratio(times[name], times["ead"]) for name in ENTROPY_STEPS})
            results.append(row)
            del logits
    return results


def format_entropy_table(results: list[dict[str, float | int]]) -> str:
    """Medians in microseconds and each step's ratio to the plain EAD step."""
    header = f"{'vocab':>7} {'batch':>5} | {'ead us':>9} | " + " | ".join(
        f"{name + ' us':>10} {'x ead':>6}" for name in ENTROPY_STEPS)
    lines = [header, "-" * len(header)]
    for r in results:
        cells = [f"{r['vocab']:>7} {r['batch']:>5} | {float(r['ead']) * 1e3:>9.1f}"]
        cells += [f"{float(r[name]) * 1e3:>10.1f} {float(r[name + '/ead']):>6.2f}" for name in ENTROPY_STEPS]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def breakdown(
    batch_sizes: list[int], vocab_sizes: list[int], warmup: int, repeats: int
) -> list[dict[str, float | int]]:
    """Where the PyTorch step's time goes on a CPU (``--breakdown``): the schedule alone,
    as twenty torch ops (the device path, which the CPU took before numpy did it) and as
    it runs now, warm (called in a loop), and right after the logits were written (as in the table
    and in vLLM, where the model's output layer has just written them), and the division
    by the finished temperatures. The difference between the two schedule times is what
    the caches cost: the logits' writes evict the code and data of the small ops."""
    device = torch.device("cpu")
    results: list[dict[str, float | int]] = []
    for vocab in vocab_sizes:
        for batch in batch_sizes:
            positions, kinds, params, _ = _rows(batch, device)
            source = torch.randn(batch, vocab) * 8
            temps = schedule_temperatures(positions, kinds, params).to(torch.float32).unsqueeze(1)
            warm: list[float] = []
            torch_ops: list[float] = []  # the same schedule as torch ops (the device path), for comparison
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                schedule_temperatures(positions, kinds, params).to(torch.float32)
                t1 = time.perf_counter()
                _device_temperatures(positions, kinds, params).to(torch.float32)
                if i >= warmup:
                    warm.append((t1 - t0) * 1e3)
                    torch_ops.append((time.perf_counter() - t1) * 1e3)
            cold = _median_ms({
                "schedule": lambda x: schedule_temperatures(positions, kinds, params).to(torch.float32),
                "divide": lambda x: x.div_(temps),
                "step": lambda x: apply_schedule_torch_(x, positions, kinds, params),
            }, source, warmup, repeats)
            results.append({"vocab": vocab, "batch": batch, "schedule_warm": statistics.median(warm),
                            "schedule_torch_ops_warm": statistics.median(torch_ops),
                            "schedule_cold": cold["schedule"], "divide": cold["divide"], "step": cold["step"]})
    return results


def format_breakdown(results: list[dict[str, float | int]]) -> str:
    """The breakdown in microseconds."""
    header = (f"{'vocab':>7} {'batch':>5} | {'as torch ops, warm us':>21} | {'schedule warm us':>16} | "
              f"{'schedule after write us':>23} | {'divide us':>9} | {'step us':>9}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r['vocab']:>7} {r['batch']:>5} | {float(r['schedule_torch_ops_warm']) * 1e3:>21.1f} | "
                     f"{float(r['schedule_warm']) * 1e3:>16.1f} | "
                     f"{float(r['schedule_cold']) * 1e3:>23.1f} | {float(r['divide']) * 1e3:>9.1f} | "
                     f"{float(r['step']) * 1e3:>9.1f}")
    return "\n".join(lines)


COLUMNS = ("torch", "slots", "triton", "naive")


def format_table(results: list[dict[str, float | int | None]]) -> str:
    """Medians in microseconds, each path's ratio to the baseline and how many times faster
    our step is than the naive processor (medians of per-pass ratios), the in-pass
    statistics' own cost, and on a GPU the Triton kernel's bandwidth as a share of a copy
    of the same bytes."""
    header = f"{'vocab':>7} {'batch':>5} | {'base us':>9} | " + " | ".join(
        f"{name + ' us':>10} {'x base':>7}" for name in COLUMNS) + \
        f" | {'naive/ours':>10} | {'stats us':>9} {'x base':>7} | {'% copy bw':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        base = float(r["baseline"])  # type: ignore[arg-type]
        cells = [f"{r['vocab']:>7} {r['batch']:>5} | {base * 1e3:>9.1f}"]
        for name in COLUMNS:
            value = r[name]
            cells.append(f"{'-':>10} {'-':>7}" if value is None else
                         f"{float(value) * 1e3:>10.1f} {float(r[name + '/base']):>7.2f}")  # type: ignore[arg-type]
        cells.append(f"{float(r['naive/ours']):>10.2f}")  # type: ignore[arg-type]
        stats = float(r["stats"])  # type: ignore[arg-type]
        cells.append(f"{stats * 1e3:>9.1f} {stats / base:>7.2f}")
        share = None if r["copy"] is None or r["triton"] is None else 100 * float(r["copy"]) / float(r["triton"])
        cells.append(f"{'-':>9}" if share is None else f"{share:>9.0f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default 1 8 64 256; with --entropy 64 128 256")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[151936, 49152], help="Qwen, SmolLM2")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 3 CPU, 20 GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 15 CPU, 200 GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--breakdown", action="store_true",
                        help="CPU: also time the PyTorch step's parts (schedule warm and after the logits' write, "
                             "division)")
    parser.add_argument("--entropy", action="store_true",
                        help="time the entropy-aware schedules' steps (entropy clock, entropy type, in-pass targets) "
                             "beside the plain EAD step instead")
    args = parser.parse_args(argv)
    batch_sizes = args.batch_sizes or ([64, 128, 256] if args.entropy else [1, 8, 64, 256])
    if args.threads is not None:
        # On a small shared CPU, waking an OpenMP pool can cost milliseconds and hide the op.
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (20 if on_gpu else 3)
    repeats = args.repeats if args.repeats is not None else (200 if on_gpu else 15)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    note = "" if on_gpu and triton_available() else " (Triton skipped: no CUDA)"
    print(f"device: {name}; dtype {args.dtype}; median of {repeats} after {warmup} warm-up{note}")
    dtype = getattr(torch, args.dtype)
    if args.entropy:
        print(format_entropy_table(entropy_steps(batch_sizes, args.vocab_sizes, dtype, warmup, repeats, device)))
        return
    print(format_table(run(batch_sizes, args.vocab_sizes, dtype, warmup, repeats, device)))
    if args.breakdown and not on_gpu:
        print("\nthe PyTorch step's parts (CPU):")
        print(format_breakdown(breakdown(batch_sizes, args.vocab_sizes, warmup, repeats)))


if __name__ == "__main__":
    main()
