"""A judge endpoint that misbehaves: a redirect (to another origin, or the same) is never followed, so the
API key never goes where the reply points; a reply over the size limit is not read further; JSON nested
past the parser's limit, in the body or in the reply text, fails that example in one line (never a
RecursionError); the judge cache survives a planted deep line."""

from __future__ import annotations

import json
from contextlib import ExitStack
from http.server import ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from stand_in import QuietHandler, base_url, serving
from tunelab.eval.graders import judge
from tunelab.eval.graders.judge import JudgeCache, JudgeFailed, chat_reply, post_json, read_score

KEY = "sk-users-own-key"


class Recorder(ThreadingHTTPServer):
    """Answers POSTs by `behaviour(handler)`; records each request's path and Authorization header."""

    def __init__(self, behaviour) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour = behaviour
        self.seen: list[tuple[str, str | None]] = []

    @property
    def base_url(self) -> str:
        return base_url(self)


class _Handler(QuietHandler):
    server: Recorder

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        self.server.behaviour(self)

    do_GET = do_POST


def answer(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"content": content}}]}).encode()


@pytest.fixture
def serve():
    with ExitStack() as running:
        yield lambda behaviour: running.enter_context(serving(Recorder(behaviour)))


def endpoint(base_url: str) -> SimpleNamespace:
    return SimpleNamespace(base_url=base_url, key_env="JUDGE_KEY", max_retries=2, timeout_s=10.0)


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    monkeypatch.setattr(judge, "RETRY_FIRST_WAIT_S", 0.0)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("where", ["other-origin", "same-origin"])
def test_a_redirect_is_never_followed_so_the_key_stays_where_the_recipe_sent_it(serve, status, where):
    elsewhere = serve(lambda h: h.reply(200, answer('{"result": 1.0}')))
    target = elsewhere.base_url if where == "other-origin" else None

    def redirect(h):
        location = (target or redirecting.base_url) + "/elsewhere"
        h.reply(status, b"", {"Location": location})

    redirecting = serve(redirect)
    with pytest.raises(JudgeFailed) as failed:
        chat_reply(endpoint(redirecting.base_url), "m", [{"role": "user", "content": "x"}], {}, JudgeCache(None))
    message = str(failed.value)
    assert message.startswith(f"HTTP {status} from {redirecting.base_url}/chat/completions: redirected to ")
    assert "not followed" in message and "(after 1 attempt(s))" in message and "\n" not in message
    assert elsewhere.seen == []  # the key went nowhere else
    assert redirecting.seen == [("/v1/chat/completions", f"Bearer {KEY}")]  # asked once: a redirect is not retried


def test_a_reply_over_the_limit_is_not_read_whole(serve, monkeypatch):
    monkeypatch.setattr(judge, "MAX_REPLY_BYTES", 4096)
    sent = []

    def endless(h):  # no Content-Length: writes until the client goes away
        h.send_response(200)
        h.end_headers()
        try:
            for _ in range(10_000):
                h.wfile.write(b" " * 4096)
                sent.append(4096)
        except OSError:
            pass

    with pytest.raises(JudgeFailed, match=r"the reply is over the 0 MiB limit"):
        post_json(endpoint(serve(endless).base_url), "/chat/completions", {})
    announced = serve(lambda h: h.reply(200, b"{}", {"Content-Length": str(200 * 2**20)}))
    with pytest.raises(JudgeFailed, match=r"the reply is 209715200 bytes, over the"):
        post_json(endpoint(announced.base_url), "/chat/completions", {})


def test_the_limit_is_8_mib():
    assert judge.MAX_REPLY_BYTES == 8 * 2**20


def test_json_nested_too_deeply_fails_the_example_in_one_line(serve):
    deep = serve(lambda h: h.reply(200, b"[" * 200_000 + b"]" * 200_000))
    with pytest.raises(JudgeFailed) as failed:
        post_json(endpoint(deep.base_url), "/chat/completions", {})
    assert str(failed.value) == f"{deep.base_url}/chat/completions: the answer is JSON nested too deeply"
    # the judge's reply text itself nested: no score found, never a RecursionError
    for text in ("[" * 200_000 + "]" * 200_000, '{"a": ' * 100_000 + '"x"' + "}" * 100_000, "{" * 10**6):
        with pytest.raises(JudgeFailed, match="holds no score"):
            read_score(text, 0.0, 1.0)
    assert read_score('noise {{ {"result": 0.25} }}', 0.0, 1.0) == 0.25


def test_a_planted_deep_line_in_the_judge_cache_is_skipped(tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    cache.write_text("[" * 200_000 + "]" * 200_000 + "\n" + json.dumps({"key": "k", "reply": "0.5"}) + "\n")
    assert JudgeCache(cache).replies == {"k": "0.5"}


def test_an_embedding_that_is_not_finite_fails_the_example(serve):
    from tunelab.eval.graders.judge import embedding

    bad = serve(lambda h: h.reply(200, b'{"data": [{"embedding": [0.5, NaN, Infinity]}]}'))
    with pytest.raises(JudgeFailed, match="the embedding holds a value that is not finite"):
        embedding(endpoint(bad.base_url), "e", "text", JudgeCache(None))
