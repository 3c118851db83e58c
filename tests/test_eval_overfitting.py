"""eval/overfitting.py on small hand-made inputs: the loss curve, verbatim copies, train vs test."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tunelab.eval.metrics import bootstrap_ci
from tunelab.eval.overfitting import loss_curve, measure_overfitting, task_metric, verbatim


def _log(tmp_path, rows):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loss_curve_flags_validation_rising_while_train_falls(tmp_path):
    log = _log(tmp_path, [
        {"kind": "train", "step": 1, "loss": 3.0},
        {"kind": "eval", "step": 5, "val_loss": 2.0, "train_loss": 2.1},
        {"kind": "eval", "step": 8, "val_loss": None, "train_loss": 1.9},  # no validation: not a point
        {"kind": "eval", "step": 10, "val_loss": 2.5, "train_loss": 1.5},
        {"kind": "event", "step": 10, "event": "overfitting", "message": "val loss rising"},
        {"kind": "event", "step": 10, "event": "checkpoint"},
    ])
    curve = loss_curve(log)
    assert curve["loss_curve"] == [{"step": 5, "train_loss": 2.1, "val_loss": 2.0},
                                   {"step": 10, "train_loss": 1.5, "val_loss": 2.5}]
    assert [e["event"] for e in curve["overfitting_events"]] == ["overfitting"]
    assert (curve["best_step"], curve["best_val_loss"], curve["final_val_loss"]) == (5, 2.0, 2.5)
    assert curve["final_gap"] == 2.5 - 1.5
    assert curve["val_rising_while_train_falls"] is True


def test_loss_curve_of_a_model_still_improving_is_not_flagged(tmp_path):
    log = _log(tmp_path, [{"kind": "eval", "step": 5, "val_loss": 2.0, "train_loss": 2.1},
                          {"kind": "eval", "step": 10, "val_loss": 1.5}])  # no train loss logged
    curve = loss_curve(log)
    assert curve["best_step"] == 10 and curve["final_gap"] is None
    assert curve["val_rising_while_train_falls"] is False


def test_loss_curve_without_validation_says_where_it_looked(tmp_path):
    missing = tmp_path / "absent.jsonl"
    assert loss_curve(missing) == {"loss_curve": [], "overfitting_events": [],
                                   "note": f"no validation evaluations in {missing}"}


def test_verbatim_counts_copies_and_wrong_copies():
    outputs = ["A", " B ", "C", "A"]
    references = ["A", "X", "C", "Y"]
    # copies: A (right), B (wrong), A (wrong); C is no train answer
    assert verbatim(outputs, references, {"A", "B"}) == {"output_is_train_answer": 3 / 4, "wrong_and_train_answer": 2 / 4}
    assert verbatim([], [], {"A"}) == {"output_is_train_answer": 0.0, "wrong_and_train_answer": 0.0}


def test_task_metric_compares_the_scored_train_sample_with_test():
    result = task_metric("token_f1", [1.0, None, 0.5, 1.0], 0.5, [0.25, 0.75], seed=3)
    assert result["train_sample_n"] == 4  # the sample's size, failures included
    assert result["train_sample"] == pytest.approx(2.5 / 3)
    assert result["train_sample_ci95"] == list(bootstrap_ci([1.0, 0.5, 1.0], seed=3))
    assert result["train_minus_test"] == float(np.mean([1.0, 0.5, 1.0])) - 0.5
    assert (result["arm"], result["metric"], result["test"], result["test_ci95"]) == ("tuned", "token_f1", 0.5, [0.25, 0.75])
    assert task_metric("token_f1", [None, None], 0.5, [0.4, 0.6], seed=3) is None
    assert task_metric("token_f1", [1.0], None, None, seed=3) is None


def test_measure_overfitting_adds_references_verbatim_and_task(tmp_path):
    task = {"arm": "tuned"}
    result = measure_overfitting(tmp_path / "absent.jsonl", ["a", "b", "c", "d"], ["a ", "z"],
                                 {"base": ["a", "q", "c", "d"], "tuned": ["z", "z", "z", "z"]}, task)
    assert result["reference_is_train_answer"] == 1 / 4  # only "a" (stripped) is a train answer
    assert result["verbatim"]["base"] == {"output_is_train_answer": 1 / 4, "wrong_and_train_answer": 0.0}
    assert result["verbatim"]["tuned"] == {"output_is_train_answer": 1.0, "wrong_and_train_answer": 1.0}
    assert result["task_metric"] is task
    assert "task_metric" not in measure_overfitting(tmp_path / "absent.jsonl", ["a"], ["a"], {}, None)
