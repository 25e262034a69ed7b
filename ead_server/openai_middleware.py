"""The ``temperature_schedule`` extension of vLLM's OpenAI routes, as one ASGI middleware.

vLLM's own server keeps every feature users rely on (streaming, ``n``, stop strings,
log-probs, chat templates, tools, auth, metrics). This middleware adds ours around it
without touching its internals, which is why it survives vLLM upgrades:

* Requests: it reads ``temperature_schedule`` (or the stock-vLLM form
  ``vllm_xargs.temperature_schedule`` as a JSON string, or TRL's ``extra_args``; on vLLM's
  token route ``sampling_params.extra_args``) by the request contract
  (:mod:`ead_server.request_contract`: the 400s naming the field, the temperature rule,
  the server-wide default, the neutral sampling settings, the wire form the processor
  gets).
* Responses: it adds the resolved schedule to each choice, the per-token temperatures
  beside the log-probs, and ``weight_version`` to every body and stream chunk, all as
  the contract says. Each finished choice gets its ``weight_versions`` spans (the token
  route's choices keep vLLM's own, as vLLM writes them).
* ``return_target_logprobs`` (non-streaming, beside ``logprobs``): each token's
  temperature-1 log-prob, from the sampling pass where exact, else a scoring pass (the
  rules of ``/v1/rollouts``: ``ead_server.vllm_adapter.targets``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client import Counter

from ead_server.chat_messages import check_conversation
from ead_server import request_contract as contract
from ead_server.errors import APIError, send_error
from ead_server.guard import parsed_body, replay_body
from ead_server.request_contract import SCHEDULE_KEY
from ead_server.schedule import ResolvedSchedule
from ead_server.vllm_adapter import engine as vllm_engine
from ead_server.vllm_adapter.engine import EngineCall, recording_calls
from ead_server.vllm_adapter.targets import ENTROPY, ENTROPY_TAU, TAU
from ead_server.vllm_adapter.targets import recorded_column as column
from ead_server.weight_gate import WeightGate

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/invocations": "invocations",
          "/inference/v1/generate": "generate"}
"""POST routes whose requests take a ``temperature_schedule`` here. ``/invocations``
(SageMaker) is a chat or a completion request by its body, as vLLM dispatches it;
``/inference/v1/generate`` is vLLM's token route (SkyRL and prime-rl generate through it),
whose responses carry log-probs as chat's do, in ``logprobs.content``."""

SCHEDULE_LEFT_ALONE = frozenset({
    "/v1/rollouts",  # applies the schedule itself (ead_server.server)
    # Take a generation request's body but sample nothing: a schedule in it changes nothing.
    "/tokenize", "/detokenize", "/v1/messages/count_tokens",
    "/v1/chat/completions/render", "/v1/completions/render", "/v1/messages/render", "/v1/responses/render",
    "/v1/chat/completions/derender", "/v1/completions/derender",
})
"""POST routes other than :data:`ROUTES` where a schedule is not refused. Every other
POST route refuses one with a 400 naming the field, so that no route (one that a vLLM
upgrade adds included) samples without the schedule its caller believes it applied."""

REQUESTS = Counter(
    "ead_requests", "Completion and chat requests by temperature schedule type.", ["endpoint", "schedule_type"]
)


def prepare_request(payload: dict[str, Any], default: ResolvedSchedule | None = None) -> contract.Request:
    """Read an OpenAI-route body by the request contract and rewrite it in place for
    vLLM's handler.

    The schedule may come as the field; from stock-vLLM clients as the JSON string
    ``vllm_xargs.temperature_schedule``; or, from TRL's server mode (one
    ``generation_kwargs`` for both of its modes), in a top-level ``extra_args`` object,
    whose other flat keys join ``vllm_xargs``. Whichever, the engine gets its wire form
    in ``vllm_xargs``. Raises :class:`APIError` (400) naming the offending field.
    """
    xargs = payload.get("vllm_xargs")
    xargs = xargs if isinstance(xargs, dict) else None
    extra = _flat_extra_args(payload.pop("extra_args", None), xargs)
    request = contract.read_request(
        [(SCHEDULE_KEY, payload.pop(SCHEDULE_KEY, None)),
         (f"vllm_xargs.{SCHEDULE_KEY}", xargs.get(SCHEDULE_KEY) if xargs else None),
         (f"extra_args.{SCHEDULE_KEY}", extra.pop(SCHEDULE_KEY, None))],
        payload.get("temperature"), default)
    if extra:
        xargs = payload["vllm_xargs"] = {**(xargs or {}), **extra}
    if request.schedule is None:
        return request
    if payload.get("echo") and payload.get("logprobs") is not None:
        raise APIError(400, "echo with logprobs is not supported together with temperature_schedule", "echo")
    payload.update(request.sampling(payload))
    payload["vllm_xargs"] = request.extra_args(xargs)
    return request


