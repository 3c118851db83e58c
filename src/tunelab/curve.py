"""`tunelab curve`: quality against the number of training examples, and what doubling them would buy.

Reads a recipe. Writes `<out_dir>/<name>-curve/`:
  reference/        a run folder without training: data/ is prepared here once (the same split
                    `tunelab run` makes from this recipe) and eval/ holds the prompt-only arms of the
                    recipe (base, prompt, rag) on the whole training pool, the line to beat
  fraction-<f>/     one run folder per fraction: data/ holds the first k examples of a seeded
                    permutation of the training split (so every smaller set is inside the larger) with
                    valid and test copied unchanged; train/, adapter/ (or model/) as `tunelab train`
                    writes them, trained with the recipe's own train settings; eval/ holds the tuned arm
  curve.json        the points, the reference and the projection (the `Curve` model below)
  curve.png, curve.html, curve.md   the plot, and a self-contained page and a markdown summary

The projection fits the tuned score against log2(examples) by least squares: the slope is the gain
from doubling the data. Its 95% interval comes from a bootstrap over test examples (the test set is
the same for every point, so each resample is applied to all points at once). The verdict is "flat"
when that interval reaches 0, the gain is under FLAT_GAIN_POINTS, or the curve levelled off (its last
step is under FLAT_GAIN_POINTS and clearly below the fit); docs/curve.md states the rule for users.
Points are of the primary's declared range (eval/metrics.json `primary_range`, [0, 1] when absent), so
a 1-10 judge is judged on the same scale as a 0-1 metric.

Each point also says whether its own verdict was provisional (the tuned model still learning at that
size, eval/undertrained.py) and how it was trained per example (train/plan.json: passes over its
examples and what limited them); the curve says whether every point got the same training per example
(`training_policy`), since a budget that cuts the larger points' passes bends the curve down.
"""

from __future__ import annotations

import html
import json
import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from tunelab.console import say
from tunelab.contract import DataFingerprint, Metrics, TrainPlan, TrainSummary
from tunelab.errors import ConfigError, DataError
from tunelab.files import write_text_atomic

if TYPE_CHECKING:  # the CLI imports this module for its defaults: keep it light
    import numpy as np
    from transformers import PreTrainedTokenizerBase

    from tunelab.config import Recipe
    from tunelab.data.prepare import PreparedData
    from tunelab.runs import RunPaths

DEFAULT_FRACTIONS = (0.25, 0.5, 1.0)
FLAT_GAIN_POINTS = 1.0  # a doubling that buys less than one point of the primary's range is not worth collecting data for
SAME_PASSES = 0.05  # points whose passes over their examples differ by under 5% got the same training per example
CURVE_VERSION = 1
_TURN = "/turn-"  # prepare's per-turn fallback ids: "<example id>/turn-<k>"


class CurvePoint(BaseModel):
    fraction: float
    examples: int  # training examples of this point
    run_dir: str  # relative to the curve folder
    primary: float  # tuned arm, mean primary metric on the test set
    ci95: tuple[float, float]  # percentile bootstrap over test examples
    train_sample: float | None  # tuned arm on a sample of its own training examples (low: undertrained)
    train_steps: int
    train_time_s: float
    seconds: float  # training and evaluation of this point, wall clock
    provisional: bool | None = None  # its verdict was provisional: the tuned model was still learning at this size
    provisional_reason: str | None = None
    epochs: float | None = None  # passes over its examples (train/plan.json)
    limited_by: str | None = None  # what decided its length: data, budget or max_steps (train/plan.json)
    budget_reached: bool | None = None  # the budget's hard stop ended its training before the plan did


class Reference(BaseModel):
    """The best prompt-only arm (base, prompt, rag), evaluated once with the whole training pool."""

    arm: str
    primary: float
    ci95: tuple[float, float]
    prompt_tokens_mean: float
    arms: dict[str, float]  # every prompt-only arm evaluated: its mean primary metric


