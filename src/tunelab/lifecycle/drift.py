"""`tunelab drift RUN NEW`: is a fine-tune stale on today's data?

Reads the run (recipe.yaml, data/train.jsonl, eval/metrics.json and eval/predictions.jsonl of its
own evaluation, adapter/ or model/) and the new examples (any data format; tunelab.lifecycle.new_data).
Writes RUN/drift/<UTC time>/: new.jsonl (the labelled new examples), eval/ (the run's tuned arm and
its best prompt-only arm on them, through tunelab.eval.run.evaluate with the run's settings),
rag-new-a/ and rag-new-b/ (the rag arm with the new examples in its pool, two folds so no example
retrieves itself), and drift.json (the `Drift` model below). Nothing of the run itself changes.

Labelled new examples: stale when the tuned arm lost significantly more on them than the run's best
prompt-only arm did on the same old and new examples (`judge_staleness`): the tuned arm's own change
(new minus the run's test; two-sample, as the examples differ) is significantly negative AND the
difference in differences (the tuned arm's change minus the prompt-only arm's) is too. Within each
set both arms answered the same examples, so the difference in differences is a two-sample
comparison of per-example differences (paired); where the arms' examples do not match, each of the
four samples is resampled on its own (unpaired). Significant: the bootstrap interval excludes 0 and
the p-value is below lineage.SIGNIFICANCE. New data that is harder for every arm is not staleness.
Without a prompt-only arm the tuned arm's change alone decides, as it did before. Unlabelled inputs
(no final assistant message): stale when their wording has shifted away from the training inputs
(tunelab.lifecycle.shift). Points are of the primary's declared range (eval/metrics.json
`primary_range`, [0, 1] when absent).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from tunelab.console import say
from tunelab.eval.metrics import BOOTSTRAP_RESAMPLES, PERMUTATIONS, bootstrap_ci, delta_points, to_points
from tunelab.lifecycle.lineage import (
    SIGNIFICANCE,
    arm_scores,
    evaluated_metrics,
    refuse_untrusted_graders,
    without_extras,
)
from tunelab.lifecycle.new_data import read_new_data, read_rows, user_text, write_rows
from tunelab.lifecycle.shift import measure_input_shift
from tunelab.runs import DriftPaths, RunPaths, open_run

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
    prompt_only_arm: str | None = None  # the run's best prompt-only arm (verdict.vs), scored on both sets
    prompt_only_change: dict[str, Any] | None = None  # its change, new - run test, as tuned_change
    difference_in_differences: dict[str, Any] | None = None  # tuned's change - prompt_only's change, with `paired`
    stale_basis: str | None = None  # "difference in differences" or "tuned change only" (no prompt-only arm)
    primary_range: list[float] | None = None  # the primary's declared range; points are of it


@dataclass(frozen=True)
class TwoSample:
    delta: float  # mean(a) - mean(b)
    ci95: tuple[float, float]
    p_value: float

    @property
    def significant(self) -> bool:
        return (self.ci95[0] > 0 or self.ci95[1] < 0) and self.p_value < SIGNIFICANCE


def two_sample_comparison(a: Sequence[float], b: Sequence[float], seed: int = 0,
                          resamples: int = BOOTSTRAP_RESAMPLES, permutations: int = PERMUTATIONS) -> TwoSample:
    """Means of two independent samples: percentile bootstrap interval of the difference (each side
    resampled on its own) and a two-sided permutation p-value (labels shuffled between the sides)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    observed = float(x.mean() - y.mean())
    rng = np.random.default_rng(seed)
    diffs = (x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1)
             - y[rng.integers(0, y.size, (resamples, y.size))].mean(axis=1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    pooled = np.concatenate([x, y])
    permuted = rng.permuted(np.broadcast_to(pooled, (permutations, pooled.size)), axis=1)
    null = permuted[:, : x.size].mean(axis=1) - permuted[:, x.size :].mean(axis=1)
    extreme = int(np.sum(np.abs(null) >= abs(observed) - 1e-12))
    return TwoSample(observed, (float(lo), float(hi)), (extreme + 1) / (permutations + 1))


def difference_in_differences(tuned_new: Mapping[str, float], tuned_old: Mapping[str, float],
                              other_new: Mapping[str, float], other_old: Mapping[str, float], seed: int = 0,
                              resamples: int = BOOTSTRAP_RESAMPLES,
                              permutations: int = PERMUTATIONS) -> tuple[TwoSample, bool]:
    """(tuned new - tuned old) - (other new - other old), and whether the examples were paired.
    Paired (both arms scored the same examples of each set): a two-sample comparison of the per-example
    differences tuned - other, new against old. Unpaired: each of the four samples resampled on its
    own, and a two-sided bootstrap p-value (twice the share of resamples on the far side of 0)."""
    if set(tuned_new) == set(other_new) and set(tuned_old) == set(other_old):
        new = [tuned_new[i] - other_new[i] for i in tuned_new]
        old = [tuned_old[i] - other_old[i] for i in tuned_old]
        return two_sample_comparison(new, old, seed, resamples, permutations), True
    rng = np.random.default_rng(seed)
    samples = [np.asarray(list(m.values()), dtype=np.float64) for m in (tuned_new, tuned_old, other_new, other_old)]
    means = [v[rng.integers(0, v.size, (resamples, v.size))].mean(axis=1) for v in samples]
    boot = (means[0] - means[1]) - (means[2] - means[3])
    observed = float((samples[0].mean() - samples[1].mean()) - (samples[2].mean() - samples[3].mean()))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    p_value = min(1.0, 2 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))) + 1 / resamples)
    return TwoSample(observed, (float(lo), float(hi)), p_value), False


