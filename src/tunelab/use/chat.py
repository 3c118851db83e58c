"""Use a model from the terminal: an interactive chat that streams its replies, and batch generation
over a JSONL file.

Reads a run directory (its fine-tuned model, see tunelab.runs) or any model reference (alias, local
folder, .gguf, hub id). `chat_loop` reads lines from stdin and writes the replies to stdout (notices go
to stderr). `generate_file` reads a JSONL of OpenAI chat records (`{"messages": [...]}`, a trailing
assistant message is kept as the reference) or `{"prompt": "..."}` lines and writes one JSON line per
input line; the input file is never modified.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tunelab.errors import ConfigError, DataError
from tunelab.files import write_text_atomic
from tunelab.runs import RunPaths

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.config import Recipe
    from tunelab.engine.generate import DecodingSettings

ROLES = ("system", "user", "assistant")
_MAX_LISTED_PROBLEMS = 20
CHAT_HELP = "/reset clears the history, /exit (or Ctrl-D) quits"


@dataclass
class LoadedModel:
    """A model ready to answer: the tuned model of a run (adapter merged in memory) or a plain model."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what clients call it: the run's name, else the reference as given
    max_context_tokens: int  # prompt + completion
    run_dir: Path | None = None
    recipe: Recipe | None = None


def is_run_dir(reference: str | Path) -> bool:
    return RunPaths(Path(reference)).recipe.is_file()


def load_for_use(reference: str, device: str | None = None, dtype: str | None = None, merge: bool = True,
                 trust_remote_code: bool = False) -> LoadedModel:
    """Load a run's fine-tuned model or a model reference. A LoRA adapter is merged into the base
    weights in memory (same function, no per-layer adapter matmuls: faster replies); the run
    directory is only read. `trust_remote_code` comes from the command line only (runs.open_run)."""
    from tunelab.models import load_model, load_tokenizer
    from tunelab.runs import load_run_model, open_run

    if is_run_dir(reference):
        paths, recipe = open_run(reference, trust_remote_code)
        model, tokenizer = load_run_model(paths, recipe, device=device, dtype=dtype)
        if merge and hasattr(model, "merge_and_unload") and getattr(model.get_base_model(), "hf_quantizer", None) is None:
            model = model.merge_and_unload()
        name, run_dir = recipe.name, Path(reference)
    else:
        model = load_model(reference, dtype=dtype or "auto", device=device, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(reference, trust_remote_code=trust_remote_code)
        name, run_dir, recipe = reference, None, None
    model.eval()
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedModel(model, tokenizer, name, int(limit), run_dir, recipe)


def decoding_for(loaded: LoadedModel, max_new_tokens: int, temperature: float) -> DecodingSettings:
    """The command line's decoding settings, checked against the loaded model's context."""
    from tunelab.engine.generate import DecodingSettings

    if not 1 <= max_new_tokens < loaded.max_context_tokens:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be from 1 to {loaded.max_context_tokens - 1} "
                          f"(the context of {loaded.name} is {loaded.max_context_tokens} tokens)")
    return DecodingSettings(max_new_tokens=max_new_tokens, temperature=temperature)


# ----------------------------------------------------------------------------------------------
# interactive chat


def _fit_history(loaded: LoadedModel, history: list[dict[str, str]], max_new_tokens: int) -> int:
    """Drop the oldest exchanges (never the system message or the newest user message) until the
    prompt leaves room for the reply. Returns how many messages were dropped."""
    from tunelab.engine.generate import render_prompt

    dropped = 0
    first = 1 if history and history[0]["role"] == "system" else 0
    while len(history) - first > 1:
        if len(render_prompt(loaded.tokenizer, history)) + max_new_tokens <= loaded.max_context_tokens:
            break
        del history[first]
        dropped += 1
    return dropped


