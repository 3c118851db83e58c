"""eval.keep: the user's must-keep examples, answered by base and tuned model and compared (eval/keep.py)."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_eval_run import build_fake_run
from tunelab.config import load_recipe
from tunelab.errors import DataError
from tunelab.eval.keep import compare_keep, keep_conversations, read_keep
from tunelab.eval.metrics import detect_output_kind, score_outputs


def _example(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


# ---------------------------------------------------------------------------------------------- the file


def test_keep_file_errors_name_every_bad_line(tmp_path):
    path = tmp_path / "keep.jsonl"
    rows = [json.dumps(_example("Hello?", "Hi there.")), "{not json",
            json.dumps({"text": "no messages"}), "",
            json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}),
            json.dumps({"messages": [{"role": "user", "content": "only a question"}]})]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        read_keep(path)
    lines = str(err.value).splitlines()
    assert [line.split(": ")[0] for line in lines] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert "not valid JSON" in lines[0] and "messages:" in lines[1] and "messages[1]" in lines[2]
    assert "assistant answer" in lines[3]


def test_a_file_of_bad_rows_shows_the_first_twenty(tmp_path):
    path = tmp_path / "keep.jsonl"
    path.write_text("not json\n" * 25)
    with pytest.raises(DataError) as err:
        read_keep(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 21 and lines[19].startswith(f"{path}:20: ") and lines[20] == "... and 5 more"


def test_keep_file_missing_or_empty_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match=r"keep\.jsonl: eval\.keep: file not found"):
        read_keep(tmp_path / "keep.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        read_keep(tmp_path / "empty.jsonl")


def test_keep_examples_are_asked_with_their_own_messages(tmp_path):
    path = tmp_path / "keep.jsonl"
    row = {"id": "greet", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hello?"},
                                       {"role": "assistant", "content": "Hi there."}]}
    path.write_text(json.dumps(row) + "\n")
    (example,) = read_keep(path)
    assert example.id == "greet" and example.reference == "Hi there." and example.source == f"{path}:1"
    assert keep_conversations([example]) == [row["messages"][:2]]


def test_recipe_keep_path_is_relative_to_the_recipe_file(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "keep.jsonl").write_text(json.dumps(_example("Hello?", "Hi.")) + "\n")
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"eval": {"keep": "keep.jsonl"}}))
    monkeypatch.chdir(tmp_path)
    assert load_recipe(folder / "recipe.yaml").eval.keep == str((folder / "keep.jsonl").resolve())
    assert load_recipe(None).eval.keep is None


def test_a_bad_keep_file_stops_tunelab_run_before_training(tmp_path):
    keep = tmp_path / "keep.jsonl"
    keep.write_text(json.dumps(_example("Hello?", "Hi.")) + "\nnot json\n")
    example = Path(__file__).resolve().parents[1] / "examples" / "triage" / "recipe.yaml"
    result = subprocess.run([sys.executable, "-m", "tunelab", "run", str(example), "model.name=tiny-test",
                             f"out_dir={tmp_path}", f"eval.keep={keep}"], capture_output=True, text=True)
    assert result.returncode == 1 and f"{keep}:2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "triage" / "train").exists()


# ---------------------------------------------------------------------------------------------- the comparison


def _keep_examples(tmp_path: Path, n: int) -> list:
    path = tmp_path / "keep.jsonl"
    path.write_text("".join(json.dumps(_example(f"Say the colour number {i}.", f"the colour is number {i}")) + "\n"
                            for i in range(n)))
    return read_keep(path)


def test_a_tuned_model_that_breaks_the_keep_set_is_flagged(tmp_path):
    examples = _keep_examples(tmp_path, 20)
    references = [ex.reference for ex in examples]
    broken = ["PARIS" if i < 15 else ref for i, ref in enumerate(references)]  # 15 of 20 answers lost
    keep = compare_keep(examples, references, broken, threshold=0.05, seed=0, file="keep.jsonl")
    assert keep["n"] == 20 and keep["primary_metric"] == "token_f1"
    assert keep["base"] == 1.0 and keep["tuned"] == 0.25
    assert keep["delta_points"] == pytest.approx(-75.0) and keep["ci95_points"][1] < 0
    assert keep["relative_drop"] == pytest.approx(0.75) and keep["p_value"] < 0.001
    assert keep["flagged"] and keep["text"].startswith("flagged: the tuned model does worse on the 20 must-keep")
    assert [r["tuned_score"] for r in keep["examples"]] == [0.0] * 15 + [1.0] * 5

    same = compare_keep(examples, references, references, threshold=0.05)
    assert not same["flagged"] and same["delta_points"] == 0.0 and same["p_value"] == 1.0
    assert same["text"].startswith("no loss beyond 5% detected")
    # a real but small loss (1 of 20 = 5% relative) is not beyond a 10% threshold
    one = compare_keep(examples, references, ["PARIS", *references[1:]], threshold=0.10)
    assert one["relative_drop"] == pytest.approx(0.05) and not one["flagged"]


def test_keep_flag_error_rates_seeded_simulation():
    """Right-or-wrong answers on 100 keep examples, base right 60% of the time. No true change (the tuned
    model keeps each answer with the same chance it gains one): flagged at most 5% of the time. A planted
    loss of a third of what the base knew: flagged at least 80% of the time."""
    from tunelab.eval import keep as keep_module

    rng = np.random.default_rng(0)

    def flag_rate(lost: float, trials: int = 60) -> float:
        flags = 0
        for _ in range(trials):
            base = (rng.random(100) < 0.6).astype(float)
            churn = rng.random(100) < 0.2  # answers drawn anew (same chance of right) when nothing is lost
            tuned = np.where(churn, (rng.random(100) < 0.6).astype(float), base)
            tuned = np.where((base == 1.0) & (rng.random(100) < lost), 0.0, tuned)
            flags += keep_module.measure_drop(list(base), list(tuned), 0.05, seed=int(rng.integers(1 << 30)))[2]
        return flags / trials

    assert flag_rate(0.0) <= 0.05
    assert flag_rate(1 / 3) >= 0.8


# ---------------------------------------------------------------------------------------------- in evaluate


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, tiny_model_dir):
    from tunelab.models import load_model

    return build_fake_run(tmp_path_factory.mktemp("keep") / "fake", load_model("tiny-test", device="cpu"))


def _evaluate(run_dir: Path, keep: str | None) -> tuple[dict, list]:
    from tunelab.eval import run as run_module

    recipe_path = run_dir / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["eval"].update(forgetting=False, arms=["base", "tuned"], keep=keep)
    recipe_path.write_text(yaml.safe_dump(recipe))
    calls = []
    real_generate = run_module.generate

    def spy(model, tokenizer, conversations, settings, batch_size, progress=None):
        outputs = real_generate(model, tokenizer, conversations, settings, batch_size, progress=progress)
        calls.append({"conversations": conversations, "settings": settings, "batch_size": batch_size,
                      "texts": [g.text for g in outputs]})
        return outputs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "generate", spy)
        metrics = run_module.evaluate(run_dir, echo=False)
    return metrics, calls


def test_keep_set_is_answered_like_the_arms_and_scored_exactly(fake_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fake_run, run_dir)
    # the test set itself as the keep set: same prompts, engine, decoding and batches as the arms, so the
    # keep scores must be the arms' scores exactly
    keep_file = tmp_path / "keep.jsonl"
    shutil.copy(run_dir / "data" / "test.jsonl", keep_file)
    metrics, calls = _evaluate(run_dir, str(keep_file))
    keep = metrics["forgetting"]["keep"]
    assert keep["n"] == 6 and keep["primary_metric"] == metrics["primary_metric"] == "json_field_accuracy"
    assert keep["base"] == metrics["arms"]["base"]["primary"]
    assert keep["tuned"] == metrics["arms"]["tuned"]["primary"]
    assert keep["file"] == str(keep_file)
    # base answers in the base phase, tuned answers in the tuned phase, with the arms' settings
    examples = read_keep(keep_file)
    asked = [c for c in calls if c["conversations"] == keep_conversations(examples)]
    assert len(asked) == 4  # base arm, keep:base, tuned arm, keep:tuned
    assert len({(repr(c["settings"]), c["batch_size"]) for c in calls}) == 1
    base_texts, tuned_texts = asked[1]["texts"], asked[3]["texts"]
    assert (asked[0]["texts"], asked[2]["texts"]) == (base_texts, tuned_texts)  # the arms' own answers
    assert [r["base_output"] for r in keep["examples"]] == base_texts
    assert [r["tuned_output"] for r in keep["examples"]] == tuned_texts
    # scored by hand from the outputs
    references = [ex.reference for ex in examples]
    kind = detect_output_kind(references)
    by_hand = {which: float(np.mean(score_outputs(texts, references, kind).per_example["json_field_accuracy"]))
               for which, texts in (("base", base_texts), ("tuned", tuned_texts))}
    assert (keep["base"], keep["tuned"]) == (by_hand["base"], by_hand["tuned"])
    assert keep["delta_points"] == pytest.approx(100 * (by_hand["tuned"] - by_hand["base"]))
    on_disk = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert on_disk["forgetting"]["keep"]["n"] == 6
    # the report's Forgetting section says it in one line
    from tunelab.report.html import write_report

    write_report(run_dir)
    line = f"Must-keep set (eval.keep, keep.jsonl): {keep['text']}"
    assert f"- {line}" in (run_dir / "report.md").read_text()
    assert html.escape(line, quote=False) in (run_dir / "report.html").read_text()


def test_without_keep_nothing_changes(fake_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fake_run, run_dir)
    metrics, calls = _evaluate(run_dir, None)
    assert "keep" not in metrics["forgetting"]
    assert len(calls) == 3  # base arm, tuned arm, the tuned model's train sample: nothing more
    from tunelab.report.html import write_report

    write_report(run_dir)
    assert "Must-keep set" not in (run_dir / "report.md").read_text()


def test_a_flagged_keep_set_is_in_the_verdict_sentence():
    from tunelab.eval.run import _mention_forgetting

    keep = {"flagged": True, "text": "flagged: the tuned model does worse on the 20 must-keep examples"}
    verdict = {"recommended": "tuned", "headline": "Fine-tune.", "text": "Fine-tune. Because."}
    _mention_forgetting(verdict, {"flagged": False, "text": "no forgetting", "keep": keep})
    assert verdict["headline"] == f"Fine-tune. It breaks what must keep working: {keep['text']}."
    assert verdict["text"] == verdict["headline"] + " Because."
    prompt = {"recommended": "prompt", "headline": "Prompt.", "text": "Prompt."}
    _mention_forgetting(prompt, {"keep": keep})
    assert prompt["text"] == "Prompt."  # a prompt-only arm keeps the base model: nothing to mention
    quiet = {"recommended": "tuned", "headline": "Fine-tune.", "text": "Fine-tune."}
    _mention_forgetting(quiet, {"flagged": False, "keep": {**keep, "flagged": False}})
    assert quiet["text"] == "Fine-tune."
