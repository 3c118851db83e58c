"""Batched greedy (or sampled) generation with a KV cache, stopping at end-of-turn.

Reads chat conversations (lists of {role, content}); returns per prompt the completion text, prompt
and completion token counts and the latency of the batch it ran in. Every arm of the evaluation, the
`generate` command, the chat and the server go through one decoding loop (`_decode`), so decoding
settings and outputs are identical everywhere.

Speed (measured in bench/generate_speed.py, docs/performance.md):
- the tokens every prompt of a call starts with (the prompt arm's instructions and few-shot turns,
  the rag arm's instructions) are run through the model once; each batch starts from a copy of
  their KV cache, as servers with prefix caching do. The cached keys and values are those a full
  prompt computes for the same tokens at the same positions (attention is causal), so the outputs
  are those of prefilling every prompt whole, up to float rounding of differently shaped matmuls;
- the KV cache of a batch is allocated once for the whole generation and written in place, instead
  of being concatenated (a copy of the whole cache) for every new token in every layer;
- prompts are sorted by length into batches (less padding) and only the last position's logits are
  computed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.models import end_of_turn_ids

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# A shared prefix shorter than this is not prefilled apart: a separate forward pass and a copy per
# batch cost about what recomputing a few tokens does.
PREFIX_MIN_TOKENS = 32


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
    latency_s: float  # wall time of the batch this prompt was generated in (shared-prefix prefill not included)
    batch_size: int
    finish_reason: str  # "stop" (end-of-turn) | "length"
    prefix_reused_tokens: int = 0  # leading prompt tokens whose KV cache was computed once for the whole call


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation followed by the assistant header (the chat template, sandboxed)."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ----------------------------------------------------------------------------------------------
# the KV cache: a shared prefix computed once, a buffer per batch written in place


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all prompts share, leaving every prompt at least its last token (the
    position whose logits start decoding)."""
    if not prompts:
        return 0
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    for position in range(max(limit, 0)):
        token = first[position]
        if any(p[position] != token for p in prompts):
            return position
    return max(limit, 0)


@dataclass
class SharedPrefix:
    """The KV cache of the tokens every prompt of a call starts with: per layer (keys, values) of one row."""

    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    prefill_s: float


