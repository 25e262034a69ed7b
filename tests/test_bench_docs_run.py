"""The run documented in docs/benchmark.md, regenerated from its committed samples.

``docs/data/smollm2-oneshot/`` holds that run's ``config.json`` and ``samples.jsonl``
(gzip). Rerunning the documented command on them needs no server (every sample is stored):
it grades with math-verify and writes ``results.md``, whose Maj@N tables must appear in
the docs exactly as printed there.
"""

from __future__ import annotations

import gzip
import json
import shutil
import signal
from pathlib import Path

import pytest

from ead_server.bench.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data" / "smollm2-oneshot"
DOC = ROOT / "docs" / "benchmark.md"

# The documented command, less --base-url (not needed once every sample is stored) and --out.
ARGS = [
    "majority",
    "--schedules", "constant:tau=0.6", "--schedules", "constant:tau=1.0",
    "--schedules", "ead:preset=paper,decay=25", "--schedules", "ead:preset=released-code,decay=5",
    "--schedules", "reverse:preset=paper,decay=25",
    "--problems", "30", "--n-max", "8", "--ns", "1,2,4,8", "--max-tokens", "96",
    "--compare-with", "lighteval", "--compare-with", "lm-eval", "--compare-with", "qwen-math",
]


def _section(markdown: str, heading: str) -> str:
    """The table under ``heading`` in results.md: its header, rule and rows."""
    lines = markdown.splitlines()
    start = lines.index(heading)
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    assert table, heading
    return "\n".join(table)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("docs-run")
    shutil.copy(DATA / "config.json", out / "config.json")
    with gzip.open(DATA / "samples.jsonl.gz", "rb") as src, (out / "samples.jsonl").open("wb") as dst:
        shutil.copyfileobj(src, dst)
    old = signal.getsignal(signal.SIGTERM)  # main() installs its own
    try:
        assert main([*ARGS, "--out", str(out), "--no-progress", "--grading-workers", "2"]) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
    return (out / "results.md").read_text(), json.loads((out / "results.json").read_text())


def test_the_committed_samples_are_the_whole_documented_run(regenerated) -> None:
    _, results = regenerated
    assert (DATA / "samples.jsonl.gz").stat().st_size < 3_000_000
    assert results["n_problems"] == 30
    assert [s["samples"] for s in results["schedules"]] == [240] * 5


@pytest.mark.parametrize("heading", ["## Maj@N", "## Maj@k of the first k samples", "## Maj@k as lm-eval votes"])
def test_documented_table_is_regenerated(regenerated, heading: str) -> None:
    markdown, _ = regenerated
    table = _section(markdown, heading)
    assert table in DOC.read_text(), f"docs/benchmark.md lacks the regenerated table {heading!r}:\n{table}"


def test_the_three_tools_agree_on_this_run(regenerated) -> None:
    # Their votes differ only in the answerless fallback ("" or "[invalid]"); docs say so.
    markdown, _ = regenerated
    tables = {tool: _section(markdown, f"## Maj@k as {tool} votes") for tool in ("lighteval", "lm-eval", "qwen-math")}
    assert tables["lighteval"] == tables["lm-eval"] == tables["qwen-math"]


def test_docs_state_the_command_that_made_the_run() -> None:
    doc = DOC.read_text()
    for arg in ARGS:
        assert arg in doc, arg
