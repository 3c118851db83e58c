"""An OpenAI-compatible HTTP server for a run's fine-tuned model (or any model), optionally with RAG.

Reads a run directory or a model reference, and with `--rag` a document folder or the run's train
split (data/train.jsonl). Serves, bound to 127.0.0.1 unless told otherwise:
  GET  /health                 {"status": "ok", "model": ...} (no API key needed: for probes)
  GET  /v1/models[/{id}]       the one model this server holds
  POST /v1/chat/completions    OpenAI's request and response shapes; `stream: true` -> server-sent
                               events (chat.completion.chunk ... data: [DONE])
Writes nothing. Logs one line per request (status, token counts, latency), never the API key or
prompt text.

Batching: requests are handed to one background worker thread, which owns the model. After the
first request arrives it waits `batch_window_ms` for more (up to `max_batch_size`) and runs the
non-streaming ones through one batched `generate` call per decoding setting, then the streaming
ones through one batched token-by-token loop per decoding setting (`stream_generate_batch`). A
stream's row stops computing as soon as its client disconnects or a stop string appears. Requests
that arrive while a batch runs wait for the next one (no continuous batching).

Requests are checked before any CPU work (body size, max_tokens, a prompt too many characters for the
context), then tokenized in a thread of their own, never on the event loop.

Errors are OpenAI-style bodies {"error": {"message", "type", "param", "code"}}: 400 for malformed
JSON, wrong types, non-finite or out-of-range numbers, unsupported options, over-long prompts and
too many tokens asked; 401 for a
missing or wrong API key; 404 for an unknown model or route; 413 for an oversized body; 429 when the
queue is full; 500 when generation itself fails. The server keeps serving after each.

Retrieval (`--rag`) goes through the evaluation's prompt builder (the `tuned+rag` arm): train
examples become prior user/assistant turns, document chunks reference material in the system
message, so the served prompts are the evaluated ones.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at
# definition time, and those classes are imported inside create_app to keep this module light.
import asyncio
import concurrent.futures
import copy
import hmac
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tunelab.engine.generate import DecodingSettings, Generation
    from tunelab.use.chat import LoadedModel

log = logging.getLogger("tunelab.use.serve")
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ServeSettings:
    max_batch_size: int = 16  # requests per batched generate call
    batch_window_ms: float = 5.0  # how long the worker waits for company after the first request
    default_max_tokens: int = 256  # when a request gives no max_tokens
    max_tokens_limit: int = 2048  # the most completion tokens one request may ask for
    default_temperature: float = 0.0  # greedy unless asked: the setting the evaluation measured
    max_queued_requests: int = 512  # beyond this, 429
    max_body_bytes: int = 4 * 1024 * 1024
    rag_k: int | None = None  # passages per request; None: the run's eval.rag_k, else 5


# ----------------------------------------------------------------------------------------------
# errors


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def server_busy() -> APIError:
    return APIError(429, "The server is busy; retry shortly.", type_="server_error", code="server_busy")


MIN_TEMPERATURE = 1e-3  # below it sampling is greedy in all but name, and logits / t overflow to inf
MAX_STOP_CHARS = 256  # each stop string is scanned for at every streamed piece
_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    # a union adds its member's type to the location ("content.str"); clients want the field
    loc = ".".join(str(p) for p in first["loc"] if p not in _UNION_TAGS and "[" not in str(p))
    if first["type"] == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request ({first['msg']}).")
    if not loc:
        return APIError(400, f"The request body must be a JSON object: {first['msg']}.")
    if first["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{loc}'.", param=loc, code="missing_required_parameter")
    return APIError(400, f"Invalid value for '{loc}': {first['msg']}.", param=loc, code="invalid_value")


# ----------------------------------------------------------------------------------------------
# the request (OpenAI's fields; strict JSON types: "1" is not a number)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class _StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # torch's generator takes a 64-bit seed (either sign); a larger one would fail in the worker
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) for the first option this server cannot honour; silently ignoring it would
        change what the client gets."""
        if self.n not in (None, 1):
            return "n", "n > 1 is not supported; send separate requests"
        if self.presence_penalty or self.frequency_penalty:
            return ("presence_penalty" if self.presence_penalty else "frequency_penalty"), "penalties are not supported"
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.tools:
            return "tools", "tool calls are not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format {'type': 'text'} is supported"
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            return "stop", f"stop takes up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters"
        if self.temperature is not None and 0 < self.temperature < MIN_TEMPERATURE:
            return "temperature", f"temperature is 0 (greedy) or from {MIN_TEMPERATURE:g} to 2"
        return None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class StopScanner:
    """Cuts streamed text at the first stop string, holding back a tail that could begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.pending = self.pending[: min(hits)], ""
            return text, True
        keep = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:length]):
                    keep = max(keep, length)
                    break
        text = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(text) :]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    head, hit = scanner.feed(text)
    return (head, True) if hit else (head + scanner.flush(), False)


# ----------------------------------------------------------------------------------------------
# the worker that owns the model


@dataclass
class _Job:
    messages: Messages
    settings: "DecodingSettings"
    future: concurrent.futures.Future | None = None  # non-streaming
    emit: Callable[[tuple[str, Any]], None] | None = None  # streaming
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: Any = None


class Engine:
    """One background thread runs every generation; requests reach it through a queue."""

    def __init__(self, loaded: "LoadedModel", settings: ServeSettings) -> None:
        self.loaded = loaded
        self.settings = settings
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tunelab-generate", daemon=True)
        self.batches_run = 0
        self.largest_batch = 0
        self.largest_stream_batch = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _check_room(self) -> None:
        if self._jobs.qsize() >= self.settings.max_queued_requests:
            raise server_busy()

    async def complete(self, messages: Messages, decoding: "DecodingSettings") -> "Generation":
        self._check_room()
        job = _Job(messages, decoding, future=concurrent.futures.Future())
        self._jobs.put(job)
        return await asyncio.wrap_future(job.future)  # a client that goes away cancels the future

    def start_stream(self, messages: Messages, decoding: "DecodingSettings") -> tuple[_Job, asyncio.Queue]:
        from tunelab.engine.generate import StreamStats

        self._check_room()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = _Job(messages, decoding, stats=StreamStats())

        def emit(event: tuple[str, Any]) -> None:
            if job.cancel.is_set():
                return
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is shutting down, nobody listens
                job.cancel.set()

        job.emit = emit
        self._jobs.put(job)
        return job, events

    def _run(self) -> None:
        window_s = self.settings.batch_window_ms / 1000
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + window_s
            while len(batch) < self.settings.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    more = self._jobs.get(timeout=remaining)
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)  # finish this batch, then stop
                    break
                batch.append(more)
            try:
                self._run_batch([j for j in batch if j.future is not None])
                self._run_streams([j for j in batch if j.emit is not None])
            except Exception as err:  # the worker must outlive any one batch, or every later request hangs
                log.error("worker: batch of %d failed: %s", len(batch), type(err).__name__)
                for failed in batch:
                    if failed.emit is not None:
                        failed.emit(("error", type(err).__name__))
                    failed.cancel.set()
                    if failed.future is not None and not failed.future.done():
                        failed.future.set_exception(err)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run_batch(self, jobs: list[_Job]) -> None:
        from tunelab.engine.generate import generate

        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        groups: dict[DecodingSettings, list[_Job]] = {}
        for job in live:
            groups.setdefault(job.settings, []).append(job)
        for decoding, group in groups.items():
            try:
                results = generate(self.loaded.model, self.loaded.tokenizer, [j.messages for j in group],
                                   decoding, batch_size=len(group))
            except Exception as err:  # reported to each waiting client as a 500; the worker keeps serving
                log.error("generation failed for a batch of %d: %s", len(group), type(err).__name__)
                for job in group:
                    job.future.set_exception(err)
                continue
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(group))
            for job, result in zip(group, results, strict=True):
                job.future.set_result(result)

    def _run_streams(self, jobs: list[_Job]) -> None:
        from tunelab.engine.generate import stream_generate_batch

        groups: dict[DecodingSettings, list[_Job]] = {}
        for job in jobs:
            if not job.cancel.is_set():
                groups.setdefault(job.settings, []).append(job)
        for decoding, group in groups.items():
            stream = None
            try:
                stream = stream_generate_batch(self.loaded.model, self.loaded.tokenizer,
                                               [j.messages for j in group], decoding, [j.stats for j in group],
                                               cancelled=lambda row, group=group: group[row].cancel.is_set())
                for row, piece in stream:
                    group[row].emit(("piece", piece) if piece is not None else ("end", group[row].stats))
            except Exception as err:  # sent to each client as an error event; the worker keeps serving
                log.error("streaming generation failed for a batch of %d: %s", len(group), type(err).__name__)
                for job in group:
                    job.emit(("error", type(err).__name__))
            finally:
                if stream is not None:
                    stream.close()
            self.batches_run += 1
            self.largest_stream_batch = max(self.largest_stream_batch, len(group))


# ----------------------------------------------------------------------------------------------
# retrieval


def build_retriever(rag: str, loaded: "LoadedModel", k: int) -> Callable[[Messages], Messages]:
    """`rag` is a document folder, or "train" for the run's train split. Returns a function that
    turns a conversation into the `tuned+rag` arm's prompt for it."""
    from tunelab.eval.arms import (
        EvalExample,
        Pool,
        PromptBuilder,
        build_document_pool,
        build_pool,
        to_eval_example,
    )
    from tunelab.eval.retrieval import read_document_chunks

    if rag == "train":
        if loaded.run_dir is None:
            raise ConfigError("--rag train: needs a run directory (its data/train.jsonl); give a document folder instead")
        from tunelab.runs import RunPaths

        train_file = RunPaths(loaded.run_dir).data_split("train")
        if not train_file.is_file():
            raise ConfigError(f"--rag train: {train_file} not found; give a document folder instead")
        with train_file.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        examples = [to_eval_example(row, f"{train_file}:{i}") for i, row in enumerate(rows, start=1)]
        builder = PromptBuilder(build_pool(examples, []), instructions="", shots=0, rag_k=k, seed=0)
    else:
        documents = build_document_pool(read_document_chunks(Path(rag)), [])
        builder = PromptBuilder(Pool(shots=[]), instructions="", shots=0, rag_k=k, seed=0, documents=documents)

    def augment(messages: Messages) -> Messages:
        example = EvalExample(id="request", source="request", context=tuple(messages), reference="")
        return builder.build("tuned+rag", example)

    augment([{"role": "user", "content": "warm-up"}])  # builds the index now, not on the first request
    return augment


