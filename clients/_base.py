"""What the sync and async clients share: configuration, server choice, retry policy,
request building and response parsing.

The per-request policy (which server, when to retry, how to classify an answer, when a
server goes into cool-off) lives in generator *flows* here, in the shape of httpx's
``Auth.auth_flow``: a flow yields a :class:`_Send` and is sent back the response (or the
transport error); it yields a float to ask for a wait; it returns the result or raises.
``EADClient`` and ``AsyncEADClient`` only drive flows: they do the I/O a flow asks for,
blocking or awaiting.
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

import httpx
from pydantic import ValidationError

from ead_server import __version__  # the distribution's version, from its metadata
from ead_server.schedule import (
    DecaySchedule,
    ResolvedSchedule,
    ScheduleError,
    TemperatureSchedule,
    parse_schedule,
)

from ._models import Rollout, RolloutBatch
from .errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ProtocolError,
    RolloutError,
    ServerUnavailableError,
    WeightVersionMismatch,
    _short_list,
)

DEFAULT_TIMEOUT = 600.0
DEFAULT_MAX_RETRIES = 5
DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_BACKOFF = 1.0
DEFAULT_COOLOFF = 10.0
MAX_BACKOFF = 30.0
# Connecting to a dead host should not take the generation timeout to notice.
MAX_CONNECT_TIMEOUT = 10.0
# The longest Retry-After honoured as given; a longer one is waited this long.
MAX_RETRY_AFTER = 60.0
# The limits of GET /v1/limits that decide how a call is split into requests.
_SPLIT_LIMITS = ("max_prompts_per_request", "max_n", "max_sequences_per_request", "max_body_bytes")

# Transport failures that happen before the request reaches the server: safe to retry
# even for requests that change server state (weight reloads).
RELOAD_MODES = ("wait", "keep", "abort")  # what a reload does to requests in flight (docs/rollouts.md)
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def normalize_base_url(url: str) -> str:
    """``http://host:8000``, ``http://host:8000/`` and ``http://host:8000/v1`` all name the
    same server; the client keeps the root and appends ``/v1/...`` itself."""
    if not isinstance(url, str):
        raise TypeError(f"base URL must be a string, got {type(url).__name__}")
    root = url.strip().rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")].rstrip("/")
    if not root.startswith(("http://", "https://")) or "://" == root[-3:]:
        raise ValueError(f"base URL must look like http://host:port, got {url!r}")
    return root


@dataclass
class _Server:
    url: str
    in_flight: int = 0
    down_until: float = 0.0  # time.monotonic(); 0 = up
    failures: int = 0  # consecutive


@dataclass(frozen=True)
class _Chunk:
    """Prompts ``[start, stop)`` of the caller's list, sent as one request."""

    start: int
    stop: int
    body: dict[str, Any]

    @property
    def indices(self) -> list[int]:
        return list(range(self.start, self.stop))


@dataclass
class _ChunkResult:
    chunk: _Chunk
    url: str
    weight_version: int
    schedule: ResolvedSchedule | None
    rollouts: list[Rollout]


@dataclass
class _ChunkFailure:
    chunk: _Chunk
    error: BaseException


@dataclass
class _RetryState:
    """One request's way through the servers.

    ``shed`` counts the attempts a server turned away for load with ``Retry-After``
    (429/503); they do not use up ``max_retries``, but their waits together are bounded by
    the request timeout (``shed_wait``)."""

    attempts: int = 0
    tried: set[str] = field(default_factory=set)
    last_error: BaseException | None = None
    last_url: str | None = None
    shed: int = 0
    shed_wait: float = 0.0

    def record(self, url: str) -> None:
        """An attempt is about to go to ``url``."""
        self.attempts += 1
        self.tried.add(url)
        self.last_url = url


@dataclass(frozen=True)
class _Send:
    """The request a flow wants sent next (``json`` is the body, None for none)."""

    method: str
    url: str
    json: Any
    headers: dict[str, str]
    timeout: float | httpx.UseClientDefault = httpx.USE_CLIENT_DEFAULT


