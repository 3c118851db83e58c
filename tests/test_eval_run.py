"""evaluate() end to end on a run directory built here: tiny model + a PEFT LoRA adapter + data + log."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

import pytest

from tunelab.config import Recipe
from tunelab.contract import TrainSummary

CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito"]
ARM_KEYS = {"primary", "ci95", "prompt_tokens_mean", "completion_tokens_mean", "latency_ms_p50",
            "latency_ms_p95", "batch_size", "metrics"}
PREDICTION_KEYS = {"id", "arm", "prompt_tokens", "completion_tokens", "output", "reference", "score", "latency_ms"}


def _conversation(i: int, split: str, rng: random.Random) -> dict:
    city = rng.choice(CITIES)
    return {"id": f"{split}-{i:06d}", "source": f"{split}.jsonl:{i + 1}", "messages": [
        {"role": "system", "content": "Extract the city as JSON."},
        {"role": "user", "content": f"Ticket {i}: I flew to {city} and my bag is lost."},
        {"role": "assistant", "content": json.dumps({"city": city})}]}


def _lora(model, seed: int = 1):
    """A LoRA adapter whose B matrices are non-zero, so the tuned model really differs from base."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return peft_model


def build_fake_run(root: Path, tiny_model) -> Path:
    recipe = Recipe.model_validate({
        "name": "fake", "out_dir": str(root.parent), "model": {"name": "tiny-test"},
        "eval": {"max_new_tokens": 5, "batch_size": 4, "shots": 2, "rag_k": 2},
    })
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text(recipe.to_yaml())
    (root / "data").mkdir()
    rng = random.Random(0)
    train = [_conversation(i, "train", rng) for i in range(16)]
    test = [_conversation(i, "test", rng) for i in range(100, 106)]
    planted = json.loads(json.dumps(test[2]))  # a test example planted in the train split, under a new id
    planted["id"] = "train-000999"
    train.append(planted)
    for split, rows in (("train", train), ("test", test)):
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _lora(tiny_model).save_pretrained(root / "adapter")
    (root / "train").mkdir()
    log = [
        {"kind": "train", "step": 5, "loss": 2.5},
        {"kind": "eval", "step": 5, "val_loss": 2.0, "val_token_acc": 0.5, "train_loss": 2.1,
         "train_token_acc": 0.5, "is_best": True},
        {"kind": "eval", "step": 10, "val_loss": 2.3, "val_token_acc": 0.5, "train_loss": 1.4,
         "train_token_acc": 0.6, "is_best": False},
        {"kind": "event", "step": 10, "event": "overfitting", "message": "val loss rising"},
    ]
    (root / "train" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    TrainSummary(steps=10, best_step=None, best_val_loss=None, stopped_early=False, tokens=10_000,
                 trainable_tokens=4_000, train_time_s=360.0, method="lora", trainable_params=1,
                 total_params=2, output="adapter", output_step=10).write(root / "train" / "summary.json")
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir):
    """One evaluate() over every arm, with a spy on the generate calls it makes."""
    from peft.tuners.lora import LoraLayer

    from tunelab.eval import run as run_module
    from tunelab.models import load_model

    run_dir = build_fake_run(tmp_path_factory.mktemp("runs") / "fake", load_model("tiny-test", device="cpu"))
    calls = []
    real_generate = run_module.generate

    def spy(model, tokenizer, conversations, settings, batch_size, progress=None):
        lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        calls.append({"settings": settings, "batch_size": batch_size, "n": len(conversations),
                      "adapter_active": bool(lora_layers) and not any(m.disable_adapters for m in lora_layers),
                      "lora_layers": len(lora_layers)})
        return real_generate(model, tokenizer, conversations, settings, batch_size, progress=progress)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "generate", spy)
        metrics = run_module.evaluate(run_dir, echo=False)
    return run_dir, metrics, calls


def test_metrics_json_has_the_design_shape(evaluated):
    run_dir, metrics, _ = evaluated
    on_disk = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert metrics["primary_metric"] == "json_field_accuracy" and metrics["n_examples"] == 6
    assert list(metrics["arms"]) == ["base", "prompt", "rag", "tuned", "tuned+rag"]
    for arm, row in metrics["arms"].items():
        assert set(row) >= ARM_KEYS, arm
        lo, hi = row["ci95"]
        assert lo <= row["primary"] <= hi
        assert row["metrics"][metrics["primary_metric"]] == row["primary"]
        assert row["latency_ms_p50"] <= row["latency_ms_p95"]
    assert {"best_arm", "vs", "delta", "ci95", "p_value", "text"} <= set(metrics["verdict"])
    assert metrics["verdict"]["best_arm"] in ("tuned", "tuned+rag")
    assert {"perplexity", "probes", "flagged", "threshold"} <= set(metrics["forgetting"])
    kept = metrics["forgetting"]["retention"]
    assert (kept["definition"], kept["renderings"]) == ("stable", 4)  # the base arm is measured in every framing
    assert kept["unstable"] == kept["plain"]["n"] - kept["n"] >= 0
    assert {"loss_curve", "verbatim", "task_metric"} <= set(metrics["overfitting"])
    # the prompt arms are longer than the short prompt of base/tuned
    arms = metrics["arms"]
    assert arms["prompt"]["prompt_tokens_mean"] > arms["base"]["prompt_tokens_mean"]
    assert arms["tuned"]["prompt_tokens_mean"] == arms["base"]["prompt_tokens_mean"]

    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 6
    assert all(set(r) >= PREDICTION_KEYS for r in rows)
    assert {(r["arm"], r["id"]) for r in rows} == {(a, f"test-{i:06d}") for a in arms for i in range(100, 106)}


