"""Score outputs with graders: one score (or one failure) per (grader, example).

Reads grader configs (specs/graders.py), output texts and their items; writes judge replies to the cache
file it is given (eval/judge_cache.jsonl in a run). A failure (template, exception, timeout,
judge call, unreadable reply) is recorded for that example with its message and counted, never
turned into a score: `GraderColumn.scores[i]` is None and `errors[i]` says why.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.eval.graders import judge
from tunelab.eval.graders.python_grader import PythonGraderFailed, PythonGraderProcess
from tunelab.eval.graders.samples import make_sample
from tunelab.eval.graders.text import string_check, text_similarity
from tunelab.specs.formula import FormulaError, evaluate_formula
from tunelab.specs.graders import (
    LabelModelGrader,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
)
from tunelab.specs.templates import TemplateProblem, render

_FAILURES = (TemplateProblem, PythonGraderFailed, judge.JudgeFailed, FormulaError)


@dataclass
class GraderColumn:
    name: str
    scores: list[float | None]
    errors: list[str | None]

    @property
    def failed(self) -> int:
        return sum(1 for e in self.errors if e is not None)

    def first_errors(self, ids: Sequence[str], limit: int = 5) -> list[dict[str, str]]:
        return [{"id": i, "error": e} for i, e in zip(ids, self.errors, strict=True) if e is not None][:limit]


class Grading:
    """Graders with their running state: one Python process per python grader and one judge cache.
    Use as a context manager so child processes end."""

    def __init__(self, graders: Sequence[Any], cache_path: Path | None = None) -> None:
        self.graders = list(graders)
        self.cache = judge.JudgeCache(cache_path)
        self._processes: dict[int, PythonGraderProcess] = {}

    def __enter__(self) -> Grading:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        for process in self._processes.values():
            process.close()
        self._processes.clear()

    def grade(self, outputs: Sequence[str], items: Sequence[Mapping[str, Any]]) -> dict[str, GraderColumn]:
        """Every grader over every (output, item) pair, in order."""
        samples = [make_sample(text) for text in outputs]
        return {g.name: self._column(g, samples, list(items)) for g in self.graders}

    # ------------------------------------------------------------------------------------------ columns

    def _column(self, grader: Any, samples: list[dict[str, Any]], items: list[Mapping[str, Any]]) -> GraderColumn:
        if isinstance(grader, MultiGrader):
            return self._multi(grader, samples, items)

        def one(pair: tuple[dict[str, Any], Mapping[str, Any]]) -> tuple[float | None, str | None]:
            try:
                return self._score(grader, *pair), None
            except _FAILURES as err:
                return None, str(err)

        pairs = list(zip(samples, items, strict=True))
        if isinstance(grader, ScoreModelGrader | LabelModelGrader) or (
            isinstance(grader, TextSimilarityGrader) and grader.evaluation_metric == "cosine"
        ):
            with ThreadPoolExecutor(max_workers=grader.concurrency) as pool:
                results = list(pool.map(one, pairs))
        else:
            results = [one(pair) for pair in pairs]
        return GraderColumn(grader.name, [s for s, _ in results], [e for _, e in results])

    def _multi(self, grader: MultiGrader, samples: list[dict[str, Any]], items: list[Mapping[str, Any]]) -> GraderColumn:
        parts = {key: self._column(sub, samples, items) for key, sub in grader.graders.items()}
        scores: list[float | None] = []
        errors: list[str | None] = []
        for i in range(len(samples)):
            failed = [f"{key}: {column.errors[i]}" for key, column in parts.items() if column.errors[i] is not None]
            if failed:
                scores.append(None)
                errors.append("; ".join(failed))
                continue
            try:
                scores.append(evaluate_formula(grader.calculate_output,
                                               {key: column.scores[i] for key, column in parts.items()}))
                errors.append(None)
            except FormulaError as err:
                scores.append(None)
                errors.append(str(err))
        return GraderColumn(grader.name, scores, errors)

    # ------------------------------------------------------------------------------------------ one score

    def _score(self, grader: Any, sample: dict[str, Any], item: Mapping[str, Any]) -> float:
        if isinstance(grader, StringCheckGrader):
            return string_check(grader.operation, render(grader.input, sample, item),
                                render(grader.reference, sample, item))
        if isinstance(grader, TextSimilarityGrader):
            text, reference = render(grader.input, sample, item), render(grader.reference, sample, item)
            if grader.evaluation_metric == "cosine":
                return judge.cosine(judge.embedding(grader, grader.embedding_model, text, self.cache),
                                    judge.embedding(grader, grader.embedding_model, reference, self.cache))
            return text_similarity(grader.evaluation_metric, text, reference)
        if isinstance(grader, PythonGrader):
            process = self._processes.get(id(grader))
            if process is None:
                process = self._processes[id(grader)] = PythonGraderProcess(grader.source, grader.timeout_s)
            return process.grade(sample, dict(item))
        if isinstance(grader, ScoreModelGrader):
            low, high = grader.range
            reply = self._ask(grader, sample, item, judge.score_instruction(low, high))
            return judge.read_score(reply, low, high)
        if isinstance(grader, LabelModelGrader):
            label = judge.read_label(self._ask(grader, sample, item, judge.label_instruction(grader.labels)),
                                     grader.labels)
            return float(label in grader.passing_labels)
        raise TypeError(f"grader '{grader.name}': no scorer for type {grader.type}")

    def _ask(self, grader: ScoreModelGrader | LabelModelGrader, sample: dict[str, Any], item: Mapping[str, Any],
             instruction: str) -> str:
        messages = [{"role": m.role, "content": render(m.text, sample, item)} for m in grader.input]
        messages[-1]["content"] += "\n\n" + instruction
        return judge.chat_reply(grader, grader.model, messages, judge.sampling_body(grader.sampling_params),
                                self.cache)


# ---------------------------------------------------------------------------------------------- tunelab grade


def read_rows(path: Path, error: type[Exception], what: str) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed value) of each record of a graders' input file (samples, human labels);
    a missing file or a record that does not parse raises `error` naming it."""
    from tunelab.data.formats import iter_file

    if not path.is_file():
        raise error(f"{path}: {what} not found")
    for record in iter_file(path):
        where = f"{record.path}:{record.line}"
        if record.problem is not None:
            raise error(f"{where}: {record.problem[1]}")
        yield where, record.value


def read_samples(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """`tunelab grade` input: JSONL of {"sample": {"output_text": ...}, "item": {...}}; bad lines are
    one-line errors naming file:line."""
    from tunelab.errors import DataError

    outputs: list[str] = []
    items: list[dict[str, Any]] = []
    for where, row in read_rows(path, DataError, "file"):
        sample = row.get("sample") if isinstance(row, dict) else None
        text = sample.get("output_text") if isinstance(sample, dict) else None
        if not isinstance(text, str):
            raise DataError(f'{where}: sample.output_text: expected {{"sample": {{"output_text": "..."}}, "item": {{...}}}}')
        item = row.get("item", {})
        if not isinstance(item, dict):
            raise DataError(f"{where}: item: expected an object, got {type(item).__name__}")
        outputs.append(text)
        items.append(item)
    return outputs, items
