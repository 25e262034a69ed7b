"""results.json, results.md and the plots from graded pools (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ead_server.bench.config import parse_schedule_arg
from ead_server.bench.metrics import VotePool
from ead_server.bench.report import markdown, write_report
from ead_server.bench.summary import SCHEMA_VERSION, summarize

SCHEDULES = [parse_schedule_arg("constant:tau=1.0"), parse_schedule_arg("ead:preset=paper,decay=25")]


def _results(n_tokens: int) -> dict:
    # p1: answers a a b b (a correct); p2: c c c d (d correct). Same pools under both schedules.
    p1 = VotePool((0, 0, 1, 1), (True, True, False, False), {(0, 1): False, (1, 0): False})
    p2 = VotePool((0, 0, 0, 1), (False, False, False, True), {(0, 1): False, (1, 0): False})
    keys = [(pid, s.label) for pid in ("p1", "p2") for s in SCHEDULES]
    pools = {k: p1 if k[0] == "p1" else p2 for k in keys}
    samples = {k: [{"n_tokens": n_tokens, "finish_reason": "stop"}] * 4 for k in keys}
    return summarize(
        config={"model": "m", "api": "chat", "dataset": {"source": "builtin"}, "n_max": 4, "max_tokens": 16,
                "seed": 0},
        schedules=SCHEDULES, problem_ids=["p1", "p2"], pools=pools, samples=samples,
        extraction_methods={k: ["boxed"] * 4 for k in keys}, ns=[1, 2, 4], seed=0, resamples=200,
    )


def test_summary_numbers_and_schema() -> None:
    results = _results(n_tokens=8)
    assert results["schema_version"] == SCHEMA_VERSION and results["n_problems"] == 2
    first = results["schedules"][0]
    assert first["mean_accuracy"]["mean"] == pytest.approx((0.5 + 0.25) / 2)
    # p1: Maj@4 tie between a and b, a opened first and is right; p2: c wins, wrong.
    assert first["maj"]["4"]["mean"] == pytest.approx(0.5)
    assert first["pass"]["2"]["mean"] == pytest.approx(((1 - 1 / 6) + 0.5) / 2)
    assert first["worst"]["2"]["mean"] == pytest.approx((1 / 6 + 0) / 2)
    assert first["distinct_classes"]["mean"] == 2 and first["response_tokens"]["mean"] == 8
    assert first["vs_baseline"] is None
    delta = results["schedules"][1]["vs_baseline"]
    assert delta["baseline"] == "constant:tau=1.0" and delta["maj"]["4"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert json.loads(json.dumps(results)) == results  # plain JSON


def test_markdown_says_when_the_warm_up_holds_most_tokens() -> None:
    # 8 tokens a completion, all inside EAD's 10-token warm-up.
    text = markdown(_results(n_tokens=8))
    assert "## Maj@N" in text and "| ead:preset=paper,decay=25 |" in text
    assert "100% of its tokens were sampled inside the warm-up" in text
    assert "cannot differ from constant temperature 1.0" in text
    assert "## Warm-up" in text and "## Warm-up" not in markdown(_results(n_tokens=100))  # 10% in the warm-up


def test_write_report_writes_all_files(tmp_path: Path) -> None:
    paths = write_report(_results(n_tokens=40), tmp_path)
    assert [p.name for p in paths] == ["results.json", "results.md", "majority.png", "passk.png"]
    for p in paths:
        assert p.stat().st_size > 0
    assert paths[2].read_bytes()[:4] == b"\x89PNG" and paths[3].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths[0].read_text())["schedules"][1]["token_shares"]["warmup"] == pytest.approx(10 / 40)


def _first_k_results(compare_with: list[str]) -> dict:
    # p1: b a a b (a correct): the first sample and the first-k ties are wrong, while the
    # subset average gives 0.5. p2: - - a b (a correct): answerless first, then a tie.
    p1 = VotePool((1, 0, 0, 1), (False, True, True, False), {(0, 1): False, (1, 0): False})
    p2 = VotePool((-1, -1, 0, 1), (False, False, True, False), {(0, 1): False, (1, 0): False})
    answers = {("p1", "constant:tau=1.0"): ["b", "a", "a", "b"], ("p2", "constant:tau=1.0"): [None, None, "a", "b"]}
    keys = list(answers)
    return summarize(
        config={"model": "m", "api": "chat", "dataset": {"source": "builtin"}, "n_max": 4, "max_tokens": 16,
                "seed": 0},
        schedules=SCHEDULES[:1], problem_ids=["p1", "p2"], pools=dict(zip(keys, (p1, p2))),
        samples={k: [{"n_tokens": 40, "finish_reason": "stop"}] * 4 for k in keys},
        extraction_methods={k: ["boxed"] * 4 for k in keys}, ns=[1, 2, 4], seed=0, resamples=200,
        answers=answers, compare_with=compare_with,
    )


def test_first_k_majority_beside_the_subset_average() -> None:
    results = _first_k_results(["lm-eval", "qwen-math"])
    s = results["schedules"][0]
    # Subset average at N = 1: p1 two of four samples right, p2 one of four.
    assert s["maj"]["1"]["mean"] == pytest.approx((0.5 + 0.25) / 2)
    # First k: p1 b | b,a tie -> b | b,a,a,b tie -> b: wrong each time.
    # p2: - | -,- (nobody votes) | -,-,a,b tie -> a: right only at k = 4.
    assert [s["maj_first"][k]["mean"] for k in ("1", "2", "4")] == [0.0, 0.0, 0.5]
    # lm-eval and Qwen: at k = 4 the two answerless samples form the largest class in p2.
    for tool in ("lm-eval", "qwen-math"):
        assert [s["compare"][tool][k]["mean"] for k in ("1", "2", "4")] == [0.0, 0.0, 0.0]
    assert results["settings"]["compare_with"] == ["lm-eval", "qwen-math"]
    rows = results["per_problem"]
    assert rows[1]["maj_first"] == {"1": 0.0, "2": 0.0, "4": 1.0}
    assert rows[1]["compare"]["lm-eval"] == {"1": 0.0, "2": 0.0, "4": 0.0}
    text = markdown(results)
    assert "## Maj@k of the first k samples" in text and "## Maj@k as lm-eval votes" in text
    assert "'[invalid]'" in text and "## Maj@k as qwen-math votes" in text
    assert "## Maj@k as lighteval votes" not in text


def test_without_compare_with_there_is_no_compare_field() -> None:
    results = _first_k_results([])
    assert "compare" not in results["schedules"][0] and "compare" not in results["per_problem"][0]
    assert results["settings"]["compare_with"] == []
    assert "maj_first" in results["schedules"][0]


def test_compare_with_needs_the_answers() -> None:
    with pytest.raises(ValueError, match="extracted answers"):
        summarize(config={}, schedules=SCHEDULES[:1], problem_ids=[], pools={}, samples={}, extraction_methods={},
                  ns=[1], seed=0, compare_with=["lighteval"])


def test_difference_table_has_first_k_columns_and_old_results_still_render() -> None:
    results = _results(n_tokens=40)
    text = markdown(results)
    assert "| schedule | mean accuracy | Maj@1 | Maj@2 | Maj@4 | first-k Maj@1 | first-k Maj@2 | first-k Maj@4 |" in text
    # results.json written before maj_first existed: the tables it has, no first-k ones.
    for s in results["schedules"]:
        s.pop("maj_first")
        if s["vs_baseline"]:
            s["vs_baseline"].pop("maj_first")
    results["settings"].pop("compare_with")
    old = markdown(results)
    assert "## Maj@N" in old and "first k samples" not in old and "first-k Maj@" not in old