def _flat_extra_args(extra: Any, xargs: dict[str, Any] | None) -> dict[str, Any]:
    """A top-level ``extra_args`` (vLLM's ``SamplingParams`` field, as TRL's server mode
    sends it): the schedule may be an object; every other key must be a flat value that
    ``vllm_xargs`` can carry, and must not be given there too."""
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise APIError(400, "extra_args must be an object", "extra_args")
    for key, value in extra.items():
        if key == SCHEDULE_KEY:
            continue
        flat = isinstance(value, (str, int, float)) or (
            isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value))
        if not flat:
            raise APIError(400, f"extra_args.{key}: only flat values (string, number, or a list of them) pass to "
                                f"the engine", f"extra_args.{key}")
        if xargs and key in xargs:
            raise APIError(400, f"{key} is given in both extra_args and vllm_xargs", f"extra_args.{key}")
    return dict(extra)


def prepare_generate(payload: dict[str, Any], default: ResolvedSchedule | None = None) -> contract.Request:
    """Read a body of vLLM's token route by the request contract and rewrite it in place:
    the schedule comes in ``sampling_params.extra_args`` (vLLM's ``SamplingParams``, as
    SkyRL and prime-rl send them), and goes to the engine there in its wire form. A body
    vLLM would refuse anyway (no ``sampling_params`` object) is left to vLLM."""
    for field in (SCHEDULE_KEY, "vllm_xargs"):  # vLLM's route reads neither: a schedule there would be dropped
        where = payload.get(field)
        if where is not None and (field == SCHEDULE_KEY or isinstance(where, dict) and SCHEDULE_KEY in where):
            name = field if field == SCHEDULE_KEY else f"vllm_xargs.{SCHEDULE_KEY}"
            raise APIError(400, f"on the token route the schedule goes in sampling_params.extra_args."
                                f"{SCHEDULE_KEY}, not {name}", name)
    params = payload.get("sampling_params")
    if not isinstance(params, dict):
        return contract.Request(None)
    extra = params.get("extra_args")
    if extra is not None and not isinstance(extra, dict):
        raise APIError(400, "sampling_params.extra_args must be an object", "sampling_params.extra_args")
    extra = dict(extra or {})
    field = f"sampling_params.extra_args.{SCHEDULE_KEY}"
    request = contract.read_request([(field, extra.pop(SCHEDULE_KEY, None))], params.get("temperature"), default)
    if request.schedule is not None:
        params.update(request.sampling(params))
        params["extra_args"] = request.extra_args(extra)
    return request


def prepare_generate_numbers(payload: dict[str, Any], request: contract.Request, engine: Any) -> EngineNumbers:
    """On vLLM's token route, an entropy-driven schedule's per-token numbers come back as
    on the OpenAI routes (:func:`prepare_engine_numbers`): its id goes in
    ``sampling_params.extra_args``, and a refusal names the token route's field."""
    params = payload.get("sampling_params")
    if not isinstance(params, dict):
        return EngineNumbers()
    recorded = contract.engine_numbers_needed(request, params, engine, stream=bool(payload.get("stream")),
                                              param_name=_token_route_field)
    if recorded:
        params["extra_args"][contract.TARGET_KEY] = contract.new_target_id()
    return EngineNumbers(recorded=recorded)


def _token_route_field(param: str) -> str:
    """A refusal's ``param``, named as the token route's body names it."""
    if param == "stream":
        return param
    return f"sampling_params.{'extra_args.' if param == SCHEDULE_KEY else ''}{param}"


def _samples_per_prompt(fields: Any) -> int:
    n = fields.get("n") if isinstance(fields, dict) else None
    return n if isinstance(n, int) and n > 0 else 1


TARGETS_FIELD = "return_target_logprobs"


