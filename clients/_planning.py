"""Request planning: from one ``rollouts()`` call to the request bodies that carry it.

Everything here is decided before anything is sent, so that a wrong call raises at once
(``ValueError``, ``TypeError``, or ``ScheduleError`` naming the field) instead of as a
server's 400 halfway through a batch: the inputs are checked, the schedule and the
trainer's step are merged and resolved locally, and the prompts are cut into requests
that fit every server's published limits and keep seeded sampling independent of how the
call is split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ead_server.schedule import DecaySchedule, ScheduleError, TemperatureSchedule, parse_schedule

__all__ = ["SPLIT_LIMITS", "Chunk", "check_int", "effective_limits", "merge_schedule", "plan_rollouts"]

# The limits of GET /v1/limits that decide how a call is split into requests.
SPLIT_LIMITS = ("max_prompts_per_request", "max_n", "max_sequences_per_request", "max_body_bytes")


@dataclass(frozen=True)
class Chunk:
    """Prompts ``[start, stop)`` of the caller's list, sent as one request."""

    start: int
    stop: int
    body: dict[str, Any]

    @property
    def indices(self) -> list[int]:
        return list(range(self.start, self.stop))


def check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def merge_schedule(
    schedule: TemperatureSchedule | Mapping[str, Any] | None, step: int | None
) -> TemperatureSchedule | None:
    """The schedule to send, with ``step`` folded into ``decay_schedule.step``.

    * no schedule, no step: unscheduled sampling;
    * step without a schedule: the ``paper`` preset at that step;
    * a schedule with a fixed ``decay`` and a step: error (the step would do nothing);
    * a step here and a different ``decay_schedule.step`` in the schedule: error.

    The result is resolved locally, so an invalid schedule raises ``ScheduleError``
    (naming the field) before anything is sent.
    """
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ScheduleError("decay_schedule.step", f"step must be a non-negative int, got {step!r}")
    if schedule is None:
        if step is None:
            return None
        spec = TemperatureSchedule(preset="paper", decay_schedule=DecaySchedule(step=step))
    elif isinstance(schedule, TemperatureSchedule):
        spec = schedule
    elif isinstance(schedule, Mapping):
        parse_schedule(dict(schedule))  # raises ScheduleError naming the field
        spec = TemperatureSchedule.model_validate(dict(schedule))
    else:
        raise TypeError(f"schedule must be a TemperatureSchedule, a dict or None, got {type(schedule).__name__}")
    if step is not None and schedule is not None:
        if spec.decay is not None:
            raise ScheduleError(
                "decay", f"step={step} has no effect with a fixed 'decay'; use 'decay_schedule' or drop step"
            )
        given = spec.decay_schedule.step if spec.decay_schedule is not None else None
        if given is not None and given != step:
            raise ScheduleError(
                "decay_schedule.step", f"schedule says step {given} but step={step} was passed; give it once"
            )
        ds = spec.decay_schedule.model_dump(exclude_none=True) if spec.decay_schedule else {}
        spec = TemperatureSchedule.model_validate(
            {**spec.model_dump(exclude_none=True), "decay_schedule": {**ds, "step": step}}
        )
    spec.resolve()  # cross-field checks (tau_min <= tau_max, d_max >= d0, ...)
    return spec


def check_inputs(prompts: Any, messages: Any) -> tuple[str, list[Any]]:
    """``("prompts", items)`` or ``("messages", items)``: exactly one of the two, a
    non-empty list of strings or token-id lists, or of conversations; each entry copied
    into plain lists and dicts for the JSON body."""
    if (prompts is None) == (messages is None):
        raise ValueError("give exactly one of prompts= or messages=")
    key, items = ("prompts", prompts) if prompts is not None else ("messages", messages)
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise TypeError(f"{key} must be a list (one entry per prompt), got {type(items).__name__}")
    items = list(items)
    if not items:
        raise ValueError(f"{key} is empty")
    for i, item in enumerate(items):
        if key == "prompts":
            ok = isinstance(item, str) or (
                isinstance(item, Sequence)
                and not isinstance(item, (str, bytes))
                and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
            )
            if not ok:
                raise TypeError(
                    f"prompts[{i}] must be a string or a list of token ids, got {type(item).__name__}"
                    + ("; to send token ids, pass a list of lists" if isinstance(item, int) else "")
                )
            if not isinstance(item, str):
                items[i] = list(item)
        else:
            is_conversation = isinstance(item, Sequence) and not isinstance(item, str)
            if not (is_conversation and all(isinstance(m, Mapping) for m in item)):
                raise TypeError(f"messages[{i}] must be a list of {{'role': ..., 'content': ...}} dicts")
            items[i] = [dict(m) for m in item]
    return key, items


