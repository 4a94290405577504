"""`tunesmith chain eval NAME --data FILE`: how often a YAML chain answers right on a JSONL file of cases.

Each line is `{"input": ..., "expected": ...}`; rag cases also name the `source` file the answer must cite.
What counts as right, per kind:

- classify: the label equals `expected`;
- extract: field-level exact match: each field of the `expected` object is one point (a failed extraction scores
  none of its fields);
- rag: the answer contains the `expected` phrase (case-insensitive) and names the `source` file.

The shipped sets are in examples/chains/ (README, Chains, has the results for the embedded and a tuned model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.runnables import Runnable

from tunesmith.finetune import DataError, read_records

from .config import ChainConfig, main_input_key
from .errors import ChainConfigError, OutputParseError

EVAL_KINDS = ("classify", "extract", "rag")
"""The kinds whose answers can be checked exactly; summaries and free prompts have no single right answer."""


@dataclass
class EvalResult:
    kind: str
    cases: int
    points: int
    """Right answers (classify, rag) or right fields (extract)."""
    out_of: int
    misses: list[dict[str, Any]] = field(default_factory=list)
    """The wrong cases: input, expected, got."""

    @property
    def accuracy(self) -> float:
        return self.points / self.out_of if self.out_of else 0.0

    def summary(self) -> str:
        what = {"classify": "label accuracy", "extract": "field exact match",
                "rag": "answer has the phrase and cites the source"}[self.kind]
        return f"{what}: {self.points}/{self.out_of} = {self.accuracy:.1%} ({self.cases} cases)"


def load_cases(path: str | Path, kind: str) -> list[dict[str, Any]]:
    """The cases of a JSONL file; a line without `input`/`expected` (or a rag line without `source`) is named."""
    if kind not in EVAL_KINDS:
        raise ChainConfigError(f"`chain eval` checks {', '.join(EVAL_KINDS)} chains; a {kind} chain's answers are free "
                               "text with no single right answer.")
    p = Path(path)
    if not p.is_file():
        raise ChainConfigError(f"eval data not found: {p}. Give a JSONL file of {{\"input\": ..., \"expected\": ...}} "
                               "lines (examples/chains/*_eval.jsonl).")
    needed = ["input", "expected", *(["source"] if kind == "rag" else [])]
    cases = []
    try:
        records = list(read_records(p))
    except DataError as e:
        raise ChainConfigError(str(e)) from None
    for rec in records:
        case = rec.data
        missing = [k for k in needed if k not in case]
        if missing:
            raise ChainConfigError(f"{rec.where}: missing {', '.join(missing)}. A {kind} case has the keys "
                                   f"{', '.join(needed)}.")
        if kind == "extract" and not isinstance(case["expected"], dict):
            raise ChainConfigError(f"{rec.where}: `expected` must be an object of field values for an extract chain.")
        cases.append(case)
    if not cases:
        raise ChainConfigError(f"{p} has no cases.")
    return cases


def evaluate_chain(chain: Runnable[Any, Any], cfg: ChainConfig, cases: list[dict[str, Any]],
                   progress: bool = False) -> EvalResult:
    """Run `chain` on every case, one at a time, and count what it got right."""
    from tqdm import tqdm

    result = EvalResult(cfg.kind, len(cases), 0, 0)
    key = main_input_key(cfg)
    for case in tqdm(cases, desc=f"chain eval ({cfg.kind})", disable=not progress, leave=False):
        error = ""
        try:
            got = chain.invoke({key: case["input"]})
        except OutputParseError as e:  # an extraction that never validated: every field is wrong
            got = None
            error = str(e)
        points, out_of = score_case(cfg.kind, got, case)
        result.points += points
        result.out_of += out_of
        if points < out_of:
            shown = f"error: {error[:160]}" if error else _shown(got)
            result.misses.append({"input": case["input"], "expected": case["expected"], "got": shown})
    return result


def score_case(kind: str, got: Any, case: dict[str, Any]) -> tuple[int, int]:
    """(points, out of) for one case: pure, so the metric itself is tested without a model."""
    expected = case["expected"]
    if kind == "classify":
        return int(got == expected), 1
    if kind == "extract":
        values = got.model_dump() if hasattr(got, "model_dump") else (got or {})
        return sum(values.get(k) == v for k, v in expected.items()), len(expected)
    answer = (got or {}).get("answer", "")
    return int(str(expected).lower() in answer.lower() and str(case["source"]) in answer), 1


def _shown(got: Any) -> Any:
    if hasattr(got, "model_dump"):
        return got.model_dump()
    if isinstance(got, dict) and "answer" in got:
        return got["answer"]
    return got
