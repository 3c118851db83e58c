"""Preference pairs: the three input shapes read to the same pair, every defect class with its
file:line and code, and the prepared folder (labels on the answers only, leakage dropped)."""

from __future__ import annotations

import json

import pytest

from tunelab.config import load_recipe
from tunelab.data.check import check_data
from tunelab.data.preference import is_preference_file, read_pairs


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def openai_pair(prompt, good, bad, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {"input": {"messages": messages}, "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


def test_openai_trl_and_sharegpt_pairs_read_to_the_same_pair(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        openai_pair("Hi there", "Hello!", "What do you want?"),
        {"prompt": "Hi there", "chosen": "Hello!", "rejected": "What do you want?"},
        {"prompt": [{"role": "user", "content": "Hi there"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "What do you want?"}]},
        # TRL's implicit prompt: whole conversations sharing their beginning
        {"chosen": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "What do you want?"}]},
        {"conversations": [{"from": "human", "value": "Hi there"}], "chosen": {"from": "gpt", "value": "Hello!"},
         "rejected": {"from": "gpt", "value": "What do you want?"}, "topic": "greeting"},
    ])
    assert is_preference_file(path)
    read = list(read_pairs(path))
    assert [issues for _, issues in read] == [[]] * 5
    pairs = [pair for pair, _ in read]
    assert [p.format for p in pairs] == ["openai_dpo", "trl", "trl", "trl", "sharegpt_pair"]
    for pair in pairs:
        assert pair.prompt == [{"role": "user", "content": "Hi there"}]
        assert (pair.chosen, pair.rejected) == ("Hello!", "What do you want?")
    assert [p.line for p in pairs] == [1, 2, 3, 4, 5]
    assert pairs[4].extra == {"topic": "greeting"}


def test_every_pair_defect_is_reported_with_its_line_and_code(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [
        openai_pair("Q1", "good", "bad"),                                                  # 1 fine
        openai_pair("Q2", "same answer", "same answer"),                                   # 2 identical
        openai_pair("Q3", "", "bad"),                                                      # 3 empty preferred
        {"prompt": "Q4", "chosen": "good"},                                                # 4 rejected missing
        {"prompt": [{"role": "user", "content": "Q5"}, {"role": "assistant", "content": "A"}],
         "chosen": "good", "rejected": "bad"},                                             # 5 prompt ends with assistant
        {"prompt": "Q6", "chosen": 42, "rejected": "bad"},                                 # 6 answer not text
        {"messages": [{"role": "user", "content": "Q7"}, {"role": "assistant", "content": "A"}]},  # 7 chat record
        openai_pair("Q1", "good", "bad"),                                                  # 8 duplicate of 1
        {"prompt": [{"role": "system", "content": 9}, {"role": "user", "content": "Q9"}],
         "chosen": "good", "rejected": "bad"},                                             # 9 a chat rule
    ])
    valid = write_jsonl(tmp_path / "valid.jsonl", [openai_pair("q1 ", "other", "answers")])  # leaks train line 1's prompt
    report = check_data(train, valid, measure_speed=False)
    found = {(issue.path.rsplit("/", 1)[-1], issue.line, issue.code) for issue in report.issues}
    assert found == {
        ("train.jsonl", 2, "identical_pair"), ("train.jsonl", 3, "empty_side"), ("train.jsonl", 4, "empty_side"),
        ("train.jsonl", 5, "prompt_not_user"), ("train.jsonl", 6, "bad_side"), ("train.jsonl", 7, "not_a_pair"),
        ("train.jsonl", 8, "duplicate_pair"), ("train.jsonl", 9, "content_not_string"), ("valid.jsonl", 1, "leakage_exact"),
    }
    assert report.exit_code == 1
    assert (report.records, report.examples) == (10, 3)
    duplicate = next(i for i in report.issues if i.code == "duplicate_pair")
    assert duplicate.related == (f"{train}:1",)


LATE = ("My order 48213 with the blue kettle was supposed to arrive last Tuesday and it still has not shown up at "
        "my door. Can you tell me where it is and when I will finally get it?")
REFUND = ("I returned the yoga mat from order 77120 two weeks ago using your prepaid label and I have still not "
          "received my refund. Please check what happened to my money.")


