"""General-ability probe: did fine-tuning cost the model what it knew before? Base vs tuned.

Reads two files shipped with tunelab, written for it: assets/general_text.txt (plain English prose,
about 3.5k tokens, so the perplexity change has an interval of about +-2%) and
assets/general_probes.jsonl (164 fixed probes of four kinds: facts, instruction/format following,
short reasoning, plain conversation; each with a deterministic rule). Every probe output gets two
scores: `known` (the knowledge or skill is there: the right number inside a sentence counts) and
`format` (the output also has the asked-for form, where the probe asks for one). Forgetting is
measured as *retention*: of the probes the base model knows, the share the tuned model still knows,
with a bootstrap interval, overall and per kind. "Knows" is *stable* knowledge: the base model answers
right in the plain rendering (a single user turn) AND with each of STABILITY_SYSTEM_PROMPTS added, since a
probe answered right in one framing only is lost to a harmless change of framing as often as to a fine-tune
(measured on the 135M default model: a neutral system prompt alone kept 84-89% of its plain right answers).
Writes nothing (eval/run.py stores the result in eval/metrics.json).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
from jinja2 import TemplateError

from tunelab.eval.metrics import bootstrap_ci, lenient_json, normalize_text, paired_comparison, strict_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PPL_WINDOW_TOKENS = 512
PPL_BLOCK_TOKENS = 32  # block bootstrap: neighbouring tokens' losses are correlated
PROBE_MAX_NEW_TOKENS = 32  # room for a short sentence around the answer; longer output cannot help the score
PROBES_FILE = "assets/general_probes.jsonl"
TEXT_FILE = "assets/general_text.txt"
DETECTION_POWER = 0.8  # "would have been detected": at least this often
KINDS = ("fact", "instruction", "reasoning", "conversation")
# Neutral framings the base model must also answer a probe right under for it to count as known: generic
# (no model's name), so the same on every model; fixed, so "stable" means the same in every run.
STABILITY_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a knowledgeable assistant. Answer clearly.",
    "You are a friendly assistant who answers questions.",
)


@dataclass(frozen=True)
class Probe:
    id: str
    kind: str  # fact | instruction | reasoning | conversation
    prompt: str
    rule: str  # number | contains | choice | upper_word | json | sequence | same_text | reply
    answer: str  # JSON-encoded expected value(s) for the rule
    format: bool  # the prompt asks for a form (only the number, only JSON, ...): scored apart from knowing


@dataclass(frozen=True)
class ProbeScore:
    known: float  # 1.0 when the answer (or skill) is in the output, whatever its wrapping
    format: float | None  # 1.0 when the output is also in the asked-for form; None when no form is asked


@lru_cache(maxsize=1)
def _shipped_probes() -> tuple[Probe, ...]:
    text = resources.files("tunelab").joinpath(PROBES_FILE).read_text(encoding="utf-8")
    return tuple(Probe(row["id"], row["kind"], row["prompt"], row["rule"], json.dumps(row["answer"]), row["format"])
                 for row in map(json.loads, text.splitlines()) if row)


def general_probes() -> list[Probe]:
    """The shipped probes, in file order: the same on every machine and in every run."""
    return list(_shipped_probes())


_NUMBER = re.compile(r"-?\d[\d,]*")


def _numbers(text: str) -> list[int]:
    return [int(n.replace(",", "")) for n in _NUMBER.findall(text) if n.replace(",", "").lstrip("-")]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _bare(text: str) -> str:
    return text.strip().strip(" .!\"'`*").strip()


def score_probe(probe: Probe, output: str) -> ProbeScore:
    expected = json.loads(probe.answer)
    text = output.strip()
    lowered = text.lower()
    known: bool
    form: bool
    if probe.rule == "number":
        known = expected in _numbers(text)
        form = _bare(text).replace(",", "") == str(expected)
    elif probe.rule == "contains":
        known = any(_has_word(lowered, answer) for answer in expected)
        form = known
    elif probe.rule == "choice":  # the first option named is the answer ("71 is larger than 17" is right)
        found = [(m.start(), option) for option in expected for m in [re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", lowered)] if m]
        known = bool(found) and min(found)[1] == expected[0]
        form = normalize_text(text) == expected[0]
    elif probe.rule == "upper_word":
        known = _has_word(text, expected)
        form = _bare(text) == expected
    elif probe.rule == "json":
        valid, value = strict_json(text)
        known = lenient_json(text) == expected
        form = valid and value == expected
    elif probe.rule == "sequence":
        numbers, n = _numbers(text), len(expected)
        known = any(numbers[i : i + n] == expected for i in range(len(numbers) - n + 1))
        form = known and re.fullmatch(r"[\d,\s.]*", text) is not None and numbers == expected
    elif probe.rule == "same_text":
        known = normalize_text(expected) in normalize_text(text)
        form = normalize_text(text) == normalize_text(expected)
    elif probe.rule == "reply":  # a conversational reply: a few words that touch the subject
        known = len(text.split()) >= 3 and any(_has_word(lowered, word) for word in expected)
        form = known
    else:
        raise ValueError(f"unknown probe rule {probe.rule!r}")
    return ProbeScore(float(known), float(form) if probe.format else None)


def general_text() -> str:
    return resources.files("tunelab").joinpath(TEXT_FILE).read_text(encoding="utf-8")


def token_nll(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    """Negative log-likelihood (nats) of every predicted token of `text`, in windows of
    PPL_WINDOW_TOKENS (the first token of each window has no context and is not scored)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    losses: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(ids), PPL_WINDOW_TOKENS):
                window = torch.tensor([ids[start : start + PPL_WINDOW_TOKENS]], device=device)
                if window.shape[1] < 2:
                    continue
                logits = model(input_ids=window).logits[0, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="none")
                losses.append(nll.cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(losses) if losses else np.zeros(0)


@dataclass
class GeneralAbility:
    nll: np.ndarray  # per token of the general text
    probe_scores: list[float]  # known, per probe
    probe_outputs: list[str]
    probes: list[Probe]
    format_scores: list[float | None]  # per probe; None where the probe asks for no form
    # per probe: 1.0 when also known with every STABILITY_SYSTEM_PROMPTS framing; None when not measured
    stable_known: list[float] | None = None
    stability_note: str | None = None  # why stable_known is None though it was asked for

    @property
    def known_for_retention(self) -> list[float]:
        """What this model counts as known when it is the baseline: the stable set when measured."""
        return self.stable_known if self.stable_known is not None else self.probe_scores

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean())) if self.nll.size else float("nan")