def _plain_attention(model: Any) -> bool:
    """Every layer attends to the whole context (no sliding window): the one layout the in-place cache
    below implements. Other models keep transformers' own cache and recompute the prefix."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return set(layer_types) == {"full_attention"}
    return getattr(config, "sliding_window", None) is None


def _cache_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer whose keys and values live in a buffer sized for the whole generation: a new
        token is written in place instead of concatenating (copying) the whole cache. `keys` and
        `values` are views of the filled part, so the rest of transformers sees a DynamicLayer."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            rows, heads, _, key_dim = key_states.shape
            self._key_buffer = key_states.new_empty((rows, heads, self.capacity, key_dim))
            self._value_buffer = value_states.new_empty((rows, heads, self.capacity, value_states.shape[-1]))
            self.keys, self.values = self._key_buffer[:, :, :0], self._value_buffer[:, :, :0]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"KV cache of {self.capacity} positions cannot take position {end}")
            self._key_buffer[:, :, start:end] = key_states
            self._value_buffer[:, :, start:end] = value_states
            self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
            return self.keys, self.values

    return PreallocatedLayer


def _new_cache(model: Any, rows: int, capacity: int, prefix: SharedPrefix | None) -> Any:
    """An empty cache for `rows` prompts of up to `capacity` positions, holding `prefix` in every row;
    None (transformers' default cache) for models with sliding-window layers."""
    if not _plain_attention(model):
        return None
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_class = _cache_layer_class()
    cache = DynamicCache()
    cache.layers = [layer_class(capacity) for _ in range(base.config.get_text_config().num_hidden_layers)]
    if prefix is not None:
        for layer, (keys, values) in zip(cache.layers, prefix.layers, strict=True):
            layer.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
    return cache


def prefill_shared_prefix(model: Any, prompts: Sequence[Sequence[int]],
                          min_tokens: int = PREFIX_MIN_TOKENS) -> SharedPrefix | None:
    """Run the tokens all `prompts` start with through the model once; None for a single prompt (nothing
    to share), when they share fewer than `min_tokens` or the model's attention is not the plain kind the
    cache supports."""
    import torch

    length = shared_prefix_length(prompts)
    if len(prompts) < 2 or length < min_tokens or not _plain_attention(model):
        return None
    started = time.perf_counter()
    device = next(model.parameters()).device
    cache_name, extra = _forward_kwargs(model)
    cache = _new_cache(model, 1, length, None)
    with torch.inference_mode():
        model(input_ids=torch.tensor([list(prompts[0][:length])], device=device), use_cache=True,
              **{cache_name: cache}, **extra)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return SharedPrefix(length, layers, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# the decoding loop every caller shares


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


def _decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    settings: DecodingSettings,
    stop_ids: set[int],
    pad_id: int,
    prefix: SharedPrefix | None = None,
    cancelled: Any = None,
) -> Iterator[tuple[int, int | None, str]]:
    """Decode one batch token by token. Yields (row, token, "") for each new token of a row (not its
    end-of-turn token) and (row, None, reason) once a row ends: "stop" (it sampled end-of-turn),
    "length" (max_new_tokens) or "cancelled" (`cancelled(row)` said so). Runs in inference mode per
    forward pass only, so the caller's code between yields is not affected by it.

    Layout: [shared prefix | left-padded own tokens | new tokens]; position ids count real tokens, so a
    prompt sits at the positions it would have alone, and the padding is masked out."""
    import torch

    rows = len(prompts)
    reused = prefix.length if prefix is not None else 0
    own = [list(p[reused:]) for p in prompts]
    width = max(len(o) for o in own)
    device = next(model.parameters()).device
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, reused + width), dtype=torch.long)
    attention_mask[:, :reused] = 1
    for row, tokens in enumerate(own):
        input_ids[row, width - len(tokens) :] = torch.tensor(tokens)
        attention_mask[row, reused + width - len(tokens) :] = 1
    position_ids = ((attention_mask.cumsum(-1) - 1).clamp(min=0))[:, reused:]
    cache_name, extra = _forward_kwargs(model)
    cache = _new_cache(model, rows, reused + width + settings.max_new_tokens, prefix)
    # one generator per row: a row's sampled reply does not depend on what it was batched with
    generators = [torch.Generator().manual_seed(settings.seed) for _ in prompts] if settings.temperature > 0 else None
    active = [True] * rows
    for _ in range(settings.max_new_tokens):
        with torch.inference_mode():
            output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           position_ids=position_ids.to(device), use_cache=True, **{cache_name: cache}, **extra)
            cache = getattr(output, "cache", None) or output.past_key_values
            logits = output.logits[:, -1].float().cpu()
        greedy = logits.argmax(-1).tolist() if generators is None else None
        next_ids = [pad_id] * rows
        for row in range(rows):
            if not active[row]:
                continue
            if cancelled is not None and cancelled(row):
                active[row] = False
                yield row, None, "cancelled"
                continue
            token = greedy[row] if greedy is not None else _next_token(logits[row], settings, generators[row])
            if token in stop_ids:
                active[row] = False
                yield row, None, "stop"
                continue
            next_ids[row] = token
            yield row, token, ""
        if not any(active):
            return
        # finished rows keep being fed (a pad token): their outputs are ignored, the batch stays whole
        input_ids = torch.tensor(next_ids).unsqueeze(1)
        attention_mask = torch.cat([attention_mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    for row in range(rows):
        if active[row]:
            yield row, None, "length"


def _pad_id(tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict[str, Any]]],
    settings: DecodingSettings = DecodingSettings(),
    batch_size: int = 16,
    progress: Any = None,
    reuse_prefix: bool = True,
) -> list[Generation]:
    """Generate one assistant reply per conversation. Prompts are sorted by length into batches
    (less padding), results come back in input order. `progress` is called with each batch's size.
    `reuse_prefix`: compute the prompts' shared leading tokens once (see the module docstring)."""
    prompts = [render_prompt(tokenizer, conv) for conv in conversations]
    stop_ids = set(end_of_turn_ids(tokenizer))
    pad_id = _pad_id(tokenizer, sorted(stop_ids))
    results: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        prefix = prefill_shared_prefix(model, prompts) if reuse_prefix and prompts else None
        reused = prefix.length if prefix is not None else 0
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for batch_indices in _batches(order, batch_size):
            started = time.perf_counter()
            new_tokens: list[list[int]] = [[] for _ in batch_indices]
            finish = ["length"] * len(batch_indices)
            for row, token, reason in _decode(model, [prompts[i] for i in batch_indices], settings, stop_ids,
                                              pad_id, prefix):
                if token is not None:
                    new_tokens[row].append(token)
                else:
                    finish[row] = reason
            latency = time.perf_counter() - started
            for row, i in enumerate(batch_indices):
                results[i] = Generation(
                    text=tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip(),
                    prompt_tokens=len(prompts[i]),
                    completion_tokens=len(new_tokens[row]) + (1 if finish[row] == "stop" else 0),
                    latency_s=latency,
                    batch_size=len(batch_indices),
                    finish_reason=finish[row],
                    prefix_reused_tokens=reused,
                )
            if progress is not None:
                progress(len(batch_indices))
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


