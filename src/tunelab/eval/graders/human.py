"""Judge/human agreement: grader scores against human scores of the same outputs.

Reads eval.human_labels, a JSONL file of {"id": example id, "score": number, "arm": optional, default
"tuned"} (the id as in eval/predictions.jsonl; the arm whose output the human scored). For each
grader returns how many outputs both scored, the mean absolute difference, and pass/fail agreement
and Cohen's kappa, pass meaning score >= the grader's pass_threshold (default: the middle of its
range, 0.5 for [0, 1]) for both raters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.eval.graders.grade import read_rows
from tunelab.eval.metrics import cohen_kappa

DEFAULT_ARM = "tuned"


def read_human_labels(path: str | Path) -> dict[tuple[str, str], float]:
    """(example id, arm) -> human score; bad lines are one-line errors naming file:line."""
    path = Path(path)
    labels: dict[tuple[str, str], float] = {}
    for where, row in read_rows(path, ConfigError, "eval.human_labels file"):
        score = row.get("score") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str | int) or isinstance(score, bool) \
                or not isinstance(score, int | float) or not math.isfinite(score):
            raise ConfigError(f'{where}: expected {{"id": ..., "score": number, "arm": optional}}')
        labels[(str(row["id"]), str(row.get("arm", DEFAULT_ARM)))] = float(score)
    return labels


def pass_threshold(grader: Any) -> float:
    if getattr(grader, "pass_threshold", None) is not None:
        return float(grader.pass_threshold)
    low, high = getattr(grader, "range", None) or (0.0, 1.0)
    return (low + high) / 2


def agreement(
    graders: Sequence[Any], scores: Mapping[str, Mapping[str, Sequence[float | None]]], ids: Sequence[str],
    human: Mapping[tuple[str, str], float],
) -> dict[str, Any]:
    """scores: arm -> grader name -> one score per example (in `ids` order)."""
    out: dict[str, Any] = {}
    for grader in graders:
        threshold = pass_threshold(grader)
        pairs = [(column[i], human[(example_id, arm)])
                 for arm, by_grader in scores.items() if (column := by_grader.get(grader.name)) is not None
                 for i, example_id in enumerate(ids)
                 if (example_id, arm) in human and column[i] is not None]
        if not pairs:
            out[grader.name] = {"n": 0, "text": "no human label matches an output this grader scored"}
            continue
        judged = [a >= threshold for a, _ in pairs]
        humans = [h >= threshold for _, h in pairs]
        kappa = cohen_kappa(judged, humans)
        agree = sum(1 for a, h in zip(judged, humans, strict=True) if a == h) / len(pairs)
        out[grader.name] = {
            "n": len(pairs), "pass_threshold": threshold,
            "mean_abs_diff": sum(abs(a - h) for a, h in pairs) / len(pairs),
            "pass_agreement": agree, "kappa": kappa,
            "text": (f"{grader.name} vs human on {len(pairs)} outputs: pass/fail agreement {agree:.0%}, "
                     f"Cohen's kappa {'n/a (one class only)' if kappa is None else f'{kappa:.2f}'}"),
        }
    return out
