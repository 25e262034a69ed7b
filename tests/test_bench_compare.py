"""First-k Maj@k beside the tools people compare against.

The three votes below are transcribed from the tools' sources (cited at each one). They are
run on hand-made pools graded by the benchmark's own math-verify path, and
``tool_first_k`` must agree with each of them on every pool and k; where those tools and
our ``maj_first`` disagree by convention, the test pins the difference (documented in
docs/benchmark.md, "Comparing with other tools").
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from ead_server.bench.grading import GradeCache, ItemResult, check_item, grade_pools
from ead_server.bench.metrics import TOOLS, VotePool, majority_at_n, majority_first_k, tool_first_k

# ---------------------------------------------------------------------------------------
# Transcriptions. Each gets the extracted answers of a pool (None: nothing extracted) and a
# grader ``score(answer_text) -> bool``; the tools' own answer extraction is replaced by
# ours, which is the only change.


def lighteval_maj_at_n(final_text: Sequence[str | None], n: int, score: Callable[[str], bool]) -> bool:
    # huggingface/lighteval, src/lighteval/metrics/metrics_sample.py (commit 3fd15266):
    #   SamplingMetric.preprocess:  if not text: return ""   (strip_strings / normalize off by default)
    #   MajAtN.compute:
    #       all_answers = []
    #       for pred in model_response.final_text[: self.n]:
    #           all_answers.append(self.preprocess(text=pred))
    #       majority_prediction = max(all_answers, key=all_answers.count)
    #       return self.compute_score(new_doc, ModelResponse(text=[majority_prediction]))
    def preprocess(text: str | None) -> str:
        if not text:
            return ""
        return text

    all_answers = []
    for pred in final_text[:n]:
        all_answers.append(preprocess(pred))
    majority_prediction = max(all_answers, key=all_answers.count)
    # compute_score grades the prediction text; "" is what an answerless sample became.
    return majority_prediction != "" and score(majority_prediction)


def lm_eval_maj_at_k(resps: Sequence[str | None], k: int, score: Callable[[str], bool]) -> bool:
    # EleutherAI/lm-evaluation-harness (commit 4e7e0d47),
    # lm_eval/tasks/gsm8k/gsm8k-cot-self-consistency.yaml, filter "maj@8":
    #   take_first_k (k: 8) -> regex -> majority_vote -> take_first
    # lm_eval/filters/selection.py:
    #   TakeKFilter.apply:        map(lambda r: r[: self.k], resps)
    #   MajorityVoteFilter:       counts = Counter(resp); vote = counts.most_common(1)[0][0]
    #   TakeFirstFilter.apply:    map(lambda r: r[0], resps)
    # lm_eval/filters/extraction.py, RegexFilter: a response without a match becomes
    #   fallback="[invalid]" (here: our extraction found nothing).
    first_k = resps[:k]
    filtered = ["[invalid]" if r is None else r for r in first_k]
    counts = Counter(filtered)
    vote = counts.most_common(1)[0][0]
    picked = [vote][0]
    # exact_match against the gold then; "[invalid]" never matches a numeric gold.
    return not (picked == "[invalid]" and None in first_k) and score(picked)


def qwen_math_maj_at_k(preds: Sequence[str | None], scores: Sequence[bool], k: int) -> bool:
    # QwenLM/Qwen2.5-Math (commit a45202bd), evaluation/rm_maj_eval.py:
    #   eval_maj_k_metrics:  groups, majority_pred = group_pred(sample["pred"][:k], strip=False, use_symbol=False)
    #                        idx = groups[majority_pred][0]; right_count += sample["score"][idx]
    #   group_pred (use_symbol=False):
    #       cnt = Counter(preds); majority = cnt.most_common(1)[0][0]
    #       groups = defaultdict(list)
    #       for idx, pred in enumerate(preds): groups[pred].append(idx)
    #       return groups, orginal_preds[groups[majority][0]]
    # evaluation/parser.py, extract_answer: "" when no answer is found (here: our None).
    def group_pred(preds: list[str]) -> tuple[dict[str, list[int]], str]:
        orginal_preds = preds
        cnt = Counter(preds)
        majority = cnt.most_common(1)[0][0]
        groups: dict[str, list[int]] = defaultdict(list)
        for idx, pred in enumerate(preds):
            groups[pred].append(idx)
        return groups, orginal_preds[groups[majority][0]]

    pred = ["" if p is None else p for p in preds]
    groups, majority_pred = group_pred(pred[:k])
    idx = groups[majority_pred][0]
    return bool(scores[idx])


# ---------------------------------------------------------------------------------------
# Pools graded by the benchmark's own path (grade_pools), with checks run in this process.


class _InlineRunner:
    """GradingPool's interface, running check_item in the main thread (math-verify's
    signals need it): the real grading code, without worker processes."""

    restarts = 0

    def map(self, items: Sequence[tuple[str, str]], progress: Callable[[int], None] | None = None) -> list[ItemResult]:
        return [ItemResult(*check_item(gold, answer, 5.0)) for gold, answer in items]


def _graded(tmp_path: Path, gold: str, answers: list[str | None]) -> VotePool:
    cache = GradeCache(tmp_path / f"grades-{len(list(tmp_path.iterdir()))}.jsonl", 5.0)
    try:
        pools, _ = grade_pools({"p": gold}, {("p", "s"): answers}, runner=_InlineRunner(), cache=cache)  # type: ignore[arg-type]
    finally:
        cache.close()
    return pools[("p", "s")]


# gold, answers in sample order. Each pool is there for one convention difference.
POOLS: dict[str, tuple[str, list[str | None]]] = {
    # Equivalent forms: math-verify joins 0.5, \frac{1}{2} and 1/2 (3 votes) against 3 (2 votes);
    # as strings 3 is the only answer given twice.
    "equivalent_forms": ("1/2", ["3", "0.5", "\\frac{1}{2}", "1/2", "3"]),
    # Thousands separator: one class for math-verify, two strings for the tools.
    "separator": ("1000", ["1,000", "7", "1000", "7"]),
    # Answerless samples: they abstain here; in the tools they vote as one class ("" or
    # "[invalid]") and win.
    "answerless": ("5", [None, None, None, "5", "5"]),
    # Extracted but not parseable by math-verify (\text{}): abstains here, votes there.
    "unparseable": ("5", ["\\text{}", "5", "\\text{}", "\\text{}", "5", "6"]),
    # Ties, both orders: the class opened first wins everywhere.
    "tie_right_first": ("4", ["4", "5", "5", "4"]),
    "tie_wrong_first": ("4", ["5", "4", "4", "5"]),
    # Nothing to vote for in the first k.
    "all_answerless": ("2", [None, None, "2"]),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str | None], VotePool]]:
    tmp = tmp_path_factory.mktemp("grades")
    return {name: (answers, _graded(tmp, gold, answers)) for name, (gold, answers) in POOLS.items()}


def _reference(tool: str, answers: list[str | None], pool: VotePool, k: int) -> bool:
    grade = {a: c for a, c in zip(answers, pool.correct) if a is not None}
    if tool == "lighteval":
        return lighteval_maj_at_n(answers, k, lambda text: grade[text])
    if tool == "lm-eval":
        return lm_eval_maj_at_k(answers, k, lambda text: grade[text])
    return qwen_math_maj_at_k(answers, pool.correct, k)


def test_the_transcriptions_cover_every_tool() -> None:
    assert sorted(TOOLS) == ["lighteval", "lm-eval", "qwen-math"]


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tool_first_k_equals_the_tools_own_vote_on_hand_made_pools(graded, tool: str) -> None:
    for name, (answers, pool) in graded.items():
        for k in range(1, len(answers) + 1):
            assert tool_first_k(answers, pool.correct, k, tool) == _reference(tool, answers, pool, k), (name, k)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tool_first_k_equals_the_tools_own_vote_on_random_pools(tool: str) -> None:
    rng = random.Random(14)
    alphabet: list[str | None] = [None, "1", "2", "3", "4", ""]  # "" as an answer text collides with the fallback
    for _ in range(400):
        size = rng.randint(1, 9)
        answers = [rng.choice(alphabet) for _ in range(size)]
        right = {a: rng.random() < 0.4 for a in alphabet if a}
        correct = [a is not None and right.get(a, False) for a in answers]
        pool = VotePool(tuple(range(size)), tuple(correct), {})  # labels unused by tool_first_k
        for k in range(1, size + 1):
            assert tool_first_k(answers, pool.correct, k, tool) == _reference(tool, answers, pool, k), (answers, k)


# What each convention gives, pinned (k = the whole pool unless stated):
#                       ours (maj_first)   lighteval / lm-eval / qwen-math
EXPECTED = {
    "equivalent_forms": (True, False),
    "separator": (True, False),  # ours: {1,000, 1000} ties with {7}, opened first
    "answerless": (True, False),
    "unparseable": (True, False),
    "tie_right_first": (True, True),
    "tie_wrong_first": (False, False),
    "all_answerless": (True, False),  # k = 3: ours votes 2 alone; theirs: 2 answerless beat it
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_where_the_conventions_differ(graded, name: str) -> None:
    answers, pool = graded[name]
    k = len(answers)
    ours, theirs = EXPECTED[name]
    assert majority_first_k(pool, k) is ours
    for tool in TOOLS:
        assert tool_first_k(answers, pool.correct, k, tool) is theirs, tool


def test_first_k_of_a_short_prefix(graded) -> None:
    answers, pool = graded["all_answerless"]
    assert majority_first_k(pool, 2) is False  # nobody votes: wrong, like the tools' fallback class
    assert not any(tool_first_k(answers, pool.correct, 2, tool) for tool in TOOLS)
    answers, pool = graded["equivalent_forms"]
    # First 3: 3, 0.5, \frac{1}{2}: the half class has 2 votes here, a three-way string tie there.
    assert majority_first_k(pool, 3) is True
    assert not any(tool_first_k(answers, pool.correct, 3, tool) for tool in TOOLS)  # "3" seen first


def test_first_k_at_the_ends(graded) -> None:
    for answers, pool in graded.values():
        # k = 1 is the first sample's grade; k = P is the one subset the average sees.
        assert majority_first_k(pool, 1) == pool.correct[0]
        assert majority_first_k(pool, pool.size) == bool(majority_at_n(pool, pool.size).value)
    with pytest.raises(ValueError):
        majority_first_k(pool, pool.size + 1)
    with pytest.raises(ValueError):
        tool_first_k(answers, pool.correct, 0, "lm-eval")


def test_compare_with_flag_is_repeatable_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from ead_server.bench.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["majority", "--compare-with", "lm-eval", "--compare-with", "qwen-math"])
    assert args.compare_with == ["lm-eval", "qwen-math"]
    assert parser.parse_args(["majority"]).compare_with == []
    with pytest.raises(SystemExit):
        parser.parse_args(["majority", "--compare-with", "verl"])
    assert "invalid choice: 'verl'" in capsys.readouterr().err
