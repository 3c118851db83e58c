"""Scorers against hand-computed values, interval coverage by simulation, and the verdict's cases."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.eval.metrics import (
    bootstrap_ci,
    detect_output_kind,
    exact_match,
    json_field_accuracy,
    lenient_json,
    macro_f1,
    normalized_match,
    paired_comparison,
    predicted_label,
    rouge_l,
    score_outputs,
    strict_json,
    token_f1,
)


def test_exact_and_normalized_match():
    assert exact_match(" Paris\n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert normalized_match("The  Paris!", "paris") == 1.0  # case, punctuation, article, spaces
    assert normalized_match("Paris, France", "Paris") == 0.0


def test_token_f1_hand_computed():
    # normalised: "cat sat on mat" (4) vs "cat sat on red mat" (5); overlap 4 -> P 1, R 0.8
    assert token_f1("the cat sat on mat", "a cat sat on the red mat") == pytest.approx(2 * 0.8 / 1.8)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "cat") == 0.0
    # repeated tokens count with multiplicity: overlap {go: 1, stop: 1} = 2 of 3 each side
    assert token_f1("go go stop", "go stop stop") == pytest.approx(2 / 3)


def test_rouge_l_hand_computed():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5; P = 5/5, R = 5/6 -> F = 10/11
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("completely different", "the cat sat") == 0.0


def test_json_parsing_and_field_accuracy():
    assert strict_json('{"a": 1}') == (True, {"a": 1})
    assert strict_json('```json\n{"a": 1}\n```') == (True, {"a": 1})
    assert strict_json('Sure: {"a": 1}')[0] is False
    assert lenient_json('Sure: {"a": 1} hope that helps') == {"a": 1}
    assert lenient_json("no json here") is None
    reference = {"a": 1, "b": "x", "c": True}
    assert json_field_accuracy({"a": 1, "b": "y"}, reference) == pytest.approx(1 / 3)
    assert json_field_accuracy({"a": 1, "b": "x", "c": True, "extra": 0}, reference) == 1.0
    assert json_field_accuracy({"a": "1", "b": "x", "c": True}, reference) == pytest.approx(2 / 3)  # typed
    assert json_field_accuracy(None, reference) == 0.0
    assert json_field_accuracy([1, 2], [1, 2]) == 1.0


def test_score_outputs_json_kind_hand_computed():
    refs = ['{"city": "Rome", "n": 2}', '{"city": "Oslo", "n": 1}', '{"city": "Lima", "n": 3}']
    outs = ['{"city": "Rome", "n": 2}', 'Answer: {"city": "Oslo", "n": 5}', "Lima"]
    kind = detect_output_kind(refs)
    assert kind.kind == "json" and kind.primary == "json_field_accuracy" and set(kind.keys) == {"city", "n"}
    means = score_outputs(outs, refs, kind).means()
    assert means["json_valid"] == pytest.approx(1 / 3)  # only the first is JSON as a whole
    assert means["json_exact"] == pytest.approx(1 / 3)
    assert means["json_field_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert means["exact_match"] == pytest.approx(1 / 3)


def test_schema_conformance():
    schema = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}
    refs = ['{"city": "Rome"}'] * 3
    outs = ['{"city": "Rome"}', '{"city": 3}', "not json"]
    scores = score_outputs(outs, refs, detect_output_kind(refs), schema=schema)
    assert scores.per_example["schema_valid"] == [1.0, 0.0, 0.0]


def test_label_kind_accuracy_and_macro_f1_hand_computed():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", ""]
    # a: tp1 fp0 fn1 -> 2/3; b: tp2 fp1 fn0 -> 4/5; c: tp0 fp0 fn1 -> 0
    assert macro_f1(pred, gold, ["a", "b", "c"]) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    refs = ["positive", "negative", "neutral", "positive", "negative", "neutral", "positive"]
    kind = detect_output_kind(refs)
    assert kind.kind == "label" and kind.primary == "label_accuracy"
    assert predicted_label("Positive.", kind.labels) == "positive"
    assert predicted_label("The sentiment is negative", kind.labels) == "negative"
    assert predicted_label("positive or negative", kind.labels) == ""  # ambiguous: no label
    outs = ["positive", "Negative!", "positive", "positive", "sentiment: negative", "neutral", "no idea"]
    scores = score_outputs(outs, refs, kind)
    assert scores.per_example["label_accuracy"] == [1, 1, 0, 1, 1, 1, 0]
    assert "macro_f1" in scores.corpus


def test_text_kind_falls_back_to_token_f1():
    refs = [f"The meeting moved to room {i} on floor {i % 3}" for i in range(12)]
    kind = detect_output_kind(refs)
    assert kind.kind == "text" and kind.primary == "token_f1"
    assert "free-text" in kind.reason


def test_bootstrap_interval_covers_true_mean_in_simulation():
    rng = np.random.default_rng(123)
    true_p, n, datasets = 0.3, 80, 200
    covered = 0
    for i in range(datasets):
        sample = (rng.random(n) < true_p).astype(float)
        lo, hi = bootstrap_ci(sample, seed=i, resamples=1000)
        covered += lo <= true_p <= hi
    assert covered / datasets >= 0.90
    # and the interval is not trivially wide
    lo, hi = bootstrap_ci((rng.random(n) < true_p).astype(float), seed=0)
    assert hi - lo < 0.3


def test_paired_difference_interval_covers_true_delta_in_simulation():
    rng = np.random.default_rng(7)
    covered = 0
    for i in range(200):
        base = rng.normal(0.5, 0.2, 60)
        better = base + 0.05 + rng.normal(0, 0.1, 60)  # true delta 0.05
        comparison = paired_comparison(better, base, seed=i, resamples=1000, permutations=500)
        covered += comparison.ci95[0] <= 0.05 <= comparison.ci95[1]
    assert covered / 200 >= 0.90


def test_identical_arms_give_no_significant_difference():
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 0.5] * 10
    comparison = paired_comparison(scores, scores)
    assert comparison.delta == 0.0 and comparison.ci95 == (0.0, 0.0) and comparison.p_value == 1.0


def test_permutation_p_value_is_calibrated_under_the_null():
    rng = np.random.default_rng(3)
    rejections = 0
    for i in range(100):
        a, b = rng.normal(0, 1, 40), rng.normal(0, 1, 40)
        rejections += paired_comparison(a, b, seed=i, resamples=200, permutations=400).p_value < 0.05
    assert rejections <= 12  # about 5 expected
