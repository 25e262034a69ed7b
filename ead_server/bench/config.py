"""What a run is: the schedules it compares and the settings its samples depend on.

``--schedules`` takes ``TYPE:key=value,key=value`` (e.g. ``ead:preset=paper,decay=25``);
keys are the fields of :class:`ead_server.schedule.TemperatureSchedule`, dotted keys reach
into ``decay_schedule`` (``decay_schedule.step=100``), values are JSON numbers or bare
strings, and an optional ``label=...`` names the line in the report (default: the
argument itself). The schedule itself is validated by :func:`ead_server.schedule.parse_schedule`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ead_server.schedule import ResolvedSchedule, ScheduleError, parse_schedule

__all__ = [
    "LOCAL_KEYS",
    "RESUME_KEYS",
    "BenchSchedule",
    "ConfigMismatch",
    "check_config",
    "parse_schedule_arg",
    "read_config",
    "request_seed",
    "write_config",
]


@dataclass(frozen=True)
class BenchSchedule:
    """One arm of the comparison: its label, the spec as given, and its resolved form."""

    label: str
    spec: dict[str, Any]
    resolved: ResolvedSchedule

    @property
    def is_constant(self) -> bool:
        return self.resolved.type == "constant"


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # bare strings such as preset=released-code


def parse_schedule_arg(arg: str) -> BenchSchedule:
    """``TYPE[:k=v,...]`` to a validated schedule; raises :class:`ScheduleError` naming the field."""
    text = arg.strip()
    type_, _, rest = text.partition(":")
    spec: dict[str, Any] = {"type": type_.strip()}
    label = text
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ScheduleError("", f"expected key=value, got {item!r}")
        if key == "label":
            label = raw.strip()
            continue
        target = spec
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ScheduleError(key, "is not an object")
        if leaf in target:
            raise ScheduleError(key, "given twice")
        target[leaf] = _value(raw.strip())
    return BenchSchedule(label=label, spec=spec, resolved=parse_schedule(spec))


def request_seed(seed: int, problem_id: str, label: str, first_index: int) -> int:
    """The seed of the request that generates samples ``first_index, ...`` of one pool.

    A function of the run seed, the problem, the schedule and the first sample index, so
    a rerun asks for the same samples, while a resumed pool (``first_index > 0``) gets new
    sample streams instead of repeating those of the samples it already has.
    """
    key = f"{seed}|{problem_id}|{label}|{first_index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") >> 1  # fits a signed int32


# The settings that samples depend on: a resumed run must agree on all of them.
RESUME_KEYS = ("model", "api", "dataset", "problems", "schedules", "max_tokens", "seed", "prompt_template",
               "prompt_example")
# The ones known before a server answers: the model name and the API come from the server.
LOCAL_KEYS = tuple(k for k in RESUME_KEYS if k not in ("model", "api"))


class ConfigMismatch(RuntimeError):
    """``--out`` holds a run whose samples came from other settings."""


def check_config(path: Path, stored: dict[str, Any] | None, config: dict[str, Any],
                 keys: tuple[str, ...] = RESUME_KEYS) -> None:
    """Raise :class:`ConfigMismatch`, listing the differences, when the run stored at
    ``path`` differs from ``config`` in ``keys``. Settings outside :data:`RESUME_KEYS`
    (pool size, N values, concurrency, evaluation options) may change between runs."""
    diffs = [k for k in keys if stored is not None and stored.get(k) != config.get(k)]
    if diffs:
        lines = "\n".join(
            f"  {k}: stored {json.dumps(stored.get(k))[:200]} != now {json.dumps(config.get(k))[:200]}"  # type: ignore[union-attr]
            for k in diffs
        )
        raise ConfigMismatch(
            f"{path.parent} holds a run with other settings, so it cannot be resumed:\n{lines}\n"
            "Use another --out directory, or the stored settings."
        )


def read_config(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_config(path: Path, config: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
