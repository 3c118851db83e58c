"""Scorers, intervals and the verdict: pure functions over output and reference strings.

Reads nothing and writes nothing. Per-example scores: exact match, normalised match, token F1,
ROUGE-L; for JSON references validity, parsed equality and per-field accuracy (plus jsonschema
conformance when a schema is given); for a small label set, accuracy (and macro-F1 over the set).
The primary metric is chosen from the references and the reason recorded. Intervals are seeded
percentile bootstraps; arms are compared with a paired bootstrap interval and a paired sign-flip
permutation p-value on the same examples.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
PERMUTATIONS = 10000
LABEL_SET_MAX = 20  # more distinct answers than this is free text, not classification
LABEL_MAX_WORDS = 4
JSON_SHARE = 0.9  # references that must parse as JSON objects for the task to count as JSON output

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)


# ---------------------------------------------------------------------------------------------- text


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(output: str, reference: str) -> float:
    return float(output.strip() == reference.strip())


def normalized_match(output: str, reference: str) -> float:
    return float(normalize_text(output) == normalize_text(reference))


def token_f1(output: str, reference: str) -> float:
    out_tokens = normalize_text(output).split()
    ref_tokens = normalize_text(reference).split()
    if not out_tokens or not ref_tokens:
        return float(out_tokens == ref_tokens)
    overlap = sum((Counter(out_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(out_tokens), overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score: lower-cased alphanumeric tokens, longest common subsequence)."""
    return float(_rouge_scorer().score(reference, output)["rougeL"].fmeasure)


# ---------------------------------------------------------------------------------------------- JSON


def strict_json(text: str) -> tuple[bool, Any]:
    """(valid, value): the whole output is JSON, allowing only a surrounding markdown code fence."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def lenient_json(text: str) -> Any:
    """The output as JSON, else the first balanced {...} inside it that parses, else None.

    Lenient on purpose: a prompt-only arm that wraps a right answer in a sentence still gets field
    credit (what a forgiving consumer would extract); strict validity is scored separately.
    """
    valid, value = strict_json(text)
    if valid:
        return value
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            value, _ = decoder.raw_decode(text[start:])
        except ValueError:
            continue
        return value
    return None


def json_field_accuracy(output_value: Any, reference_value: Any) -> float:
    """Share of the reference object's keys whose value the output reproduces exactly (typed JSON
    equality); a non-object reference counts as one field compared whole."""
    if not isinstance(reference_value, dict):
        return float(output_value == reference_value)
    if not reference_value:
        return float(output_value == {})
    if not isinstance(output_value, dict):
        return 0.0
    hits = sum(1 for key, value in reference_value.items() if key in output_value and output_value[key] == value)
    return hits / len(reference_value)


# ---------------------------------------------------------------------------------------------- output kind


@dataclass(frozen=True)
class OutputKind:
    kind: str  # "json" | "label" | "text"
    primary: str  # the metric name the verdict is about
    reason: str
    labels: tuple[str, ...] = ()  # normalised label set (kind "label")
    keys: tuple[str, ...] = ()  # JSON keys most references share (kind "json")


def detect_output_kind(references: Sequence[str], extra_answers: Sequence[str] = ()) -> OutputKind:
    """JSON objects -> json_field_accuracy; a small label set -> label_accuracy; else token_f1.

    `extra_answers` (train answers) widen the label set so a label absent from the test split still
    counts as a label, not as a wrong free-text answer.
    """
    references = list(references)
    n = len(references)
    if n == 0:
        return OutputKind("text", "token_f1", "no references")
    objects = [strict_json(r)[1] for r in references]
    json_count = sum(1 for v in objects if isinstance(v, dict))
    if json_count >= JSON_SHARE * n:
        key_counts = Counter(k for v in objects if isinstance(v, dict) for k in v)
        keys = tuple(k for k, c in key_counts.items() if c >= 0.5 * json_count)
        return OutputKind(
            "json", "json_field_accuracy",
            f"{json_count}/{n} references are JSON objects: the primary metric is per-field accuracy of the "
            "parsed output (partial credit per field, finer-grained than whole-object exact match, which is "
            "reported as json_exact)",
            keys=keys,
        )
    labels = sorted({normalize_text(r) for r in [*references, *extra_answers]})
    seen_in_test = {normalize_text(r) for r in references}
    longest = max(len(label.split()) for label in labels) if labels else 0
    # Labels repeat: a set as large as half the test answers is not a label set.
    if 1 < len(labels) <= LABEL_SET_MAX and longest <= LABEL_MAX_WORDS and n >= 2 * len(seen_in_test):
        return OutputKind(
            "label", "label_accuracy",
            f"references come from a set of {len(labels)} short labels: the primary metric is accuracy "
            "(macro-F1 over the labels is reported alongside)",
            labels=tuple(labels),
        )
    return OutputKind(
        "text", "token_f1",
        f"free-text references ({len(labels)} distinct answers over {n}): the primary metric is token F1 "
        "(partial credit for overlapping words; exact match and ROUGE-L reported alongside)",
    )


def predicted_label(output: str, labels: Sequence[str]) -> str:
    """The label an output names: itself when it is a label, else the only label it mentions."""
    normalized = normalize_text(output)
    if normalized in labels:
        return normalized
    mentioned = [label for label in labels if re.search(rf"\b{re.escape(label)}\b", normalized)]
    return mentioned[0] if len(mentioned) == 1 else ""


def macro_f1(predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> float:
    """Mean over labels of per-label F1 (a label neither predicted nor present is skipped)."""
    scores = []
    for label in labels:
        tp = sum(1 for p, g in zip(predicted, gold, strict=True) if p == label and g == label)
        fp = sum(1 for p, g in zip(predicted, gold, strict=True) if p == label and g != label)
        fn = sum(1 for p, g in zip(predicted, gold, strict=True) if p != label and g == label)
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@dataclass
class Scores:
    per_example: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per example
    corpus: dict[str, float] = field(default_factory=dict)  # metrics defined only over the whole set

    def means(self) -> dict[str, float]:
        out = {name: float(np.mean(values)) if values else 0.0 for name, values in self.per_example.items()}
        out.update(self.corpus)
        return out


def score_outputs(
    outputs: Sequence[str], references: Sequence[str], kind: OutputKind, schema: Mapping[str, Any] | None = None
) -> Scores:
    scores = Scores()
    pairs = list(zip(outputs, references, strict=True))
    scores.per_example["exact_match"] = [exact_match(o, r) for o, r in pairs]
    scores.per_example["normalized_match"] = [normalized_match(o, r) for o, r in pairs]
    scores.per_example["token_f1"] = [token_f1(o, r) for o, r in pairs]
    scores.per_example["rouge_l"] = [rouge_l(o, r) for o, r in pairs]
    if kind.kind == "json":
        parsed = [(lenient_json(o), strict_json(r)[1]) for o, r in pairs]
        scores.per_example["json_valid"] = [float(strict_json(o)[0]) for o in outputs]
        scores.per_example["json_exact"] = [float(ov is not None and ov == rv) for ov, rv in parsed]
        scores.per_example["json_field_accuracy"] = [json_field_accuracy(ov, rv) for ov, rv in parsed]
    if kind.kind == "label":
        predicted = [predicted_label(o, kind.labels) for o in outputs]
        gold = [normalize_text(r) for r in references]
        scores.per_example["label_accuracy"] = [float(p == g) for p, g in zip(predicted, gold, strict=True)]
        scores.corpus["macro_f1"] = macro_f1(predicted, gold, kind.labels)
    if schema is not None:
        import jsonschema

        validator = jsonschema.Draft202012Validator(schema)
        scores.per_example["schema_valid"] = [
            float(ok and validator.is_valid(value)) for ok, value in (strict_json(o) for o in outputs)
        ]
    return scores


# ---------------------------------------------------------------------------------------------- one scale

UNIT_RANGE = (0.0, 1.0)  # every built-in metric, string_check, label_model and text_similarity


def to_points(value: float, score_range: Sequence[float] | None = None) -> float:
    """A primary score as points of its declared range, 0-100: a 1-10 judge's 7.3 is 70 points, a 0-1
    metric's 0.7 is 70 points."""
    low, high = score_range or UNIT_RANGE
    return (value - low) * 100.0 / (high - low)


