"""Problems for the benchmark: the built-in generator, the JSONL loader and the prompt.

A problem is a question and a gold answer string that math-verify can parse. The built-in
set is generated offline from a seed, so a run needs no download; JSONL files cover
GSM8K (``question`` / ``answer`` with its ``#### 42`` line), MATH-500 (``problem`` /
``answer``) and AIME-style files.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "BUILTIN_DIFFICULTIES",
    "DEFAULT_DIFFICULTY",
    "PROMPT_TEMPLATE",
    "ONE_SHOT_EXAMPLE",
    "DatasetError",
    "Problem",
    "builtin_problems",
    "dataset_fingerprint",
    "format_prompt",
    "prompt_messages",
    "prompt_text",
    "load_jsonl",
]

# The instruction of the Qwen2.5-Math evaluations: reason, then box the final answer.
PROMPT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


# The one-shot example put before the question (on by default, --no-one-shot drops it): a
# solved problem in the exact format the grader reads first, ``... \boxed{5}``. Without it
# SmolLM2-135M-Instruct boxed 6 of 720 answers and rambled; with it, 93% at temperature 0.6
# (docs/benchmark.md).
ONE_SHOT_EXAMPLE = {
    "question": "What is 2 + 3?",
    "answer": "We start with 2 and add 3.\n2 + 3 = 5.\nSo the final answer is \\boxed{5}.",
}


class DatasetError(ValueError):
    """A dataset that cannot be loaded: missing file, field or answer."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def prompt_messages(question: str, one_shot: bool = True) -> list[dict[str, str]]:
    """The chat of one request: the one-shot example as a user / assistant turn, then the question."""
    example = [
        {"role": "user", "content": format_prompt(ONE_SHOT_EXAMPLE["question"])},
        {"role": "assistant", "content": ONE_SHOT_EXAMPLE["answer"]},
    ] if one_shot else []
    return [*example, {"role": "user", "content": format_prompt(question)}]


def prompt_text(question: str, one_shot: bool = True) -> str:
    """The plain prompt of ``/v1/completions``: the example's prompt and answer, a blank line, the question."""
    example = f"{format_prompt(ONE_SHOT_EXAMPLE['question'])}\n{ONE_SHOT_EXAMPLE['answer']}\n\n" if one_shot else ""
    return f"{example}{format_prompt(question)}\n"


def dataset_fingerprint(problems: list[Problem]) -> str:
    """A hash of the problems a run uses: resuming into a run with other problems is refused."""
    blob = json.dumps([asdict(p) for p in problems], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Built-in generator

_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells"]


def _operands(rng: random.Random, lo: int, hi: int, op: str) -> tuple[int, int]:
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "-" and b > a:  # results stay non-negative: a weak model knows no negatives
        a, b = b, a
    return a, b


def _arithmetic(rng: random.Random, lo: int, hi: int, ops: str) -> tuple[str, int]:
    op = rng.choice(ops)
    a, b = _operands(rng, lo, hi, op)
    return f"What is {a} {op} {b}?", {"+": a + b, "-": a - b, "*": a * b}[op]


def _word(rng: random.Random, lo: int, hi: int, ops: str) -> tuple[str, int]:
    op = rng.choice(ops.replace("*", "") or "+")
    a, b = _operands(rng, lo, hi, op)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if op == "+":
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    return f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", a - b


def _two_step(rng: random.Random, lo: int, hi: int, ops: str) -> tuple[str, int]:
    a, b, c = rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if a + b < c:
        c = rng.randint(lo, a + b)
    return (
        f"{name} has {a} {item}, buys {b} more and then gives {c} to a friend. "
        f"How many {item} does {name} have now?",
        a + b - c,
    )


Maker = Callable[[random.Random, int, int, str], tuple[str, int]]

# Each level: (smallest operand, largest operand, operators, generators and their weights).
BUILTIN_DIFFICULTIES: dict[int, tuple[int, int, str, tuple[tuple[Maker, float], ...]]] = {
    1: (1, 9, "+", ((_arithmetic, 1.0),)),
    2: (1, 9, "+-", ((_arithmetic, 0.5), (_word, 0.5))),
    3: (2, 19, "+-", ((_arithmetic, 0.5), (_word, 0.5))),
    4: (10, 99, "+-", ((_arithmetic, 0.5), (_word, 0.5))),
    5: (10, 99, "+-*", ((_arithmetic, 0.4), (_word, 0.3), (_two_step, 0.3))),
}
DEFAULT_DIFFICULTY = 1


def builtin_problems(n: int, *, difficulty: int = DEFAULT_DIFFICULTY, seed: int = 0) -> list[Problem]:
    """``n`` verifiable arithmetic and word problems, the same for the same arguments.

    ``difficulty`` 1: single-digit additions; 2: single-digit additions and subtractions,
    half as one-sentence word problems; 3: operands up to 19; 4: two-digit operands;
    5: two-digit operands with products and two-step word problems.
    """
    if difficulty not in BUILTIN_DIFFICULTIES:
        raise DatasetError(f"difficulty must be one of {sorted(BUILTIN_DIFFICULTIES)}, got {difficulty}")
    lo, hi, ops, makers = BUILTIN_DIFFICULTIES[difficulty]
    rng = random.Random(f"ead-bench-builtin|{difficulty}|{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < n:
        # Redraw repeated questions, a bounded number of times: level 1 has only 81.
        for _ in range(100):
            maker = rng.choices([m for m, _ in makers], weights=[w for _, w in makers])[0]
            question, value = maker(rng, lo, hi, ops)
            if question not in seen:
                break
        seen.add(question)
        problems.append(Problem(id=f"builtin-d{difficulty}-{len(problems)}", question=question, answer=str(value)))
    return problems


# ---------------------------------------------------------------------------------------
# JSONL files

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def _gold(raw: object) -> str:
    """The gold answer as a string; GSM8K's ``... #### 1,234`` becomes ``1234``."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return str(raw)
    if not isinstance(raw, str):
        raise DatasetError(f"answer must be a string or a number, got {type(raw).__name__}")
    match = _GSM8K_FINAL.search(raw)
    if match:
        return match.group(1).replace(",", "").strip()
    return raw.strip()


def load_jsonl(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    limit: int | None = None,
) -> list[Problem]:
    """The first ``limit`` problems of a JSONL file (all when ``None``).

    Ids come from an ``id``, ``unique_id`` or ``problem_id`` field when the file has one,
    else from the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    problems: list[Problem] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not JSON ({exc})") from None
            for field in (question_field, answer_field):
                if field not in row:
                    raise DatasetError(
                        f"{path}:{lineno}: no field {field!r} (fields: {', '.join(sorted(row))}); "
                        "choose them with --question-field / --answer-field"
                    )
            answer = _gold(row[answer_field])
            if not answer:
                raise DatasetError(f"{path}:{lineno}: empty answer in {answer_field!r}")
            pid = next((str(row[k]) for k in ("id", "unique_id", "problem_id") if k in row), f"{path.stem}-{lineno}")
            problems.append(Problem(id=pid, question=str(row[question_field]), answer=answer))
    if len({p.id for p in problems}) != len(problems):
        raise DatasetError(f"{path}: problem ids are not unique")
    return problems
