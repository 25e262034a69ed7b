"""Which weights serve: the version counter, its label, and the gate around weight swaps.

**One source of truth.** Every weight change, whichever route makes it (our reload, the
SGLang-style alias, vLLM's own weight-transfer routes), goes through :meth:`WeightGate.
advance`: the integer version goes up by one and the engine's own weight version (a
string vLLM attaches to every token it produces, and reports as spans over a completion's
tokens) is set to :meth:`WeightGate.tag`, ``"N"`` or ``"N:label"``. So the spans a response
reports and the integer ``weight_version`` that clients read are the same number, and a
label a trainer supplies (``"step-100"``) is kept and shown but never stands for the
version: two different weights always have two different ``N``.

**The gate.** Every generation request holds a read lease for its whole life (streaming
included). A ``wait`` reload takes the write side with ``drain=True``: it waits for the
leases in flight to end and holds new requests back, so no response mixes two versions.
``keep`` and ``abort`` reloads leave in-flight requests to the engine's pause (they are
frozen or ended there) and only exclude other reloads. Writers have priority, so a steady
stream of requests cannot starve a reload.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["WeightGate", "parse_tag"]


def parse_tag(tag: str) -> tuple[int, str | None]:
    """``"N"`` or ``"N:label"`` -> ``(N, label)``; vLLM's untouched ``"default"`` is 0."""
    number, _, label = tag.partition(":")
    try:
        return int(number), (label or None)
    except ValueError:  # an engine version set by something other than this server
        return 0, tag


class WeightGate:
    def __init__(self, path: str | None = None) -> None:
        self.version = 0
        self.label: str | None = None
        self.path = path
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._cond = asyncio.Condition()

    @property
    def tag(self) -> str:
        """The engine's weight-version string for the current weights."""
        return f"{self.version}:{self.label}" if self.label else str(self.version)

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[int]:
        """Hold the current weights for one request; yields their version."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield self.version
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def writing(self, *, drain: bool = True) -> AsyncIterator[None]:
        """Exclusive access for a weight swap; with ``drain``, also alone with the engine
        (in-flight requests finish first). The caller calls :meth:`advance` on success."""
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writing and (self._readers == 0 or not drain))
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            async with self._cond:
                self._writing = False
                self._cond.notify_all()

    def advance(self, path: str | None, label: str | None = None) -> str:
        """Record new weights: the next version, with ``label`` if given; returns the tag."""
        self.version += 1
        self.label = label
        if path is not None:
            self.path = path
        return self.tag

    def relabel(self, label: str | None) -> str:
        """Name the current weights (no change of weights, so no new version)."""
        self.label = label
        return self.tag
