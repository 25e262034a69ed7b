"""``EADClient`` (threads over ``httpx.Client``) and ``AsyncEADClient`` (tasks over
``httpx.AsyncClient``): the same methods, arguments and results; only the waiting differs.

Every decision (server choice, retries, fail-over, answer classification) is made by the
flows of :mod:`._flows`, which :class:`BaseEADClient` binds to the client. The twins drive
them: ``_drive`` sends the requests a flow asks for and waits as long as it says, blocking
here and awaiting there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import AbstractAsyncContextManager, AbstractContextManager, closing, nullcontext
from types import TracebackType
from typing import Any, TypeVar, cast

import httpx

from ead_server.schedule import TemperatureSchedule

from ._base import (
    DEFAULT_BACKOFF,
    DEFAULT_COOLOFF,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    BaseEADClient,
)
from ._flows import Answer, Flow, Send
from ._models import RolloutBatch
from ._planning import Chunk
from ._responses import ChunkFailure, ChunkResult, assemble, common_version, settle
from .errors import EADError

__all__ = ["AsyncEADClient", "EADClient"]

_Outcome = ChunkResult | ChunkFailure
_T = TypeVar("_T")


class _Cancelled(EADError):
    """A request not sent because another request of the same call failed for good."""


class EADClient(BaseEADClient):
    """Client of one or more EAD servers for RL rollouts (blocking).

    ::

        with EADClient(["http://gpu0:8000", "http://gpu1:8000"]) as client:
            batch = client.rollouts(prompts, n=8, max_tokens=1024, step=global_step, seed=seed)
            arrays = batch.to_numpy()
            version = client.reload_weights("/ckpt/step-100")

    Safe to share between threads: requests of one call run on a thread pool, and
    ``max_concurrency`` bounds the requests in flight over all calls together. Works in
    any thread, with or without an event loop; inside async code prefer
    :class:`AsyncEADClient`, since a blocking call stalls the loop for the whole call.
    See :class:`BaseEADClient` for the arguments.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        api_key: str | None = None,
        admin_key: str | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        *,
        backoff: float = DEFAULT_BACKOFF,
        cooloff: float = DEFAULT_COOLOFF,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            base_urls, api_key, admin_key, max_concurrency, timeout, max_retries,
            backoff=backoff, cooloff=cooloff, chunk_size=chunk_size,
        )
        self._http = httpx.Client(**self._httpx_kwargs())
        self._slots = threading.BoundedSemaphore(self.max_concurrency)

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool. The client cannot be used afterwards."""
        self._http.close()

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    def __enter__(self) -> EADClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the I/O a flow asks for ----------------------------------------------------------

    def _drive(
        self,
        flow: Flow[_T],
        slots: AbstractContextManager[Any] = nullcontext(),
        cancel: threading.Event | None = None,
    ) -> _T:
        """Run ``flow`` to its end, holding one of ``slots`` per attempt; stop before an
        attempt (and cut a wait short) once ``cancel`` is set."""
        cancel = cancel if cancel is not None else threading.Event()
        with closing(flow):
            try:
                while True:
                    with slots:
                        if cancel.is_set():  # checked after the wait for a slot, which may be long
                            raise _Cancelled("not sent: another request of this call failed")
                        send = cast(Send, flow.send(None))
                        answer: Answer
                        try:
                            answer = self._http.request(
                                send.method, send.url, json=send.json, headers=send.headers, timeout=send.timeout
                            )
                        except httpx.TransportError as exc:
                            answer = exc
                        delay = cast(float, flow.send(answer))
                    if delay:
                        cancel.wait(delay)  # returns early when the call is cancelled
            except StopIteration as stop:
                return cast(_T, stop.value)

    def _each_server(self, flow: Callable[[str], Flow[_T]], raise_errors: bool = True) -> dict[str, _T]:
        with ThreadPoolExecutor(max_workers=len(self.base_urls), thread_name_prefix="ead-client") as pool:
            futures = {url: pool.submit(self._drive, flow(url)) for url in self.base_urls}
        return settle({u: f.exception() or f.result() for u, f in futures.items()}, raise_errors)

    # -- rollouts -----------------------------------------------------------------------------

    def rollouts(
        self,
        prompts: Sequence[str | Sequence[int]] | None = None,
        *,
        messages: Sequence[Sequence[Mapping[str, Any]]] | None = None,
        n: int = 1,
        max_tokens: int = 1024,
        schedule: TemperatureSchedule | Mapping[str, Any] | None = None,
        step: int | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        return_target_logprobs: bool = False,
        return_entropy: bool = False,
        model: str | None = None,
    ) -> RolloutBatch:
        """Sample ``n`` completions of every prompt, with per-token log-probs.

        Args:
            prompts: strings, or lists of token ids (one entry per prompt).
            messages: instead of ``prompts``: chat conversations, each a list of
                ``{"role": ..., "content": ...}`` dicts (the server applies the chat template).
            n: samples per prompt.
            max_tokens: most tokens generated per sample.
            schedule: the temperature schedule (``TemperatureSchedule`` or its dict form,
                e.g. ``{"type": "ead", "tau_min": 0.8}``); ``None`` sends no schedule (the
                server's unscheduled sampling). Validated here: errors raise
                ``ScheduleError`` naming the field, before anything is sent.
            step: the trainer's global step, written into ``decay_schedule.step``
                (``d = min(d0 + alpha * step, d_max)``). Without a schedule it selects the
                ``paper`` preset. An error with a schedule whose fixed ``decay`` would
                ignore it, or whose ``decay_schedule.step`` differs. Allowed (and without
                effect) for ``constant`` schedules, so one call site serves both.
            stop: stop string(s).
            seed: makes the call reproducible. Prompt ``i`` is sampled with seed
                ``seed + i`` in a request of its own, so its samples are those of a
                single-prompt request seeded ``seed + i``: independent of how many
                servers there are, of ``chunk_size`` / ``max_concurrency``, and of retries
                and fail-over (given the same weights). The server keeps the ``n`` samples
                of one request independent (docs/design.md, "Seeds"). ``None``: unseeded, and
                prompts are batched ``chunk_size`` per request. Either way, requests are
                split to fit the servers' published limits (``GET /v1/limits``, read once
                per server).
            top_p, top_k: truncation of the behaviour distribution (the behaviour
                log-probs then refer to the truncated distribution).
            return_target_logprobs: also return the temperature-1 log-probs of every
                sampled token (``Rollout.target_logprobs``).
            return_entropy: also return each token's entropy at temperature 1
                (``Rollout.entropies``) and under the distribution it was sampled from
                (``Rollout.behavior_entropies``), from the sampling pass; needs a schedule
                and no ``top_p`` / ``top_k``.
            model: the served model name, when the server wants one.

        Returns:
            A :class:`RolloutBatch` with ``num_prompts * n`` rollouts ordered by
            ``(prompt_index, sample_index)``, ``prompt_index`` indexing ``prompts``.

        Raises:
            ScheduleError / ValueError / TypeError: invalid arguments (nothing sent).
            BadRequestError, AuthenticationError: a 4xx answer, never retried; the call
                stops at once and ``prompt_indices`` names the request's prompts.
            RolloutError: some prompts still failed after all retries and fail-overs
                (``failed_prompt_indices``); no partial result is returned.
            WeightVersionMismatch: the responses came from different weight versions.
            ProtocolError: a server answered with a body that breaks the protocol.
        """
        if self._limits_unknown():  # once per server: GET /v1/limits, to split the call to fit
            self._each_server(self._limits_flow, raise_errors=False)
        chunks = self._build_rollout_chunks(
            prompts, messages, n=n, max_tokens=max_tokens, schedule=schedule, step=step, stop=stop,
            seed=seed, top_p=top_p, top_k=top_k, return_target_logprobs=return_target_logprobs,
            return_entropy=return_entropy, model=model,
        )
        outcomes = self._run_chunks(chunks)
        return assemble(outcomes, num_prompts=chunks[-1].stop, n=n)

    def _run_chunks(self, chunks: list[Chunk]) -> list[_Outcome]:
        if len(chunks) == 1:
            return [self._drive(self._rollout_flow(chunks[0]), self._slots)]
        cancel = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(chunks)), thread_name_prefix="ead-client")
        futures = [pool.submit(self._drive, self._rollout_flow(c), self._slots, cancel) for c in chunks]
        try:
            done, _ = wait_futures(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f in done and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
        except BaseException:
            # A 4xx (or Ctrl-C): stop sending. Requests already on the wire finish in the
            # background and are discarded.
            cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return [f.result() for f in futures]

    # -- weights -------------------------------------------------------------------------------

    def reload_weights(self, path: str, mode: str = "wait", label: str | None = None) -> int:
        """Load the weights at ``path`` on every server (concurrently); returns the new
        weight version they all report.

        ``mode`` says what happens to requests in flight: ``"wait"`` (they finish on the
        old weights first), ``"keep"`` (they are frozen and go on under the new weights,
        each token's version in ``Rollout.weight_versions``) or ``"abort"`` (they end at
        once with their tokens, ``finish_reason == "abort"``). ``label`` names the
        version (e.g. ``"step-100"``).

        Sent with ``admin_key``. Retried only when the request cannot have reached the
        server (connection refused, connect timeout), since a reload changes server
        state. Raises the first server's error if any server fails (``add_note`` lists
        the other servers' outcomes), and :class:`WeightVersionMismatch` (with each
        server's version) if they disagree afterwards.
        """
        return common_version(self._each_server(lambda url: self._reload_flow(url, path, mode, label)))

    def weight_versions(self) -> dict[str, int]:
        """The weight version each server reports, keyed by server URL."""
        return self._each_server(self._version_flow)

    def health(self) -> dict[str, bool]:
        """Whether each server answers ``GET /health`` with 2xx (one try, no retries)."""
        return self._each_server(self._probe_flow, raise_errors=False)


class AsyncEADClient(BaseEADClient):
    """The async twin of :class:`EADClient`: same arguments, same results, ``await`` each call.

    ::

        async with AsyncEADClient(urls) as client:
            batch = await client.rollouts(prompts, n=8, max_tokens=1024, step=step)

    Use it from one event loop (the connection pool belongs to the loop it first runs on).
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        api_key: str | None = None,
        admin_key: str | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        *,
        backoff: float = DEFAULT_BACKOFF,
        cooloff: float = DEFAULT_COOLOFF,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            base_urls, api_key, admin_key, max_concurrency, timeout, max_retries,
            backoff=backoff, cooloff=cooloff, chunk_size=chunk_size,
        )
        self._http = httpx.AsyncClient(**self._httpx_kwargs())
        self._slots = asyncio.Semaphore(self.max_concurrency)

    async def aclose(self) -> None:
        """Close the connection pool (httpx's name for the async ``close``)."""
        await self._http.aclose()

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    async def __aenter__(self) -> AsyncEADClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _drive(self, flow: Flow[_T], slots: AbstractAsyncContextManager[Any] = nullcontext()) -> _T:
        """Run ``flow`` to its end, holding one of ``slots`` per attempt. Cancelling the
        task closes the flow, which releases its server."""
        with closing(flow):
            try:
                while True:
                    async with slots:
                        send = cast(Send, flow.send(None))
                        answer: Answer
                        try:
                            answer = await self._http.request(
                                send.method, send.url, json=send.json, headers=send.headers, timeout=send.timeout
                            )
                        except httpx.TransportError as exc:
                            answer = exc
                        delay = cast(float, flow.send(answer))
                    if delay:
                        await asyncio.sleep(delay)
            except StopIteration as stop:
                return cast(_T, stop.value)

    async def _each_server(self, flow: Callable[[str], Flow[_T]], raise_errors: bool = True) -> dict[str, _T]:
        results = await asyncio.gather(*(self._drive(flow(url)) for url in self.base_urls), return_exceptions=True)
        return settle(dict(zip(self.base_urls, results)), raise_errors)

    async def rollouts(
        self,
        prompts: Sequence[str | Sequence[int]] | None = None,
        *,
        messages: Sequence[Sequence[Mapping[str, Any]]] | None = None,
        n: int = 1,
        max_tokens: int = 1024,
        schedule: TemperatureSchedule | Mapping[str, Any] | None = None,
        step: int | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        return_target_logprobs: bool = False,
        return_entropy: bool = False,
        model: str | None = None,
    ) -> RolloutBatch:
        if self._limits_unknown():
            await self._each_server(self._limits_flow, raise_errors=False)
        chunks = self._build_rollout_chunks(
            prompts, messages, n=n, max_tokens=max_tokens, schedule=schedule, step=step, stop=stop,
            seed=seed, top_p=top_p, top_k=top_k, return_target_logprobs=return_target_logprobs,
            return_entropy=return_entropy, model=model,
        )
        outcomes = await self._run_chunks(chunks)
        return assemble(outcomes, num_prompts=chunks[-1].stop, n=n)

    rollouts.__doc__ = EADClient.rollouts.__doc__

    async def _run_chunks(self, chunks: list[Chunk]) -> list[_Outcome]:
        tasks = [asyncio.ensure_future(self._drive(self._rollout_flow(c), self._slots)) for c in chunks]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:  # the caller was cancelled: take the requests with us
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if pending:  # a 4xx: stop sending the rest
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for t in tasks:
            if t in done and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]

    async def reload_weights(self, path: str, mode: str = "wait", label: str | None = None) -> int:
        return common_version(await self._each_server(lambda url: self._reload_flow(url, path, mode, label)))

    reload_weights.__doc__ = EADClient.reload_weights.__doc__

    async def weight_versions(self) -> dict[str, int]:
        return await self._each_server(self._version_flow)

    weight_versions.__doc__ = EADClient.weight_versions.__doc__

    async def health(self) -> dict[str, bool]:
        return await self._each_server(self._probe_flow, raise_errors=False)

    health.__doc__ = EADClient.health.__doc__