# ----------------------------------------------------------------------------------------------
# streaming (chat and the server): text pieces as they are decoded


@dataclass
class StreamStats:
    """Filled in by `stream_generate` as it runs; complete once its iterator is exhausted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0  # like Generation: includes the end-of-turn token when it stopped there
    finish_reason: str = "length"


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
    """Stream several replies at once: one left-padded batch through the decoding loop.

    Yields (row, text piece) as pieces are decoded and (row, None) once a row is finished (its
    `stats[row]` is then final). `cancelled(row) -> bool`, checked every step, finishes a row early
    (its client went away). A generator rather than a streamer thread, so that closing the iterator
    stops the computation at once."""
    prompts = [render_prompt(tokenizer, conv) for conv in conversations]
    stats = stats if stats is not None else [StreamStats() for _ in prompts]
    for row_stats, prompt in zip(stats, prompts, strict=True):
        row_stats.prompt_tokens, row_stats.completion_tokens, row_stats.finish_reason = len(prompt), 0, "length"
    stop_ids = set(end_of_turn_ids(tokenizer))
    new_tokens: list[list[int]] = [[] for _ in prompts]
    emitted = [""] * len(prompts)

    def remainder(row: int) -> str:
        final = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
        return final[len(emitted[row]) :] if len(final) > len(emitted[row]) and final.startswith(emitted[row]) else ""

    was_training = model.training
    model.eval()
    try:
        for row, token, reason in _decode(model, prompts, settings, stop_ids, _pad_id(tokenizer, sorted(stop_ids)),
                                          cancelled=cancelled):
            if token is None:
                if reason == "stop":
                    stats[row].completion_tokens += 1
                    stats[row].finish_reason = "stop"
                if reason != "cancelled" and (piece := remainder(row)):
                    yield row, piece
                yield row, None
                continue
            stats[row].completion_tokens += 1
            new_tokens[row].append(token)
            text = tokenizer.decode(new_tokens[row], skip_special_tokens=True).lstrip()
            ready = text.rstrip("\ufffd").rstrip()
            if len(ready) > len(emitted[row]) and ready.startswith(emitted[row]):
                yield row, ready[len(emitted[row]) :]
                emitted[row] = ready
    finally:
        model.train(was_training)
