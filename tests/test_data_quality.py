"""Quality findings: planted duplicates, near-duplicates, conflicts, leaks and outliers are all found
(each naming the lines involved); a clean fixture gives none. And the seeded, stable split."""

from __future__ import annotations

import random
from pathlib import Path

from tunelab.data.check import check_data
from tunelab.data.quality import QualityIndex, prompt_key, signatures_of
from tunelab.data.split import assign_splits

FIXTURES = Path(__file__).parent / "fixtures" / "data"
TRAIN, VALID = FIXTURES / "quality_train.jsonl", FIXTURES / "quality_valid.jsonl"

# (file, line, code, the lines it names) planted by tests/fixtures/data/generate.py
PLANTED = {
    (TRAIN, 32, "exact_duplicate", (f"{TRAIN}:1",)),
    (TRAIN, 33, "near_duplicate", (f"{TRAIN}:31",)),
    (TRAIN, 34, "conflicting_answers", (f"{TRAIN}:2",)),
    (TRAIN, 36, "length_outlier", ()),
    (VALID, 2, "leakage_exact", (f"{TRAIN}:6",)),
    (VALID, 3, "leakage_near", (f"{TRAIN}:35",)),
}


def test_planted_findings_are_all_found_and_nothing_else():
    report = check_data(TRAIN, VALID)
    found = {(Path(i.path), i.line, i.code, i.related) for i in report.issues}
    assert found == PLANTED
    assert report.quality == {"exact_duplicates": 1, "near_duplicates": 1, "leakage": 2, "conflicts": 1, "length_outliers": 1}
    assert report.exit_code == 0  # quality findings are warnings
    assert all(i.severity == "warning" for i in report.issues)


def test_clean_fixture_has_no_findings():
    report = check_data(FIXTURES / "clean_train.jsonl", FIXTURES / "clean_valid.jsonl")
    assert report.issues == [] and report.examples == 40
    assert set(report.quality.values()) == {0}


def _chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def test_near_duplicate_recall_on_many_planted_pairs_and_no_false_positive():
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(3000)]
    originals = [" ".join(rng.choice(vocabulary) for _ in range(60)) for _ in range(300)]
    index = QualityIndex()
    for n, text in enumerate(originals):
        index.add("train", "t.jsonl", n + 1, _chat(f"question {n}", text))
    planted = {}
    for n in range(0, 300, 3):  # every third example gets a light edit: one word replaced, case changed
        words = originals[n].split()
        words[rng.randrange(60)] = "edited"
        planted[301 + n] = n + 1
        index.add("train", "t.jsonl", 301 + n, _chat(f"Question {n}!", " ".join(words).upper()))
    result = index.findings()
    found = {(index.source(later), index.source(earlier)) for later, earlier in result.near_duplicates}
    assert found == {(f"t.jsonl:{line}", f"t.jsonl:{first}") for line, first in planted.items()}
    assert result.exact_duplicates == [] and result.conflicts == []


def test_signature_agreement_estimates_jaccard():
    a = b"the quick brown fox jumps over the lazy dog near the river bank today"
    signatures, usable = signatures_of([a, a.upper().replace(b" ", b"  ,"), b"completely unrelated words about cooking pasta",
                                        b"", b"?! ", b"abcd"])
    assert usable.tolist() == [True, True, True, False, False, False]  # too short after normalising: not compared
    assert (signatures[0] == signatures[1]).mean() == 1.0  # case, punctuation and spacing do not count
    assert (signatures[0] == signatures[2]).mean() < 0.2


def test_leak_between_valid_and_test_and_duplicates_across_splits_are_not_duplicates():
    index = QualityIndex()
    index.add("train", "a", 1, _chat("What is 2+2?", "4"))
    index.add("valid", "b", 1, _chat("What is 2+2?", "4"))
    index.add("test", "c", 1, _chat("What is 2+2?", "four"))
    result = index.findings()
    assert result.exact_duplicates == []  # across splits this is leakage, not duplication
    assert sorted(result.leaks) == [(0, 1), (0, 2), (1, 2)]
    assert [(i.path, i.code) for i in result.issues] == [("b", "leakage_exact"), ("c", "leakage_exact")]


def test_near_duplicate_cap_is_reported():
    index = QualityIndex(near_dup_max_examples=2)
    for n in range(4):
        index.add("train", "t", n + 1, _chat("same question", "same long answer " * 5 + str(n)))
    result = index.findings()
    assert any("first 2 train examples" in note for note in result.notes)
    assert {later for later, _ in result.near_duplicates} <= {1}


# ---------------------------------------------------------------------------------------------- split


def _keys(n: int, start: int = 0) -> list[bytes]:
    return [prompt_key(_chat(f"question {i}", "a")) for i in range(start, start + n)]


def test_split_is_seeded_and_stable_when_examples_are_added():
    keys = _keys(2000)
    first = assign_splits(keys, 0, 0.1, 1000, 0.1, 1000, make_valid=True, make_test=True)
    assert first == assign_splits(keys, 0, 0.1, 1000, 0.1, 1000, make_valid=True, make_test=True)
    assert first != assign_splits(keys, 1, 0.1, 1000, 0.1, 1000, make_valid=True, make_test=True)
    assert 150 < first.count("valid") < 250 and 150 < first.count("test") < 250
    more = assign_splits(keys + _keys(500, 2000), 0, 0.1, 1000, 0.1, 1000, make_valid=True, make_test=True)
    assert more[:2000] == first


def test_split_caps_and_small_datasets_and_equal_prompts_together():
    keys = _keys(1000)
    capped = assign_splits(keys, 0, 0.5, 7, make_valid=True)
    assert capped.count("valid") == 7 and "test" not in capped
    small = assign_splits(_keys(12), 3, 0.1, 1000, 0.1, 1000, make_valid=True, make_test=True)
    assert small.count("valid") >= 1 and small.count("test") >= 1
    doubled = _keys(300) * 2
    splits = assign_splits(doubled, 0, 0.2, 1000, 0.2, 1000, make_valid=True, make_test=True)
    assert splits[:300] == splits[300:]
    assert assign_splits(_keys(50), 0, 0.1, 1000, make_valid=False) == ["train"] * 50