def test_near_duplicate_pairs_and_prompts_near_a_held_out_prompt_are_reported_with_file_line(tmp_path):
    calm = "Hi Anna, the tracking link for your kettle is in your inbox; it arrives on Friday. Warm regards."
    shout = "Sorry!!! We are very sorry about the delay, it will come ASAP!!! Sorry again."
    train = write_jsonl(tmp_path / "train.jsonl", [
        openai_pair(LATE, calm, shout),                                                          # 1
        openai_pair(REFUND, "Hi Ben, your refund was sent today. Warm regards.", "Refunds take time!!!"),  # 2
        openai_pair(LATE.replace("last Tuesday", "last Thursday"), calm.replace("Friday", "Friday morning"),
                    shout + " Really."),                                                         # 3 nearly line 1
        openai_pair(REFUND, "Hello Ben, we found the mat and your money is on its way back to you.",
                    "Please wait for our warehouse to process returns, there is nothing we can do."),  # 4 line 2's prompt, other answers
        openai_pair(LATE, "Hello, which order do you mean? Please send me the number.", "No idea."),  # 5 line 1's prompt, other answers
    ])
    valid = write_jsonl(tmp_path / "valid.jsonl", [
        openai_pair(REFUND.replace("two weeks ago", "three weeks ago"), "other", "answers"),    # 1 nearly line 2's prompt
        openai_pair("What are your opening hours on public holidays in December?", "9 to 5.", "Dunno."),  # 2 unrelated
    ])
    report = check_data(train, valid, measure_speed=False)
    found = [(issue.path.rsplit("/", 1)[-1], issue.line, issue.code, tuple(r.rsplit("/", 1)[-1] for r in issue.related))
             for issue in report.issues]
    assert found == [
        ("train.jsonl", 3, "near_duplicate", ("train.jsonl:1",)),
        ("valid.jsonl", 1, "leakage_near", ("train.jsonl:2", "train.jsonl:4")),
    ]
    assert report.exit_code == 0  # warnings: prepare acts on them
    assert report.quality == {"duplicate_pairs": 0, "leakage": 1, "near_duplicates": 1}
    assert "similar to train pair" in report.issues[1].message


def test_near_duplicate_checks_can_be_capped(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [openai_pair(REFUND, "good", "bad")])
    valid = write_jsonl(tmp_path / "valid.jsonl", [openai_pair(REFUND + " Thanks.", "x", "y")])
    assert [i.code for i in check_data(train, valid, measure_speed=False).issues] == ["leakage_near"]
    capped = check_data(train, valid, measure_speed=False, near_dup_max_examples=0)
    assert capped.issues == [] and capped.quality["leakage"] == 0


def test_a_side_over_max_seq_len_after_the_template_is_too_long(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [
        openai_pair("short", "fine", "also fine"),
        openai_pair("short", "fine", "word " * 200),
    ])
    report = check_data(train, tokenizer=tokenizer, max_seq_len=64, measure_speed=False)
    assert [(i.line, i.code) for i in report.issues] == [(2, "too_long")]
    assert "rejected answer" in report.issues[0].message
    assert report.quality["too_long"] == 1


