"""Packing, the step plan and collation; isolation of packed examples on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from train_examples import random_examples
from tunelab.data.pack import (
    IGNORE_INDEX,
    collate,
    epoch_order,
    group_micro_batches,
    pack_rows,
    plan_steps,
    single_rows,
    trainable_count,
)
from tunelab.errors import ConfigError


def _examples(lengths: list[int], seed: int = 0, trainable_from: float = 0.5) -> list[dict]:
    return random_examples(lengths, seed, prompt_fraction=trainable_from)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=80), st.integers(64, 200))
def test_pack_rows_places_every_example_once_within_capacity(lengths, capacity):
    rows = pack_rows(lengths, capacity)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    # best fit never needs more than twice the lower bound of rows
    assert len(rows) <= 2 * math.ceil(sum(lengths) / capacity)
    assert pack_rows(lengths, capacity) == rows  # deterministic


def test_best_fit_finds_the_perfect_packing():
    # 6+4, 7+3, 5+5 fill three rows of 10 exactly; first-fit in input order would need four
    lengths = [4, 3, 5, 6, 5, 7]
    rows = pack_rows(lengths, 10)
    assert len(rows) == 3
    assert sorted(sum(lengths[i] for i in row) for row in rows) == [10, 10, 10]


def test_too_long_example_is_a_clear_error():
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        pack_rows([5, 30, 7], 16)


def test_plan_reads_every_row_once_per_epoch_with_bounded_steps():
    examples = _examples([20, 35, 50, 12, 64, 40, 33, 18, 27, 60])
    rows = pack_rows([len(e["input_ids"]) for e in examples], 64)
    plan = plan_steps(examples, rows, tokens_per_step=128, micro_batch_tokens=64, epochs=2, seed=3)
    for epoch in (0, 1):
        steps = [s for s in plan if s.epoch == epoch]
        seen = [row for s in steps for micro in s.micro_batches for row in micro]
        assert sorted(seen) == sorted(rows)
        assert [s.position for s in steps] == sorted(s.position for s in steps)
        for s in steps:
            assert s.tokens <= 128 or sum(len(m) for m in s.micro_batches) == 1
            for micro in s.micro_batches:
                width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in micro)
                assert len(micro) * width <= 64 or len(micro) == 1
            assert s.trainable_tokens == sum(trainable_count(examples[i]) for m in s.micro_batches for r in m for i in r)
    assert epoch_order(len(rows), 3, 0) != epoch_order(len(rows), 3, 1)
    assert plan == plan_steps(examples, rows, tokens_per_step=128, micro_batch_tokens=64, epochs=2, seed=3)
    assert plan != plan_steps(examples, rows, tokens_per_step=128, micro_batch_tokens=64, epochs=2, seed=4)


def test_fractional_epochs_and_max_steps():
    examples = _examples([10] * 40)
    rows = single_rows(40)
    full = plan_steps(examples, rows, tokens_per_step=40, micro_batch_tokens=40, epochs=1, seed=0)
    assert len(full) == 10
    assert len(plan_steps(examples, rows, tokens_per_step=40, micro_batch_tokens=40, epochs=1.3, seed=0)) == 13
    assert len(plan_steps(examples, rows, tokens_per_step=40, micro_batch_tokens=40, epochs=5, seed=0, max_steps=7)) == 7


def test_micro_batches_group_similar_lengths():
    rows = [(0,), (1,), (2,), (3,)]
    batches = group_micro_batches(rows, [10, 50, 12, 48], micro_batch_tokens=100)
    assert batches == [((1,), (3,)), ((2,), (0,))]


def test_unpadded_micro_batches_count_real_tokens():
    rows = [(0,), (1,), (2,), (3,)]
    # padded: 3 rows x 50 > 115; end to end (the varlen layout) 50 + 48 + 12 fits, 10 more does not
    assert group_micro_batches(rows, [10, 50, 12, 48], micro_batch_tokens=115, padded=False) == [((1,), (3,), (2,)), ((0,),)]
    assert group_micro_batches(rows, [10, 50, 12, 48], micro_batch_tokens=115) == [((1,), (3,)), ((2,), (0,))]


def test_collate_restarts_positions_isolates_segments_and_masks_first_labels():
    examples = _examples([5, 3, 4], trainable_from=0.0)
    batch = collate(examples, [(0, 1), (2,)], pad_id=2)
    assert batch.input_ids.shape == (2, 8)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch.position_ids[1, :4].tolist() == [0, 1, 2, 3]
    assert batch.input_ids[1, 4:].tolist() == [2, 2, 2, 2]
    # the first token of each example has no predecessor in its example: never a target
    assert batch.labels[0, 0] == IGNORE_INDEX and batch.labels[0, 5] == IGNORE_INDEX
    assert (batch.labels[1, 4:] == IGNORE_INDEX).all()
    assert batch.tokens == 12 and batch.trainable_tokens == 4 + 2 + 3
    mask = batch.attention_mask[0, 0]
    assert mask[6, 5] and mask[6, 6] and not mask[6, 4] and not mask[5, 6]
    assert not batch.attention_mask[1, 0, 2, 3]  # causal
    assert batch.attention_mask.any(dim=-1).all()  # no empty attention row, so no NaN
    single = collate(examples, [(0,)], pad_id=2)
    assert single.attention_mask is None  # one example, no padding: plain causal attention
    padded = collate(examples, [(0,), (1,)], pad_id=2)
    assert padded.attention_mask is None  # one example a row: its padding follows it, unseen by a causal row
    assert padded.input_ids[1, 3:].tolist() == [2, 2] and (padded.labels[1, 3:] == IGNORE_INDEX).all()


def _per_example_losses(model, batch, examples, rows):
    """Cross-entropy of each example's trainable tokens, from the model's full logits."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask).logits
    losses = []
    for r, row in enumerate(rows):
        at = 0
        for index in row:
            n = len(examples[index]["input_ids"])
            targets = batch.labels[r, at + 1 : at + n]
            losses.append(
                torch.nn.functional.cross_entropy(logits[r, at : at + n - 1], targets, ignore_index=IGNORE_INDEX, reduction="sum")
            )
            at += n
    return losses


def test_packed_rows_give_each_example_its_loss_alone(tiny_model):
    examples = _examples([30, 45, 17, 52, 9], seed=1)
    rows = [(1, 0, 2), (3, 4)]
    packed = collate(examples, rows, pad_id=2)
    assert packed.attention_mask is not None
    with torch.no_grad():
        in_rows = _per_example_losses(tiny_model, packed, examples, rows)
        alone = [_per_example_losses(tiny_model, collate(examples, [(i,)], 2), examples, [(i,)])[0] for i in (1, 0, 2, 3, 4)]
    for got, want in zip(in_rows, alone, strict=True):
        assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))


def test_padded_path_gives_the_packed_loss(tiny_model):
    from tunelab.train.loss import CausalLMLoss

    examples = _examples([30, 45, 17, 52], seed=2)
    loss = CausalLMLoss(tiny_model)
    with torch.no_grad():
        packed = loss.forward_batch(collate(examples, [(3, 2), (1, 0)], 2))
        padded = loss.forward_batch(collate(examples, single_rows(4), 2))
    assert packed.count == padded.count
    assert abs(packed.loss_sum.item() - padded.loss_sum.item()) <= 1e-5 * abs(padded.loss_sum.item())
