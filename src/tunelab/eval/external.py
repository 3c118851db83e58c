"""External arms (eval.external): the models a team would really use instead of a fine-tune.

Three kinds, each answering the same test examples as the built-in arms, with a prompt from the same
PromptBuilder (`prompt: short | prompt | rag` -> the base, prompt or rag arm's messages):
  endpoint   an OpenAI-compatible POST {base_url}/chat/completions (hosted API, vLLM, `tunelab serve`):
             a thread pool of `concurrency` requests, retries with backoff (429 honouring Retry-After,
             408/409/5xx, timeouts, connection errors), redirects refused (the key is never sent on to
             another location), the reply capped at MAX_REPLY_BYTES and parsed defensively. Replies are
             cached in the run's eval/external/<name>.jsonl, keyed by the sha256 of (base_url without
             credentials, model, messages, decoding settings), so a re-run or --resume sends no request
             twice; failed requests are not cached (the next run tries them again). Token counts come from
             the reply's `usage`, else they are counted with the run's tokenizer (and the arm says so).
  local      another model (alias, HF folder, hub id) through the generation engine (engine/generate.py:
             batched, shared-prefix cache) with the evaluation's decoding settings.
  recorded   outputs produced elsewhere (production), a JSONL file with one {"id" | "line", "output"} per
             test example; matched before anything runs: an unknown, duplicate or missing id is an error.

Reads the recipe's eval.external (or a `tunelab eval RUN --external FILE.yaml` file), the API key from
the environment variable an endpoint names (only in `credential_headers`), and recorded prediction
files. Writes only the cache above; eval/run.py scores the answers (a failed answer is never scored as
wrong: the arm is compared on the examples it answered, `n_scored`).
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from tunelab.config import EXTERNAL_PROMPTS, EndpointArm, ExternalArm, LocalArm, RecordedArm, load_yaml_text
from tunelab.errors import ConfigError, DataError

RETRY_FIRST_WAIT_S = 0.5  # backoff doubles from here after a 5xx, a timeout or a lost connection
RETRY_MAX_WAIT_S = 30.0
RETRY_AFTER_MAX_S = 120.0  # a Retry-After beyond this is cut to it (a broken header must not stall a run)
MAX_REPLY_BYTES = 4 << 20  # a chat completion is kilobytes; more is a broken or hostile server
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_DETAIL_CHARS = 200


# ---------------------------------------------------------------------------------------------- what an arm returns


@dataclass
class Answer:
    """One test example's answer from an external arm; `text` None: it failed (`error` says why)."""

    text: str | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float = 0.0  # the successful request's round trip (endpoint), the batch's wall time (local)
    finish_reason: str = "stop"
    error: str | None = None
    attempts: int = 0  # HTTP requests this answer took in this run (0: from the cache or no endpoint)
    cached: bool = False
    tokens_counted: bool = False  # counted with the run's tokenizer, not reported by the endpoint


@dataclass
class ExternalRun:
    """An external arm's answers, in test order, and what producing them took."""

    arm: Any  # EndpointArm | LocalArm | RecordedArm
    answers: list[Answer]
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(1 for a in self.answers if a.text is None)

    @property
    def requests(self) -> int:
        return sum(a.attempts for a in self.answers)


def builtin_arm(arm: Any) -> str:
    """The built-in arm whose prompt an external arm receives (a recorded arm: the example's own messages)."""
    return EXTERNAL_PROMPTS[getattr(arm, "prompt", "short")]