def measure_general_ability(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int], Any] | None = None,
    stability: bool = False,
) -> GeneralAbility:
    """The probes (plain rendering) and the general text. `stability` (the base model only): also which of
    the probes answered right are answered right with every STABILITY_SYSTEM_PROMPTS framing; `progress`
    then advances by len(STABILITY_SYSTEM_PROMPTS) * probes more, whatever was re-asked."""
    from tunelab.engine.generate import DecodingSettings, generate

    probes = general_probes()
    conversations = [[{"role": "user", "content": p.prompt}] for p in probes]
    settings = DecodingSettings(max_new_tokens=PROBE_MAX_NEW_TOKENS, seed=seed)
    outputs = [g.text for g in generate(model, tokenizer, conversations, settings, batch_size, progress=progress)]
    scores = [score_probe(p, o) for p, o in zip(probes, outputs, strict=True)]
    ability = GeneralAbility(
        nll=token_nll(model, tokenizer, general_text()),
        probe_scores=[s.known for s in scores],
        probe_outputs=outputs,
        probes=probes,
        format_scores=[s.format for s in scores],
    )
    if stability:
        ability.stable_known, ability.stability_note = _stable_known(
            model, tokenizer, probes, ability.probe_scores, settings, batch_size, progress)
    return ability


def _system_note(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why the chat template cannot frame a probe with a system message, or None when it can."""
    from tunelab.engine.generate import render_prompt

    user = {"role": "user", "content": "?"}
    try:
        framed = render_prompt(tokenizer, [{"role": "system", "content": STABILITY_SYSTEM_PROMPTS[0]}, user])
        plain = render_prompt(tokenizer, [user])
    except (TemplateError, TypeError, ValueError, KeyError, IndexError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        return f"the chat template takes no system message ({reason})"
    if framed == plain:
        return "the chat template drops a system message"
    return None


def _stable_known(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probes: Sequence[Probe], known: Sequence[float],
    settings: Any, batch_size: int, progress: Callable[[int], Any] | None,
) -> tuple[list[float] | None, str | None]:
    """Per probe, 1.0 when known in the plain rendering and with every system framing. Only the probes still
    known are asked under the next framing: an AND needs no more (on the 135M default model 80 + 67 + 64
    probes, 1.3 plain passes more, instead of 3 for every probe under every framing)."""
    from tunelab.engine.generate import generate

    note = _system_note(tokenizer)
    if note is not None:
        if progress is not None:
            progress(len(STABILITY_SYSTEM_PROMPTS) * len(probes))
        return None, note
    stable = [1.0 if k >= 1.0 else 0.0 for k in known]
    for system in STABILITY_SYSTEM_PROMPTS:
        asked = [i for i, s in enumerate(stable) if s >= 1.0]
        conversations = [[{"role": "system", "content": system}, {"role": "user", "content": probes[i].prompt}]
                         for i in asked]
        if conversations:
            outputs = [g.text for g in generate(model, tokenizer, conversations, settings, batch_size,
                                                progress=progress)]
            for i, output in zip(asked, outputs, strict=True):
                stable[i] = score_probe(probes[i], output).known
        if progress is not None and len(probes) > len(asked):
            progress(len(probes) - len(asked))
    return stable, None


def _blocks(nll: np.ndarray) -> np.ndarray:
    usable = (nll.size // PPL_BLOCK_TOKENS) * PPL_BLOCK_TOKENS
    if usable == 0:
        return nll.reshape(-1)
    return nll[:usable].reshape(-1, PPL_BLOCK_TOKENS).mean(axis=1)


# ---------------------------------------------------------------------------------------------- retention


def known_outcomes(base_known: Sequence[float], tuned_known: Sequence[float]) -> list[float]:
    """The tuned model's outcomes (1 = known) on the probes the base model knows, in probe order."""
    return [t for b, t in zip(base_known, tuned_known, strict=True) if b >= 1.0]


def retention(base_known: Sequence[float], tuned_known: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """Of the probes the base model knows, the share the tuned model still knows: {value, ci95, n}
    (n = the base-correct probes; value None when there are none)."""
    kept = known_outcomes(base_known, tuned_known)
    if not kept:
        return {"value": None, "ci95": None, "n": 0}
    return {"value": float(np.mean(kept)), "ci95": list(bootstrap_ci(kept, seed)), "n": len(kept)}


def retention_flagged(summary: dict[str, Any], threshold: float) -> bool:
    """A loss beyond `threshold` (relative to what the base knew) whose interval excludes no loss."""
    return summary["n"] > 0 and 1 - summary["value"] > threshold and summary["ci95"][1] < 1.0


def detection_rate(n: int, drop: float, threshold: float, level: float = 0.95) -> float:
    """How often retention_flagged fires when each of `n` base-correct probes is lost with probability
    `drop`, computed exactly: with k of n kept the percentile bootstrap's upper bound is below 1 when a
    resample keeps everything less often than the upper tail, (k/n)^n < (1 - level) / 2."""
    if n == 0:
        return 0.0
    tail = (1 - level) / 2
    rate = 0.0
    for k in range(n + 1):
        if 1 - k / n > threshold and (k / n) ** n < tail:
            rate += math.comb(n, k) * (1 - drop) ** k * drop ** (n - k)
    return rate


def detectable_drop(n: int, threshold: float, power: float = DETECTION_POWER) -> float | None:
    """The smallest loss of retained probes (in whole points) flagged at least `power` of the time with
    `n` base-correct probes; None when even losing all of them would not be."""
    for points in range(1, 101):
        if detection_rate(n, points / 100, threshold) >= power:
            return points / 100
    return None


def _retention_by_kind(base: GeneralAbility, tuned: GeneralAbility, seed: int) -> dict[str, dict[str, Any]]:
    known = base.known_for_retention
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in [k for k in KINDS if any(p.kind == k for p in base.probes)]:
        rows = [i for i, p in enumerate(base.probes) if p.kind == kind]
        formatted = [i for i in rows if base.format_scores[i] is not None]
        by_kind[kind] = {
            "n": len(rows), "base": float(np.mean([base.probe_scores[i] for i in rows])),
            "tuned": float(np.mean([tuned.probe_scores[i] for i in rows])),
            "retention": retention([known[i] for i in rows], [tuned.probe_scores[i] for i in rows], seed),
            "format": None if not formatted else {
                "n": len(formatted),
                "base": float(np.mean([base.format_scores[i] for i in formatted])),
                "tuned": float(np.mean([tuned.format_scores[i] for i in formatted])),
            },
        }
    return by_kind


def compare_general_ability(
    base: GeneralAbility, tuned: GeneralAbility, threshold: float, seed: int = 0
) -> dict[str, Any]:
    """Deltas with 95% intervals. A drop is flagged when its point estimate is beyond `threshold`
    (relative) AND its interval excludes no change: for the probes, retention of the base model's
    known probes (its stable set when `base` measured one; the plain-rendering retention stays beside it
    as `retention.plain`); for the text, perplexity."""
    nll_diff = paired_comparison(_blocks(tuned.nll), _blocks(base.nll), seed=seed)
    ppl_change = float(np.exp(tuned.nll.mean() - base.nll.mean()) - 1) if base.nll.size else 0.0
    ppl_ci = [float(np.exp(nll_diff.ci95[0]) - 1), float(np.exp(nll_diff.ci95[1]) - 1)]
    ppl_flag = ppl_change > threshold and nll_diff.ci95[0] > 0

    probe_diff = paired_comparison(tuned.probe_scores, base.probe_scores, seed=seed)
    base_acc, tuned_acc = float(np.mean(base.probe_scores)), float(np.mean(tuned.probe_scores))
    relative_drop = (base_acc - tuned_acc) / base_acc if base_acc > 0 else 0.0
    stable = base.stable_known is not None
    kept = retention(base.known_for_retention, tuned.probe_scores, seed)
    plain = retention(base.probe_scores, tuned.probe_scores, seed)
    probe_flag = retention_flagged(kept, threshold)
    detectable = detectable_drop(kept["n"], threshold)
    gained = sum(1 for b, t in zip(base.probe_scores, tuned.probe_scores, strict=True) if b < 1.0 <= t)
    kept.update(flagged=probe_flag, detectable_drop=detectable, gained=gained,
                by_kind={kind: row["retention"] for kind, row in _retention_by_kind(base, tuned, seed).items()},
                definition="stable" if stable else "plain",
                renderings=1 + len(STABILITY_SYSTEM_PROMPTS) if stable else 1,
                unstable=plain["n"] - kept["n"], plain=plain,
                definition_note=base.stability_note)

    ppl_part = f"perplexity on general text {ppl_change:+.1%} (95% CI {ppl_ci[0]:+.1%} .. {ppl_ci[1]:+.1%})"
    if kept["n"]:
        lo, hi = kept["ci95"]
        known_how = "knows in every framing" if stable else "knew"
        probe_part = (f"the tuned model still knows {kept['value']:.0%} of the {kept['n']} general probes the base "
                      f"model {known_how} (95% CI {lo:.0%} .. {hi:.0%})")
    else:
        probe_part = (f"the base model knew none of the general probes{' in every framing' if stable else ''}, so no loss "
                      "there can be seen")
    flagged = ppl_flag or probe_flag
    if flagged:
        parts = ([f"perplexity on general text rose {ppl_change:+.1%} (95% CI {ppl_ci[0]:+.1%} .. {ppl_ci[1]:+.1%})"]
                 if ppl_flag else [])
        parts += [probe_part] if probe_flag else []
        text = "flagged: " + "; ".join(parts) + f" (threshold {threshold:.0%})"
    else:
        seen = (f"; a drop of {detectable * 100:.0f} points or more would have been detected"
                if detectable is not None and kept["n"] else "")
        text = f"no forgetting beyond {threshold:.0%} detected: {probe_part}{seen}; {ppl_part}"
    return {
        "threshold": threshold,
        "flagged": flagged,
        "text": text,
        "retention": kept,
        "perplexity": {"base": base.perplexity, "tuned": tuned.perplexity, "relative_change": ppl_change,
                       "ci95": ppl_ci, "flagged": ppl_flag, "tokens": int(base.nll.size),
                       "block_tokens": PPL_BLOCK_TOKENS, "text_file": f"tunelab/{TEXT_FILE}"},
        "probes": {"n": len(base.probes), "base_accuracy": base_acc, "tuned_accuracy": tuned_acc,
                   "delta": probe_diff.delta, "ci95": list(probe_diff.ci95), "p_value": probe_diff.p_value,
                   "relative_drop": relative_drop, "flagged": probe_flag,
                   "base_ci95": list(bootstrap_ci(base.probe_scores, seed)),
                   "tuned_ci95": list(bootstrap_ci(tuned.probe_scores, seed)),
                   "by_kind": _retention_by_kind(base, tuned, seed), "probes_file": f"tunelab/{PROBES_FILE}"},
    }


def probe_records(base: GeneralAbility, tuned: GeneralAbility) -> list[dict[str, Any]]:
    """Per probe: prompt, both outputs and scores (for the report's side-by-side view); `base_stable` whether
    the base model also knew it in every framing (None when that was not measured)."""
    stable = base.stable_known if base.stable_known is not None else [None] * len(base.probes)
    return [
        {"id": p.id, "kind": p.kind, "prompt": p.prompt, "base_output": bo, "base_score": bs,
         "tuned_output": to, "tuned_score": ts, "base_format": bf, "tuned_format": tf, "base_stable": st}
        for p, bo, bs, to, ts, bf, tf, st in zip(base.probes, base.probe_outputs, base.probe_scores,
                                                 tuned.probe_outputs, tuned.probe_scores, base.format_scores,
                                                 tuned.format_scores, stable, strict=True)
    ]
