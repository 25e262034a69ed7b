"""The append-only sample store ``OUT/samples.jsonl`` and the reader that resumes it.

One JSON object a line, written and flushed as each sample arrives, so an interrupted
run keeps every line it finished. On open, a torn last line (a run killed mid-write) is
cut off and the samples it held are generated again; any other unreadable line is an
error. A sample is identified by ``(problem_id, schedule, sample_index)`` and is never
stored twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["JsonlAppender", "SampleStore", "StoreError", "read_jsonl"]

Key = tuple[str, str, int]


class StoreError(RuntimeError):
    """A store file that cannot be read back."""


def read_jsonl(path: Path, *, repair: bool = True) -> list[dict[str, Any]]:
    """All records of a JSONL file written by :class:`JsonlAppender`.

    A last line without its newline, or one that does not parse, is the trace of an
    interrupted write: with ``repair`` the file is truncated before it.
    """
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    good_end = 0
    with path.open("rb") as fh:
        lines = fh.readlines()
    for i, raw in enumerate(lines):
        last = i == len(lines) - 1
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("no newline")
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            if not last:
                raise StoreError(f"{path}: line {i + 1} is corrupt ({exc}); it is not the last line") from None
            if repair:
                with path.open("r+b") as fh:
                    fh.truncate(good_end)
            break
        records.append(record)
        good_end += len(raw)
    return records


class JsonlAppender:
    """Appends records to a JSONL file, one flushed (and fsynced on close) line each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key(record: dict[str, Any]) -> Key:
    return (record["problem_id"], record["schedule"], int(record["sample_index"]))


class SampleStore:
    """The samples of one run, loaded from ``path`` and appended to as they arrive.

    Records hold at least ``problem_id``, ``schedule`` (the label), ``sample_index`` and
    ``text``; see ``docs/benchmark.md`` for the rest.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._samples: dict[Key, dict[str, Any]] = {}
        for record in read_jsonl(path):
            # The writer never stores a key twice; a hand-edited file keeps the first.
            self._samples.setdefault(_key(record), record)
        self._appender = JsonlAppender(path)

    def __len__(self) -> int:
        return len(self._samples)

    def __contains__(self, key: Key) -> bool:
        return key in self._samples

    def missing(self, problem_id: str, schedule: str, n: int) -> list[int]:
        """Sample indices ``< n`` of one pool that are not stored yet."""
        return [i for i in range(n) if (problem_id, schedule, i) not in self._samples]

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            key = _key(record)
            if key in self._samples:
                raise StoreError(f"sample {key} is already stored")
            self._appender.append(record)
            self._samples[key] = record

    def pool(self, problem_id: str, schedule: str, n: int) -> list[dict[str, Any]]:
        """Samples ``0 .. n-1`` of one pool, in sample order (all must be stored)."""
        return [self._samples[(problem_id, schedule, i)] for i in range(n)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._samples.values())

    def close(self) -> None:
        self._appender.close()

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