def public_url(url: str) -> str:
    """scheme://host[:port]/path: no user:password@, no query string (either may carry a credential)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def describe(arm: Any) -> dict[str, Any]:
    """eval/metrics.json arms.<name>.external: what answered."""
    if isinstance(arm, EndpointArm):
        return {"kind": "endpoint", "model": arm.model, "base_url": public_url(arm.base_url), "prompt": arm.prompt}
    if isinstance(arm, LocalArm):
        return {"kind": "local", "model": arm.model, "prompt": arm.prompt}
    return {"kind": "recorded", "predictions": str(arm.predictions)}


def prices(arm: Any, default_input: float, default_output: float) -> tuple[float, float]:
    """USD per 1M input and output tokens: the arm's own, else the recipe's eval prices."""
    inp = arm.price_per_m_input_tokens
    out = arm.price_per_m_output_tokens
    return (default_input if inp is None else inp), (default_output if out is None else out)


def read_external_file(path: str | Path) -> list[Any]:
    """`tunelab eval RUN --external FILE.yaml`: a list of external arms, or a mapping {external: [...]};
    relative paths in it are resolved against its folder."""
    from tunelab.config import resolve_external_paths

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: --external file not found")
    data = load_yaml_text(path.read_text(encoding="utf-8"), str(path))
    if isinstance(data, dict) and set(data) == {"external"}:
        data = data["external"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a list of external arms (or a mapping with the one key 'external'); "
                          "see docs/evaluation.md")
    resolve_external_paths(data, path.parent)
    try:
        arms = TypeAdapter(list[ExternalArm]).validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if str(p) not in ("endpoint", "local", "recorded"))
        raise ConfigError(f"{path}: {loc}: {first['msg']}") from None
    names = [a.name for a in arms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: external arm name(s) {twice} given more than once")
    return arms


# ---------------------------------------------------------------------------------------------- checks before anything runs


def refuse_secret_bearing_arms(arms: Sequence[Any], recipe_path: Path, consent: str) -> None:
    """Opening someone else's run folder never sends your secrets where it says: an endpoint arm of a run
    folder's recipe that would send an API key from your environment needs consent, like its judges
    (eval/graders/evaluation.py refuse_secret_bearing; `consent` says how to give it)."""
    for arm in arms:
        if isinstance(arm, EndpointArm) and arm.api_key_env:
            raise ConfigError(
                f"{recipe_path}: eval.external '{arm.name}' would send the API key in ${arm.api_key_env} to "
                f"{public_url(arm.base_url)}, as the run folder's recipe says; tunelab does not send your secrets "
                f"where a run folder says unasked: {consent} (or give the arm with --external FILE)")


def check_external(arms: Sequence[Any], all_test: Sequence[Any], limit: int, taken: Sequence[str],
                   test_path: Path) -> dict[str, list[Answer]]:
    """Everything about the external arms that can fail without a request: names free, each endpoint's
    key variable set, each recorded file read and matched to the test examples. Returns the recorded
    arms' answers (first `limit` test examples)."""
    problems = [f"eval.external: '{a.name}' is also the name of an evaluated arm" for a in arms if a.name in taken]
    for arm in arms:
        if isinstance(arm, EndpointArm) and arm.api_key_env and not os.environ.get(arm.api_key_env):
            problems.append(f"eval.external '{arm.name}': environment variable {arm.api_key_env} (api_key_env) is "
                            f"not set; it holds the API key for {public_url(arm.base_url)}")
    if problems:
        raise ConfigError("\n".join(problems))
    return {arm.name: read_recorded(arm, all_test, test_path)[:limit] for arm in arms if isinstance(arm, RecordedArm)}


def read_recorded(arm: RecordedArm, all_test: Sequence[Any], test_path: Path) -> list[Answer]:
    """One Answer per test example, in test order. Each JSONL record: "output" (a string; null = the
    recorded system failed on it), and "id" (a test example's id) or "line" (its 1-based line in the test
    file) or neither (the record's own position); optional "prompt_tokens", "completion_tokens",
    "latency_ms"."""
    path = Path(arm.predictions)
    if not path.is_file():
        raise DataError(f"eval.external '{arm.name}': {path}: predictions file not found")
    index_of_id = {ex.id: i for i, ex in enumerate(all_test)}
    answers: dict[int, Answer] = {}
    where_of: dict[int, int] = {}
    with path.open(encoding="utf-8") as f:
        records = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    for position, (n, line) in enumerate(records):
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or "output" not in row:
            raise DataError(f'{where}: expected {{"id" or "line", "output"}}')
        if "id" in row:
            index = index_of_id.get(str(row["id"]))
            if index is None:
                raise DataError(f"{where}: id: '{row['id']}' is not an example of the test file {test_path}")
        elif "line" in row:
            line_number = row["line"]
            if not isinstance(line_number, int) or isinstance(line_number, bool) or not 1 <= line_number <= len(all_test):
                raise DataError(f"{where}: line: {line_number!r} is not a line of the test file {test_path} "
                                f"(1 to {len(all_test)})")
            index = line_number - 1
        else:
            if position >= len(all_test):
                raise DataError(f"{where}: more records than the {len(all_test)} test examples of {test_path}")
            index = position
        if index in answers:
            raise DataError(f"{where}: a second output for test example '{all_test[index].id}' (first at line "
                            f"{where_of[index]})")
        answers[index], where_of[index] = _recorded_answer(row, where), n
    missing = [ex.id for i, ex in enumerate(all_test) if i not in answers]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{path}: no output for {len(missing)} of the {len(all_test)} test examples of {test_path} "
                        f"({shown}); record one per example (\"output\": null marks a recorded failure)")
    return [answers[i] for i in range(len(all_test))]


