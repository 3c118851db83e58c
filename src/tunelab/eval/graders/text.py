"""string_check and text_similarity scores of one rendered (input, reference) pair, from kept libraries.

Reads two strings; returns a float in [0, 1]. fuzzy_match: rapidfuzz's normalised Indel similarity
(fuzz.ratio / 100); bleu: sacrebleu's sentence BLEU / 100; gleu: nltk's sentence GLEU; meteor:
nltk's METEOR on lower-cased whitespace tokens (exact and Porter-stem matches; WordNet synonyms
only where the nltk wordnet corpus is installed); rouge_1..rouge_5 and rouge_l: rouge-score's
F-measure. cosine is not here: it needs embeddings (judge.py).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


def string_check(operation: str, text: str, reference: str) -> float:
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    if operation == "ilike":
        return float(reference.casefold() in text.casefold())
    raise ValueError(f"unknown string_check operation {operation!r}")


@lru_cache(maxsize=8)
def _rouge(kind: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=False)


class _NoSynonyms:
    """Stands in for nltk's WordNet when its corpus is not installed: METEOR then matches exact words
    and stems only."""

    def synsets(self, *_: Any, **__: Any) -> list[Any]:
        return []


@lru_cache(maxsize=1)
def _wordnet() -> Any:
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("test")
        return wordnet
    except LookupError:
        return _NoSynonyms()


def text_similarity(metric: str, text: str, reference: str) -> float:
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return float(fuzz.ratio(text, reference)) / 100
    if metric == "bleu":
        import sacrebleu

        return min(1.0, float(sacrebleu.sentence_bleu(text, [reference]).score) / 100)  # float noise above 1
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference.split()], text.split()))
    if metric == "meteor":
        from nltk.translate.meteor_score import meteor_score

        return float(meteor_score([reference.lower().split()], text.lower().split(), wordnet=_wordnet()))
    if metric.startswith("rouge_"):
        kind = "rougeL" if metric == "rouge_l" else "rouge" + metric.removeprefix("rouge_")
        return float(_rouge(kind).score(reference, text)[kind].fmeasure)
    raise ValueError(f"text_similarity metric {metric!r} is not computed from text alone")
