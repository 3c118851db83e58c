"""Input shift between a run's training inputs and new inputs, for new data without labels.

Reads two lists of texts; writes nothing. The measure: the share of the inputs' word bigrams
(lower-cased words, each bigram counted once per input) that never occur in a reference set of
inputs. What "no shift" looks like comes from the training inputs themselves: in each of
RESAMPLES resamples, m random training inputs are held out (m = the number of new inputs, at most
half of the training inputs) and the rest are the reference; the held-out inputs' unseen share is
the baseline, and m random new inputs are measured against the same reference, so both sides meet
a reference of the same size. Shifted when the new share is above the baseline in at least
(1 - ALPHA) of the resamples (one-sided p-value from the resamples).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tunelab.errors import DataError

NGRAM_WORDS = 2
RESAMPLES = 200
ALPHA = 0.05
TOP_UNSEEN = 5
_WORD = re.compile(r"\w+")


def word_ngrams(text: str, n: int = NGRAM_WORDS) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass
class InputShift:
    measure: str
    n_train: int
    n_new: int
    sample_size: int  # inputs per side in each resample
    resamples: int
    new_unseen_share: float  # mean over resamples
    new_ci95: list[float]
    baseline_unseen_share: float
    baseline_ci95: list[float]
    p_value: float
    shifted: bool
    top_unseen: list[str] = field(default_factory=list)  # most frequent new bigrams absent from all training inputs
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unseen_share(sets: Sequence[set[tuple[str, ...]]], total: Counter, held_out: Counter) -> float:
    grams = [g for s in sets for g in s]
    if not grams:
        return 0.0
    return sum(1 for g in grams if total[g] - held_out[g] <= 0) / len(grams)


def measure_input_shift(train_texts: Sequence[str], new_texts: Sequence[str], seed: int = 0,
                        resamples: int = RESAMPLES) -> InputShift:
    train_sets = [word_ngrams(t) for t in train_texts]
    new_sets = [word_ngrams(t) for t in new_texts]
    if len(train_sets) < 4 or not new_sets:
        raise DataError(f"input shift needs at least 4 training inputs and 1 new input (got {len(train_sets)} and {len(new_sets)})")
    total = Counter(g for s in train_sets for g in s)
    size = min(len(new_sets), len(train_sets) // 2)
    rng = np.random.default_rng(seed)
    baseline, new = [], []
    for _ in range(resamples):
        held = rng.choice(len(train_sets), size, replace=False)
        held_out = Counter(g for i in held for g in train_sets[i])
        baseline.append(_unseen_share([train_sets[i] for i in held], total, held_out))
        sample = rng.choice(len(new_sets), size, replace=False)
        new.append(_unseen_share([new_sets[i] for i in sample], total, held_out))
    base_arr, new_arr = np.asarray(baseline), np.asarray(new)
    p_value = float((np.sum(base_arr >= new_arr) + 1) / (resamples + 1))
    unseen = Counter(g for s in new_sets for g in s if total[g] == 0)
    shift = InputShift(
        measure=f"share of word {NGRAM_WORDS}-grams of the new inputs that never occur in the training inputs, "
                "against the same share for training inputs held out from the rest (same reference size)",
        n_train=len(train_sets), n_new=len(new_sets), sample_size=size, resamples=resamples,
        new_unseen_share=float(new_arr.mean()), new_ci95=[float(v) for v in np.percentile(new_arr, [2.5, 97.5])],
        baseline_unseen_share=float(base_arr.mean()),
        baseline_ci95=[float(v) for v in np.percentile(base_arr, [2.5, 97.5])],
        p_value=p_value, shifted=p_value < ALPHA,
        top_unseen=[" ".join(g) for g, _ in unseen.most_common(TOP_UNSEEN)],
    )
    shift.text = _describe(shift)
    return shift


def _describe(s: InputShift) -> str:
    lo, hi = (100 * v for v in s.baseline_ci95)
    measured = (f"{100 * s.new_unseen_share:.1f}% of the new inputs' word pairs never occur in the training inputs, "
                f"against {100 * s.baseline_unseen_share:.1f}% (95% range {lo:.1f}-{hi:.1f}%) for training inputs "
                f"held out from the others (p = {s.p_value:.3f})")
    if s.shifted:
        new_words = f" (new here: {', '.join(repr(g) for g in s.top_unseen)})" if s.top_unseen else ""
        return (f"inputs shifted: {measured}: the model now meets wording it was not trained on{new_words}. "
                "Label some of the new inputs and run tunelab drift with them to see whether answers suffer; "
                "tunelab update trains on them")
    return (f"no input shift: {measured}. This measure cannot see new answers to familiar inputs: "
            "label some of the new inputs to check quality")