def _flag(payload: dict[str, Any], field: str) -> bool:
    value = payload.pop(field, None)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"{field} must be true or false", field)
    return bool(value)


@dataclass(frozen=True)
class EngineNumbers:
    """What a body asks of the sampling pass's per-token numbers, once the middleware has
    read it: target log-probs, entropies, and whether the engine records (an id was set:
    always for an entropy-driven schedule, whose temperatures only the engine knows)."""

    targets: bool = False
    entropy: bool = False
    recorded: bool = False
    hide_ids: bool = False  # token ids were turned on only for the scoring fallback


def prepare_engine_numbers(payload: dict[str, Any], request: contract.Request, engine: Any) -> EngineNumbers:
    """Take ``return_target_logprobs`` and ``return_entropy`` out of a body and set what
    they need; raises a 400 naming the field where they cannot be given.

    Both are written beside the log-probs, so ``logprobs`` must be asked; streams are
    refused (``/v1/rollouts`` or ``stream: false`` give them). Target log-probs are
    computed from the behaviour log-probs, in the sampling pass where exact, else by a
    scoring pass; entropies and an entropy-driven schedule's temperatures come from the
    sampling pass only (the request contract's :func:`~ead_server.request_contract.engine_numbers_needed`).
    """
    targets, entropy = _flag(payload, TARGETS_FIELD), _flag(payload, contract.ENTROPY_FIELD)
    for field, wanted in ((TARGETS_FIELD, targets), (contract.ENTROPY_FIELD, entropy)):
        if not wanted:
            continue
        if payload.get("stream"):
            raise APIError(400, f"{field} is not available on streams: use stream=false or /v1/rollouts", field)
        if payload.get("logprobs") is None or payload.get("logprobs") is False:  # 0 asks for the sampled token
            raise APIError(400, f"{field} needs logprobs (its values are written beside them)", field)
    needed = contract.engine_numbers_needed(request, payload, engine, entropy=entropy, stream=bool(payload.get("stream")))
    hide_ids = targets and not payload.get("return_token_ids")
    if targets:
        payload["return_token_ids"] = True
    recorded = needed or (targets and contract.wants_in_pass(request, engine))
    if recorded:  # each prompt's engine call derives its own id (adapter's tap)
        payload["vllm_xargs"][contract.TARGET_KEY] = contract.new_target_id()
    return EngineNumbers(targets, entropy, recorded, hide_ids)


def refuse_schedule(path: str, payload: dict[str, Any]) -> None:
    """Raise a 400 naming the field when a request to a route that does not apply
    schedules carries one (as the field, in ``vllm_xargs`` or in
    ``sampling_params.extra_args``): sampling without it would be silent."""
    xargs = payload.get("vllm_xargs")
    params = payload.get("sampling_params")
    extra = params.get("extra_args") if isinstance(params, dict) else None
    for where, field in ((payload, SCHEDULE_KEY), (xargs, f"vllm_xargs.{SCHEDULE_KEY}"),
                         (extra, f"sampling_params.extra_args.{SCHEDULE_KEY}")):
        if isinstance(where, dict) and where.get(SCHEDULE_KEY) is not None:
            raise APIError(400, f"{path} does not take temperature_schedule as {field}; send scheduled requests "
                                f"to /v1/completions, /v1/chat/completions or /v1/rollouts (the field), vLLM's "
                                f"/inference/v1/generate (sampling_params.extra_args) or SGLang's /generate "
                                f"(sampling_params.custom_params)", field)


