"""Two runs compared on the same test examples, paired by example id: the child run's arm against the
parent's (`tunelab update`, `rebase`, and a run trained on a cleaned copy of its parent's data).

Reads eval/predictions.jsonl of each (`arm_scores`). Writes nothing: `compare_paired` returns a
contract.PairedResult (its `text` is the sentence the report shows).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tunelab.contract import PairedResult
from tunelab.errors import ConfigError

SIGNIFICANCE = 0.05  # a difference counts when its 95% interval excludes 0 AND its permutation p-value is below this


def arm_scores(eval_dir: Path, arm: str) -> dict[str, float]:
    """example id -> primary score of `arm`, from eval_dir/predictions.jsonl."""
    path = eval_dir / "predictions.jsonl"
    scores = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line) if line.strip() else {}
            if row.get("arm") == arm:
                scores[str(row["id"])] = float(row["score"])
    if not scores:
        raise ConfigError(f"{path}: no predictions of arm '{arm}'")
    return scores


def compare_paired(what: str, child: Mapping[str, float], parent: Mapping[str, float], child_arm: str = "tuned",
                   parent_arm: str = "tuned", seed: int = 0) -> PairedResult:
    """Child vs parent on the examples both scored: "old test 91.0 -> 90.5 (-0.5 points, ...: no significant change)".
    Significant only when the bootstrap interval and the permutation test agree (see SIGNIFICANCE)."""
    from tunelab.eval.metrics import paired_comparison

    ids = sorted(set(child) & set(parent))
    if not ids or len(ids) != len(child) or len(ids) != len(parent):
        raise ConfigError(f"{what}: the child scored {len(child)} examples and the parent {len(parent)}, "
                          f"{len(ids)} in common: they must be scored on the same examples (same eval.limit)")
    a, b = [child[i] for i in ids], [parent[i] for i in ids]
    result = paired_comparison(a, b, seed=seed)
    child_mean, parent_mean = 100 * sum(a) / len(a), 100 * sum(b) / len(b)
    lo, hi = (100 * v for v in result.ci95)
    significant = result.significant and result.p_value < SIGNIFICANCE
    if significant:
        change = "significantly better" if result.delta > 0 else "significantly worse"
    elif result.significant:  # a handful of changed examples: the percentile bootstrap is the bolder of the two
        change = "no significant change (the interval excludes 0 but the permutation test does not)"
    else:
        change = "no significant change"
    arms = "" if child_arm == parent_arm == "tuned" else f" ({parent_arm} -> {child_arm})"
    text = (f"{what}{arms} {parent_mean:.1f} -> {child_mean:.1f} ({100 * result.delta:+.1f} points, 95% CI "
            f"[{lo:+.1f}, {hi:+.1f}], p = {result.p_value:.3g}: {change})")
    return PairedResult(what=what, child_arm=child_arm, parent_arm=parent_arm, n_examples=len(ids),
                        child=child_mean / 100, parent=parent_mean / 100, delta_points=100 * result.delta,
                        ci95_points=[lo, hi], p_value=result.p_value, significant=significant, text=text)
