"""The demo task (examples/triage): the committed data is exactly what the seeded generator writes,
labels come from fixed sets in a fixed key order, the test set holds combinations and phrasings that
training never saw, and the recipe loads and fits its own limits."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.config import ARMS, load_recipe

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "triage"
DATA = EXAMPLE / "data"
RECIPE = EXAMPLE / "recipe.yaml"
FILES = ("train.jsonl", "valid.jsonl", "test.jsonl", "test.slices.jsonl")


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("triage_generate", EXAMPLE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def read(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def answers(split: str) -> list[dict]:
    return [json.loads(r["messages"][-1]["content"]) for r in read(split)]


def test_generator_reproduces_the_committed_files_byte_for_byte(gen, tmp_path):
    gen.write_splits(tmp_path, seed=0)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    gen.write_splits(tmp_path / "other", seed=1)
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (DATA / "train.jsonl").read_bytes()


def test_generator_cli_writes_the_splits(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLE / "generate.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "test.jsonl").read_bytes() == (DATA / "test.jsonl").read_bytes()


def test_split_sizes_and_chat_format(gen):
    for split, size in gen.SPLIT_SIZES.items():
        rows = read(split)
        assert len(rows) == size
        for row in rows:
            assert list(row) == ["messages"]
            assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
            assert row["messages"][0]["content"] == gen.SYSTEM_PROMPT


def test_answers_are_compact_json_from_fixed_label_sets(gen):
    for split in ("train", "valid", "test"):
        for row in read(split):
            text, answer_text = row["messages"][1]["content"], row["messages"][2]["content"]
            answer = json.loads(answer_text)
            assert list(answer) == ["category", "urgency", "order_id", "product"]
            assert answer_text == json.dumps(answer, separators=(",", ":"))
            assert answer["category"] in gen.CATEGORIES and answer["urgency"] in gen.URGENCIES
            assert answer["product"] is None or answer["product"] in gen.PRODUCTS
            order_id = answer["order_id"]
            assert order_id is None or (len(order_id) == 5 and order_id.isdigit() and order_id in text)
    labels = answers("train")
    # every label of every set is trained on, and the optional fields are sometimes absent
    assert {a["category"] for a in labels} == set(gen.CATEGORIES)
    assert {a["urgency"] for a in labels} == set(gen.URGENCIES)
    assert {a["product"] for a in labels} == {*gen.PRODUCTS, None}
    assert 0.2 < sum(a["order_id"] is None for a in labels) / len(labels) < 0.6


def test_messages_vary_and_never_repeat():
    texts = [r["messages"][1]["content"].lower() for split in ("train", "valid", "test") for r in read(split)]
    assert len(set(texts)) == len(texts)
    assert sum("\nsent from my" in t for t in texts) > 20  # signatures that name a product not concerned
    assert sum(t == t.lower() for t in (r["messages"][1]["content"] for r in read("train"))) > 50  # noise


def test_held_out_combinations_and_phrasings(gen):
    splits = gen.generate_splits(seed=0)
    seen_templates = {e.template for split in ("train", "valid") for _, e in splits[split]}
    seen_combos = {(a["category"], a["product"]) for split in ("train", "valid") for a in answers(split)}
    slices = [json.loads(line) for line in (DATA / "test.slices.jsonl").read_text().splitlines()]
    test_answers = answers("test")
    assert [s["line"] for s in slices] == list(range(1, len(test_answers) + 1))
    counts = {name: sum(s["slice"] == name for s in slices) for name in gen.TEST_SLICE_SIZES}
    assert counts == gen.TEST_SLICE_SIZES
    for info, answer in zip(slices, test_answers, strict=True):
        combo = (answer["category"], answer["product"])
        assert info["combo"] == f"{answer['category']}/{answer['product']}"
        if info["slice"] == "new_combo":
            assert combo not in seen_combos and info["template"] in seen_templates
        elif info["slice"] == "new_template":
            assert info["template"] not in seen_templates and combo not in gen.HELD_OUT_COMBOS
        else:
            assert info["template"] in seen_templates and combo in seen_combos | {(answer["category"], None)}
    # eval.limit takes a prefix of the test file: it must hold every slice
    limit = load_recipe(RECIPE).eval.limit
    assert {s["slice"] for s in slices[:limit]} == set(gen.TEST_SLICE_SIZES)


def test_recipe_loads_with_the_command_on_top():
    lines = RECIPE.read_text().splitlines()
    assert lines[0] == "# tunelab run examples/triage/recipe.yaml"
    recipe = load_recipe(RECIPE)
    assert recipe.model.name == "smollm2-135m-instruct" and recipe.method == "lora"
    assert recipe.eval.arms == list(ARMS) and recipe.data.max_seq_len == 256
    for path in (recipe.data.train, recipe.data.valid, recipe.data.test):
        assert Path(path).is_file(), path
    result = subprocess.run([sys.executable, "-m", "tunelab", "config", "show", str(RECIPE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_examples_fit_the_recipe_and_the_prompt_arm_is_long(tokenizer, gen):
    recipe = load_recipe(RECIPE)
    lengths, answer_tokens = [], []
    for split in ("train", "valid", "test"):
        for row in read(split):
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            lengths.append(len(ids))
            answer_tokens.append(len(tokenizer(row["messages"][2]["content"])["input_ids"]))
    assert max(lengths) <= recipe.data.max_seq_len
    assert 40 <= statistics.median(lengths) <= 90  # short: the demo trains in minutes on 2 CPU cores
    assert recipe.eval.max_new_tokens > max(answer_tokens)  # room for the longest answer + end of turn
    # the prompt arm's instructions alone outweigh the tuned arm's whole prompt several times over
    instructions = len(tokenizer(recipe.eval.instructions)["input_ids"])
    short_prompt = statistics.median(lengths) - statistics.median(answer_tokens)
    assert instructions > 3 * short_prompt
    for label in (*gen.CATEGORIES, *gen.URGENCIES, *gen.PRODUCTS):
        assert f'"{label}"' in recipe.eval.instructions