def test_all_arms_use_identical_decoding_settings(evaluated):
    _, metrics, calls = evaluated
    arm_calls = calls[: len(metrics["arms"])]  # one call per arm (then the train sample)
    assert [c["n"] for c in arm_calls] == [6] * 5
    assert len({c["settings"] for c in calls}) == 1
    assert len({c["batch_size"] for c in calls}) == 1
    used = dataclasses.asdict(calls[0]["settings"])
    assert all(row["decoding"] == used for row in metrics["arms"].values())
    assert used["temperature"] == 0.0 and used["max_new_tokens"] == 5  # greedy, from the recipe
    # base arms ran with the adapter switched off; tuned arms on the adapter merged into the base
    # weights, as deployed: no adapter layers left (their outputs: test_merged_adapter_answers_as_the_adapter)
    assert [c["adapter_active"] for c in arm_calls] == [False, False, False, False, False]
    assert [c["lora_layers"] > 0 for c in arm_calls] == [True, True, True, False, False]
    assert [row["served"] for row in metrics["arms"].values()] == ["base model"] * 3 + [
        "adapter merged into the base weights"] * 2


def test_planted_test_example_is_refused_and_recorded(evaluated):
    run_dir, metrics, _ = evaluated
    refused = metrics["pools"]["refused"]
    assert [r["id"] for r in refused] == ["train-000999"]
    assert "test-000102" in refused[0]["reason"]
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert not any("train-000999" in r["shot_ids"] for r in rows)
    assert all(len(r["shot_ids"]) == 2 for r in rows if r["arm"] in ("prompt", "rag", "tuned+rag"))


def test_cost_and_break_even_follow_from_tokens_and_prices(evaluated):
    _, metrics, _ = evaluated
    cost, recipe_prices = metrics["cost"], metrics["cost"]["prices"]
    assert cost["training"]["usd"] == pytest.approx(360 / 3600 * recipe_prices["gpu_usd_per_hour"])
    for arm, row in metrics["arms"].items():
        prefix = "tuned_" if arm.startswith("tuned") else ""  # the fine-tuned model is served at its own price
        expected = (row["prompt_tokens_mean"] * recipe_prices[f"{prefix}usd_per_m_input_tokens"]
                    + row["completion_tokens_mean"] * recipe_prices[f"{prefix}usd_per_m_output_tokens"])
        assert cost["per_arm"][arm]["usd_per_1m_queries"] == pytest.approx(expected)
        assert metrics["verdict"]["usd_per_1k_requests"][arm] == pytest.approx(expected / 1000)
    saved = cost["per_arm"]["prompt"]["usd_per_query"] - cost["per_arm"]["tuned"]["usd_per_query"]
    assert cost["break_even"]["tuned vs prompt"]["queries"] == math.ceil(cost["training"]["usd"] / saved)


def test_overfitting_reads_the_training_log(evaluated):
    run_dir, metrics, _ = evaluated
    overfitting = metrics["overfitting"]
    assert [p["step"] for p in overfitting["loss_curve"]] == [5, 10]
    assert overfitting["best_step"] == 5 and overfitting["val_rising_while_train_falls"] is True
    assert overfitting["final_gap"] == pytest.approx(2.3 - 1.4)
    assert len(overfitting["overfitting_events"]) == 1
    train_answers = {json.loads(line)["messages"][-1]["content"]
                     for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()}
    references = [json.loads(line)["messages"][-1]["content"]
                  for line in (run_dir / "data" / "test.jsonl").read_text().splitlines()]
    expected = sum(r in train_answers for r in references) / len(references)
    assert overfitting["reference_is_train_answer"] == pytest.approx(expected)
    assert overfitting["task_metric"]["train_sample_n"] == 6


def test_merged_adapter_answers_as_the_adapter(evaluated):
    """The tuned arms ran on the merged weights: the unmerged adapter's greedy outputs are the same."""
    from tunelab.engine.generate import generate
    from tunelab.eval import run as run_module
    from tunelab.runs import load_run_model

    run_dir, metrics, _ = evaluated
    inputs = run_module._load_inputs(run_dir, None, None, None, trust_remote_code=False, python_graders=False,
                                     recipe=None, train_file=None)
    peft_model, tokenizer = load_run_model(inputs.paths, inputs.recipe)
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    for arm in ("tuned", "tuned+rag"):
        prompts = [inputs.builder.build(arm, ex) for ex in inputs.test]
        unmerged = [g.text for g in generate(peft_model, tokenizer, prompts, inputs.settings, inputs.cfg.batch_size)]
        assert unmerged == [r["output"] for r in rows if r["arm"] == arm]
    assert metrics["arms"]["tuned"]["served"] == "adapter merged into the base weights"


