"""Temperature schedules of Exploratory Annealed Decoding: the single source of truth.

Everything that needs a schedule's temperature -- the vLLM adapter (to fill the kernel's
per-row parameters), the HTTP layer (to validate requests and echo per-token
temperatures), the RL client and the benchmark -- goes through this module. It imports
neither torch nor vLLM so that the light installs (client, bench) can use it.

Notation (docs/design.md, "Temperature schedules"): ``t`` counts the tokens a completion generated *before* the
token being sampled, so the first sampled token has ``t = 0``.

=========  ==========================================================================
type       temperature of the token sampled after ``t`` generated tokens
=========  ==========================================================================
ead        ``1.0`` if ``t < c`` else ``max(1 + tau_max - exp(t / (k d)), tau_min)``
reverse    ``1.0`` if ``t < c`` else ``min(tau_min + exp(t / (k d)), tau_max)``
constant   ``tau`` for every token (no warm-up)
entropy    ``tau_min + (tau_max - tau_min) * min(1, H_t / h_max) ** exponent``
=========  ==========================================================================

``d`` is either a fixed ``decay`` or the global-step-aware ``min(d0 + alpha * step, d_max)``.
``H_t`` is the entropy (nats) of ``softmax(h_t)`` at temperature 1, the logits the token
is sampled from. ``ead`` with ``"clock": "entropy"`` replaces ``t`` inside ``exp`` by
``t_eff = sum_{i<t} H_i / h_ref`` (the warm-up still counts tokens). These two
*entropy-driven* schedules (:attr:`ResolvedSchedule.entropy_driven`) are known only to
the engine, which sees ``H``; the host never recomputes their temperatures.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ANNEALED_TYPES",
    "DecaySchedule",
    "PRESETS",
    "ResolvedSchedule",
    "ScheduleError",
    "TemperatureSchedule",
    "effective_decay",
    "parse_schedule",
    "entropy_temperature",
    "schedule_temperature",
    "spec_from_text",
]

ScheduleType = Literal["ead", "reverse", "constant", "entropy"]
ANNEALED_TYPES = ("ead", "reverse")
"""The types with a warm-up and a decay (``warmup``, ``time_scale``, ``decay``); the
others sample every token by their own rule from the first one."""
Clock = Literal["tokens", "entropy"]
PresetName = Literal["paper", "released-code"]

# Strict types: JSON numbers only (ints are accepted where floats are expected), no
# strings or booleans coerced into numbers, and no NaN or infinity.
PositiveFloat = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]


class ScheduleError(ValueError):
    """An invalid schedule. ``param`` is the dotted path of the offending field.

    The HTTP layer turns it into an OpenAI-style 400 whose ``param`` is
    ``temperature_schedule.<param>``, so a caller can tell which field to fix.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param
        self.message = message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecaySchedule(_Strict):
    """Global-step-aware decay ``d = min(d0 + alpha * step, d_max)`` (paper section 4).

    Fields left out take the preset's values, so a trainer may send only ``step``.
    """

    d0: PositiveFloat | None = None
    alpha: NonNegativeFloat | None = None
    d_max: PositiveFloat | None = None
    step: NonNegativeInt | None = None


class _ResolvedDecaySchedule(_Strict):
    d0: PositiveFloat
    alpha: NonNegativeFloat
    d_max: PositiveFloat
    step: NonNegativeInt


def effective_decay(d0: float, alpha: float, d_max: float, step: int) -> float:
    """The decay ``d`` in force at global ``step``: grows linearly, capped at ``d_max``."""
    return min(d0 + alpha * step, d_max)


