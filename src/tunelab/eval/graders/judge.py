"""Model graders' calls to an OpenAI-compatible endpoint, their cache, and reading the judge's reply.

Reads the API key from the environment variable a grader names (api_key_env), never from a file;
POSTs {base_url}/chat/completions (score_model, label_model) or {base_url}/embeddings (cosine).
Each call has a timeout; 429, 5xx and connection errors are retried with backoff doubling from
1 s. Redirects are not followed (the Authorization header would go wherever one points: an
endpoint that redirects fails, naming where to), and a reply over MAX_REPLY_BYTES, or nested deeper
than the parser's limit, fails for that example without being read further. Replies are cached in a JSONL file (the run's eval/judge_cache.jsonl) keyed by the sha256 of
(endpoint, model, rendered messages, sampling params), so re-running eval never pays twice for the
same prompt; failed calls are not cached (the next run tries again).

The judge is asked for JSON {"result": ...} (OpenAI's score_model and label_model reply shape) by a
sentence appended to the last message; a reply that is not JSON is read leniently (the first number,
or the one label it names). A reply outside the range, or naming no label, fails for that example.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

RETRY_FIRST_WAIT_S = 1.0
MAX_REPLY_BYTES = 8 * 2**20  # a judge's JSON reply is a few KB; an endless one is never held whole
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class JudgeFailed(RuntimeError):
    """A call to the judge failed for this example (after retries), or its reply cannot be read."""


class JudgeCache:
    """Replies by key, appended to a JSONL file as they arrive (thread-safe); None: no file, memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.replies: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._gates: dict[str, threading.Lock] = {}  # one call in flight per key: equal prompts pay once
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.replies[row["key"]] = row["reply"]
                except (ValueError, KeyError, TypeError, RecursionError):
                    continue  # a line torn by an interrupted run: that call is simply made again

    def fetch(self, key: str, call: Callable[[], Any]) -> Any:
        """The cached reply, else call() once (threads asking for the same key wait for it) and keep it."""
        with self._lock:
            if key in self.replies:
                return self.replies[key]
            gate = self._gates.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self.replies:
                    return self.replies[key]
            reply = call()
            self._put(key, reply)
            return reply

    def _put(self, key: str, reply: Any) -> None:
        with self._lock:
            self.replies[key] = reply
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")


