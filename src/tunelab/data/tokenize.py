"""Chat template -> input_ids + labels: every assistant turn trained (weight 0 turns excepted), its
end-of-turn token included, everything else -100.

Reads normalised messages and a tokenizer with a chat template; writes nothing. How assistant spans
are found, per example: the conversation is rendered whole (F), and for each assistant turn i also
up to the turn's start with the generation prompt (P_i: what the model sees when it must answer)
and up to the turn's end (T_i). The turn's labels are the tokens from len(P_i) to the last
end-of-turn token in T_i. This is exact when P_i and T_i tokenize to prefixes of F (the "prefix
property"); it is checked for every example, never assumed.

Templates that break it (e.g. ones that drop the reasoning of earlier assistant turns, or render a
turn differently once it is no longer last) get a fallback: tokenize_for_training returns one
example per trained turn, each rendered as the conversation stood when that turn was generated
(T_i, only turn i trained), which is exactly what the model sees at inference.
tokenize_conversation (one example, the contract) trains only the turns whose span it can locate
in F and reports prefix_ok=False.

Public API:
  TokenizedExample, TemplateProblem
  tokenize_conversation(tokenizer, messages, max_seq_len=None) -> TokenizedExample
  tokenize_for_training(tokenizer, messages, max_seq_len=None) -> list[TokenizedExample]
  end_of_turn_probe(tokenizer) -> str | None     why the template would not train end-of-turn, or None
  token_stats(lengths, trainable) -> dict        min, median, p95, max, total, trainable_total
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
_TEMPLATE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")


class TemplateProblem(DataError):
    """The chat template cannot render this conversation. `code` is a validate.CODES code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # longer than max_seq_len: input_ids and labels were cut to it
    prefix_ok: bool = True  # every assistant turn was found at the same tokens in the whole rendering
    length: int = 0  # tokens before truncation
    trained_turns: int = 0
    end_of_turn_trained: bool = True  # every trained turn ends with a trained end-of-turn token

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True)
class _TemplateInfo:
    end_of_turn: frozenset[int]
    supports_tools: bool


_infos: weakref.WeakKeyDictionary[Any, _TemplateInfo] = weakref.WeakKeyDictionary()


def _info(tokenizer: PreTrainedTokenizerBase) -> _TemplateInfo:
    info = _infos.get(tokenizer)
    if info is None:
        from tunelab.models import end_of_turn_ids

        template = tokenizer.chat_template or ""
        info = _TemplateInfo(frozenset(end_of_turn_ids(tokenizer)), "tool" in template)
        _infos[tokenizer] = info
    return info


def _for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the template sees them: our own fields (weight) removed."""
    return [{k: m[k] for k in _TEMPLATE_KEYS if k in m} for m in messages]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
        first_line = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise TemplateProblem("template_error", f"the chat template failed to render this conversation ({first_line})") from None
    return text if isinstance(text, str) else text[0]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: same ids as apply_chat_template, less overhead
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@dataclass
class _Turn:
    index: int  # position of the assistant message
    trained: bool
    start: int  # in the turn's own rendering T_i: first token after the prompt P_i
    end: int  # one past the last end-of-turn token (or the end of T_i when there is none)
    turn_ids: list[int]  # T_i
    in_full: bool  # P_i and T_i are token prefixes of the whole rendering
    has_end_of_turn: bool


def _turns(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> tuple[list[int], list[_Turn]]:
    info = _info(tokenizer)
    if not info.supports_tools and any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        raise TemplateProblem("tools_unsupported", "has tool calls or tool results, which this model's chat template cannot render")
    template_messages = _for_template(messages)
    full_text = _render(tokenizer, template_messages, False)
    assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    texts = [full_text]
    for i in assistant_at:
        texts.append(_render(tokenizer, template_messages[:i], True))
        texts.append(full_text if i == len(messages) - 1 else _render(tokenizer, template_messages[: i + 1], False))
    encoded = _encode(tokenizer, texts)
    full = encoded[0]
    turns = []
    for n, i in enumerate(assistant_at):
        prompt_ids, turn_ids = encoded[1 + 2 * n], encoded[2 + 2 * n]
        start = _common_prefix(prompt_ids, turn_ids)
        end = next((k + 1 for k in range(len(turn_ids) - 1, start - 1, -1) if turn_ids[k] in info.end_of_turn), None)
        in_full = start == len(prompt_ids) and full[: len(turn_ids)] == turn_ids and len(turn_ids) > start
        turns.append(_Turn(i, messages[i].get("weight", 1) != 0, start, end or len(turn_ids), turn_ids, in_full, end is not None))
    return full, turns


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _example(ids: list[int], spans: list[tuple[int, int]], max_seq_len: int | None, prefix_ok: bool, eot_ok: bool) -> TokenizedExample:
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    length = len(ids)
    truncated = max_seq_len is not None and length > max_seq_len
    if truncated:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return TokenizedExample(list(ids), labels, truncated, prefix_ok, length, len(spans), eot_ok)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], max_seq_len: int | None = None
) -> TokenizedExample:
    """The whole conversation as one example. Raises TemplateProblem when the template cannot render it."""
    full, turns = _turns(tokenizer, messages)
    located = [t for t in turns if t.trained and t.in_full]
    prefix_ok = all(t.in_full for t in turns if t.trained)
    eot_ok = all(t.has_end_of_turn for t in located)
    return _example(full, [(t.start, t.end) for t in located], max_seq_len, prefix_ok, eot_ok)


def tokenize_for_training(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], max_seq_len: int | None = None
) -> list[TokenizedExample]:
    """One example when the template keeps the prefix property (the usual case); else one example per
    trained assistant turn, rendered as the conversation stood when that turn was generated."""
    full, turns = _turns(tokenizer, messages)
    trained = [t for t in turns if t.trained]
    if all(t.in_full for t in trained):
        eot_ok = all(t.has_end_of_turn for t in trained)
        return [_example(full, [(t.start, t.end) for t in trained], max_seq_len, True, eot_ok)]
    return [_example(t.turn_ids, [(t.start, t.end)], max_seq_len, False, t.has_end_of_turn) for t in trained]


_PROBE = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]


def end_of_turn_probe(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """None when a simple exchange trains the end-of-turn token; else what is wrong (the tuned model
    would never learn to stop)."""
    info = _info(tokenizer)
    if not info.end_of_turn:
        return "the tokenizer has no end-of-turn or eos token: the tuned model would never learn to stop"
    try:
        example = tokenize_conversation(tokenizer, _PROBE)
    except TemplateProblem as err:
        return str(err)
    trained = [label for label in example.labels if label != IGNORE_INDEX]
    if not trained or trained[-1] not in info.end_of_turn:
        names = ", ".join(tokenizer.convert_ids_to_tokens(sorted(info.end_of_turn)))
        return f"the chat template puts no end-of-turn token ({names}) after an assistant reply: the tuned model would never learn to stop"
    return None


def token_stats(lengths: Sequence[int], trainable: Sequence[int]) -> dict[str, float]:
    """Per-example token counts -> {"min", "median", "p95", "max", "total", "trainable_total"}."""
    import numpy as np

    if not len(lengths):
        return {"min": 0, "median": 0, "p95": 0, "max": 0, "total": 0, "trainable_total": 0}
    values = np.asarray(lengths, dtype=np.int64)
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95, method="nearest")),
        "max": int(values.max()),
        "total": int(values.sum()),
        "trainable_total": int(np.asarray(trainable, dtype=np.int64).sum()),
    }
