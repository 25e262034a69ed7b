"""Writing a run's results: ``results.json``, ``results.md``, ``majority.png``, ``passk.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402

from ead_server.bench.metrics import TOOLS  # noqa: E402
from ead_server.bench.summary import WARMUP_MAJORITY  # noqa: E402
from ead_server.schedule import ANNEALED_TYPES  # noqa: E402

__all__ = ["write_report"]


def _ci(stat: dict[str, float], digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} [{stat['ci_low']:.{digits}f}, {stat['ci_high']:.{digits}f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _warmup_notes(results: dict[str, Any]) -> list[str]:
    notes = []
    for s in results["schedules"]:
        r, shares = s["resolved"], s["token_shares"]
        if r["type"] in ANNEALED_TYPES and shares["warmup"] > WARMUP_MAJORITY:
            notes.append(
                f"- **{s['label']}**: {shares['warmup']:.0%} of its tokens were sampled inside the warm-up "
                f"(the first c = {r['warmup']} tokens, always at temperature 1.0; mean response "
                f"{s['response_tokens']['mean']:.1f} tokens). There EAD and temperature 1.0 sample "
                "identically, so its results cannot differ from constant temperature 1.0 because of the "
                "schedule."
            )
    return notes


def _first_k_sections(results: dict[str, Any]) -> list[str]:
    """The first-k tables: ours (``maj_first``) and one per ``--compare-with`` tool.

    Results written before ``maj_first`` existed have neither, and get no section.
    """
    ns = results["settings"]["ns"]
    scheds = results["schedules"]
    lines: list[str] = []
    if all("maj_first" in s for s in scheds):
        lines += [
            "## Maj@k of the first k samples",
            "",
            "The same vote over samples 0 .. k-1 only: what lighteval, lm-evaluation-harness and the "
            "Qwen2.5-Math evaluation report. Same expectation as Maj@N above, more variance.",
            "",
            *_table(["schedule", *(f"k={n}" for n in ns)],
                    [[s["label"], *(_ci(s["maj_first"][str(n)]) for n in ns)] for s in scheds]),
            "",
        ]
    for tool in results["settings"].get("compare_with", []):
        fallback = TOOLS[tool].fallback if tool in TOOLS else None
        lines += [
            f"## Maj@k as {tool} votes",
            "",
            "First k samples; classes are identical answer texts (no math-verify between answers); a sample "
            f"without an answer votes as {fallback!r}; ties go to the answer seen first; the winner is graded "
            "with math-verify.",
            "",
            *_table(["schedule", *(f"k={n}" for n in ns)],
                    [[s["label"], *(_ci(s["compare"][tool][str(n)]) for n in ns)] for s in scheds]),
            "",
        ]
    return lines


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    ns = results["settings"]["ns"]
    boot = results["settings"]["bootstrap"]
    scheds = results["schedules"]
    ds = cfg.get("dataset", {})
    lines = [
        "# Majority-vote test-time scaling",
        "",
        f"Model `{cfg.get('model')}` via `/v1/{'chat/completions' if cfg.get('api') == 'chat' else 'completions'}`; "
        f"dataset `{ds.get('source')}` ({results['n_problems']} problems); pool of {cfg.get('n_max')} samples "
        f"per problem and schedule; max_tokens {cfg.get('max_tokens')}; seed {cfg.get('seed')}.",
        f"Means over problems with {boot['confidence']:.0%} percentile-bootstrap intervals "
        f"({boot['resamples']} resamples of problems).",
        "",
        "## Maj@N",
        "",
        *_table(["schedule", *(f"N={n}" for n in ns)], [[s["label"], *(_ci(s["maj"][str(n)]) for n in ns)] for s in scheds]),
        "",
        *_first_k_sections(results),
        "## Pass@k",
        "",
        *_table(["schedule", *(f"k={n}" for n in ns)], [[s["label"], *(_ci(s["pass"][str(n)]) for n in ns)] for s in scheds]),
        "",
        "## Worst@k",
        "",
        *_table(["schedule", *(f"k={n}" for n in ns)], [[s["label"], *(_ci(s["worst"][str(n)]) for n in ns)] for s in scheds]),
        "",
        "## Samples",
        "",
        *_table(
            ["schedule", "mean accuracy", "answer classes / problem", "response tokens", "warm-up c", "k * d",
             "anneal ends at token", "tokens in warm-up", "hot (tau > 1)", "cold (tau < 1)", "stopped / cut"],
            [
                [
                    s["label"], _ci(s["mean_accuracy"]), _ci(s["distinct_classes"], 2), _ci(s["response_tokens"], 1),
                    str(s["resolved"]["warmup"]) if s["resolved"]["type"] in ANNEALED_TYPES else "-",
                    f"{s['resolved']['time_scale'] * s['resolved']['decay']:g}" if s["resolved"]["type"] in ANNEALED_TYPES
                    else "-",
                    "-" if s["anneal_end_token"] is None else str(s["anneal_end_token"]),
                    f"{s['token_shares']['warmup']:.0%}", f"{s['token_shares']['hot']:.0%}",
                    f"{s['token_shares']['cold']:.0%}",
                    f"{s['finish_reasons'].get('stop', 0)} / {s['finish_reasons'].get('length', 0)}",
                ]
                for s in scheds
            ],
        ),
        "",
    ]
    if len(scheds) > 1:
        base = scheds[0]["label"]
        first = [n for n in ns if all("maj_first" in s["vs_baseline"] for s in scheds[1:])]
        lines += [
            f"## Difference to `{base}` (paired bootstrap)",
            "",
            *_table(
                ["schedule", "mean accuracy", *(f"Maj@{n}" for n in ns), *(f"first-k Maj@{n}" for n in first)],
                [[s["label"], _ci(s["vs_baseline"]["mean_accuracy"]),
                  *(_ci(s["vs_baseline"]["maj"][str(n)]) for n in ns),
                  *(_ci(s["vs_baseline"]["maj_first"][str(n)]) for n in first)] for s in scheds[1:]],
            ),
            "",
        ]
    notes = _warmup_notes(results)
    if notes:
        lines += ["## Warm-up", "", *notes, ""]
    g = results.get("grading", {})
    if g:
        lines += [
            "## Grading",
            "",
            f"math-verify checks: {g.get('checks', 0)} run, {g.get('cached', 0)} from the cache; "
            f"{g.get('timed_out', 0)} timed out (counted wrong; timeout {g.get('timeout_s')} s); "
            f"problems whose gold answer did not parse: {g.get('gold_unparsed', 0)}.",
            "Answers: " + "; ".join(
                f"{s['label']}: " + ", ".join(f"{k} {v}" for k, v in sorted(s["extraction"].items())) for s in scheds
            ) + ".",
            "",
        ]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path, series: list[tuple[str, str]], xlabel: str, ylabel: str,
          title: str, bands: int | None = None) -> None:
    """One color per schedule; ``series`` are (metric key, line style), the first one labelled.

    The first ``bands`` series (all by default) get their bootstrap band; a series missing
    from the results (written before it existed) is skipped."""
    ns = results["settings"]["ns"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(results["schedules"]):
        color = colors[i % len(colors)]
        for j, (key, style) in enumerate(series):
            if key not in s:
                continue
            stats = [s[key][str(n)] for n in ns]
            ax.plot(ns, [x["mean"] for x in stats], style, color=color, marker="o" if j == 0 else "x",
                    label=s["label"] if j == 0 else None)
            if bands is None or j < bands:
                ax.fill_between(ns, [x["ci_low"] for x in stats], [x["ci_high"] for x in stats], color=color,
                                alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    """Write the four result files into ``out``; returns their paths."""
    paths = [out / "results.json", out / "results.md", out / "majority.png", out / "passk.png"]
    tmp = paths[0].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(paths[0])
    paths[1].write_text(markdown(results) + "\n")
    name = results["config"].get("model")
    # The first-k line gets no band: two bands a schedule would hide the lines.
    _plot(results, paths[2], [("maj", "-"), ("maj_first", "--")], "N (samples voting)", "Maj@N",
          f"Maj@N: subset average (solid, band), first N samples (dashed), {name}", bands=1)
    _plot(results, paths[3], [("pass", "-"), ("worst", "--")], "k (samples)", "Pass@k / Worst@k",
          f"Pass@k (solid) and Worst@k (dashed), {name}")
    return paths
