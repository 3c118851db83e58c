"""eval.keep: the user's own "must keep" examples, base model against fine-tuned model.

Reads the JSONL file `eval.keep` names: chat examples with references, the test set's format
({"messages": [...]}, the last assistant turn is the reference), for other tasks the same model serves.
eval/run.py has the base model answer them in the base phase and the tuned model (as deployed) in the
tuned phase, with the arms' generation engine and decoding settings and the examples' own messages;
`compare_keep` scores both with the built-in metric the keep set's own references call for and compares
them example by example. Writes nothing: eval/run.py stores the result as eval/metrics.json
forgetting.keep.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import DataError
from tunelab.eval.arms import EvalExample, to_eval_example
from tunelab.eval.metrics import (
    PairedComparison,
    delta_points,
    detect_output_kind,
    paired_comparison,
    score_outputs,
)

ROLES = ("system", "user", "assistant")
MAX_PROBLEMS_SHOWN = 20  # a file of nothing but bad rows: the first ones say what is wrong


def read_keep(path: str | Path) -> list[EvalExample]:
    """The keep examples; every bad row is an error naming file:line and the field (all of them, then one
    raise), never a traceback."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: eval.keep: file not found (a JSONL file of chat examples with references)")
    problems: list[str] = []
    examples: list[EvalExample] = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit inside a JSON string
    except UnicodeDecodeError:
        raise DataError(f"{path}: eval.keep: not a UTF-8 text file") from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except ValueError as err:
            problems.append(f"{where}: not valid JSON ({err.msg})")
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            problems.append(f'{where}: messages: expected {{"messages": [{{role, content}}, ...]}}')
            continue
        bad = next((i for i, m in enumerate(messages) if not isinstance(m, dict) or m.get("role") not in ROLES
                    or not isinstance(m.get("content"), str)), None)
        if bad is not None:
            problems.append(f"{where}: messages[{bad}]: expected {{role: {'|'.join(ROLES)}, content: text}}")
            continue
        try:
            examples.append(to_eval_example({**row, "source": where}, f"keep:{line_number}"))
        except DataError as err:
            problems.append(str(err))
    if not problems and not examples:
        problems.append(f"{path}: eval.keep: no examples")
    if problems:
        more = len(problems) - MAX_PROBLEMS_SHOWN
        raise DataError("\n".join([*problems[:MAX_PROBLEMS_SHOWN], *([f"... and {more} more"] if more > 0 else [])]))
    return examples


def keep_conversations(examples: Sequence[EvalExample]) -> list[list[dict[str, str]]]:
    """What base and tuned model are asked: each example's own messages (the base and tuned arms' prompt)."""
    return [[dict(m) for m in ex.context] for ex in examples]


def measure_drop(base: Sequence[float], tuned: Sequence[float], threshold: float,
                 seed: int = 0) -> tuple[PairedComparison, float, bool]:
    """The paired difference tuned - base, the relative drop of the mean, and whether it is flagged: worse by
    more than `threshold` relative to the base score AND the paired interval lies below zero (the rule the
    general probes use)."""
    comparison = paired_comparison(tuned, base, seed=seed)
    base_mean = float(np.mean(base)) if len(base) else 0.0
    tuned_mean = float(np.mean(tuned)) if len(tuned) else 0.0
    relative_drop = (base_mean - tuned_mean) / base_mean if base_mean > 0 else 0.0
    return comparison, relative_drop, relative_drop > threshold and comparison.ci95[1] < 0


def compare_keep(examples: Sequence[EvalExample], base_outputs: Sequence[str], tuned_outputs: Sequence[str],
                 threshold: float, seed: int = 0, file: str | None = None) -> dict[str, Any]:
    """forgetting.keep: both models scored with the built-in metric the keep references call for, compared
    pairwise, flagged by `measure_drop`."""
    references = [ex.reference for ex in examples]
    kind = detect_output_kind(references)
    metric = kind.primary
    base = score_outputs(base_outputs, references, kind).per_example[metric]
    tuned = score_outputs(tuned_outputs, references, kind).per_example[metric]
    comparison, relative_drop, flagged = measure_drop(base, tuned, threshold, seed)
    base_mean = float(np.mean(base)) if base else 0.0
    tuned_mean = float(np.mean(tuned)) if tuned else 0.0
    ci = [delta_points(comparison.ci95[0]), delta_points(comparison.ci95[1])]
    change = (f"{metric} {base_mean * 100:.1f} -> {tuned_mean * 100:.1f} ({delta_points(comparison.delta):+.1f} "
              f"points, 95% CI {ci[0]:+.1f} .. {ci[1]:+.1f}, p = {comparison.p_value:.3f})")
    where = f"the {len(examples)} must-keep examples (eval.keep)"
    if flagged:
        text = f"flagged: the tuned model does worse on {where}: {change} (threshold {threshold:.0%})"
    else:
        text = f"no loss beyond {threshold:.0%} detected on {where}: {change}"
    return {
        "n": len(examples), "primary_metric": metric, "primary_reason": kind.reason, "file": file,
        "base": base_mean, "tuned": tuned_mean, "delta_points": delta_points(comparison.delta),
        "ci95_points": ci, "p_value": comparison.p_value, "relative_drop": relative_drop,
        "threshold": threshold, "flagged": flagged, "text": text,
        "examples": [{"id": ex.id, "reference": ex.reference, "base_output": bo, "base_score": bs,
                      "tuned_output": to, "tuned_score": ts}
                     for ex, bo, bs, to, ts in zip(examples, base_outputs, base, tuned_outputs, tuned, strict=True)],
    }
