"""The data audit: training dynamics recorded per example, and the ranking of suspect examples."""

from __future__ import annotations

import json

import pytest
import torch

from train_examples import qa_pairs, random_examples, tokenized
from tunelab.config import load_recipe
from tunelab.data.pack import collate, collate_varlen, trainable_count
from tunelab.runs import RunPaths
from tunelab.train.dynamics import DynamicsRecorder, example_losses, read_dynamics
from tunelab.train.loss import CausalLMLoss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- dynamics


def _alone(loss: CausalLMLoss, examples, index: int) -> tuple[float, int]:
    out = loss.forward_batch(collate(examples, [(index,)], pad_id=2))
    return out.loss_sum.item(), int(out.count)


@pytest.mark.parametrize("layout", ["masked", "varlen"])
def test_per_example_losses_from_a_packed_batch_equal_each_example_alone(tiny_model, layout):
    from tunelab.train.attention import use_varlen_attention

    examples = random_examples([30, 45, 17, 52, 9, 23], 1, prompt_fraction=0.5)
    loss = CausalLMLoss(tiny_model, chunk_rows=7)  # chunks that cut through examples
    micro_batches = [((1, 0, 2), (3,)), ((5, 4),)]
    with torch.no_grad():
        alone = {i: _alone(loss, examples, i) for i in range(6)}
        if layout == "masked":
            outs = [loss.forward_batch(collate(examples, rows, pad_id=2)) for rows in micro_batches]
        else:
            with use_varlen_attention(tiny_model):
                outs = [loss.forward_batch(collate_varlen(examples, rows, pad_id=2, pad_to_multiple=16))
                        for rows in micro_batches]
    order, sums, counts = example_losses(examples, micro_batches, [o.token_losses for o in outs])
    assert order == [1, 0, 2, 3, 5, 4]
    assert counts == [trainable_count(examples[i]) for i in order] == [alone[i][1] for i in order]
    for index, got in zip(order, sums, strict=True):
        assert got == pytest.approx(alone[index][0], rel=1e-5)
    # the per-example sums add up to the loss the step trains on
    assert sum(sums) == pytest.approx(sum(o.loss_sum.item() for o in outs), rel=1e-6)


def test_token_losses_need_no_gradient_and_leave_the_loss_unchanged(tiny_model):
    examples = random_examples([20, 31], 3, prompt_fraction=0.4)
    loss = CausalLMLoss(tiny_model)
    out = loss.forward_batch(collate(examples, [(0, 1)], pad_id=2))
    assert out.loss_sum.requires_grad and not out.token_losses.requires_grad
    assert out.token_losses.shape == (int(out.count),)
    assert out.token_losses.sum().item() == pytest.approx(out.loss_sum.item(), rel=1e-6)


def _train(tmp_path, tokenizer, pairs, overrides=(), **kwargs):
    from tunelab.train.run import start_run_dir, train_on_examples

    recipe = load_recipe(None, [f"out_dir={tmp_path}", "model.name=tiny-test", "train.tokens_per_step=256",
                                "train.warmup_ratio=0", "lora.dropout=0", "train.eval_every_steps=1000",
                                "train.checkpoint_every_steps=1000", *overrides])
    paths = RunPaths(recipe.run_dir)
    start_run_dir(paths, recipe, resume=False)
    train = tokenized(tokenizer, pairs)
    result = train_on_examples(recipe, paths, tokenizer, train, [], device="cpu", progress=False, **kwargs)
    return result, paths, train


def test_training_records_every_example_once_an_epoch_with_its_answer_tokens(tmp_path, tokenizer, tiny_model_dir):
    result, paths, train = _train(tmp_path, tokenizer, qa_pairs(12), ["train.epochs=3"])
    lines = [json.loads(line) for line in (paths.root / "train" / "dynamics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, result.steps + 1))
    seen = read_dynamics(paths.root / "train")
    assert sorted(seen) == list(range(12))
    for index, entry in seen.items():
        assert entry.epochs == [0, 1, 2]  # seen once in each epoch, in order
        assert entry.tokens == trainable_count(train[index])
    # training on the same answers: the mean loss falls from the first pass to the last
    first = sum(e.mean_losses[0] for e in seen.values())
    last = sum(e.mean_losses[-1] for e in seen.values())
    assert last < first
    # each line's losses sum to the step's logged loss (mean over its trainable tokens)
    log = [json.loads(line) for line in paths.train_log.read_text().splitlines()]
    steps = {r["step"]: r for r in log if r["kind"] == "train"}
    for line in lines:
        mean = sum(line["loss_sum"]) / sum(line["tokens"])
        assert mean == pytest.approx(steps[line["step"]]["loss"], rel=1e-4)


def test_a_resumed_recorder_drops_the_steps_after_its_checkpoint(tmp_path):
    examples = random_examples([10, 12], 0, prompt_fraction=0.5)
    counts = [trainable_count(e) for e in examples]
    recorder = DynamicsRecorder.open(tmp_path, examples, 0)
    for step in (1, 2, 3):
        recorder.add(((0, 1),), torch.ones(sum(counts)) * step)
        recorder.write_step(step, 0)
    recorder.add(((0,),), torch.ones(counts[0]))
    recorder.write_step(4, 0, keep=False)  # a skipped step writes nothing
    recorder.close()
    again = DynamicsRecorder.open(tmp_path, examples, 2)
    again.add(((1,),), torch.full((counts[1],), 5.0))
    again.write_step(3, 0)
    again.close()
    seen = read_dynamics(tmp_path)
    assert seen[0].steps == [1, 2] and seen[0].mean_losses == [1.0, 2.0]
    assert seen[1].steps == [1, 2, 3] and seen[1].mean_losses == [1.0, 2.0, 5.0]
