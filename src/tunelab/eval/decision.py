"""The decision: which arm to use and how sure, from every arm's per-example primary scores.

Pure: reads nothing, writes nothing. eval/run.py hands it each arm's primary scores on the examples
every arm scored, its cost per query and its latency, and writes what it returns as eval/metrics.json
"verdict" (contract.Verdict). The procedure, written down for users in docs/evaluation.md ("The
decision"):

1. Fewer than MIN_TEST_EXAMPLES examples: no recommendation, "too few test examples to decide", with
   the test size a power estimate says would settle it.
2. Does fine-tuning beat prompting? Every fine-tuned arm against every prompt-only arm (external arms
   count as prompt-only: they are what the team would use instead), paired on the same examples. A
   fine-tuned arm wins when it beats *every* prompt-only arm with the bootstrap interval and the
   sign-flip test agreeing, at 5% split over the fine-tuned arms (Bonferroni, which is Holm's first
   step); the same the other way round. No arm is chosen by its test mean before it is tested, so
   picking the best of several arms on the same test set cannot manufacture a win.
3. What to use: the cheapest arm shown to be as good as *every* other arm within `eval.margin` points
   (non-inferiority: the lower end of the 95% interval of its difference with each other arm is above
   -margin and the one-sided sign-flip test agrees), among the arms within `eval.max_latency_ms`.
   Cheaper arms that were not shown to be as good are named, with the test size that would settle it.

Differences are reported as points of the primary's declared range (0-100), whatever its scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from tunelab.eval.metrics import BOOTSTRAP_RESAMPLES, PERMUTATIONS, delta_points, to_points

MIN_TEST_EXAMPLES = 10  # below this no sign-flip test can reach p < 0.05 reliably: no decision
ALPHA = 0.05  # two-sided, per claim (split over the arms of a side for "fine-tuning beats prompting")
POWER = 0.8  # for the "about N test examples would settle it" estimate
DEFAULT_MARGIN_POINTS = 2.0


@dataclass(frozen=True)
class ArmFacts:
    """What the decision knows about one arm."""

    scores: Sequence[float]  # primary score per example, the same examples in the same order for every arm
    usd_per_query: float  # serving cost (plus amortised training for fine-tuned arms, when asked)
    tuned: bool  # answered by fine-tuned weights (the other side: the base model prompted, external arms)
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    prompt_tokens_mean: float | None = None


@dataclass(frozen=True)
class Pair:
    """a against b on the same examples, in the primary's raw units."""

    a: str
    b: str
    delta: float  # mean of a - b
    sd: float  # standard deviation of the per-example differences
    ci95: tuple[float, float]  # percentile bootstrap of the mean difference
    p_value: float  # two-sided sign-flip permutation test of "no difference"
    p_noninferior: float  # one-sided sign-flip test of "a is worse than b by the margin or more"
    lower_adjusted: float  # lower end of the interval at the side claim's adjusted level
    upper_adjusted: float