def effective_limits(per_server: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The tightest of the known servers' limits, key by key: a request must fit
    whichever server it goes to (fail-over included)."""
    out: dict[str, int] = {}
    for limits in per_server:
        for key, value in limits.items():
            out[key] = min(value, out.get(key, value))
    return out


def plan_chunks(
    key: str,
    items: list[Any],
    seed: int | None,
    common: dict[str, Any],
    *,
    limits: Mapping[str, int],
    chunk_size: int | None,
    max_concurrency: int,
) -> list[Chunk]:
    """Split one call into requests.

    Unseeded: ``chunk_size`` prompts per request (default ``ceil(P / max_concurrency)``).
    Seeded: one prompt per request with seed ``seed + prompt_index``, so prompt ``i``'s
    samples are exactly those of a single-prompt request seeded ``seed + i`` however
    the call is split, retried or failed over, and whatever the server count.
    Either way a request stays within ``limits`` (the servers' ``GET /v1/limits``,
    :func:`effective_limits`): at most ``max_prompts_per_request`` prompts,
    ``max_sequences_per_request`` prompts x n, and ``max_body_bytes``; an ``n`` no
    request can hold raises ``ValueError`` before anything is sent.
    """
    total = len(items)
    n = common.get("n", 1)
    most = min(limits.get("max_n", n), limits.get("max_sequences_per_request", n))
    if n > most:
        raise ValueError(f"n={n} is more than one request may ask for on these servers (max_n="
                         f"{limits.get('max_n')}, max_sequences_per_request={limits.get('max_sequences_per_request')}"
                         f", GET /v1/limits)")
    cap = min(limits.get("max_prompts_per_request", total), limits.get("max_sequences_per_request", total * n) // n)
    if seed is not None:
        size = 1
    else:
        size = min(chunk_size or max(1, math.ceil(total / max_concurrency)), max(cap, 1))
    budget = limits.get("max_body_bytes")
    overhead = len(json.dumps({key: [], **common, "seed": 0})) if budget else 0
    chunks = []
    start = 0
    while start < total:
        stop = min(start + size, total)
        if budget:  # fewer prompts when their JSON would not fit the body limit (one always goes)
            used, fits = overhead, start
            while fits < stop:
                used += len(json.dumps(items[fits])) + 2
                if used > budget and fits > start:
                    break
                fits += 1
            stop = fits
        body = {key: items[start:stop], **common}
        if seed is not None:
            body["seed"] = seed + start
        chunks.append(Chunk(start, stop, body))
        start = stop
    return chunks


def plan_rollouts(
    prompts: Any,
    messages: Any,
    *,
    n: int,
    max_tokens: int,
    schedule: TemperatureSchedule | Mapping[str, Any] | None,
    step: int | None,
    stop: str | Sequence[str] | None,
    seed: int | None,
    top_p: float | None,
    top_k: int | None,
    return_target_logprobs: bool,
    model: str | None,
    return_entropy: bool = False,
    limits: Mapping[str, int],
    chunk_size: int | None,
    max_concurrency: int,
) -> list[Chunk]:
    """The requests of one ``rollouts()`` call: its arguments checked, the schedule
    merged with ``step``, unset options left out of the body, and the prompts split by
    :func:`plan_chunks`."""
    key, items = check_inputs(prompts, messages)
    check_int("n", n, minimum=1)
    check_int("max_tokens", max_tokens, minimum=1)
    if seed is not None:
        check_int("seed", seed, minimum=0)
    spec = merge_schedule(schedule, step)
    common: dict[str, Any] = {
        "n": n,
        "max_tokens": max_tokens,
        "return_target_logprobs": bool(return_target_logprobs),
    }
    if return_entropy:
        common["return_entropy"] = True
    optional = {
        "stop": [stop] if isinstance(stop, str) else (list(stop) if stop is not None else None),
        "top_p": top_p,
        "top_k": top_k,
        "model": model,
        "temperature_schedule": spec.model_dump(exclude_none=True) if spec is not None else None,
    }
    common.update({k: v for k, v in optional.items() if v is not None})
    return plan_chunks(key, items, seed, common, limits=limits, chunk_size=chunk_size, max_concurrency=max_concurrency)
