"""Graders in a real evaluation: extra record keys kept by `data prepare` and offered as item.<key>,
every grader scoring every arm, eval.primary deciding the verdict, failures recorded per example,
the configs in manifest.json, judge/human agreement, and the report's grader columns."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import yaml

from stand_in import serving
from test_eval_run import build_fake_run
from test_graders_judge import FakeJudge
from tunelab.config import DataConfig, Recipe
from tunelab.data.prepare import prepare_data
from tunelab.eval.metrics import cohen_kappa

GRADERS = [
    {"type": "python", "name": "length", "pass_threshold": 0.5,
     "source": "def grade(sample, item):\n    if item['id'] == 'test-000103':\n        raise ValueError('planted')\n"
               "    return min(len(sample['output_text']) / 20, 1.0)\n"},
    {"type": "string_check", "name": "knows_city", "operation": "ne", "input": "{{ item.city }}", "reference": ""},
    {"type": "text_similarity", "name": "rouge", "evaluation_metric": "rouge_l",
     "input": "{{ sample.output_text }}", "reference": "{{ item.reference }}"},
]


def test_prepare_keeps_extra_keys_and_offers_reference(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"Where is ticket {i}?"},
                          {"role": "assistant", "content": f"Ticket {i} is in Oslo."}],
             "id": f"mine-{i}", "customer": {"tier": "gold" if i % 2 else "free"}, "reference": f"ref {i}"}
            for i in range(40)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe(model={"name": "tiny-test"}, data=DataConfig(train=str(train)))
    prepared = prepare_data(recipe, tokenizer, tmp_path / "out")
    for split in ("train", "valid", "test"):
        for row in prepared.conversations(split):
            number = int(row["messages"][0]["content"].split()[-1].rstrip("?"))
            assert row["customer"] == {"tier": "gold" if number % 2 else "free"}
            assert row["reference"] == f"ref {number}"  # the record's own reference is kept as it is
            assert row["id"].startswith(f"{split}-")  # prepared ids, as before


@pytest.fixture(scope="module")
def judge_server():
    with serving(FakeJudge()) as server:
        yield server


@pytest.fixture(scope="module")
def graded_run(tmp_path_factory, tiny_model_dir, judge_server):
    from tunelab.eval.run import evaluate
    from tunelab.models import load_model

    run_dir = build_fake_run(tmp_path_factory.mktemp("runs") / "graded", load_model("tiny-test", device="cpu"))
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    labels = run_dir / "human.jsonl"
    rng = random.Random(3)
    labels.write_text("".join(json.dumps({"id": f"test-{i:06d}", "score": rng.choice([0.0, 1.0])}) + "\n"
                              for i in range(100, 106)))
    recipe["eval"].update({"graders": GRADERS, "primary": "length", "arms": ["base", "prompt", "tuned"],
                           "forgetting": False, "human_labels": str(labels),
                           "pairwise": {"model": "judge", "base_url": judge_server.base_url,
                                        "input": [{"role": "user", "content": "PAIR A<{{ sample_a.output_text }}> "
                                                                              "B<{{ sample_b.output_text }}>"}]}})
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run_dir / "manifest.json").write_text(json.dumps({"seed": 0}))
    test_file = run_dir / "data" / "test.jsonl"
    rows = [json.loads(line) for line in test_file.read_text().splitlines()]
    for row in rows:  # an extra key beside the messages, as data prepare keeps it
        row["city"] = json.loads(row["messages"][-1]["content"])["city"]
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = evaluate(run_dir, echo=False, python_graders=True)  # this test's own recipe
    return run_dir, metrics


def test_every_grader_scores_every_arm_and_the_verdict_is_about_eval_primary(graded_run):
    run_dir, metrics = graded_run
    assert metrics["primary_metric"] == "length" and metrics["auto_metric"] == "json_field_accuracy"
    predictions = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    by_arm = {arm: [p for p in predictions if p["arm"] == arm] for arm in metrics["arms"]}
    for arm, row in metrics["arms"].items():
        assert set(row["graders"]) == {"length", "knows_city", "rouge"}
        expected = [min(len(p["output"]) / 20, 1.0) for p in by_arm[arm] if p["id"] != "test-000103"]
        assert row["graders"]["length"]["mean"] == pytest.approx(np.mean(expected))
        assert row["graders"]["length"]["failed"] == 1 and row["graders"]["length"]["scored"] == 5
        assert row["primary"] == row["metrics"]["length"] == row["graders"]["length"]["mean"]
        assert row["metrics"]["knows_city"] == 1.0  # item.city reached the grader on every example
        assert row["metrics"]["rouge"] == pytest.approx(row["metrics"]["rouge_l"])  # the same library, same pairs
        assert "json_field_accuracy" in row["metrics"]  # built-in metrics are all still there
        assert row["graders"]["length"]["pass_rate"] == pytest.approx(np.mean([e >= 0.5 for e in expected]))
        planted = next(p for p in by_arm[arm] if p["id"] == "test-000103")
        assert planted["score"] is None and planted["grader_errors"] == {"length": "ValueError: planted"}
        assert set(planted["scores"]) == {"length", "knows_city", "rouge"}
    verdict = metrics["verdict"]
    assert verdict["best_arm"] == "tuned" and verdict["excluded_failed"] == 1
    paired = [(t["scores"]["length"], o["scores"]["length"])
              for t, o in zip(by_arm["tuned"], by_arm[verdict["vs"]], strict=True) if t["id"] != "test-000103"]
    assert verdict["delta"] == pytest.approx(np.mean([t - o for t, o in paired]))
    assert metrics["graders"]["failures"]["length"]["tuned"] == {
        "failed": 1, "first": [{"id": "test-000103", "error": "ValueError: planted"}]}
    assert metrics["overfitting"]["task_metric"]["metric"] == "length"


def test_grader_configs_go_into_manifest_and_metrics(graded_run):
    run_dir, metrics = graded_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 0  # other keys kept
    assert [g["name"] for g in manifest["graders"]] == ["length", "knows_city", "rouge"]
    assert manifest["graders"] == metrics["graders"]["configs"]
    assert manifest["graders"][0]["source"] == GRADERS[0]["source"]


def test_judge_human_agreement_and_kappa(graded_run):
    run_dir, metrics = graded_run
    human = {json.loads(line)["id"]: json.loads(line)["score"] for line in (run_dir / "human.jsonl").read_text().splitlines()}
    tuned = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    pairs = [(p["scores"]["length"], human[p["id"]]) for p in tuned if p["arm"] == "tuned" and p["scores"]["length"] is not None]
    result = metrics["graders"]["human_agreement"]["length"]
    assert result["n"] == 5
    assert result["kappa"] == cohen_kappa([a >= 0.5 for a, _ in pairs], [h >= 0.5 for _, h in pairs])
    assert result["pass_agreement"] == pytest.approx(np.mean([(a >= 0.5) == (h >= 0.5) for a, h in pairs]))


def test_cohen_kappa_known_values():
    assert cohen_kappa([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == -1.0
    # 20 items, 15 agree; both raters say yes 50% of the time: kappa = (0.75 - 0.5) / 0.5
    a = [1] * 10 + [0] * 10
    b = [1] * 7 + [0] * 3 + [1] * 3 + [0] * 7
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa([1, 1], [1, 1]) is None  # chance agreement is total: kappa undefined


def test_report_shows_a_column_per_grader(graded_run):
    from tunelab.report.html import write_report

    run_dir, metrics = graded_run
    html = write_report(run_dir).read_text()
    markdown = (run_dir / "report.md").read_text()
    for name in ("length", "knows_city", "rouge"):
        assert f"<th>{name}</th>" in html
        assert any(line.startswith(f"| {name}") for line in markdown.split("## Graders")[1].splitlines())
    assert "Cohen&#39;s kappa" in html or "Cohen's kappa" in html


def test_pairwise_judge_compares_the_verdicts_two_arms(graded_run):
    run_dir, metrics = graded_run
    pairwise, verdict = metrics["pairwise"], metrics["verdict"]
    assert (pairwise["a"], pairwise["b"]) == (verdict["best_arm"], verdict["vs"])
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    a = [len(r["output"]) for r in rows if r["arm"] == pairwise["a"]]
    b = [len(r["output"]) for r in rows if r["arm"] == pairwise["b"]]
    # the fake judge prefers the longer output, whichever position it is in
    assert pairwise["wins"] == sum(x > y for x, y in zip(a, b, strict=True))
    assert pairwise["losses"] == sum(x < y for x, y in zip(a, b, strict=True))
    assert pairwise["ties"] == sum(x == y for x, y in zip(a, b, strict=True))
    assert pairwise["position_disagreements"] == 0 and pairwise["failed"] == 0


@pytest.mark.parametrize(("eval_keys", "message"), [
    ({"graders": [{"type": "python", "name": "voice", "source": "def grade(sample, item):\n    return 1.0\n"}]},
     "grader 'voice' is Python code from the run folder; tunelab does not run a run folder's code unasked"),
    ({"graders": [{"type": "multi", "name": "m", "calculate_output": "a",
                   "graders": {"a": {"type": "python", "source": "def grade(sample, item):\n    return 1.0\n"}}}]},
     "grader 'a' is Python code from the run folder"),
    ({"primary": "label_accuracy"}, "eval.primary: 'label_accuracy' is not computed for these references (json output)"),
    ({"graders": [{"type": "score_model", "name": "j", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                   "api_key_env": "TUNELAB_TEST_UNSET_KEY", "input": [{"role": "user", "content": "x"}]}]},
     "grader 'j': environment variable TUNELAB_TEST_UNSET_KEY (api_key_env) is not set"),
])
def test_eval_refuses_before_generating(tmp_path, tiny_model_dir, monkeypatch, eval_keys, message):
    from tunelab.errors import ConfigError
    from tunelab.eval import run as run_module
    from tunelab.models import load_model

    monkeypatch.delenv("TUNELAB_TEST_UNSET_KEY", raising=False)
    run_dir = build_fake_run(tmp_path / "runs" / "refused", load_model("tiny-test", device="cpu"))
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["eval"].update(eval_keys)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(run_module, "generate", lambda *a, **k: pytest.fail("generated before refusing"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_module.evaluate(run_dir, echo=False)
