"""The server under hostile requests: numbers out of range or not finite are 400 (never 500),
prompts too long for the context are refused with a non-negative completion budget in the message,
huge prompts are refused before tokenizing, and tokenizing happens off the event loop."""

import json
import re
import threading

import pytest
from fastapi.testclient import TestClient

from test_export import make_fake_run

CONTEXT_TOKENS = 256


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tiny_model_dir):
    from tunelab.use.chat import load_for_use

    model = load_for_use(str(make_fake_run(tmp_path_factory.mktemp("runs") / "x")), device="cpu", dtype="float32")
    model.max_context_tokens = CONTEXT_TOKENS
    return model


@pytest.fixture(scope="module")
def tokenizing_threads():
    return []


@pytest.fixture(scope="module")
def client(loaded, tokenizing_threads):
    import tunelab.engine.generate as generate
    from tunelab.use.serve import ServeSettings, create_app

    render = generate.render_prompt

    def recording_render(tokenizer, messages):
        tokenizing_threads.append(threading.current_thread().name)
        return render(tokenizer, messages)

    mp = pytest.MonkeyPatch()
    mp.setattr(generate, "render_prompt", recording_render)
    app = create_app(loaded, ServeSettings(max_tokens_limit=32, batch_window_ms=0))
    mp.undo()
    with TestClient(app) as test_client:
        yield test_client


def ask(client, **fields):
    body = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
    return client.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 1e-45}, "temperature"), ({"seed": 2**70}, "seed"), ({"seed": -(2**64)}, "seed"),
    ({"top_p": 0}, "top_p"), ({"max_tokens": 10**30}, "max_tokens"), ({"stop": "x" * 1000}, "stop"),
])
def test_out_of_range_numbers_and_options_are_400_naming_the_field(client, fields, param):
    response = ask(client, **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_400(client, literal):
    body = '{"model": "x", "messages": [{"role": "user", "content": "Hi"}], "temperature": ' + literal + "}"
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "temperature" in response.json()["error"]["message"]


def test_edge_values_in_range_are_answered(client):
    response = ask(client, temperature=0.001, seed=2**64 - 1, top_p=1e-9)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_a_huge_prompt_is_refused_before_tokenizing(client, tokenizing_threads):
    before = len(tokenizing_threads)
    response = ask(client, messages=[{"role": "user", "content": "word " * 200_000}])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert len(tokenizing_threads) == before


@pytest.mark.parametrize("max_tokens", [None, 8])
def test_a_prompt_over_the_context_never_shows_a_negative_completion_budget(client, max_tokens):
    fields = {"max_tokens": max_tokens} if max_tokens else {}
    response = ask(client, messages=[{"role": "user", "content": "word " * 400}], **fields)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert not any(int(n) < 0 for n in re.findall(r"-?\d+", message)), message


def test_tokenizing_runs_in_a_worker_thread_not_on_the_event_loop(client, tokenizing_threads):
    assert ask(client).status_code == 200
    assert tokenizing_threads and all(name.startswith("tunelab-prepare") for name in tokenizing_threads)
    assert json.loads(client.get("/health").text)["status"] == "ok"


def test_a_full_server_answers_429_before_reading_the_body(loaded):
    from tunelab.use.serve import ServeSettings, create_app

    with TestClient(create_app(loaded, ServeSettings(max_queued_requests=0))) as full:
        response = full.post("/v1/chat/completions", content=b"not even json")
    assert response.status_code == 429 and response.json()["error"]["code"] == "server_busy"