def test_data_check_cli_lists_pair_problems_and_exits_1(tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    train = write_jsonl(tmp_path / "train.jsonl", [openai_pair("Q", "x", "x")])
    result = CliRunner().invoke(app, ["data", "check", str(train), "--no-tokens"])
    assert result.exit_code == 1
    assert f"{train}:1: identical_pair:" in result.output


def _prepare(tmp_path, tokenizer, records, test=None):
    from tunelab.data.prepare import prepare_data

    train = write_jsonl(tmp_path / "train.jsonl", records)
    overrides = [f"data.train={train}", "method=dpo", "model.name=tiny-test", "data.max_seq_len=128"]
    if test is not None:
        overrides.append(f"data.test={write_jsonl(tmp_path / 'test.jsonl', test)}")
    return prepare_data(load_recipe(None, overrides), tokenizer, tmp_path / "out")


def test_prepare_writes_pairs_with_labels_on_each_answer_only(tmp_path, tokenizer):
    records = [openai_pair(f"Question {i}?", f"Good answer {i}.", f"bad {i}") for i in range(30)]
    records.append(openai_pair("Question 0?", "Another good one.", "another bad"))  # same prompt as line 1
    prepared = _prepare(tmp_path, tokenizer, records)
    counts = prepared.stats["counts"]
    assert counts["train"] + counts["valid"] + counts["test"] + counts["rejected"] == 31
    assert prepared.stats["kind"] == "preference"
    rows = {row["id"]: row for row in prepared.conversations("train")}
    for token_row in prepared.tokenized("train"):
        row = rows[token_row["id"]]
        n = token_row["chosen_tokens"]
        assert token_row["loss_units"] == 1
        chosen = [t for t in token_row["labels"][:n] if t != -100]
        rejected = [t for t in token_row["labels"][n:] if t != -100]
        assert tokenizer.decode(chosen) == row["messages"][-1]["content"] + "<|im_end|>"
        assert tokenizer.decode(rejected) == row["rejected"] + "<|im_end|>"
        # both sides start with the same prompt tokens
        prompt_len = token_row["labels"].index(chosen[0])
        assert token_row["input_ids"][:prompt_len] == token_row["input_ids"][n : n + prompt_len]
    # the two pairs of "Question 0?" share a split
    splits = {}
    for split in ("train", "valid", "test"):
        for row in prepared.conversations(split):
            if row["messages"][-2]["content"] == "Question 0?":
                splits[row["rejected"]] = split
    assert len(set(splits.values())) == 1 and len(splits) == 2


def test_prepare_drops_training_pairs_leaking_into_a_chat_test_file(tmp_path, tokenizer):
    records = [openai_pair(f"Question {i}?", f"Good answer {i}.", f"bad {i}") for i in range(12)]
    test = [{"messages": [{"role": "user", "content": "Question 3?"}, {"role": "assistant", "content": "Good answer 3."}]}]
    prepared = _prepare(tmp_path, tokenizer, records, test=test)
    rejected = [json.loads(line) for line in (prepared.out_dir / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"].rsplit("/", 1)[-1], r["reason"]) for r in rejected] == [("train.jsonl:4", "leakage")]
    test_rows = prepared.conversations("test")
    assert test_rows[0]["messages"][-1]["content"] == "Good answer 3." and "rejected" not in test_rows[0]


def test_prepare_drops_training_pairs_whose_prompt_nearly_equals_a_test_prompt(tmp_path, tokenizer):
    records = [openai_pair(f"{REFUND} (ticket {i}{i}{i}{i})" if i == 5 else f"Question number {i} about something "
                           f"else entirely: {'abcdefghijklmnop'[i] * 12}?", f"Good answer {i}.", f"bad {i}") for i in range(12)]
    test = [{"messages": [{"role": "user", "content": REFUND}, {"role": "assistant", "content": "Your refund is on its way."}]}]
    prepared = _prepare(tmp_path, tokenizer, records, test=test)
    rejected = [json.loads(line) for line in (prepared.out_dir / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"].rsplit("/", 1)[-1], r["reason"]) for r in rejected] == [("train.jsonl:6", "leakage")]
    issues = [json.loads(line) for line in (prepared.out_dir / "issues.jsonl").read_text().splitlines()]
    assert [(i["code"], i["line"]) for i in issues] == [("leakage_near", 1)]
    assert prepared.stats["quality"]["leakage"] == 1


def test_prepare_refuses_pairs_with_errors(tmp_path, tokenizer):
    from tunelab.errors import DataError

    with pytest.raises(DataError, match=r"identical_pair 1.*train.jsonl:2"):
        _prepare(tmp_path, tokenizer, [openai_pair("a", "b", "c"), openai_pair("d", "e", "e")])


def test_a_file_of_pairs_is_prepared_as_pairs_whatever_the_method_and_sft_refuses_them(tmp_path, tokenizer):
    from tunelab.data.prepare import prepare_data
    from tunelab.errors import ConfigError
    from tunelab.train.preference import rows_for_pairs

    train = write_jsonl(tmp_path / "train.jsonl", [openai_pair(f"Q{i}", f"good {i}", f"bad {i}") for i in range(10)])
    recipe = load_recipe(None, [f"data.train={train}", "model.name=tiny-test"])  # method lora: `data prepare`'s recipe
    prepared = prepare_data(recipe, tokenizer, tmp_path / "out")
    assert prepared.stats["kind"] == "preference"
    rows = prepared.tokenized("train")
    with pytest.raises(ConfigError, match="holds preference pairs: train on them with method: dpo"):
        rows_for_pairs(recipe, rows)
    chat = [{"input_ids": [1, 2], "labels": [-100, 2]}]
    with pytest.raises(ConfigError, match="method: dpo trains on preference pairs, but data.train"):
        rows_for_pairs(load_recipe(None, ["method=dpo"]), chat)
    doubled = rows_for_pairs(load_recipe(None, ["method=dpo", "data.max_seq_len=100"]), rows)
    assert doubled.data.max_seq_len == 200


# ---------------------------------------------------------------------------------------------- unpaired (kto)


def kto(prompt, completion, label, **extra):
    return {"prompt": prompt, "completion": completion, "label": label, **extra}


def test_unpaired_examples_and_their_defects_are_reported_with_file_line(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [
        kto("Q1", "good", True),                                                   # 1 fine
        kto("Q2", "bad answer", False),                                            # 2 fine
        kto("Q3", "x", "yes"),                                                     # 3 label not a boolean
        kto("Q4", "", True),                                                       # 4 empty completion
        kto([{"role": "user", "content": "Q5"}, {"role": "assistant", "content": "A"}], "x", True),  # 5 prompt ends with assistant
        kto("Q1", "good", False),                                                  # 6 line 1 with the other label
        kto("Q2", "bad answer", False),                                            # 7 duplicate of 2
        openai_pair("Q8", "good", "bad"),                                          # 8 a pair among unpaired examples
        kto([{"role": "user", "content": "Q9"}], [{"role": "assistant", "content": "fine"}], True, topic="t"),  # 9 messages
    ])
    assert is_preference_file(train)
    report = check_data(train, measure_speed=False)
    found = [(issue.line, issue.code) for issue in report.issues]
    assert sorted(found) == [(3, "bad_label"), (4, "empty_side"), (5, "prompt_not_user"), (6, "conflicting_label"),
                             (7, "duplicate_pair"), (8, "not_a_pair")]
    by_code = {issue.code: issue for issue in report.issues}
    assert "'completion' is empty" in by_code["empty_side"].message
    assert by_code["conflicting_label"].related == (f"{train}:1",)
    assert "among unpaired" in by_code["not_a_pair"].message
    assert report.formats["kto"] == 5 and report.exit_code == 1
    pairs = [pair for pair, _ in read_pairs(train) if pair is not None]
    assert [(p.line, p.label, p.rejected) for p in pairs if p.format == "kto"] == [
        (1, True, None), (2, False, None), (6, False, None), (7, False, None), (9, True, None)]
    assert pairs[-1].chosen == "fine" and pairs[-1].extra == {"topic": "t"}


def test_prepare_writes_unpaired_rows_with_a_mismatched_kl_side(tmp_path, tokenizer):
    from tunelab.data.prepare import prepare_data

    records = [kto(f"Question {i}?", f"Answer number {i}.", i % 3 != 0) for i in range(9)]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    valid = write_jsonl(tmp_path / "valid.jsonl", [kto("Held out?", "Held answer.", True),
                                                   kto("Held out two?", "Bad held answer.", False)])
    recipe = load_recipe(None, [f"data.train={train}", f"data.valid={valid}", "data.test_fraction=0", "method=dpo",
                                "dpo.loss=kto", "model.name=tiny-test", "data.max_seq_len=128"])
    prepared = prepare_data(recipe, tokenizer, tmp_path / "out")
    assert prepared.stats["counts"]["labels"] == {"desirable": 7, "undesirable": 4}
    rows = {row["id"]: row for split in ("train", "valid") for row in prepared.conversations(split)}
    for split in ("train", "valid"):
        tokens = prepared.tokenized(split)
        completions = [rows[t["id"]]["messages"][-1]["content"] for t in tokens]
        for k, token_row in enumerate(tokens):
            row = rows[token_row["id"]]
            n = token_row["chosen_tokens"]
            assert token_row["kto_label"] == int(row["label"]) and "rejected" not in row
            completion = tokenizer.decode([t for t in token_row["labels"][:n] if t != -100])
            kl_side = tokenizer.decode([t for t in token_row["labels"][n:] if t != -100])
            assert completion == row["messages"][-1]["content"] + "<|im_end|>"
            # the KL side: the same prompt, the previous example's completion (the first takes the last's)
            assert kl_side == completions[k - 1] + "<|im_end|>"
            prompt_len = token_row["labels"].index(next(t for t in token_row["labels"] if t != -100))
            assert token_row["input_ids"][:prompt_len] == token_row["input_ids"][n : n + prompt_len]


def test_kto_examples_with_a_pair_loss_are_refused_and_pairs_with_kto(tmp_path):
    from tunelab.errors import ConfigError
    from tunelab.train.preference import rows_for_pairs

    unpaired = [{"id": "a", "input_ids": [1, 2], "labels": [1, 2], "chosen_tokens": 1, "loss_units": 1, "kto_label": 1}]
    pairs = [{"id": "a", "input_ids": [1, 2], "labels": [1, 2], "chosen_tokens": 1, "loss_units": 1}]
    with pytest.raises(ConfigError, match="train on them with dpo.loss: kto"):
        rows_for_pairs(load_recipe(None, ["method=dpo"]), unpaired)
    with pytest.raises(ConfigError, match="holds pairs"):
        rows_for_pairs(load_recipe(None, ["method=dpo", "dpo.loss=kto"]), pairs)
    assert rows_for_pairs(load_recipe(None, ["method=dpo", "dpo.loss=kto"]), unpaired).data.max_seq_len == 1024
