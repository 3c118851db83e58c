"""The prompt builder: what each arm sees, and that test examples never reach few-shot or retrieval pools."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import DataError
from tunelab.eval.arms import (
    EvalExample,
    PromptBuilder,
    build_document_pool,
    build_pool,
    derive_instructions,
    prompt_hash,
    to_eval_example,
)
from tunelab.eval.retrieval import BM25Index, Chunk, chunk_text, read_document_chunks

SYSTEM = "Extract the city and the day as JSON."
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito", "Hanoi", "Accra"]


def _conversation(i: int, split: str, city: str, system: str | None = SYSTEM) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user", "content": f"Ticket {i}: I flew to {city} on day {i} and my bag is lost."},
        {"role": "assistant", "content": json.dumps({"city": city, "day": i})},
    ]
    return {"id": f"{split}-{i:06d}", "source": f"{split}.jsonl:{i + 1}", "messages": messages}


def _examples(split: str, n: int, offset: int = 0) -> list[EvalExample]:
    return [to_eval_example(_conversation(offset + i, split, CITIES[(offset + i) % len(CITIES)]), f"x:{i}")
            for i in range(n)]


def test_eval_example_splits_at_last_assistant_turn():
    conv = {"id": "t1", "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2", "weight": 1}]}
    ex = to_eval_example(conv, "f:1")
    assert ex.reference == "a2" and ex.user_prompt == "u2" and ex.system == "S"
    assert [m["content"] for m in ex.context] == ["S", "u1", "a1", "u2"]
    with pytest.raises(DataError, match="needs a user turn"):
        to_eval_example({"id": "t2", "messages": [{"role": "user", "content": "only a question"}]}, "f:2")


def test_arms_messages():
    train, test = _examples("train", 12), _examples("test", 3, offset=100)
    pool = build_pool(train, test)
    builder = PromptBuilder(pool, "INSTRUCTIONS", shots=3, rag_k=2, seed=0)
    ex = test[0]
    assert builder.build("base", ex) == list(ex.context)
    assert builder.build("tuned", ex) == list(ex.context)

    prompt = builder.build("prompt", ex)
    assert prompt[0]["role"] == "system" and prompt[0]["content"].startswith("INSTRUCTIONS")
    assert [m["role"] for m in prompt[1:]] == ["user", "assistant"] * 3 + ["user"]
    assert prompt[-1]["content"] == ex.user_prompt
    # fixed shots: the same for every query, and seeded
    assert builder.build("prompt", test[1])[1:7] == prompt[1:7]
    assert PromptBuilder(pool, "INSTRUCTIONS", 3, 2, seed=0).fixed_shots == builder.fixed_shots
    assert PromptBuilder(pool, "INSTRUCTIONS", 3, 2, seed=1).fixed_shots != builder.fixed_shots

    rag = builder.build("rag", ex)
    assert rag[0]["content"].startswith("INSTRUCTIONS") and len(rag) == 1 + 2 * 2 + 1
    tuned_rag = builder.build("tuned+rag", ex)
    assert tuned_rag[0] == {"role": "system", "content": SYSTEM}  # the example's own short system prompt
    assert tuned_rag[1:] == rag[1:]  # the same retrieved examples


def test_retrieval_puts_the_most_similar_example_right_before_the_query():
    train = [to_eval_example({"id": f"tr{i}", "messages": [
        {"role": "user", "content": text}, {"role": "assistant", "content": f"answer {i}"}]}, "x")
        for i, text in enumerate([
            "my invoice shows the wrong amount", "the parcel arrived broken and wet",
            "how do I reset my password", "refund for order 4411 please, parcel broken",
        ])]
    query = to_eval_example({"id": "q", "messages": [
        {"role": "user", "content": "parcel broken, I want a refund"}, {"role": "assistant", "content": "x"}]}, "x")
    builder = PromptBuilder(build_pool(train, [query]), "I", shots=0, rag_k=2, seed=0)
    messages = builder.build("rag", query)
    assert messages[-3]["content"] == "refund for order 4411 please, parcel broken"  # best match, last
    assert messages[-5]["content"] == "the parcel arrived broken and wet"
    hits = BM25Index([e.user_prompt for e in train]).search("password reset", 1)
    assert hits[0][0] == 2 and hits[0][1] > 0


def test_planted_test_example_is_refused_from_pools():
    test = _examples("test", 4, offset=100)
    train = _examples("train", 10)
    planted_same_id = to_eval_example(_conversation(100, "test", CITIES[100 % len(CITIES)]), "x")
    # the same user prompt under a new id, with different case and spacing
    copy = _conversation(101, "train", CITIES[101 % len(CITIES)])
    copy["id"] = "train-999999"
    copy["messages"][1]["content"] = "  " + copy["messages"][1]["content"].upper().replace(" ", "   ")
    planted_same_prompt = to_eval_example(copy, "x")
    pool = build_pool([*train, planted_same_id, planted_same_prompt], test)

    assert {r["id"] for r in pool.refused} == {"test-000100", "train-999999"}
    assert "same id" in next(r["reason"] for r in pool.refused if r["id"] == "test-000100")
    assert "test-000101" in next(r["reason"] for r in pool.refused if r["id"] == "train-999999")
    assert len(pool.shots) == len(train)
    test_hashes = {prompt_hash(ex.user_prompt) for ex in test}
    assert not any(prompt_hash(s.user) in test_hashes for s in pool.shots)

    # every pool entry as a shot, and retrieval for the very query the plant copies: neither appears
    builder = PromptBuilder(pool, "I", shots=100, rag_k=100, seed=0)
    for ex in test:
        for arm in ("prompt", "rag", "tuned+rag"):
            users = [m["content"] for m in builder.build(arm, ex)[:-1] if m["role"] == "user"]
            assert ex.user_prompt not in users
            assert not any(prompt_hash(u) in test_hashes for u in users)
    # without the check (no test set to check against) the plant would be in the pool: the test can fail
    assert "train-999999" in {s.id for s in build_pool([*train, planted_same_prompt], []).shots}


def test_query_itself_is_never_its_own_shot():
    train = _examples("train", 6)
    builder = PromptBuilder(build_pool(train, []), "I", shots=6, rag_k=3, seed=0)
    for ex in train:  # e.g. the overfitting check re-asks train examples
        for arm in ("prompt", "rag"):
            assert ex.id not in {s.id for s in builder.shots_for(arm, ex)}


def test_derived_instructions_state_the_answer_format():
    train = _examples("train", 10)
    text = derive_instructions(train)
    assert text.startswith(SYSTEM) and "JSON object with the keys city, day" in text
    labels = [to_eval_example({"messages": [{"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": ["Yes", "No"][i % 2]}]}, "x")
              for i in range(10)]
    text = derive_instructions(labels)
    assert "exactly one of these labels" in text and "No, Yes" in text
    assert text.startswith("You are a precise assistant")  # no system prompts in the data


def test_per_example_system_prompt_is_kept_in_prompt_arm():
    train = _examples("train", 4)
    odd = to_eval_example(_conversation(50, "test", "Rome", system="The user's name is Ada."), "x")
    builder = PromptBuilder(build_pool(train, [odd]), "INSTRUCTIONS", 1, 1, 0)
    system = builder.build("prompt", odd)[0]["content"]
    assert "INSTRUCTIONS" in system and "The user's name is Ada." in system
    # the task's shared system prompt is what the instructions replace: not repeated
    builder = PromptBuilder(build_pool(train, [odd]), "INSTRUCTIONS", 1, 1, 0, task_system=SYSTEM)
    assert builder.build("prompt", train[0])[0]["content"] == "INSTRUCTIONS"
    assert "Ada" in builder.build("prompt", odd)[0]["content"]


def test_documents_go_into_the_system_message_and_leaking_chunks_are_refused(tmp_path):
    test = _examples("test", 2, offset=100)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "policy.md").write_text("Lost bags in Paris are handled by desk 4. " * 3)
    (tmp_path / "docs" / "leak.txt").write_text("Copied ticket: " + test[0].user_prompt)
    chunks = read_document_chunks(tmp_path / "docs")
    documents = build_document_pool(chunks, test)
    assert [r["source"] for r in documents.refused] == [f"{tmp_path / 'docs' / 'leak.txt'}#0"]
    builder = PromptBuilder(build_pool(_examples("train", 4), test), "INSTRUCTIONS", 2, 1, 0, documents)
    rag = builder.build("rag", test[0])
    assert "Reference material" in rag[0]["content"] and "desk 4" in rag[0]["content"]
    assert [m["role"] for m in rag] == ["system", "user"]
    assert len(builder.build("prompt", test[0])) == 1 + 2 * 2 + 1  # few-shot still from train


def test_chunks_overlap_and_cover_the_text():
    words = [f"w{i}" for i in range(250)]
    chunks = chunk_text(" ".join(words), "doc", words=100, overlap=20)
    assert [c.source for c in chunks] == ["doc#0", "doc#1", "doc#2"]
    assert chunks[0].text.split()[-20:] == chunks[1].text.split()[:20]
    assert chunks[-1].text.split()[-1] == "w249"
    assert chunk_text("short text", "d") == [Chunk("short text", "d#0")]
