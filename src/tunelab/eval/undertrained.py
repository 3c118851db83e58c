"""Is the tuned model still learning? A verdict on an undertrained model is marked provisional.

Reads train/log.jsonl (validation losses), train/plan.json and train/summary.json of a run, and the
tuned arm's score on a sample of its own training examples (computed by eval/run.py); returns the
`provisional` / `provisional_reason` pair that eval/run.py puts into the verdict of eval/metrics.json,
with the signals behind it. Writes nothing.

Two signals, either one is enough (docs/evaluation.md):
- validation loss still falling clearly: more than STILL_FALLING (relative) and STILL_FALLING_NATS
  (absolute) between the last evaluation at or before 80% of the run and the final one;
- a low score on the training examples themselves (below LOW_TRAIN_SCORE and not clearly above the
  held-out score): the model has not even learned what it was shown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.runs import RunPaths

STILL_FALLING = 0.03  # relative drop of validation loss over the last fifth of the run ...
STILL_FALLING_NATS = 0.03  # ... and absolute: 0.04 -> 0.02 nats a token is a model that has learned
LOW_TRAIN_SCORE = 0.5
TRAIN_TEST_GAP = 0.10  # a model that scores its train examples this much above held-out ones learned them


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def validation_trend(log_path: Path) -> dict[str, Any] | None:
    """Relative change of validation loss over the last fifth of the run (negative: falling)."""
    if not log_path.is_file():
        return None
    evals = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("kind") == "eval" and row.get("val_loss") is not None:
            evals.append((int(row["step"]), float(row["val_loss"])))
    if len(evals) < 2:
        return None
    last_step, last_loss = evals[-1]
    earlier = [e for e in evals[:-1] if e[0] <= 0.8 * last_step] or evals[:1]
    from_step, from_loss = earlier[-1]
    change = (last_loss - from_loss) / from_loss if from_loss > 0 else 0.0
    return {"from_step": from_step, "from_val_loss": from_loss, "to_step": last_step, "to_val_loss": last_loss,
            "relative_change": change}


def assess_training(paths: RunPaths, train_sample_score: float | None, test_score: float | None,
                    metric: str) -> dict[str, Any]:
    """{"provisional": bool, "reason": str | None, "suggestion": str | None, "signals": {...}}."""
    plan = _read_json(paths.plan) or {}
    summary = _read_json(paths.train_summary) or {}
    trend = validation_trend(paths.train_log)
    reasons: list[str] = []
    if (trend is not None and trend["relative_change"] < -STILL_FALLING
            and trend["from_val_loss"] - trend["to_val_loss"] > STILL_FALLING_NATS):
        reasons.append(f"validation loss {trend['relative_change']:+.0%} over the last fifth of the run "
                       f"(step {trend['from_step']} -> {trend['to_step']})")
    if (train_sample_score is not None and train_sample_score < LOW_TRAIN_SCORE
            and (test_score is None or train_sample_score - test_score < TRAIN_TEST_GAP)):
        reasons.append(f"{metric} on its own training examples only {train_sample_score:.0%}")
    if summary.get("budget_reached"):
        reasons.append(f"the budget stopped training at step {summary.get('steps')} of {summary.get('planned_steps')}")
    signals = {"validation_trend": trend, "train_sample": train_sample_score, "test": test_score,
               "limited_by": plan.get("limited_by"), "budget_reached": bool(summary.get("budget_reached"))}
    if not reasons:
        return {"provisional": False, "reason": None, "suggestion": None, "signals": signals}
    suggestion = _suggestion(plan)
    reason = "the tuned model is still learning: " + "; ".join(reasons) + (f"; {suggestion}" if suggestion else "")
    return {"provisional": True, "reason": reason, "suggestion": suggestion, "signals": signals}


def _suggestion(plan: dict[str, Any]) -> str | None:
    """What to run to train more: double whatever limited this run."""
    if not plan:
        return None
    if plan.get("limited_by") == "budget" and plan.get("budget_s"):
        minutes = max(1, round(2 * plan["budget_s"] / 60))
        return f"run again with train.budget={minutes}m"
    if plan.get("limited_by") == "max_steps" and plan.get("max_steps"):
        return f"run again with train.max_steps={2 * plan['max_steps']}"
    epochs = plan.get("epochs")
    return f"run again with train.epochs={2 * epochs:g}" if epochs else None
