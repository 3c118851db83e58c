"""The general-ability probe: deterministic probes and scorers, and it flags a damaged model only."""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest

from tunelab.eval import forgetting
from tunelab.eval.forgetting import (
    STABILITY_SYSTEM_PROMPTS,
    GeneralAbility,
    Probe,
    ProbeScore,
    compare_general_ability,
    detectable_drop,
    detection_rate,
    general_probes,
    general_text,
    measure_general_ability,
    retention,
    retention_flagged,
    score_probe,
)


def test_general_text_ships_with_the_package():
    text = general_text()
    assert 15_000 <= len(text.encode("utf-8")) <= 25_000  # about 3.5k tokens: a perplexity interval of about +-2%
    assert text.isascii() and "http" not in text


def test_probes_are_fixed_and_cover_four_kinds():
    probes = general_probes()
    assert len(probes) == 164
    assert general_probes() == probes
    assert Counter(p.kind for p in probes) == {"fact": 56, "reasoning": 44, "instruction": 34, "conversation": 30}
    assert len({p.id for p in probes}) == 164 and len({p.prompt for p in probes}) == 164
    assert sum(p.format for p in probes) == 42


def _canonical_answer(probe) -> str:
    expected = json.loads(probe.answer)
    return {
        "number": lambda: str(expected),
        "contains": lambda: f"It is {expected[0].title()}.",
        "choice": lambda: expected[0],
        "upper_word": lambda: expected,
        "json": lambda: json.dumps(expected),
        "sequence": lambda: ", ".join(str(n) for n in expected),
        "same_text": lambda: expected,
        "reply": lambda: f"Sure, here is one: {expected[0]}.",
    }[probe.rule]()


def test_every_probe_accepts_its_answer_and_rejects_a_wrong_one():
    for probe in general_probes():
        right = score_probe(probe, _canonical_answer(probe))
        assert right.known == 1.0 and right.format in ((1.0,) if probe.format else (None,)), probe
        wrong = score_probe(probe, "billing_question")  # a labels-only fine-tune's answer to everything
        assert wrong.known == 0.0 and wrong.format in ((0.0,) if probe.format else (None,)), probe


def _probe(rule, answer, form=True):
    return Probe("p", "reasoning", "?", rule, json.dumps(answer), form)


def test_knowledge_is_scored_apart_from_format():
    # the right number inside a sentence is known, not in the asked-for form
    assert score_probe(_probe("number", 90), "10 times 9 is 90.") == ProbeScore(1.0, 0.0)
    assert score_probe(_probe("number", 90), "90") == ProbeScore(1.0, 1.0)
    assert score_probe(_probe("number", 1200), "It is 1,200.").known == 1.0
    assert score_probe(_probe("number", 90), "10 times 9 is 19.") == ProbeScore(0.0, 0.0)
    assert score_probe(_probe("number", 9, form=False), "It is 9") == ProbeScore(1.0, None)
    # a comparison: the first option named is the answer
    assert score_probe(_probe("choice", ["71", "17"]), "71 is larger than 17.") == ProbeScore(1.0, 0.0)
    assert score_probe(_probe("choice", ["71", "17"]), "17 is smaller.").known == 0.0
    assert score_probe(_probe("choice", ["yes", "no"]), "Yes.") == ProbeScore(1.0, 1.0)
    # format following: the skill is there inside a sentence, the form only when alone
    assert score_probe(_probe("upper_word", "RIVER"), 'Here it is: RIVER') == ProbeScore(1.0, 0.0)
    assert score_probe(_probe("upper_word", "RIVER"), '"RIVER".') == ProbeScore(1.0, 1.0)
    assert score_probe(_probe("upper_word", "RIVER"), "river").known == 0.0
    assert score_probe(_probe("json", {"a": "b"}), 'Sure: {"a": "b"}') == ProbeScore(1.0, 0.0)
    assert score_probe(_probe("json", {"a": "b"}), '```json\n{"a": "b"}\n```') == ProbeScore(1.0, 1.0)
    assert score_probe(_probe("sequence", [3, 4, 5]), "Counting: 3, 4, 5.") == ProbeScore(1.0, 0.0)
    assert score_probe(_probe("sequence", [3, 4, 5]), "3, 4").known == 0.0
    assert score_probe(_probe("same_text", "The cat sat."), "Sure! The cat sat.") == ProbeScore(1.0, 0.0)
    # a conversation needs a reply of a few words on the subject: a bare label is not one
    assert score_probe(_probe("reply", ["sunscreen", "towel"], False), "billing").known == 0.0
    assert score_probe(_probe("reply", ["sunscreen", "towel"], False), "Bring a towel and water.").known == 1.0
    assert score_probe(_probe("contains", ["cat"], False), "concatenate things").known == 0.0


