"""Grading with math-verify: answer extraction, a process pool with hard per-item
timeouts, and the cache ``OUT/grades.jsonl``.

math-verify's own timeouts use ``SIGALRM`` and only work in a process's main thread; its
``verify`` can also run for minutes on inputs such as ``9^{9^{9^{9}}}``. Every check
therefore runs in a worker process: the worker arms its own interval timer for the whole
item (parse both sides, then ``verify``), and the parent kills the pool's workers when an
item outlives ``timeout + grace`` (a computation that never returns to the interpreter
cannot be interrupted by a signal), counts that item wrong and starts a fresh pool for
the items still waiting.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import logging
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from math_verify import parse, verify

from ead_server.bench.metrics import VotePool
from ead_server.bench.store import JsonlAppender, read_jsonl

__all__ = [
    "Extraction",
    "GradeCache",
    "GradingPool",
    "ItemResult",
    "answer_key",
    "extract_answer",
    "grade_pools",
]

# ---------------------------------------------------------------------------------------
# Extraction

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


@dataclass(frozen=True)
class Extraction:
    answer: str | None
    method: str  # "boxed", "last_number" or "none"


def _last_boxed(text: str) -> str | None:
    """The content of the last non-empty ``\\boxed{...}`` whose braces close, or None."""
    for match in reversed(list(_BOX.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    break
        if depth == 0 and _clean(text[start:i]):
            return _clean(text[start:i])
    return None


def _clean(answer: str) -> str:
    return answer.strip().rstrip(".").strip()


def extract_answer(text: str) -> Extraction:
    """The answer of a completion: the last ``\\boxed{...}`` with balanced braces; failing
    that, the last number in the text (a completion cut off by ``max_tokens`` or a model
    that ignores the box instruction still gets graded); failing that, no answer.
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return Extraction(boxed, "boxed")
    numbers = _NUMBER.findall(text)
    if numbers:
        return Extraction(numbers[-1], "last_number")
    return Extraction(None, "none")


