"""The one prompt builder every evaluation arm goes through, and the leak-checked example pools.

Reads normalised conversations (the data stage's train/test JSONL rows, already parsed) and the
recipe's eval section; returns chat messages per (arm, test example). Writes nothing: refused pool
entries are returned as records for eval/metrics.json.

Arms (the model is chosen by the caller: base model for base/prompt/rag, tuned for the others):
  base       the example's own messages (its own system prompt);
  prompt     instructions (recipe or derived) + k fixed, seeded few-shot examples from train;
  rag        instructions + the k train examples (or document chunks) most similar to the query (BM25);
  tuned      the example's own messages, like base;
  tuned+rag  the example's own system prompt + the k retrieved examples (or chunks).

Few-shot and retrieved examples are given as prior user/assistant turns, not pasted into the system
message: small chat models copy the *form* of earlier assistant turns far more reliably than they
follow a description of examples in prose, and a turn keeps the exact answer bytes the template
would show, so an answer's format (JSON, one label) is demonstrated, not described. Retrieved
examples are ordered least similar first, so the closest one sits right before the query. Document
chunks are not dialogue, so they go into the system message as reference material.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.config import RAG_ARMS
from tunelab.errors import DataError
from tunelab.eval.metrics import OutputKind, detect_output_kind

FALLBACK_INSTRUCTIONS = "You are a precise assistant. Answer each message the way the example answers do."


def prompt_hash(text: str) -> str:
    """Content hash of a user prompt, blind to case and whitespace (copies that differ only there match)."""
    return hashlib.sha256(" ".join(text.casefold().split()).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EvalExample:
    """A test conversation split at its last assistant turn: the context is the prompt, the turn the
    reference."""

    id: str
    source: str
    context: tuple[dict[str, str], ...]
    reference: str

    @property
    def system(self) -> str | None:
        return self.context[0]["content"] if self.context and self.context[0]["role"] == "system" else None

    @property
    def user_prompt(self) -> str:
        return next((m["content"] for m in reversed(self.context) if m["role"] == "user"), "")

    @property
    def turns(self) -> list[dict[str, str]]:
        """The context without its system message."""
        return [dict(m) for m in self.context if m["role"] != "system"]


def to_eval_example(conversation: dict[str, Any], fallback_id: str) -> EvalExample:
    messages = conversation.get("messages")
    where = conversation.get("source") or fallback_id
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages: expected a non-empty list of {{role, content}}")
    last_answer = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last_answer is None or not any(m.get("role") == "user" for m in messages[:last_answer]):
        raise DataError(f"{where}: messages: needs a user turn followed by an assistant answer to score against")
    context = tuple({"role": str(m["role"]), "content": str(m.get("content", ""))} for m in messages[:last_answer])
    return EvalExample(
        id=str(conversation.get("id") or fallback_id),
        source=str(where),
        context=context,
        reference=str(messages[last_answer].get("content", "")),
    )


@dataclass(frozen=True)
class Shot:
    """One pool entry: a train example's last user turn and its answer (or a document chunk)."""

    id: str
    source: str
    user: str
    answer: str


@dataclass
class Pool:
    shots: list[Shot]
    refused: list[dict[str, str]] = field(default_factory=list)  # {"id", "source", "reason"}


def build_pool(train: Sequence[EvalExample], test: Sequence[EvalExample]) -> Pool:
    """Train examples as few-shot/retrieval candidates; any equal to a test example (same id, or the
    same user prompt by content hash) is refused and recorded, never silently used or dropped."""
    test_ids = {ex.id: ex.id for ex in test}
    test_hashes = {prompt_hash(ex.user_prompt): ex.id for ex in test}
    pool = Pool(shots=[])
    for ex in train:
        if ex.id in test_ids:
            pool.refused.append({"id": ex.id, "source": ex.source, "reason": f"same id as test example {ex.id}"})
            continue
        leaked = test_hashes.get(prompt_hash(ex.user_prompt))
        if leaked is not None:
            pool.refused.append(
                {"id": ex.id, "source": ex.source, "reason": f"user prompt identical to test example {leaked}"}
            )
            continue
        pool.shots.append(Shot(ex.id, ex.source, ex.user_prompt, ex.reference))
    return pool


