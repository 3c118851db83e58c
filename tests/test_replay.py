"""Replay: general examples mixed into training at an exact share, never in validation or test, part of
the data fingerprint; the base model's own answers are generated once per model and quality-checked."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from test_data_prepare import _chat, _many, _write
from tunelab.config import DataConfig, Recipe, TrainConfig
from tunelab.data.passes import auto_epochs
from tunelab.data.prepare import prepare_data
from tunelab.data.replay import (
    AUTO_SHARE,
    MAX_AUTO_SHARE,
    MIN_REPLAY_EXAMPLES,
    MIN_REPLAY_PER_PASS,
    REPLAY_TOKEN_SHARE,
    auto_replay_share,
    decide_replay_share,
    replay_count,
    replay_pool_size,
    replay_prompts,
    replay_share_key,
    token_capped_per_pass,
)
from tunelab.errors import DataError


def _recipe(share, replay=None, **data) -> Recipe:
    return Recipe(model={"name": "tiny-test"}, data=DataConfig(**data),
                  train=TrainConfig(replay=replay, replay_share=share))


def _general(n: int) -> list[dict]:
    return [_chat(f"General question {i}: tell me about colour {i}.", f"Colour {i} is a fine colour.") for i in range(n)]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_replay_share_is_exact_and_replay_never_reaches_valid_or_test(tmp_path, tokenizer, share):
    train = _write(tmp_path / "train.jsonl", _many(120))
    general = _general(200)
    general.append(_many(120)[0])  # a replay prompt equal to one of the user's examples is never used
    replay = _write(tmp_path / "general.jsonl", general)
    prepared = prepare_data(_recipe(share, str(replay), train=str(train)), tokenizer, tmp_path / "out",
                            replay_file=replay)

    task_train = prepared.stats["counts"]["train"]
    replayed = _lines(prepared.path("replay"))
    # each pass reads replay_count of them (tests/test_replay_passes.py); the pool spreads across the passes
    per_pass = prepared.stats["replay"]["per_pass"]
    assert per_pass == replay_count(task_train, share)
    assert len(replayed) == prepared.stats["counts"]["replay"] == replay_pool_size(task_train, per_pass, 200)
    assert abs(per_pass / (task_train + per_pass) - share) <= 0.5 / (task_train + per_pass)
    assert all(r["id"].startswith("replay-") and r["source"].startswith(str(replay)) for r in replayed)
    assert all("General question" in r["messages"][0]["content"] for r in replayed)
    replay_ids = {r["id"] for r in replayed}
    # trained on, and nowhere else: not in valid/test, not in the few-shot/retrieval pool (train.jsonl)
    trained = {row["id"] for row in prepared.tokenized("train")}
    assert replay_ids <= trained and len(trained) == task_train + len(replayed)
    for split in ("train", "valid", "test"):
        assert not replay_ids & {r["id"] for r in prepared.conversations(split)}
        assert not any("General question" in r["messages"][0]["content"] for r in prepared.conversations(split))
    assert not replay_ids & {row["id"] for row in prepared.tokenized("valid")}
    stats = prepared.stats["replay"]
    assert stats["share"] == share and stats["examples"] == len(replayed) and stats["available"] == 200


def test_the_fingerprint_includes_the_replay_file_and_share(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _many(60))
    replay = _write(tmp_path / "general.jsonl", _general(50))
    out = tmp_path / "out"
    first = prepare_data(_recipe(0.2, str(replay), train=str(train)), tokenizer, out, replay_file=replay)
    assert prepare_data(_recipe(0.2, str(replay), train=str(train)), tokenizer, out, replay_file=replay).reused
    assert not prepare_data(_recipe(0.3, str(replay), train=str(train)), tokenizer, out, replay_file=replay).reused
    _write(replay, _general(51))
    again = prepare_data(_recipe(0.3, str(replay), train=str(train)), tokenizer, out, replay_file=replay)
    assert not again.reused
    without = prepare_data(_recipe(0.0, str(replay), train=str(train)), tokenizer, out, replay_file=replay)
    assert not without.reused and without.stats["counts"]["replay"] == 0 and "replay" not in without.stats
    assert _lines(without.path("replay")) == []
    assert first.stats["counts"]["train"] == without.stats["counts"]["train"]  # the user's split is untouched


def test_a_bad_replay_file_names_its_line(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _many(30))
    replay = tmp_path / "general.jsonl"
    replay.write_text(json.dumps(_general(1)[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="general.jsonl:2"):
        prepare_data(_recipe(0.2, str(replay), train=str(train)), tokenizer, tmp_path / "out", replay_file=replay)


def test_auto_share_and_its_reason():
    plan = decide_replay_share(TrainConfig(), Path("answers.jsonl"), task_examples=2000, available=150)
    assert plan.share == AUTO_SHARE and plan.share_source == "auto" and plan.source == "self"
    assert "base model's own answers" in plan.reason
    mine = decide_replay_share(TrainConfig(replay="mine.jsonl", replay_share=0.3), Path("mine.jsonl"))
    assert (mine.share, mine.share_source, mine.source) == (0.3, "recipe", "recipe")
    assert replay_count(90, 0.1) == 10 and replay_count(0, 0.5) == 0 and replay_count(10, 0.0) == 0


@pytest.mark.parametrize(("task", "available", "share", "count", "read"), [
    (2000, 150, 0.1, 222, 0),  # a large set: 10% a pass is already many different prompts
    (144, 150, 0.1, 16, 0),  # exactly where 10% a pass is 16, 48 over 3 passes
    (117, 150, 16 / 133, 16, 48),  # routing's 117: 10% would be 13 a pass; raised to 16, 48 over 3 passes
    (117, 20, 0.1, 13, 0),  # only 20 usable: 7 a pass would read them all; the floor is more
    (20, 150, 0.3, 9, 45),  # 5 passes: 10 / 30 = 33% a pass is more than auto ever takes: 30%
    (117, 0, 0.1, 13, 0),  # nothing usable: the floor (prepare then says only 0 were usable)
])
def test_auto_share_rehearses_enough_different_prompts_beside_a_small_task(task, available, share, count, read):
    assert (MIN_REPLAY_EXAMPLES, MAX_AUTO_SHARE) == (48, 0.3)  # the values the rows below were computed for
    got, reason = auto_replay_share(task, available)
    assert got == pytest.approx(share, abs=1e-12)
    assert replay_count(task, got) == count
    assert reason.startswith(f"auto: {share:.0%} of each pass's training examples")
    if share > AUTO_SHARE:
        assert f"read {read} different general prompts ({count} a pass) beside {task} task examples" in reason
        assert f"(10% would be {replay_count(task, AUTO_SHARE) * math.ceil(auto_epochs(task))}, too few" in reason
    assert ("(the most auto gives)" in reason) == (share == MAX_AUTO_SHARE)


def test_prepare_applies_the_auto_share_to_the_kept_examples_and_fingerprints_the_rule(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _many(120))
    replay = _write(tmp_path / "general.jsonl", _general(100))
    prepared = prepare_data(_recipe("auto", str(replay), train=str(train)), tokenizer, tmp_path / "out",
                            replay_file=replay)
    task = prepared.stats["counts"]["train"]
    share, reason = auto_replay_share(task, 100)
    stats = prepared.stats["replay"]
    assert stats["share"] == share and stats["share_source"] == "auto" and stats["reason"].startswith(reason)
    by_share = replay_count(task, share)
    assert by_share > replay_count(task, AUTO_SHARE)
    assert stats["examples"] == prepared.stats["counts"]["replay"] == replay_pool_size(task, by_share, 100)
    # then held to REPLAY_TOKEN_SHARE of a pass's tokens, from the tokenized rows
    rows = _lines(prepared.out_dir / "train.tokens.jsonl")
    task_tokens = sum(len(r["input_ids"]) for r in rows if not r["id"].startswith("replay-"))
    replay_lengths = [len(r["input_ids"]) for r in rows if r["id"].startswith("replay-")]
    mean = sum(replay_lengths) / len(replay_lengths)
    held = math.floor(REPLAY_TOKEN_SHARE * task_tokens / mean)
    assert stats["per_pass"] == held < by_share  # these general answers are as long as the task's
    assert held * mean <= REPLAY_TOKEN_SHARE * task_tokens < (held + 1) * mean
    assert stats["share_actual"] == held / (task + held)
    assert f"; held to {held} a pass so that replay adds at most 12% to a pass's tokens ({task_tokens} task" in stats["reason"]
    assert replay_share_key(TrainConfig()) == "auto-4/spread-1"
    assert replay_share_key(TrainConfig(replay_share=0.2)) == "0.2/spread-1"


@pytest.mark.parametrize(("per_pass", "task_tokens", "replay_tokens", "held"), [
    (16, 4330, 85.0, 6),  # routing: 117 labels of ~37 tokens; 16 general answers a pass would add 31%
    (30, 20000, 85.0, 28),  # a JSON task: long answers, 30 a pass is already ~13%
    (30, 30000, 85.0, 30),  # within 12%: kept
    (16, 300, 85.0, 2),  # a tiny task still reads a couple
    (0, 4330, 85.0, 0),  # no replay
])
def test_auto_replay_is_held_to_its_share_of_the_tokens(per_pass, task_tokens, replay_tokens, held):
    got, why = token_capped_per_pass(per_pass, task_tokens, replay_tokens)
    assert got == held
    assert (why != "") == (held < per_pass)
    assert held <= max(MIN_REPLAY_PER_PASS, REPLAY_TOKEN_SHARE * task_tokens / replay_tokens) or held == per_pass


def test_replay_prompts_are_not_forgetting_probes():
    from tunelab.eval.forgetting import general_probes

    prompts = {p.lower() for p in replay_prompts()}
    assert len(prompts) == 200
    assert not prompts & {p.prompt.lower() for p in general_probes()}


def _question(text: str) -> str:
    """A prompt without the probes' answer-form suffixes, as lowercase words."""
    text = text.lower()
    for suffix in ("answer in a few words.", "reply with only the number.", "reply with only the numbers.",
                   "no other text.", "reply with that one word only."):
        text = text.replace(suffix, "")
    return " ".join(re.findall(r"[a-z0-9]+", text))


