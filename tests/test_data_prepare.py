"""prepare_data: the output folder's contract, nothing accepted dropped silently, held-out examples
never in train, fingerprint reuse, blocking errors, and the user's files left untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tunelab.config import DataConfig, Recipe
from tunelab.data.prepare import prepare_data
from tunelab.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def _recipe(**data) -> Recipe:
    return Recipe(model={"name": "tiny-test"}, data=DataConfig(**data))


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _many(n: int, offset: int = 0) -> list[dict]:
    return [_chat(f"Question number {i}: what is {i} squared?", f"{i} squared is {i * i}.") for i in range(offset, offset + n)]


def test_outputs_follow_the_contract(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _many(60))
    prepared = prepare_data(_recipe(train=str(train)), tokenizer, tmp_path / "out")
    out = prepared.out_dir
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "train.tokens.jsonl", "valid.tokens.jsonl",
                 "stats.json", "issues.jsonl", "rejected.jsonl", "fingerprint.json"):
        assert (out / name).is_file(), name
    stats = json.loads((out / "stats.json").read_text())
    counts = stats["counts"]
    assert counts["read"] == counts["accepted"] == 60
    assert counts["train"] + counts["valid"] + counts["test"] + counts["rejected"] == counts["accepted"]
    assert counts["valid"] >= 1 and counts["test"] >= 1
    assert set(stats["quality"]) >= {"exact_duplicates", "near_duplicates", "leakage", "conflicts", "length_outliers", "too_long"}
    assert set(stats["tokens"]) == {"min", "median", "p95", "max", "total", "trainable_total"}
    assert set(stats["issues"]) == {"errors", "warnings", "by_code"}

    conversations = prepared.conversations("train")
    tokenized = {row["id"]: row for row in prepared.tokenized("train")}
    assert len(conversations) == counts["train"] == len(tokenized)
    first = conversations[0]
    assert first["id"].startswith("train-") and first["source"].startswith(f"{train}:")
    row = tokenized[first["id"]]
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tokenizer.decode(trained) == first["messages"][-1]["content"] + "<|im_end|>"
    assert stats["tokens"]["trainable_total"] == sum(
        sum(1 for label in r["labels"] if label != -100) for s in ("train", "valid") for r in prepared.tokenized(s))
    ids = [c["id"] for s in ("train", "valid", "test") for c in prepared.conversations(s)]
    assert len(ids) == len(set(ids))


def test_rejected_examples_are_listed_with_reasons(tmp_path, tokenizer):
    rows = _many(20)
    rows.append(rows[3])  # line 21: exact duplicate of line 4
    rows.append(_chat("Repeat: " + "word " * 400, "word " * 400))  # line 22: too long for 64 tokens
    rows.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]})  # 23
    train = _write(tmp_path / "train.jsonl", rows)
    prepared = prepare_data(_recipe(train=str(train), max_seq_len=64, valid_fraction=0.0, test_fraction=0.0), tokenizer, tmp_path / "out")
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    reasons = {r["source"]: r["reason"] for r in rejected}
    assert reasons == {f"{train}:21": "exact_duplicate", f"{train}:22": "too_long", f"{train}:23": "zero_trainable_tokens"}
    assert f"{train}:4" in next(r["message"] for r in rejected if r["reason"] == "exact_duplicate")
    counts = prepared.stats["counts"]
    assert (counts["accepted"], counts["rejected"], counts["train"]) == (23, 3, 20)
    assert prepared.stats["rejected_by_reason"] == {"exact_duplicate": 1, "too_long": 1, "zero_trainable_tokens": 1}


def test_dedupe_off_keeps_duplicates_with_distinct_ids(tmp_path, tokenizer):
    rows = _many(5) + _many(1)
    train = _write(tmp_path / "train.jsonl", rows)
    prepared = prepare_data(_recipe(train=str(train), dedupe=False, valid_fraction=0.0, test_fraction=0.0), tokenizer, tmp_path / "o")
    ids = [c["id"] for c in prepared.conversations("train")]
    assert len(ids) == 6 == len(set(ids))


def test_held_out_examples_never_appear_in_train(tmp_path, tokenizer):
    train_rows = _many(30)
    long_answer = "Unplug the router, wait thirty seconds for it to discharge, plug it back in and wait for a green light."
    train_rows.append(_chat("How do I reset my router?", long_answer))  # line 31: near-duplicate of test line 2
    train = _write(tmp_path / "train.jsonl", train_rows)
    test = _write(tmp_path / "test.jsonl", [train_rows[4], _chat("How should I reset my router?", long_answer.replace("thirty", "30"))])
    valid = _write(tmp_path / "valid.jsonl", [_chat("Question number 7: what is 7 squared?", "Forty-nine.")])  # same prompt as line 8
    prepared = prepare_data(_recipe(train=str(train), valid=str(valid), test=str(test)), tokenizer, tmp_path / "out")
    train_prompts = {c["messages"][0]["content"] for c in prepared.conversations("train")}
    assert "Question number 4: what is 4 squared?" not in train_prompts
    assert "Question number 7: what is 7 squared?" not in train_prompts
    assert "How do I reset my router?" not in train_prompts
    reasons = {r["source"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    assert reasons == {f"{train}:5": "leakage", f"{train}:8": "leakage", f"{train}:31": "leakage"}
    assert prepared.stats["counts"]["train"] == 28 and prepared.stats["counts"]["test"] == 2


def test_ids_are_stable_when_examples_are_added(tmp_path, tokenizer):
    first = prepare_data(_recipe(train=str(_write(tmp_path / "a.jsonl", _many(40)))), tokenizer, tmp_path / "a")
    second = prepare_data(_recipe(train=str(_write(tmp_path / "b.jsonl", _many(40) + _many(20, 40)))), tokenizer, tmp_path / "b")
    before = {c["id"]: c["messages"] for s in ("train", "valid", "test") for c in first.conversations(s)}
    after = {c["id"]: c["messages"] for s in ("train", "valid", "test") for c in second.conversations(s)}
    assert all(after.get(i) == m for i, m in before.items())  # same id, same split, same example


def test_unchanged_fingerprint_is_reused_and_a_change_recomputes(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _many(30))
    recipe = _recipe(train=str(train))
    first = prepare_data(recipe, tokenizer, tmp_path / "out")
    tokens_file = tmp_path / "out" / "train.tokens.jsonl"
    stamp = tokens_file.stat().st_mtime_ns
    again = prepare_data(recipe, tokenizer, tmp_path / "out")
    assert again.reused and not first.reused and tokens_file.stat().st_mtime_ns == stamp
    assert again.stats == first.stats
    changed = prepare_data(_recipe(train=str(train), max_seq_len=256), tokenizer, tmp_path / "out")
    assert not changed.reused
    _write(train, _many(31))
    assert not prepare_data(_recipe(train=str(train), max_seq_len=256), tokenizer, tmp_path / "out").reused
    fingerprint = json.loads((tmp_path / "out" / "fingerprint.json").read_text())
    assert fingerprint["inputs"]["train"]["sha256"] == _sha(train)
    assert {"tokenizer_sha256", "chat_template_sha256", "settings", "sha256"} <= set(fingerprint)


def test_errors_block_and_still_write_the_issues(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _many(5))
    with train.open("a") as f:
        f.write("{broken\n")
    with pytest.raises(DataError) as err:
        prepare_data(_recipe(train=str(train)), tokenizer, tmp_path / "out")
    assert f"{train}:6: invalid_json" in str(err.value)
    issues = [json.loads(line) for line in (tmp_path / "out" / "issues.jsonl").read_text().splitlines()]
    assert [(i["line"], i["code"]) for i in issues] == [(6, "invalid_json")]
    assert not (tmp_path / "out" / "fingerprint.json").exists()


def test_system_prompt_from_the_recipe(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _many(3))
    prepared = prepare_data(_recipe(train=str(train), system_prompt="Answer with a number.", valid_fraction=0, test_fraction=0),
                            tokenizer, tmp_path / "out")
    assert all(c["messages"][0] == {"role": "system", "content": "Answer with a number."} for c in prepared.conversations("train"))


def test_input_files_are_byte_identical_and_never_overwritten(tmp_path, tokenizer):
    defects = FIXTURES / "defects.jsonl"
    before = _sha(defects)
    with pytest.raises(DataError):
        prepare_data(_recipe(train=str(defects)), tokenizer, tmp_path / "out")
    clean = FIXTURES / "clean_train.jsonl"
    clean_before = _sha(clean)
    prepare_data(_recipe(train=str(clean)), tokenizer, tmp_path / "out2")
    assert _sha(defects) == before and _sha(clean) == clean_before
    train = _write(tmp_path / "train.jsonl", _many(3))
    with pytest.raises(ConfigError):
        prepare_data(_recipe(train=str(train)), tokenizer, tmp_path)  # would write tmp_path/train.jsonl
    assert train.read_text() == "".join(json.dumps(r) + "\n" for r in _many(3))


def test_a_cluster_of_near_duplicates_leaks_as_a_whole(tmp_path, tokenizer):
    answer = ("To reset the router, unplug it from the wall socket, wait for at least thirty seconds so that it "
              "discharges completely, plug it back in, and wait for the status light to turn solid green before "
              "you connect any of your devices to the wireless network again.")
    variants = [answer, answer.replace("thirty", "30"), answer.replace("solid green", "green"), answer.replace("wall socket", "socket")]
    train = _write(tmp_path / "train.jsonl", _many(20) + [_chat(f"Router question {i}?", v) for i, v in enumerate(variants)])
    test = _write(tmp_path / "test.jsonl", [_chat("How should I reset the router?", variants[3].replace("again", "afterwards"))])
    prepared = prepare_data(_recipe(train=str(train), test=str(test), valid_fraction=0.0), tokenizer, tmp_path / "out")
    rejected = {r["source"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    assert rejected == {f"{train}:{line}": "leakage" for line in (21, 22, 23, 24)}
    assert not any("router" in c["messages"][-1]["content"] for c in prepared.conversations("train"))
