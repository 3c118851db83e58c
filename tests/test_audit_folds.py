"""`tunelab data audit --folds K`: every training example scored once, by a model that never trained on it."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from tunelab.config import load_recipe
from tunelab.errors import ConfigError


def test_fold_assignment_is_exact_seeded_and_independent_of_order():
    from tunelab.eval.folds import assign_folds

    ids = [f"train-{i:02d}" for i in range(23)]
    folds = assign_folds(ids, 4, seed=7)
    assert set(folds) == set(ids) and sorted(Counter(folds.values()).values()) == [5, 6, 6, 6]
    assert assign_folds(list(reversed(ids)), 4, seed=7) == folds  # the set of ids and the seed decide
    assert assign_folds(ids, 4, seed=8) != folds
    assert set(assign_folds(ids, 23, seed=7).values()) == set(range(23))  # one example a fold
    with pytest.raises(ConfigError, match="at least 2"):
        assign_folds(ids, 1, seed=7)
    with pytest.raises(ConfigError, match="23 training examples"):
        assign_folds(ids, 24, seed=7)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_model_dir):
    """A tiny-test run, 2 passes over 12 reversal examples; lines 4 and 9 answered wrong."""
    from train_examples import reverse_pairs, write_chat_jsonl
    from tunelab.train.run import train

    folder = tmp_path_factory.mktemp("folds")
    pairs = reverse_pairs(12, seed=3)
    for i in (3, 8):
        pairs[i] = (pairs[i][0], pairs[i][0].removeprefix("Reverse the words: "))
    data = write_chat_jsonl(folder / "train.jsonl", pairs)
    recipe = load_recipe(None, [f"out_dir={folder}", "name=r", "model.name=tiny-test", f"data.train={data}",
                                "data.valid_fraction=0", "data.test_fraction=0", "train.epochs=2",
                                "train.tokens_per_step=256", "train.budget=null", "lora.dropout=0",
                                "eval.max_new_tokens=8"])
    train(recipe, progress=False)
    return folder / "r", pairs


def test_every_example_is_scored_once_by_a_model_that_never_trained_on_it(small_run, monkeypatch):
    from tunelab.eval import folds as folds_module
    from tunelab.eval.audit import HeldOut
    from tunelab.train import run as train_run

    run, pairs = small_run
    rows = [json.loads(line) for line in (run / "data" / "train.tokens.jsonl").read_text().splitlines()]
    id_of = {tuple(r["input_ids"]): r["id"] for r in rows}
    trained: list[set[str]] = []
    real_train = train_run.train_on_examples

    def recording(recipe, paths, tokenizer, train, valid, **kwargs):
        trained.append({id_of[tuple(r["input_ids"])] for r in train})
        return real_train(recipe, paths, tokenizer, train, valid, **kwargs)

    scored: list[list[str]] = []

    def score(model, tokenizer, examples):  # the planted answers are not what the model says, and costly
        scored.append([e.id for e in examples])
        wrong = {e.id for e in examples if e.answer == e.context[-1]["content"].removeprefix("Reverse the words: ")}
        return [HeldOut(-1, 3.0 if e.id in wrong else 0.2, "no" if e.id in wrong else e.answer, 0.9) for e in examples]

    monkeypatch.setattr(train_run, "train_on_examples", recording)
    rows_out, summary, folds = folds_module.audit_with_folds(run, 3, score=score)
    everyone = {r["id"] for r in rows}
    assert len(trained) == len(scored) == 3 and sorted(folds.trained_on) == [8, 8, 8]
    assert Counter(i for fold in scored for i in fold) == Counter(everyone)  # each exactly once
    for fold, (train_ids, scored_ids) in enumerate(zip(trained, scored, strict=True)):
        assert train_ids.isdisjoint(scored_ids) and train_ids | set(scored_ids) == everyone
        assert {i for i, f in folds.assignment.items() if f == fold} == set(scored_ids)
    # the ranking reads the out-of-fold scores: the two wrong answers first, flagged, and named as such
    assert summary.folds == 3 and summary.signal == "held_out_loss" and summary.decoded == 12
    assert sorted(r.line for r in rows_out[:2]) == [4, 9] and [r.flagged for r in rows_out[:2]] == [True, True]
    assert not any(r.flagged for r in rows_out[2:])
    assert rows_out[0].reason.startswith("out of fold: loss 3.00 nats/token from a model that never saw it")
    assert "3 folds" in summary.how_to_read
    written = json.loads((run / "audit" / "folds" / "folds.json").read_text())
    assert written["assignment"] == folds.assignment and written["folds"] == 3
    assert not any((run / "audit" / "folds" / f"fold-{k}" / "checkpoints").exists() for k in range(3))
    assert all((run / "audit" / "folds" / f"fold-{k}" / "adapter").is_dir() for k in range(3))


def test_out_of_fold_scores_from_the_fold_models(small_run):
    """The real scorer: the loss of the answer in the file and the model's own answer, per example."""
    from tunelab.eval.audit import answer_confidences
    from tunelab.eval.folds import audit_with_folds
    from tunelab.runs import load_tuned_model

    run, _ = small_run
    rows, summary, folds = audit_with_folds(run, 2)
    assert summary.folds == 2 and len(rows) == 12 and all(r.model_answer is not None for r in rows)
    # an example's held-out loss is its answer's loss under its own fold's model, which never saw it
    row = rows[0]
    model, tokenizer = load_tuned_model(run / "audit" / "folds" / f"fold-{folds.assignment[row.id]}")
    train = {json.loads(line)["id"]: json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()}
    messages = train[row.id]["messages"]
    [p] = answer_confidences(model, tokenizer, [messages[:-1]], [messages[-1]["content"]])
    assert row.reason.startswith(f"out of fold: loss {-math.log(p):.2f} nats/token")


