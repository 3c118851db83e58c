"""Repetition in answers (eval/repetition.py): the definition on synthetic predictions, the rule that makes
the verdict mention it with its seeded error rates, and metrics.json / report on an evaluated fake run."""

from __future__ import annotations

import dataclasses
import json
import random
from types import SimpleNamespace

import pytest

from tunelab.eval.repetition import (
    arm_repetition,
    looping_words,
    repeated_line,
    repeats,
    repeats_clearly_more,
    repetition_note,
)

# answers of the DPO run measured in bench/results/dpo_goal.json (tuned) and of its supervised parent (sft)
DPO_LOOP = ("Dear Goran,\nWe apologize for any inconvenience you may have had regarding the yoga mat. We are replying to "
            "your inquiry.\nWe are replying to your request for a refund of the Yoga Mat.\nWe are replying to your "
            "inquiry.\nWe are replying to your request for a refund of the Yoga Mat.\nWe are rep")
DPO_SIGNOFF = ("Hi Hana,\nThank you for your patience. You're a Brightside Club member.\nYour password is 56441.\nBest "
               "Brightside Support.\nHana Hana\nBrightside Support\nBrightside Support\nBrightside Support\nBrightside")
SFT = ("Dear Goran,\nThank you for your patience and understanding. We apologize for any inconvenience you may have "
       "experienced. We regret any inconvenience you may have had.\n\nWe are currently working on a refund of the Yoga "
       "Mat. We will be offering a refund of the Yoga Mat for your order.\n\nWe hope this will be a positive experience")
CLEAN = "Dear Elif Horvat,\nYour desk lamp is #76671. It's a standard model.\nWarm regards, Brightside Support"


@pytest.mark.parametrize(("text", "line", "loop"), [
    (DPO_LOOP, True, False),
    (DPO_SIGNOFF, True, True),                                 # the sign-off line said 3 times in a row
    (SFT, False, False),
    (CLEAN, False, False),
    ("We are  Replying.\nwe are replying.", True, False),     # case and spacing ignored
    ('{\n  "a": 1\n},\n{\n  "a": 1\n},\n}', True, False),       # '"a": 1' has two words; "}," and "{" have none
    ("}\n}\n-\n-\nOK", False, False),                          # lines of fewer than two words never count
    ("Thanks, thanks thanks, THANKS thanks thanks!", False, True),  # one word six times in a row
    ("very very very good", False, False),                     # three in a row is not six words
    ("thank you thank you thank you", False, True),            # two words three times: six words
    ("a b c a b c x", False, False),                           # twice is not a loop
    ("one two three four one two three four one two three", False, False),  # 11 words < 3 x 4
    ("one two three four one two three four one two three four", False, True),
    ("", False, False),
])
def test_repeats_by_definition(text, line, loop):
    assert repeated_line(text) is line
    assert looping_words(text) is loop
    assert repeats(text) is (line or loop)


def test_arm_repetition_counts_each_answer_once():
    both = "go go go go go go\ngo go go go go go"
    out = arm_repetition([DPO_LOOP, DPO_SIGNOFF, SFT, CLEAN, both])
    assert out["n"] == 5 and out["repeated_line"] == 3 and out["looping_words"] == 2
    assert out["share"] == pytest.approx(3 / 5)
    assert arm_repetition([])["share"] is None


def test_clearly_more_needs_a_significant_paired_excess():
    # 6 answers only the tuned arm repeats, none the other way: p = 1/64
    clearly, share_t, share_o, p = repeats_clearly_more([True] * 6 + [False] * 4, [False] * 10)
    assert clearly and share_t == 0.6 and share_o == 0.0 and p == pytest.approx(1 / 64)
    # 4 of 4 discordant: p = 1/16 > 0.05
    assert not repeats_clearly_more([True] * 4 + [False] * 6, [False] * 10)[0]
    # both repeat on the same answers: no discordant pairs, nothing to say
    assert not repeats_clearly_more([True] * 8, [True] * 8)[0]
    # the other arm repeats more: never flagged for the tuned arm
    assert not repeats_clearly_more([False] * 10, [True] * 10)[0]
    # significant but a tiny gap (1,000 answers, 40 vs 10 discordant = 3 points): below MIN_SHARE_GAP
    tuned = [True] * 40 + [False] * 10 + [False] * 950
    other = [False] * 40 + [True] * 10 + [False] * 950
    clearly, share_t, share_o, p = repeats_clearly_more(tuned, other)
    assert p < 0.001 and share_t - share_o == pytest.approx(0.03) and not clearly


def test_clearly_more_false_alarms_and_power_seeded_simulation():
    """Error rates of the rule at n = 120 paired answers: with both arms repeating alike (independently,
    10% or 30%) it fires in at most 5% of draws; when the tuned arm repeats 30% and the other 5%, it
    fires in at least 95%."""
    rng = random.Random(0)

    def rate(p_tuned, p_other, draws=2000, n=120):
        fired = 0
        for _ in range(draws):
            tuned = [rng.random() < p_tuned for _ in range(n)]
            other = [rng.random() < p_other for _ in range(n)]
            fired += repeats_clearly_more(tuned, other)[0]
        return fired / draws

    assert rate(0.10, 0.10) <= 0.05
    assert rate(0.30, 0.30) <= 0.05
    assert rate(0.30, 0.05) >= 0.95


