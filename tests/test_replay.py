"""Replay: general examples mixed into training at an exact share, never in validation or test, part of
the data fingerprint; the base model's own answers are generated once per model and quality-checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_data_prepare import _chat, _many, _write
from tunelab.config import DataConfig, Recipe, TrainConfig
from tunelab.data.pack import IGNORE_INDEX
from tunelab.data.prepare import prepare_data
from tunelab.data.replay import (
    AUTO_SHARE,
    REPLAY_HEAD_TOKENS,
    REPLAY_TOKEN_SHARE,
    auto_per_pass,
    decide_replay_share,
    replay_count,
    replay_head,
    replay_pool_size,
    replay_prompts,
    replay_share_key,
)
from tunelab.data.tokenize import tokenize_for_training
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
    assert f"base model's own answers to general prompts, each its first {REPLAY_HEAD_TOKENS} answer tokens" in plan.reason
    mine = decide_replay_share(TrainConfig(replay="mine.jsonl", replay_share=0.3), Path("mine.jsonl"))
    assert (mine.share, mine.share_source, mine.source) == (0.3, "recipe", "recipe")
    assert replay_count(90, 0.1) == 10 and replay_count(0, 0.5) == 0 and replay_count(10, 0.0) == 0


@pytest.mark.parametrize(("task_tokens", "replay_tokens", "pool", "per_pass", "said"), [
    (4330, 52.0, 158, 9, ""),  # routing: 117 labels of ~37 tokens; 12% of 4330 tokens buys 9 rows of 52
    (27860, 52.2, 158, 64, ""),  # dates: 543 short answers; 64 of the 158 a pass
    (27860, 85.0, 158, 39, ""),  # the same with whole general answers: 39
    (200_000, 52.0, 158, 158, ": every usable one, every pass"),  # a large set: the whole pool each pass
    (300, 52.0, 158, 2, ": at least 2 a pass"),  # a tiny task still reads a couple
    (4330, 52.0, 5, 5, ": every usable one, every pass"),  # only 5 usable
    (4330, 0.0, 0, 0, "only 0 usable replay examples (after the quality check and leaving out prompts of your data)"),
])
def test_auto_replay_spends_its_share_of_the_tokens_on_as_many_prompts_as_it_buys(task_tokens, replay_tokens, pool,
                                                                                   per_pass, said):
    got, why = auto_per_pass(task_tokens, replay_tokens, pool)
    assert got == per_pass
    assert REPLAY_TOKEN_SHARE == 0.12  # the value the rows above were computed for
    if said != ": at least 2 a pass" and pool:
        assert got * replay_tokens <= REPLAY_TOKEN_SHARE * task_tokens  # never more than its share of the tokens
    if said:
        assert why.endswith(said)
    else:
        assert (got + 1) * replay_tokens > REPLAY_TOKEN_SHARE * task_tokens  # and every row the share buys
        assert why == (f"auto: {per_pass} replay examples a pass of the {pool} usable, what 12% of a pass's tokens "
                       f"buys ({task_tokens} task tokens; a replay row is {replay_tokens:.0f} tokens)")


def test_prepare_keeps_every_usable_replay_example_and_a_pass_reads_what_its_tokens_buy(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _many(120))
    replay = _write(tmp_path / "general.jsonl", _general(100))
    prepared = prepare_data(_recipe("auto", str(replay), train=str(train)), tokenizer, tmp_path / "out",
                            replay_file=replay)
    task = prepared.stats["counts"]["train"]
    stats = prepared.stats["replay"]
    assert stats["examples"] == prepared.stats["counts"]["replay"] == stats["available"] == 100
    rows = _lines(prepared.out_dir / "train.tokens.jsonl")
    task_tokens = sum(len(r["input_ids"]) for r in rows if not r["id"].startswith("replay-"))
    replay_lengths = [len(r["input_ids"]) for r in rows if r["id"].startswith("replay-")]
    per_pass, why = auto_per_pass(task_tokens, sum(replay_lengths) / len(replay_lengths), 100)
    assert stats["per_pass"] == per_pass and 2 < per_pass < 100
    assert stats["share"] == stats["share_actual"] == per_pass / (task + per_pass) and stats["share_source"] == "auto"
    assert stats["reason"].startswith(why + "; replay is your general examples (train.replay)")
    # your own general examples are trained whole; self-replay rows are cut to their first answer tokens
    assert replay_share_key(TrainConfig(replay="mine.jsonl")) == "auto-5/spread-1"
    assert replay_share_key(TrainConfig()) == f"auto-5/spread-1/head-{REPLAY_HEAD_TOKENS}.1"
    assert replay_share_key(TrainConfig(replay_share=0.2)) == f"0.2/spread-1/head-{REPLAY_HEAD_TOKENS}.1"


def test_a_replay_head_keeps_the_prompt_and_the_first_answer_tokens_and_trains_no_end_of_turn():
    ids = list(range(100, 120))
    labels = [IGNORE_INDEX] * 6 + ids[6:]  # 14 trained tokens, the last one the end-of-turn
    assert replay_head(ids, labels, 4) == (ids[:10], labels[:10])
    assert replay_head(ids, labels, 13) == (ids, labels)  # 13 answer tokens and the end-of-turn: kept whole
    assert replay_head(ids, labels, 12) == (ids[:18], labels[:18])
    gapped = [IGNORE_INDEX] * 3 + [7, 8] + [IGNORE_INDEX] * 2 + [9, 10, 11]  # two trained turns
    assert replay_head(list(range(10)), gapped, 3) == (list(range(8)), gapped[:8])


def test_self_replay_rows_train_their_first_answer_tokens_and_short_answers_whole(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _many(60))
    long_answer = " ".join(f"word{i}" for i in range(60))
    general = [_chat(f"General question {i}: say a lot.", long_answer) for i in range(20)]
    general += [_chat(f"Short question {i}?", "Yes.") for i in range(20)]
    replay = _write(tmp_path / "general.jsonl", general)
    prepared = prepare_data(_recipe(0.25, None, train=str(train)), tokenizer, tmp_path / "out", replay_file=replay)
    assert prepared.stats["replay"]["source"] == "self"
    pool = {r["id"]: r["messages"] for r in _lines(prepared.path("replay"))}
    rows = [r for r in _lines(prepared.out_dir / "train.tokens.jsonl") if r["id"] in pool]
    assert len(rows) == len(pool) > 0
    cut = whole = 0
    for row in rows:
        full = tokenize_for_training(tokenizer, pool[row["id"]])[0]
        trained = [t for t in range(1, len(row["labels"])) if row["labels"][t] != IGNORE_INDEX]
        if full.trainable_tokens <= REPLAY_HEAD_TOKENS + 1:
            assert (row["input_ids"], row["labels"]) == (full.input_ids, full.labels)  # with its end-of-turn
            whole += 1
        else:
            assert len(trained) == REPLAY_HEAD_TOKENS and trained[-1] == len(row["labels"]) - 1
            assert row["input_ids"] == full.input_ids[: len(row["input_ids"])]  # a prefix: the prompt is whole
            assert row["labels"] == full.labels[: len(row["labels"])]
            cut += 1
    assert cut and whole
    # the user's own task rows are never cut
    task = {r["id"]: r["messages"] for r in prepared.conversations("train")}
    task_rows = [r for r in _lines(prepared.out_dir / "train.tokens.jsonl") if r["id"] not in pool]
    assert len(task_rows) == len(task) > 0
    for row in task_rows:
        full = tokenize_for_training(tokenizer, task[row["id"]])[0]
        assert (row["input_ids"], row["labels"]) == (full.input_ids, full.labels)


def test_replay_prompts_are_not_forgetting_probes():
    from tunelab.eval.forgetting import general_probes

    prompts = {p.lower() for p in replay_prompts()}
    assert len(prompts) == 224
    assert not prompts & {p.prompt.lower() for p in general_probes()}


def test_no_replay_prompt_names_a_json_probes_key_or_value():
    """Replay asks for small JSON objects (a JSON task pulls every answer into its own shape), with keys and
    values of its own: a probe's key or value in a replay prompt would rehearse the probe's answer."""
    from tunelab.eval.forgetting import general_probes

    answers = [json.loads(probe.answer) for probe in general_probes() if probe.rule == "json"]
    keys = {key for answer in answers for key in answer}
    values = {value for answer in answers for value in answer.values()}
    assert keys == {"color", "city", "animal", "fruit", "name", "sport"}
    assert values == {"tiger", "alice", "green", "banana", "tennis"}
    asking_json = [p.lower() for p in replay_prompts() if "json" in p.lower()]
    assert len(asking_json) >= 30
    assert [(p, v) for p in asking_json for v in values if f'"{v}"' in p] == []
    # one key in common: "name", in a two-key person record (Ben, 30), never with a probe's value
    assert {k for p in asking_json for k in keys if f'"{k}"' in p} == {"name"}


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
