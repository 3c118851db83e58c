"""The variable-length layout (one row, cu_seqlens, tunelab's varlen attention) against the masked
padded layout every other path uses: the same loss, gradients and counts, and the model's own
attention restored afterwards. On CPU the varlen function runs its reference path (SDPA per
example); the flash kernel is checked against the same reference on the GPU (bench/train_speed.py)."""

from __future__ import annotations

import pytest
import torch

from train_examples import random_examples
from tunelab.data.pack import IGNORE_INDEX, collate, collate_varlen
from tunelab.train.attention import NAME, kernel_name, use_varlen_attention
from tunelab.train.loss import CausalLMLoss


def _examples(lengths: list[int], seed: int = 0) -> list[dict]:
    return random_examples(lengths, seed, prompt_fraction=1 / 3)


def test_collate_varlen_lays_examples_end_to_end_with_boundaries():
    examples = _examples([5, 3, 4])
    batch = collate_varlen(examples, [(0, 1), (2,)], pad_id=2, pad_to_multiple=8)
    assert batch.input_ids.shape == (1, 16)
    assert batch.cu_seqlens.tolist() == [0, 5, 8, 12, 16]  # the padding tail is a sequence of its own
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]
    assert batch.input_ids[0, 5:8].tolist() == examples[1]["input_ids"]
    assert (batch.labels[0, 12:] == IGNORE_INDEX).all() and batch.labels[0, 5] == IGNORE_INDEX
    assert batch.tokens == 12 and batch.max_seqlen == 5 and batch.attention_mask is None
    same = collate(examples, [(0, 1), (2,)], pad_id=2)
    assert batch.trainable_tokens == same.trainable_tokens
    unpadded = collate_varlen(examples, [(2,), (0, 1)], pad_id=2, max_seqlen=64)
    assert unpadded.cu_seqlens.tolist() == [0, 4, 9, 12] and unpadded.max_seqlen == 64


def test_varlen_layout_gives_the_masked_loss_and_gradients(tiny_model):
    examples = _examples([30, 45, 17, 52, 9], seed=1)
    rows = [(1, 0, 2), (3, 4)]
    loss = CausalLMLoss(tiny_model)

    def run(batch, varlen: bool):
        tiny_model.zero_grad(set_to_none=True)
        if varlen:
            with use_varlen_attention(tiny_model):
                out = loss.forward_batch(batch)
        else:
            out = loss.forward_batch(batch)
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        return out, grads

    masked, masked_grads = run(collate(examples, rows, pad_id=2), varlen=False)
    varlen, varlen_grads = run(collate_varlen(examples, rows, pad_id=2, pad_to_multiple=16), varlen=True)
    assert int(varlen.count) == int(masked.count) and int(varlen.correct) == int(masked.correct)
    assert varlen.loss_sum.item() == pytest.approx(masked.loss_sum.item(), rel=1e-5)
    assert varlen_grads.keys() == masked_grads.keys() and varlen_grads
    for name, grad in masked_grads.items():
        assert torch.allclose(varlen_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_varlen_examples_do_not_see_each_other(tiny_model):
    """Changing one example's tokens leaves the other examples' losses in the row unchanged."""
    examples = _examples([20, 25, 15], seed=3)
    changed = [dict(e) for e in examples]
    changed[0] = {**examples[0], "input_ids": [7] * 20}

    def per_example(exs):
        batch = collate_varlen(exs, [(0, 1, 2)], pad_id=2)
        with torch.no_grad(), use_varlen_attention(tiny_model):
            logits = tiny_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                tunelab_cu_seqlens=batch.cu_seqlens, tunelab_max_seqlen=batch.max_seqlen).logits[0]
        return [logits[s:e] for s, e in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(), strict=True)]

    before, after = per_example(examples), per_example(changed)
    assert not torch.allclose(before[0], after[0])
    assert torch.allclose(before[1], after[1], atol=1e-5) and torch.allclose(before[2], after[2], atol=1e-5)


def test_model_attention_is_restored_after_training(tiny_model):
    original = tiny_model.config._attn_implementation
    with use_varlen_attention(tiny_model):
        assert tiny_model.config._attn_implementation == NAME
        assert tiny_model.model.layers[0].self_attn.config._attn_implementation == NAME
    assert tiny_model.config._attn_implementation == original


def test_kernel_choice_is_reference_on_cpu():
    assert kernel_name(torch.device("cpu"), torch.bfloat16) == "sdpa-per-example"
    assert kernel_name(torch.device("cuda"), torch.float32) == "sdpa-per-example"


def test_attention_dropout_is_applied_not_refused(tiny_model):
    """A model with attention dropout trains through the reference path (the flash kernel has none)."""
    examples = _examples([20, 25, 15], seed=5)
    batch = collate_varlen(examples, [(0, 1, 2)], pad_id=2)
    loss = CausalLMLoss(tiny_model)
    for layer in tiny_model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    with use_varlen_attention(tiny_model), torch.no_grad():
        tiny_model.train()
        torch.manual_seed(0)
        dropped = loss.forward_batch(batch).loss_sum.item()
        tiny_model.eval()
        plain = loss.forward_batch(batch).loss_sum.item()
    reference = loss.forward_batch(collate(examples, [(0, 1, 2)], pad_id=2)).loss_sum.item()
    assert plain == pytest.approx(reference, rel=1e-5)
    assert dropped != pytest.approx(plain, rel=1e-4)