class Projection(BaseModel):
    from_examples: int
    to_examples: int  # twice from_examples
    gain: float  # fitted slope per doubling of the examples, in score units (0.01 = one point of a 0-1 score)
    gain_ci95: tuple[float, float]
    projected: float  # fitted score at to_examples
    projected_ci95: tuple[float, float]
    last_gain: float  # slope per doubling between the two largest points alone
    last_gain_ci95: tuple[float, float]
    levelled_off: bool  # the last step is under FLAT_GAIN_POINTS and clearly below the fit: the fit overstates
    flat: bool
    text: str


class Curve(BaseModel):
    version: int = CURVE_VERSION
    name: str
    model: str
    primary_metric: str
    train_pool: int  # examples in the training split, the whole of which fraction 1 trains on
    seed: int  # of the permutation that orders the training split
    test_file: str
    test_examples: int
    points: list[CurvePoint]
    reference: Reference | None
    projection: Projection
    primary_range: tuple[float, float] = (0.0, 1.0)  # the primary's declared range; points are of it
    same_training_policy: bool | None = None  # every point got the same passes per example, none cut by the budget
    training_policy: str | None = None  # that, or how the points differ, in words


# ---------------------------------------------------------------------------------------------- inputs


def parse_fractions(text: str) -> tuple[float, ...]:
    """`0.25,0.5,1` -> (0.25, 0.5, 1.0): at least two, each in (0, 1], increasing, no repeats."""
    fractions = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"--fractions: {part.strip()!r} is not a number (give e.g. 0.25,0.5,1)") from None
        if not 0 < value <= 1:  # also refuses nan
            raise ConfigError(f"--fractions: {part.strip()} is not in (0, 1]: each is a share of the training split")
        fractions.append(value)
    if len(fractions) < 2:
        raise ConfigError("--fractions: give at least two, e.g. 0.25,0.5,1 (a curve needs two points)")
    for before, after in zip(fractions, fractions[1:], strict=False):
        if after <= before:
            problem = "repeats" if after == before else "is not increasing"
            raise ConfigError(f"--fractions: {text} {problem}: list each fraction once, smallest first")
    return tuple(fractions)


