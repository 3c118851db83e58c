"""Cross-entropy over the trainable positions only, in chunks, without full-vocabulary logits.

Reads a micro-batch (pack.Batch tensors) and a causal LM (plain or PEFT-wrapped); returns summed
sums, not means: the loss summed over trainable tokens, their count and how many were predicted
right (token accuracy), plus each trainable token's loss (detached; the training dynamics that
train/dynamics.py reduces per example). The training loop divides the summed loss of a whole optimizer step by the
step's trainable-token count, so every trainable token weighs the same whatever the micro-batching.

Why: an LM head of 49152 x 576 makes logits for every token the largest tensor of a step.
Here only positions whose label is not -100 are projected, `chunk_rows` at a time, and the gradient
of each chunk is computed in the forward pass, so no (tokens x vocab) tensor is ever kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from tunelab.data.pack import IGNORE_INDEX
from tunelab.errors import ModelError

if TYPE_CHECKING:
    from tunelab.data.pack import Batch

# Logits per chunk: about 8M (32 MiB in float32) on CPU, where memory is tight and kernels are
# slow anyway; 64M (256 MiB) on a GPU, where each chunk costs kernel launches and, when the LM head
# is trained, one float32 pass over its whole gradient: few, large chunks (measured: 65-row chunks
# of a 128k vocabulary made full fine-tuning several times slower).
LOGITS_PER_CHUNK = 1 << 23
LOGITS_PER_CHUNK_GPU = 1 << 26


class LossSums(NamedTuple):
    loss_sum: torch.Tensor  # 0-d float32, differentiable
    count: torch.Tensor  # 0-d int64: trainable tokens (preference tuning: pairs)
    correct: torch.Tensor  # 0-d int64: trainable tokens whose argmax prediction is the label (pairs ranked right)
    # (trainable tokens,) float32, no gradient: each token's loss, row-major (row by row, left to right)
    token_losses: torch.Tensor | None = None
    reward_margin_sum: torch.Tensor | None = None  # preference tuning: the pairs' reward margins, summed


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(h_i @ W.T + b), t_i), chunk by chunk. The backward only scales the gradients
    that the forward already computed (they are linear in the incoming scalar gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, softcap, compute_dtype, anchor=None):
        # anchor: (ids, logp, coef), each (N, k), or None: adds sum coef * (logp - log q[ids]), the weighted
        # KL(p_base || q) over the base's top-k when coef = weight x p_base (train/anchor.py)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        w = weight.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        token_losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows].to(compute_dtype)
            t = targets[start : start + chunk_rows]
            logits = (h @ w.T).float()
            if bias is not None:
                logits += bias.float()
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            losses = lse - picked
            token_losses[start : start + chunk_rows] = losses
            loss_sum += losses.sum()
            correct += (logits.argmax(dim=-1) == t).sum()
            anchored = None
            softmax_shift = lse
            if anchor is not None:  # only the chunk's rows that have an anchor (replay tokens)
                a_ids, a_logp, a_coef = (x[start : start + chunk_rows] for x in anchor)
                mass = a_coef.sum(-1)
                anchored = (mass > 0).nonzero().squeeze(1)
                if anchored.numel():
                    # only (rows x k) values are read or written: no copy of the anchored rows' logits
                    a_ids, a_logp, a_coef = a_ids[anchored], a_logp[anchored], a_coef[anchored]
                    log_q = logits[anchored[:, None], a_ids] - lse[anchored, None]
                    loss_sum += (a_coef * (a_logp - log_q)).sum()
                    # the anchor's gradient, sum_j coef_j * (softmax - one_hot(id_j)), is (1 + mass) x softmax
                    # less coef at the k ids: the scale folds into the softmax's exp (exp(x - lse + log(1 + mass)))
                    softmax_shift = lse - torch.log1p(mass)
                else:
                    anchored = None
            if need_hidden or need_weight or need_bias:
                # d loss / d logits = softmax - one_hot(target) (with an anchor: see above)
                grad_logits = torch.exp(logits - softmax_shift[:, None])
                if anchored is not None:
                    grad_logits.index_put_((anchored[:, None].expand_as(a_ids), a_ids), -a_coef, accumulate=True)
                grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if softcap is not None:
                    grad_logits *= 1.0 - capped * capped
                if need_bias:
                    grad_bias += grad_logits.sum(0)
                grad_logits = grad_logits.to(compute_dtype)
                if need_hidden:
                    grad_hidden[start : start + chunk_rows] = (grad_logits @ w).to(hidden.dtype)
                if need_weight:
                    grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(
            *(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.has = (need_hidden, need_weight, need_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct, token_losses)
        return loss_sum, correct, token_losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct, _grad_token_losses):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        has_hidden, has_weight, has_bias = ctx.has
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype) if has_hidden else None,
            (grad_weight * grad_loss).to(weight_dtype) if has_weight else None,
            (grad_bias * grad_loss).to(bias_dtype) if has_bias else None,
            None, None, None, None, None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_rows: int | None = None,
    compute_dtype: torch.dtype | None = None,
    token_losses: bool = False,
    anchor: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """(summed cross-entropy, correct count) of hidden (N, H) projected by weight (V, H) against
    targets (N,), and with `token_losses` each row's cross-entropy (N,) as well (no gradient).
    Gradients flow to hidden, weight and bias as needed. `anchor` (ids, logp, coef), each (N, k): the
    KL anchor's term (sum of coef * (logp - log q[ids]); train/anchor.py) added to the summed loss,
    computed on the same logits chunks."""
    per_chunk = LOGITS_PER_CHUNK_GPU if hidden.is_cuda else LOGITS_PER_CHUNK
    chunk_rows = chunk_rows or max(1, per_chunk // weight.shape[0])
    compute_dtype = compute_dtype or weight.dtype
    if hidden.shape[0] == 0:
        zero = (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float()
        out = (zero, torch.zeros((), dtype=torch.long, device=hidden.device), torch.zeros(0, device=hidden.device))
    elif torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        out = _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, softcap, compute_dtype, anchor)
    else:
        with torch.no_grad():
            out = _LinearCrossEntropy.forward(_NoGradContext(), hidden, weight, bias, targets, chunk_rows, softcap,
                                              compute_dtype, anchor)
    return out if token_losses else out[:2]


class _NoGradContext:
    """Stands in for autograd's ctx when no gradient is wanted (evaluation)."""

    needs_input_grad = (False, False, False)

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass

    def mark_non_differentiable(self, *tensors: torch.Tensor) -> None:
        pass


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, lm_head) of a causal LM, under a PEFT wrapper or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or not hasattr(head, "weight"):
        raise ModelError(f"{type(base).__name__}: cannot find its decoder and LM head; tunelab trains causal LMs")
    if getattr(base.config, "logit_scale", None) not in (None, 1, 1.0):
        raise ModelError(f"{type(base).__name__}: scaled logits (logit_scale) are not supported by tunelab's loss")
    return decoder, head


