"""Adapter scale (WiSE-FT): the tuned LoRA model at several scales on the validation split, and the one
the run keeps.

Scaling a LoRA adapter's update between 0 (the base model) and 1 (the fine-tune as trained) trades task
score against general ability along one curve. For each scale of eval.adapter_scales the tuned model
answers the validation examples (scored with the task metric) and the general probes and text
(eval/forgetting.py: retention and perplexity against the base model); the scale is set in place on the
one loaded model (runs.set_adapter_scale), nothing is reloaded. eval.forgetting_policy picks one
(`choose_scale`, a pure function). Reads data/valid.jsonl of the run; writes nothing (eval/run.py writes
eval/adapter_scale.json, which runs.load_run_model applies for the tuned arm, chat, serve and export).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.contract import AdapterScale, ScaleCandidate
from tunelab.engine.generate import DecodingSettings, generate
from tunelab.eval.arms import EvalExample, PromptBuilder
from tunelab.eval.forgetting import (
    GeneralAbility,
    compare_general_ability,
    known_outcomes,
    measure_general_ability,
)
from tunelab.eval.metrics import OutputKind, score_outputs
from tunelab.runs import set_adapter_scale

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SEARCH_MAX_EXAMPLES = 64  # validation examples answered per scale: enough to rank scales, cheap beside the test set
SCALED_METHODS = ("lora", "qlora")  # DoRA's magnitude vector is not interpolated by scaling; full has no adapter


def within_threshold(retention: float | None, perplexity_change: float | None, threshold: float) -> bool:
    """General ability kept: retention of the base model's known probes and perplexity within the threshold."""
    tolerance = 1e-9  # 1 - 0.95 is 0.0500000000000000444 in floats: exactly at the threshold is within it
    return ((retention is None or 1 - retention <= threshold + tolerance)
            and (perplexity_change is None or perplexity_change <= threshold + tolerance))


def retention_gain(kept_at: Sequence[float], kept_ref: Sequence[float]) -> tuple[int, int]:
    """One scale against another on the same known probes (1 = still known): the probes the first keeps and
    the other lost, and the reverse (the probes both keep or both lose say nothing about which keeps more)."""
    gained = sum(1 for a, r in zip(kept_at, kept_ref, strict=True) if a >= 1.0 > r)
    lost = sum(1 for a, r in zip(kept_at, kept_ref, strict=True) if r >= 1.0 > a)
    return gained, lost


def choose_scale(candidates: Sequence[ScaleCandidate], policy: str, threshold: float, metric: str,
                 max_task_loss: float = 3.0, probes_kept: Mapping[float, Sequence[float]] | None = None) -> tuple[float, str]:
    """The scale eval.forgetting_policy keeps, and why in one sentence. Ties on the task score go to the
    larger scale (closer to the fine-tune as trained): a validation set of a few dozen examples cannot tell a
    tie from a loss (orders, 28 examples: 0.875 tied 1.0 on validation and kept one probe more, and scored 92
    on the test set against 98), so a smaller scale has to be within the threshold or bought back.
    `max_task_loss`: points (of a 0-1 task metric x 100) of validation score `balance` may give up below the
    best scale for general ability; a scale that costs more is not taken (the loss stays flagged).
    `probes_kept`: for each scale, which of the base model's known probes it still knows (in one order). When no
    scale within `max_task_loss` keeps general ability within the threshold, balance takes the one of them
    that keeps the most, if it keeps more than the best-scoring scale by more than the threshold (a net gain
    of known probes, `retention_gain`, of the size the flag counts as a loss): part of the loss bought back
    for at most `max_task_loss` points."""
    def task(c: ScaleCandidate) -> float:
        return c.task if c.task is not None else float("-inf")

    def kept(c: ScaleCandidate) -> float:
        return c.retention if c.retention is not None else 1.0

    if policy == "report":
        chosen = max(candidates, key=lambda c: (c.scale == 1.0, c.scale))
        return chosen.scale, (f"eval.forgetting_policy report: scales measured, the adapter kept at {chosen.scale:g}")
    if policy == "task":
        chosen = max(candidates, key=lambda c: (task(c), c.scale))
        return chosen.scale, f"eval.forgetting_policy task: the best validation {metric} ({_pct(chosen.task)})"
    best = max(candidates, key=lambda c: (task(c), c.scale))
    acceptable = [c for c in candidates if c.within_threshold]
    affordable = [c for c in acceptable if task(best) - task(c) <= max_task_loss / 100 + 1e-9]
    if affordable:
        chosen = max(affordable, key=lambda c: (task(c), c.scale))
        return chosen.scale, (f"the best validation {metric} ({_pct(chosen.task)}) among the scales that keep general "
                              f"ability within {threshold:.0%} ({_ability(chosen)})")
    bought, near = _bought_back(candidates, best, probes_kept or {}, max_task_loss, threshold)
    if bought is not None:
        chosen, (gained, lost) = bought
        return chosen.scale, (f"no scale within {max_task_loss:g} points of the best validation {metric} "
                              f"({_pct(best.task)}) keeps general ability within {threshold:.0%}; scale "
                              f"{chosen.scale:g} keeps the most of it ({_ability(chosen)}: {gained} known probes "
                              f"that scale {best.scale:g} lost, {lost} the other way, a net gain beyond "
                              f"{threshold:.0%}) for {(task(best) - task(chosen)) * 100:.1f} points (validation "
                              f"{metric} {_pct(chosen.task)})")
    chance = ""
    if near is not None:  # kept more within the allowance, by less than the threshold: say so
        c, (gained, lost) = near
        chance = (f"; scale {c.scale:g} kept more ({_ability(c)}) for {(task(best) - task(c)) * 100:.1f} points, but "
                  f"{gained} known probes gained and {lost} lost is a net gain within {threshold:.0%}")
    if acceptable:
        kept_best = max(acceptable, key=lambda c: (task(c), kept(c), c.scale))
        return best.scale, (f"scale {kept_best.scale:g} keeps general ability within {threshold:.0%} but gives up "
                            f"{(task(best) - task(kept_best)) * 100:.1f} points of validation {metric} (more than "
                            f"eval.scale_max_task_loss {max_task_loss:g}), so the best validation {metric} "
                            f"({_pct(best.task)}; {_ability(best)}){chance}; the loss is flagged")
    # none is within: a smaller scale would give up task score for a loss that stays flagged anyway (measured
    # on routing: 0.5 kept 79% instead of 65% of the probes and cost half the validation score)
    chosen = best
    return chosen.scale, (f"no scale kept general ability within {threshold:.0%}, so the best validation {metric} "
                          f"({_pct(chosen.task)}; {_ability(chosen)}){chance}; the loss is flagged")


