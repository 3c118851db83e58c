"""The playground: one prompt answered by several arms of a run side by side, streamed.

Reads a finished run: recipe.yaml, adapter/ or model/ (the tuned model), data/train.jsonl (few-shot and
retrieval pool) and the recipe's eval settings. Writes nothing. The arms are the evaluation's own:
messages come from tunelab.eval.arms.PromptBuilder (so "rag" and "tuned+rag" retrieve exactly as the
evaluation did) and text from tunelab.engine.generate.stream_generate_batch (the decoding of `tunelab chat`
and the server).

The run's models load on first use and stay loaded (one run at a time: choosing another run releases
them). A LoRA run is one PeftModel, the base arms run under `disable_adapter()`, as in the evaluation.
Arms are streamed in turns, a few tokens each, so every column fills at once; each arm's latency is
the time spent generating its own tokens.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import ARMS, TUNED_ARMS
from tunelab.errors import ConfigError
from tunelab.runs import RunPaths


@dataclass
class _RunModels:
    run_dir: Path
    tuned: Any
    base: Any  # None for a LoRA run: the tuned PeftModel with its adapter disabled
    tokenizer: Any
    builder: Any
    system: str | None  # the task's system prompt (most train examples share it)

    @contextlib.contextmanager
    def model_for(self, arm: str) -> Iterator[Any]:
        if arm in TUNED_ARMS:
            yield self.tuned
        elif self.base is not None:
            yield self.base
        else:
            with self.tuned.disable_adapter():
                yield self.tuned


def _load(run_dir: Path) -> _RunModels:
    from tunelab.eval.arms import (
        PromptBuilder,
        build_document_pool,
        build_pool,
        derive_instructions,
        task_system_prompt,
    )
    from tunelab.eval.run import read_examples
    from tunelab.models import load_model
    from tunelab.runs import load_tuned_model, open_run

    paths, recipe = open_run(run_dir)
    tuned, tokenizer = load_tuned_model(run_dir)
    base = None
    if paths.model.is_dir():  # a full fine-tune: the base model is a second model
        m = recipe.model
        base = load_model(m.name, dtype=m.dtype, revision=m.revision, trust_remote_code=m.trust_remote_code)
        base.eval()
    train_path = RunPaths(run_dir).data_split("train")
    train = read_examples(train_path) if train_path.is_file() else []
    cfg = recipe.eval
    documents = None
    if cfg.rag_docs:
        from tunelab.eval.retrieval import read_document_chunks

        documents = build_document_pool(read_document_chunks(cfg.rag_docs), [])
    builder = PromptBuilder(build_pool(train, []), cfg.instructions or derive_instructions(train), cfg.shots,
                            cfg.rag_k, cfg.seed, documents, task_system=task_system_prompt(train))
    return _RunModels(run_dir, tuned, base, tokenizer, builder, task_system_prompt(train))


class Playground:
    """Holds one run's models; answers one prompt at a time (a second waits for the first)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: _RunModels | None = None

    def system_prompt(self, run_dir: Path) -> str | None:
        """The task's system prompt from the run's train split, without loading any model."""
        from tunelab.eval.arms import task_system_prompt
        from tunelab.eval.run import read_examples

        train = RunPaths(run_dir).data_split("train")
        return task_system_prompt(read_examples(train)) if train.is_file() else None

    def stream(self, run_dir: Path, prompt: str, system: str | None, arms: list[str], max_new_tokens: int,
               cancelled: Callable[[], bool] = lambda: False) -> Iterator[dict[str, Any]]:
        """Events: status {message}, start {arm, prompt_tokens}, piece {arm, text}, end {arm, prompt_tokens,
        completion_tokens, latency_ms, first_token_ms, finish_reason}, done {}. `cancelled()` is checked
        between turns: true stops the generation (its client went away)."""
        from tunelab.engine.generate import (
            DecodingSettings,
            StreamStats,
            render_prompt,
            stream_generate_batch,
        )
        from tunelab.eval.arms import EvalExample

        unknown = [a for a in arms if a not in ARMS]
        if unknown or not arms:
            raise ConfigError(f"arms: choose from {', '.join(ARMS)}")
        if not prompt.strip():
            raise ConfigError("prompt: write a message to send")
        if not self._lock.acquire(blocking=False):
            yield {"event": "status", "message": "waiting for the answer in progress to finish"}
            self._lock.acquire()
        try:
            if self._loaded is None or self._loaded.run_dir != run_dir:
                self._loaded = None  # release the previous run's models before loading these
                yield {"event": "status", "message": f"loading the models of {run_dir.name} (once)"}
                self._loaded = _load(run_dir)
            loaded = self._loaded
            context = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            example = EvalExample(id="playground", source="playground", context=tuple(context), reference="")
            settings = DecodingSettings(max_new_tokens=max_new_tokens)
            streams: dict[str, tuple[Iterator[Any], StreamStats]] = {}
            for arm in arms:
                messages = loaded.builder.build(arm, example)
                stats = StreamStats()
                with loaded.model_for(arm) as model:  # the object only: the adapter is toggled per turn below
                    streams[arm] = (stream_generate_batch(model, loaded.tokenizer, [messages], settings, [stats]), stats)
                yield {"event": "start", "arm": arm, "prompt_tokens": len(render_prompt(loaded.tokenizer, messages))}
            spent = dict.fromkeys(arms, 0.0)
            first: dict[str, float] = {}
            active = list(arms)
            try:
                while active and not cancelled():
                    for arm in list(active):
                        iterator, stats = streams[arm]
                        started = time.perf_counter()
                        with loaded.model_for(arm):
                            item = next(iterator, None)
                        spent[arm] += time.perf_counter() - started
                        if item is not None and item[1] is not None:
                            first.setdefault(arm, spent[arm])
                            yield {"event": "piece", "arm": arm, "text": item[1]}
                            continue
                        active.remove(arm)
                        yield {"event": "end", "arm": arm, "prompt_tokens": stats.prompt_tokens,
                               "completion_tokens": stats.completion_tokens, "finish_reason": stats.finish_reason,
                               "latency_ms": round(1000 * spent[arm], 1),
                               "first_token_ms": round(1000 * first.get(arm, spent[arm]), 1)}
            finally:
                for iterator, _stats in streams.values():
                    iterator.close()
            yield {"event": "done"}
        finally:
            self._lock.release()
