"""From graded pools to the numbers of ``results.json`` (schema in ``docs/benchmark.md``).

Every metric is first computed per problem, then averaged over problems with a
percentile-bootstrap interval. The bootstrap draws the same problem resamples for every
schedule, so the intervals of differences to the baseline (the first schedule) are paired.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ead_server.bench.config import BenchSchedule
from ead_server.bench.metrics import (
    VotePool,
    bootstrap_indices,
    bootstrap_mean,
    majority_at_n,
    majority_first_k,
    pass_at_k,
    tool_first_k,
    vote,
    worst_at_k,
)
from ead_server.schedule import ANNEALED_TYPES, ResolvedSchedule

__all__ = ["SCHEMA_VERSION", "WARMUP_MAJORITY", "summarize", "token_shares"]

SCHEMA_VERSION = 1
# Above this share of tokens inside the warm-up, the report says that an annealed
# schedule cannot differ from temperature 1.0.
WARMUP_MAJORITY = 0.5


def token_shares(resolved: ResolvedSchedule, lengths: Sequence[int],
                 temperatures: Sequence[Sequence[float] | None] | None = None) -> dict[str, float | int]:
    """Shares of all sampled tokens taken inside the warm-up, while hot (tau > 1) and while
    cold (tau < 1), from the schedule's own temperatures for each completion's length. An
    entropy-driven schedule's temperatures differ per completion: the engine's, as each
    sample recorded them (``temperatures``, one list per completion, beside ``lengths``)."""
    warmup = resolved.warmup if resolved.type in ANNEALED_TYPES else 0
    if resolved.entropy_driven:
        if temperatures is None or any(t is None for t, n in zip(temperatures, lengths) if n):
            raise ValueError(f"{resolved.type}: an entropy-driven schedule's token shares need the temperatures "
                             f"the server reported with each sample")
        runs = [np.asarray(t[:n]) for t, n in zip(temperatures, lengths) if n]  # type: ignore[index]
        total = sum(len(r) for r in runs)
        shares = {"warmup": sum(min(len(r), warmup) for r in runs), "hot": sum(int((r > 1.0).sum()) for r in runs),
                  "cold": sum(int((r < 1.0).sum()) for r in runs)}
        return {"tokens": total, **{name: count / total if total else 0.0 for name, count in shares.items()}}
    lengths = [n for n in lengths if n]
    total = sum(lengths)
    if not total:
        return {"tokens": 0, "warmup": 0.0, "hot": 0.0, "cold": 0.0}
    temps = np.asarray(resolved.temperatures(max(lengths)))
    warm = np.arange(len(temps)) < warmup
    # Counts over the first n tokens, for every n at once.
    prefix = {name: np.concatenate([[0], np.cumsum(mask)]) for name, mask in
              (("warmup", warm), ("hot", temps > 1.0), ("cold", temps < 1.0))}
    return {"tokens": total, **{name: float(sum(p[n] for n in lengths) / total) for name, p in prefix.items()}}


def _interval(values: Sequence[float], indices: np.ndarray, confidence: float) -> dict[str, float]:
    return bootstrap_mean(values, indices, confidence).as_dict()


def summarize(
    *,
    config: Mapping[str, Any],
    schedules: Sequence[BenchSchedule],
    problem_ids: Sequence[str],
    pools: Mapping[tuple[str, str], VotePool],
    samples: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
    extraction_methods: Mapping[tuple[str, str], Sequence[str]],
    ns: Sequence[int],
    seed: int,
    resamples: int = 1000,
    confidence: float = 0.95,
    maj_subsets: int = 1000,
    grading: Mapping[str, Any] | None = None,
    answers: Mapping[tuple[str, str], Sequence[str | None]] | None = None,
    compare_with: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``results.json`` document. ``pools``, ``samples``, ``extraction_methods`` and
    ``answers`` (the extracted answer texts, needed only for ``compare_with``) are keyed by
    ``(problem_id, schedule label)`` and hold the pool in sample order.

    ``maj`` is the subset-averaged Maj@N, ``maj_first`` the vote of the first k samples
    (what other tools report), and ``compare[tool]`` the first-k vote under each tool of
    ``compare_with`` (see :data:`ead_server.bench.metrics.TOOLS`)."""
    if compare_with and answers is None:
        raise ValueError("compare_with needs the extracted answers")
    answer_texts = answers or {}
    indices = bootstrap_indices(len(problem_ids), resamples, seed)
    per_problem: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    values: dict[str, dict[str, list[float]]] = {}
    for si, schedule in enumerate(schedules):
        v: dict[str, list[float]] = {"accuracy": [], "classes": [], "tokens": []}
        lengths: list[int] = []
        temperatures: list[Sequence[float] | None] = []
        finish: Counter[str] = Counter()
        methods: Counter[str] = Counter()
        for pi, pid in enumerate(problem_ids):
            pool = pools[(pid, schedule.label)]
            size, m = pool.size, pool.n_correct
            maj = {}
            maj_first = {}
            compare: dict[str, dict[int, float]] = {tool: {} for tool in compare_with}
            for n in ns:
                rng = np.random.default_rng([seed, pi, si, n])
                maj[n] = majority_at_n(pool, n, max_subsets=maj_subsets, rng=rng).value
                v.setdefault(f"maj@{n}", []).append(maj[n])
                maj_first[n] = float(majority_first_k(pool, n))
                v.setdefault(f"maj_first@{n}", []).append(maj_first[n])
                for tool in compare_with:
                    compare[tool][n] = float(tool_first_k(answer_texts[(pid, schedule.label)], pool.correct, n, tool))
                    v.setdefault(f"{tool}@{n}", []).append(compare[tool][n])
                v.setdefault(f"pass@{n}", []).append(pass_at_k(size, m, n))
                v.setdefault(f"worst@{n}", []).append(worst_at_k(size, m, n))
            classes = vote(pool, range(size))[1]
            pool_samples = samples[(pid, schedule.label)]
            pool_lengths = [s.get("n_tokens") or 0 for s in pool_samples]
            lengths += pool_lengths
            temperatures += [s.get("temperatures") for s in pool_samples]
            finish.update(str(s.get("finish_reason")) for s in pool_samples)
            methods.update(extraction_methods[(pid, schedule.label)])
            v["accuracy"].append(m / size)
            v["classes"].append(classes)
            v["tokens"].append(float(np.mean(pool_lengths)))
            per_problem.append({
                "problem_id": pid, "schedule": schedule.label, "samples": size, "correct": m,
                "classes": classes, "maj": {str(n): maj[n] for n in ns},
                "maj_first": {str(n): maj_first[n] for n in ns},
                **({"compare": {tool: {str(n): c[n] for n in ns} for tool, c in compare.items()}}
                   if compare_with else {}),
            })
        values[schedule.label] = v
        entry: dict[str, Any] = {
            "label": schedule.label,
            "spec": schedule.spec,
            "resolved": schedule.resolved.model_dump(mode="json"),
            "samples": len(lengths),
            "mean_accuracy": _interval(v["accuracy"], indices, confidence),
            "maj": {str(n): _interval(v[f"maj@{n}"], indices, confidence) for n in ns},
            "maj_first": {str(n): _interval(v[f"maj_first@{n}"], indices, confidence) for n in ns},
            "pass": {str(n): _interval(v[f"pass@{n}"], indices, confidence) for n in ns},
            "worst": {str(n): _interval(v[f"worst@{n}"], indices, confidence) for n in ns},
            "distinct_classes": _interval(v["classes"], indices, confidence),
            "response_tokens": _interval(v["tokens"], indices, confidence),
            "finish_reasons": dict(finish),
            "extraction": dict(methods),
            "token_shares": token_shares(schedule.resolved, lengths, temperatures),
            "anneal_end_token": schedule.resolved.anneal_end(),
            "vs_baseline": None,
        }
        if compare_with:
            entry["compare"] = {tool: {str(n): _interval(v[f"{tool}@{n}"], indices, confidence) for n in ns}
                                for tool in compare_with}
        entries.append(entry)

    base = schedules[0].label
    for entry in entries[1:]:
        own, ref = values[entry["label"]], values[base]
        diff = {key: np.subtract(own[key], ref[key]) for key in own}
        entry["vs_baseline"] = {
            "baseline": base,
            "mean_accuracy": _interval(diff["accuracy"], indices, confidence),
            "maj": {str(n): _interval(diff[f"maj@{n}"], indices, confidence) for n in ns},
            "maj_first": {str(n): _interval(diff[f"maj_first@{n}"], indices, confidence) for n in ns},
            "pass": {str(n): _interval(diff[f"pass@{n}"], indices, confidence) for n in ns},
        }

    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dict(config),
        "settings": {
            "ns": list(ns),
            "bootstrap": {"resamples": resamples, "confidence": confidence, "seed": seed, "unit": "problem"},
            "maj_max_subsets": maj_subsets,
            "compare_with": list(compare_with),
        },
        "n_problems": len(problem_ids),
        "grading": dict(grading or {}),
        "schedules": entries,
        "per_problem": per_problem,
    }