def answer_key(answer: str) -> str:
    return hashlib.sha256(answer.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------
# Worker side


class _ItemTimeout(BaseException):
    # A BaseException, so math-verify's `except Exception` handlers let it through.
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _ItemTimeout


@functools.lru_cache(maxsize=4096)
def _parse(expr: str) -> list[Any]:
    # Both sides go through the same LaTeX path: `\boxed{...}` is what math-verify's
    # extraction looks for first, and it reads `1/2`, `0.5` and `\frac12` alike.
    return parse(f"\\boxed{{{expr}}}", parsing_timeout=None)  # type: ignore[arg-type]


def _worker_init() -> None:
    # Timeouts are this module's (math-verify's are disabled: they would reset our
    # timer), so its "timeout is disabled" warnings are noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _warm() -> int:
    _parse("1")
    return os.getpid()


def check_item(gold: str, answer: str, timeout: float) -> tuple[bool, bool, bool, bool]:
    """``verify(parse(gold), parse(answer))`` within ``timeout`` seconds.

    Returns ``(equivalent, gold_parsed, answer_parsed, timed_out)``. Runs in a worker
    process (it needs the main thread for its timer). ``gold`` is a dataset answer, or an
    answer class's representative when two predictions are compared.
    """
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        g = _parse(gold)
        a = _parse(answer)
        ok = bool(g) and bool(a) and bool(verify(g, a, timeout_seconds=None))
        return ok, bool(g), bool(a), False
    except _ItemTimeout:
        return False, False, False, True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------
# Parent side: the pool


@dataclass(frozen=True)
class ItemResult:
    equivalent: bool
    gold_parsed: bool
    answer_parsed: bool
    timed_out: bool


_KILLED = ItemResult(False, False, False, True)


def _context() -> multiprocessing.context.BaseContext:
    # forkserver: workers fork from a clean process that has math-verify and sympy
    # imported already, so replacing a killed pool takes milliseconds, and no worker
    # inherits the parent's threads (asyncio, tqdm, httpx).
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


class GradingPool:
    """Runs :func:`check_item` calls in worker processes with a hard per-item timeout.

    At most ``workers`` items are in flight, so each starts as soon as it is submitted
    and its deadline (``timeout + grace`` after submission) bounds its own run time.
    """

    def __init__(
        self,
        workers: int | None = None,
        timeout: float = 5.0,
        *,
        grace: float = 1.0,
        check: Callable[[str, str, float], tuple[bool, bool, bool, bool]] = check_item,
    ) -> None:
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.timeout = timeout
        self.grace = grace
        self.restarts = 0
        self._check = check
        self._executor: cf.ProcessPoolExecutor | None = None

    def _start(self) -> cf.ProcessPoolExecutor:
        executor = cf.ProcessPoolExecutor(self.workers, mp_context=_context(), initializer=_worker_init)
        # Start every worker before the first timed item, so no deadline pays for start-up.
        warm = [executor.submit(_warm) for _ in range(self.workers)]
        done, not_done = cf.wait(warm, timeout=300)
        if not_done or any(f.exception() for f in done):
            self._kill(executor)
            raise RuntimeError("the grading worker processes did not start")
        return executor

    @staticmethod
    def _kill(executor: cf.ProcessPoolExecutor) -> None:
        processes = list(getattr(executor, "_processes", {}).values())  # no public API before 3.14
        for proc in processes:
            proc.kill()
        executor.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            proc.join(5)

    def map(
        self, items: Sequence[tuple[str, str]], progress: Callable[[int], None] | None = None
    ) -> list[ItemResult]:
        """``check(gold, answer)`` for each item, in order. Timed-out items count as not equivalent."""
        results: list[ItemResult | None] = [None] * len(items)
        waiting = list(range(len(items)))[::-1]  # a stack: pop() takes the next item
        inflight: dict[cf.Future, tuple[int, float]] = {}
        crashes: dict[int, int] = {}
        while waiting or inflight:
            if self._executor is None:
                self._executor = self._start()
            while waiting and len(inflight) < self.workers:
                i = waiting.pop()
                future = self._executor.submit(self._check, *items[i], self.timeout)
                inflight[future] = (i, time.monotonic() + self.timeout + self.grace)
            next_deadline = min(deadline for _, deadline in inflight.values())
            done, _ = cf.wait(inflight, timeout=max(0.0, next_deadline - time.monotonic()),
                              return_when=cf.FIRST_COMPLETED)
            broken = False
            for future in done:
                i, _ = inflight.pop(future)
                try:
                    results[i] = ItemResult(*future.result())
                except cf.process.BrokenProcessPool:
                    # A worker died (e.g. out of memory): retry its items once, then give up.
                    broken = True
                    crashes[i] = crashes.get(i, 0) + 1
                    if crashes[i] >= 2:
                        results[i] = _KILLED
                    else:
                        waiting.append(i)
                    continue
                if progress:
                    progress(1)
            now = time.monotonic()
            expired = [f for f, (_, deadline) in inflight.items() if deadline <= now and not f.done()]
            if expired or broken:
                for future in expired:
                    i, _ = inflight.pop(future)
                    results[i] = _KILLED
                    if progress:
                        progress(1)
                # The others in flight lose their run and go back to the front of the queue.
                waiting.extend(i for i, _ in inflight.values())
                inflight.clear()
                self._kill(self._executor)
                self._executor = None
                self.restarts += 1
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# The cache


class GradeCache:
    """``OUT/grades.jsonl``: answer-vs-gold grades keyed by ``(problem_id, answer_key)`` and
    prediction-vs-prediction checks keyed by ``(representative_key, answer_key)``.

    A check that timed out is reused only by runs whose timeout is not longer.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.timeout = timeout
        self.gold: dict[tuple[str, str], dict[str, Any]] = {}
        self.pairs: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in read_jsonl(path):
            if rec.get("timed_out") and rec.get("timeout_s", 0) < timeout:
                continue
            if rec.get("kind") == "gold":
                self.gold[(rec["problem_id"], rec["answer_key"])] = rec
            elif rec.get("kind") == "pair":
                self.pairs[(rec["rep_key"], rec["answer_key"])] = rec
        self._out = JsonlAppender(path)

    def add_gold(self, problem_id: str, answer: str, result: ItemResult) -> dict[str, Any]:
        rec = {
            "kind": "gold", "problem_id": problem_id, "answer_key": answer_key(answer), "answer": answer,
            "correct": result.equivalent, "parsed": result.answer_parsed, "gold_parsed": result.gold_parsed,
            "timed_out": result.timed_out, "timeout_s": self.timeout,
        }
        self._out.append(rec)
        self.gold[(problem_id, rec["answer_key"])] = rec
        return rec

    def add_pair(self, rep: str, answer: str, result: ItemResult) -> dict[str, Any]:
        rec = {
            "kind": "pair", "rep_key": answer_key(rep), "answer_key": answer_key(answer),
            "equivalent": result.equivalent, "timed_out": result.timed_out, "timeout_s": self.timeout,
        }
        self._out.append(rec)
        self.pairs[(rec["rep_key"], rec["answer_key"])] = rec
        return rec

    def close(self) -> None:
        self._out.close()


# ---------------------------------------------------------------------------------------
# Grading the pools of a run


@dataclass
class GradingStats:
    checks: int = 0  # math-verify checks run
    cached: int = 0  # checks answered by grades.jsonl
    timed_out: int = 0
    gold_unparsed: int = 0  # problems whose gold answer math-verify cannot parse
    pool_restarts: int = 0  # pools replaced after a hard timeout or a crash


def _needed_pairs(ids: Sequence[int]) -> Iterable[tuple[int, int]]:
    """Ordered pairs ``(r, a)`` of distinct answers such that ``r`` can represent a class
    that ``a`` is then tested against: some occurrence of ``r`` precedes one of ``a``."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for pos, a in enumerate(ids):
        if a >= 0:
            first.setdefault(a, pos)
            last[a] = pos
    for r, fr in first.items():
        for a, la in last.items():
            if r != a and fr < la:
                yield r, a


def grade_pools(
    golds: Mapping[str, str],
    pools: Mapping[tuple[str, str], Sequence[str | None]],
    *,
    runner: GradingPool,
    cache: GradeCache,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[tuple[str, str], VotePool], GradingStats]:
    """Grade every extracted answer against its gold and against the answers it may be
    voted with; return the vote pools that :mod:`ead_server.bench.metrics` scores.

    ``pools`` maps ``(problem_id, schedule)`` to the extracted answers in sample order
    (None: no answer). ``progress(done, total)`` is called as checks finish.
    """
    stats = GradingStats()
    # Answer ids per problem, shared by its schedules so each distinct answer is graded once.
    texts: dict[str, list[str]] = {}
    ids: dict[tuple[str, str], list[int]] = {}
    for (pid, label), answers in pools.items():
        table = texts.setdefault(pid, [])
        index = {t: i for i, t in enumerate(table)}
        row = []
        for answer in answers:
            if answer is None:
                row.append(-1)
                continue
            if answer not in index:
                index[answer] = len(table)
                table.append(answer)
            row.append(index[answer])
        ids[(pid, label)] = row

    def run(items: list[tuple[str, str]], on_result: Callable[[int, ItemResult], None]) -> None:
        stats.checks += len(items)
        done = [0]

        def tick(k: int) -> None:
            done[0] += k
            if progress:
                progress(done[0], len(items))

        for i, result in enumerate(runner.map(items, tick)):
            stats.timed_out += result.timed_out
            on_result(i, result)

    # 1. Every distinct answer against the gold.
    todo = [(pid, t) for pid, table in texts.items() for t in table if (pid, answer_key(t)) not in cache.gold]
    stats.cached += sum(len(t) for t in texts.values()) - len(todo)
    run([(golds[pid], t) for pid, t in todo], lambda i, r: cache.add_gold(todo[i][0], todo[i][1], r))
    grade = {(pid, i): cache.gold[(pid, answer_key(t))] for pid, table in texts.items() for i, t in enumerate(table)}
    stats.gold_unparsed = sum(1 for pid in texts if texts[pid] and not any(
        grade[(pid, i)]["gold_parsed"] for i in range(len(texts[pid]))))

    # 2. Answers that failed to parse abstain; the others against possible representatives.
    votes = {k: [a if a >= 0 and grade[(k[0], a)]["parsed"] else -1 for a in row] for k, row in ids.items()}
    wanted: dict[tuple[str, str], bool] = {}
    for (pid, _), row in votes.items():
        for r, a in _needed_pairs(row):
            rep, ans = texts[pid][r], texts[pid][a]
            wanted[(rep, ans)] = (answer_key(rep), answer_key(ans)) in cache.pairs
    pairs = [pair for pair, cached in wanted.items() if not cached]
    stats.cached += len(wanted) - len(pairs)
    run(pairs, lambda i, r: cache.add_pair(pairs[i][0], pairs[i][1], r))

    result: dict[tuple[str, str], VotePool] = {}
    for (pid, label), row in votes.items():
        equiv = {
            (r, a): bool(cache.pairs[(answer_key(texts[pid][r]), answer_key(texts[pid][a]))]["equivalent"])
            for r, a in _needed_pairs(row)
        }
        correct = tuple(a >= 0 and bool(grade[(pid, a)]["correct"]) for a in row)
        result[(pid, label)] = VotePool(labels=tuple(row), correct=correct, equiv=equiv)
    stats.pool_restarts = runner.restarts
    return result, stats