def test_cli_folds_option_audits_out_of_fold_and_says_what_it_trained(small_run):
    from typer.testing import CliRunner

    from tunelab import cli

    run, _ = small_run
    result = CliRunner().invoke(cli.app, ["data", "audit", str(run), "--folds", "2", "--top", "2"])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if line.startswith("out of fold: ")]
    assert len(said) == 1 and said[0].startswith("out of fold: 2 trainings on 6-6 rows (")
    summary = json.loads((run / "audit" / "summary.json").read_text())
    assert summary["folds"] == 2 and summary["signal"] == "held_out_loss" and summary["decoded"] == 12
    bad = CliRunner().invoke(cli.app, ["data", "audit", str(run), "--folds", "13"])
    assert bad.exit_code != 0 and "at most one fold per example" in str(bad.exception) + bad.output


def test_replay_rows_train_every_fold_and_are_never_scored(tmp_path, tiny_model_dir, monkeypatch):
    """With replay (the default mitigation of forgetting), the general examples are not the user's:
    each fold trains on all of them, as the run did, ids kept for the anchor; only the user's are scored."""
    from train_examples import reverse_pairs, write_chat_jsonl
    from tunelab.eval import folds as folds_module
    from tunelab.eval.audit import HeldOut
    from tunelab.train import run as train_run
    from tunelab.train.run import train

    data = write_chat_jsonl(tmp_path / "train.jsonl", reverse_pairs(12, seed=5))
    general = write_chat_jsonl(tmp_path / "general.jsonl", [(f"Say {w}.", w) for w in
                                                             ("yes", "no", "maybe", "hello", "thanks", "bye")])
    recipe = load_recipe(None, [f"out_dir={tmp_path}", "name=r", "model.name=tiny-test", f"data.train={data}",
                                "data.valid_fraction=0", "data.test_fraction=0", "train.epochs=2",
                                f"train.replay={general}", "train.replay_share=0.3",
                                "train.tokens_per_step=256", "train.budget=null", "lora.dropout=0",
                                "eval.max_new_tokens=8"])
    train(recipe, progress=False)
    run = tmp_path / "r"
    rows = [json.loads(line) for line in (run / "data" / "train.tokens.jsonl").read_text().splitlines()]
    replay_ids = {r["id"] for r in rows if r["id"].startswith("replay-")}
    assert replay_ids  # the run trained on replay

    trained: list[list[dict]] = []
    real_train = train_run.train_on_examples

    def recording(recipe, paths, tokenizer, train, valid, **kwargs):
        trained.append(list(train))
        return real_train(recipe, paths, tokenizer, train, valid, **kwargs)

    scored: list[str] = []

    def score(model, tokenizer, examples):
        scored.extend(e.id for e in examples)
        return [HeldOut(-1, 0.5, e.answer, 0.9) for e in examples]

    monkeypatch.setattr(train_run, "train_on_examples", recording)
    _, summary, folds = folds_module.audit_with_folds(run, 2, score=score)
    user_ids = {r["id"] for r in rows} - replay_ids
    assert sorted(scored) == sorted(user_ids) and set(folds.assignment) == user_ids
    for fold, train_rows in enumerate(trained):
        ids = [r["id"] for r in train_rows]
        assert replay_ids <= set(ids)  # every fold rehearses the whole replay, as the run did
        assert {i for i in ids if i in user_ids} == {i for i, f in folds.assignment.items() if f != fold}
    assert folds.trained_on == [len(replay_ids) + 6, len(replay_ids) + 6] and summary.folds == 2
