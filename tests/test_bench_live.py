"""``ead-bench majority`` against a live server: a mini run end to end, and a run killed
mid-way and resumed.

The server comes from the fixtures ``server_url`` (a base URL ending in ``/v1``) and
``model_name`` of ``conftest.py``: a session-scoped ead-server on a tiny model. Without
them the tests use ``$EAD_BENCH_SERVER_URL`` (and ``$EAD_BENCH_MODEL``, default: the first
model the server lists), else they are skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ead_server.bench.cli import main

pytestmark = pytest.mark.engine

SCHEDULES = ["constant:tau=1.0", "ead:preset=paper,decay=25"]


@pytest.fixture
def live(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    try:
        return request.getfixturevalue("server_url"), request.getfixturevalue("model_name")
    except pytest.FixtureLookupError:
        url = os.environ.get("EAD_BENCH_SERVER_URL")
        if not url:
            pytest.skip("needs the server_url / model_name fixtures or $EAD_BENCH_SERVER_URL")
        return url, os.environ.get("EAD_BENCH_MODEL")


def _args(live: tuple[str, str | None], out: Path, *extra: str) -> list[str]:
    url, model = live
    args = ["majority", "--base-url", url, "--out", str(out), "--no-progress", "--seed", "3"]
    for schedule in SCHEDULES:
        args += ["--schedules", schedule]
    return args + (["--model", model] if model else []) + list(extra)


def _keys(out: Path) -> list[tuple[str, str, int]]:
    return [(r["problem_id"], r["schedule"], r["sample_index"])
            for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())]


def test_mini_run_end_to_end(live: tuple[str, str | None], tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = _args(live, out, "--problems", "3", "--n-max", "4", "--ns", "1,2,4", "--max-tokens", "32",
                 "--grading-timeout", "2", "--concurrency", "2")
    assert main(args) == 0
    for name in ("config.json", "samples.jsonl", "grades.jsonl", "results.json", "results.md", "majority.png",
                 "passk.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "majority.png").read_bytes()[:4] == b"\x89PNG"

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 2 * 4 and len(set(_keys(out))) == 24
    for s in samples:
        assert s["n_tokens"] == len(s["logprobs"]) and 1 <= s["n_tokens"] <= 32
        assert all(lp <= 0 for lp in s["logprobs"])
        if s["schedule"].startswith("ead"):
            assert s["schedule_echo"]["type"] == "ead" and s["schedule_echo"]["decay"] == 25
            assert s["temperatures"] is None or len(s["temperatures"]) == s["n_tokens"]

    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == 1 and results["n_problems"] == 3
    assert [s["label"] for s in results["schedules"]] == SCHEDULES
    for s in results["schedules"]:
        assert set(s["maj"]) == set(s["pass"]) == set(s["worst"]) == {"1", "2", "4"}
        for stat in (*s["maj"].values(), *s["pass"].values(), s["mean_accuracy"]):
            assert 0 <= stat["ci_low"] <= stat["mean"] <= stat["ci_high"] <= 1
        assert s["maj"]["1"]["mean"] == pytest.approx(s["mean_accuracy"]["mean"])
        assert s["samples"] == 12 and s["token_shares"]["tokens"] == sum(
            x["n_tokens"] for x in samples if x["schedule"] == s["label"])
    assert results["schedules"][1]["vs_baseline"]["baseline"] == SCHEDULES[0]
    assert len(results["per_problem"]) == 6
    assert "## Maj@N" in (out / "results.md").read_text()

    # The same command again generates nothing, and the stored samples are untouched.
    before = (out / "samples.jsonl").read_bytes()
    assert main(args) == 0
    assert (out / "samples.jsonl").read_bytes() == before


def test_killed_run_resumes_without_losing_or_repeating_samples(live: tuple[str, str | None], tmp_path: Path) -> None:
    out = tmp_path / "run"
    problems, n_max = 8, 4
    args = _args(live, out, "--problems", str(problems), "--n-max", str(n_max), "--ns", "1,4",
                 "--max-tokens", "64", "--concurrency", "1")
    total = problems * len(SCHEDULES) * n_max
    proc = subprocess.Popen([sys.executable, "-m", "ead_server.bench.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples = out / "samples.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if samples.exists() and samples.read_bytes().count(b"\n") >= n_max:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    stored = samples.read_bytes()
    kept = stored[: stored.rfind(b"\n") + 1]  # complete lines; a torn one is generated again
    n_kept = kept.count(b"\n")
    assert n_max <= n_kept < total

    assert main(args) == 0
    keys = _keys(out)
    assert len(keys) == total and not [k for k, c in Counter(keys).items() if c > 1]
    assert samples.read_bytes().startswith(kept)  # nothing written before the kill is lost