class CausalLMLoss(nn.Module):
    """The model plus its loss, as one module: forward(batch tensors) -> LossSums.

    Wrapping both in one module is the seam for torch.distributed: DDP or FSDP wraps this module,
    so its forward hooks see the whole computation. The model is a registered submodule, so state
    dicts and parameters are the model's own (prefixed `model.`)."""

    def __init__(self, model: nn.Module, chunk_rows: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.eager_attention = getattr(config, "_attn_implementation", "sdpa") == "eager"

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int = 0,
        anchor_ids: torch.Tensor | None = None,
        anchor_logp: torch.Tensor | None = None,
        anchor_coef: torch.Tensor | None = None,
    ) -> LossSums:
        """`cu_seqlens` (collate_varlen's layout): the row holds several examples end to end, and
        the model's attention must be tunelab's varlen attention (train/attention.py). `anchor_*`
        (train/anchor.py): the KL anchor's targets, its term added to the summed loss."""
        hidden, head = self.hidden_states(input_ids, position_ids, attention_mask, cu_seqlens, max_seqlen)
        targets = labels[:, 1:]
        trainable = targets != IGNORE_INDEX
        selected = hidden[:, :-1][trainable]
        anchor = None
        if anchor_coef is not None and anchor_ids is not None and anchor_logp is not None:
            anchor = (anchor_ids[:, 1:][trainable], anchor_logp[:, 1:][trainable], anchor_coef[:, 1:][trainable])
        loss_sum, correct, token_losses = linear_cross_entropy(
            selected, head.weight, targets[trainable], bias=getattr(head, "bias", None), softcap=self.softcap,
            chunk_rows=self.chunk_rows, compute_dtype=self.compute_dtype(hidden, head), token_losses=True,
            anchor=anchor,
        )
        return LossSums(loss_sum, trainable.sum(), correct, token_losses)

    def compute_dtype(self, hidden: torch.Tensor, head: nn.Module) -> torch.dtype:
        """The LM head's dtype, or autocast's when it is on."""
        if torch.is_autocast_enabled(hidden.device.type):
            return torch.get_autocast_dtype(hidden.device.type)
        return head.weight.dtype

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None, max_seqlen: int,
    ) -> tuple[torch.Tensor, nn.Module]:
        """(the decoder's last hidden states, the LM head): everything before the loss."""
        decoder, head = causal_lm_parts(self.model)
        varlen = {}
        if cu_seqlens is not None:
            from tunelab.train.attention import CU_SEQLENS, MAX_SEQLEN

            varlen = {CU_SEQLENS: cu_seqlens, MAX_SEQLEN: max_seqlen}
        if attention_mask is not None and attention_mask.dtype == torch.bool and self.eager_attention:
            # eager attention adds the mask to the scores: it wants 0 / -inf, not True / False
            blocked = torch.finfo(head.weight.dtype).min
            attention_mask = torch.zeros(attention_mask.shape, dtype=head.weight.dtype, device=attention_mask.device).masked_fill(
                ~attention_mask, blocked
            )
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **varlen
        ).last_hidden_state
        return hidden, head

    def forward_batch(self, batch: Batch) -> LossSums:
        return self(**batch.model_inputs())