def nested_subsets(pool_size: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Indices into the training split for each fraction: the first k of one seeded permutation, so
    every smaller subset is inside the larger ones. Each list is sorted (file order)."""
    order = list(range(pool_size))
    random.Random(seed).shuffle(order)
    sizes = [round(f * pool_size) for f in fractions]
    for fraction, size in zip(fractions, sizes, strict=True):
        if size < 1:
            raise ConfigError(f"--fractions: {fraction:g} of {pool_size} training examples is no example; "
                              "use larger fractions or more data")
    for (f1, s1), (f2, s2) in zip(zip(fractions, sizes, strict=True), zip(fractions[1:], sizes[1:], strict=True),
                                  strict=False):
        if s1 == s2:
            raise ConfigError(f"--fractions: {f1:g} and {f2:g} of {pool_size} training examples are both {s1} examples; "
                              "choose fractions further apart")
    return [sorted(order[:size]) for size in sizes]


# ---------------------------------------------------------------------------------------------- projection


def project_doubling(examples: Sequence[int], scores: np.ndarray, seed: int = 0, resamples: int | None = None,
                     score_range: Sequence[float] | None = None) -> Projection:
    """Least-squares fit of the mean score against log2(examples); the slope is the gain per doubling.

    `scores` holds per-example test scores, one row per point, the same test examples in the same
    order in every row. The intervals resample test examples (the same resample for every point).
    `score_range` is the primary's declared range (None: 0-1); the texts and the flat rule use its points.
    """
    import numpy as np

    from tunelab.eval.metrics import BOOTSTRAP_RESAMPLES, delta_points, to_points

    scores = np.asarray(scores, dtype=np.float64)
    x = np.log2(np.asarray(examples, dtype=np.float64))
    if scores.ndim != 2 or scores.shape[0] != len(x) or len(x) < 2 or scores.shape[1] == 0:
        raise ValueError(f"need per-example scores of at least two points, got shape {scores.shape} for {len(x)} sizes")
    centred = x - x.mean()
    x_next = x.max() + 1.0

    def fit(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """means: (..., points) -> (slope, score at x_next)."""
        slope = (means - means.mean(axis=-1, keepdims=True)) @ centred / (centred @ centred)
        return slope, means.mean(axis=-1) + slope * (x_next - x.mean())

    def last_step(means: np.ndarray) -> np.ndarray:
        return (means[..., -1] - means[..., -2]) / (x[-1] - x[-2])

    means = scores.mean(axis=1)
    gain, projected = fit(means)
    last_gain = last_step(means)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, scores.shape[1], size=(resamples or BOOTSTRAP_RESAMPLES, scores.shape[1]))
    # one point at a time: a resample table of every point at once can outgrow memory on a large test set
    boot_means = np.stack([row[picks].mean(axis=1) for row in scores], axis=1)
    boot_gain, boot_projected = fit(boot_means)
    boot_last = last_step(boot_means)

    def interval(values: np.ndarray) -> tuple[float, float]:
        return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))

    gain_ci, projected_ci, last_ci = interval(boot_gain), interval(boot_projected), interval(boot_last)
    # Learning curves bend: a straight fit over all points can promise a gain the last step no longer
    # shows. The last step overrides the fit when it is small and clearly below it (paired resamples).
    def points(value: float) -> float:
        return delta_points(value, score_range)

    levelled_off = bool(len(x) > 2 and points(last_gain) < FLAT_GAIN_POINTS and interval(boot_gain - boot_last)[0] > 0)
    largest = int(max(examples))
    flat = bool(gain_ci[0] <= 0.0 or points(gain) < FLAT_GAIN_POINTS or levelled_off)

    def shown(value: float, ci: tuple[float, float]) -> str:
        return (f"{points(value):+.1f} points per doubling of the examples, 95% CI [{points(ci[0]):+.1f}, "
                f"{points(ci[1]):+.1f}]")

    if levelled_off:
        text = (f"flat: more of the same data will not help (the curve has levelled off: the last step gained "
                f"{shown(last_gain, last_ci)}, below the fit over all points, {points(gain):+.1f})")
    elif flat:
        text = f"flat: more of the same data will not help ({shown(gain, gain_ci)})"
    else:
        # a log-linear fit does not know scores end at the top: past it, say so instead of printing 104%
        top = to_points(projected, score_range)
        to = f"to about {top:.1f}" if top <= 100.0 else "the fit reaches the top of the scale"
        text = (f"doubling the training data ({largest} -> {2 * largest} examples) is projected to gain "
                f"{points(gain):+.1f} points, 95% CI [{points(gain_ci[0]):+.1f}, {points(gain_ci[1]):+.1f}] ({to})")
    return Projection(
        from_examples=largest, to_examples=2 * largest, gain=float(gain), gain_ci95=gain_ci,
        projected=float(projected), projected_ci95=projected_ci, last_gain=float(last_gain), last_gain_ci95=last_ci,
        levelled_off=levelled_off, flat=flat, text=text,
    )


# ---------------------------------------------------------------------------------------------- points


def _base_id(row_id: str) -> str:
    return row_id.split(_TURN, 1)[0]


def _write_subset(source: Path, target: Path, keep_ids: set[str]) -> None:
    """The lines of a prepared JSONL file whose example is in keep_ids, byte for byte."""
    with source.open(encoding="utf-8") as f, target.open("w", encoding="utf-8") as out:
        for line in f:
            if line.strip() and _base_id(json.loads(line)["id"]) in keep_ids:
                out.write(line)


def _point_data(prepared: PreparedData, keep_ids: set[str], out_dir: Path) -> None:
    """A run's data/ folder: the training subset, the validation and test splits unchanged."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "train.tokens.jsonl"):
        _write_subset(prepared.out_dir / name, out_dir / name, keep_ids)
    for name in ("valid.jsonl", "valid.tokens.jsonl", "test.jsonl"):
        shutil.copyfile(prepared.out_dir / name, out_dir / name)


def _arm_scores(paths: RunPaths, arm: str) -> tuple[list[str], list[float]]:
    """Test ids and per-example primary scores of one arm, from eval/predictions.jsonl."""
    ids, scores = [], []
    with paths.predictions.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["arm"] == arm:
                ids.append(row["id"])
                scores.append(float(row["score"]))
    return ids, scores


def _run_point(
    recipe: Recipe, paths: RunPaths, tokenizer: PreTrainedTokenizerBase, prepared: PreparedData, keep_ids: set[str],
    resume: bool, resume_command: str | None,
) -> None:
    """One point: its data subset, training, the tuned arm's evaluation. With `resume`, what its
    folder already holds is kept: a finished evaluation, a finished training, complete checkpoints."""
    from tunelab.eval.run import evaluate
    from tunelab.train.run import train_on_examples
    from tunelab.train.start import start_run_dir, write_manifest

    resume = resume and paths.root.is_dir()  # a point new to this curve starts fresh
    start_run_dir(paths, recipe, resume)  # with resume: refuses a recipe that changed since
    if resume and paths.metrics.is_file():
        say(f"{paths.root.name}: evaluated earlier, kept")
        return
    if resume and paths.train_summary.is_file():
        say(f"{paths.root.name}: trained earlier, evaluating")
    else:
        write_manifest(paths, recipe, tokenizer, prepared.out_dir)
        _point_data(prepared, keep_ids, paths.data)
        train_rows = [row for row in prepared.tokenized("train") if _base_id(row["id"]) in keep_ids]
        train_on_examples(recipe, paths, tokenizer, train_rows, prepared.tokenized("valid"), resume=resume,
                          resume_command=resume_command)
    evaluate(paths.root, arms=["tuned"], echo=False, python_graders=True)  # the user's own recipe


def _read_point(paths: RunPaths, fraction: float, examples: int
                ) -> tuple[CurvePoint, str, list[str], list[float], tuple[float, float]]:
    """A finished point from its files -> (point, primary metric, test ids, per-example scores, the
    primary's declared range)."""
    summary = TrainSummary.from_file(paths.train_summary)
    metrics = Metrics.from_file(paths.metrics)
    plan = TrainPlan.from_file(paths.plan) if paths.plan.is_file() else None
    tuned = metrics.arms["tuned"]
    ids, scores = _arm_scores(paths, "tuned")
    point = CurvePoint(
        fraction=fraction, examples=examples, run_dir=paths.root.name, primary=tuned.primary,
        ci95=tuple(tuned.ci95), train_sample=metrics.overfitting.get("task_metric", {}).get("train_sample"),
        train_steps=summary.steps, train_time_s=round(summary.train_time_s, 1),
        seconds=round(summary.train_time_s + metrics.elapsed_s, 1),
        provisional=metrics.verdict.provisional, provisional_reason=metrics.verdict.provisional_reason,
        epochs=plan.epochs if plan else None, limited_by=plan.limited_by if plan else None,
        budget_reached=summary.budget_reached,
    )
    score_range = getattr(metrics, "primary_range", None) or (0.0, 1.0)  # absent in older runs
    return point, metrics.primary_metric, ids, scores, (float(score_range[0]), float(score_range[1]))


def describe_training_policy(points: Sequence[CurvePoint]) -> tuple[bool | None, str]:
    """Whether every point got the same training per example (the same passes over its examples, none
    cut by the budget), and in words how they differ when not."""
    if any(p.epochs is None for p in points):
        return None, "the training plan of some points is missing (train/plan.json): their training per example is unknown"
    cut = [p for p in points if p.limited_by == "budget" or p.budget_reached]
    passes = [p.epochs for p in points]
    same = not cut and max(passes) <= min(passes) * (1 + SAME_PASSES)
    if same:
        return True, (f"every point trained {points[0].epochs:.3g} passes over its examples: the same training per "
                      "example, so the curve shows the data's effect")

    def one(p: CurvePoint) -> str:
        why = " (cut by the budget)" if p in cut else f" ({p.limited_by})" if p.limited_by != "data" else ""
        return f"{p.examples} examples {p.epochs:.3g} passes{why}"

    text = ("the points differ in training per example: " + ", ".join(one(p) for p in points)
            + "; a point with fewer passes than the others shows less than its data can give")
    return False, text


def _reference(paths: RunPaths, arms: list[str], resume: bool) -> Reference:
    """The best prompt-only arm, evaluated once (kept from an earlier evaluation of the same arms with `resume`)."""
    from tunelab.eval.run import evaluate

    earlier = Metrics.read_keys(paths.metrics) or None if resume else None  # {} (no file yet): None
    if earlier is not None and set(earlier["arms"]) == set(arms):
        say(f"reference: {', '.join(arms)} evaluated earlier, kept")
        metrics = earlier
    else:
        say(f"reference: {', '.join(arms)}, no training")
        metrics = evaluate(paths.root, arms=arms, echo=False, python_graders=True)
    scored = metrics["arms"]
    best = max(arms, key=lambda arm: scored[arm]["primary"])
    return Reference(
        arm=best, primary=scored[best]["primary"], ci95=tuple(scored[best]["ci95"]),
        prompt_tokens_mean=scored[best]["prompt_tokens_mean"], arms={arm: scored[arm]["primary"] for arm in arms},
    )


# ---------------------------------------------------------------------------------------------- the curve


def curve_dir(recipe: Recipe) -> Path:
    return Path(recipe.out_dir) / f"{recipe.name}-curve"


def _folder_recipe(recipe: Recipe, root: Path, name: str) -> Recipe:
    # forgetting is a property of the final model (`tunelab run` measures it), not of each point
    evaluation = recipe.eval.model_copy(update={"forgetting": False})
    return recipe.model_copy(update={"name": name, "out_dir": str(root), "eval": evaluation})


def build_curve(
    recipe: Recipe, fractions: Sequence[float] = DEFAULT_FRACTIONS, resume: bool = False, resume_command: str | None = None,
) -> Curve:
    """Prepare once, evaluate the prompt-only reference, train and evaluate each fraction; write the
    curve folder (see the module docstring) and return what curve.json holds.

    `resume` continues an interrupted curve, or adds fractions to a finished one: finished points are
    kept (a fraction's subset depends only on the data, data.seed and the fraction), training
    continues from its newest complete checkpoint. `resume_command` is what an interrupted training
    tells the user to run."""
    from tunelab.config import TUNED_ARMS
    from tunelab.data.prepare import data_fingerprint, prepare_data
    from tunelab.models import load_tokenizer
    from tunelab.runs import RunPaths
    from tunelab.train.start import start_run_dir, write_manifest

    root = curve_dir(recipe)
    if not resume and root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} already exists; continue it or add fractions with --resume, or start a new curve "
                          "with name=NEW")
    if recipe.data.train is None:
        raise ConfigError("data.train is not set: the recipe names no training file")

    # --- data, prepared once: every point trains on a part of this train split and is tested on this test split
    reference_paths = RunPaths(root / "reference")
    reference_recipe = _folder_recipe(recipe, root, "reference")
    start_run_dir(reference_paths, reference_recipe, resume)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    if resume and reference_paths.data_fingerprint.is_file():
        earlier = DataFingerprint.from_file(reference_paths.data_fingerprint).sha256
        if earlier != data_fingerprint(reference_recipe.data, tokenizer)["sha256"]:
            raise ConfigError(f"{root}: the data or the data settings changed since this curve started, so its points "
                              "would not share a training pool; start a new curve with name=NEW")
    prepared = prepare_data(reference_recipe, tokenizer, reference_paths.data)
    write_manifest(reference_paths, reference_recipe, tokenizer, prepared.out_dir)
    pool = [row["id"] for row in prepared.conversations("train")]
    if not pool:
        raise DataError(f"{prepared.path('train')}: no training examples left after preparation")
    subsets = nested_subsets(len(pool), fractions, recipe.data.seed)
    say(f"learning curve: {', '.join(str(len(s)) for s in subsets)} of {len(pool)} training examples; "
        f"test set {prepared.path('test')}")

    # --- the line to beat: prompt-only arms with the whole training pool, evaluated once
    prompt_arms = [arm for arm in recipe.eval.arms if arm not in TUNED_ARMS]
    reference = _reference(reference_paths, prompt_arms, resume) if prompt_arms else None

    # --- one trained and evaluated run per fraction, all on the same test examples and metric
    points: list[CurvePoint] = []
    rows: list[list[float]] = []
    first: tuple[str, list[str]] | None = None  # the first point's primary metric and test ids
    score_range: tuple[float, float] = (0.0, 1.0)
    for number, (fraction, subset) in enumerate(zip(fractions, subsets, strict=True), start=1):
        name = f"fraction-{fraction:g}"
        say(f"[{number}/{len(fractions)}] {name}: {len(subset)} of {len(pool)} training examples")
        paths = RunPaths(root / name)
        _run_point(_folder_recipe(recipe, root, name), paths, tokenizer, prepared, {pool[i] for i in subset}, resume,
                   resume_command)
        point, metric, ids, scores, score_range = _read_point(paths, fraction, len(subset))
        if first is not None and ids != first[1]:
            raise DataError(f"{paths.predictions}: tested on other examples than {points[0].run_dir}")
        if first is not None and metric != first[0]:
            raise DataError(f"{paths.metrics}: scored by {metric}, {points[0].run_dir} by {first[0]}: the output "
                            "kind is read from the train answers too; use larger fractions")
        first = first or (metric, ids)
        points.append(point)
        rows.append(scores)

    import numpy as np

    projection = project_doubling([p.examples for p in points], np.array(rows), seed=recipe.eval.seed,
                                  score_range=score_range)
    same_policy, policy = describe_training_policy(points)
    curve = Curve(
        name=recipe.name, model=recipe.model.name, primary_metric=first[0] if first else "", train_pool=len(pool),
        seed=recipe.data.seed, test_file=str(prepared.path("test")), test_examples=len(rows[0]),
        points=points, reference=reference, projection=projection, primary_range=score_range,
        same_training_policy=same_policy, training_policy=policy,
    )
    write_curve(curve, root)
    return curve


