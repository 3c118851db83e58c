"""The training loop on the tiny model, in process: overfitting, what LoRA and full fine-tuning
change, non-finite steps, early stopping with the best checkpoint kept, and the saved outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from faults import NAN_ENV, patch
from train_examples import qa_pairs, tokenized
from tunelab.config import load_recipe
from tunelab.errors import ConfigError
from tunelab.runs import RunPaths
from tunelab.train.loop import NonFiniteTraining
from tunelab.train.run import start_run_dir, train_on_examples
from tunelab.train.setup import LrSchedule, setup_training

BASE = ["model.name=tiny-test", "train.epochs=1000", "train.tokens_per_step=512", "train.warmup_ratio=0",
        "lora.dropout=0", "train.eval_every_steps=1000", "train.checkpoint_every_steps=1000"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """2 shared cores: OpenMP threads that spin-wait slow training down 10x or more when other
    processes compete for the cores; one thread runs at full speed regardless."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def train_run(tmp_path, tokenizer, tiny_model_dir):
    def run(overrides, train_pairs=None, valid_pairs=None, **kwargs):
        recipe = load_recipe(None, [f"out_dir={tmp_path}", *BASE, *overrides])
        paths = RunPaths(recipe.run_dir)
        start_run_dir(paths, recipe, resume=False)
        train = tokenized(tokenizer, train_pairs or qa_pairs(8))
        valid = tokenized(tokenizer, valid_pairs) if valid_pairs else []
        result = train_on_examples(recipe, paths, tokenizer, train, valid, device="cpu", progress=False, **kwargs)
        return result, paths

    return run


def _log(paths, kind):
    return [r for r in map(json.loads, paths.train_log.read_text().splitlines()) if r["kind"] == kind]


