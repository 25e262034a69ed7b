"""The sample store, the run config, schedule arguments and datasets (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ead_server.bench.cli import main
from ead_server.bench.config import (
    LOCAL_KEYS,
    ConfigMismatch,
    check_config,
    parse_schedule_arg,
    read_config,
    request_seed,
    write_config,
)
from ead_server.bench.datasets import (
    ONE_SHOT_EXAMPLE,
    DatasetError,
    builtin_problems,
    format_prompt,
    load_jsonl,
    prompt_messages,
    prompt_text,
)
from ead_server.bench.grading import extract_answer
from ead_server.bench.store import SampleStore, StoreError
from ead_server.schedule import ScheduleError


def _sample(pid: str, label: str, i: int) -> dict:
    return {"problem_id": pid, "schedule": label, "sample_index": i, "text": f"{pid}/{label}/{i}"}


# ---------------------------------------------------------------------------------------
# Store


def test_store_appends_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    with SampleStore(path) as store:
        store.add([_sample("p", "A", 0), _sample("p", "A", 2)])
        assert store.missing("p", "A", 4) == [1, 3]
        with pytest.raises(StoreError, match="already stored"):
            store.add([_sample("p", "A", 2)])
    with SampleStore(path) as store:
        assert len(store) == 2 and ("p", "A", 2) in store
        store.add([_sample("p", "A", 1), _sample("p", "A", 3)])
        assert [s["sample_index"] for s in store.pool("p", "A", 4)] == [0, 1, 2, 3]
    assert len(path.read_text().splitlines()) == 4


def test_torn_last_line_is_dropped_and_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    with SampleStore(path) as store:
        store.add([_sample("p", "A", 0), _sample("p", "A", 1)])
    whole = path.read_bytes()
    path.write_bytes(whole[:-20])  # killed in the middle of writing the second line
    with SampleStore(path) as store:
        assert store.missing("p", "A", 2) == [1]
        store.add([_sample("p", "A", 1)])
    assert path.read_bytes() == whole


def test_a_corrupt_line_before_the_end_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(_sample("p", "A", 0)) + "\n{oops\n" + json.dumps(_sample("p", "A", 1)) + "\n")
    with pytest.raises(StoreError, match="line 2"):
        SampleStore(path)


# ---------------------------------------------------------------------------------------
# Run config


def test_config_refuses_to_resume_with_other_settings(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    config = {"model": "m", "api": "chat", "dataset": {"fingerprint": "x"}, "problems": ["a"],
              "schedules": [{"label": "c"}], "max_tokens": 8, "seed": 0, "prompt_template": "t", "n_max": 4}
    assert read_config(path) is None
    check_config(path, None, config)  # a new run
    write_config(path, config)
    stored = read_config(path)
    check_config(path, stored, {**config, "n_max": 16})  # a larger pool may be added
    check_config(path, stored, {**config, "model": "other"}, LOCAL_KEYS)  # the model is checked later
    with pytest.raises(ConfigMismatch, match="(?s)model.*schedules"):
        check_config(path, stored, {**config, "model": "other", "schedules": [{"label": "d"}]})
    check_config(path, stored, {**config, "schedules": [{"label": "c"}, {"label": "d"}]})  # an arm added
    with pytest.raises(ConfigMismatch, match="schedules"):  # a stored arm changed
        check_config(path, stored, {**config, "schedules": [{"label": "e"}, {"label": "d"}]})
    arms = {**config, "arms": [{"name": "a", "resolved": {"tau": 1.0}}]}
    check_config(path, arms, {**arms, "arms": [{"name": "a", "resolved": {"tau": 1.0, "h_ref": 1.8}}]}, ("arms",))
    with pytest.raises(ConfigMismatch, match="arms"):  # a default the stored arm ran with changed
        check_config(path, arms, {**arms, "arms": [{"name": "a", "resolved": {"tau": 0.5}}]}, ("arms",))


def test_cli_refuses_a_mismatching_run_before_asking_the_server(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Nothing listens on port 9: asking the server anything would fail differently.
    common = ["majority", "--out", str(tmp_path), "--problems", "2", "--base-url", "http://127.0.0.1:9/v1"]
    write_config(tmp_path / "config.json", {"max_tokens": 8})
    assert main([*common, "--max-tokens", "16"]) == 1
    assert "cannot be resumed" in capsys.readouterr().err


def test_cli_refuses_to_resume_a_run_with_another_prompt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A run stored with the one-shot example cannot be resumed without it (and vice versa).
    common = ["majority", "--out", str(tmp_path), "--problems", "2", "--base-url", "http://127.0.0.1:9/v1"]
    write_config(tmp_path / "config.json", {"prompt_example": ONE_SHOT_EXAMPLE})
    assert main([*common, "--no-one-shot"]) == 1
    assert "prompt_example" in capsys.readouterr().err


def test_prompt_shows_one_solved_example_in_the_graded_format() -> None:
    question = "What is 4 + 4?"
    chat = prompt_messages(question)
    assert [m["role"] for m in chat] == ["user", "assistant", "user"]
    assert chat[0]["content"] == format_prompt(ONE_SHOT_EXAMPLE["question"])
    assert chat[-1]["content"] == format_prompt(question)
    assert "step by step" in chat[-1]["content"] and "\\boxed{}" in chat[-1]["content"]
    # The example's answer is what the grader reads, and it is right.
    found = extract_answer(chat[1]["content"])
    assert (found.answer, found.method) == ("5", "boxed")
    assert prompt_messages(question, one_shot=False) == [{"role": "user", "content": format_prompt(question)}]
    text = prompt_text(question)
    assert text.startswith(format_prompt(ONE_SHOT_EXAMPLE["question"])) and text.endswith(format_prompt(question) + "\n")
    assert ONE_SHOT_EXAMPLE["answer"] in text
    assert prompt_text(question, one_shot=False) == format_prompt(question) + "\n"


def test_request_seeds_differ_per_pool_and_first_index() -> None:
    seeds = {request_seed(0, p, s, i) for p in ("a", "b") for s in ("x", "y") for i in (0, 3)}
    assert len(seeds) == 8 and all(0 <= s < 2**31 for s in seeds)
    assert request_seed(1, "a", "x", 0) == request_seed(1, "a", "x", 0)


# ---------------------------------------------------------------------------------------
# Schedule arguments


def test_parse_schedule_arg() -> None:
    s = parse_schedule_arg("ead:preset=paper,decay=25")
    assert s.label == "ead:preset=paper,decay=25" and s.spec == {"type": "ead", "preset": "paper", "decay": 25}
    assert s.resolved.decay == 25 and s.resolved.tau_min == 0.1
    c = parse_schedule_arg("constant:tau=0.6,label=T=0.6")
    assert c.label == "T=0.6" and c.is_constant and c.resolved.tau == 0.6
    r = parse_schedule_arg("ead:preset=released-code,decay_schedule.step=100")
    assert r.spec["decay_schedule"] == {"step": 100} and r.resolved.decay == 25 + 5 * 100
    assert parse_schedule_arg("reverse").resolved.type == "reverse"


@pytest.mark.parametrize(
    ("arg", "param"),
    [("ead:tau_min=fast", "tau_min"), ("ead:tau_min=2", "tau_min"), ("warm:tau=1", "type"),
     ("ead:decay=25,decay_schedule.step=1", "decay"), ("ead:bogus=1", "bogus")],
)
def test_bad_schedule_names_the_field(arg: str, param: str) -> None:
    with pytest.raises(ScheduleError) as info:
        parse_schedule_arg(arg)
    assert info.value.param == param


def test_cli_reports_a_bad_schedule_as_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["majority", "--schedules", "ead:tau_min=-1", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--schedules 'ead:tau_min=-1': field 'tau_min'" in err
    with pytest.raises(SystemExit):
        main(["majority", "--n-max", "4", "--ns", "1,8", "--out", str(tmp_path)])
    assert "must be <= --n-max" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Datasets


def test_builtin_problems_are_seeded_and_graded_by_difficulty() -> None:
    assert builtin_problems(20, difficulty=2, seed=1) == builtin_problems(20, difficulty=2, seed=1)
    assert builtin_problems(20, difficulty=2, seed=1) != builtin_problems(20, difficulty=2, seed=2)
    for difficulty in range(1, 6):
        problems = builtin_problems(50, difficulty=difficulty)
        assert len({p.id for p in problems}) == 50
        assert all(p.answer.lstrip("-").isdigit() for p in problems)
    level1 = builtin_problems(100, difficulty=1)
    for p in level1:
        a, b = (int(x) for x in p.question.removeprefix("What is ").rstrip("?").split(" + "))
        assert a + b == int(p.answer) and a < 10 and b < 10
    with pytest.raises(DatasetError):
        builtin_problems(3, difficulty=9)


def test_load_jsonl_gsm8k_and_math500(tmp_path: Path) -> None:
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(
        json.dumps({"question": "How many?", "answer": "Step 1 ... <<2*3=6>>\n#### 1,234"}) + "\n\n"
        + json.dumps({"question": "And now?", "answer": "#### -7"}) + "\n"
    )
    problems = load_jsonl(gsm)
    assert [(p.question, p.answer) for p in problems] == [("How many?", "1234"), ("And now?", "-7")]
    assert problems[0].id == "gsm8k-1"
    math500 = tmp_path / "math500.jsonl"
    math500.write_text(json.dumps({"problem": "Find x.", "answer": "\\frac{1}{2}", "unique_id": "test/1.json"}) + "\n")
    (p,) = load_jsonl(math500, question_field="problem")
    assert (p.id, p.answer) == ("test/1.json", "\\frac{1}{2}")
    aime = tmp_path / "aime.jsonl"
    aime.write_text(json.dumps({"id": 7, "problem": "Count.", "answer": 204}) + "\n")
    assert load_jsonl(aime, question_field="problem")[0].answer == "204"
    with pytest.raises(DatasetError, match="no field 'question'"):
        load_jsonl(math500)
    assert len(load_jsonl(gsm, limit=1)) == 1
