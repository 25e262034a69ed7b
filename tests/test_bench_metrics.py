"""The benchmark's estimators against brute-force enumeration and hand-worked cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ead_server.bench.metrics import (
    VotePool,
    bootstrap_indices,
    bootstrap_mean,
    majority_at_n,
    pass_at_k,
    vote,
    worst_at_k,
)
from ead_server.bench.summary import token_shares
from ead_server.schedule import parse_schedule


def _pool(labels: list[int], correct_labels: set[int], equiv: dict[tuple[int, int], bool] | None = None) -> VotePool:
    """A pool whose answers are equivalent exactly when their labels are equal, unless
    ``equiv`` says otherwise for some ordered pairs."""
    ids = sorted({a for a in labels if a >= 0})
    relation = {(r, a): False for r in ids for a in ids if r != a}
    relation.update(equiv or {})
    return VotePool(tuple(labels), tuple(a in correct_labels for a in labels), relation)


def _brute_majority(pool: VotePool, subset: tuple[int, ...]) -> bool:
    """docs/design.md's Maj@N read literally: build classes as lists, pick the largest, earliest on ties."""
    classes: list[list[int]] = []
    for j in subset:
        a = pool.labels[j]
        if a < 0:
            continue
        home = next((c for c in classes if pool.labels[c[0]] == a or pool.equiv[(pool.labels[c[0]], a)]), None)
        if home is None:
            classes.append([j])
        else:
            home.append(j)
    if not classes:
        return False
    largest = max(len(c) for c in classes)
    winner = next(c for c in classes if len(c) == largest)
    return pool.correct[winner[0]]


def _brute_maj_at_n(pool: VotePool, n: int) -> float:
    subsets = list(itertools.combinations(range(pool.size), n))
    return sum(_brute_majority(pool, s) for s in subsets) / len(subsets)


def _brute_pass_worst(correct: list[bool], k: int) -> tuple[float, float]:
    subsets = list(itertools.combinations(correct, k))
    return (sum(any(s) for s in subsets) / len(subsets), sum(all(s) for s in subsets) / len(subsets))


# ---------------------------------------------------------------------------------------
# Hand-worked cases


def test_tie_goes_to_the_class_opened_first() -> None:
    # Classes {0, 3} (label 0) and {1, 2} (label 1) both have two votes; label 0 opened first.
    pool = _pool([0, 1, 1, 0], correct_labels={1})
    assert vote(pool, range(4)) == (0, 2)
    assert majority_at_n(pool, 4).value == 0.0
    swapped = _pool([1, 0, 0, 1], correct_labels={1})
    assert majority_at_n(swapped, 4).value == 1.0


def test_hand_worked_maj_at_2_and_3() -> None:
    # Labels a a b: subsets of 2: {0,1} -> a; {0,2} tie -> a; {1,2} tie -> a. Correct = b.
    pool = _pool([0, 0, 1], correct_labels={1})
    assert majority_at_n(pool, 2).value == 0.0
    assert majority_at_n(pool, 1).value == pytest.approx(1 / 3)
    # Labels b a a, correct = a: {0,1} -> b, {0,2} -> b, {1,2} -> a; all three -> a.
    pool = _pool([1, 0, 0], correct_labels={0})
    assert majority_at_n(pool, 2).value == pytest.approx(1 / 3)
    assert majority_at_n(pool, 3).value == 1.0


def test_an_answer_joins_the_first_class_whose_representative_verifies_it() -> None:
    # verify is not transitive here: a~b and b~c, but not a~c. Order a, c, b: a opens,
    # c opens (verify(a, c) fails), b joins a (the first class that verifies it).
    a, b, c = 0, 1, 2
    pool = _pool([a, c, b], correct_labels={a}, equiv={(a, b): True, (b, c): True, (c, b): True})
    assert vote(pool, range(3)) == (0, 2)
    assert majority_at_n(pool, 3).value == 1.0


def test_verify_is_asked_representative_first() -> None:
    # verify(b, a) is False though verify(a, b) is True: with b first, a opens its own class.
    a, b = 0, 1
    pool = _pool([b, a], correct_labels={a}, equiv={(a, b): True, (b, a): False})
    assert vote(pool, range(2)) == (0, 2)  # tie, b opened first
    assert majority_at_n(pool, 2).value == 0.0
    pool = _pool([a, b], correct_labels={a}, equiv={(a, b): True, (b, a): False})
    assert vote(pool, range(2)) == (0, 1)
    assert majority_at_n(pool, 2).value == 1.0


def test_the_winning_class_is_judged_by_its_representative() -> None:
    # b joins a's class; the class answer is a's, which is wrong, although b is right.
    a, b = 0, 1
    pool = _pool([a, b, b, 2], correct_labels={b}, equiv={(a, b): True})
    assert majority_at_n(pool, 4).value == 0.0


def test_samples_without_an_answer_do_not_vote() -> None:
    pool = _pool([-1, -1, 0], correct_labels={0})
    assert majority_at_n(pool, 3).value == 1.0
    assert majority_at_n(pool, 2).value == pytest.approx(2 / 3)  # {-1, -1} has no vote: wrong
    assert majority_at_n(pool, 1).value == pytest.approx(1 / 3)


