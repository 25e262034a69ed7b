"""What a request with a ``temperature_schedule`` may combine it with: one home for the rules.

Every path that takes a schedule applies these rules, so none can drift from another:
the OpenAI routes (through the middleware), ``/v1/rollouts``, the logits processor's
``validate_params`` (which is what stock ``vllm serve`` and ``LLM(...)`` call), and the
benchmark's requests. SPEC section 1 is the reference:

* A schedule sets every token's temperature, so ``temperature`` is unset or 1.0; any
  other value is refused, 0 (greedy) included, because greedy decoding would silently
  ignore the schedule the caller asked for.
* Scheduled requests sample with no truncation and no penalties unless they set them
  (:data:`NEUTRAL_SAMPLING`), whatever the model's ``generation_config`` suggests.
* A refused schedule names its field as ``temperature_schedule.<field>`` (or under the
  key the caller used, e.g. ``vllm_xargs.temperature_schedule``).

It imports neither torch nor vLLM, so the light install (client, bench) can use it.
"""

from __future__ import annotations

from typing import Any

from ead_server.schedule import ResolvedSchedule, ScheduleError, parse_schedule

__all__ = ["NEUTRAL_SAMPLING", "SCHEDULE_KEY", "PolicyError", "check_temperature", "resolve_schedule"]

SCHEDULE_KEY = "temperature_schedule"
"""The request field, and the ``SamplingParams.extra_args`` key (``vllm_xargs`` over HTTP)."""

NEUTRAL_SAMPLING: dict[str, float | int] = {
    "top_p": 1.0, "top_k": 0, "min_p": 0.0,
    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
}
"""Sampling settings a scheduled request gets for every field it leaves unset (``top_k``
0 is vLLM's "disabled")."""


class PolicyError(ValueError):
    """A request the rules refuse; ``param`` is the full dotted name of the field to fix
    (``None`` where vLLM, whose checks some paths share, names none)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def resolve_schedule(raw: Any, key: str = SCHEDULE_KEY) -> ResolvedSchedule | None:
    """The schedule a request gives under ``key`` (an object or its JSON string), or ``None``.

    Raises :class:`PolicyError` whose ``param`` is ``key`` plus the offending field.
    """
    if raw is None:
        return None
    try:
        return parse_schedule(raw)
    except ScheduleError as exc:
        param = f"{key}.{exc.param}" if exc.param else key
        raise PolicyError(f"invalid {key}: {exc.message}", param) from None


def check_temperature(temperature: float | None) -> None:
    """Refuse a ``temperature`` that conflicts with a schedule (anything but unset or 1)."""
    if temperature is None or temperature == 1:
        return
    why = "greedy decoding (temperature 0) would ignore it" if temperature == 0 else "both would set the temperature"
    raise PolicyError(f"temperature_schedule sets every token's temperature, so temperature must be unset or 1.0 "
                      f"({why}); got temperature={temperature!r}", "temperature")