Gain = tuple[ScaleCandidate, tuple[int, int]]


def _bought_back(candidates: Sequence[ScaleCandidate], best: ScaleCandidate, kept: Mapping[float, Sequence[float]],
                 max_task_loss: float, threshold: float) -> tuple[Gain | None, Gain | None]:
    """The scale within `max_task_loss` of `best` that keeps the most general ability, with its gain over
    `best` (retention_gain), when its net gain is more than `threshold` of the known probes; else None, and
    the scale that kept the most more than `best` by less (None when no scale within the allowance kept more)."""
    if best.scale not in kept or best.task is None or not kept[best.scale]:
        return None, None
    gains = [(c, retention_gain(kept[c.scale], kept[best.scale])) for c in candidates
             if c is not best and c.scale in kept and c.task is not None
             and best.task - c.task <= max_task_loss / 100 + 1e-9]

    def most(pairs: list[Gain]) -> Gain | None:
        return max(pairs, key=lambda cg: (cg[1][0] - cg[1][1], cg[0].task, cg[0].scale)) if pairs else None

    known = len(kept[best.scale])
    material = [(c, g) for c, g in gains if (g[0] - g[1]) / known > threshold + 1e-9]
    if material:
        return most(material), None
    return None, most([(c, g) for c, g in gains if g[0] > g[1]])


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}"


def _ability(c: ScaleCandidate) -> str:
    retention = "retention n/a" if c.retention is None else f"retention {c.retention:.0%}"
    ppl = "" if c.perplexity_change is None else f", perplexity {c.perplexity_change:+.1%}"
    return retention + ppl


@dataclass
class ScaleSearch:
    """What the search measured: the chosen scale's file content and the tuned general ability at it."""

    record: AdapterScale
    ability: GeneralAbility  # at the chosen scale: the forgetting result of the run


def search_adapter_scale(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, valid: Sequence[EvalExample],
    builder: PromptBuilder, kind: OutputKind, metric: str, schema: dict[str, Any] | None, settings: DecodingSettings,
    base: GeneralAbility, scales: Sequence[float], policy: str, threshold: float, seed: int, batch_size: int,
    progress: Callable[[int], Any] | None = None, max_task_loss: float = 3.0,
) -> ScaleSearch:
    """Every scale on the validation examples and the general probes; leaves the model at the chosen scale."""
    valid = list(valid)[:SEARCH_MAX_EXAMPLES]
    conversations = [builder.build("tuned", ex) for ex in valid]
    references = [ex.reference for ex in valid]
    candidates: list[ScaleCandidate] = []
    abilities: dict[float, GeneralAbility] = {}
    for scale in scales:
        set_adapter_scale(model, scale)
        task = None
        if valid:
            texts = [g.text for g in generate(model, tokenizer, conversations, settings, batch_size, progress=progress)]
            per_example = score_outputs(texts, references, kind, schema).per_example[metric]
            task = sum(per_example) / len(per_example)
        abilities[scale] = measure_general_ability(model, tokenizer, seed=seed, batch_size=batch_size, progress=progress)
        compared = compare_general_ability(base, abilities[scale], threshold, seed=seed)
        kept, ppl = compared["retention"], compared["perplexity"]["relative_change"]
        candidates.append(ScaleCandidate(
            scale=scale, task=task, retention=kept["value"], retention_ci95=kept["ci95"], perplexity_change=ppl,
            within_threshold=within_threshold(kept["value"], ppl, threshold),
        ))
    probes_kept = {s: known_outcomes(base.known_for_retention, a.probe_scores) for s, a in abilities.items()}
    chosen, reason = choose_scale(candidates, policy, threshold, metric, max_task_loss, probes_kept=probes_kept)
    set_adapter_scale(model, chosen)
    record = AdapterScale(scale=chosen, policy=policy, reason=reason, metric=metric, split="valid",
                          n_examples=len(valid), threshold=threshold, candidates=candidates)
    return ScaleSearch(record, abilities[chosen])
