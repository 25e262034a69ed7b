"""Target log-probs from the sampling pass itself, with no second (scoring) pass.

While the processor rescales a row ``h -> h / tau`` it can also take two numbers, ``lse(h)``
and ``lse(h / tau)``. vLLM then returns the behaviour log-prob ``b = h[y] / tau -
lse(h / tau)`` of the sampled token ``y`` (``processed_logprobs``), so

    h[y] = tau * (b + lse(h / tau))        and        log softmax(h)[y] = h[y] - lse(h),

the target (temperature-1, untruncated) log-prob, exactly -- provided nothing else
changes the logits before or after the processor: no top-k, top-p, min-p, penalties,
``logit_bias``, ``allowed_token_ids``, bad words, ``min_tokens`` or structured outputs
(:func:`eligible`). Other requests keep the scoring pass.

How the numbers travel, through vLLM's own mechanisms only:

* a request asks by carrying :data:`TARGET_KEY` (an id) in ``SamplingParams.extra_args``;
  vLLM gives the ``n > 1`` samples of a request their parent's ``extra_args``, so the
  seed patch (:mod:`.seeds`) appends the sample index to each child's id;
* the processor, in the worker process, records each step's two numbers per asking row
  in :data:`STORE`, on the device (no per-step copy to the host, no sync);
* the server collects them once the request is done with
  ``engine.collective_rpc("ead_collect_targets", args=(ids,))``, a worker method this
  module adds to vLLM's workers as a ``vllm.general_plugins`` entry point (so users keep
  ``--worker-extension-cls`` for their own);
* values nobody collects (a client that disconnected) are dropped after
  ``$EAD_TARGETS_TTL_S`` seconds (default 600).

With ``--data-parallel-size > 1`` a ``collective_rpc`` reaches only the first engine, so
the server uses the scoring pass there (:func:`in_pass_possible`).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["STORE", "TARGET_KEY", "TargetStore", "child_id", "collect", "eligible", "in_pass_possible", "register",
           "sample_ids", "targets_from"]

TARGET_KEY = "ead_target_id"
"""The ``extra_args`` key of a request that wants in-pass target log-probs."""

COLLECT_METHOD = "ead_collect_targets"


@dataclass
class _Step:
    """One sampling step's numbers for the rows that asked: ``values[i] = (lse(h),
    lse(h / tau))`` of token ``positions[i]`` of request ``ids[i]`` (device tensor)."""

    ids: list[str]
    positions: list[int]
    values: Any
    when: float = field(default_factory=time.monotonic)


class TargetStore:
    """The worker-side record, kept until collected or until its time-to-live runs out."""

    def __init__(self, ttl_s: float | None = None) -> None:
        self.ttl_s = float(os.environ.get("EAD_TARGETS_TTL_S", 600)) if ttl_s is None else ttl_s
        self._steps: deque[_Step] = deque()

    def __len__(self) -> int:
        return sum(len(step.ids) for step in self._steps)

    def record(self, ids: list[str], positions: list[int], values: Any) -> None:
        self._steps.append(_Step(ids, positions, values))
        self._expire()

    def collect(self, wanted: list[str]) -> dict[str, dict[int, tuple[float, float]]]:
        """The recorded numbers of ``wanted`` ids, by position (a later step wins: a
        preempted request samples its position again), and forget them."""
        wanted_set, out = set(wanted), {i: {} for i in wanted}
        kept: deque[_Step] = deque()
        for step in self._steps:
            hits = [j for j, i in enumerate(step.ids) if i in wanted_set]
            if hits:
                values = step.values.tolist()  # one device-to-host copy per step, at collection
                for j in hits:
                    out[step.ids[j]][step.positions[j]] = tuple(values[j])
                rest = [j for j in range(len(step.ids)) if j not in set(hits)]
                if not rest:
                    continue
                step = _Step([step.ids[j] for j in rest], [step.positions[j] for j in rest],
                             step.values[rest], step.when)
            kept.append(step)
        self._steps = kept
        return out

    def _expire(self) -> None:
        deadline = time.monotonic() - self.ttl_s
        while self._steps and self._steps[0].when < deadline:
            self._steps.popleft()


STORE = TargetStore()
"""This worker process's store (the processor records into it, the worker method reads it)."""


def sample_ids(request_id: str, n: int) -> list[str]:
    """The ids a request's samples record under: the request's own for ``n == 1``, one
    per sample otherwise (:func:`child_id`, given by the seed patch to vLLM's fan-out)."""
    return [request_id] if n == 1 else [child_id(request_id, i) for i in range(n)]


def child_id(request_id: str, index: int) -> str:
    return f"{request_id}:{index}"


async def collect(engine: Any, ids: list[str]) -> dict[str, dict[int, tuple[float, float]]]:
    """The recorded numbers of ``ids`` from the engine's (first) worker, forgotten there."""
    answers = await engine.collective_rpc(COLLECT_METHOD, args=(ids,))
    return answers[0]


def eligible(params: Any) -> bool:
    """Whether the in-pass formula is exact for a request: nothing but the EAD processor
    and vLLM's temperature (1 under a schedule) touches its logits."""
    return (params.top_k in (0, -1) and params.top_p >= 1.0 and params.min_p <= 0.0
            and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and not params.logit_bias and not params.allowed_token_ids
            and not params.bad_words and params.min_tokens == 0 and params.structured_outputs is None)


def in_pass_possible(engine: Any) -> bool:
    """The engine can return in-pass values: one data-parallel rank (``collective_rpc``
    answers from the first engine only) and no speculative decoding (several rows per
    request, not all of them sampled)."""
    config = engine.vllm_config
    return config.parallel_config.data_parallel_size == 1 and config.speculative_config is None


def targets_from(values: dict[int, tuple[float, float]], behaviour: list[float],
                 temperatures: list[float]) -> list[float] | None:
    """Target log-probs of one completion from its recorded numbers, or ``None`` if a
    position is missing (then the caller scores instead)."""
    if any(t not in values for t in range(len(behaviour))):
        return None
    lse = np.array([values[t] for t in range(len(behaviour))], dtype=np.float64).reshape(-1, 2)
    tau = np.asarray(temperatures, dtype=np.float32).astype(np.float64)  # the kernel divides by float32(tau)
    return (tau * (np.asarray(behaviour, dtype=np.float64) + lse[:, 1]) - lse[:, 0]).tolist()


def _collect(worker: Any, ids: list[str]) -> dict[str, dict[int, tuple[float, float]]]:
    return STORE.collect(list(ids))


def register() -> None:
    """The ``vllm.general_plugins`` entry point: give vLLM's workers the collect method.

    Runs in every vLLM process; only adds a method, so it is harmless where unused."""
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, COLLECT_METHOD):
        setattr(WorkerBase, COLLECT_METHOD, _collect)