class _Comparisons:
    """Every pair of arms from one set of bootstrap resamples and one set of sign flips, drawn once."""

    def __init__(self, scores: Mapping[str, np.ndarray], margin: float, alpha_side: float, seed: int,
                 resamples: int, permutations: int):
        n = len(next(iter(scores.values())))
        self.scores, self.margin, self.alpha_side, self.permutations = scores, margin, alpha_side, permutations
        indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
        self.resampled = {arm: values[indices].mean(axis=1) for arm, values in scores.items()}
        signs = np.random.default_rng(seed + 1).integers(0, 2, size=(permutations, n)).astype(np.float64) * 2 - 1
        # a flip of a pair's differences is linear in the arms' scores: one product per arm, not per pair
        self.flipped = {arm: signs @ values / n for arm, values in scores.items()}
        self.flipped_ones = signs.sum(axis=1) / n
        self._cache: dict[tuple[str, str], Pair] = {}

    def __call__(self, a: str, b: str) -> Pair:
        if (a, b) not in self._cache:
            self._cache[(a, b)] = self._compare(a, b)
        return self._cache[(a, b)]

    def _compare(self, a: str, b: str) -> Pair:
        diffs = self.scores[a] - self.scores[b]
        n = diffs.size
        observed = float(diffs.mean())
        boot = self.resampled[a] - self.resampled[b]
        tail = self.alpha_side / 2 * 100
        flipped = self.flipped[a] - self.flipped[b]
        # >= with a small tolerance: all-zero differences give p = 1, not a float-noise artefact
        p_value = (int(np.sum(np.abs(flipped) >= abs(observed) - 1e-12)) + 1) / (self.permutations + 1)
        flipped_shifted = flipped + self.margin * self.flipped_ones  # the flips of (diffs + margin)
        p_noninferior = (int(np.sum(flipped_shifted >= observed + self.margin - 1e-12)) + 1) / (self.permutations + 1)
        low, high, low_adjusted, high_adjusted = np.percentile(boot, [2.5, 97.5, tail, 100 - tail])
        return Pair(
            a, b, observed, float(diffs.std(ddof=1)) if n > 1 else 0.0, (float(low), float(high)), p_value,
            p_noninferior, float(low_adjusted), float(high_adjusted),
        )

    def noninferior(self, a: str, b: str) -> bool:
        """a is shown to be no worse than b by the margin: interval and one-sided test agree."""
        pair = self(a, b)
        return pair.ci95[0] > -self.margin and pair.p_noninferior < ALPHA / 2

    def superior(self, a: str, b: str) -> bool:
        """a is shown to beat b at the side claim's adjusted level: interval and test agree."""
        pair = self(a, b)
        return pair.delta > 0 and pair.lower_adjusted > 0 and pair.p_value < self.alpha_side


def examples_needed(delta: float, sd: float, margin: float = 0.0) -> int | None:
    """About how many paired examples show `delta + margin > 0` with 80% power at 5% two-sided (normal
    approximation of the paired test); None when the observed effect points the other way."""
    effect = delta + margin
    if effect <= 0:
        return None
    z = NormalDist().inv_cdf(1 - ALPHA / 2) + NormalDist().inv_cdf(POWER)
    if sd <= 0:
        return MIN_TEST_EXAMPLES
    return max(MIN_TEST_EXAMPLES, math.ceil((z * sd / effect) ** 2))