def test_retention_counts_only_what_the_base_model_knew():
    base = [1, 1, 1, 1, 0, 0]
    tuned = [1, 1, 1, 0, 1, 1]  # gains on probes the base model missed do not offset a loss
    result = retention(base, tuned)
    assert result["value"] == 0.75 and result["n"] == 4
    lo, hi = result["ci95"]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0
    assert retention([0, 0], [1, 1]) == {"value": None, "ci95": None, "n": 0}


# the 135M default model knows this many of the shipped probes (docs/evaluation.md, measured once)
BASE_CORRECT_135M = 80


def _simulated_flags(n: int, keep: float, trials: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    flags = 0
    for trial in range(trials):
        tuned = (rng.random(n) < keep).astype(float)
        flags += retention_flagged(retention([1.0] * n, list(tuned), seed=trial), 0.05)
    return flags / trials


def test_a_planted_fifth_lost_is_detected_at_the_shipped_probe_count():
    """Seeded simulation: a tuned model that loses 20% of what a harmless fine-tune keeps (97%: some churn
    happens anyway) is flagged >= 80% of the time; the harmless one rarely; the exact rate agrees."""
    n = BASE_CORRECT_135M
    assert _simulated_flags(n, 0.97 * 0.8, trials=300, seed=1) >= 0.8
    assert detection_rate(n, 1 - 0.97 * 0.8, 0.05) >= 0.8
    assert _simulated_flags(n, 1.0, trials=50, seed=2) == 0.0
    assert _simulated_flags(n, 0.99, trials=300, seed=3) <= 0.05
    simulated = _simulated_flags(n, 0.9, trials=300, seed=4)
    assert simulated == pytest.approx(detection_rate(n, 0.1, 0.05), abs=0.08)



# the stable set of the 135M default model: right in the plain rendering and with each neutral system
# prompt (measured on a routing run's base, docs/evaluation.md); a planted loss is still seen at this n
STABLE_CORRECT_135M = 62


def test_a_planted_fifth_lost_is_detected_at_the_stable_probe_count():
    n = STABLE_CORRECT_135M
    assert _simulated_flags(n, 0.97 * 0.8, trials=300, seed=5) >= 0.8
    assert detection_rate(n, 1 - 0.97 * 0.8, 0.05) >= 0.8
    assert detection_rate(60, 0.2, 0.05) == pytest.approx(0.999, abs=0.001)
    assert _simulated_flags(n, 0.99, trials=300, seed=6) <= 0.05


def test_detectable_drop_is_what_the_wording_promises():
    drop = detectable_drop(BASE_CORRECT_135M, 0.05)
    assert drop is not None and 0.05 < drop <= 0.2
    assert detection_rate(BASE_CORRECT_135M, drop, 0.05) >= 0.8 > detection_rate(BASE_CORRECT_135M, drop - 0.01, 0.05)
    # with 3 probes only losing all three is flagged ((2/3)^3 > 2.5%): that needs a 93% drop to happen 80% of the time
    assert detectable_drop(3, 0.05) == 0.93
    assert detectable_drop(0, 0.05) is None


@pytest.fixture(scope="module")
def trained_tiny():
    """The tiny model fitted briefly to the general text, so perplexity on it means something."""
    import torch

    from tunelab.models import load_model, load_tokenizer

    model = load_model("tiny-test", dtype="float32", device="cpu")
    tokenizer = load_tokenizer("tiny-test")
    ids = torch.tensor([tokenizer(general_text(), add_special_tokens=False)["input_ids"]])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(20):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, tokenizer


def _noised(model, relative_std: float):
    import torch

    damaged = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in damaged.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * param.std() * relative_std)
    return damaged