class TemperatureSchedule(_Strict):
    """A schedule as a request gives it: every field optional, see :meth:`resolve`.

    This is the ``temperature_schedule`` object of the HTTP API, the RL client and the
    benchmark; its field names are the contract shared by all of them.
    """

    type: ScheduleType | None = None
    preset: PresetName | None = None
    tau_max: PositiveFloat | None = None
    tau_min: PositiveFloat | None = None
    tau: PositiveFloat | None = None
    warmup: NonNegativeInt | None = None
    time_scale: PositiveFloat | None = None
    decay: PositiveFloat | None = None
    decay_schedule: DecaySchedule | None = None
    clock: Clock | None = None
    h_max: PositiveFloat | None = None
    exponent: PositiveFloat | None = None
    h_ref: PositiveFloat | None = None

    def resolve(self) -> ResolvedSchedule:
        """Fill every field from the preset (``paper`` when none is named), then check it.

        Explicit fields override the preset's. ``decay`` replaces the preset's
        ``decay_schedule`` and vice versa; both in one request is an error.
        """
        if self.decay is not None and self.decay_schedule is not None:
            raise ScheduleError("decay", "give either 'decay' or 'decay_schedule', not both")
        base = PRESETS[self.preset or "paper"]
        given = self.model_dump(exclude_none=True, exclude={"decay_schedule", "preset"})
        fields: dict[str, Any] = {**base, **given, "preset": self.preset}
        if self.decay is not None:
            fields["decay_schedule"] = None
        else:
            overrides = self.decay_schedule.model_dump(exclude_none=True) if self.decay_schedule else {}
            ds = _ResolvedDecaySchedule(**{**base["decay_schedule"], **overrides})
            if ds.d_max < ds.d0:
                raise ScheduleError("decay_schedule.d_max", f"d_max ({ds.d_max}) must be >= d0 ({ds.d0})")
            fields["decay_schedule"] = ds
            fields["decay"] = effective_decay(ds.d0, ds.alpha, ds.d_max, ds.step)
        if fields["tau_min"] > fields["tau_max"]:
            raise ScheduleError(
                "tau_min", f"tau_min ({fields['tau_min']}) must not exceed tau_max ({fields['tau_max']})"
            )
        if fields["clock"] == "entropy" and fields["type"] != "ead":
            raise ScheduleError("clock", f"the entropy clock drives the ead schedule only, not {fields['type']!r}")
        return ResolvedSchedule(**fields)


class ResolvedSchedule(_Strict):
    """A schedule with every field filled: what the engine applies and responses echo.

    ``decay`` is the effective ``d``; ``decay_schedule`` is kept (or ``None`` when a
    fixed ``decay`` was given) so the echo shows where ``d`` came from. ``tau`` is used
    by ``constant`` only; ``tau_max`` and ``tau_min`` by every other type; ``warmup``,
    ``time_scale``, ``decay`` and ``clock`` by ``ead`` and ``reverse``, ``h_ref`` by the
    entropy clock; ``h_max`` and ``exponent`` by ``entropy``.
    """

    type: ScheduleType
    preset: PresetName | None
    tau_max: PositiveFloat
    tau_min: PositiveFloat
    tau: PositiveFloat
    warmup: NonNegativeInt
    time_scale: PositiveFloat
    decay: PositiveFloat
    decay_schedule: _ResolvedDecaySchedule | None
    clock: Clock
    h_max: PositiveFloat
    exponent: PositiveFloat
    h_ref: PositiveFloat

    @property
    def entropy_driven(self) -> bool:
        """Whether each temperature depends on the model's entropies, which only the engine
        sees: the ``entropy`` type and the entropy clock. Such a schedule's temperatures
        come back from the engine with the tokens; the host cannot recompute them."""
        return self.type == "entropy" or self.clock == "entropy"

    def as_request(self) -> dict[str, Any]:
        """A request-form spec that resolves to exactly this schedule.

        The echoed form carries both ``decay`` and ``decay_schedule``, which a request
        may not; this one is what a client can resend.
        """
        spec = self.model_dump(exclude_none=True)
        spec.pop("decay" if self.decay_schedule is not None else "decay_schedule", None)
        return spec

    @functools.cached_property
    def wire(self) -> str:
        """The one form in which a schedule travels to the engine: canonical JSON of
        :meth:`as_request`. A string because vLLM's ``vllm_xargs`` carries flat values
        only; canonical so that every route's copy of one schedule hits the engine's
        parse cache (:func:`parse_schedule`) under one key."""
        return json.dumps(self.as_request(), sort_keys=True, separators=(",", ":"))

    @property
    def scale(self) -> float:
        """``k * d``: the exponent's time constant, ``exp(t / scale)``."""
        return self.time_scale * self.decay

    def kernel_params(self) -> dict[str, float]:
        """The numbers the sampling kernel needs, named as its ``PARAM_COLUMNS``.

        The adapter packs them by name, so neither side depends on a column order.
        """
        return {"tau_max": self.tau_max, "tau_min": self.tau_min, "tau": self.tau,
                "warmup": float(self.warmup), "scale": self.scale, "h_max": self.h_max,
                "exponent": self.exponent, "h_ref": self.h_ref if self.clock == "entropy" else 0.0}

    def temperature(self, t: int, entropy: float = 0.0, clock: float = 0.0) -> float:
        """Temperature of the token sampled after ``t`` generated tokens; an entropy-driven
        schedule also needs ``entropy`` (``H_t``) or ``clock`` (``sum_{i<t} H_i``)."""
        return schedule_temperature(
            self.type, t, tau_max=self.tau_max, tau_min=self.tau_min, tau=self.tau,
            warmup=self.warmup, scale=self.scale, h_max=self.h_max, exponent=self.exponent,
            h_ref=self.h_ref if self.clock == "entropy" else 0.0, entropy=entropy, clock=clock,
        )

    def anneal_end(self) -> int | None:
        """The first ``t`` at which an annealed schedule sits at its final temperature
        (``tau_min`` for ``ead``, ``tau_max`` for ``reverse``); ``None`` for ``constant``
        and for the entropy-driven schedules, whose end depends on the rollout.

        Closed form: ``exp(t / scale)`` reaches ``1 + tau_max - tau_min`` (ead) or
        ``tau_max - tau_min`` (reverse) at ``t* = scale * log(.)``; the answer is
        ``max(warmup, ceil(t*))``, nudged by a step where float rounding of the
        schedule itself decides, so it agrees with :meth:`temperature` exactly.
        """
        if self.type not in ANNEALED_TYPES or self.clock == "entropy":
            return None
        final, gap = (self.tau_min, 1.0 + self.tau_max - self.tau_min) if self.type == "ead" else (
            self.tau_max, self.tau_max - self.tau_min)
        t = self.warmup if gap <= 0 else max(self.warmup, math.ceil(self.scale * math.log(gap)))
        while t > self.warmup and self.temperature(t - 1) == final:
            t -= 1
        while self.temperature(t) != final:
            t += 1
        return t

    def temperatures(self, n: int) -> list[float]:
        """Temperatures of the first ``n`` tokens of a completion (not entropy-driven)."""
        if self.entropy_driven:
            raise ValueError("an entropy-driven schedule's temperatures come from the engine")
        return [self.temperature(t) for t in range(n)]


