"""lifecycle/drift.py's rule on synthetic per-example scores: stale only when the tuned arm lost more
than the best prompt-only arm on the same old and new examples (difference in differences)."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.lifecycle.drift import difference_in_differences, judge_staleness, two_sample_comparison

FAST = {"resamples": 1000, "permutations": 1000}  # the simulations' error rates, not their last decimal


def _scores(rng: np.random.Generator, prefix: str, n: int, p_tuned: float, p_other: float):
    """Binary scores of two arms on the same n examples; an example's difficulty is shared by the arms
    (a latent uniform draw), so their scores are correlated as real arms' are."""
    difficulty = rng.uniform(size=n)
    ids = [f"{prefix}{i}" for i in range(n)]
    tuned = dict(zip(ids, (difficulty < p_tuned).astype(float).tolist(), strict=True))
    other = dict(zip(ids, (difficulty < p_other).astype(float).tolist(), strict=True))
    return tuned, other


def test_difference_in_differences_pairs_examples_within_each_set():
    tuned_old, other_old = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0}, {"a": 1.0, "b": 0.0, "c": 0.0, "d": 1.0}
    tuned_new, other_new = {"x": 0.0, "y": 1.0, "z": 0.0}, {"x": 0.0, "y": 1.0, "z": 1.0}
    did, paired = difference_in_differences(tuned_new, tuned_old, other_new, other_old, seed=1)
    assert paired is True
    # per-example differences: new [0, 0, -1], old [0, 1, 0, 0]: -1/3 - 1/4
    assert did.delta == pytest.approx(-1 / 3 - 1 / 4)
    assert did == two_sample_comparison([0.0, 0.0, -1.0], [0.0, 1.0, 0.0, 0.0], seed=1)
    # the arms scored different examples: unpaired, the same point estimate
    unpaired, paired = difference_in_differences(tuned_new, tuned_old, {"x": 0.0, "y": 1.0}, other_old, seed=1)
    assert paired is False and unpaired.delta == pytest.approx((1 / 3 - 3 / 4) - (1 / 2 - 1 / 2))


def test_without_a_prompt_only_arm_the_tuned_change_alone_decides():
    rng = np.random.default_rng(0)
    old, _ = _scores(rng, "old", 100, 0.9, 0.5)
    new, _ = _scores(rng, "new", 100, 0.4, 0.5)
    judged = judge_staleness(new, old, None, None, seed=0, **FAST)
    assert judged["stale"] and judged["basis"] == "tuned change only" and judged["did"] is None


def test_new_data_harder_for_every_arm_is_not_stale_at_the_nominal_rate():
    """Both arms lose 20 points on the new examples: the old rule called this stale nearly always."""
    rng = np.random.default_rng(7)
    runs, stale, tuned_fell = 1000, 0, 0
    for i in range(runs):
        tuned_old, other_old = _scores(rng, "old", 100, 0.85, 0.75)
        tuned_new, other_new = _scores(rng, "new", 100, 0.65, 0.55)
        judged = judge_staleness(tuned_new, tuned_old, other_new, other_old, seed=i, **FAST)
        stale += judged["stale"]
        tuned_fell += judged["tuned"].significant and judged["tuned"].delta < 0
    assert stale / runs <= 0.05, stale / runs
    assert tuned_fell / runs >= 0.85, stale / runs  # the tuned arm's own change alone (the old rule): about 90%


@pytest.mark.parametrize("paired", [True, False])
def test_a_drop_of_the_tuned_arm_alone_is_stale(paired):
    rng = np.random.default_rng(11)
    runs, stale = 300, 0
    for i in range(runs):
        tuned_old, other_old = _scores(rng, "old", 100, 0.85, 0.75)
        tuned_new, other_new = _scores(rng, "new", 100, 0.6, 0.75)
        if not paired:
            other_new = {f"other-{k}": v for k, v in other_new.items()}
        judged = judge_staleness(tuned_new, tuned_old, other_new, other_old, seed=i, **FAST)
        assert judged["paired"] is paired
        stale += judged["stale"]
    # pairing removes what the arms share about each example: unpaired needs more examples for the same power
    assert stale / runs >= (0.95 if paired else 0.85), stale / runs


def test_changes_are_points_of_the_primarys_range():
    """A 1-10 judge falling 0.9 is 10 points of its range, not 90; its 7.3 is 70 points."""
    from tunelab.lifecycle.drift import TwoSample, _change_record, _pct

    record = _change_record(TwoSample(-0.9, (-1.35, -0.45), 0.01), (1, 10), "two-sample")
    assert record["delta_points"] == pytest.approx(-10.0)
    assert record["ci95_points"] == pytest.approx([-15.0, -5.0])
    assert _pct({"primary": 7.3, "ci95": [6.4, 8.2]}, (1, 10)) == "70.0% [60.0, 80.0]"
    assert _pct({"primary": 0.7, "ci95": [0.6, 0.8]}) == "70.0% [60.0, 80.0]"  # no range: a 0-1 score