def _recorded_answer(row: dict[str, Any], where: str) -> Answer:
    output = row["output"]
    if output is not None and not isinstance(output, str):
        raise DataError(f"{where}: output: expected a string (or null for a recorded failure), got "
                        f"{type(output).__name__}")
    counts = {}
    for key in ("prompt_tokens", "completion_tokens"):
        value = row.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise DataError(f"{where}: {key}: expected a count (integer >= 0), got {value!r}")
        counts[key] = value
    latency = row.get("latency_ms")
    if latency is not None and (not isinstance(latency, int | float) or isinstance(latency, bool) or latency < 0):
        raise DataError(f"{where}: latency_ms: expected milliseconds >= 0, got {latency!r}")
    return Answer(text=output, error=None if output is not None else "recorded as failed (output null)",
                  latency_s=(latency or 0.0) / 1000, **counts)


# ---------------------------------------------------------------------------------------------- endpoint client


class EndpointFailed(Exception):
    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


def credential_headers(arm: EndpointArm) -> dict[str, str]:
    """The one place an endpoint's API key is read: from the environment variable the arm names, into
    an Authorization header, never anywhere else (no file, log, cache key or error message)."""
    if not arm.api_key_env:
        return {}
    key = os.environ.get(arm.api_key_env)
    if not key:
        raise ConfigError(f"eval.external '{arm.name}': environment variable {arm.api_key_env} (api_key_env) is not set")
    return {"Authorization": f"Bearer {key}"}


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A chat completions API does not redirect; following one would send the key to another location."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises HTTPError with the 3xx status


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) in seconds, capped; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = moment.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def _redacted(text: str, headers: dict[str, str]) -> str:
    for value in headers.values():
        secret = value.removeprefix("Bearer ")
        if secret:
            text = text.replace(secret, "***")
    return text