def test_damaged_copy_is_flagged_and_unchanged_model_is_not(trained_tiny):
    model, tokenizer = trained_tiny
    base = measure_general_ability(model, tokenizer, batch_size=40)

    unchanged = compare_general_ability(base, measure_general_ability(model, tokenizer, batch_size=40), 0.05)
    assert not unchanged["flagged"]
    assert unchanged["perplexity"]["relative_change"] == pytest.approx(0.0, abs=1e-6)
    assert "no forgetting" in unchanged["text"]
    assert unchanged["retention"]["value"] in (1.0, None)

    barely = compare_general_ability(base, measure_general_ability(_noised(model, 0.01), tokenizer, batch_size=40), 0.05)
    assert not barely["flagged"]  # a tiny change stays under the threshold

    damaged = compare_general_ability(base, measure_general_ability(_noised(model, 1.0), tokenizer, batch_size=40), 0.05)
    assert damaged["flagged"] and damaged["perplexity"]["flagged"]
    assert damaged["perplexity"]["tuned"] > base.perplexity * 1.05
    lo, hi = damaged["perplexity"]["ci95"]
    assert 0 < lo <= damaged["perplexity"]["relative_change"] <= hi
    assert damaged["text"].startswith("flagged: perplexity on general text rose")


# ---------------------------------------------------------------------------------------------- stable knowledge


class _FakeModel:
    """Answers a probe right when its framing is in the probe's set: plain (no system message) or a system prompt."""

    def __init__(self, right_under: dict[str | None, set[int]], probes):
        self.right_under = right_under
        self.index = {p.prompt: i for i, p in enumerate(probes)}
        self.probes = probes
        self.calls: list[tuple[str | None, list[int]]] = []

    def generate(self, model, tokenizer, conversations, settings, batch_size, progress=None):
        from tunelab.engine.generate import Generation

        framings = {c[0]["content"] if c[0]["role"] == "system" else None for c in conversations}
        assert len(framings) == 1  # one framing per call
        framing = framings.pop()
        asked = [self.index[c[-1]["content"]] for c in conversations]
        self.calls.append((framing, asked))
        if progress is not None:
            progress(len(conversations))
        return [Generation(_canonical_answer(self.probes[i]) if i in self.right_under[framing] else "billing_question",
                           1, 1, 0.0, batch_size, "stop") for i in asked]


@pytest.fixture
def ten_probes(monkeypatch):
    probes = forgetting._shipped_probes()[:10]
    monkeypatch.setattr(forgetting, "_shipped_probes", lambda: probes)
    monkeypatch.setattr(forgetting, "token_nll", lambda model, tokenizer, text: np.zeros(64))
    return list(probes)


def _fake(monkeypatch, probes, right_under):
    fake = _FakeModel(right_under, probes)
    monkeypatch.setattr("tunelab.engine.generate.generate", fake.generate)
    return fake


def test_stable_known_is_the_and_over_renderings_and_only_known_probes_are_reasked(monkeypatch, ten_probes, tokenizer):
    s1, s2, s3 = STABILITY_SYSTEM_PROMPTS
    fake = _fake(monkeypatch, ten_probes, {None: {0, 1, 2, 3, 4, 5}, s1: {0, 1, 2, 3, 4, 7, 8},
                                           s2: {0, 1, 2, 4, 9}, s3: {0, 2, 4, 5, 6}})
    steps: list[int] = []
    ability = measure_general_ability(None, tokenizer, progress=steps.append, stability=True)
    assert ability.probe_scores == [1.0] * 6 + [0.0] * 4  # the plain rendering, as before
    assert ability.stable_known == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # {0,1,2,3,4,5} & s1 & s2 & s3
    assert ability.stability_note is None and ability.known_for_retention == ability.stable_known
    # plain: all ten; then only what is still known: 6 probes under s1, 5 under s2, 3 under s3
    assert fake.calls == [(None, list(range(10))), (s1, [0, 1, 2, 3, 4, 5]), (s2, [0, 1, 2, 3, 4]), (s3, [0, 1, 2, 4])]
    assert sum(steps) == 4 * 10  # the progress bar's total (eval/run.py) is met exactly

    fake.calls.clear()
    tuned = measure_general_ability(None, tokenizer)  # the tuned model, and the scale search: one pass only
    assert fake.calls == [(None, list(range(10)))] and tuned.stable_known is None