class _Decorator:
    """Adds our fields to one response's JSON objects (a body or each stream chunk).

    ``calls`` are the engine requests' version spans (one entry per prompt, recorded by
    the adapter as the handler runs): a choice gets its ``weight_versions`` once it has
    finished (the body, or its last stream chunk), and a body's ``weight_version`` is the
    version of its earliest first token. Stream chunks before that carry the version
    the request was admitted under.
    """

    def __init__(self, endpoint: str, request: contract.Request, version: int, n: int,
                 calls: list[EngineCall]) -> None:
        self.endpoint = endpoint
        self.request = request
        self.echo = request.echo
        self.version = version
        self.n = n  # choice index = prompt index * n + sample index (chat: one prompt)
        self.calls = calls
        self.offsets: dict[int, int] = defaultdict(int)  # choice index -> tokens seen (streaming)

    def _call(self, index: int) -> tuple[EngineCall | None, int]:
        """The engine call behind choice ``index``, and the sample's index in it."""
        call, sample = divmod(index, self.n)
        return (self.calls[call] if call < len(self.calls) else None), sample

    def _spans(self, index: int) -> list[dict[str, Any]] | None:
        call, sample = self._call(index)
        return call.spans.get(sample) if call is not None else None

    async def add_engine_numbers(self, obj: dict[str, Any], engine: Any, asked: EngineNumbers) -> None:
        """Each choice's numbers from the sampling pass (a finished, non-streamed body): an
        entropy-driven schedule's temperatures, target log-probs, entropies."""
        wanted = {}  # choice index -> in-pass id
        for index in (choice.get("index", 0) for choice in obj.get("choices") or ()):
            call, sample = self._call(index)
            if call is not None and call.target_id is not None:
                wanted[index] = contract.sample_target_ids(call.target_id, self.n)[sample]
        recorded = await vllm_engine.targets.collect(engine, list(wanted.values())) if wanted else {}
        driven = self.request.schedule is not None and self.request.schedule.entropy_driven

        async def one(choice: dict[str, Any]) -> None:
            index, logprobs = choice.get("index", 0), choice.get("logprobs") or {}
            found = recorded.get(wanted[index]) if index in wanted else None
            items = logprobs.get("token_logprobs" if self.endpoint == "completions" else "content") or []
            count = len(items)
            temps = self.request.temperatures(count, engine=column(found, TAU, count))
            if driven:
                self._write(logprobs, items, "temperatures", "temperature", temps)
            if asked.entropy:
                self._write(logprobs, items, "entropies", "entropy", column(found, ENTROPY, count))
                self._write(logprobs, items, "behavior_entropies", "behavior_entropy", column(found, ENTROPY_TAU, count))
            if not asked.targets:
                return
            behaviour = items if self.endpoint == "completions" else [item["logprob"] for item in items]
            prompt_ids = choice.get("prompt_token_ids") or obj.get("prompt_token_ids") or []
            values, source = await vllm_engine.sample_targets(
                engine, prompt_ids, choice.get("token_ids") or [], behaviour, temps, choice.get("weight_versions"),
                found, f"http-{uuid.uuid4().hex}")
            choice["target_logprobs_source"] = source
            self._write(logprobs, items, "target_logprobs", "target_logprob", values)

        await asyncio.gather(*(one(choice) for choice in obj.get("choices") or ()))
        if asked.hide_ids:
            obj.pop("prompt_token_ids", None)
            for choice in obj.get("choices") or ():
                choice.pop("token_ids", None), choice.pop("prompt_token_ids", None)

    def _write(self, logprobs: dict[str, Any], items: list[Any], field: str, per_token: str,
               values: list[Any] | None) -> None:
        """Per-token values beside the log-probs: a list in ``logprobs`` (completions), a
        field of each token's entry (chat and the token route)."""
        values = values if values is not None else [None] * len(items)
        if self.endpoint == "completions":
            logprobs[field] = values
        else:
            for item, value in zip(items, values):
                item[per_token] = value

    def __call__(self, obj: Any) -> Any:
        if not isinstance(obj, dict) or "error" in obj:
            return obj
        obj["weight_version"] = self.version
        firsts = []
        for choice in obj.get("choices") or ():
            spans = self._spans(choice.get("index", 0)) if choice.get("finish_reason") else None
            if spans:
                if self.endpoint != "generate":  # the token route has vLLM's own, which stay as vLLM writes them
                    choice["weight_versions"] = spans
                firsts.append(spans[0]["version"])
        if firsts and not any(choice.get("finish_reason") is None for choice in obj["choices"]):
            obj["weight_version"] = contract.response_version(firsts, self.version)
        if self.request.schedule is None:
            return obj
        for choice in obj.get("choices") or ():
            index = choice.get("index", 0)
            if index not in self.offsets:
                choice[SCHEDULE_KEY] = self.echo
                self.offsets[index] = 0
            logprobs = choice.get("logprobs")
            if not logprobs or self.request.schedule.entropy_driven:  # those come from the engine, with the body
                continue
            items = logprobs.get("token_logprobs" if self.endpoint == "completions" else "content") or []
            self._write(logprobs, items, "temperatures", "temperature",
                        self.request.temperatures(len(items), self.offsets[index]))
            self.offsets[index] += len(items)
        return obj


