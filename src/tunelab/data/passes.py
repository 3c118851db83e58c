"""Passes over the data by its size alone: the `auto` of train.epochs (docs/training.md).

Reads a number of examples; returns passes. train/plan.py plans with it and `tunelab data check`
shows the passes a run on these examples would make, so it lives below both, with the data.
The heuristic OpenAI published for its fine-tuning defaults: 3 passes; more for tiny sets (at
least 100 examples seen, at most 25 passes), fewer for large ones (at most 25k examples seen).
"""

from __future__ import annotations

import math

MIN_EXAMPLES_SEEN, MAX_EXAMPLES_SEEN, DEFAULT_EPOCHS, MAX_EPOCHS = 100, 25_000, 3, 25


def auto_epochs(n_examples: int) -> float:
    """3 passes; tiny sets until 100 examples were seen (<= 25 passes), large ones <= 25k examples."""
    if n_examples <= 0:
        return DEFAULT_EPOCHS
    if n_examples * DEFAULT_EPOCHS < MIN_EXAMPLES_SEEN:
        return float(min(MAX_EPOCHS, math.ceil(MIN_EXAMPLES_SEEN / n_examples)))
    if n_examples * DEFAULT_EPOCHS > MAX_EXAMPLES_SEEN:
        return max(0.01, round(MAX_EXAMPLES_SEEN / n_examples, 2))
    return float(DEFAULT_EPOCHS)
