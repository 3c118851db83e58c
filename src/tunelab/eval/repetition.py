"""Degenerate repetition in generated answers: how many of an arm's answers repeat a line or loop on
the same words, a failure graders that check content (a greeting, a reference, a sign-off) do not
see, and the one preference tuning (DPO) is known for on small models.

Reads answer texts; writes nothing. eval/run.py puts `arms.<arm>.repetition` (`arm_repetition`) into
eval/metrics.json, and `repetition_note` is the sentence the verdict (and a dpo run's `preference.vs_sft`)
gains when the tuned arm repeats clearly more than the arm it is compared with.

An answer *repeats* when either holds (deterministic, linear in the answer's length per period):
  repeated line   a line occurs twice or more, compared after lower-casing and collapsing whitespace,
                  among the lines with at least MIN_LINE_WORDS words (so "}" or "-" lines never count)
  looping words   the answer's words (runs of letters and digits, lower-cased; punctuation and line
                  breaks ignored) hold a stretch of at least LOOP_MIN_WORDS words that is one k-word
                  sequence said three or more times in a row ("thank you thank you thank you")
"Clearly more" (`repeats_clearly_more`): on the same prompts, the answers where only the tuned arm
repeats outnumber those where only the other does, by a one-sided exact sign test (McNemar's) at
p < ALPHA, and the tuned arm's share is at least MIN_SHARE_GAP above the other's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

MIN_LINE_WORDS = 2
LOOP_MIN_WORDS = 6
LOOP_REPEATS = 3
ALPHA = 0.05
MIN_SHARE_GAP = 0.05
DEFINITION = (f"an answer repeats when a line of {MIN_LINE_WORDS}+ words occurs twice (case and spacing ignored) "
              f"or {LOOP_MIN_WORDS}+ words are one word sequence said {LOOP_REPEATS}+ times in a row")
_WORD = re.compile(r"\w+")


def repeated_line(text: str) -> bool:
    """A line of at least MIN_LINE_WORDS words occurs twice or more (case and spacing ignored)."""
    lines = [" ".join(line.lower().split()) for line in text.splitlines()]
    counts = Counter(line for line in lines if len(_WORD.findall(line)) >= MIN_LINE_WORDS)
    return any(n > 1 for n in counts.values())


def looping_words(text: str) -> bool:
    """A stretch of at least LOOP_MIN_WORDS words is one k-word sequence said LOOP_REPEATS+ times in a row."""
    words = [w.lower() for w in _WORD.findall(text)]
    for k in range(1, len(words) // LOOP_REPEATS + 1):
        # a stretch of period k covering L words has L - k positions with words[i] == words[i + k] in a row
        needed = max(LOOP_MIN_WORDS, LOOP_REPEATS * k) - k
        run = 0
        for i in range(len(words) - k):
            run = run + 1 if words[i] == words[i + k] else 0
            if run >= needed:
                return True
    return False


def repeats(text: str) -> bool:
    """The module docstring's definition: a repeated line or looping words."""
    return repeated_line(text) or looping_words(text)


def arm_repetition(texts: Sequence[str]) -> dict[str, Any]:
    """eval/metrics.json arms.<arm>.repetition: {share, n, repeated_line, looping_words, definition}
    (the two counts may overlap; `share` counts an answer once)."""
    lines = [repeated_line(t) for t in texts]
    loops = [looping_words(t) for t in texts]
    either = sum(a or b for a, b in zip(lines, loops, strict=True))
    return {"share": either / len(texts) if texts else None, "n": len(texts), "repeated_line": sum(lines),
            "looping_words": sum(loops), "definition": DEFINITION}


def _sign_test_p(only_tuned: int, only_other: int) -> float:
    """One-sided exact binomial p of at least `only_tuned` of the discordant answers going the tuned way."""
    n = only_tuned + only_other
    return sum(math.comb(n, k) for k in range(only_tuned, n + 1)) / 2**n if n else 1.0


def repeats_clearly_more(tuned: Sequence[bool], other: Sequence[bool]) -> tuple[bool, float, float, float]:
    """(clearly more, tuned share, other share, p) from paired `repeats` flags (the module docstring's rule)."""
    n = len(tuned)
    if n == 0 or n != len(other):
        return False, 0.0, 0.0, 1.0
    only_tuned = sum(a and not b for a, b in zip(tuned, other, strict=True))
    only_other = sum(b and not a for a, b in zip(tuned, other, strict=True))
    share_t, share_o = sum(tuned) / n, sum(other) / n
    p = _sign_test_p(only_tuned, only_other)
    return p < ALPHA and share_t - share_o >= MIN_SHARE_GAP, share_t, share_o, p


def repetition_note(tuned_arm: str, tuned: Sequence[str], other_arm: str, other: Sequence[str]) -> str | None:
    """The sentence for the verdict when `tuned_arm`'s answers repeat clearly more than `other_arm`'s
    on the same prompts, else None."""
    clearly, share_t, share_o, p = repeats_clearly_more([repeats(t) for t in tuned], [repeats(t) for t in other])
    if not clearly:
        return None
    return (f"The {tuned_arm} arm's answers repeat themselves more often than {other_arm}'s: {100 * share_t:.0f}% repeat "
            f"a line or loop on the same words, against {100 * share_o:.0f}% (p = {p:.4f}; graders may not penalise "
            "it: read the answers)")
