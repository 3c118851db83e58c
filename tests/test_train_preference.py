"""Preference tuning (method: dpo) on tiny-test: the loss against a hand computation from the model's
own logits, its gradient against full-logits autograd, a run that learns the preference, the cached
reference log-probs equal to recomputing them with the adapter off, base weights bitwise unchanged,
and resume reproducing an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import faults
from tunelab.config import load_recipe
from tunelab.train.preference import PreferenceLoss, attach_reference, pair_batches, reference_logps
from tunelab.train.setup import setup_training


def write_pairs(path, count, seed=0, start=0):
    """Questions answered in a calm voice (preferred) or a shouting one (rejected)."""
    import random

    rng = random.Random(seed)
    lines = []
    for i in range(start, start + count):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        lines.append(json.dumps({
            "input": {"messages": [{"role": "user", "content": f"What is {a} plus {b}? ({i})"}]},
            "preferred_output": [{"role": "assistant", "content": f"It is {a + b}."}],
            "non_preferred_output": [{"role": "assistant", "content": f"{a + b}!!! OBVIOUSLY!!!"}],
        }))
    path.write_text("\n".join(lines) + "\n")
    return path


def dpo_recipe(tmp_path, *overrides):
    train = write_pairs(tmp_path / "train.jsonl", 24, seed=1)
    valid = write_pairs(tmp_path / "valid.jsonl", 6, seed=2, start=100)
    return load_recipe(None, [
        "method=dpo", "model.name=tiny-test", f"data.train={train}", f"data.valid={valid}", "data.test_fraction=0",
        "data.max_seq_len=64", f"out_dir={tmp_path / 'runs'}", "train.budget=null", "lora.dropout=0",
        *overrides,
    ])


def sides(tokenizer, prompt, chosen, rejected):
    from tunelab.data.preference import Pair, pair_row, tokenize_pair

    pair = Pair("x", 1, "trl", [{"role": "user", "content": prompt}], chosen, rejected)
    return pair_row("p", *tokenize_pair(tokenizer, pair))


def _answer_logp(model, ids, labels):
    """Sum of log p(label) over labelled positions, from the model's own full logits (the example alone)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    return logp[keep].gather(1, targets[keep][:, None]).sum()


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_loss_equals_a_hand_computation_from_the_models_logits(tokenizer, tiny_model, kind):
    examples = [sides(tokenizer, "Say hi", "Hello there.", "Go away!"),
                sides(tokenizer, "Count to two", "One, two.", "no")]
    reference = [(-40.0, -35.5), (-20.25, -30.0)]
    for example, ref in zip(examples, reference, strict=True):
        example["reference_logps"] = ref
    recipe = load_recipe(None, ["method=full", "model.name=tiny-test"])
    setup = setup_training(recipe, 1, "cpu", base=tiny_model)
    setup.loss_module = PreferenceLoss(setup.model, beta=0.1, loss=kind)
    setup.model.eval()
    batch = pair_batches(setup, examples, tokenizer.pad_token_id)([(0, 1)])  # both pairs packed in one row
    out = setup.loss_module(**batch.model_inputs())

    expected_loss, expected_margin, right = 0.0, 0.0, 0
    with torch.no_grad():
        for example, (ref_chosen, ref_rejected) in zip(examples, reference, strict=True):
            n = example["chosen_tokens"]
            chosen = float(_answer_logp(tiny_model, example["input_ids"][:n], example["labels"][:n]))
            rejected = float(_answer_logp(tiny_model, example["input_ids"][n:], example["labels"][n:]))
            log_ratio = (chosen - ref_chosen) - (rejected - ref_rejected)
            margin = 0.1 * log_ratio
            expected_loss += math.log1p(math.exp(-margin)) if kind == "sigmoid" else (log_ratio - 1 / 0.2) ** 2
            expected_margin += margin
            right += margin > 0
    assert int(out.count) == 2 and int(out.correct) == right
    assert float(out.loss_sum.detach()) == pytest.approx(expected_loss, rel=1e-5)
    assert float(out.reward_margin_sum) == pytest.approx(expected_margin, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_sft_weight_adds_the_preferred_answers_mean_token_nll_by_hand(tokenizer, tiny_model, kind):
    """dpo.sft_weight (TRL's rpo_alpha): each pair's loss gains weight x (-log p(chosen) / its answer
    tokens); the reward margin and the ranking are unchanged."""
    examples = [sides(tokenizer, "Say hi", "Hello there.", "Go away!"),
                sides(tokenizer, "Count to two", "One, two, three, four.", "no")]
    reference = [(-40.0, -35.5), (-20.25, -30.0)]
    for example, ref in zip(examples, reference, strict=True):
        example["reference_logps"] = ref
    recipe = load_recipe(None, ["method=full", "model.name=tiny-test"])
    setup = setup_training(recipe, 1, "cpu", base=tiny_model)
    setup.model.eval()
    batch = pair_batches(setup, examples, tokenizer.pad_token_id)([(0, 1)])
    out = PreferenceLoss(setup.model, beta=0.1, loss=kind, sft_weight=0.7)(**batch.model_inputs())
    plain = PreferenceLoss(setup.model, beta=0.1, loss=kind)(**batch.model_inputs())

    expected_loss, expected_margin = 0.0, 0.0
    with torch.no_grad():
        for example, (ref_chosen, ref_rejected) in zip(examples, reference, strict=True):
            n, labels = example["chosen_tokens"], example["labels"]
            chosen = float(_answer_logp(tiny_model, example["input_ids"][:n], labels[:n]))
            rejected = float(_answer_logp(tiny_model, example["input_ids"][n:], labels[n:]))
            tokens = sum(t != -100 for t in labels[:n][1:])
            log_ratio = (chosen - ref_chosen) - (rejected - ref_rejected)
            preference = math.log1p(math.exp(-0.1 * log_ratio)) if kind == "sigmoid" else (log_ratio - 5.0) ** 2
            expected_loss += preference + 0.7 * (-chosen / tokens)
            expected_margin += 0.1 * log_ratio
    assert tokens > 3  # the mean is over the answer's tokens, not the sequence
    assert float(out.loss_sum.detach()) == pytest.approx(expected_loss, rel=1e-5)
    assert float(out.reward_margin_sum) == pytest.approx(expected_margin, rel=1e-5, abs=1e-6)
    assert float(plain.reward_margin_sum) == pytest.approx(expected_margin, rel=1e-5, abs=1e-6)
    assert int(out.correct) == int(plain.correct)
    assert float(out.loss_sum.detach()) > float(plain.loss_sum.detach())


def test_sft_weight_reaches_the_loss_from_the_recipe(tmp_path, tiny_model):
    from tunelab.train.preference import preference_setup

    recipe = dpo_recipe(tmp_path, "dpo.sft_weight=0.25")
    setup = setup_training(load_recipe(None, ["method=full", "model.name=tiny-test"]), 1, "cpu", base=tiny_model)
    assert preference_setup(setup, recipe.dpo).loss_module.sft_weight == 0.25
    assert load_recipe(None, ["method=dpo"]).dpo.sft_weight == 1.0


def _log1mexp(x):
    return math.log(-math.expm1(x))


def test_orpo_loss_equals_a_hand_computation_without_a_reference(tokenizer, tiny_model):
    """ORPO (TRL's ORPOTrainer.odds_ratio_loss, the supervised term per answer token): no reference
    log-probs in the batch, the loss and margin from the model's own logits."""
    examples = [sides(tokenizer, "Say hi", "Hello there.", "Go away!"),
                sides(tokenizer, "Count to two", "One, two, three, four.", "no")]
    recipe = load_recipe(None, ["method=full", "model.name=tiny-test"])
    setup = setup_training(recipe, 1, "cpu", base=tiny_model)
    setup.loss_module = PreferenceLoss(setup.model, beta=0.1, loss="orpo", orpo_lambda=0.25)
    setup.model.eval()
    batch = pair_batches(setup, examples, tokenizer.pad_token_id)([(0, 1)])
    assert batch.reference_logps is None
    out = setup.loss_module(**batch.model_inputs())

    expected_loss, expected_margin, right = 0.0, 0.0, 0
    with torch.no_grad():
        for example in examples:
            n = example["chosen_tokens"]
            labels = example["labels"]
            tokens_c = sum(t != -100 for t in labels[:n][1:])
            tokens_r = sum(t != -100 for t in labels[n:][1:])
            chosen = float(_answer_logp(tiny_model, example["input_ids"][:n], labels[:n])) / tokens_c
            rejected = float(_answer_logp(tiny_model, example["input_ids"][n:], labels[n:])) / tokens_r
            log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
            expected_loss += -chosen + 0.25 * math.log1p(math.exp(-log_odds))  # - lambda * log sigmoid(log_odds)
            expected_margin += 0.25 * (chosen - rejected)
            right += chosen > rejected
    assert int(out.count) == 2 and int(out.correct) == right
    assert float(out.loss_sum.detach()) == pytest.approx(expected_loss, rel=1e-5)
    assert float(out.reward_margin_sum) == pytest.approx(expected_margin, rel=1e-5, abs=1e-6)


def test_orpo_log_odds_match_trl_on_both_sides_of_ln2():
    """The odds term from mean log-probs on both branches of log(1 - exp x), and a certain answer (0)
    stays finite."""
    from tunelab.train.preference import orpo_losses

    policy = torch.tensor([-0.2 * 4, -3.0 * 5, -0.0, -1.5 * 2])  # means -0.2 / -3.0, then 0.0 / -1.5
    tokens = torch.tensor([4, 5, 3, 2])
    losses, margins = orpo_losses(policy, tokens, 0.1)
    for k, (c, r) in enumerate([(-0.2, -3.0), (-1e-7, -1.5)]):
        log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
        assert float(losses[k]) == pytest.approx(-c + 0.1 * math.log1p(math.exp(-log_odds)), rel=1e-5, abs=1e-6)
        assert float(margins[k]) == pytest.approx(0.1 * (c - r), rel=1e-5, abs=1e-6)
    assert torch.isfinite(losses).all()


def test_orpo_run_computes_no_reference_and_learns_the_preference(tmp_path, tiny_model_dir):
    from tunelab.train.run import train

    recipe = dpo_recipe(tmp_path, "name=orpo", "dpo.loss=orpo", "dpo.orpo_lambda=0.5", "train.max_steps=20",
                        "train.eval_every_steps=10", "train.tokens_per_step=512")
    assert recipe.train.lr == 2.0e-4  # ORPO is mostly supervised: the supervised default, not DPO's 5e-5
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"lr": 5e-3})})
    result = train(recipe, progress=False)
    run = result.run_dir
    assert not (run / "train" / "reference_logps.json").exists()
    records = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[-1]["val_preference_acc"] == 1.0 and evals[-1]["val_reward_margin"] > 0
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.5  # the supervised term falls: one stage learns the answers too
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    plan = json.loads((run / "train" / "plan.json").read_text())
    assert plan["steps"] == 20


