"""Is the tuned model still learning? A verdict on an undertrained model is marked provisional.

Reads train/log.jsonl (validation losses), train/plan.json and train/summary.json of a run, and the
tuned arm's score on a sample of its own training examples (computed by eval/run.py); returns the
`provisional` / `provisional_reason` pair that eval/run.py puts into the verdict of eval/metrics.json,
with the signals behind it. Writes nothing. `judge_training` is the rule, on plain numbers.

The rule (docs/training.md), with the validation loss's own noise as the yardstick:
- the trend at the end: a straight line fitted by least squares to the evaluations of the last
  TREND_WINDOW of the run (at least TREND_EVALS of them: the last ones), its fall over the last fifth
  of the run relative to its value at 80%; its noise is the line's standard error, from the spread of
  the evaluations around it (a two-point difference would throw away the evaluations between);
- still falling: that fall is more than x, x = max(STILL_FALLING, NOISE_K standard errors of the fall,
  or the Student t quantile where a fit to few evaluations needs more);
  relative, with no absolute floor, so a low-loss structured task falling 21% counts. With fewer than
  TREND_EVALS evaluations the noise cannot be measured: the change between the last evaluation at or
  before 80% of the run and the final one against STILL_FALLING alone;
- the train sample: the tuned model scoring its own training examples not clearly better than held-out
  ones (by TRAIN_TEST_GAP_POINTS points of the primary's range, or half the room the held-out score
  leaves below the top) has not learned what it was shown, or generalises perfectly; the two look the
  same, so this counts only where the curve cannot show convergence (no or too few evaluations to
  measure the noise) or the validation loss is still falling beyond its noise;
- the budget stop counts only where no validation curve can show convergence; early stopping that
  found its best is convergence, whatever the budget did.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.contract import TrainPlan, TrainSummary
from tunelab.eval.metrics import delta_points, to_points
from tunelab.runs import RunPaths

STILL_FALLING = 0.03  # the least relative drop over the last fifth that counts, however quiet the curve
NOISE_K = 3.0  # a fall this many standard errors of the fitted fall is no noise (simulated flat curves: <= 3% alarms)
T_975 = {1: 12.71, 2: 4.30, 3: 3.18}  # Student t 97.5% quantiles, where a fit to few points needs more than NOISE_K
TREND_WINDOW = 0.4  # the trend is fitted to the evaluations of the last 40% of the run ...
TREND_EVALS = 4  # ... at least this many (the last ones); fewer evaluations in all: no noise estimate
TRAIN_TEST_GAP_POINTS = 10.0  # a model that scores its train examples this much above held-out ones learned them,
HEADROOM_SHARE = 0.5  # ... as did one that closes half the room its held-out score leaves (95 vs 90)


def read_validation_losses(log_path: Path) -> list[tuple[int, float]]:
    """(step, val_loss) of every evaluation with a finite validation loss, in log order."""
    if not log_path.is_file():
        return []
    evals = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("kind") == "eval" and row.get("val_loss") is not None and math.isfinite(float(row["val_loss"])):
            evals.append((int(row["step"]), float(row["val_loss"])))
    return evals


def trend_of(evals: Sequence[tuple[int, float]]) -> dict[str, Any] | None:
    """The change of validation loss over the last fifth of the run, observed and fitted, against its
    noise (the module docstring)."""
    if len(evals) < 2:
        return None
    last_step, last_loss = evals[-1]
    earlier = [e for e in evals[:-1] if e[0] <= 0.8 * last_step] or list(evals[:1])
    from_step, from_loss = earlier[-1]
    change = (last_loss - from_loss) / from_loss if from_loss > 0 else 0.0
    trend = {"from_step": from_step, "from_val_loss": from_loss, "to_step": last_step, "to_val_loss": last_loss,
             "relative_change": change, "fitted_relative_change": None, "evaluations_fitted": 0, "noise_sd": None,
             "threshold": STILL_FALLING, "still_falling": change < -STILL_FALLING, "falling_beyond_noise": None}
    window = [e for e in evals if e[0] >= (1 - TREND_WINDOW) * last_step]
    if len(window) < TREND_EVALS:
        window = list(evals[-TREND_EVALS:])
    if len(window) < TREND_EVALS or len({step for step, _ in window}) < 2:
        return trend
    fit = _line(window)
    if fit is None:
        return trend
    slope, at_80, noise_sd, slope_se = fit
    fifth = 0.2 * last_step
    fall = -slope * fifth  # positive: falling
    if at_80 <= 0:
        return trend
    beyond_noise = max(NOISE_K, T_975.get(len(window) - 2, 0.0)) * slope_se * fifth
    threshold = max(STILL_FALLING, beyond_noise / at_80)
    trend.update(fitted_relative_change=-fall / at_80, evaluations_fitted=len(window), noise_sd=noise_sd,
                 threshold=threshold, still_falling=fall / at_80 > threshold, falling_beyond_noise=fall > beyond_noise)
    return trend


def _line(points: Sequence[tuple[int, float]]) -> tuple[float, float, float, float] | None:
    """Least-squares line through (step, loss) -> (slope, its value at 80% of the last step, the sd of the
    points around it, the slope's standard error); None when the points are too few to spread."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if n < 3 or sxx == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    residual = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in points)
    noise_sd = math.sqrt(residual / (n - 2))
    at_80 = mean_y + slope * (0.8 * points[-1][0] - mean_x)
    return slope, at_80, noise_sd, noise_sd / math.sqrt(sxx)


def validation_trend(log_path: Path) -> dict[str, Any] | None:
    """Relative change of validation loss over the last fifth of the run (negative: falling), its noise
    and whether it is still falling (trend_of)."""
    return trend_of(read_validation_losses(log_path))


def judge_training(trend: dict[str, Any] | None, summary: dict[str, Any], train_sample_score: float | None,
                   test_score: float | None, metric: str,
                   score_range: Sequence[float] | None = None) -> tuple[list[str], dict[str, Any]]:
    """The reasons a verdict is provisional (none: final) and the signals behind them; the rule is in
    the module docstring. `summary` is train/summary.json's content ({} when absent)."""
    stopped_early = bool(summary.get("stopped_early"))
    budget = bool(summary.get("budget_reached"))
    budget_text = f"the budget stopped training at step {summary.get('steps')} of {summary.get('planned_steps')}"
    reasons: list[str] = []
    still_falling = trend is not None and trend["still_falling"] and not stopped_early
    if still_falling:
        fitted = trend["fitted_relative_change"]
        why = (f"its trend over the last {TREND_WINDOW:.0%} of the run: {fitted:+.0%} a fifth, more than the "
               f"{trend['threshold']:.0%} its noise allows" if fitted is not None else
               f"more than {trend['threshold']:.0%}; too few evaluations to measure its noise")
        reasons.append(f"validation loss {trend['relative_change']:+.0%} over the last fifth of the run "
                       f"(step {trend['from_step']} -> {trend['to_step']}; {why})"
                       + (f", when {budget_text}" if budget else ""))
    # whether the curve can show that training converged
    undecided = trend is None or (trend["falling_beyond_noise"] is None and not stopped_early)
    falling = trend is not None and bool(trend["falling_beyond_noise"]) and not stopped_early
    gap = None
    if train_sample_score is not None and test_score is not None:
        gap = delta_points(train_sample_score - test_score, score_range)
        headroom = 100.0 - to_points(test_score, score_range)  # room above the held-out score
    # (less a hair: 0.95 - 0.9 is 4.999... points in floating point)
    not_learned = gap is not None and gap < min(TRAIN_TEST_GAP_POINTS, HEADROOM_SHARE * headroom) - 1e-9
    if not_learned and (undecided or falling):
        reasons.append(f"{metric} on its own training examples {train_sample_score:.3g}, not clearly above its "
                       f"held-out {test_score:.3g} ({gap:+.1f} points)")
    if budget and trend is None:
        reasons.append(budget_text)
    signals = {"validation_trend": trend, "train_sample": train_sample_score, "test": test_score,
               "train_minus_test_points": gap, "budget_reached": budget, "stopped_early": stopped_early}
    return reasons, signals


def assess_training(paths: RunPaths, train_sample_score: float | None, test_score: float | None,
                    metric: str, score_range: Sequence[float] | None = None) -> dict[str, Any]:
    """{"provisional": bool, "reason": str | None, "suggestion": str | None, "signals": {...}}."""
    plan = TrainPlan.read_keys(paths.plan)  # as found: a run evaluated without its training has neither
    summary = TrainSummary.read_keys(paths.train_summary)
    reasons, signals = judge_training(validation_trend(paths.train_log), summary, train_sample_score, test_score,
                                      metric, score_range)
    signals["limited_by"] = plan.get("limited_by")
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
