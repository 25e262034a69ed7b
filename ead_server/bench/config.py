"""What a run is: the schedules it compares and the settings its samples depend on.

``--schedules`` takes the schedule text syntax of :func:`ead_server.schedule.spec_from_text`
(e.g. ``ead:preset=paper,decay=25``, ``constant:0.6``) plus an optional ``label=...`` that
names the line in the report (default: the argument itself). The schedule itself is
validated by :func:`ead_server.schedule.parse_schedule`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ead_server.schedule import ResolvedSchedule, parse_schedule, spec_from_text

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


def parse_schedule_arg(arg: str) -> BenchSchedule:
    """``TYPE[:k=v,...]`` (the schedule text syntax, :func:`ead_server.schedule.spec_from_text`,
    plus an optional ``label=...``) to a validated schedule; raises :class:`ScheduleError`
    naming the field."""
    text = arg.strip()
    head, colon, rest = text.partition(":")
    items = [part for part in rest.split(",") if part.strip()]
    labels = [item.partition("=")[2].strip() for item in items if item.strip().startswith("label=")]
    kept = ",".join(item for item in items if not item.strip().startswith("label="))
    spec = spec_from_text(f"{head}{colon}{kept}")
    return BenchSchedule(label=labels[-1] if labels else text, spec=spec, resolved=parse_schedule(spec))


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


_GROWING = ("schedules", "arms")


def _differs(key: str, stored: Any, now: Any) -> bool:
    if key in _GROWING and isinstance(stored, list) and isinstance(now, list):
        return not all(any(_within(entry, new) for new in now) for entry in stored)
    return stored != now


def _within(stored: Any, now: Any) -> bool:
    """``stored`` is ``now`` but for fields ``now`` has gained."""
    if isinstance(stored, dict) and isinstance(now, dict):
        return all(key in now and _within(value, now[key]) for key, value in stored.items())
    return stored == now


class ConfigMismatch(RuntimeError):
    """``--out`` holds a run whose samples came from other settings."""


def check_config(path: Path, stored: dict[str, Any] | None, config: dict[str, Any],
                 keys: tuple[str, ...] = RESUME_KEYS) -> None:
    """Raise :class:`ConfigMismatch`, listing the differences, when the run stored at
    ``path`` differs from ``config`` in ``keys``. Settings outside :data:`RESUME_KEYS`
    (pool size, N values, concurrency, evaluation options) may change between runs, and
    schedules (``ead-bench majority``) or arms (``ead-bench rl``) may be added: a sample's
    seed depends on its own schedule's label (:func:`request_seed`), an arm's run on its
    seed, so what is stored stays what a run with every arm from the start would have
    made. A stored one left out or changed is a mismatch; a field the schedule gained
    since (a resolved schedule's new defaults) is not."""
    diffs = [k for k in keys if stored is not None and _differs(k, stored.get(k), config.get(k))]
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