def test_kto_loss_equals_a_hand_computation_with_the_batchs_kl_estimate(tokenizer, tiny_model):
    """KTO (TRL's KTOTrainer, loss_type kto): each row's second sequence is its KL side; z = the batch's
    mean KL-side log-ratio (no gradient, at least 0), weights 1.5 desirable / 0.5 undesirable."""
    examples = [sides(tokenizer, "Say hi", "Hello there.", "One, two."),       # completion, then its KL side
                sides(tokenizer, "Count to two", "Go away!", "Hello there."),
                sides(tokenizer, "Greet me", "Hi, nice to meet you.", "Go away!")]
    labels = [1, 0, 1]
    reference = [(-40.0, -80.0), (-20.25, -70.0), (-35.0, -60.5)]
    for example, label, ref in zip(examples, labels, reference, strict=True):
        example["kto_label"], example["reference_logps"] = label, ref
    recipe = load_recipe(None, ["method=full", "model.name=tiny-test"])
    setup = setup_training(recipe, 1, "cpu", base=tiny_model)
    setup.loss_module = PreferenceLoss(setup.model, beta=0.1, loss="kto", kto_weights=(1.5, 0.5))
    setup.model.eval()
    batch = pair_batches(setup, examples, tokenizer.pad_token_id)([(0, 1), (2,)])
    assert batch.kto_labels.tolist() == [True, False, True]
    out = setup.loss_module(**batch.model_inputs())

    with torch.no_grad():
        ratios, kl_ratios = [], []
        for example, (ref, ref_kl) in zip(examples, reference, strict=True):
            n = example["chosen_tokens"]
            ratios.append(float(_answer_logp(tiny_model, example["input_ids"][:n], example["labels"][:n])) - ref)
            kl_ratios.append(float(_answer_logp(tiny_model, example["input_ids"][n:], example["labels"][n:])) - ref_kl)
    z = max(0.0, sum(kl_ratios) / 3)
    assert z > 0  # the reference values above make the KL term count

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    expected = sum(1.5 * (1 - sigmoid(0.1 * (r - z))) if label else 0.5 * (1 - sigmoid(0.1 * (z - r)))
                   for r, label in zip(ratios, labels, strict=True))
    margins = [0.1 * r if label else -0.1 * r for r, label in zip(ratios, labels, strict=True)]
    assert int(out.count) == 3 and int(out.correct) == sum(m > 0 for m in margins)
    assert float(out.loss_sum.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(out.reward_margin_sum) == pytest.approx(sum(margins), rel=1e-5, abs=1e-6)


def write_unpaired(path, count, seed=0, start=0):
    """The calm answers labelled desirable, the shouting ones undesirable, on separate prompts."""
    import random

    rng = random.Random(seed)
    lines = []
    for i in range(start, start + count):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        good = i % 2 == 0
        lines.append(json.dumps({"prompt": f"What is {a} plus {b}? ({i})", "label": good,
                                 "completion": f"It is {a + b}." if good else f"{a + b}!!! OBVIOUSLY!!!"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_kto_run_caches_the_reference_of_both_sides_and_learns_the_labels(tmp_path, tiny_model_dir):
    from tunelab.train.run import train

    train_file = write_unpaired(tmp_path / "train.jsonl", 32, seed=1)
    valid_file = write_unpaired(tmp_path / "valid.jsonl", 8, seed=2, start=100)
    recipe = load_recipe(None, [
        "method=dpo", "dpo.loss=kto", "dpo.beta=0.5", "model.name=tiny-test", f"data.train={train_file}",
        f"data.valid={valid_file}", "data.test_fraction=0", "data.max_seq_len=64", f"out_dir={tmp_path / 'runs'}",
        "train.budget=null", "lora.dropout=0", "name=kto", "train.max_steps=30", "train.lr=5e-3",
        "train.eval_every_steps=15", "train.tokens_per_step=512"])
    result = train(recipe, progress=False)
    run = result.run_dir
    cache = json.loads((run / "train" / "reference_logps.json").read_text())["logps"]
    assert len(cache) == 40 and all(len(v) == 2 for v in cache.values())  # the completion and the KL side
    records = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["val_preference_acc"] >= 0.875 and evals[-1]["val_reward_margin"] > 0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < 0.5  # 0.5: every example at its reference


def test_dpo_gradient_equals_full_logits_autograd(tokenizer, tiny_model):
    example = sides(tokenizer, "Say hi", "Hello there.", "Go away!")
    example["reference_logps"] = (-30.0, -31.0)
    recipe = load_recipe(None, ["method=full", "model.name=tiny-test"])
    setup = setup_training(recipe, 1, "cpu", base=tiny_model)
    setup.loss_module = PreferenceLoss(setup.model, beta=0.5, chunk_rows=3)  # several chunks, recomputed in backward
    batch = pair_batches(setup, [example], tokenizer.pad_token_id)([(0,)])
    setup.loss_module(**batch.model_inputs()).loss_sum.backward()
    ours = {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad(set_to_none=True)

    n = example["chosen_tokens"]
    chosen = _answer_logp(tiny_model, example["input_ids"][:n], example["labels"][:n])
    rejected = _answer_logp(tiny_model, example["input_ids"][n:], example["labels"][n:])
    loss = -torch.nn.functional.logsigmoid(0.5 * ((chosen + 30.0) - (rejected + 31.0)))
    loss.backward()
    for name, param in tiny_model.named_parameters():
        assert torch.allclose(ours[name], param.grad, rtol=1e-4, atol=1e-6), name


def test_dpo_run_learns_the_preference_and_caches_the_reference(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from tunelab.models import load_model
    from tunelab.train.run import train

    recipe = dpo_recipe(tmp_path, "name=dpo", "train.max_steps=30", "train.lr=5e-3", "train.eval_every_steps=10",
                        "train.tokens_per_step=512", "dpo.beta=0.5",
                        "dpo.sft_weight=0")  # plain DPO: its validation loss falls below log 2 / 2
    base_before = {k: v.clone() for k, v in load_model("tiny-test", dtype="float32", device="cpu").state_dict().items()}
    result = train(recipe, progress=False)
    run = result.run_dir
    records = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    # the reference is the starting model: held-out pairs start at margin 0 and the run moves them apart
    first_train = next(r for r in records if r["kind"] == "train")
    # a step's trainable count is its pairs (the loss is a mean over pairs), each pair ~105 tokens
    assert 2 <= first_train["trainable_tokens"] <= 5 and first_train["tokens"] / first_train["trainable_tokens"] > 90
    assert evals[-1]["val_preference_acc"] == 1.0 and evals[-1]["val_reward_margin"] > 1.0
    assert evals[-1]["val_loss"] < math.log(2) / 2
    assert evals[-1]["val_preference_acc"] == evals[-1]["val_token_acc"]
    assert (run / "adapter" / "adapter_config.json").is_file()

    # LoRA: every base weight bitwise unchanged, the adapter moved
    model = result.model
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(tensor, base_before[key]), name
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any(float(t.abs().max()) > 0 for k, t in adapter.items() if "lora_B" in k)

    # the cached reference equals recomputing it now, with the trained adapter switched off
    cache = json.loads((run / "train" / "reference_logps.json").read_text())["logps"]
    from tunelab.data.prepare import PreparedData

    prepared = PreparedData(run / "data", {})
    pairs = prepared.tokenized("train") + prepared.tokenized("valid")
    assert set(cache) == {p["id"] for p in pairs}
    setup = setup_training(recipe, 1, "cpu")
    setup.model = model
    setup.loss_module = PreferenceLoss(model, 0.5)
    again = reference_logps(setup, pairs, 0, 64, adapter_off=True)
    for pair, logps in zip(pairs, again, strict=True):
        assert logps == pytest.approx(cache[pair["id"]], abs=1e-4)
    # and with the adapter on, the trained model prefers the preferred answers more than the reference
    trained = reference_logps(setup, pairs, 0, 64, adapter_off=False)
    assert all((c - cache[p["id"]][0]) - (r - cache[p["id"]][1]) > 0 for p, (c, r) in zip(pairs, trained, strict=True))

    # a second attach reads the cache: nothing recomputed, the same values
    fresh = [{k: v for k, v in p.items() if k != "reference_logps"} for p in pairs]
    assert attach_reference(setup, recipe, run, [fresh], 0) == 0
    assert [list(p["reference_logps"]) for p in fresh] == [cache[p["id"]] for p in fresh]


RESUME_RECIPE = """\
name: {name}
model: {{name: tiny-test}}
method: dpo
data: {{train: train.jsonl, valid: valid.jsonl, max_seq_len: 64, test_fraction: 0}}
lora: {{dropout: 0.1}}
dpo: {{beta: 0.2, loss: {loss}}}
train: {{max_steps: 8, tokens_per_step: 256, micro_batch_tokens: 128, lr: 2.0e-3, eval_every_steps: 4,
         checkpoint_every_steps: 2, early_stop_patience: null, budget: null}}
"""


def _run_cli(folder, name, *, env=None, resume=False, loss="sigmoid"):
    (folder / f"{name}.yaml").write_text(RESUME_RECIPE.format(name=name, loss=loss))
    command = [sys.executable, "-m", "tunelab", "train", f"{name}.yaml"] + (["--resume"] if resume else [])
    import tunelab

    source = str(Path(tunelab.__file__).resolve().parents[1])  # this checkout's tunelab, whatever the cwd
    site = [str(faults.SITE)] if env else []  # faults asked for: the run loads them (tests/faults.py)
    environment = {**os.environ, "TQDM_DISABLE": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {}),
                   "PYTHONPATH": os.pathsep.join([source, *site, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=300)


def _losses(run):
    records = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "orpo"])
def test_dpo_resume_reproduces_the_uninterrupted_losses(tmp_path, tiny_model_dir, loss):
    write_pairs(tmp_path / "train.jsonl", 16, seed=1)
    write_pairs(tmp_path / "valid.jsonl", 4, seed=2, start=100)
    straight = _run_cli(tmp_path, "straight", loss=loss)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _run_cli(tmp_path, "killed", env={"TUNELAB_TEST_KILL_AT_STEP": "4"}, loss=loss)
    assert killed.returncode != 0
    resumed = _run_cli(tmp_path, "killed", resume=True, loss=loss)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    expected, got = _losses(tmp_path / "runs" / "straight"), _losses(tmp_path / "runs" / "killed")
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    assert max(abs(got[s] - expected[s]) for s in expected) <= 1e-6


def test_varlen_layout_gives_the_same_loss_as_the_masked_rows(tokenizer, tiny_model):
    from tunelab.train.loop import attention_layout

    examples = [sides(tokenizer, "Say hi", "Hello there.", "Go away!"), sides(tokenizer, "Count", "One, two.", "no")]
    for example in examples:
        example["reference_logps"] = (-30.0, -31.0)
    recipe = load_recipe(None, ["method=full", "model.name=tiny-test"])
    setup = setup_training(recipe, 1, "cpu", base=tiny_model)
    setup.loss_module = PreferenceLoss(setup.model, beta=0.1)
    setup.model.eval()
    losses = {}
    for layout in ("mask", "varlen"):
        setup.attention = layout
        with torch.no_grad(), attention_layout(setup):
            out = setup.loss_module(**pair_batches(setup, examples, tokenizer.pad_token_id)([(0, 1)]).model_inputs())
        losses[layout] = (float(out.loss_sum), float(out.reward_margin_sum))
    assert losses["varlen"] == pytest.approx(losses["mask"], rel=1e-5)
