"""Variable-length attention for packed rows: every example attends to itself only, at its own cost.

Reads nothing; registers an attention function named "tunelab_varlen" with transformers'
AttentionInterface and switches a model to it while it trains (`use_varlen_attention`).

Why: packed examples must not see each other (measured: with restarting position_ids alone, SDPA
gives the second example other logits than running it alone). The portable fix, a 4-D
block-diagonal mask (data/pack.py `collate`), costs (row length)^2 memory and computes attention
over the whole row. A variable-length kernel takes the examples end to end with their start offsets
(cu_seqlens) and computes only each example's own causal triangle.

Which kernel: on CUDA with bf16/fp16 activations, PyTorch's flash-attention varlen kernel
(`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10); otherwise (CPU, float32, older torch)
the reference path: scaled_dot_product_attention on each example's slice, exactly what running it
alone computes. A call without cu_seqlens (generation, a padded batch) goes to transformers' SDPA.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NAME = "tunelab_varlen"
CU_SEQLENS = "tunelab_cu_seqlens"  # keyword arguments the decoder passes through to every attention call
MAX_SEQLEN = "tunelab_max_seqlen"


@functools.cache
def _varlen_kernel() -> tuple[Callable[..., torch.Tensor], dict[str, Any], frozenset[str]] | None:
    """(varlen_attn, its causal keyword arguments, the names of its parameters), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = frozenset(inspect.signature(varlen_attn).parameters)
    # torch 2.10 spelled causality is_causal=True; later versions a (left, right) window
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, params


def kernel_name(device: torch.device, dtype: torch.dtype) -> str:
    """Which implementation varlen attention uses for activations of `dtype` on `device`."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _varlen_kernel() is not None:
        return "flash-varlen"
    return "sdpa-per-example"


def _repeat_heads(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """(T, H_kv, D) -> (T, H_kv * groups, D), each KV head repeated for its group of query heads."""
    if groups == 1:
        return tensor
    tokens, heads, dim = tensor.shape
    return tensor[:, :, None, :].expand(tokens, heads, groups, dim).reshape(tokens, heads * groups, dim)


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (1, H, T, D), key/value (1, H_kv, T, D);
    returns (1, T, H, D). Without cu_seqlens in kwargs, plain SDPA as transformers would do."""
    cu_seqlens = kwargs.pop(CU_SEQLENS, None)
    max_seqlen = kwargs.pop(MAX_SEQLEN, 0)
    if cu_seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one packed row, got a batch of {query.shape[0]}")
    groups = query.shape[1] // key.shape[1]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        # float32 weights under bf16 autocast (full fine-tuning) give float32 q and k after RoPE, whose
        # cos/sin follow the hidden states' dtype: cast as autocast does for SDPA, so the flash kernel runs
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kernel = _KERNEL
    default_scale = scaling is None or abs(scaling - q.shape[-1] ** -0.5) < 1e-9
    # the flash kernel has no attention dropout: a model that asks for it takes the reference path
    if kernel is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and not dropout and (
        default_scale or "scale" in kernel[2]
    ):
        varlen_attn, causal, params = kernel
        extra = dict(causal)
        if "scale" in params:
            extra["scale"] = scaling
        if "enable_gqa" in params:
            extra["enable_gqa"] = groups > 1
        else:
            k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                          **extra)
        return out[None], None
    # reference: each example alone through SDPA (causal, no mask); the CPU and float32 path
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=groups > 1
        )
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs)[None], None


# the kernel, looked up once by register(): compiled code reads a constant, not an import
_KERNEL: tuple[Callable[..., torch.Tensor], dict[str, Any], frozenset[str]] | None = None


def register() -> None:
    global _KERNEL
    from transformers import AttentionInterface

    _KERNEL = _varlen_kernel()
    AttentionInterface.register(NAME, varlen_attention_forward)


def _configs(model: nn.Module) -> Iterator[Any]:
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            yield config


@contextmanager
def use_varlen_attention(model: nn.Module) -> Iterator[None]:
    """Route the model's attention through varlen_attention_forward for the duration; restore after
    (so generation afterwards runs transformers' own implementation with its padding masks)."""
    register()
    previous = [(config, config._attn_implementation) for config in _configs(model)]
    for config, _ in previous:
        config._attn_implementation = NAME
    try:
        yield
    finally:
        for config, name in previous:
            config._attn_implementation = name