# ---------------------------------------------------------------------------------------------- outputs


def _pct(value: float, score_range: Sequence[float] = (0.0, 1.0)) -> str:
    """A score as points of its range (0-100)."""
    from tunelab.eval.metrics import to_points

    return f"{to_points(value, score_range):.1f}"


def _pct_ci(value: float, ci: Sequence[float], score_range: Sequence[float] = (0.0, 1.0)) -> str:
    return f"{_pct(value, score_range)} [{_pct(ci[0], score_range)}, {_pct(ci[1], score_range)}]"


def _mark(point: CurvePoint) -> str:
    """' (provisional)' after a point whose tuned model was still learning."""
    return " (provisional)" if point.provisional else ""


def format_table(curve: Curve) -> str:
    """The console table: one line per point, the reference, then the projection sentence."""
    r = curve.primary_range
    score = f"tuned {curve.primary_metric} (%) [95% CI]"
    width = max(len(score), 20)
    header = f"{'examples':>8}  {score:<{width}}  {'train steps':>11}  {'seconds':>8}"
    lines = [header, "-" * len(header)]
    for p in curve.points:
        lines.append(f"{p.examples:>8}  {_pct_ci(p.primary, p.ci95, r):<{width}}  {p.train_steps:>11}  {p.seconds:>8.0f}"
                     f"{_mark(p)}")
    if curve.reference is not None:
        ref = curve.reference
        lines.append(f"reference: {ref.arm} (no training, all {curve.train_pool} examples) "
                     f"{_pct_ci(ref.primary, ref.ci95, r)}")
    lines.append(f"(n = {curve.test_examples} test examples, the same for every point)")
    if curve.training_policy:
        lines.append(f"training: {curve.training_policy}")
    lines.append(curve.projection.text)
    return "\n".join(lines)


