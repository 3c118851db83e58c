"""Batched greedy (or sampled) generation with left padding and a KV cache, stopping at end-of-turn.

Reads chat conversations (lists of {role, content}); returns per prompt the completion text, prompt
and completion token counts and the latency of the batch it ran in. Every arm of the evaluation, the
`generate` command and the server go through `generate`, so decoding settings are identical.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.models import end_of_turn_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class DecodingSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # wall time of the batch this prompt was generated in
    batch_size: int
    finish_reason: str  # "stop" (end-of-turn) | "length"


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation followed by the assistant header (the chat template, sandboxed)."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict[str, Any]]],
    settings: DecodingSettings = DecodingSettings(),
    batch_size: int = 16,
    progress: Any = None,
) -> list[Generation]:
    """Generate one assistant reply per conversation. Prompts are sorted by length into batches
    (less padding), results come back in input order. `progress` is called with each batch's size."""
    import torch

    prompts = [render_prompt(tokenizer, conv) for conv in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_ids = end_of_turn_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for batch_indices in _batches(order, batch_size):
            width = max(len(prompts[i]) for i in batch_indices)
            input_ids = torch.full((len(batch_indices), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(batch_indices):
                ids = prompts[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            kwargs: dict[str, Any] = {
                "max_new_tokens": settings.max_new_tokens,
                "eos_token_id": stop_ids,
                "pad_token_id": pad_id,
                "use_cache": True,
            }
            if settings.temperature > 0:
                torch.manual_seed(settings.seed)
                kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            started = time.perf_counter()
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
                )
            latency = time.perf_counter() - started
            for row, i in enumerate(batch_indices):
                new_tokens = output[row, width:].tolist()
                finish = "length"
                for position, token in enumerate(new_tokens):
                    if token in stop_ids:
                        new_tokens = new_tokens[:position]
                        finish = "stop"
                        break
                results[i] = Generation(
                    text=tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
                    prompt_tokens=len(prompts[i]),
                    completion_tokens=len(new_tokens) + (1 if finish == "stop" else 0),
                    latency_s=latency,
                    batch_size=len(batch_indices),
                    finish_reason=finish,
                )
            if progress is not None:
                progress(len(batch_indices))
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


# ----------------------------------------------------------------------------------------------
# streaming (chat and the server): one conversation, text pieces as they are decoded


@dataclass
class StreamStats:
    """Filled in by `stream_generate` as it runs; complete once its iterator is exhausted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0  # like Generation: includes the end-of-turn token when it stopped there
    finish_reason: str = "length"


def _next_token(logits: Any, settings: DecodingSettings, generator: Any) -> int:
    import torch

    if settings.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    ids = None
    if settings.top_p < 1.0:
        probs, ids = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        probs[torch.cumsum(probs, dim=-1) - probs >= settings.top_p] = 0.0
    # argmax(p / E), E ~ Exp(1), is an exact draw from p (the exponential race). E = -log(U): on CPU
    # this costs a fifth of torch.multinomial or Tensor.exponential_ over a 49k vocabulary.
    noise = torch.rand(probs.shape, generator=generator).log_().neg_()
    choice = int(torch.argmax(probs / noise))
    return int(ids[choice]) if ids is not None else choice


def _forward_kwargs(model: Any) -> tuple[str, dict[str, Any]]:
    """The KV-cache argument's name (transformers renamed `past_key_values` to `cache` in 5.2x) and
    `logits_to_keep=1` where supported (the prompt's other logits are never needed)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    return cache_name, ({"logits_to_keep": 1} if "logits_to_keep" in parameters else {})


def stream_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    settings: DecodingSettings = DecodingSettings(),
    stats: StreamStats | None = None,
) -> Iterator[str]:
    """Yield the assistant reply to `messages` piece by piece, stopping at end-of-turn.

    The pieces join to exactly `generate`'s text for the same greedy settings: leading and trailing
    whitespace is held back the same way `generate` strips it, and so is an incomplete UTF-8
    character. Closing the iterator stops the computation (a chat interrupted, a client gone)."""
    stats_list = [stats if stats is not None else StreamStats()]
    for _, piece in stream_generate_batch(model, tokenizer, [messages], settings, stats_list):
        if piece is not None:
            yield piece


def stream_generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict[str, Any]]],
    settings: DecodingSettings = DecodingSettings(),
    stats: list[StreamStats] | None = None,
    cancelled: Any = None,
) -> Iterator[tuple[int, str | None]]:
    """Stream several replies at once: one left-padded batch through a manual KV-cache loop.

    Yields (row, text piece) as pieces are decoded and (row, None) once a row is finished (its
    `stats[row]` is then final). `cancelled(row) -> bool`, checked every step, finishes a row early
    (its client went away). A manual loop rather than a streamer thread, so that closing the iterator
    stops the computation at once."""
    import torch

    prompts = [render_prompt(tokenizer, conv) for conv in conversations]
    rows = len(prompts)
    stats = stats if stats is not None else [StreamStats() for _ in prompts]
    for row_stats, prompt in zip(stats, prompts, strict=True):
        row_stats.prompt_tokens, row_stats.completion_tokens, row_stats.finish_reason = len(prompt), 0, "length"
    stop_ids = set(end_of_turn_ids(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    device = next(model.parameters()).device
    # one generator per row: a row's sampled reply does not depend on what it was batched with
    generators = [torch.Generator().manual_seed(settings.seed) for _ in prompts] if settings.temperature > 0 else None
    width = max(len(p) for p in prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache_name, extra = _forward_kwargs(model)
    new_tokens: list[list[int]] = [[] for _ in prompts]
    emitted = [""] * rows
    active = [True] * rows

    def remainder(row: int) -> str:
        final = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
        return final[len(emitted[row]) :] if len(final) > len(emitted[row]) and final.startswith(emitted[row]) else ""

    was_training = model.training
    model.eval()
    try:
        cache = None
        for _ in range(settings.max_new_tokens):
            # inference mode per step, not around the yields: it must not leak into the consumer's code
            with torch.inference_mode():
                output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               position_ids=position_ids.to(device), use_cache=True, **{cache_name: cache}, **extra)
                cache = getattr(output, "cache", None) or output.past_key_values
                logits = output.logits[:, -1].float().cpu()
            next_ids = [pad_id] * rows
            for row in range(rows):
                if not active[row]:
                    continue
                if cancelled is not None and cancelled(row):
                    active[row] = False
                    yield row, None
                    continue
                token = _next_token(logits[row], settings, generators[row] if generators else None)
                stats[row].completion_tokens += 1
                if token in stop_ids:
                    active[row] = False
                    stats[row].finish_reason = "stop"
                    if piece := remainder(row):
                        yield row, piece
                    yield row, None
                    continue
                next_ids[row] = token
                new_tokens[row].append(token)
                text = tokenizer.decode(new_tokens[row], skip_special_tokens=True).lstrip()
                ready = text.rstrip("\ufffd").rstrip()
                if len(ready) > len(emitted[row]) and ready.startswith(emitted[row]):
                    yield row, ready[len(emitted[row]) :]
                    emitted[row] = ready
            if not any(active):
                return
            # finished rows keep being fed (a pad token): their outputs are ignored, the batch stays whole
            input_ids = torch.tensor(next_ids).unsqueeze(1)
            attention_mask = torch.cat([attention_mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)
            position_ids = position_ids[:, -1:] + 1
        for row in range(rows):
            if active[row]:
                active[row] = False
                if piece := remainder(row):
                    yield row, piece
                yield row, None
    finally:
        model.train(was_training)