def entropy_temperature(entropy: float, *, tau_max: float, tau_min: float, h_max: float, exponent: float) -> float:
    """The ``entropy`` type: ``tau_min + (tau_max - tau_min) * min(1, H / h_max) ** exponent``.

    ``H`` below 0 (rounding) counts as 0, and a ``NaN`` entropy (a row of ``NaN`` logits,
    which nothing upstream refuses) as 0 too: the coldest temperature, never a ``NaN``.
    """
    ratio = entropy / h_max if entropy == entropy else 0.0
    return tau_min + (tau_max - tau_min) * min(1.0, max(ratio, 0.0)) ** exponent


def schedule_temperature(
    type: ScheduleType, t: int, *, tau_max: float, tau_min: float, tau: float, warmup: int, scale: float,
    h_max: float = 1.0, exponent: float = 1.0, h_ref: float = 0.0, entropy: float = 0.0, clock: float = 0.0,
) -> float:
    """The formula table of docs/design.md ("Formulas"), with ``scale = k * d``.

    ``h_ref > 0`` selects the entropy clock: ``exp(clock / h_ref / scale)`` in place of
    ``exp(t / scale)``, where ``clock = sum_{i<t} H_i``; the warm-up still counts tokens.
    Kept as a free function over plain numbers so the kernel tests can compare the
    kernel with it row by row without building spec objects.
    """
    if type == "constant":
        return tau
    if type == "entropy":
        return entropy_temperature(entropy, tau_max=tau_max, tau_min=tau_min, h_max=h_max, exponent=exponent)
    if t < warmup:
        return 1.0
    elapsed = clock / h_ref if h_ref > 0 else t
    try:
        growth = math.exp(elapsed / scale)
    except OverflowError:  # far past the end of the anneal: the clamp decides
        growth = math.inf
    if type == "ead":
        return max(1.0 + tau_max - growth, tau_min)
    return min(tau_min + growth, tau_max)