# ----------------------------------------------------------------------------------------------
# request checks (plain functions: each raises the APIError a client gets)


def check_api_key(authorization: str, api_key: str | None) -> None:
    """401 unless the Authorization header is 'Bearer <api_key>' (compared in constant time); no key set: all pass."""
    if api_key is None:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")


def body_too_large(max_body_bytes: int) -> APIError:
    return APIError(413, f"The request body is larger than {max_body_bytes} bytes.", code="request_too_large")


async def read_body(content_length: str | None, chunks: AsyncIterator[bytes], max_body_bytes: int) -> bytes:
    """The body, refused with 413 as soon as the declared or the received size passes `max_body_bytes`."""
    if content_length and content_length.isdigit() and int(content_length) > max_body_bytes:
        raise body_too_large(max_body_bytes)
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_body_bytes:
            raise body_too_large(max_body_bytes)
        parts.append(chunk)
    return b"".join(parts)


def parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as err:
        raise _validation_error(err) from None


def model_not_found(name: str, model_id: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; this server has '{model_id}'.",
                    param="model", code="model_not_found")


def check_request_options(req: ChatCompletionRequest, model_id: str, max_tokens_limit: int) -> int | None:
    """The completion tokens asked for (None: not said), after checking the model, the options this
    server supports and the limit on max_tokens."""
    if req.model != model_id:
        shown = req.model if len(req.model) <= 200 else req.model[:200] + "..."  # never echo megabytes
        raise model_not_found(shown, model_id)
    problem = req.unsupported()
    if problem:
        raise APIError(400, problem[1], param=problem[0], code="unsupported_parameter")
    asked = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if asked is not None and asked > max_tokens_limit:
        raise APIError(400, f"{param} is too large: {asked}. This server allows at most "
                       f"{max_tokens_limit} completion tokens.", param=param, code="invalid_value")
    return asked


