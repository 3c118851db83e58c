"""What an evaluation decides (train/events.py), without a model: the best step, patience counting
for early stopping, the overfitting event, and NaN losses that never count."""

from __future__ import annotations

import math

from tunelab.train.checkpoint import TrainState
from tunelab.train.events import Event, judge_evaluation


def _judge(state: TrainState, step: int, val: float, train: float, patience: int | None = 2, last: bool = False):
    state.step = step
    return judge_evaluation(state, val, train, patience, last)


def _names(verdict) -> list[str]:
    return [e.name for e in verdict.events]


def test_the_lowest_validation_loss_is_the_best_and_resets_the_patience_count():
    state = TrainState()
    first = _judge(state, 10, val=2.0, train=2.5)
    assert first.is_best and not first.stop and state.best_step == 10 and state.best_val_loss == 2.0
    worse = _judge(state, 20, val=2.1, train=2.4)
    assert not worse.is_best and state.evals_without_improvement == 1 and state.best_step == 10
    better = _judge(state, 30, val=1.5, train=2.3)
    assert better.is_best and state.evals_without_improvement == 0
    assert (state.best_step, state.best_val_loss) == (30, 1.5)
    equal = _judge(state, 40, val=1.5, train=2.2)  # not lower: not a new best
    assert not equal.is_best and state.best_step == 30


def test_patience_evaluations_without_a_better_loss_stop_early_keeping_the_best():
    state = TrainState()
    _judge(state, 5, val=1.0, train=1.0, patience=3)
    assert not _judge(state, 10, val=1.2, train=1.0, patience=3).stop
    assert not _judge(state, 15, val=1.1, train=1.0, patience=3).stop
    verdict = _judge(state, 20, val=1.3, train=1.0, patience=3)
    assert verdict.stop and state.stopped_early and _names(verdict) == ["early_stop"]
    event = verdict.events[0]
    assert event.step == 20 and "no better validation loss in 3 evaluation(s)" in event.message
    assert "keeping the best, step 5 (val loss 1.0000)" in event.message
    assert event.record() == {"kind": "event", "step": 20, "event": "early_stop", "message": event.message}


def test_no_early_stop_without_patience_or_at_the_last_step():
    state = TrainState()
    _judge(state, 1, val=1.0, train=1.0, patience=None)
    for step in range(2, 10):
        assert not _judge(state, step, val=2.0, train=1.0, patience=None).stop
    assert state.evals_without_improvement == 8 and not state.stopped_early
    last = TrainState()
    _judge(last, 1, val=1.0, train=1.0, patience=1)
    verdict = _judge(last, 2, val=2.0, train=1.0, patience=1, last=True)  # training ends anyway
    assert not verdict.stop and not last.stopped_early and _names(verdict) == []


def test_overfitting_is_validation_rising_while_train_falls_and_training_goes_on():
    state = TrainState()
    assert _names(_judge(state, 3, val=2.0, train=2.0)) == []  # nothing to compare with yet
    both_fall = _judge(state, 6, val=1.8, train=1.5)
    assert _names(both_fall) == []
    both_rise = _judge(state, 9, val=1.9, train=1.6, patience=None)
    assert _names(both_rise) == []
    verdict = _judge(state, 12, val=2.2, train=1.2, patience=None)
    assert _names(verdict) == ["overfitting"] and not verdict.stop
    assert verdict.events[0] == Event(12, "overfitting", (
        "overfitting at step 12: validation loss rose 1.9000 -> 2.2000 while train loss fell 1.6000 -> 1.2000"
    ))
    assert (state.last_val_loss, state.last_train_loss) == (2.2, 1.2)


def test_overfitting_and_early_stop_at_the_same_evaluation_come_in_that_order():
    state = TrainState()
    _judge(state, 1, val=1.0, train=2.0, patience=1)
    verdict = _judge(state, 2, val=1.5, train=1.0, patience=1)
    assert _names(verdict) == ["overfitting", "early_stop"] and verdict.stop


def test_nan_losses_are_never_best_and_never_compared():
    state = TrainState()
    verdict = _judge(state, 1, val=math.nan, train=math.nan, patience=1)
    # no finite validation loss yet: patience still counts, and the message says what is kept
    assert not verdict.is_best and verdict.stop and state.best_step is None
    assert "no validation loss was finite; keeping the last weights" in verdict.events[0].message
    assert state.last_val_loss is None and state.last_train_loss is None
    state = TrainState()
    _judge(state, 1, val=1.0, train=1.0, patience=None)
    verdict = _judge(state, 2, val=math.nan, train=0.5, patience=None)
    assert not verdict.is_best and _names(verdict) == [] and state.best_step == 1
    # after a NaN there is no previous loss to compare with
    assert _names(_judge(state, 3, val=3.0, train=0.1, patience=None)) == []
