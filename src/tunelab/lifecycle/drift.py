"""`tunelab drift RUN NEW`: is a fine-tune stale on today's data?

Reads the run (recipe.yaml, data/train.jsonl, eval/metrics.json and eval/predictions.jsonl of its
own evaluation, adapter/ or model/) and the new examples (any data format; tunelab.lifecycle.new_data).
Writes RUN/drift/<UTC time>/: new.jsonl (the labelled new examples), eval/ (the run's tuned arm and
its best prompt-only arm on them, through tunelab.eval.run.evaluate with the run's settings),
rag-new-a/ and rag-new-b/ (the rag arm with the new examples in its pool, two folds so no example
retrieves itself), and drift.json (the `Drift` model below). Nothing of the run itself changes.

Labelled new examples: stale when the tuned arm's score on them is significantly below its score on
the run's own test set (two-sample, as the examples differ: the bootstrap interval of the difference
of means excludes 0 and the permutation p-value is below lineage.SIGNIFICANCE). Unlabelled inputs
(no final assistant message): stale when their wording has shifted away from the training inputs
(tunelab.lifecycle.shift).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from tunelab.console import say
from tunelab.eval.metrics import BOOTSTRAP_RESAMPLES, PERMUTATIONS, bootstrap_ci
from tunelab.lifecycle.lineage import (
    SIGNIFICANCE,
    arm_scores,
    evaluated_metrics,
    refuse_untrusted_graders,
    without_extras,
)
from tunelab.lifecycle.new_data import read_new_data, read_rows, user_text, write_rows
from tunelab.lifecycle.shift import measure_input_shift
from tunelab.runs import RunPaths, open_run

MIN_FOLD_EXAMPLES = 2  # the rag-with-new-examples arm needs two folds of at least this many


class Drift(BaseModel):
    """drift.json."""

    run: str
    new_file: str
    time_utc: str
    folder: str  # RUN/drift/<time_utc>, where this file and the scores behind it are
    stale: bool
    basis: str  # "labels": scores on the new examples; "inputs": input shift only
    n_labelled: int
    n_unlabelled: int
    primary_metric: str | None = None
    run_test: dict[str, Any] | None = None  # the run's own tuned score: {"n", "primary", "ci95"}
    new: dict[str, dict[str, Any]] = {}  # arm -> {"n", "primary", "ci95"} on the new examples
    tuned_change: dict[str, Any] | None = None  # two-sample comparison, new - run test
    input_shift: dict[str, Any] | None = None
    text: str


@dataclass(frozen=True)
class TwoSample:
    delta: float  # mean(a) - mean(b)
    ci95: tuple[float, float]
    p_value: float

    @property
    def significant(self) -> bool:
        return (self.ci95[0] > 0 or self.ci95[1] < 0) and self.p_value < SIGNIFICANCE


def two_sample_comparison(a: list[float], b: list[float], seed: int = 0) -> TwoSample:
    """Means of two independent samples: percentile bootstrap interval of the difference (each side
    resampled on its own) and a two-sided permutation p-value (labels shuffled between the sides)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    observed = float(x.mean() - y.mean())
    rng = np.random.default_rng(seed)
    diffs = (x[rng.integers(0, x.size, (BOOTSTRAP_RESAMPLES, x.size))].mean(axis=1)
             - y[rng.integers(0, y.size, (BOOTSTRAP_RESAMPLES, y.size))].mean(axis=1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    pooled = np.concatenate([x, y])
    permuted = rng.permuted(np.broadcast_to(pooled, (PERMUTATIONS, pooled.size)), axis=1)
    null = permuted[:, : x.size].mean(axis=1) - permuted[:, x.size :].mean(axis=1)
    extreme = int(np.sum(np.abs(null) >= abs(observed) - 1e-12))
    return TwoSample(observed, (float(lo), float(hi)), (extreme + 1) / (PERMUTATIONS + 1))


def _summary(scores: list[float], seed: int) -> dict[str, Any]:
    return {"n": len(scores), "primary": float(np.mean(scores)), "ci95": list(bootstrap_ci(scores, seed=seed))}


def _pct(summary: dict[str, Any]) -> str:
    lo, hi = summary["ci95"]
    return f"{100 * summary['primary']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _rag_with_new_pool(paths: RunPaths, out: Path, labelled: list[dict[str, Any]], settings: Any, seed: int,
                       trust_remote_code: bool) -> list[float]:
    """The rag arm with the new examples in its pool: two seeded folds, each scored with the other in the pool."""
    from tunelab.eval.run import evaluate

    order = list(range(len(labelled)))
    random.Random(seed).shuffle(order)
    folds = [[labelled[i] for i in order[::2]], [labelled[i] for i in order[1::2]]]
    train = read_rows(paths.data / "train.jsonl")
    scores: list[float] = []
    for label, scored, pooled in (("a", folds[0], folds[1]), ("b", folds[1], folds[0])):
        folder = out / f"rag-new-{label}"
        test_file = write_rows(folder / "test.jsonl", scored)
        pool_file = write_rows(folder / "pool.jsonl", train + pooled)
        evaluate(paths.root, arms=["rag"], test_file=test_file, recipe=settings, train_file=pool_file,
                 out_dir=folder, echo=False, trust_remote_code=trust_remote_code, python_graders=trust_remote_code)
        scores += list(arm_scores(folder, "rag").values())
    return scores


def drift(run_dir: str | Path, new_file: str | Path, *, trust_remote_code: bool = False) -> Drift:
    """Score the run on the new examples (or measure input shift) and write drift.json; see the module docstring.
    `trust_remote_code` (the user's --trust-remote-code, as for `tunelab eval`) lets the run's model code
    and python graders run."""
    from tunelab.eval.run import evaluate

    paths, recipe = open_run(run_dir, trust_remote_code)
    new = read_new_data(new_file, recipe.data.format, recipe.data.system_prompt)
    seed = recipe.eval.seed
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = paths.root / "drift" / stamp
    for again in range(2, 100):  # two checks within one second keep both
        if not out.exists():
            break
        out = paths.root / "drift" / f"{stamp}-{again}"
    train_rows = read_rows(paths.data / "train.jsonl")
    shift = measure_input_shift([user_text(r) for r in train_rows], [user_text(r) for r in new.all_rows], seed=seed)
    result: dict[str, Any] = {"run": str(paths.root), "new_file": str(new_file), "time_utc": stamp, "folder": str(out),
                              "n_labelled": len(new.labelled), "n_unlabelled": len(new.unlabelled),
                              "input_shift": shift.to_dict()}
    if not new.labelled:
        say(f"{new_file}: no labelled examples (no final assistant message): measuring input shift only")
        drift_result = Drift(**result, stale=shift.shifted, basis="inputs",
                             text=("stale: " if shift.shifted else "not stale: ") + shift.text)
        return _write(out, drift_result)

    metrics = evaluated_metrics(paths)
    refuse_untrusted_graders(paths, recipe, trust_remote_code)
    best_prompt_only = (metrics.get("verdict") or {}).get("vs")
    arms = ["tuned"] + ([best_prompt_only] if best_prompt_only else [])
    settings = without_extras(recipe)
    new_file_rows = write_rows(out / "new.jsonl", new.labelled)
    say(f"scoring {', '.join(arms)} on {len(new.labelled)} new examples")
    new_metrics = evaluate(paths.root, arms=arms, test_file=new_file_rows, recipe=settings, out_dir=out / "eval", echo=False,
                           trust_remote_code=trust_remote_code, python_graders=trust_remote_code)
    new_scores = {arm: list(arm_scores(out / "eval", arm).values()) for arm in arms}
    if len(new.labelled) >= 2 * MIN_FOLD_EXAMPLES:
        say("scoring rag with the new examples in its pool (two folds)")
        new_scores["rag+new"] = _rag_with_new_pool(paths, out, new.labelled, settings, seed, trust_remote_code)
    old_scores = list(arm_scores(paths.eval, "tuned").values())
    change = two_sample_comparison(new_scores["tuned"], old_scores, seed=seed)
    stale = change.significant and change.delta < 0
    summaries = {arm: _summary(scores, seed) for arm, scores in new_scores.items()}
    run_test = _summary(old_scores, seed)
    lo, hi = (100 * v for v in change.ci95)
    measured = (f"tuned {'fell' if change.delta < 0 else 'went'} from {_pct(run_test)} on the run's test to "
                f"{_pct(summaries['tuned'])} on the new examples ({100 * change.delta:+.1f} points, 95% CI "
                f"[{lo:+.1f}, {hi:+.1f}], p = {change.p_value:.3g})")
    others = [f"{'rag with the new examples in its pool' if arm == 'rag+new' else arm} {_pct(s)}"
              for arm, s in summaries.items() if arm != "tuned"]
    verdict = "stale" if stale else "not stale" + ("" if change.significant else " (no significant change)")
    primary = new_metrics["primary_metric"]
    note = "" if primary == metrics.get("primary_metric") else (
        f"; note: the new examples are scored with {primary}, the run's test with {metrics.get('primary_metric')}")
    text = f"{verdict}: {measured}" + (f"; on the new examples {', '.join(others)}" if others else "") + note
    text += f". Inputs: {shift.text}"
    drift_result = Drift(**result, stale=stale, basis="labels", primary_metric=primary, run_test=run_test,
                         new=summaries, text=text,
                         tuned_change={"delta_points": 100 * change.delta, "ci95_points": [lo, hi],
                                       "p_value": change.p_value, "significant": change.significant,
                                       "test": "two-sample: bootstrap of the difference of means, permutation p-value"})
    return _write(out, drift_result)


def _write(out: Path, result: Drift) -> Drift:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "drift.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(result.model_dump_json(indent=1), encoding="utf-8")
    tmp.replace(path)
    return result
