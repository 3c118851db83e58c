"""General-ability probe: did fine-tuning cost the model what it knew before? Base vs tuned.

Reads the general English text shipped with tunelab (assets/general_text.txt, written for it) and
generates a fixed, seeded set of short general probes (arithmetic, well-known facts, following a
format instruction), each scored by a deterministic rule. Measures per-token perplexity on the text
and probe accuracy for a model; compares two measurements with paired intervals and flags a drop
beyond a threshold. Writes nothing (eval/run.py stores the result in eval/metrics.json).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from tunelab.eval.metrics import bootstrap_ci, normalize_text, paired_comparison, strict_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PPL_WINDOW_TOKENS = 512
PPL_BLOCK_TOKENS = 32  # block bootstrap: neighbouring tokens' losses are correlated
PROBE_MAX_NEW_TOKENS = 24  # every probe answer is a few words; longer output cannot help the score
N_ARITHMETIC, N_FACTS, N_FORMAT = 14, 14, 12

_FACTS = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("How many days are there in a week?", ("7", "seven")),
    ("How many minutes are there in an hour?", ("60", "sixty")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("What is the chemical formula of water?", ("h2o",)),
    ("Who wrote the play Romeo and Juliet?", ("shakespeare",)),
    ("At how many degrees Celsius does water freeze?", ("0", "zero")),
    ("What colour is the sky on a clear day?", ("blue",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the first month of the year?", ("january",)),
    ("On which planet do humans live?", ("earth",)),
    ("In which direction does the sun rise?", ("east",)),
    ("How many continents are there on Earth?", ("7", "seven")),
    ("What gas do plants take in from the air to make food?", ("carbon dioxide", "co2")),
    ("What is the freezing water called when it is solid?", ("ice",)),
)
_WORDS = ("apple", "river", "garden", "window", "yellow", "pencil", "market", "silver", "planet", "forest")
_KEYS = ("color", "city", "animal", "fruit")
_VALUES = ("red", "london", "horse", "banana", "green", "paris", "tiger", "cherry")
_SENTENCES = ("The cat sleeps on the warm mat.", "Green leaves fall in autumn.", "We walked to the old bridge.")


@dataclass(frozen=True)
class Probe:
    id: str
    kind: str  # arithmetic | fact | format
    prompt: str
    rule: str  # number | contains | upper_word | json | sequence | same_text
    answer: str  # JSON-encoded expected value(s) for the rule


def general_probes(seed: int = 0) -> list[Probe]:
    """About 40 short probes; the same seed gives the same probes on every machine."""
    rng = random.Random(seed)
    probes: list[Probe] = []
    for i in range(N_ARITHMETIC):
        op = ("+", "-", "*")[i % 3]
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(10, 60), rng.randint(2, 40))
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        shown = {"*": "times", "+": "plus", "-": "minus"}[op]
        probes.append(Probe(f"arith-{i}", "arithmetic", f"What is {a} {shown} {b}? Reply with only the number.",
                            "number", json.dumps(value)))
    for i, (question, answers) in enumerate(rng.sample(_FACTS, N_FACTS)):
        probes.append(Probe(f"fact-{i}", "fact", f"{question} Answer in a few words.", "contains", json.dumps(answers)))
    for i in range(N_FORMAT):
        style = i % 4
        if style == 0:
            word = rng.choice(_WORDS)
            probes.append(Probe(f"format-{i}", "format",
                                f'Write the word "{word}" in capital letters. Reply with that one word only.',
                                "upper_word", json.dumps(word.upper())))
        elif style == 1:
            key, value = rng.choice(_KEYS), rng.choice(_VALUES)
            probes.append(Probe(f"format-{i}", "format",
                                f'Reply with only a JSON object that has the key "{key}" with the string value '
                                f'"{value}". No other text.', "json", json.dumps({key: value})))
        elif style == 2:
            start = rng.randint(1, 20)
            stop = start + rng.randint(3, 5)
            probes.append(Probe(f"format-{i}", "format",
                                f"Count from {start} to {stop}, separated by commas. Reply with only the numbers.",
                                "sequence", json.dumps(list(range(start, stop + 1)))))
        else:
            sentence = rng.choice(_SENTENCES)
            probes.append(Probe(f"format-{i}", "format",
                                f"Repeat this sentence exactly and write nothing else: {sentence}",
                                "same_text", json.dumps(sentence)))
    return probes


_INT = re.compile(r"-?\d[\d,]*")


def score_probe(probe: Probe, output: str) -> float:
    expected = json.loads(probe.answer)
    text = output.strip()
    if probe.rule == "number":
        found = _INT.search(text)
        return float(found is not None and int(found.group().replace(",", "")) == expected)
    if probe.rule == "contains":
        lowered = text.lower()
        return float(any(re.search(rf"\b{re.escape(answer)}\b", lowered) for answer in expected))
    if probe.rule == "upper_word":
        return float(text.strip(" .!\"'`*") == expected)
    if probe.rule == "json":
        valid, value = strict_json(text)
        return float(valid and value == expected)
    if probe.rule == "sequence":
        return float([int(n) for n in re.findall(r"-?\d+", text)] == expected)
    if probe.rule == "same_text":
        return float(normalize_text(text) == normalize_text(expected))
    raise ValueError(f"unknown probe rule {probe.rule!r}")


def general_text() -> str:
    return resources.files("tunelab").joinpath("assets/general_text.txt").read_text(encoding="utf-8")


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
    probe_scores: list[float]
    probe_outputs: list[str]
    probes: list[Probe]

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean())) if self.nll.size else float("nan")


def measure_general_ability(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int], Any] | None = None,
) -> GeneralAbility:
    from tunelab.engine.generate import DecodingSettings, generate

    probes = general_probes(seed)
    conversations = [[{"role": "user", "content": p.prompt}] for p in probes]
    settings = DecodingSettings(max_new_tokens=PROBE_MAX_NEW_TOKENS, seed=seed)
    outputs = [g.text for g in generate(model, tokenizer, conversations, settings, batch_size, progress=progress)]
    return GeneralAbility(
        nll=token_nll(model, tokenizer, general_text()),
        probe_scores=[score_probe(p, o) for p, o in zip(probes, outputs, strict=True)],
        probe_outputs=outputs,
        probes=probes,
    )


def _blocks(nll: np.ndarray) -> np.ndarray:
    usable = (nll.size // PPL_BLOCK_TOKENS) * PPL_BLOCK_TOKENS
    if usable == 0:
        return nll.reshape(-1)
    return nll[:usable].reshape(-1, PPL_BLOCK_TOKENS).mean(axis=1)


def compare_general_ability(
    base: GeneralAbility, tuned: GeneralAbility, threshold: float, seed: int = 0
) -> dict[str, Any]:
    """Deltas with 95% intervals. A drop is flagged when its point estimate is beyond `threshold`
    (relative) AND its interval excludes no change, so noise on 40 probes does not raise alarms."""
    nll_diff = paired_comparison(_blocks(tuned.nll), _blocks(base.nll), seed=seed)
    ppl_change = float(np.exp(tuned.nll.mean() - base.nll.mean()) - 1) if base.nll.size else 0.0
    ppl_ci = [float(np.exp(nll_diff.ci95[0]) - 1), float(np.exp(nll_diff.ci95[1]) - 1)]
    ppl_flag = ppl_change > threshold and nll_diff.ci95[0] > 0

    probe_diff = paired_comparison(tuned.probe_scores, base.probe_scores, seed=seed)
    base_acc, tuned_acc = float(np.mean(base.probe_scores)), float(np.mean(tuned.probe_scores))
    relative_drop = (base_acc - tuned_acc) / base_acc if base_acc > 0 else 0.0
    probe_flag = relative_drop > threshold and probe_diff.ci95[1] < 0

    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({p.kind for p in base.probes}):
        rows = [i for i, p in enumerate(base.probes) if p.kind == kind]
        by_kind[kind] = {"n": len(rows), "base": float(np.mean([base.probe_scores[i] for i in rows])),
                         "tuned": float(np.mean([tuned.probe_scores[i] for i in rows]))}
    flagged = ppl_flag or probe_flag
    if flagged:
        parts = []
        if ppl_flag:
            parts.append(f"perplexity on general text rose {ppl_change:+.1%} (95% CI {ppl_ci[0]:+.1%} .. {ppl_ci[1]:+.1%})")
        if probe_flag:
            parts.append(f"general probes fell from {base_acc:.0%} to {tuned_acc:.0%}")
        text = "flagged: " + "; ".join(parts) + f" (threshold {threshold:.0%})"
    else:
        text = (f"no forgetting beyond {threshold:.0%}: perplexity {ppl_change:+.1%}, general probes "
                f"{base_acc:.0%} -> {tuned_acc:.0%}")
    return {
        "threshold": threshold,
        "flagged": flagged,
        "text": text,
        "perplexity": {"base": base.perplexity, "tuned": tuned.perplexity, "relative_change": ppl_change,
                       "ci95": ppl_ci, "flagged": ppl_flag, "tokens": int(base.nll.size),
                       "block_tokens": PPL_BLOCK_TOKENS, "text_file": "tunelab/assets/general_text.txt"},
        "probes": {"n": len(base.probes), "base_accuracy": base_acc, "tuned_accuracy": tuned_acc,
                   "delta": probe_diff.delta, "ci95": list(probe_diff.ci95), "p_value": probe_diff.p_value,
                   "relative_drop": relative_drop, "flagged": probe_flag,
                   "base_ci95": list(bootstrap_ci(base.probe_scores, seed)),
                   "tuned_ci95": list(bootstrap_ci(tuned.probe_scores, seed)), "by_kind": by_kind},
    }


def probe_records(base: GeneralAbility, tuned: GeneralAbility) -> list[dict[str, Any]]:
    """Per probe: prompt, both outputs and scores (for the report's side-by-side view)."""
    return [
        {"id": p.id, "kind": p.kind, "prompt": p.prompt, "base_output": bo, "base_score": bs,
         "tuned_output": to, "tuned_score": ts}
        for p, bo, bs, to, ts in zip(base.probes, base.probe_outputs, base.probe_scores,
                                     tuned.probe_outputs, tuned.probe_scores, strict=True)
    ]