def _read_capped(response: Any, deadline: float) -> bytes:
    """The body, at most MAX_REPLY_BYTES + 1 bytes of it, by `deadline` (perf_counter seconds): the socket
    timeout bounds each read, so a server trickling bytes would otherwise hold a request for ever."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_REPLY_BYTES:
        piece = response.read1(1 << 16)
        if not piece:
            break
        chunks.append(piece)
        size += len(piece)
        if time.perf_counter() > deadline:
            raise TimeoutError("the reply took longer than timeout_s")
    return b"".join(chunks)


def post_chat(arm: EndpointArm, body: dict[str, Any]) -> tuple[dict[str, Any], float, int]:
    """POST {base_url}/chat/completions with retries: (parsed reply, latency of the answered request in s,
    attempts), or EndpointFailed naming the last problem."""
    url = arm.base_url.rstrip("/") + "/chat/completions"
    shown_url = public_url(url)
    auth = credential_headers(arm)
    headers = {"Content-Type": "application/json", "Accept": "application/json", **auth}
    data = json.dumps(body).encode("utf-8")
    problem, wait = "", 0.0
    for attempt in range(1, arm.max_retries + 2):
        if wait:
            time.sleep(wait)
        wait = min(RETRY_FIRST_WAIT_S * 2 ** (attempt - 1), RETRY_MAX_WAIT_S)
        started = time.perf_counter()
        try:
            with _OPENER.open(urllib.request.Request(url, data=data, headers=headers, method="POST"),
                              timeout=arm.timeout_s) as response:
                raw = _read_capped(response, started + arm.timeout_s)
            latency = time.perf_counter() - started
        except urllib.error.HTTPError as err:
            detail = err.read(_DETAIL_CHARS * 4).decode("utf-8", "replace")[:_DETAIL_CHARS]
            err.close()
            problem = f"HTTP {err.code} from {shown_url}: {' '.join(detail.split())}"
            if 300 <= err.code < 400:
                problem = (f"HTTP {err.code} from {shown_url}: a redirect, refused (the API key is never sent on "
                           "to another location; give the final URL as base_url)")
                raise EndpointFailed(_redacted(problem, auth), attempt) from None
            if err.code not in _RETRY_STATUS:
                raise EndpointFailed(_redacted(problem, auth), attempt) from None
            if err.code in (429, 503):
                wait = retry_after_s(err.headers.get("Retry-After")) if err.headers else None
                wait = RETRY_FIRST_WAIT_S * 2 ** (attempt - 1) if wait is None else wait
            continue
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", None) or err
            problem = f"{shown_url}: {'timed out' if isinstance(reason, TimeoutError) else reason}"
            continue
        if len(raw) > MAX_REPLY_BYTES:
            raise EndpointFailed(f"{shown_url}: reply larger than {MAX_REPLY_BYTES:,} bytes, refused", attempt)
        try:
            reply = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise EndpointFailed(f"{shown_url}: the reply is not JSON", attempt) from None
        except RecursionError:  # [[[[... nested past the parser's depth
            raise EndpointFailed(f"{shown_url}: the reply is nested too deeply to be a chat completion", attempt) from None
        if not isinstance(reply, dict):
            raise EndpointFailed(f"{shown_url}: the reply is not a JSON object", attempt)
        return reply, latency, attempt
    raise EndpointFailed(_redacted(f"{problem} (after {arm.max_retries + 1} attempts)", auth), arm.max_retries + 1)


def read_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """The cached fields of a chat completion: output, finish_reason, and usage's counts (None when absent)."""
    try:
        choice = reply["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("the reply has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is {type(content).__name__}, expected text")
    usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}

    def count(key: str) -> int | None:
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return {"output": content.strip(), "finish_reason": finish if isinstance(finish, str) else "stop",
            "prompt_tokens": count("prompt_tokens"), "completion_tokens": count("completion_tokens")}