def to_fraction(value: float, score_range: Sequence[float] | None = None) -> float:
    """A primary score as a fraction of its declared range (0 at the low end, 1 at the high end)."""
    low, high = score_range or UNIT_RANGE
    return (value - low) / (high - low)


def delta_points(difference: float, score_range: Sequence[float] | None = None) -> float:
    """A difference of two primary scores as points of the declared range (no offset: 7.3 - 6.4 on a
    1-10 judge is 10 points)."""
    low, high = score_range or UNIT_RANGE
    return difference * 100.0 / (high - low)


# ---------------------------------------------------------------------------------------------- intervals


def bootstrap_ci(
    values: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def summarize_scores(scores: Sequence[float | None], seed: int = 0, pass_threshold: float | None = None) -> dict[str, Any]:
    """A grader's column for one arm: mean and bootstrap interval over the examples it scored, and how
    many failed (a failure is never averaged in as a 0)."""
    scored = [s for s in scores if s is not None]
    out: dict[str, Any] = {
        "mean": float(np.mean(scored)) if scored else None,
        "ci95": list(bootstrap_ci(scored, seed=seed)) if scored else None,
        "scored": len(scored),
        "failed": len(scores) - len(scored),
    }
    if pass_threshold is not None:
        out["pass_rate"] = float(np.mean([s >= pass_threshold for s in scored])) if scored else None
    return out


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float | None:
    """Cohen's kappa of two raters' categorical labels on the same items (None when chance agreement is
    total, e.g. both always give the same label)."""
    n = len(a)
    if n == 0 or n != len(b):
        return None
    observed = sum(1 for x, y in zip(a, b, strict=True) if x == y) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[label] * count_b[label] for label in set(count_a) | set(count_b)) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


@dataclass(frozen=True)
class PairedComparison:
    delta: float  # mean of a - b
    ci95: tuple[float, float]  # paired bootstrap interval of the mean difference
    p_value: float  # two-sided paired sign-flip permutation test

    @property
    def significant(self) -> bool:
        return self.ci95[0] > 0 or self.ci95[1] < 0


def paired_comparison(
    a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
    permutations: int = PERMUTATIONS,
) -> PairedComparison:
    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diffs.size == 0:
        return PairedComparison(0.0, (0.0, 0.0), 1.0)
    observed = float(diffs.mean())
    ci = bootstrap_ci(diffs, seed=seed, resamples=resamples)
    rng = np.random.default_rng(seed + 1)
    flipped = (rng.choice((-1.0, 1.0), size=(permutations, diffs.size)) * diffs).mean(axis=1)
    # >= with a small tolerance: all-zero differences give p = 1, not a float-noise artefact.
    extreme = int(np.sum(np.abs(flipped) >= abs(observed) - 1e-12))
    return PairedComparison(observed, ci, (extreme + 1) / (permutations + 1))
