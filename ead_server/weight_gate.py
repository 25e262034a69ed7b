"""Which weights produced a response: a version counter behind a readers-writer gate.

Every generation request holds a read lease for its whole life (streaming included) and
records the version it started under. A reload takes the write side: it waits for the
leases in flight to end, holds new requests back, swaps the weights and bumps the
version. So no response ever mixes two weight versions, and the version a response
carries is exactly the one that produced it. Writers have priority, so a steady stream
of requests cannot starve a reload.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class WeightGate:
    def __init__(self, path: str | None = None) -> None:
        self.version = 0
        self.path = path
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._cond = asyncio.Condition()

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
    async def writing(self) -> AsyncIterator[None]:
        """Exclusive access for a weight swap. The caller calls :meth:`commit` on success."""
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writing and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            async with self._cond:
                self._writing = False
                self._cond.notify_all()

    def commit(self, path: str) -> int:
        """Record new weights (call inside :meth:`writing`); returns the new version."""
        self.version += 1
        self.path = path
        return self.version