def test_pass_and_worst_hand_worked() -> None:
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert worst_at_k(5, 2, 2) == pytest.approx(1 / 10)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert worst_at_k(4, 4, 3) == 1.0 and worst_at_k(4, 2, 3) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


# ---------------------------------------------------------------------------------------
# Against enumeration


@st.composite
def pools(draw: st.DrawFn) -> VotePool:
    size = draw(st.integers(1, 7))
    n_ids = draw(st.integers(1, 4))
    labels = draw(st.lists(st.integers(-1, n_ids - 1), min_size=size, max_size=size))
    correct = draw(st.sets(st.integers(0, n_ids - 1)))
    # An arbitrary relation: neither symmetric nor transitive.
    equiv = {(r, a): draw(st.booleans()) for r in range(n_ids) for a in range(n_ids) if r != a}
    return _pool(labels, correct, equiv)


@given(pools(), st.data())
@settings(max_examples=300, deadline=None)
def test_exact_maj_at_n_matches_enumeration(pool: VotePool, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, pool.size))
    estimate = majority_at_n(pool, n)
    assert estimate.exact and estimate.subsets == math.comb(pool.size, n)
    assert estimate.value == pytest.approx(_brute_maj_at_n(pool, n))


@given(st.lists(st.booleans(), min_size=1, max_size=9), st.data())
@settings(max_examples=300, deadline=None)
def test_pass_and_worst_match_enumeration(correct: list[bool], data: st.DataObject) -> None:
    k = data.draw(st.integers(1, len(correct)))
    brute_pass, brute_worst = _brute_pass_worst(correct, k)
    assert pass_at_k(len(correct), sum(correct), k) == pytest.approx(brute_pass)
    assert worst_at_k(len(correct), sum(correct), k) == pytest.approx(brute_worst)


def test_sampled_maj_at_n_approaches_enumeration() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(-1, 4, size=12).tolist()
    pool = _pool(labels, correct_labels={1, 2}, equiv={(1, 2): True, (3, 0): True})
    exact = _brute_maj_at_n(pool, 5)  # C(12, 5) = 792 subsets
    sampled = majority_at_n(pool, 5, max_subsets=500, rng=np.random.default_rng(0))
    assert not sampled.exact and sampled.subsets == 500
    # 500 draws of a 0/1 outcome: standard error at most 0.023.
    assert sampled.value == pytest.approx(exact, abs=0.08)
    assert majority_at_n(pool, 5, max_subsets=792).exact


def test_majority_rejects_n_outside_the_pool() -> None:
    with pytest.raises(ValueError):
        majority_at_n(_pool([0, 1], set()), 3)


# ---------------------------------------------------------------------------------------
# Bootstrap and token shares


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    values = [0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75, 1.0]
    idx = bootstrap_indices(len(values), 2000, seed=7)
    first = bootstrap_mean(values, idx)
    assert first == bootstrap_mean(values, bootstrap_indices(len(values), 2000, seed=7))
    assert first.ci_low < first.mean < first.ci_high
    assert first.mean == pytest.approx(np.mean(values))
    # The normal approximation of the mean's 95% interval, for scale.
    half = 1.96 * np.std(values) / np.sqrt(len(values))
    assert first.ci_high - first.ci_low == pytest.approx(2 * half, rel=0.25)
    constant = bootstrap_mean([0.5] * 5, bootstrap_indices(5, 100, seed=0))
    assert (constant.ci_low, constant.mean, constant.ci_high) == (0.5, 0.5, 0.5)


def test_token_shares_follow_the_schedule_module() -> None:
    ead = parse_schedule({"type": "ead", "preset": "paper", "decay": 25})
    shares = token_shares(ead, [10, 30])
    temps = ead.temperatures(30)
    hot = sum(t > 1 for t in temps[:10]) + sum(t > 1 for t in temps)
    cold = sum(t < 1 for t in temps[:10]) + sum(t < 1 for t in temps)
    assert shares["tokens"] == 40
    assert shares["warmup"] == pytest.approx(20 / 40)  # c = 10: all of the first, 10 of the second
    assert shares["hot"] == pytest.approx(hot / 40) and shares["cold"] == pytest.approx(cold / 40)
    assert shares["cold"] > 0
    constant = token_shares(parse_schedule({"type": "constant", "tau": 0.6}), [5, 7])
    assert constant == {"tokens": 12, "warmup": 0.0, "hot": 0.0, "cold": 1.0}


def test_token_shares_of_entropy_driven_schedules_come_from_each_sample() -> None:
    clock = parse_schedule({"type": "ead", "clock": "entropy", "warmup": 2})
    shares = token_shares(clock, [3, 0, 2], [[1.0, 1.0, 1.1], None, [1.0, 0.5, 9.9]])  # an empty answer: no list
    assert shares == {"tokens": 5, "warmup": pytest.approx(4 / 5), "hot": pytest.approx(1 / 5),
                      "cold": pytest.approx(1 / 5)}
    entropic = token_shares(parse_schedule({"type": "entropy"}), [2], [[0.3, 1.2]])
    assert entropic["warmup"] == 0.0 and entropic["cold"] == 0.5
    with pytest.raises(ValueError, match="reported"):
        token_shares(clock, [3], [None])
