"""Automatic micro-batch sizing on a GPU: the most tokens per forward pass that fit a memory budget.

Reads a TrainSetup; writes nothing (it runs throw-away forward/backward passes on random tokens and
leaves no gradients behind). Used by train/run.py when train.micro_batch_tokens is not set.

Why probe rather than estimate: activation memory depends on the model's architecture, the
attention kernel, gradient checkpointing and the allocator, which no formula here would track. One
forward/backward at each candidate size, largest first, with the peak allocation measured, costs a
few seconds and gives the answer for this model on this card. Optimizer state (created lazily at
the first step, so not seen by the probe) is added: AdamW keeps two float32 tensors per trainable
parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from tunelab.train.loop import attention_layout, batch_builder

if TYPE_CHECKING:
    from tunelab.train.setup import TrainSetup

DEFAULT_BUDGET_FRACTION = 0.85  # of the card's total memory; the rest absorbs fragmentation


def candidate_sizes(tokens_per_step: int, row_tokens: int) -> list[int]:
    """tokens_per_step, then halvings, down to one row (never fewer tokens than a row holds)."""
    sizes, size = [], max(tokens_per_step, row_tokens)
    while size > row_tokens:
        sizes.append(size)
        size //= 2
    sizes.append(row_tokens)
    return sizes


def choose_size(candidates: Sequence[int], peak_bytes: Callable[[int], int | None], budget_bytes: int) -> tuple[int, list[dict]]:
    """The first (largest) candidate whose measured peak fits the budget; `peak_bytes` returns None
    when the size ran out of memory. The smallest candidate is the answer when none fits (training
    then fails with the out-of-memory error of a real step, which says more than a guess would).
    Returns (size, what was tried) for the log."""
    tried = []
    for size in candidates:
        peak = peak_bytes(size)
        tried.append({"micro_batch_tokens": size, "peak_bytes": peak, "fits": peak is not None and peak <= budget_bytes})
        if tried[-1]["fits"]:
            return size, tried
    return candidates[-1], tried


def _probe_peak_bytes(setup: TrainSetup, tokens: int, row_tokens: int, vocab_size: int) -> int | None:
    """Peak CUDA allocation of one forward/backward over `tokens` random tokens in rows of
    `row_tokens`, every position trained (the loss's worst case); None if it ran out of memory."""
    device = setup.device
    generator = torch.Generator().manual_seed(0)
    lengths = [row_tokens] * (tokens // row_tokens) + ([tokens % row_tokens] if tokens % row_tokens else [])
    examples = []
    for n in lengths:
        ids = torch.randint(0, vocab_size, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    batch = batch_builder(setup, examples, pad_id=0)([(i,) for i in range(len(examples))])
    autocast = torch.autocast(device.type, dtype=setup.autocast_dtype or torch.float32, enabled=setup.autocast_dtype is not None)

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with autocast, attention_layout(setup):
            out = setup.loss_module(**batch.model_inputs())
        out.loss_sum.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        setup.optimizer.zero_grad(set_to_none=True)
        setup.model.zero_grad(set_to_none=True)
        del batch
        torch.cuda.empty_cache()


def auto_micro_batch_tokens(
    setup: TrainSetup, tokens_per_step: int, row_tokens: int, vocab_size: int | None = None,
    budget_fraction: float = DEFAULT_BUDGET_FRACTION,
) -> tuple[int, list[dict]]:
    """The largest micro-batch (in tokens) that fits `budget_fraction` of the GPU's memory. The probe's
    random token ids are drawn below `vocab_size` (default: the model's embedding rows)."""
    if setup.device.type != "cuda":
        raise ValueError("automatic micro-batch sizing measures CUDA memory; on CPU use max_seq_len")
    if vocab_size is None:
        vocab_size = setup.model.get_input_embeddings().weight.shape[0]
    total = torch.cuda.get_device_properties(setup.device).total_memory
    optimizer_state = 2 * 4 * sum(p.numel() for p in setup.trainable_parameters())
    budget = int(total * budget_fraction) - optimizer_state
    return choose_size(
        candidate_sizes(tokens_per_step, row_tokens),
        lambda size: _probe_peak_bytes(setup, size, row_tokens, vocab_size), budget,
    )
