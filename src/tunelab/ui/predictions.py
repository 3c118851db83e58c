"""The predictions browser of a finished run: eval/predictions.jsonl filtered by arm, slice, right/wrong
and whether the arms disagree on the example.

Reads eval/predictions.jsonl, data/test.jsonl (each example's input and source line) and the test file's
`<stem>.slices.jsonl` (through tunelab.report.html, as the report does). Writes nothing.
A prediction is "right" when its score is 1 (full credit) and "wrong" otherwise; the arms "disagree"
on an example when their scores for it are not all equal.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tunelab.config import ARMS
from tunelab.report.html import example_slices, fmt, read_jsonl, test_inputs
from tunelab.runs import RunPaths

PAGE_SIZE = 100
OUTCOMES = ("right", "wrong")


@dataclass
class PredictionFilter:
    arm: str = ""
    slice: str = ""
    outcome: str = ""  # "" | right | wrong
    disagree: bool = False
    offset: int = 0


@dataclass
class PredictionPage:
    rows: list[dict[str, Any]]
    total: int  # rows matching the filter
    n_predictions: int
    arms: list[str]
    slices: list[str]
    disagreeing_examples: int
    n_examples: int
    note: str | None = None  # why there are no predictions to show
    bad_lines: list[int] = field(default_factory=list)


def browse_predictions(paths: RunPaths, wanted: PredictionFilter) -> PredictionPage:
    predictions = read_jsonl(paths.predictions)
    if not predictions.ok:
        return PredictionPage([], 0, 0, [], [], 0, 0, note=predictions.note(paths.root))
    inputs = test_inputs(read_jsonl(paths.data_split("test")))
    slice_of, _files = example_slices(inputs)
    scores: dict[str, set[float]] = defaultdict(set)
    for row in predictions.value:
        if isinstance(row.get("score"), int | float):
            scores[str(row.get("id"))].add(float(row["score"]))
    disagreeing = {example_id for example_id, values in scores.items() if len(values) > 1}
    present = {r.get("arm") for r in predictions.value if isinstance(r.get("arm"), str)}
    arms = [a for a in ARMS if a in present] + sorted(a for a in present if a not in ARMS)
    rows = []
    for row in predictions.value:
        example_id = str(row.get("id"))
        score = row.get("score")
        right = isinstance(score, int | float) and score >= 1.0
        if wanted.arm and row.get("arm") != wanted.arm:
            continue
        if wanted.slice and slice_of.get(example_id) != wanted.slice:
            continue
        if wanted.outcome and (wanted.outcome == "right") != right:
            continue
        if wanted.disagree and example_id not in disagreeing:
            continue
        rows.append({"id": example_id, "arm": row.get("arm"), "slice": slice_of.get(example_id),
                     "input": inputs.get(example_id, {}).get("input"), "output": row.get("output"),
                     "reference": row.get("reference"), "score": fmt(score), "right": right,
                     "disagree": example_id in disagreeing})
    shown = rows[wanted.offset : wanted.offset + PAGE_SIZE]
    return PredictionPage(shown, len(rows), len(predictions.value), arms, sorted(set(slice_of.values())),
                          len(disagreeing), len(scores), bad_lines=predictions.bad_lines)