def test_a_template_without_a_system_role_falls_back_to_the_plain_definition(monkeypatch, ten_probes, tokenizer):
    fake = _fake(monkeypatch, ten_probes, {None: {0, 1, 2}})
    refusing = copy.deepcopy(tokenizer)
    refusing.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}assistant:")
    steps: list[int] = []
    ability = measure_general_ability(None, refusing, progress=steps.append, stability=True)
    assert fake.calls == [(None, list(range(10)))]  # nothing re-asked, nothing crashed
    assert ability.stable_known is None and sum(steps) == 4 * 10
    assert ability.stability_note == "the chat template takes no system message (System role not supported)"
    compared = compare_general_ability(ability, ability, 0.05)["retention"]
    assert (compared["definition"], compared["renderings"], compared["unstable"]) == ("plain", 1, 0)
    assert compared["definition_note"] == ability.stability_note and compared["n"] == 3

    dropping = copy.deepcopy(tokenizer)  # a template that silently drops the system message frames nothing new
    dropping.chat_template = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] "
                              "+ '\n' }}{% endif %}{% endfor %}assistant:")
    ability = measure_general_ability(None, dropping, stability=True)
    assert ability.stable_known is None and ability.stability_note == "the chat template drops a system message"


def _ability(known: list[float], kinds: list[str], stable: list[float] | None = None) -> GeneralAbility:
    probes = [Probe(f"p{i}", kind, f"q{i}", "number", "1", False) for i, kind in enumerate(kinds)]
    return GeneralAbility(nll=np.zeros(64), probe_scores=known, probe_outputs=[""] * len(known), probes=probes,
                          format_scores=[None] * len(known), stable_known=stable)


def test_retention_uses_the_stable_set_and_keeps_the_plain_value_beside_it():
    kinds = ["fact"] * 6 + ["reasoning"] * 6
    base = _ability([1.0] * 10 + [0.0] * 2, kinds, stable=[1.0] * 8 + [0.0] * 4)  # probes 8, 9 right by luck
    tuned = _ability([1.0] * 7 + [0.0] * 3 + [1.0, 0.0], kinds)  # loses probe 7 (stable) and 8, 9 (unstable)
    compared = compare_general_ability(base, tuned, 0.05)
    kept = compared["retention"]
    assert (kept["value"], kept["n"]) == (7 / 8, 8)
    assert (kept["definition"], kept["renderings"], kept["unstable"], kept["definition_note"]) == ("stable", 4, 2, None)
    assert (kept["plain"]["value"], kept["plain"]["n"]) == (7 / 10, 10)
    assert kept["plain"] == forgetting.retention(base.probe_scores, tuned.probe_scores)
    assert kept["gained"] == 1  # probe 10: wrong for the base in the plain rendering, right for the tuned model
    assert {k: (v["value"], v["n"]) for k, v in kept["by_kind"].items()} == {"fact": (1.0, 6), "reasoning": (0.5, 2)}
    assert compared["probes"]["by_kind"]["reasoning"]["retention"] == kept["by_kind"]["reasoning"]
    assert kept["flagged"] is False  # 7 of 8: a resample keeps all 8 (7/8)^8 = 34% of the time, so the CI reaches 100%
    assert kept["detectable_drop"] == detectable_drop(8, 0.05)
    assert "of the 8 general probes the base model knows in every framing" in compared["text"]
    assert compared["probes"]["base_accuracy"] == 10 / 12  # the plain accuracies are unchanged
    records = forgetting.probe_records(base, tuned)
    assert [r["base_stable"] for r in records] == base.stable_known

    # without a stable set the result is the plain definition, as before
    plain = compare_general_ability(_ability(base.probe_scores, kinds), tuned, 0.05)["retention"]
    assert (plain["value"], plain["n"], plain["definition"], plain["renderings"], plain["unstable"]) == (0.7, 10, "plain", 1, 0)
    assert plain["plain"] == {k: plain[k] for k in ("value", "ci95", "n")}
    assert "of the 10 general probes the base model knew" in compare_general_ability(
        _ability(base.probe_scores, kinds), tuned, 0.05)["text"]
