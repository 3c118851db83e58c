"""Did the tuned model learn its training examples rather than the task? eval/metrics.json "overfitting".

Reads train/log.jsonl (the validation evaluations and overfitting events written during training).
eval/run.py hands it the test references, the train answers, every arm's outputs and the tuned arm's
primary scores on a sample of its own training examples. Writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.eval.metrics import bootstrap_ci


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def loss_curve(train_log: Path) -> dict[str, Any]:
    """Validation and train loss at each evaluation, the best and final points, and whether validation
    loss rose off its minimum while train loss kept falling."""
    rows = _read_jsonl(train_log)
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("val_loss") is not None]
    curve = [{"step": r["step"], "train_loss": r.get("train_loss"), "val_loss": r["val_loss"]} for r in evals]
    events = [r for r in rows if r.get("kind") == "event" and r.get("event") == "overfitting"]
    out: dict[str, Any] = {"loss_curve": curve, "overfitting_events": events}
    if not curve:
        out["note"] = f"no validation evaluations in {train_log}"
        return out
    best = min(curve, key=lambda r: r["val_loss"])
    last = curve[-1]
    out["best_step"] = best["step"]
    out["best_val_loss"] = best["val_loss"]
    out["final_val_loss"] = last["val_loss"]
    out["final_train_loss"] = last["train_loss"]
    out["final_gap"] = None if last["train_loss"] is None else last["val_loss"] - last["train_loss"]
    # The classic signature: validation loss climbed off its minimum while train loss kept falling.
    out["val_rising_while_train_falls"] = bool(
        last["step"] != best["step"] and last["val_loss"] > best["val_loss"]
        and last["train_loss"] is not None and best["train_loss"] is not None
        and last["train_loss"] < best["train_loss"]
    )
    return out


def verbatim(outputs: Sequence[str], references: Sequence[str], train_answers: set[str]) -> dict[str, float]:
    """How often outputs copy a training answer word for word; copies that are also wrong are the
    memorisation signal (for label tasks every right answer is a 'copy')."""
    n = max(len(outputs), 1)
    copies = [o.strip() in train_answers for o in outputs]
    wrong = [c and o.strip() != r.strip() for c, o, r in zip(copies, outputs, references, strict=True)]
    return {"output_is_train_answer": sum(copies) / n, "wrong_and_train_answer": sum(wrong) / n}


def task_metric(metric: str, train_sample_scores: Sequence[float | None], test: float | None,
                test_ci95: Sequence[float] | None, seed: int) -> dict[str, Any] | None:
    """The tuned arm's primary metric on a sample of its training examples against the test set; None
    when either side has no score (every example of the sample failed, or the test score is missing)."""
    scored = [s for s in train_sample_scores if s is not None]
    if not scored or test is None:
        return None
    train = float(np.mean(scored))
    return {
        "arm": "tuned", "metric": metric, "train_sample_n": len(train_sample_scores),
        "train_sample": train,
        "train_sample_ci95": list(bootstrap_ci(scored, seed=seed)),
        "test": test, "test_ci95": test_ci95,
        "train_minus_test": train - test,
    }


def measure_overfitting(train_log: Path, references: Sequence[str], train_references: Sequence[str],
                        outputs: dict[str, list[str]], task: dict[str, Any] | None) -> dict[str, Any]:
    """Loss curves, test references that are train answers, verbatim copies per arm, and `task` (the
    task_metric comparison) when there is one."""
    overfitting = loss_curve(train_log)
    train_answers = {r.strip() for r in train_references}
    overfitting["reference_is_train_answer"] = sum(r.strip() in train_answers for r in references) / len(references)
    overfitting["verbatim"] = {arm: verbatim(texts, references, train_answers) for arm, texts in outputs.items()}
    if task is not None:
        overfitting["task_metric"] = task
    return overfitting