def check_prompt_chars(chars: int, context_tokens: int, longest_token_chars: int) -> None:
    """Refuse, untokenized, a prompt certain to exceed the context: no token covers more characters
    than the longest in the vocabulary."""
    if chars > context_tokens * longest_token_chars:
        raise APIError(400, f"This model's maximum context length is {context_tokens} tokens. However, your messages "
                       f"are {chars} characters, more than {context_tokens} tokens can hold. Please reduce the "
                       "length of the messages.", param="messages", code="context_length_exceeded")


def completion_budget(prompt_tokens: int, asked: int | None, context_tokens: int, default_max_tokens: int) -> int:
    """The completion tokens to generate: `asked`, else the default capped by the room left; 400 when
    the prompt and the completion do not fit the context."""
    if prompt_tokens >= context_tokens:
        raise APIError(400, f"This model's maximum context length is {context_tokens} tokens. However, your messages "
                       f"resulted in {prompt_tokens} tokens, leaving none for the completion. Please reduce the "
                       "length of the messages.", param="messages", code="context_length_exceeded")
    max_tokens = asked or min(default_max_tokens, context_tokens - prompt_tokens)
    if prompt_tokens + max_tokens > context_tokens:
        raise APIError(400, f"This model's maximum context length is {context_tokens} tokens. However, you requested "
                       f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
                       "the completion). Please reduce the length of the messages or completion.",
                       param="messages", code="context_length_exceeded")
    return max_tokens