def test_no_replay_prompt_asks_a_probes_question():
    """Replay rehearses the same kinds of skill as the probes (facts, formats, reasoning, conversation) but
    never a probe's own question, even reworded around it: that would teach the measure its answers."""
    from tunelab.eval.forgetting import general_probes

    replay = [_question(p) for p in replay_prompts()]
    clashes = [(probe.prompt, r) for probe in general_probes() for r in replay
               if _question(probe.prompt) in r or r in _question(probe.prompt)]
    assert clashes == []
    assert _question("What is the opposite of up? Answer in a few words.") in _question(
        "Give only the answer: what is the opposite of up?")  # the check sees a question wrapped in another form


def test_replay_prompts_rehearse_output_formats():
    """A task with a strict output format (JSON, one label) pulls every answer into that format; the shipped
    prompts ask for other formats, so replay rehearses following them."""
    prompts = replay_prompts()
    assert sum("json" in p.lower() for p in prompts) >= 10
    assert sum(bool(re.search(r"\b(only|one word|just the|single word)\b", p.lower())) for p in prompts) >= 8


def test_self_replay_is_generated_once_per_model_and_quality_checked(tmp_path, monkeypatch, tiny_model_dir):
    from tunelab.config import ModelConfig
    from tunelab.data.replay import self_replay_path
    from tunelab.engine import generate as generate_module
    from tunelab.engine.generate import Generation
    from tunelab.train.self_replay import build_self_replay

    calls = []

    def fake_generate(model, tokenizer, conversations, settings, batch_size=16, progress=None):
        calls.append(len(conversations))
        return [Generation("A complete short answer." if i % 3 else "Too short", 5, 5, 0.0, 1,
                           "length" if i % 3 == 1 else "stop") for i in range(len(conversations))]

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(generate_module, "generate", fake_generate)
    path = build_self_replay(ModelConfig(name="tiny-test"))
    assert path.is_relative_to(tmp_path / "home")
    rows = _lines(path)
    # kept: ended by itself (stop) with a few words; i % 3 == 0 is too short, i % 3 == 1 was cut off
    assert len(rows) == sum(1 for i in range(len(replay_prompts())) if i % 3 == 2)
    assert all(r["messages"][1]["content"] == "A complete short answer." for r in rows)
    assert build_self_replay(ModelConfig(name="tiny-test")) == path and calls == [len(replay_prompts())]
    assert self_replay_path(ModelConfig(name="tiny-test", revision="other")) != path