def _figure(curve: Curve) -> Any:
    from tunelab.eval.metrics import delta_points, to_points
    from tunelab.report.plots import arm_color, new_figure, style_axes

    fig = new_figure(7.0, 3.8)
    ax = fig.add_subplot()
    style_axes(ax)
    r = curve.primary_range

    def pt(value: float) -> float:
        return to_points(value, r)

    def dp(difference: float) -> float:
        return delta_points(difference, r)

    xs = [p.examples for p in curve.points]
    ys = [pt(p.primary) for p in curve.points]
    low = [max(y - pt(p.ci95[0]), 0.0) for y, p in zip(ys, curve.points, strict=True)]
    high = [max(pt(p.ci95[1]) - y, 0.0) for y, p in zip(ys, curve.points, strict=True)]
    ax.errorbar(xs, ys, yerr=[low, high], color=arm_color("tuned"), marker="o", markersize=5, linewidth=1.6,
                capsize=3, label="tuned (95% interval)")
    proj = curve.projection
    tuned = arm_color("tuned")
    # the fitted line over the points, and one doubling past the largest unless the curve levelled off
    x_fit = [min(xs), max(xs) if proj.levelled_off else proj.to_examples]
    y_fit = [pt(proj.projected) - dp(proj.gain) * (math.log2(proj.to_examples) - math.log2(x)) for x in x_fit]
    ax.plot(x_fit, y_fit, color=tuned, linestyle="--", linewidth=1.0, label="fit on log2(examples)")
    if proj.levelled_off:
        # the last step, extended one doubling: what the verdict rests on
        y_end = ys[-1] + dp(proj.last_gain) * (math.log2(proj.to_examples) - math.log2(xs[-1]))
        ax.plot([xs[-1], proj.to_examples], [ys[-1], y_end], color=tuned, linestyle=":", linewidth=1.2)
        ax.plot([proj.to_examples], [y_end], "D", color="#ffffff", markeredgecolor=tuned,
                label="levelled off: the last step extended")
    else:
        ax.errorbar([proj.to_examples], [pt(proj.projected)],
                    yerr=[[max(dp(proj.projected - proj.projected_ci95[0]), 0.0)],
                          [max(dp(proj.projected_ci95[1] - proj.projected), 0.0)]],
                    fmt="D", color="#ffffff", markeredgecolor=tuned, ecolor=tuned, capsize=3,
                    label=f"projected at {proj.to_examples:,}" + (" (flat)" if proj.flat else ""))
    if curve.reference is not None:
        ref = curve.reference
        color = arm_color(ref.arm)
        ax.axhline(pt(ref.primary), color=color, linewidth=1.4, label=f"{ref.arm}, no training")
        ax.axhspan(pt(ref.ci95[0]), pt(ref.ci95[1]), color=color, alpha=0.12, linewidth=0)
    ax.set_xscale("log", base=2)
    ticks = [*xs, proj.to_examples]
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training examples (log scale)")
    ax.set_ylabel(f"{curve.primary_metric} (%)")
    ax.set_ylim(-5, 105)  # the whole scale: a flat curve must look flat, not zoomed into noise
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    return fig