def build_document_pool(chunks: Sequence[Any], test: Sequence[EvalExample]) -> Pool:
    """Document chunks as retrieval candidates; a chunk that contains a test prompt verbatim is refused
    (it would hand the model the test example itself)."""
    test_prompts = [(ex.id, " ".join(ex.user_prompt.casefold().split())) for ex in test]
    pool = Pool(shots=[])
    for chunk in chunks:
        flat = " ".join(chunk.text.casefold().split())
        leaked = next((tid for tid, prompt in test_prompts if prompt and prompt in flat), None)
        if leaked is not None:
            pool.refused.append(
                {"id": chunk.source, "source": chunk.source, "reason": f"contains the prompt of test example {leaked}"}
            )
            continue
        pool.shots.append(Shot(chunk.source, chunk.source, chunk.text, ""))
    return pool


def task_system_prompt(examples: Sequence[EvalExample]) -> str | None:
    """The system prompt most examples share (the task's), if any."""
    systems = Counter(ex.system for ex in examples if ex.system)
    return systems.most_common(1)[0][0] if systems else None


def derive_instructions(train: Sequence[EvalExample], kind: OutputKind | None = None) -> str:
    """The prompt arm's instructions: the train examples' most common system prompt (or a generic
    line) plus the answer format the train answers share, stated explicitly."""
    base = task_system_prompt(train) or FALLBACK_INSTRUCTIONS
    kind = kind or detect_output_kind([ex.reference for ex in train])
    if kind.kind == "json":
        keys = ", ".join(kind.keys)
        rule = (f"Reply with one compact JSON object with the keys {keys} and nothing else: "
                "no code fences, no explanations.")
    elif kind.kind == "label":
        originals = sorted({ex.reference.strip() for ex in train})
        rule = f"Reply with exactly one of these labels and nothing else: {', '.join(originals)}."
    else:
        rule = "Match the style, format and length of the example answers."
    return f"{base.rstrip()}\n\n{rule}"


class PromptBuilder:
    """Messages for (arm, example). One instance serves every arm of an evaluation."""

    def __init__(
        self, pool: Pool, instructions: str, shots: int, rag_k: int, seed: int, documents: Pool | None = None,
        task_system: str | None = None,
    ) -> None:
        self.pool = pool
        self.task_system = task_system  # the shared system prompt the instructions replace
        self.documents = documents  # when given, the rag arms retrieve from these chunks instead of train
        self.instructions = instructions
        self.rag_k = rag_k
        self.fixed_shots = random.Random(seed).sample(pool.shots, min(shots, len(pool.shots)))
        self._index: Any = None

    @property
    def retrieval_pool(self) -> Pool:
        return self.documents if self.documents is not None else self.pool

    def _retrieve(self, example: EvalExample) -> list[Shot]:
        candidates = self.retrieval_pool.shots
        if not candidates:
            return []
        if self._index is None:
            from tunelab.eval.retrieval import BM25Index

            self._index = BM25Index([s.user for s in candidates])
        # One extra: the query itself is excluded below if it ever reaches here (e.g. a train sample).
        hits = self._index.search(example.user_prompt, self.rag_k + 1)
        shots = [candidates[i] for i, _ in hits if not _same_example(candidates[i], example)]
        return shots[: self.rag_k]

    def shots_for(self, arm: str, example: EvalExample) -> list[Shot]:
        if arm == "prompt":
            return [s for s in self.fixed_shots if not _same_example(s, example)]
        if arm in RAG_ARMS:
            return self._retrieve(example)
        return []

    def build(self, arm: str, example: EvalExample) -> list[dict[str, str]]:
        if arm in ("base", "tuned"):
            return [dict(m) for m in example.context]
        shots = self.shots_for(arm, example)
        if arm in ("prompt", "rag"):
            system = self.instructions
            # A per-example system prompt may carry facts the query needs: keep it too (the task's
            # shared one is what the instructions replace).
            if example.system and example.system != self.task_system and example.system.strip() not in system:
                system = f"{system}\n\n{example.system}"
        elif arm == "tuned+rag":
            system = example.system or ""
        else:
            raise ValueError(f"unknown arm {arm!r}")
        messages: list[dict[str, str]] = []
        if arm in RAG_ARMS and self.documents is not None:
            material = "\n\n".join(s.user for s in reversed(shots))
            system = f"{system}\n\nReference material:\n\n{material}".strip()
        else:
            for shot in reversed(shots):
                messages += [{"role": "user", "content": shot.user}, {"role": "assistant", "content": shot.answer}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return messages + example.turns


def _same_example(shot: Shot, example: EvalExample) -> bool:
    return shot.id == example.id or prompt_hash(shot.user) == prompt_hash(example.user_prompt)
