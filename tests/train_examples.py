"""Small chat data for the training tests: records for a data file and tokenized examples.

The tokenized form is the data stage's contract ({"input_ids", "labels"}, labels -100 except the
assistant reply and its end-of-turn token), built here with the chat template directly so the
training tests do not depend on the data stage's code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def qa_pairs(count: int, start: int = 0, answer_offset: int = 0) -> list[tuple[str, str]]:
    return [(f"What is {i} plus {i}?", f"The answer is {2 * i + answer_offset}.") for i in range(start, start + count)]


def tokenize_pair(tokenizer: Any, question: str, answer: str) -> dict[str, list[int]]:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    full = tokenizer.apply_chat_template(messages, tokenize=True)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert full[: len(prompt)] == prompt
    # the template ends the turn with <|im_end|> then a newline: train through <|im_end|> only
    end = full.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), len(prompt)) + 1
    full = full[:end]
    return {"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt) :]}


def tokenized(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[dict[str, list[int]]]:
    return [tokenize_pair(tokenizer, q, a) for q, a in pairs]


def write_chat_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) for q, a in pairs
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


_WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "garden", "pencil", "ocean", "violin", "candle", "mirror", "forest", "button", "rocket", "silver", "planet", "basket", "window", "dragon", "pepper", "meadow", "harbor", "lantern", "puzzle", "marble", "copper", "falcon", "willow", "thunder", "pillow", "canyon", "orchid", "glacier", "compass", "ribbon", "saddle", "timber", "velvet", "walnut", "zephyr", "anchor", "beacon", "cobalt", "ember", "fossil", "granite", "hollow", "island", "jasper", "kettle", "lagoon", "magnet", "nectar", "oyster", "parrot", "quartz"]


def reverse_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """Distinct tasks (reverse five random words): no two are near-duplicates for the data stage."""
    import random

    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        words = rng.sample(_WORDS, 5)
        pairs.append((f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))))
    return pairs


def random_examples(lengths: list[int], seed: int = 0, prompt_fraction: float = 0.5, vocab: tuple[int, int] = (10, 40000)) -> list[dict]:
    """Random-token examples of the given lengths; the first `prompt_fraction` of each is untrained
    (labels -100), like a prompt before its answer."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(vocab[0], vocab[1], (n,), generator=g).tolist()
        cut = int(n * prompt_fraction)
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def reference_loss_sums(model: Any, batch: Any) -> Any:
    """CausalLMLoss's sums through the model's own full-logits forward: what the chunked loss must equal."""
    import torch

    from tunelab.data.pack import IGNORE_INDEX
    from tunelab.train.loss import LossSums

    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).logits.float()
    targets = batch.labels[:, 1:]
    logits = logits[:, :-1]
    trainable = targets != IGNORE_INDEX
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    correct = ((logits.argmax(-1) == targets) & trainable).sum()
    return LossSums(loss_sum, trainable.sum(), correct)
