"""Target log-probs, entropies and temperatures from the sampling pass itself, with no
second (scoring) pass.

While the processor rescales a row ``h -> h / tau`` it can also take two numbers, ``lse(h)``
and ``lse(h / tau)``. vLLM then returns the behaviour log-prob ``b = h[y] / tau -
lse(h / tau)`` of the sampled token ``y`` (``processed_logprobs``), so

    h[y] = tau * (b + lse(h / tau))        and        log softmax(h)[y] = h[y] - lse(h),

the target (temperature-1, untruncated) log-prob, exactly -- provided nothing else
changes the logits before or after the processor: no top-k, top-p, min-p, penalties,
``logit_bias``, ``allowed_token_ids``, bad words, ``min_tokens`` or structured outputs
(``request_contract.eligible_for_in_pass``). Other requests keep the scoring pass.

How the numbers travel, through vLLM's own mechanisms only:

* a request asks by carrying ``request_contract.TARGET_KEY`` (an id, by the contract's
  id scheme) in ``SamplingParams.extra_args``; vLLM gives the ``n > 1`` samples of a
  request their parent's ``extra_args``, so the seed patch (:mod:`.seeds`) gives each
  child its sample id;
* the processor, in the worker process, records each step's numbers per asking row in
  :data:`STORE`, on the device (no per-step copy to the host, no sync): the :data:`VALUES`
  ``lse(h)``, ``H(h)``, ``lse(h / tau)``, ``H(h / tau)`` and ``tau`` itself, which the host
  cannot recompute for an entropy-driven schedule;
* the server collects them once the request is done with
  ``engine.collective_rpc("ead_collect_targets", args=(ids,))``, a worker method this
  module adds to vLLM's workers as a ``vllm.general_plugins`` entry point (so users keep
  ``--worker-extension-cls`` for their own);
* values nobody collects (a client that disconnected) are dropped after
  ``$EAD_TARGETS_TTL_S`` seconds (default 600).

With ``--data-parallel-size > 1`` a ``collective_rpc`` reaches only the first engine, so
the server uses the scoring pass there (``request_contract.in_pass_possible``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["STORE", "VALUES", "Recorded", "TargetStore", "collect", "recorded_column", "register", "targets_from"]

COLLECT_METHOD = "ead_collect_targets"

VALUES = ("lse", "entropy", "lse_tau", "entropy_tau", "tau")
"""What a row records, in order: ``lse(h)`` and ``H(softmax(h))`` before the scale,
``lse(h / tau)`` and the behaviour entropy ``H(softmax(h / tau))`` after it, and the
float64 temperature ``tau`` the kernel divided by (before its float32 rounding)."""
LSE, ENTROPY, LSE_TAU, ENTROPY_TAU, TAU = range(len(VALUES))

Recorded = dict[int, tuple[float, ...]]
"""One sample's recorded :data:`VALUES`, by position."""


@dataclass(eq=False)
class _Step:
    """One sampling step's numbers for the rows that asked: ``values[i]`` (the
    :data:`VALUES`) of token ``positions[i]`` of request ``ids[i]`` (device tensor)."""

    ids: list[str]
    positions: list[int]
    values: Any
    when: float
    pending: int = 0  # rows not yet collected; the step is dropped at 0
    _host: list[list[float]] | None = None

    def host(self) -> list[list[float]]:
        """The values on the host: one device-to-host copy per step, at its first collection."""
        if self._host is None:
            self._host = self.values.tolist()
        return self._host