def judge_staleness(tuned_new: Mapping[str, float], tuned_old: Mapping[str, float],
                    other_new: Mapping[str, float] | None, other_old: Mapping[str, float] | None, seed: int = 0,
                    resamples: int = BOOTSTRAP_RESAMPLES, permutations: int = PERMUTATIONS) -> dict[str, Any]:
    """The labelled-data rule of the module docstring on id -> score maps: {"stale", "basis", "tuned",
    "other", "did", "paired"} (TwoSample values; other/did None without a prompt-only arm)."""
    tuned = two_sample_comparison(list(tuned_new.values()), list(tuned_old.values()), seed, resamples, permutations)
    tuned_lost = tuned.significant and tuned.delta < 0
    if other_new is None or other_old is None:
        return {"stale": tuned_lost, "basis": "tuned change only", "tuned": tuned, "other": None, "did": None,
                "paired": None}
    other = two_sample_comparison(list(other_new.values()), list(other_old.values()), seed, resamples, permutations)
    did, paired = difference_in_differences(tuned_new, tuned_old, other_new, other_old, seed, resamples, permutations)
    return {"stale": tuned_lost and did.significant and did.delta < 0, "basis": "difference in differences",
            "tuned": tuned, "other": other, "did": did, "paired": paired}


def _change_record(change: TwoSample, score_range: Sequence[float] | None, test: str) -> dict[str, Any]:
    lo, hi = (delta_points(v, score_range) for v in change.ci95)
    return {"delta_points": delta_points(change.delta, score_range), "ci95_points": [lo, hi],
            "p_value": change.p_value, "significant": change.significant, "test": test}


def _summary(scores: list[float], seed: int) -> dict[str, Any]:
    return {"n": len(scores), "primary": float(np.mean(scores)), "ci95": list(bootstrap_ci(scores, seed=seed))}


def _pct(summary: dict[str, Any], score_range: Sequence[float] | None = None) -> str:
    lo, hi = (to_points(v, score_range) for v in summary["ci95"])
    return f"{to_points(summary['primary'], score_range):.1f}% [{lo:.1f}, {hi:.1f}]"


