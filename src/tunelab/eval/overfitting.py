"""Did the tuned model learn its training examples rather than the task? eval/metrics.json "overfitting".

Reads train/log.jsonl (the validation evaluations and overfitting events written during training).
eval/run.py hands it the test references, the train answers, every arm's outputs, the tuned arm's
primary scores on a sample of its own training examples and the step whose weights it evaluated
(train/summary.json output_step). Writes nothing.

The loss-curve signal (`val_rise`, docs/evaluation.md): validation loss rose off its minimum by more
than its own noise (RISE_K noise sds, the noise from the spread of the curve's second differences
(noise_of); with fewer than NOISE_EVALS evaluations, FALLBACK_RISE of the minimum) while train loss fell.
The events train/events.py writes during training compare two evaluations without a tolerance; they
stay in the log as they are, and this is the judgement the report shows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.eval.metrics import bootstrap_ci

NOISE_EVALS = 5  # evaluations needed to measure the noise (three second differences)
RISE_K = 4.0  # a rise off the minimum beyond this many noise sds (the minimum of a noisy curve sits low)
MIN_RISE = 0.01  # ... and at least 1% of the minimum, however quiet the curve
FALLBACK_RISE = 0.05  # too few evaluations to measure the noise: a rise of 5% of the minimum


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def noise_of(losses: Sequence[float]) -> float | None:
    """The sd of one value of a curve around its local trend: the spread of its second differences
    around their mean (the curve's own bend is not noise), over sqrt(6); None under NOISE_EVALS values."""
    if len(losses) < NOISE_EVALS:
        return None
    second = [losses[i + 1] - 2 * losses[i] + losses[i - 1] for i in range(1, len(losses) - 1)]
    mean = sum(second) / len(second)
    return math.sqrt(sum((e - mean) ** 2 for e in second) / (len(second) - 1) / 6)


def validation_rise(curve: Sequence[dict[str, Any]], evaluated_step: int | None = None) -> dict[str, Any]:
    """Whether validation loss rose off its minimum beyond its noise while train loss fell, from the
    `loss_curve` points; where the rise began, and whether the evaluated weights come before it."""
    losses = [float(p["val_loss"]) for p in curve]
    best = min(range(len(curve)), key=lambda i: losses[i])
    noise = noise_of(losses)
    tolerance = (max(RISE_K * noise, MIN_RISE * losses[best]) if noise is not None
                 else FALLBACK_RISE * losses[best])
    last = curve[-1]
    train_falls = (last["train_loss"] is not None and curve[best]["train_loss"] is not None
                   and last["train_loss"] < curve[best]["train_loss"])
    rising = bool(best != len(curve) - 1 and losses[-1] - losses[best] > tolerance and train_falls)
    rise_step = next((p["step"] for p in curve[best + 1:] if p["val_loss"] - losses[best] > tolerance), None)
    rise_step = rise_step if rising else None
    position = None
    if rise_step is not None and evaluated_step is not None:
        position = "before the rise" if evaluated_step < rise_step else "after the rise"
    return {"rising": rising, "best_step": curve[best]["step"], "rise": losses[-1] - losses[best],
            "tolerance": tolerance, "noise_sd": noise, "rise_step": rise_step, "evaluated_step": evaluated_step,
            "evaluated_checkpoint": position}


def loss_curve(train_log: Path, evaluated_step: int | None = None) -> dict[str, Any]:
    """Validation and train loss at each evaluation, the best and final points, and whether validation
    loss rose off its minimum beyond its noise while train loss kept falling (validation_rise)."""
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
    # The classic signature: validation loss climbed off its minimum, beyond its noise, while train
    # loss kept falling.
    out["val_rise"] = validation_rise(curve, evaluated_step)
    out["val_rising_while_train_falls"] = out["val_rise"]["rising"]
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
                        outputs: dict[str, list[str]], task: dict[str, Any] | None,
                        evaluated_step: int | None = None) -> dict[str, Any]:
    """Loss curves, test references that are train answers, verbatim copies per arm, and `task` (the
    task_metric comparison) when there is one."""
    overfitting = loss_curve(train_log, evaluated_step)
    train_answers = {r.strip() for r in train_references}
    overfitting["reference_is_train_answer"] = sum(r.strip() in train_answers for r in references) / len(references)
    overfitting["verbatim"] = {arm: verbatim(texts, references, train_answers) for arm, texts in outputs.items()}
    if task is not None:
        overfitting["task_metric"] = task
    return overfitting