def chat_loop(
    loaded: LoadedModel,
    settings: DecodingSettings,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Read user lines until /exit, end of input (Ctrl-D) or Ctrl-C at the prompt; stream each reply.
    Ctrl-C while a reply streams stops that reply (it is not kept in the history). Returns the number
    of replies given."""
    from tunelab.engine.generate import render_prompt, stream_generate

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty() and stdout.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    replies = 0
    print(f"chatting with {loaded.name}; {CHAT_HELP}", file=stderr, flush=True)
    while True:
        try:
            line = input("> ") if interactive else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            line = ""
        if not line:  # end of input
            if interactive:
                print(file=stdout)
            return replies
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return replies
        if text == "/reset":
            history = list(start)
            print("(history cleared)", file=stderr, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; {CHAT_HELP}", file=stderr, flush=True)
            continue
        history.append({"role": "user", "content": text})
        if _fit_history(loaded, history, settings.max_new_tokens):
            print("(oldest messages dropped to fit the context)", file=stderr, flush=True)
        prompt_tokens = len(render_prompt(loaded.tokenizer, history))
        if prompt_tokens + settings.max_new_tokens > loaded.max_context_tokens:
            print(
                f"(message too long: {prompt_tokens} prompt tokens + {settings.max_new_tokens} for the reply; "
                f"the model takes {loaded.max_context_tokens})",
                file=stderr, flush=True,
            )
            history.pop()
            continue
        pieces: list[str] = []
        stream = stream_generate(loaded.model, loaded.tokenizer, history, settings)
        try:
            for piece in stream:
                pieces.append(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            print(file=stdout, flush=True)
            print("(reply interrupted; not kept)", file=stderr, flush=True)
            history.pop()
            continue
        print(file=stdout, flush=True)
        history.append({"role": "assistant", "content": "".join(pieces)})
        replies += 1


# ----------------------------------------------------------------------------------------------
# batch generation over a file


@dataclass(frozen=True)
class GenerationInput:
    line: int
    id: str | None
    messages: list[dict[str, str]]
    reference: str | None


def _parse_messages(messages: Any) -> tuple[list[dict[str, str]] | None, str]:
    """(messages, "") or (None, what is wrong)."""
    if not isinstance(messages, list) or not messages:
        return None, "messages: expected a non-empty list of {role, content}"
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return None, f"messages[{index}]: expected an object with role and content"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return None, f"messages[{index}].role: expected one of {', '.join(ROLES)}, got {role!r}"
        if not isinstance(content, str):
            return None, f"messages[{index}].content: expected a string, got {type(content).__name__}"
        parsed.append({"role": role, "content": content})
    return parsed, ""


def read_generation_inputs(path: Path) -> list[GenerationInput]:
    """Every line of `path` as a prompt; all bad lines are reported at once as file:line: problem."""
    if not path.is_file():
        raise ConfigError(f"{path}: input file not found")
    from tunelab.data.formats import iter_file

    inputs: list[GenerationInput] = []
    problems: list[str] = []
    # the data reader's JSONL: bounded record size, no device files, bad UTF-8 and deep nesting as problems
    for raw in iter_file(path, jsonl=True):
        number, record = raw.line, raw.value
        where = f"{path}:{number}"
        if raw.problem is not None:
            code, message = raw.problem
            problems.append(f"{where}: " + (f"not valid JSON ({message})" if code == "invalid_json" else message))
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
            continue
        record_id = record.get("id")
        record_id = None if record_id is None else str(record_id)
        reference = None
        if "messages" in record:
            messages, problem = _parse_messages(record["messages"])
            if messages is None:
                problems.append(f"{where}: {problem}")
                continue
            if messages[-1]["role"] == "assistant":
                reference = messages.pop()["content"]
            if not messages or messages[-1]["role"] != "user":
                problems.append(f"{where}: messages: the last message (before any answer) must be from the user")
                continue
        elif "prompt" in record:
            prompt, system = record["prompt"], record.get("system")
            if not isinstance(prompt, str) or not prompt.strip():
                problems.append(f"{where}: prompt: expected a non-empty string")
                continue
            if system is not None and not isinstance(system, str):
                problems.append(f"{where}: system: expected a string")
                continue
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            completion = record.get("completion")
            reference = completion if isinstance(completion, str) else None
        else:
            problems.append(f"{where}: expected 'messages' (OpenAI chat format) or 'prompt'")
            continue
        inputs.append(GenerationInput(number, record_id, messages, reference))
    if problems:
        listed = problems[:_MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        tail = [f"... and {more} more"] if more else []
        raise DataError("\n".join([f"{path}: {len(problems)} bad line(s); nothing generated", *listed, *tail]))
    if not inputs:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return inputs


def check_out_path(input_path: Path, out_path: Path) -> None:
    same = input_path.resolve() == out_path.resolve() or (
        input_path.exists() and out_path.exists() and os.path.samefile(input_path, out_path)
    )
    if same:
        raise ConfigError(f"--out {out_path} is the input file; tunelab never overwrites its input")
    if out_path.is_symlink() or (out_path.exists() and not out_path.is_file()):
        raise ConfigError(f"--out {out_path}: is a folder, a link or a device; give a file name")
    if out_path.is_file() and out_path.stat().st_size and not _is_generation_output(out_path):
        raise ConfigError(f"--out {out_path}: exists and is not an earlier `tunelab generate` output; tunelab never "
                          "overwrites your files: choose another name, or remove it")


def _is_generation_output(path: Path) -> bool:
    """Whether the file's first line is one that generate_file writes (it may then be replaced)."""
    try:
        with path.open("rb") as f:
            first = json.loads(f.readline(1 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(first, dict) and {"line", "messages", "output"} <= set(first)


def generate_file(
    loaded: LoadedModel,
    input_path: Path,
    out_path: Path,
    settings: DecodingSettings,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Generate one reply per input line and write `out_path` (atomically). Returns the line count.

    Output lines: {"line", "id", "messages" (the prompt), "output", "reference", "prompt_tokens",
    "completion_tokens", "finish_reason"}."""
    from tunelab.engine.generate import generate, render_prompt

    input_path, out_path = Path(input_path), Path(out_path)
    check_out_path(input_path, out_path)
    inputs = read_generation_inputs(input_path)
    too_long = []
    for item in inputs:
        n = len(render_prompt(loaded.tokenizer, item.messages))
        if n + settings.max_new_tokens > loaded.max_context_tokens:
            too_long.append(
                f"{input_path}:{item.line}: prompt has {n} tokens; with max_new_tokens={settings.max_new_tokens} "
                f"that exceeds the model's {loaded.max_context_tokens}"
            )
    if too_long:
        raise DataError("\n".join(too_long[:_MAX_LISTED_PROBLEMS]))
    results = generate(
        loaded.model, loaded.tokenizer, [item.messages for item in inputs], settings, batch_size, progress=progress
    )
    records = (
        {"line": item.line, "id": item.id, "messages": item.messages, "output": result.text,
         "reference": item.reference, "prompt_tokens": result.prompt_tokens,
         "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason}
        for item, result in zip(inputs, results, strict=True)
    )
    write_text_atomic(out_path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return len(inputs)
