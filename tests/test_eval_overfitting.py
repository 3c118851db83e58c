"""eval/overfitting.py on small hand-made inputs: the loss curve, verbatim copies, train vs test."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tunelab.eval.metrics import bootstrap_ci
from tunelab.eval.overfitting import loss_curve, measure_overfitting, task_metric, validation_rise, verbatim


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
    # two evaluations cannot measure the noise: a rise must pass 5% of the minimum
    assert curve["val_rise"]["tolerance"] == pytest.approx(0.1) and curve["val_rise"]["rise_step"] == 10


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


# ---- the loss-curve signal against the validation loss's own noise

def _curve(val_losses, train_losses=None):
    train_losses = train_losses or [2.0 - 0.01 * i for i in range(len(val_losses))]  # falling throughout
    return [{"step": 10 * (i + 1), "train_loss": t, "val_loss": v}
            for i, (v, t) in enumerate(zip(val_losses, train_losses, strict=True))]


def test_a_flat_noisy_validation_loss_is_no_overfitting_signal():
    """Seen: 'overfitting signal at step 52, 91' on a flat validation loss whose best step was the last."""
    flat = [0.9, 0.62, 0.515, 0.52, 0.512, 0.518, 0.511, 0.517, 0.513, 0.519, 0.514]
    rise = validation_rise(_curve(flat), evaluated_step=60)
    assert rise["rising"] is False and rise["rise_step"] is None and rise["evaluated_checkpoint"] is None
    assert rise["best_step"] == 70 and rise["rise"] == pytest.approx(0.003)
    assert rise["tolerance"] > 0.003 and rise["noise_sd"] is not None


def test_a_real_u_turn_says_where_it_began_and_where_the_evaluated_weights_are():
    u_turn = [1.2, 0.8, 0.6, 0.5, 0.47, 0.46, 0.5, 0.56, 0.63, 0.7, 0.78]
    rise = validation_rise(_curve(u_turn), evaluated_step=60)
    assert rise["rising"] is True and rise["best_step"] == 60 and rise["rise"] == pytest.approx(0.32)
    # the tolerance is 4 noise sds (0.105 here, the curve's uneven bend counting as noise): +0.10 at step 80 is
    # within it, +0.17 at step 90 is not
    assert rise["tolerance"] == pytest.approx(0.1046, abs=1e-4) and rise["rise_step"] == 90
    assert rise["evaluated_checkpoint"] == "before the rise"
    assert validation_rise(_curve(u_turn), evaluated_step=110)["evaluated_checkpoint"] == "after the rise"
    # train loss rising too is not the overfitting signature
    assert validation_rise(_curve(u_turn, [1.0 + 0.01 * i for i in range(11)]))["rising"] is False


def _simulated_curve(kind, rng, evals, noise):
    t = np.linspace(0, 1, evals + 1)[1:]
    # flat: a fast drop then flat; u_turn: down to its minimum at mid-run, then up about 0.3 by the end
    mean = 0.5 + 0.5 * np.exp(-t * 20) if kind == "flat" else 0.5 + 0.5 * np.exp(-t * 10) + 0.6 * np.clip(t - 0.5, 0, None)
    return _curve((mean * (1 + noise * rng.standard_normal(evals))).tolist())


@pytest.mark.parametrize("evals", [6, 11, 21, 41])
def test_flat_noisy_curves_rarely_raise_the_overfitting_signal(evals):
    rng = np.random.default_rng(evals)
    runs = 2000
    for noise in (0.01, 0.03, 0.05):
        alarms = sum(validation_rise(_simulated_curve("flat", rng, evals, noise))["rising"] for _ in range(runs))
        assert alarms / runs <= 0.05, noise


@pytest.mark.parametrize("evals", [6, 11, 21, 41])
def test_a_real_u_turn_is_detected(evals):
    rng = np.random.default_rng(100 + evals)
    runs = 2000
    for noise in (0.01, 0.03):
        caught = sum(validation_rise(_simulated_curve("u_turn", rng, evals, noise))["rising"] for _ in range(runs))
        assert caught / runs >= 0.95, noise
