"""The grader examples: the house voice task (committed data = seeded generator output, the grader
gives every reference reply full marks and takes an eighth of a point per broken rule, the recipe makes the
verdict about it and leaves training to the defaults) and the demo's grader beside its metric."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tunelab.config import load_recipe
from tunelab.eval.graders.grade import Grading
from tunelab.specs.graders import read_graders_file, recipe_graders

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HOUSE = EXAMPLES / "house_voice"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("house_voice_generate", HOUSE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read(split: str) -> list[dict]:
    return [json.loads(line) for line in (HOUSE / "data" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def item(row: dict) -> dict:
    return {**{k: v for k, v in row.items() if k != "messages"}, "reference": row["messages"][-1]["content"]}


def test_generator_reproduces_the_committed_files(gen, tmp_path):
    gen.write_splits(tmp_path, seed=0)
    for split, size in gen.SPLIT_SIZES.items():
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (HOUSE / "data" / f"{split}.jsonl").read_bytes()
        assert len(read(split)) == size
    assert 300 <= gen.SPLIT_SIZES["train"] <= 600
    messages = [r["messages"][1]["content"] for s in gen.SPLIT_SIZES for r in read(s)]
    assert len(set(messages)) == len(messages)  # no customer message in two places


def test_every_reference_reply_follows_the_house_voice():
    rows = [r for split in ("train", "valid", "test") for r in read(split)]
    with Grading(read_graders_file(HOUSE / "graders.yaml")) as grading:
        columns = grading.grade([r["messages"][-1]["content"] for r in rows], [item(r) for r in rows])
    assert columns["house_voice"].scores == [1.0] * len(rows)
    assert columns["signs_off"].scores == [1.0] * len(rows)
    for row in rows:
        assert row["ref"][3:] in row["messages"][1]["content"]  # the reference's digits are the order's
        assert len(row["messages"][-1]["content"].split()) <= 60


def test_the_grader_gives_an_eighth_of_a_point_per_rule():
    rows = read("test")
    row = next(r for r in rows if r["frustrated"] and r["club"] and r["greeting"].startswith("Dear"))
    calm = next(r for r in rows if not r["frustrated"] and not r["club"])
    greeting, body, sign_off = row["messages"][-1]["content"].split("\n")
    assert body.startswith("Thank you for your patience.") and "Club members get free express shipping." in body
    first = row["greeting"].split()[1]
    broken = {
        "greeting": f"Hi {first},\n{body}\n{sign_off}",
        "patience": f"{greeting}\n{body.removeprefix('Thank you for your patience. ')}\n{sign_off}",
        "club": f"{greeting}\n{body.replace(' Club members get free express shipping.', '')}\n{sign_off}",
        "reference": f"{greeting}\n{body.replace(row['ref'], 'HV-00000')}\n{sign_off}",
        "next step": f"{greeting}\nThank you for your patience. We are on it, case {row['ref']}. Club members get "
                     f"free express shipping.\n{sign_off}",
        "forbidden word": f"{greeting}\n{body} Sorry again.\n{sign_off}",
        "length": f"{greeting}\n{body} {'and more ' * 20}\n{sign_off}",
        "sign-off": f"{greeting}\n{body}\nCheers",
    }
    calm_greeting, calm_body, _ = calm["messages"][-1]["content"].split("\n")
    calm_broken = {  # the conditional rules also hold the other way round
        "patience": f"{calm_greeting}\nThank you for your patience. {calm_body}\n{sign_off}",
        "club": f"{calm_greeting}\n{calm_body} Club members get free express shipping.\n{sign_off}",
    }
    with Grading(read_graders_file(HOUSE / "graders.yaml")[:1]) as grading:
        scores = grading.grade(list(broken.values()), [item(row)] * len(broken))["house_voice"].scores
        calm_scores = grading.grade(list(calm_broken.values()), [item(calm)] * 2)["house_voice"].scores
    assert dict(zip(broken, scores, strict=True)) == {rule: 7 / 8 for rule in broken}
    assert calm_scores == [7 / 8, 7 / 8]


def test_conditional_rules_split_the_data_both_ways():
    rows = read("train")
    for key in ("frustrated", "club"):
        share = sum(r[key] for r in rows) / len(rows)
        assert 0.25 < share < 0.5, key
    assert 0.4 < sum(r["greeting"].startswith("Dear") for r in rows) / len(rows) < 0.6


def test_house_voice_recipe_judges_by_its_grader_and_sets_no_train_keys():
    import yaml

    raw = yaml.safe_load((HOUSE / "recipe.yaml").read_text())
    assert "train" not in raw  # training uses tunelab's defaults
    recipe = load_recipe(HOUSE / "recipe.yaml")
    assert recipe.eval.primary == "house_voice"
    assert [g.name for g in recipe_graders(recipe.eval)] == ["house_voice", "signs_off", "rouge"]
    assert "HV-" in recipe.eval.instructions


def test_the_demo_shows_a_grader_beside_its_automatic_metric():
    recipe = load_recipe(EXAMPLES / "triage" / "recipe.yaml")
    assert recipe.eval.primary is None  # the verdict stays on the automatic metric
    (grader,) = recipe.eval.graders
    rows = [json.loads(line) for line in (EXAMPLES / "triage" / "data" / "test.jsonl").read_text().splitlines()][:20]
    outputs = [r["messages"][-1]["content"] for r in rows]
    wrong = [json.dumps({**json.loads(o), "category": "nonsense"}) for o in outputs]
    with Grading([grader]) as grading:
        right_scores = grading.grade(outputs, [item(r) for r in rows])[grader.name].scores
        wrong_scores = grading.grade(wrong, [item(r) for r in rows])[grader.name].scores
    assert right_scores == [1.0] * len(rows) and wrong_scores == [0.0] * len(rows)