def test_repetition_note_names_both_arms_and_shares():
    note = repetition_note("tuned", [DPO_LOOP] * 6 + [CLEAN] * 4, "sft", [SFT] * 10)
    assert note.startswith("The tuned arm's answers repeat themselves more often than sft's: 60% repeat a line or")
    assert "against 0% (p = 0.0156;" in note
    assert repetition_note("tuned", [CLEAN] * 10, "sft", [DPO_LOOP] * 10) is None


def test_verdict_mentions_repetition_of_the_arm_it_recommends():
    from tunelab.eval.run import _mention_repetition

    texts = {"tuned": [DPO_SIGNOFF] * 7, "prompt": [CLEAN] * 7}
    generated = SimpleNamespace(generations=texts, texts=lambda arm: texts[arm])
    verdict = {"best_arm": "tuned", "vs": "prompt", "headline": "Use tuned.", "text": "Use tuned. It wins."}
    _mention_repetition(verdict, generated)
    assert verdict["headline"].startswith("Use tuned. The tuned arm's answers repeat themselves more often than prompt's")
    assert verdict["text"] == verdict["headline"] + " It wins."
    assert verdict["repetition_note"] in verdict["text"]
    # the prompt-only arm repeating more says nothing against the tuned arm
    quiet = {"best_arm": "tuned", "vs": "prompt", "headline": "Use tuned.", "text": "Use tuned."}
    _mention_repetition(quiet, SimpleNamespace(generations=texts, texts=lambda arm: texts["prompt" if arm == "tuned" else "tuned"]))
    assert quiet == {"best_arm": "tuned", "vs": "prompt", "headline": "Use tuned.", "text": "Use tuned."}


def test_evaluation_writes_repetition_per_arm_and_the_report_shows_it(tmp_path, tiny_model_dir, monkeypatch):
    """A fake run whose fine-tuned arms (adapter on) answer with a looping sign-off: arms.<arm>.repetition
    agrees with eval/predictions.jsonl, the verdict says so, the report lists the shares."""
    from test_eval_run import build_fake_run
    from tunelab.eval import run as run_module
    from tunelab.models import load_model
    from tunelab.report.html import write_report

    run_dir = build_fake_run(tmp_path / "runs" / "fake", load_model("tiny-test", device="cpu"))
    real_generate = run_module._timed_generate

    def looping_when_tuned(inputs, bar, label, model, conversations):
        gens, wall_s = real_generate(inputs, bar, label, model, conversations)
        if label in ("tuned", "tuned+rag"):
            gens = [dataclasses.replace(g, text="Brightside Support\nBrightside Support") for g in gens]
        return gens, wall_s

    monkeypatch.setattr(run_module, "_timed_generate", looping_when_tuned)
    metrics = run_module.evaluate(run_dir, echo=False)
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    for arm, result in metrics["arms"].items():
        outputs = [r["output"] for r in rows if r["arm"] == arm]
        assert result["repetition"]["n"] == len(outputs) == 6
        assert result["repetition"]["share"] == pytest.approx(sum(map(repeats, outputs)) / 6)
    assert metrics["arms"]["tuned"]["repetition"]["share"] == 1.0
    verdict = metrics["verdict"]
    vs_share = metrics["arms"][verdict["vs"]]["repetition"]["share"]
    assert vs_share == 0.0
    note = "The tuned arm's answers repeat themselves more often than base's: 100% repeat a line or loop on the same"
    assert verdict["best_arm"] == "tuned" and verdict["vs"] == "base"
    assert note in verdict["text"] and note in verdict["headline"] and verdict["repetition_note"].startswith(note)
    saved = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert saved["arms"]["tuned"]["repetition"]["repeated_line"] == 6

    write_report(run_dir)
    markdown = (run_dir / "report.md").read_text()
    assert "Answers that repeat a line or loop on the same words (%): " in markdown
    assert "tuned 100.0" in markdown and f"{verdict['vs']} 0.0" in markdown
    assert "answers repeating a line or looping (%)" in (run_dir / "report.html").read_text()


def test_dpo_vs_sft_sentence_mentions_repetition(tmp_path):
    """A dpo run's `preference.vs_sft` (eval/preference.py): its text gains the note when the tuned answers
    repeat clearly more than the supervised parent's, and not the other way round."""
    from tunelab.config import load_recipe
    from tunelab.eval.preference import preference_section
    from tunelab.runs import RunPaths

    recipe = load_recipe(None, ["method=dpo", "model.name=tiny-test"])
    test = [SimpleNamespace(id=f"t{i}", context=[{"role": "user", "content": "hi"}], reference=CLEAN) for i in range(8)]
    inputs = SimpleNamespace(paths=RunPaths(tmp_path), cfg=recipe.eval, recipe=recipe, test=test,
                             models=SimpleNamespace(tuned_kind="adapter"), primary=SimpleNamespace(name="house_voice"))

    def section(tuned_texts, sft_texts):
        texts = {"tuned": tuned_texts, "sft": sft_texts}
        scored = SimpleNamespace(arms={"tuned": {}, "sft": {}}, per_example={"tuned": [0.5] * 8, "sft": [0.5] * 8})
        return preference_section(inputs, SimpleNamespace(texts=lambda arm: texts[arm]), scored)["vs_sft"]

    looped = section([DPO_LOOP] * 7 + [CLEAN], [SFT] * 8)
    assert looped["repetition_note"].startswith("The tuned arm's answers repeat themselves more often than sft's: 88%")
    assert looped["text"].endswith(looped["repetition_note"])
    assert looped["text"].startswith("DPO does not differ significantly from its supervised parent on house_voice")
    fine = section([CLEAN] * 8, [DPO_LOOP] * 8)
    assert "repetition_note" not in fine and "repeat" not in fine["text"]