def _provisional_lines(curve: Curve) -> list[str]:
    """Why each provisional point was provisional, and the training policy, as sentences."""
    lines = [f"Provisional at {p.examples} examples: {p.provisional_reason}" for p in curve.points
             if p.provisional and p.provisional_reason]
    if curve.training_policy:
        lines.append(f"Training: {curve.training_policy}.")
    return lines


def _markdown(curve: Curve) -> str:
    r = curve.primary_range
    lines = [f"# Learning curve: {curve.name}", "", f"**{curve.projection.text}**", "",
             f"Model {curve.model}; {curve.test_examples} test examples (the same for every point); "
             f"primary metric {curve.primary_metric}.", "",
             f"| examples | tuned {curve.primary_metric} (%) [95% CI] | train on own examples (%) | train steps | seconds |",
             "|---:|---|---:|---:|---:|"]
    for p in curve.points:
        sample = _pct(p.train_sample, r) if p.train_sample is not None else "—"
        lines.append(f"| {p.examples} | {_pct_ci(p.primary, p.ci95, r)}{_mark(p)} | {sample} | {p.train_steps} | "
                     f"{p.seconds:.0f} |")
    if curve.reference is not None:
        ref = curve.reference
        others = ", ".join(f"{arm} {_pct(value, r)}" for arm, value in ref.arms.items())
        lines += ["", f"Reference without training, all {curve.train_pool} examples as its pool: best {ref.arm} "
                      f"{_pct_ci(ref.primary, ref.ci95, r)}, {ref.prompt_tokens_mean:.0f} prompt tokens a query ({others})."]
    for sentence in _provisional_lines(curve):
        lines += ["", sentence]
    lines += ["", "The projection fits the score against log2(examples) and resamples the test examples for its "
                  "interval; it does not include the spread between training runs. See docs/curve.md.", ""]
    return "\n".join(lines)