def test_disabled_adapter_gives_the_base_model_exactly(tiny_model_dir):
    import torch

    from tunelab.models import load_model

    base = load_model("tiny-test", device="cpu")
    peft_model = _lora(load_model("tiny-test", device="cpu"))
    ids = torch.tensor([[1, 420, 1250, 30, 99, 7]])
    with torch.no_grad():
        reference = base(input_ids=ids).logits
        with_adapter = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            without_adapter = peft_model(input_ids=ids).logits
        after = peft_model(input_ids=ids).logits
    assert not torch.allclose(with_adapter, reference)
    assert torch.equal(without_adapter, reference)
    assert torch.equal(after, with_adapter)  # the adapter is back on after the block


def test_cli_eval_with_arms_and_limit(evaluated, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    run_dir = tmp_path / "copy"
    shutil.copytree(evaluated[0], run_dir)
    recipe_path = run_dir / "recipe.yaml"
    recipe_path.write_text(recipe_path.read_text().replace("forgetting: true", "forgetting: false"))
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--arms", "base,tuned", "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert "verdict:" in result.output and "json_field_accuracy" in result.output
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["n_examples"] == 2 and list(metrics["arms"]) == ["base", "tuned"]
    assert metrics["forgetting"] == {"skipped": "eval.forgetting is off"}
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--arms", "base,bogus"])
    assert result.exit_code != 0 and "bogus" in str(result.exception)
    shutil.rmtree(run_dir / "adapter")
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--arms", "base,tuned", "--limit", "1"])
    assert "neither adapter/ nor model/" in str(result.exception)


# ---------------------------------------------------------------------------------------------- slow

TEAMS = {
    "BILLING-DESK": ["invoice", "charged twice", "refund", "payment failed", "billing address"],
    "TECH-DESK": ["app crashes", "cannot log in", "error code 500", "password reset link", "screen freezes"],
    "SHIP-DESK": ["parcel", "delivery is late", "tracking number", "courier", "package arrived damaged"],
}
OPENERS = ["Hi,", "Hello team,", "Urgent:", "Good morning.", "Hey there,", "Dear support,"]
CLOSERS = ["Thanks.", "Please help.", "Regards, Sam", "Any update?", "Cheers", ""]


def _routing_conversations(n: int, seed: int) -> list[dict]:
    """Messages to route to one of three made-up desk names: no prompt can guess the names."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        team = rng.choice(sorted(TEAMS))
        text = f"{rng.choice(OPENERS)} my {rng.choice(TEAMS[team])} issue from order {rng.randint(1000, 9999)}. {rng.choice(CLOSERS)}"
        rows.append({"messages": [{"role": "system", "content": "Route the customer message to a desk."},
                                  {"role": "user", "content": text.strip()},
                                  {"role": "assistant", "content": team}]})
    return rows


@pytest.mark.slow
def test_tuned_beats_base_on_the_real_model(tmp_path):
    train_module = pytest.importorskip(
        "tunelab.train.run", reason="training (issue 4) is not available yet: tunelab.train.run is not importable"
    )
    from tunelab.config import load_recipe
    from tunelab.eval.run import evaluate

    for split, n, seed in (("train", 120, 1), ("valid", 8, 2), ("test", 24, 3)):
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in _routing_conversations(n, seed))
        )
    recipe = load_recipe(None, [
        "name=routing", f"out_dir={tmp_path / 'runs'}", f"data.train={tmp_path / 'train.jsonl'}",
        f"data.valid={tmp_path / 'valid.jsonl'}", f"data.test={tmp_path / 'test.jsonl'}",
        # many small steps: only the few answer tokens of each example carry loss
        "train.max_steps=24", "train.tokens_per_step=256", "train.lr=2e-3", "train.eval_every_steps=24",
        "train.checkpoint_every_steps=100", "eval.max_new_tokens=8", "eval.forgetting=false",
    ])
    train_module.train(recipe, progress=False)
    metrics = evaluate(recipe.run_dir, arms="base,tuned", echo=False)
    (tmp_path / "result.json").write_text(json.dumps({a: r["primary"] for a, r in metrics["arms"].items()}))
    assert metrics["primary_metric"] == "label_accuracy"
    base, tuned = metrics["arms"]["base"]["primary"], metrics["arms"]["tuned"]["primary"]
    assert tuned >= base + 0.3, (base, tuned)
    assert metrics["verdict"]["winner"] == metrics["verdict"]["recommended"] == "tuned"
    assert metrics["verdict"]["headline"].startswith("Use tuned:")
    assert "Fine-tuning beats the best prompt-only approach by" in metrics["verdict"]["text"]
