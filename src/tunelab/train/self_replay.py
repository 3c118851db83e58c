"""Self-replay: the base model answers the general prompts shipped with tunelab, once per model.

Reads assets/replay_prompts.jsonl (data/replay.py) and the base model; writes the answers that pass
the quality check (data/replay.py: good_answer) as chat examples to the model cache
(data/replay.py: self_replay_path), which `tunelab train` mixes into training at train.replay_share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.console import say
from tunelab.data.replay import REPLAY_MAX_NEW_TOKENS, good_answer, replay_prompts, self_replay_path
from tunelab.files import write_text_atomic

if TYPE_CHECKING:
    from tunelab.config import ModelConfig


def build_self_replay(model: ModelConfig) -> Path:
    """The base model's answers to the shipped prompts, generated the first time and cached after."""
    path = self_replay_path(model)
    if path.is_file():
        return path
    from tunelab.engine.generate import DecodingSettings, generate
    from tunelab.models import load_model, load_tokenizer

    say(f"self-replay: the base model answers {len(replay_prompts())} general prompts (once per model; cached in {path.parent})")
    base = load_model(model.name, dtype=model.dtype, revision=model.revision, trust_remote_code=model.trust_remote_code)
    tokenizer = load_tokenizer(model.name, model.revision, model.trust_remote_code)
    conversations = [[{"role": "user", "content": prompt}] for prompt in replay_prompts()]
    answers = generate(base, tokenizer, conversations, DecodingSettings(max_new_tokens=REPLAY_MAX_NEW_TOKENS), 16)
    rows = [{"messages": [*conversation, {"role": "assistant", "content": answer.text.strip()}]}
            for conversation, answer in zip(conversations, answers, strict=True)
            if good_answer(answer.text, answer.finish_reason)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path