def decoding_settings(req: ChatCompletionRequest, max_tokens: int, default_temperature: float) -> "DecodingSettings":
    from tunelab.engine.generate import DecodingSettings

    return DecodingSettings(max_new_tokens=max_tokens,
                            temperature=default_temperature if req.temperature is None else float(req.temperature),
                            top_p=1.0 if req.top_p is None else float(req.top_p),
                            seed=0 if req.seed is None else req.seed)


def http_error(status: int, detail: str) -> APIError:
    """A routing error (unknown route, wrong method) in OpenAI's shape."""
    return APIError(status, detail, code={404: "not_found", 405: "method_not_allowed"}.get(status))


class PrepareGate:
    """Counts requests being read or tokenized (each holds up to max_body_bytes): 429 past `limit`.
    Entered and left on the event loop only, so a plain counter suffices."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def __enter__(self) -> None:
        if self.active >= self.limit:
            raise server_busy()
        self.active += 1

    def __exit__(self, *exc: object) -> None:
        self.active -= 1


class RequestPreparer:
    """Turns a checked request into (messages, decoding settings, prompt tokens), with retrieval.

    Runs in a thread of its own with its own copy of the tokenizer: a Rust tokenizer used by two
    threads at once fails ("Already borrowed") when one changes its padding."""

    def __init__(self, loaded: "LoadedModel", settings: ServeSettings, model_id: str,
                 retriever: Callable[[Messages], Messages] | None) -> None:
        from tunelab.engine.generate import render_prompt

        self.settings, self.model_id, self.retriever = settings, model_id, retriever
        self.context_tokens = loaded.max_context_tokens
        self.render_prompt = render_prompt
        self.tokenizer = copy.deepcopy(loaded.tokenizer)
        self.longest_token_chars = max(1, *(len(token) for token in loaded.tokenizer.get_vocab()))
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-prepare")

    def prepare(self, req: ChatCompletionRequest) -> tuple[Messages, "DecodingSettings"]:
        from jinja2 import TemplateError

        asked = check_request_options(req, self.model_id, self.settings.max_tokens_limit)
        messages = [m.as_dict() for m in req.messages]
        check_prompt_chars(sum(len(m["content"]) for m in messages), self.context_tokens, self.longest_token_chars)
        if self.retriever is not None:
            messages = self.retriever(messages)
        try:
            prompt_tokens = len(self.render_prompt(self.tokenizer, messages))
        except TemplateError as err:
            raise APIError(400, f"The chat template rejected these messages: {err}", param="messages") from None
        max_tokens = completion_budget(prompt_tokens, asked, self.context_tokens, self.settings.default_max_tokens)
        return messages, decoding_settings(req, max_tokens, self.settings.default_temperature)

    async def prepare_off_loop(self, req: ChatCompletionRequest) -> tuple[Messages, "DecodingSettings"]:
        """Tokenizing (and retrieval) is CPU work: off the event loop, so /health and streams keep answering."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.prepare, req)


# ----------------------------------------------------------------------------------------------
# responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def complete(engine: Engine, req: ChatCompletionRequest, messages: Messages, decoding: "DecodingSettings",
                   completion_id: str, model_id: str, started: float) -> dict[str, Any]:
    """The non-streaming answer: one `chat.completion` body, cut at the first stop string."""
    try:
        result = await engine.complete(messages, decoding)
    except APIError:
        raise
    except Exception as err:  # a failed generation is the server's fault: answer 500, keep serving
        raise APIError(500, f"Generation failed ({type(err).__name__}).", type_="server_error") from None
    text, stopped = cut_at_stop(result.text, req.stops)
    log.info("200 chat.completion prompt_tokens=%d completion_tokens=%d batch=%d latency_ms=%.0f",
             result.prompt_tokens, result.completion_tokens, result.batch_size, (time.perf_counter() - started) * 1000)
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": "stop" if stopped else result.finish_reason}],
        "usage": usage(result.prompt_tokens, result.completion_tokens),
    }