_PAPER: dict[str, Any] = {
    "type": "ead",
    "tau_max": 1.2,
    "tau_min": 0.1,
    "tau": 1.0,
    "warmup": 10,
    "time_scale": 1.0,
    "decay_schedule": {"d0": 25.0, "alpha": 5.0, "d_max": 40000.0, "step": 0},
    "clock": "tokens",
    # The embedded model at T = 1 on the benchmark prompts: h_max its p90 entropy, h_ref its
    # mean, so the entropy clock keeps the token clock's pace on average (docs/entropy-measurement.md).
    "h_max": 4.0,
    "exponent": 1.0,
    "h_ref": 1.8,
}

PRESETS: dict[str, dict[str, Any]] = {
    # k = 1: exp(t / d) as the paper's text writes it.
    "paper": _PAPER,
    # k = 20: exp(len(token_ids) / (20 d)) as the authors' released code computes it.
    "released-code": {**_PAPER, "time_scale": 20.0},
}


def parse_schedule(value: TemperatureSchedule | dict[str, Any] | str) -> ResolvedSchedule:
    """Validate and resolve a schedule given as a spec object, a dict or a JSON string.

    The string form is what stock ``vllm serve`` users send through ``vllm_xargs``,
    which only carries flat values, and the one form ead-server hands the engine
    (:attr:`ResolvedSchedule.wire`). Strings and JSON-able dicts go through one bounded
    cache, so a schedule a trainer sends for a whole step is validated once per process,
    wherever it arrives. Every failure is a :class:`ScheduleError` that names the field.
    """
    if isinstance(value, str):
        return _parse_json(value)
    if isinstance(value, TemperatureSchedule):
        return value.resolve()
    if not isinstance(value, dict):
        raise ScheduleError("", f"temperature_schedule must be a JSON object, got {type(value).__name__}")
    try:
        key = json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):  # not JSON (an in-process caller's objects, NaN): validated uncached
        return _validate(value)
    return _parse_json(key)


def _validate(value: dict[str, Any]) -> ResolvedSchedule:
    try:
        spec = TemperatureSchedule.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ScheduleError(".".join(str(p) for p in err["loc"]), err["msg"]) from None
    return spec.resolve()


@functools.lru_cache(maxsize=4096)
def _parse_json(text: str) -> ResolvedSchedule:
    """A schedule's text, parsed once: one request's schedule is read by the route, by
    ``validate_params`` and by the processor, and a trainer sends the same schedule for
    a whole step. Bounded, because ``decay_schedule.step`` makes a new one every
    training step; results are frozen, so sharing them is safe. Errors are not cached.
    """
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ScheduleError("", f"temperature_schedule is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ScheduleError("", f"temperature_schedule must be a JSON object, got {type(value).__name__}")
    return _validate(value)


def spec_from_text(text: str) -> dict[str, Any]:
    """A schedule written as text, in the one syntax of every place that takes it as text
    (``ead-server serve --temperature-schedule``, ``$EAD_TEMPERATURE_SCHEDULE``, the
    benchmarks' schedules and arms), as a request-form spec for :func:`parse_schedule`:

    * a JSON object: ``{"type": "ead", "tau_min": 0.8}``;
    * a preset name: ``paper``, ``released-code``;
    * ``TYPE[:key=value,...]``: ``ead:preset=paper,decay=25``, dotted keys reaching into
      ``decay_schedule`` (``decay_schedule.step=100``), values JSON numbers or bare words;
      ``constant:0.6`` is short for ``constant:tau=0.6``.

    Raises :class:`ScheduleError` naming the field for text it cannot read.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ScheduleError("", f"temperature_schedule is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ScheduleError("", "temperature_schedule must be a JSON object")
        return value
    if text in PRESETS:
        return {"preset": text}
    head, _, rest = text.partition(":")
    spec: dict[str, Any] = {"type": head.strip()}
    items = [part.strip() for part in rest.split(",") if part.strip()]
    if head.strip() == "constant" and len(items) == 1 and "=" not in items[0]:
        items = [f"tau={items[0]}"]
    for item in items:
        key, eq, raw = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ScheduleError("", f"expected key=value, got {item!r}")
        target = spec
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ScheduleError(key, "is not an object")
        if leaf in target:
            raise ScheduleError(key, "given twice")
        target[leaf] = _text_value(raw)
    return spec


def _text_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # bare words such as preset=released-code