def _rag_with_new_pool(paths: RunPaths, check: DriftPaths, labelled: list[dict[str, Any]], settings: Any, seed: int,
                       trust_remote_code: bool) -> list[float]:
    """The rag arm with the new examples in its pool: two seeded folds, each scored with the other in the pool."""
    from tunelab.eval.run import evaluate

    order = list(range(len(labelled)))
    random.Random(seed).shuffle(order)
    folds = [[labelled[i] for i in order[::2]], [labelled[i] for i in order[1::2]]]
    train = read_rows(paths.data_split("train"))
    scores: list[float] = []
    for label, scored, pooled in (("a", folds[0], folds[1]), ("b", folds[1], folds[0])):
        folder = check.rag_fold(label)
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
    check = paths.drift_check(stamp)
    for again in range(2, 100):  # two checks within one second keep both
        if not check.root.exists():
            break
        check = paths.drift_check(f"{stamp}-{again}")
    train_rows = read_rows(paths.data_split("train"))
    shift = measure_input_shift([user_text(r) for r in train_rows], [user_text(r) for r in new.all_rows], seed=seed)
    result: dict[str, Any] = {"run": str(paths.root), "new_file": str(new_file), "time_utc": stamp, "folder": str(check.root),
                              "n_labelled": len(new.labelled), "n_unlabelled": len(new.unlabelled),
                              "input_shift": shift.to_dict()}
    if not new.labelled:
        say(f"{new_file}: no labelled examples (no final assistant message): measuring input shift only")
        drift_result = Drift(**result, stale=shift.shifted, basis="inputs",
                             text=("stale: " if shift.shifted else "not stale: ") + shift.text)
        return _write(check, drift_result)

    metrics = evaluated_metrics(paths)
    refuse_untrusted_graders(paths, recipe, trust_remote_code)
    best_prompt_only = (metrics.get("verdict") or {}).get("vs")
    arms = ["tuned"] + ([best_prompt_only] if best_prompt_only else [])
    settings = without_extras(recipe)
    new_file_rows = write_rows(check.new_examples, new.labelled)
    say(f"scoring {', '.join(arms)} on {len(new.labelled)} new examples")
    new_metrics = evaluate(paths.root, arms=arms, test_file=new_file_rows, recipe=settings, out_dir=check.eval, echo=False,
                           trust_remote_code=trust_remote_code, python_graders=trust_remote_code)
    new_scores = {arm: list(arm_scores(check.eval, arm).values()) for arm in arms}
    if len(new.labelled) >= 2 * MIN_FOLD_EXAMPLES:
        say("scoring rag with the new examples in its pool (two folds)")
        new_scores["rag+new"] = _rag_with_new_pool(paths, check, new.labelled, settings, seed, trust_remote_code)
    score_range = metrics.get("primary_range")  # absent in older runs: [0, 1]
    old_tuned = arm_scores(paths.eval, "tuned")
    new_tuned = arm_scores(check.eval, "tuned")
    old_other = arm_scores(paths.eval, best_prompt_only) if best_prompt_only else None
    new_other = arm_scores(check.eval, best_prompt_only) if best_prompt_only else None
    judged = judge_staleness(new_tuned, old_tuned, new_other, old_other, seed=seed)
    change, stale = judged["tuned"], judged["stale"]
    summaries = {arm: _summary(scores, seed) for arm, scores in new_scores.items()}
    run_test = _summary(list(old_tuned.values()), seed)
    two_sample = "two-sample: bootstrap of the difference of means, permutation p-value"
    tuned_change = _change_record(change, score_range, two_sample)
    lo, hi = tuned_change["ci95_points"]
    measured = (f"tuned {'fell' if change.delta < 0 else 'went'} from {_pct(run_test, score_range)} on the run's test "
                f"to {_pct(summaries['tuned'], score_range)} on the new examples ({tuned_change['delta_points']:+.1f} "
                f"points, 95% CI [{lo:+.1f}, {hi:+.1f}], p = {change.p_value:.3g})")
    extra: dict[str, Any] = {"stale_basis": judged["basis"], "primary_range": list(score_range or (0.0, 1.0))}
    if judged["did"] is not None:
        other_change = _change_record(judged["other"], score_range, two_sample)
        did_test = ("paired within each set: two-sample comparison of per-example differences tuned - "
                    f"{best_prompt_only}, new against old" if judged["paired"] else
                    "unpaired: the four samples resampled on their own, bootstrap p-value")
        did = {**_change_record(judged["did"], score_range, did_test), "paired": judged["paired"]}
        extra.update(prompt_only_arm=best_prompt_only, prompt_only_change=other_change, difference_in_differences=did)
        dlo, dhi = did["ci95_points"]
        measured += (f"; {best_prompt_only} changed {other_change['delta_points']:+.1f} points on the same examples, so "
                     f"tuned lost {-did['delta_points']:+.1f} points more than {best_prompt_only} (95% CI "
                     f"[{-dhi:+.1f}, {-dlo:+.1f}], p = {judged['did'].p_value:.3g})")
    others = [f"{'rag with the new examples in its pool' if arm == 'rag+new' else arm} {_pct(s, score_range)}"
              for arm, s in summaries.items() if arm != "tuned"]
    if stale:
        verdict = "stale"
    elif judged["did"] is not None and change.significant and change.delta < 0:
        verdict = f"not stale (the new examples are harder for {best_prompt_only} too)"
    else:
        verdict = "not stale" + ("" if change.significant else " (no significant change)")
    primary = new_metrics["primary_metric"]
    note = "" if primary == metrics.get("primary_metric") else (
        f"; note: the new examples are scored with {primary}, the run's test with {metrics.get('primary_metric')}")
    text = f"{verdict}: {measured}" + (f"; on the new examples {', '.join(others)}" if others else "") + note
    text += f". Inputs: {shift.text}"
    drift_result = Drift(**result, stale=stale, basis="labels", primary_metric=primary, run_test=run_test,
                         new=summaries, text=text, tuned_change=tuned_change, **extra)
    return _write(check, drift_result)


def _write(check: DriftPaths, result: Drift) -> Drift:
    check.root.mkdir(parents=True, exist_ok=True)
    path = check.result
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(result.model_dump_json(indent=1), encoding="utf-8")
    tmp.replace(path)
    return result