def _html(curve: Curve, svg: str) -> str:
    r = curve.primary_range
    notes = "".join(f"<p>{html.escape(sentence)}</p>" for sentence in _provisional_lines(curve))
    table = "".join(
        f"<tr><td>{p.examples}</td><td>{_pct_ci(p.primary, p.ci95, r)}{_mark(p)}</td><td>{p.train_steps}</td>"
        f"<td>{p.seconds:.0f}</td><td>{html.escape(p.run_dir)}/</td></tr>" for p in curve.points
    )
    reference = ""
    if curve.reference is not None:
        ref = curve.reference
        reference = (f"<p>Reference without training: {html.escape(ref.arm)} {_pct_ci(ref.primary, ref.ci95, r)} with all "
                     f"{curve.train_pool} training examples as its pool.</p>")
    title = html.escape(f"Learning curve: {curve.name}")
    return (
        f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse}td,th{padding:.25rem .7rem;border-bottom:1px solid #ddd;text-align:right}"
        f"</style></head><body><h1>{title}</h1><p><strong>{html.escape(curve.projection.text)}</strong></p>{svg}"
        f"<table><tr><th>examples</th><th>tuned {html.escape(curve.primary_metric)} (%) [95% CI]</th>"
        f"<th>train steps</th><th>seconds</th><th>run</th></tr>{table}</table>{reference}{notes}"
        f"<p>Model {html.escape(curve.model)}; {curve.test_examples} test examples, the same for every point. The "
        "projection fits the score against log2(examples); its interval resamples the test examples and does not "
        "include the spread between training runs.</p></body></html>\n"
    )


def write_curve(curve: Curve, root: Path) -> None:
    """curve.png, curve.html, curve.md, then curve.json (last: its presence means the folder is complete)."""
    from tunelab.report.plots import to_svg

    fig = _figure(curve)
    fig.savefig(root / "curve.png", format="png", dpi=150, bbox_inches="tight")
    write_text_atomic(root / "curve.html", _html(curve, to_svg(fig, "learning-curve")))
    write_text_atomic(root / "curve.md", _markdown(curve))
    write_text_atomic(root / "curve.json", curve.model_dump_json(indent=1) + "\n")
