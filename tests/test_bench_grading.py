"""Answer extraction, math-verify in worker processes with hard timeouts, and the cache."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ead_server.bench.grading import (
    GradeCache,
    GradingPool,
    answer_key,
    check_item,
    extract_answer,
    grade_pools,
)
from ead_server.bench.metrics import majority_at_n

# math-verify's verify() runs for minutes on this against a small number when nothing
# interrupts it (checked by hand: still running after 30 s without a timeout).
TOWER = "9^{9^{9^{9}}}"


@pytest.fixture(scope="module")
def pool() -> Iterator[GradingPool]:
    with GradingPool(2, timeout=1.0, grace=0.5) as runner:
        yield runner


# ---------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    ("text", "answer", "method"),
    [
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", "boxed"),
        ("\\boxed{3} no wait \\boxed{4}", "4", "boxed"),
        ("\\boxed{\\frac{a}{b}} and \\boxed{}", "\\frac{a}{b}", "boxed"),  # empty last box skipped
        ("\\boxed{7.}", "7", "boxed"),
        ("\\fbox{12}", "12", "boxed"),
        ("cut off: \\boxed{12", "12", "last_number"),  # unbalanced box: fallback
        ("3 + 4 = 7, so 7 apples", "7", "last_number"),
        ("we get 1,234", "1,234", "last_number"),
        ("The answer is -2.5", "-2.5", "last_number"),
        ("I do not know.", None, "none"),
        ("", None, "none"),
    ],
)
def test_extract_answer(text: str, answer: str | None, method: str) -> None:
    got = extract_answer(text)
    assert (got.answer, got.method) == (answer, method)


# ---------------------------------------------------------------------------------------
# Checks in the pool


def test_equivalent_forms_of_one_half(pool: GradingPool) -> None:
    forms = ["1/2", "0.5", "\\frac12", "\\frac{1}{2}"]
    items = [(g, a) for g in forms for a in forms]
    results = pool.map(items)
    assert all(r.equivalent and not r.timed_out for r in results), list(zip(items, results))


def test_wrong_garbage_and_empty_answers(pool: GradingPool) -> None:
    wrong, garbage, empty = pool.map([("3", "4"), ("3", "garbage"), ("3", "")])
    assert not wrong.equivalent and wrong.answer_parsed
    assert not garbage.equivalent and not garbage.timed_out
    assert not empty.equivalent and not empty.answer_parsed


def test_pathological_answer_times_out_and_counts_wrong(pool: GradingPool) -> None:
    start = time.monotonic()
    results = pool.map([("5", TOWER), ("5", "5")])
    elapsed = time.monotonic() - start
    assert results[0].timed_out and not results[0].equivalent
    assert results[1].equivalent and not results[1].timed_out
    assert elapsed < pool.timeout + pool.grace + 1.0


def stubborn_check(gold: str, answer: str, timeout: float) -> tuple[bool, bool, bool, bool]:
    """check_item in a worker whose timer signal is blocked, as in a computation that never
    returns to the interpreter: only the parent's hard timeout can stop it."""
    if answer == TOWER:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    return check_item(gold, answer, timeout)


def test_hard_timeout_kills_the_worker_and_recreates_the_pool() -> None:
    items = [("1", "1"), ("5", TOWER), ("2", "3"), ("4", "4"), ("6", "6")]
    with GradingPool(2, timeout=1.0, grace=0.5, check=stubborn_check) as runner:
        start = time.monotonic()
        results = runner.map(items)
        elapsed = time.monotonic() - start
        assert runner.restarts == 1
        assert [r.equivalent for r in results] == [True, False, False, True, True]
        assert results[1].timed_out and not any(r.timed_out for i, r in enumerate(results) if i != 1)
        # The hung item cost its deadline plus a fresh pool, not minutes.
        assert elapsed < runner.timeout + runner.grace + 10
        assert runner.map([("7", "7")])[0].equivalent  # the new pool works


# ---------------------------------------------------------------------------------------
# Grading a run's pools, with the cache


def test_grade_pools_votes_and_caches(pool: GradingPool, tmp_path: Path) -> None:
    golds = {"p1": "1/2", "p2": "5"}
    pools = {
        ("p1", "A"): ["0.5", "\\frac12", "3", None],  # 0.5 and \frac12 form one class
        ("p1", "B"): ["3", "3", "1/2", "0.5"],  # tie 2-2: '3' opened first
        ("p2", "A"): ["5", TOWER, "6", "6"],
        ("p2", "B"): ["5", "5.0", "6", "x"],
    }
    cache = GradeCache(tmp_path / "grades.jsonl", pool.timeout)
    graded, stats = grade_pools(golds, pools, runner=pool, cache=cache)
    cache.close()
    assert stats.checks > 0 and stats.cached == 0 and stats.timed_out >= 1 and stats.gold_unparsed == 0
    assert graded[("p1", "A")].correct == (True, True, False, False)
    assert graded[("p1", "A")].labels[3] == -1
    assert majority_at_n(graded[("p1", "A")], 4).value == 1.0
    assert majority_at_n(graded[("p1", "B")], 4).value == 0.0
    # The tower timed out: it counts wrong and does not vote; '6' has two votes.
    assert graded[("p2", "A")].labels[1] == -1
    assert majority_at_n(graded[("p2", "A")], 4).value == 0.0
    assert majority_at_n(graded[("p2", "B")], 4).value == 1.0

    # A second pass takes everything from grades.jsonl, except the timed-out check, which a
    # longer timeout grades again.
    cache = GradeCache(tmp_path / "grades.jsonl", pool.timeout)
    again, stats = grade_pools(golds, pools, runner=pool, cache=cache)
    cache.close()
    assert stats.checks == 0 and again == graded
    cache = GradeCache(tmp_path / "grades.jsonl", pool.timeout + 1)
    assert ("p2", answer_key(TOWER)) not in cache.gold and ("p2", answer_key("6")) in cache.gold
    cache.close()
