"""Spec-Bench questions: loading, named subsets and the work items a run is made of.

Spec-Bench (Xia et al. 2024, hemingkx/Spec-Bench) has 480 questions in 13 categories: the 80
MT-bench questions (8 categories of 10, two turns each) and 80 each of translation,
summarization, qa, math_reasoning and rag (one turn). Its leaderboard groups them in six
*tasks*: MT-bench (the 8 categories together) and the five others.

A work item is one (question, turn). Turn 2 of an MT-bench question is asked after the model's
own turn-1 answer in the chat history, so it can only run once turn 1 has run with the same
method.

Subsets (selection is deterministic, in file order):
  * "all"          every question, both turns of MT-bench;
  * "reference16"  the 16 prompts of the reference figures in docs: the first 2 questions of
                   each of writing, coding, math, translation, summarization, qa,
                   math_reasoning and rag, first turn only;
  * "mt_bench"     the 80 MT-bench questions, both turns;
  * "first_turn"   every question, first turn only.
then optionally `per_category=N` (the first N of each category), `categories=[...]`,
`question_ids=[...]` and `first_turn_only=True`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_QUESTIONS = REPO_ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
OTHER_TASKS = ("translation", "summarization", "qa", "math_reasoning", "rag")
CATEGORIES = MT_BENCH_CATEGORIES + OTHER_TASKS
# The leaderboard's six task columns, in Spec-Bench's order, with their display names.
TASKS = ("mt_bench",) + OTHER_TASKS
TASK_NAMES = {
    "mt_bench": "MT-bench", "translation": "Translation", "summarization": "Summarization",
    "qa": "QA", "math_reasoning": "Math reasoning", "rag": "RAG",
}
REFERENCE16_CATEGORIES = ("writing", "coding", "math", "translation", "summarization", "qa", "math_reasoning", "rag")
SUBSETS = ("all", "reference16", "mt_bench", "first_turn")


class QuestionsError(ValueError):
    """The question file is missing or malformed, or a selection is empty or invalid."""


def task_of(category: str) -> str:
    """The leaderboard task a category belongs to ("mt_bench" for the 8 MT-bench categories)."""
    return "mt_bench" if category in MT_BENCH_CATEGORIES else category


@dataclasses.dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]

    @property
    def task(self) -> str:
        return task_of(self.category)


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One (question, turn) to run; `turn` is 1-based."""

    question: Question
    turn: int

    @property
    def question_id(self) -> int:
        return self.question.question_id

    @property
    def category(self) -> str:
        return self.question.category


def load_questions(path: str | Path | None = None) -> list[Question]:
    """Read Spec-Bench's question.jsonl (default: ../shared/data/spec_bench/ from the repo root)."""
    path = Path(path) if path is not None else DEFAULT_QUESTIONS
    if not path.is_file():
        raise QuestionsError(
            f"Spec-Bench questions not found at {path}. Get `data/spec_bench/question.jsonl` from the "
            "public repository hemingkx/Spec-Bench (Apache-2.0) and put it there (the project expects "
            "`../shared/data/spec_bench/question.jsonl` next to the repository), or pass --questions PATH."
        )
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                q = Question(int(row["question_id"]), str(row["category"]), tuple(str(t) for t in row["turns"]))
            except (ValueError, KeyError, TypeError) as err:
                raise QuestionsError(f"{path}:{lineno}: not a Spec-Bench question row ({err}).") from err
            if not q.turns:
                raise QuestionsError(f"{path}:{lineno}: question {q.question_id} has no turns.")
            if q.question_id in seen:
                raise QuestionsError(f"{path}:{lineno}: question_id {q.question_id} appears twice.")
            seen.add(q.question_id)
            out.append(q)
    if not out:
        raise QuestionsError(f"{path} holds no questions.")
    return out


def file_sha256(path: str | Path | None = None) -> str:
    """sha256 of the question file (recorded with the results)."""
    path = Path(path) if path is not None else DEFAULT_QUESTIONS
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _first_n_per_category(questions: Iterable[Question], n: int) -> list[Question]:
    counts: dict[str, int] = {}
    out = []
    for q in questions:
        if counts.get(q.category, 0) < n:
            counts[q.category] = counts.get(q.category, 0) + 1
            out.append(q)
    return out


def select(
    questions: Sequence[Question],
    subset: str = "all",
    *,
    per_category: int | None = None,
    categories: Sequence[str] | None = None,
    question_ids: Sequence[int] | None = None,
    first_turn_only: bool = False,
) -> list[WorkItem]:
    """The work items of a selection: all turn-1 items first (file order), then turn-2 items."""
    if subset not in SUBSETS:
        raise QuestionsError(f"unknown subset {subset!r}; choose one of {', '.join(SUBSETS)}.")
    qs = list(questions)
    if subset == "reference16":
        qs = _first_n_per_category([q for q in qs if q.category in REFERENCE16_CATEGORIES], 2)
        first_turn_only = True
    elif subset == "mt_bench":
        qs = [q for q in qs if q.category in MT_BENCH_CATEGORIES]
    elif subset == "first_turn":
        first_turn_only = True
    if categories:
        present = {q.category for q in questions}
        unknown = sorted(set(categories) - present)
        if unknown:
            raise QuestionsError(f"unknown categories {unknown}; the file has {sorted(present)}.")
        qs = [q for q in qs if q.category in set(categories)]
    if question_ids:
        wanted = set(int(i) for i in question_ids)
        missing = sorted(wanted - {q.question_id for q in questions})
        if missing:
            raise QuestionsError(f"question ids {missing} are not in the question file.")
        qs = [q for q in qs if q.question_id in wanted]
    if per_category is not None:
        if per_category < 1:
            raise QuestionsError(f"per_category must be >= 1, got {per_category}.")
        qs = _first_n_per_category(qs, per_category)
    if not qs:
        raise QuestionsError("the selection is empty: check --subset, --categories, --question-ids.")
    max_turn = 1 if first_turn_only else max(len(q.turns) for q in qs)
    return [WorkItem(q, t) for t in range(1, max_turn + 1) for q in qs if t <= len(q.turns)]


def describe_selection(items: Sequence[WorkItem]) -> dict:
    """Counts for reports: questions, items, turns and categories."""
    cats: dict[str, int] = {}
    for it in items:
        if it.turn == 1:
            cats[it.category] = cats.get(it.category, 0) + 1
    return {
        "questions": len({it.question_id for it in items}),
        "items": len(items),
        "turn2_items": sum(it.turn == 2 for it in items),
        "per_category": cats,
    }