class ScheduleMiddleware:
    """Pure ASGI (not ``BaseHTTPMiddleware``) so that streamed chunks pass one by one."""

    def __init__(self, app: ASGIApp, gate: WeightGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or path in SCHEDULE_LEFT_ALONE:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        payload = parsed_body(scope)  # parsed, size- and depth-checked by the guard in front
        if payload is None:
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError):
                payload = None
        if not isinstance(payload, dict):  # vLLM answers malformed bodies itself
            await self.app(scope, replay_body(body, receive), send)
            return
        endpoint = ROUTES.get(path)
        if endpoint == "invocations":
            endpoint = "chat" if isinstance(payload.get("messages"), list) else "completions"
        try:
            if endpoint is None:
                refuse_schedule(path, payload)
            else:
                state = scope["app"].state.ead
                engine = state.engine
                prepare = prepare_generate if endpoint == "generate" else prepare_request
                request = prepare(payload, state.default_schedule())
                numbers = prepare_generate_numbers if endpoint == "generate" else prepare_engine_numbers
                asked = numbers(payload, request, engine)
                if endpoint == "chat":
                    check_conversation(payload.get("messages"))
        except APIError as exc:
            await send_error(send, exc)
            return
        if endpoint is None:
            await self.app(scope, replay_body(body, receive), send)
            return
        REQUESTS.labels(endpoint, request.schedule.type if request.schedule else "none").inc()
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        n = _samples_per_prompt(payload.get("sampling_params") if endpoint == "generate" else payload)
        async with self.gate.reading() as version:
            with recording_calls() as calls:
                decorate = _Decorator(endpoint, request, version, n, calls)
                finish = (partial(decorate.add_engine_numbers, engine=engine, asked=asked)
                          if asked.targets or asked.entropy or asked.recorded else None)
                await self.app(scope, replay_body(body, receive), _decorating_send(send, decorate, finish))


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _decorating_send(send: Send, decorate: _Decorator,
                     finish: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> Send:
    """Rewrite JSON bodies whole and server-sent events one event at a time; ``finish``
    completes a whole (non-streamed) body once it is known."""
    start: Message | None = None
    streaming = False
    buffer = b""

    async def wrapped(message: Message) -> None:
        nonlocal start, streaming, buffer
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            streaming = content_type.startswith(b"text/event-stream")
            if streaming:
                await send(message)
            else:
                start = message  # held until the whole body is known, for content-length
            return
        if message["type"] != "http.response.body":
            await send(message)
            return
        buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if streaming:
            *events, buffer = buffer.split(b"\n\n")
            out = b"".join(_rewrite_event(e, decorate) + b"\n\n" for e in events)
            if not more and buffer:
                out, buffer = out + _rewrite_event(buffer, decorate), b""
            if out or not more:
                await send({"type": "http.response.body", "body": out, "more_body": more})
            return
        if more:
            return
        assert start is not None
        body = buffer
        if start["status"] == 200:
            try:
                obj = decorate(json.loads(body))
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                if finish is not None:
                    await finish(obj)
                body = json.dumps(obj).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _rewrite_event(event: bytes, decorate: _Decorator) -> bytes:
    prefix = b"data: "
    if not event.startswith(prefix) or event == b"data: [DONE]":
        return event
    if decorate.request.schedule is None and _only_gains_version(event):
        # The profile's largest share of this module under streaming was json.loads +
        # json.dumps of every event (docs/performance.md); most events gain one field.
        return b'data: {"weight_version":%d,' % decorate.version + event[len(prefix) + 1:]
    try:
        obj = json.loads(event[len(prefix):])
    except ValueError:
        return event
    return prefix + json.dumps(decorate(obj)).encode()


def _only_gains_version(event: bytes) -> bool:
    """An unscheduled stream chunk to which :class:`_Decorator` adds ``weight_version``
    alone: a JSON object (vLLM writes it compact) with no error, no finished choice (those
    gain their spans) and no field of ours yet."""
    return (event.startswith(b"data: {") and event.endswith(b"}") and b'"error"' not in event
            and b'"weight_version' not in event and b'"finish_reason":null' in event
            and event.count(b'"finish_reason":') == event.count(b'"finish_reason":null'))
