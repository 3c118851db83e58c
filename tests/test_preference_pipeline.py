"""`tunelab run` with a file of preference pairs, end to end on tiny-test: a supervised run, then a
dpo run starting from it; the dpo run's evaluation has the parent as the arm `sft`, preference
accuracy of base, sft and tuned on held-out pairs, and the report says what DPO changed."""

from __future__ import annotations

import json

import pytest

from tunelab.config import load_recipe
from tunelab.pipeline import run_pipeline

FAST = ["model.name=tiny-test", "data.max_seq_len=64", "train.budget=null", "train.eval_every_steps=5",
        "eval.limit=4", "eval.forgetting=false", "eval.arms=[base,tuned]", "eval.max_new_tokens=8", "lora.dropout=0"]


def _questions(count):
    return [(f"What is {i} plus {i + 1}?", f"It is {2 * i + 1}.", f"{2 * i + 1}!!! OBVIOUSLY!!!") for i in range(count)]


def test_run_with_preference_pairs_from_a_supervised_parent(tmp_path, tiny_model_dir):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]}) + "\n"
                            for q, good, _ in _questions(40)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": q, "chosen": good, "rejected": bad}) + "\n" for q, good, bad in _questions(40)))
    out = tmp_path / "runs"
    sft = run_pipeline(load_recipe(None, [*FAST, "name=sft", f"data.train={chat}", f"out_dir={out}", "train.max_steps=5"]))
    dpo = run_pipeline(load_recipe(None, [
        *FAST, "name=dpo", "method=dpo", f"model.adapter={sft}", f"data.train={pairs}", f"out_dir={out}",
        "train.max_steps=20", "train.lr=5e-3", "dpo.beta=0.5",
    ]))
    stages = json.loads((dpo / "stages.json").read_text())
    assert list(stages) == ["check", "prepare", "train", "eval", "audit", "report"]
    metrics = json.loads((dpo / "eval" / "metrics.json").read_text())
    assert set(metrics["arms"]) == {"base", "tuned", "sft"}
    assert metrics["arms"]["sft"]["model"] == "sft"
    preference = metrics["preference"]
    assert preference["split"] == "test" and preference["n"] >= 2
    assert set(preference["accuracy"]) == {"base", "sft", "tuned"}
    # the pairs are learnable: the tuned model prefers the calm answers; the parent was never shown the shouting
    assert preference["accuracy"]["tuned"] == 1.0
    assert preference["log_prob_margin"]["tuned"] > preference["log_prob_margin"]["sft"]
    assert preference["vs_sft"]["n"] == metrics["n_examples"]
    assert preference["reward_reference"] == "sft" and preference["reward_accuracy"] == 1.0
    log = [json.loads(line) for line in (dpo / "train" / "log.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and "val_reward_margin" in r for r in log)
    # the dpo run continued the parent's adapter; the parent's own files are untouched
    assert (sft / "adapter" / "adapter_model.safetensors").is_file() and (dpo / "adapter" / "adapter_model.safetensors").is_file()
    report = (dpo / "report.md").read_text()
    assert "## What DPO changed" in report and "held-out pairs" in report
    assert "What DPO changed" in (dpo / "report.html").read_text()


def test_arm_preference_uses_the_log_prob_per_answer_token(tokenizer, tiny_model):
    import torch

    from tunelab.data.preference import Pair, tokenize_pair
    from tunelab.eval.preference import sequence_logps

    pairs = [Pair("x", 1, "trl", [{"role": "user", "content": "Say hi"}], "Hello there, how are you?", "Hi."),
             Pair("x", 2, "trl", [{"role": "user", "content": "Count"}], "One.", "One, two, three, four.")]
    got = sequence_logps(tiny_model, tokenizer, pairs)  # both pairs' four sides padded in one batch
    with torch.no_grad():
        for pair, sides in zip(pairs, got, strict=True):
            for side, value in zip(tokenize_pair(tokenizer, pair), sides, strict=True):
                logits = tiny_model(input_ids=torch.tensor([side.input_ids])).logits[0, :-1].float()
                targets = torch.tensor(side.labels[1:])
                keep = targets != -100
                logp = torch.log_softmax(logits, -1)[keep].gather(1, targets[keep][:, None])
                assert value == pytest.approx(float(logp.mean()), abs=1e-4)


@pytest.mark.parametrize("loss", ["orpo", "kto"])
def test_run_with_orpo_from_the_base_and_kto_on_unpaired_examples(tmp_path, tiny_model_dir, loss):
    data = tmp_path / "data.jsonl"
    if loss == "orpo":
        rows = [{"prompt": q, "chosen": good, "rejected": bad} for q, good, bad in _questions(40)]
    else:  # thumbs up on the calm answers, down on the shouting ones, one per prompt
        rows = [{"prompt": q, "completion": good if i % 2 else bad, "label": bool(i % 2)}
                for i, (q, good, bad) in enumerate(_questions(40))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = run_pipeline(load_recipe(None, [*FAST, "name=one", "method=dpo", f"dpo.loss={loss}", f"data.train={data}",
                                          f"out_dir={tmp_path / 'runs'}", "train.max_steps=6", "train.lr=5e-3"]))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "train" / "reference_logps.json").is_file() == (loss == "kto")  # ORPO has no reference
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["arms"]) == {"base", "tuned"}  # no parent: no arm sft
    assert metrics["preference"]["loss"] == loss
    test_rows = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
    assert test_rows and all(row.get("label", True) for row in test_rows)  # kto: the desirable examples only
    report = (run / "report.md").read_text()
    assert f"Preference tuning ({loss.upper()})" in report
