"""Replay the decision on finished runs: what the verdict says now, and what the rule before it said.

    python bench/verdict_replay.py runs/a runs/b ... [--out bench/results/verdict_replay.json]

Reads each run's eval/predictions.jsonl (per-example primary scores) and eval/metrics.json (costs,
latency, the primary's range, eval settings from recipe.yaml) and calls tunelab.eval.decision on them:
no model is loaded, nothing is regenerated. The previous rule (the best fine-tuned arm against the best
prompt-only arm by test mean; on a tie, the cheaper of the two) is replayed beside it from the same
scores, so a change of recommendation on real outputs is visible.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from tunelab.config import is_tuned_arm, load_recipe
from tunelab.eval.decision import ArmFacts, decide_verdict
from tunelab.eval.metrics import paired_comparison, to_points


def previous_rule(scores: dict[str, list[float]], usd: dict[str, float]) -> str:
    """The rule before eval/decision.py: best of each side by mean, interval alone, a tie goes to the cheaper."""
    means = {arm: sum(v) / len(v) for arm, v in scores.items()}
    tuned = [a for a in scores if is_tuned_arm(a)]
    others = [a for a in scores if not is_tuned_arm(a)]
    best_tuned = max(tuned, key=lambda a: (means[a], -tuned.index(a)))
    best_other = max(others, key=lambda a: (means[a], -others.index(a)))
    comparison = paired_comparison(scores[best_tuned], scores[best_other])
    if comparison.significant:
        return best_tuned if comparison.delta > 0 else best_other
    return min((best_other, best_tuned), key=lambda a: usd.get(a, 0.0))


def replay(run: Path) -> dict:
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    recipe = load_recipe(run / "recipe.yaml")
    by_arm: dict[str, dict[str, float | None]] = defaultdict(dict)
    for line in (run / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_arm[row["arm"]][row["id"]] = row["score"]
    arms = [a for a in metrics["arms"] if a in by_arm]
    ids = [i for i in by_arm[arms[0]] if all(by_arm[a].get(i) is not None for a in arms)]
    scores = {a: [float(by_arm[a][i]) for i in ids] for a in arms}
    usd = {a: metrics["arms"][a]["usd_per_1m_queries"] / 1e6 for a in arms}
    score_range = metrics.get("primary_range") or (0.0, 1.0)
    facts = {a: ArmFacts(scores[a], usd[a], is_tuned_arm(a), metrics["arms"][a].get("latency_ms_p50"),
                         metrics["arms"][a].get("latency_ms_p95")) for a in arms}
    verdict = decide_verdict(facts, margin_points=recipe.eval.margin, score_range=score_range, seed=recipe.eval.seed)
    means = {a: round(to_points(sum(v) / len(v), score_range), 1) for a, v in scores.items()}
    return {"run": run.name, "n": len(ids), "points": means, "previous_recommendation": previous_rule(scores, usd),
            "recommended": verdict["recommended"], "winner": verdict["winner"], "n_needed": verdict["n_needed"],
            "headline": verdict["headline"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [replay(run) for run in args.runs]
    for row in rows:
        print(f"{row['run']} (n={row['n']}): {row['points']}\n  before: use {row['previous_recommendation']}\n"
              f"  now:    {row['headline']}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