class TargetStore:
    """The worker-side record, kept until collected or until its time-to-live runs out.

    Indexed by id, so that a collection costs the collected tokens only: a scan of every
    stored step per collection grew with concurrency times length (at c = 64 and 32
    tokens it was 0.6 ms per call, in the engine's loop; quadratic at RL lengths).
    """

    def __init__(self, ttl_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = float(os.environ.get("EAD_TARGETS_TTL_S", 600)) if ttl_s is None else ttl_s
        self.clock = clock  # seconds; tests pass their own
        self._steps: deque[_Step] = deque()  # in recording order, for the time-to-live
        self._rows: dict[str, list[tuple[_Step, int]]] = {}  # id -> its (step, row) entries

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    def record(self, ids: list[str], positions: list[int], values: Any) -> None:
        step = _Step(ids, positions, values, self.clock(), pending=len(ids))
        self._steps.append(step)
        for row, request in enumerate(ids):
            self._rows.setdefault(request, []).append((step, row))
        self._expire()

    def collect(self, wanted: list[str]) -> dict[str, Recorded]:
        """The recorded numbers of ``wanted`` ids, by position (a later step wins: a
        preempted request samples its position again), and forget them."""
        out: dict[str, Recorded] = {}
        for request in wanted:
            values = out.setdefault(request, {})
            for step, row in self._rows.pop(request, ()):
                values[step.positions[row]] = tuple(step.host()[row])
                step.pending -= 1
        self._expire()
        return out

    def _expire(self) -> None:
        """Drop the oldest steps that are fully collected or past their time-to-live (and
        the entries of the latter's uncollected rows)."""
        deadline = self.clock() - self.ttl_s
        while self._steps and (self._steps[0].pending == 0 or self._steps[0].when < deadline):
            step = self._steps.popleft()
            for request in set(step.ids) if step.pending else ():
                rows = [entry for entry in self._rows.get(request, ()) if entry[0] is not step]
                if rows:
                    self._rows[request] = rows
                else:
                    self._rows.pop(request, None)


STORE = TargetStore()
"""This worker process's store (the processor records into it, the worker method reads it)."""


class _Batch:
    def __init__(self, engine: Any) -> None:
        self.ids: list[str] = []
        self.answer: asyncio.Future[dict[str, Recorded]] = (
            asyncio.get_running_loop().create_future())
        # A task starts after the callbacks already due in this turn of the loop: the
        # requests woken by the same engine step join the batch before it is sent.
        self.sending = asyncio.ensure_future(self._send(engine))

    async def _send(self, engine: Any) -> None:
        del _batches[id(engine)]
        try:
            answers = await engine.collective_rpc(COLLECT_METHOD, args=(self.ids,))
            self.answer.set_result(answers[0])
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets the engine's error
            self.answer.set_exception(exc)
            self.answer.exception()  # retrieved: the callers may all have gone
        finally:
            if not self.answer.done():  # cancelled (shutdown)
                self.answer.cancel()


_batches: dict[int, _Batch] = {}  # id(engine) -> the collection being gathered for it


async def collect(engine: Any, ids: list[str]) -> dict[str, Recorded]:
    """The recorded numbers of ``ids`` from the engine's (first) worker, forgotten there.

    Why batched: a ``collective_rpc`` is a round trip through the engine's busy loop, which
    does not step meanwhile, and the requests of one step (rollouts of one length, above
    all) finish together. So the collections asked for in one turn of the event loop go
    out as one call.
    """
    batch = _batches.get(id(engine))
    if batch is None:
        batch = _batches[id(engine)] = _Batch(engine)
    batch.ids.extend(ids)
    answer = await asyncio.shield(batch.answer)  # a cancelled caller must not cancel the others'
    return {i: answer.get(i, {}) for i in ids}


def recorded_column(values: Recorded | None, column: int, count: int) -> list[float | None] | None:
    """One of the :data:`VALUES` for tokens ``0 .. count - 1``, ``None`` for a ``NaN``
    (a row of ``NaN`` logits), or ``None`` as a whole if a position is missing."""
    if values is None or any(t not in values for t in range(count)):
        return None
    return [None if values[t][column] != values[t][column] else values[t][column] for t in range(count)]


def targets_from(values: Recorded, behaviour: list[float], temperatures: list[float]) -> list[float] | None:
    """Target log-probs of one completion from its recorded numbers, or ``None`` if a
    position is missing (then the caller scores instead)."""
    if any(t not in values for t in range(len(behaviour))):
        return None
    lse = np.array([values[t] for t in range(len(behaviour))], dtype=np.float64).reshape(-1, len(VALUES))
    tau = np.asarray(temperatures, dtype=np.float32).astype(np.float64)  # the kernel divides by float32(tau)
    return (tau * (np.asarray(behaviour, dtype=np.float64) + lse[:, LSE_TAU]) - lse[:, LSE]).tolist()


def _collect(worker: Any, ids: list[str]) -> dict[str, Recorded]:
    from ead_server.vllm_adapter.entropy_clock import CLOCKS

    CLOCKS.release(ids)  # collected samples are done: their entropy clocks go too
    return STORE.collect(list(ids))


def register() -> None:
    """The ``vllm.general_plugins`` entry point: give vLLM's workers the collect method.

    Runs in every vLLM process; only adds a method, so it is harmless where unused."""
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, COLLECT_METHOD):
        setattr(WorkerBase, COLLECT_METHOD, _collect)
