"""The request contract: the per-request rules of every route that generates, in one home.

``docs/design.md`` ("The request contract") states these rules for users; this module is
where each of them is written, once. It imports neither torch, vLLM nor a web framework,
so the light install (the RL client, the benchmark) and the engine's logits processor use
the same rules as the HTTP routes.

What a generating route does, and all it has to do:

1. **Read** the request with :func:`read_request`, giving each spelling of the schedule
   its protocol allows as ``(dotted field name, raw value)`` and the request's
   ``temperature``. That resolves the schedule (through the parse cache), refuses two
   spellings, checks the temperature against it, and applies a server-wide default
   schedule where :func:`default_applies` says so. Every refusal is an
   :class:`~ead_server.errors.APIError` 400 whose ``param`` names the field to fix.
2. **Ask** the engine with :meth:`Request.sampling` (temperature 1 and the neutral
   sampling settings for fields the request left unset, when scheduled) and
   :meth:`Request.extra_args` (the schedule in its one wire form,
   :attr:`~ead_server.schedule.ResolvedSchedule.wire`, under :data:`SCHEDULE_KEY`). If it
   returns target log-probs, it asks for in-pass numbers with :func:`wants_in_pass` and
   the id scheme below.
3. **Report** each token's temperature with :meth:`Request.temperatures`, the resolved
   schedule with :attr:`Request.echo`, and the body's weight version with
   :func:`response_version`.

An *entropy-driven* schedule (and ``return_entropy``) needs the engine's own per-token
numbers back: :func:`engine_numbers_needed` says whether a request needs them, and refuses
it (400) where they cannot come back; the route then records under the id scheme below and
hands the engine's temperatures to :meth:`Request.temperatures`.

A new route writes only its own request and response shapes around these calls.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ead_server.errors import APIError
from ead_server.schedule import ResolvedSchedule, ScheduleError, parse_schedule, spec_from_text

__all__ = [
    "DEFAULT_MAX_TOKENS", "DEFAULT_SCHEDULE_ENV", "DEFAULT_TEMPERATURE", "ENTROPY_FIELD", "NEUTRAL_SAMPLING", "SCHEDULE_KEY", "STEP_FROM_WEIGHTS", "TARGET_KEY",
    "DefaultSchedule", "Request",
    "check_temperature", "default_applies", "eligible_for_in_pass", "engine_numbers_needed", "in_pass_possible",
    "new_target_id",
    "prompt_target_id", "read_request", "resolve_schedule", "response_version", "sample_target_ids", "wants_in_pass",
]

SCHEDULE_KEY = "temperature_schedule"
"""The request field, and the ``SamplingParams.extra_args`` key (``vllm_xargs`` over HTTP)."""

DEFAULT_TEMPERATURE = 1.0
"""The temperature of a request that sets neither ``temperature`` nor a schedule."""

DEFAULT_MAX_TOKENS = 1024
"""Tokens per sample when a rollout request sets no ``max_tokens`` (route and client)."""

NEUTRAL_SAMPLING: dict[str, float | int] = {
    "top_p": 1.0, "top_k": 0, "min_p": 0.0,
    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
}
"""Sampling settings a scheduled request gets for every field it leaves unset (``top_k``
0 is vLLM's "disabled"), whatever the model's ``generation_config`` suggests."""


# --------------------------------------------------------------------------- the schedule


def resolve_schedule(raw: Any, key: str = SCHEDULE_KEY) -> ResolvedSchedule | None:
    """The schedule a request gives under ``key`` (an object or its JSON string), or ``None``.

    Raises a 400 whose ``param`` is ``key`` plus the offending field.
    """
    if raw is None:
        return None
    try:
        return parse_schedule(raw)
    except ScheduleError as exc:
        raise APIError(400, f"invalid {key}: {exc.message}", f"{key}.{exc.param}" if exc.param else key) from None


def check_temperature(temperature: float | None) -> None:
    """A schedule sets every token's temperature, so ``temperature`` is unset or 1.0. Any
    other value is refused, 0 included: greedy decoding would silently ignore the schedule."""
    if temperature is None or temperature == 1:
        return
    why = "greedy decoding (temperature 0) would ignore it" if temperature == 0 else "both would set the temperature"
    raise APIError(400, f"temperature_schedule sets every token's temperature, so temperature must be unset or 1.0 "
                        f"({why}); got temperature={temperature!r}", "temperature")


def default_applies(temperature: float | None) -> bool:
    """Whether a default schedule (server-wide or in-process) applies to a request that
    brings none: only to sampling at temperature unset or 1.0. Greedy requests and other
    explicit temperatures are served as asked, never refused."""
    return temperature is None or temperature == 1


DEFAULT_SCHEDULE_ENV = "EAD_TEMPERATURE_SCHEDULE"
"""The environment variable of a default schedule: the in-process one (read by the logits
processor) and, under ``ead-server serve``, the server-wide one."""

STEP_FROM_WEIGHTS = "weights"
"""``decay_schedule.step`` of a default schedule that follows training: the server's weight
version (every RL step ends in one weight update), so the trainer sends nothing."""


@dataclass(frozen=True)
class DefaultSchedule:
    """A schedule nobody sent: the server-wide ``serve --temperature-schedule`` or the
    in-process ``$EAD_TEMPERATURE_SCHEDULE``, applied where :func:`default_applies` says.

    ``spec`` is in request form, except that ``decay_schedule.step`` may be
    :data:`STEP_FROM_WEIGHTS`; then the step is ``version - base_version + step_offset``.
    The version counts weight changes since the server started (it restarts at 0 with the
    server, and several runs sharing one server all advance it), hence the offset.
    """

    spec: dict[str, Any]
    step_offset: int = 0
    base_version: int = 0

    @classmethod
    def from_text(cls, text: str, *, step_offset: int = 0, where: str = "--temperature-schedule") -> DefaultSchedule:
        """Read and validate a default written as text (a preset name, JSON, or
        ``TYPE:key=value,...``: :func:`~ead_server.schedule.spec_from_text`); raises
        ``ValueError`` naming ``where`` and the field."""
        try:
            default = cls(spec_from_text(text), step_offset)
            default.resolve(0)
        except ScheduleError as exc:
            raise ValueError(f"{where}: invalid schedule {text!r}: {exc}") from None
        if step_offset < 0:
            raise ValueError(f"{where}: the step offset must be >= 0, got {step_offset}")
        return default

    @property
    def follows_weights(self) -> bool:
        """Whether the decay's step is the server's weight version."""
        return (self.spec.get("decay_schedule") or {}).get("step") == STEP_FROM_WEIGHTS

    def describe(self, version: int) -> dict[str, Any]:
        """What ``GET /v1/limits`` shows: the default as configured, and as it resolves now."""
        return {"spec": self.spec, "step_offset": self.step_offset, "follows_weights": self.follows_weights,
                "resolved": self.resolve(version).model_dump()}

    def resolve(self, version: int) -> ResolvedSchedule:
        """The schedule in force while weight version ``version`` serves."""
        spec = self.spec
        if self.follows_weights:
            step = max(version - self.base_version, 0) + self.step_offset
            spec = {**spec, "decay_schedule": {**spec["decay_schedule"], "step": step}}
        return parse_schedule(spec)


@dataclass(frozen=True)
class Request:
    """One generating request as the contract sees it: its schedule (its own or the
    default) and the fixed temperature it samples at without one."""

    schedule: ResolvedSchedule | None
    temperature: float = DEFAULT_TEMPERATURE

    @property
    def echo(self) -> dict[str, Any] | None:
        """The resolved schedule as every choice or rollout reports it."""
        return self.schedule.model_dump() if self.schedule else None

    def sampling(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The sampling fields to set, given the ones the request set (``None`` = unset):
        under a schedule, temperature 1 (the processor scales each token) and the neutral
        settings for what is unset, so that nothing but the schedule shapes the draw."""
        if self.schedule is None:
            return {}
        return {"temperature": 1.0, **{k: v for k, v in NEUTRAL_SAMPLING.items() if given.get(k) is None}}

    def extra_args(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """``extra_args`` (``vllm_xargs``) for the engine: ``extra`` plus the schedule's wire form."""
        if self.schedule is None:
            return dict(extra) if extra else None
        return {**(extra or {}), SCHEDULE_KEY: self.schedule.wire}

    def temperatures(self, count: int, start: int = 0, engine: list[float | None] | None = None) -> list[float]:
        """The temperatures tokens ``start`` to ``start + count`` were sampled at: the
        schedule's formula of ``t``, exactly as the kernel computes it, or the fixed one.
        An entropy-driven schedule's come from the engine (``engine``: the temperatures it
        recorded for the tokens), which the host cannot recompute.

        The one place responses take temperatures from.
        """
        if self.schedule is None:
            return [self.temperature] * count
        if not self.schedule.entropy_driven:
            return [self.schedule.temperature(t) for t in range(start, start + count)]
        if engine is None or len(engine) < count or any(value is None for value in engine[:count]):
            raise APIError(500, "the engine did not report the temperatures of this entropy-driven schedule; the "
                                "request was served, but its temperatures are unknown")
        return [float(value) for value in engine[:count]]  # type: ignore[arg-type]


def read_request(spellings: Iterable[tuple[str, Any]], temperature: float | None,
                 default: ResolvedSchedule | None = None) -> Request:
    """The contract's reading of a request (module docstring, step 1).

    ``spellings`` are the places a protocol lets a schedule be given, as ``(field name,
    raw value)``; at most one may be set. The request's own schedule always wins; else
    ``default`` applies where :func:`default_applies` says so.
    """
    given = [(key, raw) for key, raw in spellings if raw is not None]
    if len(given) > 1:
        raise APIError(400, f"give the schedule once, not as {' and '.join(key for key, _ in given)}", given[0][0])
    if given:
        schedule = resolve_schedule(given[0][1], given[0][0])
        check_temperature(temperature)
        return Request(schedule)
    if default is not None and default_applies(temperature):
        return Request(default)
    return Request(None, DEFAULT_TEMPERATURE if temperature is None else temperature)


def response_version(first_versions: Iterable[int], admitted: int) -> int:
    """A response body's ``weight_version``: the earliest first token's version among its
    completions, else the version the request was admitted under."""
    return min(first_versions, default=admitted)


# --------------------------------------------------------------------------- in-pass targets

TARGET_KEY = "ead_target_id"
"""The ``extra_args`` key of a request that wants in-pass target log-probs (its id)."""


def new_target_id() -> str:
    """A request's base id for in-pass numbers; its prompts and samples derive theirs."""
    return f"ead-{uuid.uuid4().hex}"


def prompt_target_id(base: str, prompt_index: int) -> str:
    """The id of one prompt's engine request (a route makes one per prompt)."""
    return f"{base}/{prompt_index}"


def sample_target_id(prompt_id: str, sample_index: int) -> str:
    """The id sample ``sample_index`` of an ``n > 1`` request records under (vLLM's
    fan-out gives each sample its parent's ``extra_args``; the adapter's seed patch
    rewrites the id with this)."""
    return f"{prompt_id}:{sample_index}"


def sample_target_ids(prompt_id: str, n: int) -> list[str]:
    """The ids a prompt's ``n`` samples record under (the prompt's own for ``n == 1``)."""
    return [prompt_id] if n == 1 else [sample_target_id(prompt_id, i) for i in range(n)]


def in_pass_possible(engine: Any) -> bool:
    """The engine can hand in-pass numbers back: one data-parallel rank (a
    ``collective_rpc`` answers from the first engine only) and no speculative decoding
    (several rows per request, not all of them sampled)."""
    config = engine.vllm_config
    return config.parallel_config.data_parallel_size == 1 and config.speculative_config is None


def wants_in_pass(request: Request, engine: Any) -> bool:
    """Whether a route asking for target log-probs asks the processor for in-pass numbers:
    only scheduled requests pass through it, on an engine that can hand them back. The
    processor records only rows :func:`eligible_for_in_pass`; anything else is scored."""
    return request.schedule is not None and in_pass_possible(engine)


ENTROPY_FIELD = "return_entropy"
"""The request field asking for each token's entropies (at temperature 1 and sampled)."""

_LOGIT_CHANGES = ("logit_bias", "allowed_token_ids", "bad_words", "min_tokens", "response_format",
                  "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
"""Request fields (OpenAI routes and ``/v1/rollouts``) that change logits besides the
schedule; with them set, the in-pass numbers are not the sampled distribution's."""


def engine_numbers_needed(request: Request, fields: Mapping[str, Any], engine: Any, *, entropy: bool = False,
                          stream: bool = False, param_name: Callable[[str], str] = str) -> bool:
    """Whether a request needs the engine's per-token numbers back (an entropy-driven
    schedule, or ``entropy`` asked), raising a 400 where they cannot come back.

    They come from the sampling pass (``ead_server.vllm_adapter.targets``), which records
    them only where nothing but the schedule shapes the distribution, so the behaviour
    entropy is that of the distribution sampled from: no truncation, penalties or other
    logit changes (``fields``: the sampling fields the request set, named as vLLM's
    ``SamplingParams`` and the OpenAI routes name them; ``param_name`` gives a refusal's
    ``param`` in the route's own protocol), no stream, one data-parallel rank and no
    speculative decoding.
    """
    driven = request.schedule is not None and request.schedule.entropy_driven
    if not (driven or entropy):
        return False
    if request.schedule is None:
        raise APIError(400, f"{ENTROPY_FIELD} takes the entropies from the schedule's sampling pass: give a "
                            f"temperature_schedule (for a fixed temperature, {{\"type\": \"constant\", \"tau\": T}})",
                       ENTROPY_FIELD)
    what, param = ("an entropy-driven temperature_schedule", param_name(SCHEDULE_KEY)) if driven else (
        ENTROPY_FIELD, ENTROPY_FIELD)
    why = (f"{what} needs each token's numbers from the engine's sampling pass "
           f"(the host cannot recompute them)")
    if stream:
        raise APIError(400, f"{why}, which come back with the whole response: use stream=false or /v1/rollouts",
                       param_name("stream"))
    if not in_pass_possible(engine):
        raise APIError(400, f"{why}, which come back from one data-parallel rank without speculative decoding only",
                       param)
    for key, neutral in NEUTRAL_SAMPLING.items():
        value = fields.get(key)
        if value is not None and value != neutral and not (key == "top_k" and value == -1):
            raise APIError(400, f"{why}, which are taken where nothing but the schedule shapes the distribution: "
                                f"leave {param_name(key)} unset", param_name(key))
    for key in _LOGIT_CHANGES:
        value = fields.get(key)
        if value and not (key == "response_format" and isinstance(value, dict) and value.get("type") == "text"):
            raise APIError(400, f"{why}, which are taken where nothing but the schedule shapes the distribution: "
                                f"{param_name(key)} changes the logits", param_name(key))
    return True


def eligible_for_in_pass(params: Any) -> bool:
    """Whether the in-pass formula is exact for a request's final ``SamplingParams``:
    nothing but the EAD processor and vLLM's temperature (1 under a schedule) touches its
    logits (``ead_server.vllm_adapter.targets`` derives the formula)."""
    return (params.top_k in (0, -1) and params.top_p >= 1.0 and params.min_p <= 0.0
            and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and not params.logit_bias and not params.allowed_token_ids
            and not params.bad_words and params.min_tokens == 0 and params.structured_outputs is None)