def request_body(arm: EndpointArm, messages: list[dict[str, str]], settings: Any) -> dict[str, Any]:
    """The chat completion request: the evaluation's decoding settings (greedy unless the recipe says)."""
    return {"model": arm.model, "messages": messages, "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed}


def cache_key(arm: EndpointArm, body: dict[str, Any]) -> str:
    text = json.dumps([public_url(arm.base_url.rstrip("/")), body], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_endpoint_arm(arm: EndpointArm, conversations: Sequence[list[dict[str, str]]], settings: Any,
                     cache_path: Path, progress: Callable[[int], Any] | None = None) -> ExternalRun:
    """Every conversation through the endpoint, `arm.concurrency` at a time, cached replies first."""
    from tunelab.eval.graders.judge import JudgeCache

    cache = JudgeCache(cache_path)

    def one(messages: list[dict[str, str]]) -> Answer:
        body = request_body(arm, messages, settings)
        key = cache_key(arm, body)
        made = [0]  # requests this example's call sent (0: the reply came from the cache)

        def call() -> dict[str, Any]:
            try:
                reply, latency, made[0] = post_chat(arm, body)
            except EndpointFailed as err:
                made[0] = err.attempts
                raise
            try:
                fields = read_reply(reply)
            except ValueError as err:
                raise EndpointFailed(f"{public_url(arm.base_url)}: {err}", made[0]) from None
            return {**fields, "latency_ms": latency * 1000}

        try:
            fields = cache.fetch(key, call)
        except EndpointFailed as err:
            answer = Answer(text=None, error=str(err), attempts=made[0])
        else:
            answer = Answer(text=fields["output"], prompt_tokens=fields["prompt_tokens"],
                            completion_tokens=fields["completion_tokens"], latency_s=fields["latency_ms"] / 1000,
                            finish_reason=fields["finish_reason"], attempts=made[0], cached=made[0] == 0)
        if progress is not None:
            progress(1)
        return answer

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=arm.concurrency, thread_name_prefix=f"external-{arm.name}") as pool:
        answers = list(pool.map(one, conversations))
    return ExternalRun(arm, answers, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------- local models and counting


def run_local_arm(arm: LocalArm, conversations: Sequence[list[dict[str, str]]], settings: Any, batch_size: int,
                  progress: Callable[[int], Any] | None = None) -> ExternalRun:
    """The conversations through the generation engine with the arm's model (loaded here, released after)."""
    from tunelab.engine.generate import generate
    from tunelab.models import load_model, load_tokenizer

    model = load_model(arm.model)
    tokenizer = load_tokenizer(arm.model)
    started = time.perf_counter()
    generations = generate(model, tokenizer, conversations, settings, batch_size, progress=progress)
    wall = time.perf_counter() - started
    answers = [Answer(text=g.text, prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                      latency_s=g.latency_s, finish_reason=g.finish_reason) for g in generations]
    return ExternalRun(arm, answers, wall, notes=[f"latency per query = its batch's wall time, batch size {batch_size}"])


def fill_token_counts(run: ExternalRun, conversations: Sequence[list[dict[str, str]]], tokenizer: Any) -> None:
    """Counts the endpoint (or the recorded file) did not give, counted with the run's tokenizer: the
    prompt as its chat template renders it, the output's tokens plus one end-of-turn token."""
    from tunelab.engine.generate import render_prompt

    counted = 0
    for answer, messages in zip(run.answers, conversations, strict=True):
        if answer.text is None:
            continue
        if answer.prompt_tokens is None:
            answer.prompt_tokens = len(render_prompt(tokenizer, messages))
            answer.tokens_counted = True
        if answer.completion_tokens is None:
            answer.completion_tokens = len(tokenizer.encode(answer.text, add_special_tokens=False)) + 1
            answer.tokens_counted = True
        counted += answer.tokens_counted
    if counted:
        run.notes.append(f"token counts of {counted} answer(s) were counted with the run's tokenizer (no `usage` "
                         "given): approximate for a model with another tokenizer")


# ---------------------------------------------------------------------------------------------- scoring records


def answered_indices(run: ExternalRun) -> list[int]:
    return [i for i, a in enumerate(run.answers) if a.text is not None]


def expand(values: Sequence[Any], answered: Sequence[int], n: int) -> list[Any]:
    """Values over the answered examples placed back at their positions among all n (None elsewhere)."""
    full: list[Any] = [None] * n
    for i, value in zip(answered, values, strict=True):
        full[i] = value
    return full


def _percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else 0.0


def arm_record(run: ExternalRun, primary_scores: Sequence[float | None], metric_means: dict[str, float],
               grader_summaries: dict[str, Any] | None, test_ids: Sequence[str], shots_mean: float,
               decoding: dict[str, Any], default_prices: tuple[float, float], seed: int) -> dict[str, Any]:
    """eval/metrics.json arms.<name> of an external arm: the built-in arms' keys, over the examples it
    answered, plus `failures`, `n_scored`, `external` and where its numbers came from."""
    import numpy as np

    from tunelab.eval.metrics import bootstrap_ci

    arm = run.arm
    answered = [run.answers[i] for i in answered_indices(run)]
    scored = [s for s in primary_scores if s is not None]
    price_in, price_out = prices(arm, *default_prices)
    prompt_mean = float(np.mean([a.prompt_tokens or 0 for a in answered])) if answered else 0.0
    completion_mean = float(np.mean([a.completion_tokens or 0 for a in answered])) if answered else 0.0
    latencies_ms = [a.latency_s * 1000 for a in answered]
    measured_latency = not isinstance(arm, RecordedArm) or any(a.latency_s for a in answered)
    completion_total = sum(a.completion_tokens or 0 for a in answered)
    failures = [{"id": test_ids[i], "error": a.error} for i, a in enumerate(run.answers) if a.text is None]
    usd = (prompt_mean * price_in + completion_mean * price_out) / 1e6
    batch = arm.concurrency if isinstance(arm, EndpointArm) else decoding.get("batch_size", 1) if isinstance(arm, LocalArm) else 1
    record: dict[str, Any] = {
        "primary": float(np.mean(scored)) if scored else None,
        "ci95": list(bootstrap_ci(scored, seed=seed)) if scored else None,
        "prompt_tokens_mean": prompt_mean,
        "completion_tokens_mean": completion_mean,
        "latency_ms_p50": _percentile(latencies_ms, 50),
        "latency_ms_p95": _percentile(latencies_ms, 95),
        "batch_size": batch,
        "tokens_per_s": completion_total / run.wall_s if run.wall_s > 0 else 0.0,
        "usd_per_1m_queries": usd * 1e6,
        "model": "external",
        "side": "alternative",  # not fine-tuned here: the prompt-only / alternative side of the decision
        "shots_mean": shots_mean,
        "finish_reasons": {reason: sum(1 for a in answered if a.finish_reason == reason)
                           for reason in sorted({a.finish_reason for a in answered})},
        "decoding": {k: v for k, v in decoding.items() if k != "batch_size"},
        "metrics": metric_means,
        "failures": len(failures),
        "n_scored": len(scored),
        "n_examples": len(run.answers),
        "failed_examples": failures[:5],
        "external": describe(arm),
        "prices": {"usd_per_m_input_tokens": price_in, "usd_per_m_output_tokens": price_out},
        "requests": run.requests,
        "cached": sum(1 for a in answered if a.cached),
        "tokens_counted": sum(1 for a in answered if a.tokens_counted),
        "wall_s": run.wall_s,
        "latency_measured": measured_latency,
        "latency_note": ("per request: the round trip of the request that answered (retry waits not included; a "
                         "cached answer keeps the latency it was measured with); concurrency = batch_size"
                         if isinstance(arm, EndpointArm) else
                         "recorded with the outputs" if measured_latency and isinstance(arm, RecordedArm) else
                         "not measured: recorded outputs without latency_ms" if isinstance(arm, RecordedArm) else
                         "wall time of the query's batch (shared prompt prefix prefilled once)"),
        "notes": list(run.notes),
    }
    if len(scored) < len(run.answers):
        record["notes"].append(f"scored on the {len(scored)} of {len(run.answers)} examples it answered"
                               + (" and the primary grader scored" if len(scored) < len(answered) else "")
                               + f"; {len(failures)} failed (never counted as wrong)")
    if grader_summaries is not None:
        record["graders"] = grader_summaries
    return record


def compare_with_tuned(name: str, per_example: dict[str, Sequence[float | None]], arms: dict[str, dict[str, Any]],
                       tuned_arms: Sequence[str], seed: int) -> dict[str, Any] | None:
    """The best fine-tuned arm against one external arm, paired on the examples both scored: the
    difference with its interval, and the cost and latency ratios (None without a tuned arm)."""
    from tunelab.eval.metrics import paired_comparison

    candidates = [a for a in tuned_arms if a in arms and arms[a]["primary"] is not None]
    if not candidates or arms[name]["primary"] is None:
        return None
    best = max(candidates, key=lambda a: (arms[a]["primary"], -candidates.index(a)))
    both = [i for i, (t, e) in enumerate(zip(per_example[best], per_example[name], strict=True))
            if t is not None and e is not None]
    comparison = paired_comparison([per_example[best][i] for i in both], [per_example[name][i] for i in both], seed=seed)
    points, (lo, hi) = comparison.delta * 100, (comparison.ci95[0] * 100, comparison.ci95[1] * 100)
    cost_ratio = (arms[best]["usd_per_1m_queries"] / arms[name]["usd_per_1m_queries"]
                  if arms[name]["usd_per_1m_queries"] > 0 else None)
    latency_ratio = (arms[name]["latency_ms_p50"] / arms[best]["latency_ms_p50"]
                     if arms[best]["latency_ms_p50"] > 0 and arms[name]["latency_ms_p50"] > 0 else None)
    n = len(per_example[name])
    text = (f"{best} vs {name}: {points:+.1f} points, 95% CI [{lo:+.1f}, {hi:+.1f}], p = {comparison.p_value:.4f}, "
            f"on the {len(both)} of {n} examples both scored")
    if cost_ratio is not None:
        text += (f"; {best} costs 1/{1 / cost_ratio:.3g} as much per query" if 0 < cost_ratio < 1
                 else f"; {best} costs {cost_ratio:.3g}x as much per query")
    if latency_ratio is not None:
        text += (f", at {latency_ratio:.3g}x lower p50 latency" if latency_ratio >= 1
                 else f", at {1 / latency_ratio:.3g}x higher p50 latency")
    return {"arm": best, "delta": comparison.delta, "ci95": list(comparison.ci95), "p_value": comparison.p_value,
            "n": len(both), "significant": comparison.significant, "cost_ratio": cost_ratio,
            "latency_ratio": latency_ratio, "text": text}
