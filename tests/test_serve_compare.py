"""``ead-bench serve-compare``: the smoke run against stock vLLM, and its statistics.

The smoke run asserts no timing: that every case runs on the right server, generates
the tokens it asked for, and that every ratio is reported. It uses the session's shared
ead-server as ours (``--ours-url``) and starts only stock vLLM, so at most two engines
are alive at once. The statistics tests check the interval and the stopping rule on
hand-made ratios.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ead_server.bench import serve_compare
from ead_server.bench.cli import build_parser
from ead_server.bench.serve_compare import CASES, RATIOS, Load, interval, summarize


@pytest.mark.engine
def test_quick_run_reports_every_case_against_stock_without_our_processor(
        server, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args([
        "serve-compare", "--quick", "--ours-url", server.base_url, "--model", str(tiny_model_dir),
        "--served-model-name", "tiny", "--server-arg=--max-model-len=512", "--out", str(tmp_path),
        "--startup-timeout", "600",
    ])
    assert serve_compare.run(args) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    out = capsys.readouterr().out

    (only_round,) = record["rounds"]
    # The baseline is stock vLLM: our processor's admission check did not run there.
    assert only_round["processor_loaded"] == {"stock": False, "ours": True}
    assert set(only_round["loads"]) == {c.name for c in CASES}
    for case, per_c in only_round["loads"].items():
        assert set(per_c) == {"1", "4"}
        for c, load in per_c.items():
            assert load["requests"] == max(4, 2 * int(c))
            if case in ("stock fixed-T", "unscheduled", "ead"):  # ignore_eos: every token is generated
                assert load["tokens"] == 8 * load["requests"]
            else:  # rollouts may stop at EOS
                assert 0 < load["tokens"] <= 8 * load["requests"]
            assert load["throughput"] > 0 and 0 < load["p50"] <= load["p99"]

    reported = {(r["ratio"], r["concurrency"], r["metric"]) for r in record["ratios"]}
    assert reported == {(ratio.name, c, m) for ratio in RATIOS for c in (1, 4) for m in serve_compare.METRICS}
    for row in record["ratios"]:
        assert row["value"] > 0 and math.isfinite(row["value"]) and row["rounds"] == 1
        assert row["verdict"] == ("not distinguishable" if row["metric"] in RATIOS_TARGETS[row["ratio"]] else None)
    for ratio in RATIOS:
        assert ratio.name in out
    # Stock vLLM's own server module, given ead-server serve's engine flags and ours.
    stock_cmd = record["commands"]["stock"]
    assert stock_cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert {"--logprobs-mode", "processed_logprobs", "--max-model-len=512", str(tiny_model_dir)} <= set(stock_cmd)
    assert record["commands"]["ours"] == {"url": server.base_url}

RATIOS_TARGETS = {ratio.name: set(ratio.targets) for ratio in RATIOS}


def test_interval_is_the_geometric_mean_with_a_t_interval() -> None:
    value, lo, hi = interval([1.0, 1.0, 1.0])
    assert (value, lo, hi) == (1.0, 1.0, 1.0)
    value, lo, hi = interval([0.9, 1.1])
    assert value == pytest.approx(math.sqrt(0.99))
    # Two rounds, one degree of freedom: half-width t(0.975, 1) * stdev / sqrt(2) on the log scale.
    half = 12.706 * (abs(math.log(1.1) - math.log(0.9)) / math.sqrt(2)) / math.sqrt(2)
    assert (lo, hi) == (pytest.approx(value * math.exp(-half)), pytest.approx(value * math.exp(half)))
    value, lo, hi = interval([0.95])
    assert value == pytest.approx(0.95) and math.isnan(lo) and math.isnan(hi)


def _load(throughput: float, p50: float = 1.0) -> Load:
    return Load(throughput, p50, p50 * 2, 8, 64, 64 / throughput)


def test_summary_verdicts_and_stopping_rule() -> None:
    def round_(stock: float, ours: float) -> dict[str, dict[int, Load]]:
        return {"stock fixed-T": {1: _load(stock)}, "unscheduled": {1: _load(ours)}}

    rows = summarize([round_(100, 100.0), round_(100, 100.2), round_(100, 99.9)], [1])
    tput = next(r for r in rows if r["metric"] == "throughput")
    assert tput["verdict"] == "meets" and tput["settled"] and tput["rounds"] == 3
    p50 = next(r for r in rows if r["metric"] == "p50")
    assert p50["verdict"] == "meets"  # equal latencies: ratio 1 <= 1.02
    assert next(r for r in rows if r["metric"] == "p99")["verdict"] is None  # reported, not gated

    rows = summarize([round_(100, 90), round_(100, 91), round_(100, 89)], [1])
    assert next(r for r in rows if r["metric"] == "throughput")["verdict"] == "misses"

    noisy = summarize([round_(100, 80), round_(100, 120)], [1])
    tput = next(r for r in noisy if r["metric"] == "throughput")
    assert tput["verdict"] == "not distinguishable" and not tput["settled"]
    assert tput["lo"] < 0.99 < tput["hi"]

    # Only ratios whose two cases were measured appear.
    assert {r["ratio"] for r in noisy} == {"unscheduled / stock"}