@dataclass(frozen=True)
class ChunkWriter:
    """Formats the `chat.completion.chunk` events of one stream."""

    completion_id: str
    model: str
    created: int
    include_usage: bool

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        return self._event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], None)

    def usage_chunk(self, stats: Any) -> str:
        """The last chunk when the client asked for usage: no choices, the token counts."""
        return self._event([], usage(stats.prompt_tokens, stats.completion_tokens))

    def _event(self, choices: list[dict[str, Any]], token_counts: dict[str, int] | None) -> str:
        payload: dict[str, Any] = {
            "id": self.completion_id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "system_fingerprint": None, "choices": choices,
        }
        if self.include_usage:
            payload["usage"] = token_counts
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def sse_events(job: _Job, events: asyncio.Queue, writer: ChunkWriter, stops: list[str],
                     started: float) -> AsyncIterator[str]:
    """Relays the worker's events for `job` as server-sent events, ending `data: [DONE]`; an error
    event ends the stream with an OpenAI error body instead."""
    scanner = StopScanner(stops)
    try:
        yield writer.chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind not in ("piece", "end"):
                error = APIError(500, f"Generation failed ({value}).", type_="server_error").body()
                yield f"data: {json.dumps(error)}\n\n"
                return
            text, hit = scanner.feed(value) if kind == "piece" else (scanner.flush(), False)
            if text:
                yield writer.chunk({"content": text})
            if hit:
                job.cancel.set()  # the worker stops generating at its next token
                finish = "stop"
                break
            if kind == "end":
                finish = value.finish_reason
                break
        yield writer.chunk({}, finish)
        if writer.include_usage:
            yield writer.usage_chunk(job.stats)
        yield "data: [DONE]\n\n"
        log.info("200 chat.completion.chunk prompt_tokens=%d completion_tokens=%d latency_ms=%.0f",
                 job.stats.prompt_tokens, job.stats.completion_tokens, (time.perf_counter() - started) * 1000)
    finally:
        job.cancel.set()  # client gone or stream done: stop the worker's loop for this job


# ----------------------------------------------------------------------------------------------
# the app


def create_app(loaded: "LoadedModel", settings: ServeSettings = ServeSettings(), api_key: str | None = None,
               retriever: Callable[[Messages], Messages] | None = None, model_id: str | None = None) -> "FastAPI":
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    model_id = model_id or loaded.name
    created = int(time.time())
    engine = Engine(loaded, settings)
    preparer = RequestPreparer(loaded, settings, model_id, retriever)
    gate = PrepareGate(settings.max_queued_requests)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()
        preparer.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tunelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(http_error(err.status_code, str(err.detail)).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _request_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, "Invalid request.").body(), status_code=400)

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "tunelab"}

    @app.get("/health")
    async def health() -> Any:
        if not engine.alive:
            return JSONResponse({"status": "error", "model": model_id}, status_code=503)
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_api_key(request.headers.get("authorization", ""), api_key)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        check_api_key(request.headers.get("authorization", ""), api_key)
        if name != model_id:
            raise model_not_found(name, model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        started = time.perf_counter()
        check_api_key(request.headers.get("authorization", ""), api_key)
        with gate:
            body = await read_body(request.headers.get("content-length"), request.stream(), settings.max_body_bytes)
            req = parse_request(body)
            messages, decoding = await preparer.prepare_off_loop(req)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if not req.stream:
            return await complete(engine, req, messages, decoding, completion_id, model_id, started)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        job, events = engine.start_stream(messages, decoding)
        writer = ChunkWriter(completion_id, model_id, int(time.time()), include_usage)
        return StreamingResponse(sse_events(job, events, writer, req.stops, started),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


# ----------------------------------------------------------------------------------------------
# running it


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind first (port 0 picks a free port), so the address printed is the one really served."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror})") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve(reference: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          rag: str | None = None, settings: ServeSettings | None = None, model_id: str | None = None,
          log_level: str = "info", announce: Callable[[str], None] | None = None,
          trust_remote_code: bool = False) -> None:
    """Load the model, build the app and serve until interrupted."""
    import uvicorn

    from tunelab.use.chat import load_for_use

    settings = settings or ServeSettings()
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("tunelab: %(message)s"))
        log.addHandler(handler)
        log.setLevel(log_level.upper())
    if not is_loopback(host) and not api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model", host)
    loaded = load_for_use(reference, trust_remote_code=trust_remote_code)
    rag_k = settings.rag_k or (loaded.recipe.eval.rag_k if loaded.recipe is not None else 5)
    retriever = build_retriever(rag, loaded, rag_k) if rag else None
    app = create_app(loaded, settings, api_key=api_key, retriever=retriever, model_id=model_id)
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    message = (f"serving '{model_id or loaded.name}' on http://{shown_host}:{bound_port}/v1 (OpenAI-compatible)"
               f"{'; API key required' if api_key else ''}{'; with retrieval' if retriever else ''}")
    (announce or log.warning)(message)
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