def cache_key(base_url: str, model: str, payload: Any) -> str:
    text = json.dumps([base_url.rstrip("/"), model, payload], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def api_key(endpoint: Any) -> str | None:
    """The key from the environment variable the grader names; a missing variable is a clear error."""
    name = endpoint.key_env
    if name is None:
        return None
    value = os.environ.get(name)
    if not value:
        raise JudgeFailed(f"environment variable {name} (api_key_env) is not set; it holds the API key for "
                          f"{endpoint.base_url}")
    return value


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: urllib would resend the request, Authorization header included, to any
    origin the reply names."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None  # urllib then raises HTTPError with the 3xx status


_OPENER = urllib.request.build_opener(_NoRedirect)


def read_reply(response: Any, url: str) -> Any:
    """The reply body as JSON, read up to MAX_REPLY_BYTES (JudgeFailed past it, or nested too deeply)."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_REPLY_BYTES:
        raise JudgeFailed(f"{url}: the reply is {int(length)} bytes, over the {MAX_REPLY_BYTES // 2**20} MiB limit")
    data = response.read(MAX_REPLY_BYTES + 1)
    if len(data) > MAX_REPLY_BYTES:
        raise JudgeFailed(f"{url}: the reply is over the {MAX_REPLY_BYTES // 2**20} MiB limit")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise JudgeFailed(f"{url}: the answer is JSON nested too deeply") from None


def post_json(endpoint: Any, route: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST with timeout and retries; the parsed JSON answer or JudgeFailed naming the last problem."""
    url = endpoint.base_url.rstrip("/") + route
    headers = {"Content-Type": "application/json"}
    key = api_key(endpoint)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode("utf-8")
    problem = ""
    for attempt in range(endpoint.max_retries + 1):
        if attempt:
            time.sleep(RETRY_FIRST_WAIT_S * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=endpoint.timeout_s) as response:
                return read_reply(response, url)
        except urllib.error.HTTPError as err:
            if 300 <= err.code < 400:
                problem = (f"HTTP {err.code} from {url}: redirected to {err.headers.get('Location', '?')}; a judge's "
                           "redirects are not followed (its API key would go with them): set base_url to the final address")
                break
            detail = err.read(4096).decode("utf-8", "replace")[:200]
            problem = f"HTTP {err.code} from {url}: {detail}"
            if err.code not in _RETRY_STATUS:
                break
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            problem = f"{url}: {getattr(err, 'reason', err)}"
        except ValueError as err:
            problem = f"{url}: the answer is not JSON ({err})"
            break
    raise JudgeFailed(f"{problem} (after {attempt + 1} attempt(s))")


def chat_reply(endpoint: Any, model: str, messages: list[dict[str, str]], sampling: dict[str, Any],
               cache: JudgeCache) -> str:
    """The judge's reply text, from the cache when this exact call was made before."""

    def call() -> str:
        answer = post_json(endpoint, "/chat/completions", {"model": model, "messages": messages, **sampling})
        try:
            reply = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeFailed(f"{endpoint.base_url}: the answer has no choices[0].message.content") from None
        if not isinstance(reply, str):
            raise JudgeFailed(f"{endpoint.base_url}: the reply content is {type(reply).__name__}, expected text")
        return reply

    return cache.fetch(cache_key(endpoint.base_url, model, {"messages": messages, "sampling": sampling}), call)


def embedding(endpoint: Any, model: str, text: str, cache: JudgeCache) -> list[float]:

    def call() -> list[float]:
        answer = post_json(endpoint, "/embeddings", {"model": model, "input": text})
        try:
            return [float(v) for v in answer["data"][0]["embedding"]]
        except (KeyError, IndexError, TypeError, ValueError):
            raise JudgeFailed(f"{endpoint.base_url}: the answer has no data[0].embedding") from None

    return cache.fetch(cache_key(endpoint.base_url, model, {"embed": text}), call)


def cosine(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        raise JudgeFailed(f"embeddings of different sizes ({len(a)}, {len(b)})")
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / norm if norm else 0.0


# ---------------------------------------------------------------------------------------------- replies


def sampling_body(params: Any) -> dict[str, Any]:
    """OpenAI's grader sampling_params as chat-completions fields."""
    if params is None:
        return {}
    values = params.model_dump(exclude_none=True)
    if "max_completions_tokens" in values:
        values["max_tokens"] = values.pop("max_completions_tokens")
    return values


def score_instruction(low: float, high: float) -> str:
    return (f'Reply with JSON only, in this shape: {{"result": <a number from {low:g} to {high:g}>}}')


def label_instruction(labels: list[str]) -> str:
    return f'Reply with JSON only, in this shape: {{"result": <one of {json.dumps(labels)}>}}'


_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")


def _result(reply: str) -> Any:
    """The reply's "result" (or "score", "label"): the whole reply as JSON, else the first flat {...}
    in it that parses (the asked-for shape is flat; scanning for it is linear and never recurses)."""
    for text in itertools.chain([reply.strip()], (m.group() for m in _FLAT_OBJECT.finditer(reply))):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            for key in ("result", "score", "label"):
                if key in value:
                    return value[key]
    return None


def read_score(reply: str, low: float, high: float) -> float:
    value = _result(reply)
    if isinstance(value, str):
        value = value.strip()
        value = float(value) if _NUMBER.fullmatch(value) else None
    if value is None or isinstance(value, bool):
        found = _NUMBER.search(reply)
        if found is None:
            raise JudgeFailed(f"the judge's reply holds no score: {reply[:120]!r}")
        value = float(found.group())
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise JudgeFailed(f"the judge's result {value!r} is not a number")
    if not low <= value <= high:
        raise JudgeFailed(f"the judge's score {value:g} is outside range [{low:g}, {high:g}]")
    return float(value)


def read_label(reply: str, labels: list[str]) -> str:
    value = _result(reply)
    if isinstance(value, str) and value.strip() in labels:
        return value.strip()
    text = reply.strip().strip('"').strip()
    if text in labels:
        return text
    named = [label for label in labels if re.search(rf"(?<!\w){re.escape(label)}(?!\w)", reply, re.IGNORECASE)]
    if len(named) == 1:
        return named[0]
    raise JudgeFailed(f"the judge's reply names {'no' if not named else 'more than one'} label of {labels}: {reply[:120]!r}")