def decide_verdict(
    arms: Mapping[str, ArmFacts], *, margin_points: float = DEFAULT_MARGIN_POINTS,
    score_range: Sequence[float] = (0.0, 1.0), max_latency_ms: float | None = None, seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES, permutations: int = PERMUTATIONS,
) -> dict[str, Any]:
    """eval/metrics.json "verdict" from every arm's scores (in the arms' display order). `resamples` and
    `permutations` set the Monte Carlo precision of the intervals and p-values, not the rule."""
    tuned = [a for a, facts in arms.items() if facts.tuned]
    others = [a for a, facts in arms.items() if not facts.tuned]
    low, high = score_range
    width = high - low
    margin = margin_points / 100 * width
    base = {"margin": margin_points, "n": None, "n_needed": None, "as_good": [], "recommended_reason": None,
            "headline": None, "selection": None, "usd_per_1k_requests": {a: f.usd_per_query * 1000 for a, f in arms.items()}}
    if not tuned or not others:
        missing = "fine-tuned" if not tuned else "prompt-only"
        text = f"no verdict: no {missing} arm was evaluated"
        return {**base, "best_arm": None, "vs": None, "delta": None, "ci95": None, "p_value": None, "winner": None,
                "recommended": None, "significant": False, "text": text, "headline": text,
                "recommended_reason": text}

    scores = {a: np.asarray(f.scores, dtype=np.float64) for a, f in arms.items()}
    n = len(next(iter(scores.values())))
    means = {a: float(v.mean()) if v.size else 0.0 for a, v in scores.items()}
    # the pair shown (descriptive): the best mean of each side; ties go to the arm listed first
    best_tuned = max(tuned, key=lambda a: (means[a], -tuned.index(a)))
    best_other = max(others, key=lambda a: (means[a], -others.index(a)))
    if n == 0:
        text = "no verdict: no test example was scored by every arm"
        return {**base, "best_arm": best_tuned, "vs": best_other, "delta": None, "ci95": None, "p_value": None,
                "winner": None, "recommended": None, "significant": False, "text": text, "headline": text,
                "recommended_reason": text, "n": 0}

    compare = _Comparisons(scores, margin, ALPHA / max(len(tuned), len(others)), seed, resamples, permutations)
    shown = compare(best_tuned, best_other)
    points = lambda value: delta_points(value, score_range)  # noqa: E731 - one conversion, read inline below
    verdict: dict[str, Any] = {
        **base, "n": n, "best_arm": best_tuned, "vs": best_other, "delta": shown.delta / width,
        "delta_points": points(shown.delta), "ci95": [shown.ci95[0] / width, shown.ci95[1] / width],
        "p_value": shown.p_value,
        "selection": (f"every fine-tuned arm ({', '.join(tuned)}) against every prompt-only arm ({', '.join(others)}) "
                      f"on the same {n} examples; a side wins only by beating every arm of the other side, at "
                      f"5% split over its {max(len(tuned), len(others))} arms (Bonferroni); the pair shown is the "
                      "best mean of each side"),
        "means_points": {a: to_points(m, score_range) for a, m in means.items()},
    }

    # --- 1. too few examples
    if n < MIN_TEST_EXAMPLES:
        needed = examples_needed(abs(shown.delta), shown.sd) or MIN_TEST_EXAMPLES
        text = (f"too few test examples to decide (n={n}, need about {needed}): {best_tuned} vs {best_other} "
                f"{points(shown.delta):+.1f} points")
        return {**verdict, "winner": None, "recommended": None, "significant": False, "n_needed": needed,
                "text": text, "headline": f"Too few test examples to decide (n={n}; about {needed} would settle it).",
                "recommended_reason": text}

    # --- 2. does fine-tuning beat prompting (every pair, multiplicity-adjusted)
    tuned_winners = [t for t in tuned if all(compare.superior(t, o) for o in others)]
    other_winners = [o for o in others if all(compare.superior(o, t) for t in tuned)]
    if tuned_winners:
        winner = min(tuned_winners, key=lambda a: (arms[a].usd_per_query, tuned.index(a)))  # the cheapest
        closest = compare(winner, best_other)
        side_text = (f"fine-tuning beats the best prompt-only approach by {points(closest.delta):.1f} points, 95% CI "
                     f"[{points(closest.ci95[0]):.1f}, {points(closest.ci95[1]):.1f}] ({winner} vs {best_other}, "
                     f"p = {closest.p_value:.4f})")
        verdict.update(best_arm=winner, delta=closest.delta / width, delta_points=points(closest.delta),
                       ci95=[closest.ci95[0] / width, closest.ci95[1] / width], p_value=closest.p_value)
    elif other_winners:
        winner = min(other_winners, key=lambda a: (arms[a].usd_per_query, others.index(a)))
        closest = compare(winner, best_tuned)
        side_text = (f"the best prompt-only approach beats fine-tuning by {points(closest.delta):.1f} points, 95% CI "
                     f"[{points(closest.ci95[0]):.1f}, {points(closest.ci95[1]):.1f}]: prefer prompting ({winner} vs "
                     f"{best_tuned}, p = {closest.p_value:.4f})")
        verdict.update(vs=winner, delta=-closest.delta / width, delta_points=-points(closest.delta),
                       ci95=[-closest.ci95[1] / width, -closest.ci95[0] / width], p_value=closest.p_value)
    else:
        winner = None
        side_text = (f"no significant difference between fine-tuning and prompting ({best_tuned} vs {best_other} "
                     f"{points(shown.delta):+.1f} points, 95% CI [{points(shown.ci95[0]):.1f}, "
                     f"{points(shown.ci95[1]):.1f}], p = {shown.p_value:.4f})")

    # --- 3. what to use: the cheapest arm shown as good as every other arm; else, when a side won, the
    # cheapest of its winners that no other winner beats by more than the margin; else nothing yet
    names = list(arms)
    as_good = [a for a in names if all(compare.noninferior(a, b) for b in names if b != a)]
    too_slow = [a for a in names if max_latency_ms is not None and (arms[a].latency_ms_p95 or 0.0) > max_latency_ms]
    by_cost = sorted(names, key=lambda a: (arms[a].usd_per_query, arms[a].latency_ms_p50 or 0.0, names.index(a)))
    eligible = [a for a in by_cost if a not in too_slow]
    recommended = next((a for a in eligible if a in as_good), None)
    side_winners = tuned_winners or other_winners
    by_side = False
    if recommended is None and side_winners:
        recommended = next((a for a in eligible if a in side_winners and not any(
            compare(a, w).ci95[1] < -margin for w in side_winners if w != a)), None)
        by_side = recommended is not None
    cheaper = eligible[: eligible.index(recommended)] if recommended else eligible
    # cheaper arms not shown as good while still open (not shown worse by more than the margin either): the
    # weakest comparison of each, and about how many examples would settle it one way or the other
    shortfalls = []
    for arm in cheaper:
        if arm in as_good:
            continue
        worst = min((compare(arm, b) for b in names if b != arm and not compare.noninferior(arm, b)),
                    key=lambda p: p.ci95[0])
        if worst.ci95[1] > -margin:
            shortfalls.append((arm, worst, examples_needed(abs(worst.delta + margin), worst.sd)))
    n_needed = min((need for _, _, need in shortfalls if need is not None), default=None)
    verdict.update(as_good=as_good, too_slow=too_slow, winner=winner, recommended=recommended,
                   significant=winner is not None, n_needed=n_needed)

    usd_1k = verdict["usd_per_1k_requests"]
    price = lambda arm: format_usd(usd_1k[arm])  # noqa: E731
    if recommended is not None:
        best_overall = max(names, key=lambda a: (means[a], -names.index(a)))
        if by_side:
            others_won = [w for w in side_winners if w != recommended]
            reason = (f"{recommended} beats every {'prompt-only' if arms[recommended].tuned else 'fine-tuned'} arm and "
                      f"is the cheapest arm that does"
                      + (f" ({', '.join(others_won)} not shown better by more than {margin_points:g} points)"
                         if others_won else ""))
        elif means[recommended] >= means[best_overall]:
            # "as good" is one-sided: no other arm is better by more than the margin (the recommended arm may be
            # far better); "within N points of every arm" read as "about equal to all" beside a 17-point lead
            reason = (f"{recommended} scores best ({to_points(means[recommended], score_range):.1f} points) and is "
                      f"shown to be no more than {margin_points:g} points worse than any other arm")
        else:
            vs_best = compare(recommended, best_overall)
            reason = (f"{recommended} is as good as the best arm ({best_overall}) within {margin_points:g} points "
                      f"({points(vs_best.delta):+.1f}, 95% CI [{points(vs_best.ci95[0]):.1f}, "
                      f"{points(vs_best.ci95[1]):.1f}]) and is the cheapest arm that is")
        headline = f"Use {recommended}: {reason}, at {price(recommended)} per 1k requests"
        dearer = [a for a in names if a != recommended and usd_1k[a] > usd_1k[recommended]]
        if dearer:
            alternative = max(dearer, key=lambda a: (means[a], -names.index(a)))
            headline += f" ({alternative}: {price(alternative)})"
        headline += "."
    else:
        reason = (f"no arm is shown to be no more than {margin_points:g} points worse than every other arm"
                  + (f" and within eval.max_latency_ms={max_latency_ms:g}" if too_slow else ""))
        headline = f"No arm can be recommended yet: {reason}"
        headline += f"; about {n_needed} test examples would settle it." if n_needed else "."
    for arm, worst, need in shortfalls[:2]:
        # cheaper than the recommendation, or (none recommended) simply the cheapest arms still open
        status = f"is cheaper ({price(arm)} per 1k) but" if recommended else f"({price(arm)} per 1k) is"
        headline += (f" {arm} {status} not shown to be as good as {worst.b} "
                     f"({points(worst.delta):+.1f}, 95% CI [{points(worst.ci95[0]):.1f}, {points(worst.ci95[1]):.1f}])"
                     + (f"; about {need} test examples would settle it." if need else "."))
    if too_slow:
        headline += f" Over eval.max_latency_ms ({max_latency_ms:g} ms at p95): {', '.join(too_slow)}."
    verdict.update(recommended_reason=reason, headline=headline, text=f"{headline} {_capitalised(side_text)}.")
    return verdict


def format_usd(value: float) -> str:
    """$12.35, $0.095, $0.0021: two significant digits below a dollar (the verdict and the report)."""
    return f"${value:,.2f}" if value >= 1 else f"${value:.2g}"


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]
