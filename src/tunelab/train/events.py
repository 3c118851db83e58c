"""The decisions after an evaluation, returned as events: is this the best step so far, is the model
overfitting, should training stop early?

Pure logic over the loop's TrainState (train/checkpoint.py), without a model: train/loop.py calls
`judge_evaluation` with the two losses it measured and writes what comes back to train/log.jsonl
(lines of kind "event", docs/run-directory.md). Reads and writes no file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.train.checkpoint import TrainState


@dataclass(frozen=True)
class Event:
    """One line of kind "event" in train/log.jsonl; its message is also said on stderr."""

    step: int
    name: str  # resume | checkpoint | nonfinite_skipped | overfitting | early_stop | budget_reached
    message: str

    def record(self) -> dict[str, Any]:
        return {"kind": "event", "step": self.step, "event": self.name, "message": self.message}


@dataclass
class Verdict:
    """What one evaluation decided."""

    is_best: bool  # the lowest validation loss so far: checkpoint it, it becomes the run's output
    stop: bool  # early stopping: no better validation loss in `patience` evaluations
    events: list[Event] = field(default_factory=list)  # overfitting, early_stop


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def judge_evaluation(
    state: TrainState, val_loss: float, train_loss: float, patience: int | None, last_step: bool
) -> Verdict:
    """After the evaluation at state.step, with the validation loss and the train-sample loss:
    - a finite validation loss below the best so far is the new best (best_val_loss, best_step);
    - validation loss rising while train loss falls, against the previous evaluation, is overfitting
      (an event; training goes on);
    - `patience` evaluations in a row without a new best stop training early (None: never), except
      at the last step, where training ends anyway.
    A NaN loss (an empty set) is never the best and never counts as rising or falling. Updates the
    evaluation fields of `state` (best_*, last_*, evals_without_improvement, stopped_early)."""
    step = state.step
    is_best = math.isfinite(val_loss) and (state.best_val_loss is None or val_loss < state.best_val_loss)
    events = []
    if (state.last_val_loss is not None and state.last_train_loss is not None
            and val_loss > state.last_val_loss and train_loss < state.last_train_loss):
        events.append(Event(step, "overfitting", (
            f"overfitting at step {step}: validation loss rose {state.last_val_loss:.4f} -> {val_loss:.4f} "
            f"while train loss fell {state.last_train_loss:.4f} -> {train_loss:.4f}"
        )))
    state.last_val_loss, state.last_train_loss = finite_or_none(val_loss), finite_or_none(train_loss)
    if is_best:
        state.best_val_loss, state.best_step = val_loss, step
        state.evals_without_improvement = 0
        return Verdict(is_best=True, stop=False, events=events)
    state.evals_without_improvement += 1
    if patience is None or state.evals_without_improvement < patience or last_step:
        return Verdict(is_best=False, stop=False, events=events)
    state.stopped_early = True
    if state.best_step is None:
        keeping = "no validation loss was finite; keeping the last weights"
    else:
        keeping = f"keeping the best, step {state.best_step} (val loss {state.best_val_loss:.4f})"
    events.append(Event(step, "early_stop", (
        f"early stop at step {step}: no better validation loss in {patience} evaluation(s); {keeping}"
    )))
    return Verdict(is_best=False, stop=True, events=events)
