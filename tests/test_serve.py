"""The OpenAI-compatible server on 127.0.0.1 (random free port, uvicorn in a thread, tiny-test model):
the official `openai` client gets answers, streaming and not; malformed requests get their 4xx with an
OpenAI error body and the server keeps serving; the API key is enforced and never logged; concurrent
requests are batched; retrieval prepends what the evaluation's tuned+rag arm would."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from test_export import make_fake_run

KEY = "test-key-5b1f"
CONTEXT_TOKENS = 256  # the test shrinks the model's context so that "too long" stays cheap
MAX_TOKENS_LIMIT = 64


@contextmanager
def running(app):
    import uvicorn

    from tunelab.use.serve import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    run = make_fake_run(tmp_path_factory.mktemp("runs") / "x")
    (run / "data").mkdir()
    train = [
        ("Convert 3 May 2021 to ISO.", "2021-05-03"),
        ("Convert 14 July 1999 to ISO.", "1999-07-14"),
        ("What colour is the sky?", "Blue."),
        ("Name a prime number.", "7"),
    ]
    with (run / "data" / "train.jsonl").open("w") as f:
        for i, (user, answer) in enumerate(train):
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"id": f"train-{i:06d}", "source": f"t.jsonl:{i + 1}", "messages": messages}) + "\n")
    return run


@pytest.fixture(scope="module")
def loaded(run_dir):
    from tunelab.use.chat import load_for_use

    model = load_for_use(str(run_dir), device="cpu", dtype="float32")
    model.max_context_tokens = CONTEXT_TOKENS
    return model


@pytest.fixture(scope="module")
def server(loaded):
    from tunelab.use.serve import ServeSettings, create_app

    settings = ServeSettings(max_tokens_limit=MAX_TOKENS_LIMIT, batch_window_ms=200, max_body_bytes=64 * 1024)
    app = create_app(loaded, settings, api_key=KEY)
    with running(app) as url:
        yield url, app


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def expected(loaded, messages, max_new_tokens):
    from tunelab.engine.generate import DecodingSettings, generate

    [result] = generate(loaded.model, loaded.tokenizer, [messages], DecodingSettings(max_new_tokens=max_new_tokens))
    return result


def test_openai_client_lists_the_model_and_gets_an_answer(client, loaded):
    assert [m.id for m in client.models.list().data] == ["x"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    response = client.chat.completions.create(model="x", messages=messages, max_tokens=10)
    want = expected(loaded, messages, 10)
    assert response.object == "chat.completion" and response.model == "x"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == want.text
    assert response.choices[0].finish_reason == want.finish_reason
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (want.prompt_tokens,
                                                                                 want.completion_tokens)
    assert response.usage.total_tokens == want.prompt_tokens + want.completion_tokens


def test_openai_client_streams_the_same_answer(client, loaded):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    want = expected(loaded, messages, 10)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2 and "".join(content) == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    assert [json.loads(e[6:])["object"] for e in events[:-1]] == ["chat.completion.chunk"] * (len(events) - 1)


def test_stop_strings_cut_the_answer_streaming_and_not(client, loaded):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = expected(loaded, messages, 10).text
    assert len(full) > 6
    stop = full[3:6]
    head = full[: full.index(stop)]
    response = client.chat.completions.create(model="x", messages=messages, max_tokens=10, stop=[stop, "@@@"])
    assert response.choices[0].message.content == head and response.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=10, stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == head
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_scanner_never_emits_a_stop_string_split_across_pieces():
    from tunelab.use.serve import StopScanner

    scanner = StopScanner(["END", "xyz"])
    out = []
    for piece in ["ab", "cE", "N", "x", "D tail"]:
        text, hit = scanner.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "abcENxD tail" and not hit
    scanner = StopScanner(["END"])
    emitted = [scanner.feed(p) for p in ["abcE", "N", "Dzzz"]]
    assert emitted == [("abc", False), ("", False), ("", True)]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client, loaded, server):
    engine = server[1].state.engine
    before = engine.largest_batch
    prompts = [f"Question number {i}: what comes after {i}?" for i in range(6)]

    def ask(prompt):
        messages = [{"role": "user", "content": prompt}]
        return client.chat.completions.create(model="x", messages=messages, max_tokens=8).choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert engine.largest_batch > max(before, 1)
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer == expected(loaded, [{"role": "user", "content": prompt}], 8).text


def test_concurrent_streams_are_batched_and_each_streams_its_own_answer(client, loaded, server):
    engine = server[1].state.engine
    prompts = [f"Tell me about the number {i}." for i in range(4)]

    def ask(prompt):
        stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert engine.largest_stream_batch > 1
    for prompt, (text, completion_tokens) in zip(prompts, answers, strict=True):
        want = expected(loaded, [{"role": "user", "content": prompt}], 8)
        assert (text, completion_tokens) == (want.text, want.completion_tokens)


MALFORMED = [
    # (name, raw body or JSON, expected status, expected param, expected code)
    ("not json", b"{not json", 400, None, None),
    ("body is a list", [1, 2], 400, None, None),
    ("no messages", {"model": "x"}, 400, "messages", "missing_required_parameter"),
    ("no model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "missing_required_parameter"),
    ("empty messages", {"model": "x", "messages": []}, 400, "messages", "invalid_value"),
    ("messages not a list", {"model": "x", "messages": "hi"}, 400, "messages", "invalid_value"),
    ("unknown role", {"model": "x", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role",
     "invalid_value"),
    ("content a number", {"model": "x", "messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content",
     "invalid_value"),
    ("max_tokens a string", {"max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ("max_tokens zero", {"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("temperature too high", {"temperature": 5}, 400, "temperature", "invalid_value"),
    ("stream not a bool", {"stream": "yes"}, 400, "stream", "invalid_value"),
    ("unknown model", {"model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("n > 1", {"n": 2}, 400, "n", "unsupported_parameter"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter"),
    ("too many tokens asked", {"max_tokens": MAX_TOKENS_LIMIT + 1}, 400, "max_tokens", "invalid_value"),
    ("prompt longer than the context", {"messages": [{"role": "user", "content": "word " * 400}]}, 400,
     "messages", "context_length_exceeded"),
    ("prompt + completion over the context", {"messages": [{"role": "user", "content": "word " * 200}],
                                              "max_tokens": MAX_TOKENS_LIMIT}, 400, "messages",
     "context_length_exceeded"),
    ("body too large", {"messages": [{"role": "user", "content": "x" * 70000}]}, 413, None, "request_too_large"),
]


@pytest.mark.parametrize("name,body,status,param,code", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_gets_its_4xx_and_the_server_keeps_serving(server, name, body, status, param, code):
    url = server[0] + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if isinstance(body, dict) and name not in ("no messages", "no model", "empty messages", "messages not a list",
                                               "unknown role", "content a number"):
        body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], **body}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url, content=raw, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    valid = {"model": "x", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2}
    after = httpx.post(url, json=valid, headers=headers, timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["role"] == "assistant"


def test_unknown_routes_and_methods_get_openai_errors(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    missing = httpx.get(server[0] + "/v1/nothing", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(server[0] + "/v1/chat/completions", headers=headers)
    assert wrong.status_code == 405 and "error" in wrong.json()
    assert httpx.get(server[0] + "/v1/models/x", headers=headers).json()["id"] == "x"
    assert httpx.get(server[0] + "/v1/models/y", headers=headers).status_code == 404


def test_requests_without_the_key_get_401(server):
    from openai import AuthenticationError, OpenAI

    url = server[0]
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}):
        for response in (httpx.post(url + "/v1/chat/completions", json=body, headers=headers),
                         httpx.get(url + "/v1/models", headers=headers)):
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert KEY not in response.text
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/health").json() == {"status": "ok", "model": "x"}  # probes need no key


def test_a_client_that_disconnects_mid_stream_does_not_stop_the_server(server):
    url = server[0] + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "x", "messages": [{"role": "user", "content": "long story"}], "max_tokens": 60, "stream": True}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    valid = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url, json=valid, headers=headers, timeout=60).status_code == 200


def test_rag_over_the_train_split_prepends_what_the_tuned_rag_arm_would(loaded):
    pytest.importorskip("tunelab.eval.retrieval")
    from tunelab.engine.generate import render_prompt
    from tunelab.eval.arms import EvalExample, PromptBuilder, build_pool, to_eval_example
    from tunelab.use.serve import ServeSettings, build_retriever, create_app

    augment = build_retriever("train", loaded, k=2)
    query = [{"role": "user", "content": "Convert 9 June 2020 to ISO."}]
    messages = augment(query)
    assert messages[-1] == query[-1]
    prior = [m["content"] for m in messages[:-1]]
    assert "2021-05-03" in prior and "1999-07-14" in prior and "Blue." not in prior  # the two date examples
    rows = [json.loads(line) for line in (loaded.run_dir / "data" / "train.jsonl").read_text().splitlines()]
    builder = PromptBuilder(build_pool([to_eval_example(r, r["id"]) for r in rows], []), "", 0, 2, 0)
    assert messages == builder.build("tuned+rag", EvalExample("q", "q", tuple(query), ""))

    app = create_app(loaded, ServeSettings(), retriever=augment)
    with running(app) as url:
        response = httpx.post(url + "/v1/chat/completions", timeout=60,
                              json={"model": "x", "messages": query, "max_tokens": 4})
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == len(render_prompt(loaded.tokenizer, messages))
    assert response.json()["choices"][0]["message"]["content"] == expected(loaded, messages, 4).text


def test_rag_over_a_document_folder_puts_the_best_chunk_in_the_system_message(loaded, tmp_path):
    pytest.importorskip("tunelab.eval.retrieval")
    from tunelab.use.serve import build_retriever

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "zebras.md").write_text("Zebras are striped horses that live in Africa. The quagga was a zebra.")
    (docs / "rust.txt").write_text("Rust has ownership and borrowing; the borrow checker enforces lifetimes.")
    messages = build_retriever(str(docs), loaded, k=1)([{"role": "user", "content": "Where do zebras live?"}])
    assert messages[0]["role"] == "system" and "Zebras are striped" in messages[0]["content"]
    assert "borrow" not in messages[0]["content"] and messages[-1]["content"] == "Where do zebras live?"


def test_serve_command_binds_loopback_takes_the_key_from_the_environment_and_logs_no_secrets(run_dir):
    env = {**os.environ, "TUNELAB_API_KEY": KEY, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(run_dir), "--port", "0"],
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not any("serving" in line for line in lines):
            line = process.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", lines[-1])
        assert match and "API key required" in lines[-1]
        url = f"http://127.0.0.1:{match.group(1)}"
        secret_prompt = "zebra-secret-prompt-text"
        body = {"model": "x", "messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 3}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        ok = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=60)
        assert ok.status_code == 200
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    log = "".join(lines) + err
    assert "chat.completion" in log  # it does log requests ...
    assert KEY not in log and secret_prompt not in log  # ... but never the key or the prompt


def test_a_failed_generation_is_a_500_and_the_next_request_is_served(server, monkeypatch):
    import tunelab.engine.generate as generation

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    url = server[0] + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    monkeypatch.setattr(generation, "generate", broken)
    monkeypatch.setattr(generation, "stream_generate_batch", broken)
    failed = httpx.post(url, json=body, headers=headers, timeout=60)
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers, timeout=60) as response:
        events = [line for line in response.iter_lines() if line]
    assert "error" in json.loads(events[-1][6:]) and "data: [DONE]" not in events
    monkeypatch.undo()
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    assert httpx.post(url, json=body, headers=headers, timeout=60).status_code == 200