# What a driver sends back into a flow after a _Send: the response, or the transport
# error (connection refused, timeout, ...) that stopped it. Any other exception is the
# driver's own and ends the flow.
_Answer = Union[httpx.Response, httpx.TransportError]
_T = TypeVar("_T")
# A flow yields a _Send and gets an _Answer back, then yields a float (seconds to wait
# before its next _Send; 0 for none) and gets None back, or returns / raises. Sends and
# waits alternate, so a driver can hold a concurrency slot from the resume that leads to
# a _Send until the flow's next wait or end.
_Flow = Generator[Union[_Send, float], Union[_Answer, None], _T]


class BaseEADClient:
    """Configuration and every decision that does not wait on the network.

    Args:
        base_urls: one server root URL or several (``http://host:port``, with or without
            a trailing ``/v1``). Rollout requests are spread over all of them.
        api_key: sent as ``Authorization: Bearer <api_key>`` on every request.
        admin_key: sent instead of ``api_key`` on weight reloads (falls back to ``api_key``).
        max_concurrency: most rollout requests in flight at once, over all servers and all
            concurrent calls on this client.
        timeout: seconds a request may take (generation included); connecting is given at
            most 10 s of it.
        max_retries: retries of one request after its first attempt, on connection errors,
            timeouts, 5xx, 408 and 429. 4xx answers are never retried. A 429 or 503 with
            ``Retry-After`` (the server shedding load) is retried after the time it asks
            for (at most 60 s; another server at once if one is free), without using up
            ``max_retries``, for as long as those waits add up to less than ``timeout``.
        backoff: base of the exponential back-off: retry ``k`` waits
            ``min(backoff * 2**(k-1), 30) * uniform(0.5, 1)`` seconds, except that a retry
            goes out at once when a server it has not tried is up (fail-over).
        cooloff: seconds a server that failed is left out of the rotation (it is still
            used when every server is down).
        chunk_size: prompts per rollout request when no seed is given (default: spread the
            call over ``max_concurrency`` requests). Seeded calls always send one prompt
            per request, see ``rollouts()``.
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
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("give at least one server URL")
        roots = [normalize_base_url(u) for u in urls]
        if len(set(roots)) != len(roots):
            raise ValueError(f"duplicate server URLs: {roots}")
        _check_int("max_concurrency", max_concurrency, minimum=1)
        _check_int("max_retries", max_retries, minimum=0)
        if chunk_size is not None:
            _check_int("chunk_size", chunk_size, minimum=1)
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if backoff < 0 or cooloff < 0:
            raise ValueError("backoff and cooloff must be >= 0")
        self.base_urls: list[str] = roots
        self.api_key = api_key
        self.admin_key = admin_key
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.cooloff = float(cooloff)
        self.chunk_size = chunk_size
        self._servers = [_Server(u) for u in roots]
        # GET /v1/limits of each server, once; {} for a server that publishes none.
        self._limits: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()  # never held across I/O, so fine from async code too
        self._rr = 0
        self._rng = random.Random()

    # -- httpx configuration -------------------------------------------------------

    def _httpx_kwargs(self) -> dict[str, Any]:
        return {
            "timeout": httpx.Timeout(self.timeout, connect=min(self.timeout, MAX_CONNECT_TIMEOUT)),
            # The semaphore bounds rollout requests; the pool only needs to keep them alive.
            "limits": httpx.Limits(max_connections=None, max_keepalive_connections=self.max_concurrency),
            "headers": {"User-Agent": f"ead-client/{__version__}"},
        }

    @property
    def _probe_timeout(self) -> float:
        return min(self.timeout, MAX_CONNECT_TIMEOUT)

    def _headers(self, admin: bool = False) -> dict[str, str]:
        key = (self.admin_key or self.api_key) if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    # -- server choice ---------------------------------------------------------------

    def _acquire_server(self, avoid: set[str]) -> _Server:
        """The least-loaded server that is up, preferring ones not in ``avoid``; ties go
        round-robin. When every server is cooling off, the one that recovers first."""
        with self._lock:
            now = time.monotonic()
            k = len(self._servers)
            order = [self._servers[(self._rr + i) % k] for i in range(k)]
            self._rr = (self._rr + 1) % k
            up = [s for s in order if s.down_until <= now]
            fresh = [s for s in up if s.url not in avoid]
            if fresh or up:
                server = min(fresh or up, key=lambda s: s.in_flight)
            else:
                server = min(order, key=lambda s: s.down_until)
            server.in_flight += 1
            return server

    def _release_server(self, server: _Server, ok: bool | None, cooloff: float | None = None) -> None:
        """``ok``: True on an answer, False on a transient failure (start a cool-off of
        ``cooloff`` seconds, default the client's: a server's ``Retry-After`` says how long),
        None when the outcome says nothing about the server's health."""
        with self._lock:
            server.in_flight -= 1
            if ok is True:
                server.failures = 0
                server.down_until = 0.0
            elif ok is False:
                server.failures += 1
                server.down_until = time.monotonic() + (self.cooloff if cooloff is None else cooloff)

    def _has_fresh_server(self, avoid: set[str]) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(s.down_until <= now and s.url not in avoid for s in self._servers)

    def _backoff_delay(self, state: _RetryState) -> float | None:
        """Exponential back-off with jitter before retry ``state.attempts``, or None when
        the retries are used up."""
        retries = state.attempts - state.shed
        if retries > self.max_retries:
            return None
        k = max(retries, 1)
        return min(self.backoff * 2 ** (k - 1), MAX_BACKOFF) * self._rng.uniform(0.5, 1.0)

    def _retry_delay(self, state: _RetryState) -> float | None:
        """Like :meth:`_backoff_delay`, but 0 when a server this request has not tried yet
        is up: failing over needs no wait."""
        delay = self._backoff_delay(state)
        if delay is not None and self._has_fresh_server(state.tried):
            return 0.0
        return delay

    def _shed_delay(self, state: _RetryState, answer: httpx.Response) -> float | None:
        """For an answer that sheds load with ``Retry-After`` (429, 503): record it and
        return the wait it asks for, or None when it is not such an answer or the waits
        would exceed the request timeout (then it counts as an ordinary failure)."""
        wait = _retry_after(answer) if answer.status_code in (429, 503) else None
        if wait is None or state.shed_wait + wait > self.timeout:
            return None
        wait = max(wait, 0.1)  # "Retry-After: 0" must not make a busy loop
        state.shed += 1
        state.shed_wait += wait
        return wait

    def _unavailable(self, state: _RetryState, what: str) -> ServerUnavailableError:
        err = ServerUnavailableError(
            f"{what} failed after {state.attempts} attempt(s); last error from {state.last_url}: "
            f"{type(state.last_error).__name__}: {state.last_error}",
            url=state.last_url,
            attempts=state.attempts,
        )
        err.__cause__ = state.last_error
        return err

    # -- flows: the per-request policy, without I/O -------------------------------------

    def _rollout_flow(self, chunk: _Chunk) -> _Flow[_ChunkResult | _ChunkFailure]:
        """One rollout request with retries and fail-over.

        Each attempt goes to the server :meth:`_acquire_server` picks, preferring servers
        this request has not tried. A transport error or a transient status puts that
        server in cool-off and retries; a 4xx raises at once (with the chunk's prompt
        indices); when the retries are used up the flow returns a :class:`_ChunkFailure`,
        so the call can name every prompt that failed. The server is released however
        the attempt ends, also when the driver abandons the flow (the ``finally`` runs
        when the generator is closed).
        """
        state = _RetryState()
        while True:
            server = self._acquire_server(state.tried)
            state.record(server.url)
            healthy: bool | None = None
            wait: float | None = None
            try:
                answer = yield _Send("POST", server.url + "/v1/rollouts", chunk.body, self._headers())
                if isinstance(answer, httpx.TransportError):
                    healthy, state.last_error = False, answer
                elif answer.is_success:
                    healthy = True
                    return self._parse_rollouts(self._json(answer, server.url), chunk, server.url)
                else:
                    err = self._api_error(answer, server.url)
                    if not self._is_transient_status(answer.status_code):
                        healthy = True  # the server is fine; the request is not
                        err.prompt_indices = chunk.indices
                        raise err
                    healthy, state.last_error = False, err
                    wait = self._shed_delay(state, answer)
            finally:
                self._release_server(server, healthy, wait)
            delay = self._retry_delay(state)
            if wait is not None and delay:  # busy: wait as long as the server asked, unless another is free
                delay = wait
            if delay is None:
                return _ChunkFailure(chunk, self._unavailable(state, _describe_chunk(chunk)))
            yield delay

    def _call_flow(
        self, url: str, method: str, path: str, body: Any, *, admin: bool = False, idempotent: bool = True
    ) -> _Flow[dict[str, Any]]:
        """One request to one server, retried in place (no fail-over: every server must
        answer). A request that is not ``idempotent`` (a reload changes server state) is
        retried only when it cannot have reached the server."""
        state = _RetryState()
        while True:
            state.record(url)
            answer = yield _Send(method, url + path, body, self._headers(admin))
            if isinstance(answer, httpx.TransportError):
                state.last_error = answer
                if not idempotent and not isinstance(answer, _NOT_SENT):
                    raise self._unavailable(state, f"{method} {path} (not retried: it may have reached the server)")
            elif answer.is_success:
                return self._json(answer, url)
            else:
                err = self._api_error(answer, url)
                # Shed load (429/503 with Retry-After) was not processed: retried even when not idempotent.
                wait = self._shed_delay(state, answer)
                if wait is None and not (idempotent and self._is_transient_status(answer.status_code)):
                    raise err
                state.last_error = err
                if wait is not None:
                    yield wait
                    continue
            delay = self._backoff_delay(state)
            if delay is None:
                raise self._unavailable(state, f"{method} {path}")
            yield delay

    def _reload_flow(self, url: str, path: str, mode: str = "wait", label: str | None = None) -> _Flow[int]:
        if mode not in RELOAD_MODES:
            raise ValueError(f"mode must be one of {RELOAD_MODES}, got {mode!r}")
        # Defaults are left out, so that a server without reload modes still takes the call.
        body = {"path": str(path), **({"mode": mode} if mode != "wait" else {}),
                **({"label": label} if label is not None else {})}
        answer = yield from self._call_flow(url, "POST", "/v1/weights/reload", body, admin=True, idempotent=False)
        return self._parse_version(answer, url)

    def _version_flow(self, url: str) -> _Flow[int]:
        answer = yield from self._call_flow(url, "GET", "/v1/weights", None)
        return self._parse_version(answer, url)

    def _probe_flow(self, url: str) -> _Flow[bool]:
        """``GET /health`` once, with the short probe timeout: a dead server must not
        take the generation timeout to report."""
        answer = yield _Send("GET", url + "/health", None, self._headers(), timeout=self._probe_timeout)
        return not isinstance(answer, httpx.TransportError) and answer.is_success

    def _limits_flow(self, url: str) -> _Flow[dict[str, int] | None]:
        """The server's ``GET /v1/limits``, asked once and remembered (no request when
        known). A server without the route (404, 405) has none: ``{}``. Any other failure
        leaves it unknown (None) for the next call to ask again; the call goes on
        without it, and the server's 400 would name any limit it trips."""
        if url in self._limits:
            return self._limits[url]
        answer = yield _Send("GET", url + "/v1/limits", None, self._headers(), timeout=self._probe_timeout)
        if isinstance(answer, httpx.TransportError):
            return None
        limits: dict[str, int] | None = None
        if answer.status_code in (404, 405):
            limits = {}
        elif answer.is_success:
            try:
                body = answer.json()
                limits = {k: int(body[k]) for k in _SPLIT_LIMITS if isinstance(body.get(k), int) and body[k] > 0}
            except (ValueError, AttributeError):
                limits = None
        if limits is not None:
            with self._lock:
                self._limits[url] = limits
        return limits

    def _limits_unknown(self) -> bool:
        return any(u not in self._limits for u in self.base_urls)

    def _effective_limits(self) -> dict[str, int]:
        """The tightest of the known servers' limits, key by key: a request must fit
        whichever server it goes to (fail-over included)."""
        out: dict[str, int] = {}
        for limits in self._limits.values():
            for key, value in limits.items():
                out[key] = min(value, out.get(key, value))
        return out

    # -- answers -----------------------------------------------------------------------

    @staticmethod
    def _is_transient_status(status: int) -> bool:
        return status in (408, 429) or (status >= 500 and status != 501)

    @staticmethod
    def _api_error(response: httpx.Response, url: str) -> APIError:
        """The OpenAI-style ``{"error": {...}}`` body as the matching exception."""
        message, param, code, etype = response.reason_phrase or "error", None, None, None
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            text = response.text.strip()
            if text:
                message = text[:2000]
        else:
            err = body.get("error") if isinstance(body, dict) else None
            if isinstance(err, dict):
                message = str(err.get("message") or message)
                param, code, etype = err.get("param"), err.get("code"), err.get("type")
            elif isinstance(body, dict) and "detail" in body:  # FastAPI's default shape
                message = json.dumps(body["detail"])[:2000]
        status = response.status_code
        cls = AuthenticationError if status == 401 else BadRequestError if 400 <= status < 500 else APIError
        return cls(status, message, param, None if code is None else str(code), type=etype, url=url)

    @staticmethod
    def _json(response: httpx.Response, url: str) -> dict[str, Any]:
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"response is not JSON: {exc}", url=url) from None
        if not isinstance(body, dict):
            raise ProtocolError(f"expected a JSON object, got {type(body).__name__}", url=url)
        return body

    # -- rollouts: request building ------------------------------------------------------

    @staticmethod
    def _merge_schedule(
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

    @staticmethod
    def _check_inputs(prompts: Any, messages: Any) -> tuple[str, list[Any]]:
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

    def _plan_chunks(
        self, key: str, items: list[Any], seed: int | None, common: dict[str, Any]
    ) -> list[_Chunk]:
        """Split one call into requests.

        Unseeded: ``chunk_size`` prompts per request (default ``ceil(P / max_concurrency)``).
        Seeded: one prompt per request with seed ``seed + prompt_index``, so prompt ``i``'s
        samples are exactly those of a single-prompt request seeded ``seed + i`` however
        the call is split, retried or failed over, and whatever the server count.
        Either way a request stays within the servers' published limits (``GET
        /v1/limits``): at most ``max_prompts_per_request`` prompts, ``max_sequences_per_request``
        prompts x n, and ``max_body_bytes``; an ``n`` no request can hold raises
        ``ValueError`` before anything is sent.
        """
        total = len(items)
        limits = self._effective_limits()
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
            size = min(self.chunk_size or max(1, math.ceil(total / self.max_concurrency)), max(cap, 1))
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
            chunks.append(_Chunk(start, stop, body))
            start = stop
        return chunks

    def _build_rollout_chunks(
        self,
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
    ) -> list[_Chunk]:
        key, items = self._check_inputs(prompts, messages)
        _check_int("n", n, minimum=1)
        _check_int("max_tokens", max_tokens, minimum=1)
        if seed is not None:
            _check_int("seed", seed, minimum=0)
        spec = self._merge_schedule(schedule, step)
        common: dict[str, Any] = {
            "n": n,
            "max_tokens": max_tokens,
            "return_target_logprobs": bool(return_target_logprobs),
        }
        optional = {
            "stop": [stop] if isinstance(stop, str) else (list(stop) if stop is not None else None),
            "top_p": top_p,
            "top_k": top_k,
            "model": model,
            "temperature_schedule": spec.model_dump(exclude_none=True) if spec is not None else None,
        }
        common.update({k: v for k, v in optional.items() if v is not None})
        return self._plan_chunks(key, items, seed, common)

    # -- rollouts: response parsing -------------------------------------------------------

    @staticmethod
    def _parse_rollouts(body: dict[str, Any], chunk: _Chunk, url: str) -> _ChunkResult:
        """One response, checked against its request: every (prompt, sample) exactly once.
        Prompt indices are shifted from the request's to the caller's."""
        try:
            version = body["weight_version"]
            raw_schedule = body.get("temperature_schedule")
            raw_rollouts = body["rollouts"]
            if not isinstance(version, int) or isinstance(version, bool):
                raise ValueError(f"weight_version must be an int, got {version!r}")
            if not isinstance(raw_rollouts, list):
                raise ValueError("rollouts must be a list")
            schedule = ResolvedSchedule.model_validate(raw_schedule) if raw_schedule is not None else None
            rollouts = [Rollout.model_validate(r) for r in raw_rollouts]
        except (KeyError, ValueError, TypeError, ValidationError) as exc:
            raise ProtocolError(f"malformed rollouts response: {exc}", url=url) from None
        n = chunk.body["n"]
        size = chunk.stop - chunk.start
        seen = sorted((r.prompt_index, r.sample_index) for r in rollouts)
        expected = [(p, s) for p in range(size) for s in range(n)]
        if seen != expected:
            raise ProtocolError(
                f"expected samples 0..{n - 1} of prompts 0..{size - 1} once each, got {len(seen)} "
                f"rollouts with (prompt_index, sample_index) {seen[:10]}{'...' if len(seen) > 10 else ''}",
                url=url,
            )
        shifted = [r.model_copy(update={"prompt_index": r.prompt_index + chunk.start}) for r in rollouts]
        return _ChunkResult(chunk, url, version, schedule, shifted)

    @staticmethod
    def _assemble(outcomes: list[_ChunkResult | _ChunkFailure], num_prompts: int, n: int) -> RolloutBatch:
        failures = [o for o in outcomes if isinstance(o, _ChunkFailure)]
        if failures:
            failed = [i for f in failures for i in f.chunk.indices]
            err = RolloutError(failed, [(f.chunk.indices, f.error) for f in failures])
            raise err from failures[0].error
        results = sorted((o for o in outcomes if isinstance(o, _ChunkResult)), key=lambda r: r.chunk.start)
        versions = {r.weight_version for r in results}
        # Servers that report each token's version make mixed versions explicit (weights
        # changed during the call, e.g. a "keep" reload): the spans tell, nothing to refuse.
        spans_everywhere = all(x.weight_versions for r in results for x in r.rollouts)
        if len(versions) > 1 and not spans_everywhere:
            by_url: dict[str, int] = {}
            groups: dict[tuple[int, str], list[int]] = {}
            for r in results:
                by_url.setdefault(r.url, r.weight_version)
                groups.setdefault((r.weight_version, r.url), []).extend(r.chunk.indices)
            detail = "; ".join(f"v{v} from {u}: prompts {_short_list(ix)}" for (v, u), ix in sorted(groups.items()))
            raise WeightVersionMismatch(
                by_url, f"one rollouts() call got samples from weight versions {sorted(versions)}: {detail}"
            )
        rollouts = sorted((x for r in results for x in r.rollouts), key=lambda x: (x.prompt_index, x.sample_index))
        if len(rollouts) != num_prompts * n:  # cannot happen after _parse_rollouts; never drop silently
            raise ProtocolError(f"assembled {len(rollouts)} rollouts for {num_prompts} prompts x {n} samples")
        return RolloutBatch(
            weight_version=min(versions),
            schedule=results[0].schedule,
            num_prompts=num_prompts,
            n=n,
            rollouts=rollouts,
        )

    # -- weights ----------------------------------------------------------------------------

    @staticmethod
    def _parse_version(body: dict[str, Any], url: str) -> int:
        version = body.get("weight_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProtocolError(f"weight_version missing or not an int in {body!r}", url=url)
        return version

    @staticmethod
    def _common_version(versions: dict[str, int]) -> int:
        if len(set(versions.values())) != 1:
            raise WeightVersionMismatch(
                versions, f"servers disagree on the weight version after the reload: {versions}"
            )
        return next(iter(versions.values()))

    @staticmethod
    def _settle(outcomes: Mapping[str, _T | BaseException], raise_errors: bool = True) -> dict[str, _T]:
        """The results of a call to every server, keyed by URL.

        With ``raise_errors``, any error raises the first server's error, and the other
        servers' outcomes go into its notes; without, failed servers are left out.
        """
        errors = {u: r for u, r in outcomes.items() if isinstance(r, BaseException)}
        done = {u: r for u, r in outcomes.items() if not isinstance(r, BaseException)}
        if errors and raise_errors:
            err = next(iter(errors.values()))
            if hasattr(err, "add_note") and (len(errors) > 1 or done):  # add_note: Python 3.11+
                others = [f"{u}: {type(e).__name__}: {e}" for u, e in list(errors.items())[1:]]
                others += [f"{u}: ok ({v!r})" for u, v in done.items()]
                err.add_note("outcome on the other servers: " + "; ".join(others))
            raise err
        return done  # type: ignore[return-value]


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), at most
    :data:`MAX_RETRY_AFTER`; None without a usable header."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _describe_chunk(chunk: _Chunk) -> str:
    first, last = chunk.start, chunk.stop - 1
    return f"rollouts for prompt {first}" if first == last else f"rollouts for prompts {first}-{last}"


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