def test_no_usable_replay_examples_trains_on_the_task_alone_and_says_so(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _many(40))
    empty = tmp_path / "answers.jsonl"
    empty.write_text("")  # no base-model answer passed the quality check
    prepared = prepare_data(_recipe("auto", train=str(train)), tokenizer, tmp_path / "out", replay_file=empty)
    assert prepared.stats["counts"]["replay"] == 0
    assert prepared.stats["replay"]["examples"] == 0 and "only 0 usable replay examples" in prepared.stats["replay"]["reason"]


def test_preference_pairs_take_no_replay_and_their_folder_is_reused(tmp_path, tokenizer):
    pairs = [{"prompt": f"Say something kind about number {i}.", "chosen": f"{i} is a fine number.",
              "rejected": f"{i} is dull."} for i in range(30)]
    train = _write(tmp_path / "pairs.jsonl", pairs)
    replay = _write(tmp_path / "general.jsonl", _general(20))
    recipe = Recipe(model={"name": "tiny-test"}, method="dpo", data=DataConfig(train=str(train)),
                    train=TrainConfig(replay=str(replay), replay_share=0.5))
    first = prepare_data(recipe, tokenizer, tmp_path / "out", replay_file=replay)
    assert _lines(first.path("replay")) == [] and "replay" not in first.stats
    assert prepare_data(recipe, tokenizer, tmp_path / "out", replay_file=replay).reused