def _logits(model, tokenizer):
    ids = torch.tensor([tokenized(tokenizer, qa_pairs(1, start=3))[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_fine_tuning_overfits_changes_every_weight_and_saves_a_loadable_model(train_run, tokenizer, tiny_model):
    from transformers import AutoModelForCausalLM

    result, paths = train_run(["name=full", "method=full", "train.lr=1e-2", "train.max_steps=30"])
    losses = [r["loss"] for r in _log(paths, "train")]
    assert len(losses) == 30 and losses[0] > 10.0
    assert losses[-1] < 1.5  # 8 examples memorised (from ~10.7, the entropy of a random model)
    initial = dict(tiny_model.named_parameters())
    for name, param in result.model.named_parameters():
        assert not torch.equal(param, initial[name]), f"{name} did not change"
    saved = AutoModelForCausalLM.from_pretrained(paths.model, dtype=torch.float32)
    assert torch.allclose(_logits(saved, tokenizer), _logits(result.model, tokenizer), atol=1e-5)
    summary = json.loads((paths.root / "train" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["method"] == "full" and summary["trainable_params"] == summary["total_params"]


def test_lora_keeps_base_bitwise_trains_the_adapter_and_peft_loads_it(train_run, tokenizer, tiny_model, tiny_model_dir):
    from peft import PeftModel

    from tunelab.models import load_model

    result, paths = train_run(["name=lora", "train.lr=1e-2", "train.max_steps=30"])
    losses = [r["loss"] for r in _log(paths, "train")]
    assert losses[0] > 10.5 and losses[-1] < 10.0  # LoRA on a random 2-layer model learns less, but learns
    initial = dict(tiny_model.named_parameters())
    base = result.model.get_base_model()
    lora_params = 0
    for name, param in base.named_parameters():
        if "lora_" in name:
            lora_params += 1
            if "lora_B" in name:  # initialised to zero
                assert param.abs().sum() > 0, f"{name} did not change"
        else:
            clean = name.replace(".base_layer", "")
            assert torch.equal(param, initial[clean]), f"base weight {clean} changed"
    assert lora_params == 2 * 7 * 2  # A and B on all 7 linear layers of both decoder layers
    loaded = PeftModel.from_pretrained(load_model("tiny-test", dtype="float32", device="cpu"), str(paths.adapter))
    assert torch.equal(_logits(loaded, tokenizer), _logits(result.model, tokenizer))


def test_injected_nan_is_skipped_with_parameters_unchanged_and_logged(train_run, monkeypatch):
    monkeypatch.setenv(NAN_ENV, "3")
    patch(monkeypatch.setattr)
    snapshots = {}

    def record(state, setup):
        snapshots[state.step] = {k: v.clone() for k, v in setup.trainable_state().items()}

    result, paths = train_run(["name=nan", "train.lr=1e-2", "train.max_steps=5"], on_step_end=record)
    for name in snapshots[2]:
        assert torch.equal(snapshots[3][name], snapshots[2][name])
    assert any(not torch.equal(snapshots[4][n], snapshots[3][n]) for n in snapshots[3])
    events = _log(paths, "event")
    assert [(e["step"], e["event"]) for e in events if e["event"] == "nonfinite_skipped"] == [(3, "nonfinite_skipped")]
    assert [r["step"] for r in _log(paths, "train")] == [1, 2, 4, 5]
    assert result.steps == 5


def test_consecutive_non_finite_steps_abort_with_a_clear_message(train_run, monkeypatch):
    monkeypatch.setenv(NAN_ENV, "2")
    patch(monkeypatch.setattr)
    with pytest.raises(NonFiniteTraining, match="consecutive steps had a non-finite loss"):
        train_run(["name=abort", "train.max_steps=5", "train.max_nonfinite_steps=1"])


def test_overfitting_triggers_early_stopping_and_the_best_checkpoint_is_the_output(train_run):
    # validation asks the same questions with other answers: memorising the train answers hurts it
    result, paths = train_run(
        ["name=early", "method=full", "train.lr=1e-2", "train.max_steps=60", "train.eval_every_steps=3",
         "train.early_stop_patience=2", "train.keep_checkpoints=1", "train.checkpoint_every_steps=3"],
        train_pairs=qa_pairs(8), valid_pairs=qa_pairs(8, answer_offset=1),
    )
    evals = _log(paths, "eval")
    events = {e["event"] for e in _log(paths, "event")}
    assert result.stopped_early and "early_stop" in events and "overfitting" in events
    assert result.steps < 60 and result.best_step < result.steps
    best = min(evals, key=lambda r: r["val_loss"])
    assert best["step"] == result.best_step and best["is_best"]
    assert evals[-1]["val_loss"] > best["val_loss"]
    # keep_checkpoints=1 keeps the newest; the best survives as well
    best_dir, last_dir = paths.checkpoints / f"step-{result.best_step}", paths.checkpoints / f"step-{result.steps}"
    assert best_dir.is_dir() and last_dir.is_dir()
    output = load_file(str(paths.model / "model.safetensors"))
    best_weights = load_file(str(best_dir / "weights.safetensors"))
    last_weights = load_file(str(last_dir / "weights.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(output[name], best_weights[name]) and not torch.equal(output[name], last_weights[name])


def test_gradient_checkpointing_gives_the_same_losses(train_run):
    _, plain = train_run(["name=plain", "train.max_steps=3", "train.lr=1e-2"])
    _, ckpt = train_run(["name=gc", "train.max_steps=3", "train.lr=1e-2", "train.gradient_checkpointing=true"])
    a = [r["loss"] for r in _log(plain, "train")]
    b = [r["loss"] for r in _log(ckpt, "train")]
    assert a == pytest.approx(b, rel=1e-6)


def test_unpacked_padded_batches_give_the_packed_losses(train_run):
    # 8 short examples fit one step either way, so both runs see the same examples in each step
    _, packed = train_run(["name=packed", "train.max_steps=3", "train.lr=1e-2"])
    _, padded = train_run(["name=padded", "train.max_steps=3", "train.lr=1e-2", "train.packing=false"])
    a = [r["loss"] for r in _log(packed, "train")]
    b = [r["loss"] for r in _log(padded, "train")]
    assert a == pytest.approx(b, rel=1e-5)
    assert [r["tokens"] for r in _log(packed, "train")] == [r["tokens"] for r in _log(padded, "train")]


def test_dora_trains_magnitudes_and_qlora_on_cpu_says_what_to_use(tiny_model_dir):
    dora = setup_training(load_recipe(None, ["model.name=tiny-test", "method=dora"]), total_steps=10, device="cpu")
    names = [n for n, p in dora.model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    with pytest.raises(ConfigError, match="CUDA GPU.*method=lora"):
        setup_training(load_recipe(None, ["model.name=tiny-test", "method=qlora"]), total_steps=10, device="cpu")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    schedule = LrSchedule(peak_lr=1.0, total_steps=100, warmup_steps=10, kind="cosine", min_lr_ratio=0.1)
    lrs = [schedule.lr_at(s) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0 and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[99] == pytest.approx(0.1) and min(lrs[10:]) >= 0.1  # the last step takes the floor
    linear = LrSchedule(1.0, 101, 0, "linear", 0.0)
    assert linear.lr_at(50) == pytest.approx(0.5) and linear.lr_at(100) == 0.0
    assert LrSchedule(1.0, 100, 0, "constant").lr_at(70) == 1.0
    assert not math.isnan(LrSchedule(1.0, 1, 1).lr_at(0))


def test_a_second_training_in_the_same_run_dir_needs_resume(tmp_path):
    recipe = load_recipe(None, [f"out_dir={tmp_path}", "name=twice"])
    paths = RunPaths(recipe.run_dir)
    start_run_dir(paths, recipe, resume=False)
    paths.train_log.parent.mkdir(parents=True)
    paths.train_log.write_text("")
    with pytest.raises(ConfigError, match="--resume"):
        start_run_dir(paths, recipe, resume=False)
    changed = load_recipe(None, [f"out_dir={tmp_path}", "name=twice", "train.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"train\.lr"):
        start_run_dir(paths, changed, resume=True)
