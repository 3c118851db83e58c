"""The chunked cross-entropy equals the reference on full logits, in value and gradients, and the
step's loss is normalised by all trainable tokens of the accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train_examples import reference_loss_sums
from tunelab.data.pack import IGNORE_INDEX, collate
from tunelab.train.loss import CausalLMLoss, linear_cross_entropy


def _inputs(n=37, hidden=24, vocab=101, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, t


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk_rows", [1, 8, 1000])
def test_linear_cross_entropy_matches_reference(bias, softcap, chunk_rows):
    h, w, b, t = _inputs(bias=bias)
    loss, correct = linear_cross_entropy(h, w, t, bias=b, softcap=softcap, chunk_rows=chunk_rows)
    loss.backward()
    grads = [h.grad.clone(), w.grad.clone()] + ([b.grad.clone()] if bias else [])
    for p in (h, w, b):
        if p is not None:
            p.grad = None
    logits = h @ w.T + (b if bias else 0)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ref = F.cross_entropy(logits, t, reduction="sum")
    ref.backward()
    ref_grads = [h.grad, w.grad] + ([b.grad] if bias else [])
    # float32 logits inside, float64 reference
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert correct.item() == (logits.argmax(-1) == t).sum().item()
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_works():
    h, w, _, t = _inputs()
    w.requires_grad_(False)
    loss, _ = linear_cross_entropy(h, w, t, chunk_rows=5)
    loss.backward()
    assert w.grad is None and h.grad is not None
    with torch.no_grad():
        again, _ = linear_cross_entropy(h, w, t, chunk_rows=5)
    assert again.item() == pytest.approx(loss.item(), rel=1e-9)
    assert not again.requires_grad


def test_no_trainable_tokens_gives_zero():
    h, w, _, t = _inputs(n=0)
    loss, correct = linear_cross_entropy(h, w, t)
    assert loss.item() == 0.0 and correct.item() == 0


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    # float32 sums in another order differ by ~1e-7 relative; a wrong gradient differs by >> 1e-4
    return ((got - want).norm() / want.norm()).item()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in (40, 25, 60, 33):
        ids = torch.randint(10, 40000, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]})
    return examples


def test_model_loss_equals_full_logits_cross_entropy(tiny_model):
    examples = _batch()
    batch = collate(examples, [(0, 1), (2,), (3,)], pad_id=2)
    loss_module = CausalLMLoss(tiny_model, chunk_rows=16)
    ours = loss_module.forward_batch(batch)
    ours.loss_sum.backward()
    ours_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    ref = reference_loss_sums(tiny_model, batch)
    ref.loss_sum.backward()
    assert ours.count.item() == ref.count.item() == batch.trainable_tokens
    assert ours.correct.item() == ref.correct.item()
    assert ours.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-5)
    for name, p in tiny_model.named_parameters():
        assert _relative_error(ours_grads[name], p.grad) < 1e-4, name


def test_accumulated_micro_batches_weigh_every_token_equally(tiny_model):
    """Sum over the whole accumulation / total count == one batch's token mean; a per-micro-batch
    mean (the common mistake) would weigh the short micro-batch's tokens more."""
    examples = _batch(1)
    loss_module = CausalLMLoss(tiny_model)
    whole = collate(examples, [(0,), (1,), (2,), (3,)], pad_id=2)
    total = whole.trainable_tokens
    (loss_module.forward_batch(whole).loss_sum / total).backward()
    one_batch = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    for rows in ([(0,), (2,)], [(1,)], [(3,)]):
        (loss_module.forward_batch(collate(examples, rows, pad_id=2)).loss_sum / total).backward()
    for name, p in tiny_model.named_parameters():
        assert _relative_error(one_batch[name], p.grad) < 1e-5, name
