"""The general-ability probe: deterministic probes and scorers, and it flags a damaged model only."""

from __future__ import annotations

import copy
import json

import pytest

from tunelab.eval.forgetting import (
    compare_general_ability,
    general_probes,
    general_text,
    measure_general_ability,
    score_probe,
)


def test_general_text_ships_with_the_package():
    text = general_text()
    assert 2000 <= len(text.encode("utf-8")) <= 4096
    assert text.isascii() and "http" not in text


def test_probes_are_seeded_and_cover_three_kinds():
    probes = general_probes(0)
    assert len(probes) == 40
    assert general_probes(0) == probes
    assert general_probes(1) != probes
    assert {p.kind for p in probes} == {"arithmetic", "fact", "format"}
    assert len({p.id for p in probes}) == 40


def _canonical_answer(probe) -> str:
    expected = json.loads(probe.answer)
    return {
        "number": lambda: f"The answer is {expected}.",
        "contains": lambda: f"It is {expected[0].title()}.",
        "upper_word": lambda: expected,
        "json": lambda: json.dumps(expected),
        "sequence": lambda: ", ".join(str(n) for n in expected),
        "same_text": lambda: expected,
    }[probe.rule]()


def test_every_probe_accepts_its_answer_and_rejects_a_wrong_one():
    for probe in general_probes(0):
        assert score_probe(probe, _canonical_answer(probe)) == 1.0, probe
        assert score_probe(probe, "I do not know, sorry") == 0.0, probe


def test_probe_scorers_hand_cases():
    probes = {p.rule: p for p in general_probes(0)}
    upper = probes["upper_word"]
    word = json.loads(upper.answer)
    assert score_probe(upper, f'"{word}".') == 1.0
    assert score_probe(upper, word.lower()) == 0.0
    assert score_probe(probes["json"], "```json\n" + probes["json"].answer + "\n```") == 1.0
    numbers = json.loads(probes["sequence"].answer)
    assert score_probe(probes["sequence"], ", ".join(map(str, numbers[:-1]))) == 0.0


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

    barely = compare_general_ability(base, measure_general_ability(_noised(model, 0.01), tokenizer, batch_size=40), 0.05)
    assert not barely["flagged"]  # a tiny change stays under the threshold

    damaged = compare_general_ability(base, measure_general_ability(_noised(model, 1.0), tokenizer, batch_size=40), 0.05)
    assert damaged["flagged"] and damaged["perplexity"]["flagged"]
    assert damaged["perplexity"]["tuned"] > base.perplexity * 1.05
    lo, hi = damaged["perplexity"]["ci95"]
    assert 0 < lo <= damaged["perplexity"]["relative_change"] <= hi
    assert damaged["text"].startswith("flagged: perplexity on general text rose")
