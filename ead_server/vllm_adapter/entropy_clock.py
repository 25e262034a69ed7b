"""The entropy clock's memory: each sample's running sum of entropies, on the device.

``ead`` with ``"clock": "entropy"`` anneals on ``t_eff = sum_{i<t} H_i / h_ref``. The sum
is state that outlives a batch slot, and neither runner helps keep it:

* Model Runner V2 frees a preempted request's slot and adds it again later, maybe in
  another slot, through ``add_request(slot, params)``, which carries no request id and
  has no removal hook;
* V1's ``BatchUpdate`` has no id either, and its ``removed`` does not tell a finished
  request from a preempted one.

So a sample's sums are keyed by the per-sample id it carries in ``extra_args`` (the
request contract's id scheme: ead-server gives every sample of an entropy-driven request
one), and kept per *position*: ``table[r, t] = sum_{i<t} H_i``. The row that samples
position ``t`` reads ``table[r, t]`` and writes ``table[r, t + 1]``; a later write wins, so
a position sampled again (after a preemption, or under new weights after a ``keep``
reload) overwrites what came after it in order, and the sums before it are the ones its
own earlier steps wrote. Only a row that samples writes (the runners decide which).

A request without an id (an in-process engine whose caller sets none) gets a row of its
own when it is added, and loses it when it leaves; added again after a preemption, its
sum restarts at ``t0 * h_ref`` for the ``t0`` tokens it already has (they count at the
reference rate, as the token clock would count them). Its behaviour log-probs stay
exact (they are of the distribution sampled from); only its schedule differs from an
uninterrupted run.

Nothing here reads the device: rows and positions come from the host, the sums stay on
the device. Keyed rows are freed when their id's in-pass numbers are collected
(:meth:`EntropyClocks.release`), or after ``$EAD_TARGETS_TTL_S`` seconds unused, as the target store's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

__all__ = ["CLOCKS", "EntropyClocks"]


class EntropyClocks:
    """Per-sample sums of ``H`` in one ``[capacity, max_len + 1]`` float64 device table,
    allocated on first use and doubled when full (an allocation and a copy on the device,
    no sync)."""

    def __init__(self, ttl_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = float(os.environ.get("EAD_TARGETS_TTL_S", 600)) if ttl_s is None else ttl_s
        self.now = clock
        self.device = torch.device("cpu")
        self.max_len = 0
        self._initial = 1
        self.table: torch.Tensor | None = None
        self.keys: dict[str, int] = {}  # sample id -> its row
        self.free: list[int] = []
        self.used = np.zeros(0)  # row -> last time it was opened or stepped (keyed rows expire)
        self.keyed = np.zeros(0, dtype=bool)

    def configure(self, device: torch.device, max_len: int, rows: int) -> None:
        """Where the table lives and how long a sequence can be (``max_model_len``); a new
        engine in this process (another place or length) starts from an empty table."""
        if (device, max_len) != (self.device, self.max_len):
            self.table, self.keys, self.free = None, {}, []
        self.device, self.max_len, self._initial = device, max_len, max(rows, 1)

    def open(self, key: str | None, start: int, h_ref: float) -> int:
        """The row of a request being added with ``start`` tokens already generated: its
        own if its id has one (kept across preemption), else a new one whose sum at
        ``start`` reads ``start * h_ref``."""
        if key is not None and key in self.keys:
            row = self.keys[key]
        else:
            row = self._take()
            self.table[row, start] = float(start) * h_ref  # type: ignore[index]
            self.keyed[row] = key is not None
            if key is not None:
                self.keys[key] = row
        self.used[row] = self.now()
        return row

    def close(self, row: int) -> None:
        """A request without an id left its slot or batch row: its sums go."""
        if not self.keyed[row]:
            self.free.append(row)

    def release(self, keys: Iterable[str]) -> None:
        """The server collected these samples: they are done, their sums go."""
        for key in keys:
            row = self.keys.pop(key, None)
            if row is not None:
                self.free.append(row)

    def read(self, rows: np.ndarray, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sums ``table[rows, positions]`` (float64, on the device) of this step's clock
        rows, and the two index tensors, for :meth:`write`."""
        assert self.table is not None
        self.used[rows] = self.now()
        index = torch.from_numpy(rows.astype(np.int64)).to(self.device, non_blocking=True)
        at = torch.from_numpy(positions.astype(np.int64)).to(self.device, non_blocking=True)
        return self.table[index, at], index, at

    def write(self, index: torch.Tensor, at: torch.Tensor, sums: torch.Tensor, entropy: torch.Tensor) -> None:
        """``table[index, at + 1] = sums + H``: what the rows that sampled add to their clocks."""
        assert self.table is not None
        self.table[index, at + 1] = sums + entropy.to(torch.float64)

    def _take(self) -> int:
        if self.table is None:
            self.table = torch.zeros(self._initial, self.max_len + 1, dtype=torch.float64, device=self.device)
            self.free = list(range(self._initial - 1, -1, -1))
            self.used, self.keyed = np.zeros(self._initial), np.zeros(self._initial, dtype=bool)
        self._expire()
        if not self.free:
            size = self.table.shape[0]
            grown = torch.zeros(2 * size, self.max_len + 1, dtype=torch.float64, device=self.device)
            grown[:size] = self.table
            self.table = grown
            self.free = list(range(2 * size - 1, size - 1, -1))
            self.used = np.concatenate([self.used, np.zeros(size)])
            self.keyed = np.concatenate([self.keyed, np.zeros(size, dtype=bool)])
        return self.free.pop()

    def _expire(self) -> None:
        """Free keyed rows unused for ``ttl_s`` (a client that never collected)."""
        deadline = self.now() - self.ttl_s
        stale = [key for key, row in self.keys.items() if self.used[row] < deadline]
        self.release(stale)


CLOCKS = EntropyClocks()
"""This worker process's sums (the processor steps them, the collect method releases them)."""
