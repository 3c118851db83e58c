"""External arms (eval.external) offline: a stand-in OpenAI-compatible server on 127.0.0.1 that answers
429 with Retry-After, 500s, slow replies and replies without `usage`; `tunelab serve` of the tiny model;
a local model through the generation engine; recorded outputs. Scores, token counts, retries and
failures are exact; a second evaluation sends no request for a cached reply; the API key is in no file
of the run; recorded outputs with a missing or extra id stop the evaluation before it generates."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from stand_in import QuietHandler, base_url, serving
from test_eval_run import build_fake_run
from tunelab.errors import ConfigError, DataError

KEY = "sk-test-7f3e9a41c2"
TICKET = re.compile(r"Ticket (\d+): I flew to (\w+)")


class StandIn(ThreadingHTTPServer):
    """Answers {"city": <the city of the ticket>} (ticket 105: a wrong city), after a scripted misbehaviour
    per ticket: 100 -> one 429 with Retry-After: 1; 101 -> two 500s; 102 -> always 500; 103 -> one reply
    slower than the client's timeout; 104 -> no `usage`. Records every request (ticket, time, auth)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.delay_s = 0.0  # added to every reply (the bench's server time)

    @property
    def base_url(self) -> str:
        return base_url(self)

    def count(self, ticket: int) -> int:
        return sum(1 for r in self.requests if r["ticket"] == ticket)


class _Handler(QuietHandler):
    server: StandIn

    def do_POST(self) -> None:
        body = self.read_json()
        number, city = TICKET.search(body["messages"][-1]["content"]).groups()
        ticket = int(number)
        with self.server.lock:
            seen = self.server.count(ticket)
            self.server.requests.append({"ticket": ticket, "t": time.monotonic(), "body": body,
                                         "auth": self.headers.get("Authorization")})
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        if ticket == 100 and seen == 0:
            return self.reply_json(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
        if (ticket == 101 and seen < 2) or ticket == 102:
            return self.reply_json(500, {"error": {"message": "boom"}})
        if ticket == 103 and seen == 0:
            time.sleep(1.5)  # past the client's timeout_s
        answer = json.dumps({"city": "Nowhere" if ticket == 105 else city})
        reply = {"choices": [{"message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]}
        if ticket != 104:
            reply["usage"] = {"prompt_tokens": 50 + ticket - 100, "completion_tokens": 7}
        self.reply_json(200, reply)


@pytest.fixture
def stand_in():
    with serving(StandIn()) as server:
        yield server


@pytest.fixture(scope="module")
def fake_run_template(tmp_path_factory, tiny_model_dir):
    from tunelab.models import load_model

    return build_fake_run(tmp_path_factory.mktemp("template") / "fake", load_model("tiny-test", device="cpu"))


def _run_with(template: Path, tmp_path: Path, external: list[dict], arms=("tuned",)) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(template, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["eval"].update(arms=list(arms), forgetting=False, external=external)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def _endpoint(server: StandIn, **extra) -> dict:
    return {"name": "hosted", "base_url": server.base_url, "model": "gpt-test", "api_key_env": "STANDIN_KEY",
            "prompt": "short", "price_per_m_input_tokens": 0.4, "price_per_m_output_tokens": 1.6,
            "concurrency": 3, "timeout_s": 0.75, "max_retries": 2, **extra}


def _rows(run: Path, arm: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    return [r for r in rows if r["arm"] == arm]


# ---------------------------------------------------------------------------------------------- endpoint arms


def test_endpoint_arm_retries_counts_failures_and_tokens_exactly(fake_run_template, tmp_path, stand_in,
                                                                  monkeypatch, tokenizer):
    from tunelab.engine.generate import render_prompt
    from tunelab.eval import external as ext
    from tunelab.eval.run import evaluate, read_examples

    monkeypatch.setattr(ext, "RETRY_FIRST_WAIT_S", 0.01)
    monkeypatch.setenv("STANDIN_KEY", KEY)
    run = _run_with(fake_run_template, tmp_path, [_endpoint(stand_in)])
    metrics = evaluate(run, echo=False, python_graders=True)  # this test's own recipe: its key may be sent
    arm = metrics["arms"]["hosted"]

    # attempts: 429 then ok; 500, 500, ok; 500 x 3 (max_retries 2) -> failed; timeout then ok; ok; ok
    assert {t: stand_in.count(t) for t in range(100, 106)} == {100: 2, 101: 3, 102: 3, 103: 2, 104: 1, 105: 1}
    assert arm["requests"] == 12 and arm["cached"] == 0
    assert all(r["auth"] == f"Bearer {KEY}" for r in stand_in.requests)
    first, second = [r["t"] for r in stand_in.requests if r["ticket"] == 100]
    assert second - first >= 0.95  # Retry-After: 1 honoured (the backoff alone would wait 0.01 s)

    # the failed example is neither wrong nor dropped: the arm is scored on the five it answered
    assert arm["failures"] == 1 and arm["n_scored"] == 5 and arm["n_examples"] == 6
    assert arm["primary"] == pytest.approx(4 / 5) and arm["metrics"]["json_exact"] == pytest.approx(4 / 5)
    assert arm["failed_examples"][0]["id"] == "test-000102" and "HTTP 500" in arm["failed_examples"][0]["error"]
    assert arm["external"] == {"kind": "endpoint", "model": "gpt-test", "base_url": stand_in.base_url, "prompt": "short"}
    assert arm["model"] == "external" and arm["side"] == "alternative"

    # tokens: usage where given, else counted with the run's tokenizer (104), and said so
    test = read_examples(run / "data" / "test.jsonl")
    counted_prompt = len(render_prompt(tokenizer, list(test[4].context)))
    counted_completion = len(tokenizer.encode(test[4].reference, add_special_tokens=False)) + 1  # the stand-in's answer
    assert arm["tokens_counted"] == 1
    assert arm["prompt_tokens_mean"] == pytest.approx((50 + 51 + 53 + 55 + counted_prompt) / 5)
    assert arm["completion_tokens_mean"] == pytest.approx((7 * 4 + counted_completion) / 5)
    assert arm["usd_per_1m_queries"] == pytest.approx(arm["prompt_tokens_mean"] * 0.4 + arm["completion_tokens_mean"] * 1.6)
    assert metrics["cost"]["per_arm"]["hosted"]["usd_per_1m_queries"] == pytest.approx(arm["usd_per_1m_queries"])
    assert "tuned vs hosted" in metrics["cost"]["break_even"]
    assert arm["vs_tuned"]["arm"] == "tuned" and arm["vs_tuned"]["n"] == 5

    rows = _rows(run, "hosted")
    assert [r["id"] for r in rows] == [ex.id for ex in test]
    failed = rows[2]
    assert failed["output"] is None and failed["score"] is None and failed["finish_reason"] == "failed"
    assert [r["score"] for r in rows] == [1.0, 1.0, None, 1.0, 1.0, 0.0]
    assert rows[4]["tokens_counted"] is True and rows[4]["prompt_tokens"] == counted_prompt
    assert rows[0]["prompt_tokens"] == 50 and rows[0]["completion_tokens"] == 7
    # the request carried the evaluation's decoding settings and the example's own messages (prompt: short)
    sent = next(r["body"] for r in stand_in.requests if r["ticket"] == 104)
    assert sent == {"model": "gpt-test", "messages": [dict(m) for m in test[4].context], "max_tokens": 5,
                    "temperature": 0.0, "top_p": 1.0, "seed": 0}

    # the key is in no file of the run
    for path in run.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path

    # a second evaluation sends only the failed example's requests again: every reply is cached
    before = len(stand_in.requests)
    again = evaluate(run, echo=False, python_graders=True)["arms"]["hosted"]
    assert [r["ticket"] for r in stand_in.requests[before:]] == [102, 102, 102]
    assert again["cached"] == 5 and again["requests"] == 3
    assert again["primary"] == arm["primary"] and again["prompt_tokens_mean"] == arm["prompt_tokens_mean"]
    assert again["latency_ms_p50"] == pytest.approx(arm["latency_ms_p50"])  # measured latency kept in the cache


def test_a_missing_key_variable_stops_the_evaluation_before_it_generates(fake_run_template, tmp_path, stand_in,
                                                                         monkeypatch):
    from tunelab.eval import run as run_module

    monkeypatch.delenv("STANDIN_KEY", raising=False)
    monkeypatch.setattr(run_module, "generate", lambda *a, **k: pytest.fail("generated before the check"))
    run = _run_with(fake_run_template, tmp_path, [_endpoint(stand_in)])
    with pytest.raises(ConfigError, match="environment variable STANDIN_KEY .* not set"):
        run_module.evaluate(run, echo=False, python_graders=True)
    assert stand_in.requests == []


def test_a_run_folders_endpoint_gets_a_key_from_the_environment_only_with_consent(fake_run_template, tmp_path,
                                                                                  stand_in, monkeypatch):
    """`tunelab eval RUN` of someone else's run folder: its recipe could send MY key anywhere."""
    from typer.testing import CliRunner

    from tunelab.cli import app

    monkeypatch.setenv("STANDIN_KEY", KEY)
    run = _run_with(fake_run_template, tmp_path, [_endpoint(stand_in)])
    result = CliRunner().invoke(app, ["eval", str(run)])
    assert isinstance(result.exception, ConfigError) and stand_in.requests == []
    message = str(result.exception)
    assert f"eval.external 'hosted' would send the API key in $STANDIN_KEY to {stand_in.base_url}" in message
    assert "--trust-remote-code" in message and KEY not in message


def _answering(status: int, headers: dict, body: bytes = b"{}") -> ThreadingHTTPServer:
    """A server that answers every POST with this reply and records the Authorization header it got."""
    class Once(QuietHandler):
        def do_POST(self) -> None:
            self.server.hits.append(self.headers.get("Authorization"))
            self.reply(status, body, headers)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Once)
    server.hits = []
    return server


def test_a_redirect_is_refused_and_the_key_never_reaches_the_other_location(tmp_path, monkeypatch):
    from tunelab.config import EndpointArm
    from tunelab.engine.generate import DecodingSettings
    from tunelab.eval.external import run_endpoint_arm

    monkeypatch.setenv("STANDIN_KEY", KEY)
    with (serving(_answering(200, {}, b'{"choices": [{"message": {"content": "stolen"}}]}')) as elsewhere,
          serving(_answering(307, {"Location": f"{base_url(elsewhere)}/chat/completions"})) as redirecting):
        arm = EndpointArm(name="h", base_url=base_url(redirecting), model="m",
                          api_key_env="STANDIN_KEY", price_per_m_input_tokens=0, price_per_m_output_tokens=0)
        result = run_endpoint_arm(arm, [[{"role": "user", "content": "hi"}]], DecodingSettings(), tmp_path / "c.jsonl")
    [answer] = result.answers
    assert answer.text is None and "redirect, refused" in answer.error and answer.attempts == 1
    assert redirecting.hits == [f"Bearer {KEY}"] and elsewhere.hits == []
    assert not (tmp_path / "c.jsonl").exists()  # failures are not cached


@pytest.mark.parametrize("body, problem", [
    (b"x" * 5000, "larger than"),
    (b"[1, 2]", "not a JSON object"),
    (b"<html>", "not JSON"),
    (b"[" * 2000 + b"]" * 2000, "nested too deeply"),
    (b'{"choices": []}', "no choices[0].message.content"),
    (b'{"choices": [{"message": {"content": null}}]}', "NoneType, expected text"),
])
def test_a_broken_reply_fails_that_example_with_its_reason(tmp_path, monkeypatch, body, problem):
    from tunelab.config import EndpointArm
    from tunelab.engine.generate import DecodingSettings
    from tunelab.eval import external as ext

    monkeypatch.setattr(ext, "MAX_REPLY_BYTES", 4096)
    with serving(_answering(200, {"Content-Type": "application/json"}, body)) as server:
        arm = EndpointArm(name="h", base_url=base_url(server), model="m",
                          price_per_m_input_tokens=0, price_per_m_output_tokens=0)
        [answer] = ext.run_endpoint_arm(arm, [[{"role": "user", "content": "hi"}]], DecodingSettings(),
                                        tmp_path / "c.jsonl").answers
    assert answer.text is None and problem in answer.error and len(server.hits) == 1  # not retried


def test_retry_after_reads_seconds_and_dates_and_is_capped():
    from email.utils import formatdate

    from tunelab.eval.external import RETRY_AFTER_MAX_S, retry_after_s

    assert retry_after_s("2") == 2.0 and retry_after_s("0") == 0.0 and retry_after_s(None) is None
    assert retry_after_s("soon") is None and retry_after_s("nan") is None
    assert retry_after_s("86400") == RETRY_AFTER_MAX_S
    assert 8 <= retry_after_s(formatdate(time.time() + 10, usegmt=True)) <= 10
    assert retry_after_s(formatdate(time.time() - 100, usegmt=True)) == 0.0


def test_the_recorded_base_url_drops_credentials_and_query():
    from tunelab.eval.external import public_url

    assert public_url("https://user:pw@api.example.com:8443/v1?key=abc") == "https://api.example.com:8443/v1"
    assert public_url("http://[::1]:9/v1") == "http://[::1]:9/v1"


# ---------------------------------------------------------------------------------------------- tunelab serve and local models


def test_an_endpoint_arm_against_tunelab_serve_answers_like_the_base_arm(fake_run_template, tmp_path):
    """The offline example of docs/evaluation.md: `tunelab serve` of the base model stands in for a hosted
    endpoint; with the base arm's prompt (short) and greedy decoding it gives the base arm's answers and
    token counts, and a local arm of the same model gives them too."""
    from test_serve import running
    from tunelab.eval.run import evaluate
    from tunelab.use.chat import load_for_use
    from tunelab.use.serve import ServeSettings, create_app

    loaded = load_for_use("tiny-test", device="cpu", dtype="float32")
    with running(create_app(loaded, ServeSettings(batch_window_ms=0, max_batch_size=1))) as url:
        run = _run_with(fake_run_template, tmp_path, [
            {"name": "served", "base_url": url + "/v1", "model": "tiny-test", "prompt": "short",
             "price_per_m_input_tokens": 0, "price_per_m_output_tokens": 0, "concurrency": 2},
            {"name": "local", "model": "tiny-test", "prompt": "short"},
        ], arms=("base",))
        metrics = evaluate(run, echo=False)
    base, served, local = _rows(run, "base"), _rows(run, "served"), _rows(run, "local")
    assert [r["output"] for r in local] == [r["output"] for r in base]
    assert [r["prompt_tokens"] for r in served] == [r["prompt_tokens"] for r in base]
    assert [r["output"] for r in served] == [r["output"] for r in base]
    assert [r["completion_tokens"] for r in served] == [r["completion_tokens"] for r in base]
    assert metrics["arms"]["served"]["primary"] == metrics["arms"]["base"]["primary"]
    assert metrics["arms"]["served"]["tokens_counted"] == 0 and metrics["arms"]["served"]["failures"] == 0
    assert metrics["arms"]["local"]["external"] == {"kind": "local", "model": "tiny-test", "prompt": "short"}
    # the local arm is priced at the recipe's serving prices
    cfg = yaml.safe_load((run / "recipe.yaml").read_text())["eval"]
    local_arm = metrics["arms"]["local"]
    assert local_arm["usd_per_1m_queries"] == pytest.approx(local_arm["prompt_tokens_mean"] * cfg["price_per_m_input_tokens"]
                                                            + local_arm["completion_tokens_mean"] * cfg["price_per_m_output_tokens"])


# ---------------------------------------------------------------------------------------------- recorded outputs


def _test_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]


def test_recorded_outputs_are_matched_by_id_or_line_and_a_null_output_is_a_failure(fake_run_template, tmp_path):
    from tunelab.eval.run import evaluate

    test = _test_rows(fake_run_template)
    answers = [t["messages"][-1]["content"] for t in test]
    answers[1] = '{"city": "Atlantis"}'
    by_id = tmp_path / "by_id.jsonl"
    order = [3, 0, 5, 1, 4, 2]
    by_id.write_text("".join(json.dumps({"id": test[i]["id"], "output": answers[i] if i != 4 else None,
                                         "latency_ms": 100 + i}) + "\n" for i in order))
    by_line = tmp_path / "by_line.jsonl"
    by_line.write_text("".join(json.dumps({"line": i + 1, "output": answers[i]}) + "\n" for i in reversed(range(6))))
    run = _run_with(fake_run_template, tmp_path, [{"name": "prod", "predictions": str(by_id)},
                                                  {"name": "prod-lines", "predictions": str(by_line)}])
    metrics = evaluate(run, echo=False)
    prod, lines = metrics["arms"]["prod"], metrics["arms"]["prod-lines"]
    assert prod["failures"] == 1 and prod["n_scored"] == 5 and prod["primary"] == pytest.approx(4 / 5)
    assert lines["failures"] == 0 and lines["n_scored"] == 6 and lines["primary"] == pytest.approx(5 / 6)
    assert [r["output"] for r in _rows(run, "prod-lines")] == answers
    assert prod["latency_ms_p50"] == pytest.approx(102.0)  # median of 100, 101, 102, 103, 105 (104 failed)
    assert lines["latency_note"].startswith("not measured") and lines["latency_measured"] is False
    assert prod["latency_measured"] is True
    assert prod["requests"] == 0 and prod["external"] == {"kind": "recorded", "predictions": str(by_id)}


@pytest.mark.parametrize("records, message", [
    (lambda test: [{"id": t["id"], "output": "x"} for t in test[:-1]], r"no output for 1 of the 6 test examples .*test-000105"),
    (lambda test: [{"id": t["id"], "output": "x"} for t in test] + [{"id": "nope", "output": "x"}],
     r"by_id.jsonl:7: id: 'nope' is not an example of the test file"),
    (lambda test: [{"id": test[0]["id"], "output": "x"}] * 2, r"by_id.jsonl:2: a second output for test example 'test-000100'"),
    (lambda test: [{"line": 7, "output": "x"}], r"by_id.jsonl:1: line: 7 is not a line of the test file"),
    (lambda test: [{"id": t["id"], "output": 3} for t in test], r"by_id.jsonl:1: output: expected a string"),
])
def test_recorded_outputs_with_a_missing_or_extra_id_stop_before_generating(fake_run_template, tmp_path, monkeypatch,
                                                                            records, message):
    from tunelab.eval import run as run_module

    monkeypatch.setattr(run_module, "generate", lambda *a, **k: pytest.fail("generated before the check"))
    path = tmp_path / "by_id.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(_test_rows(fake_run_template))))
    run = _run_with(fake_run_template, tmp_path, [{"name": "prod", "predictions": str(path)}])
    with pytest.raises(DataError, match=message):
        run_module.evaluate(run, echo=False)


# ---------------------------------------------------------------------------------------------- the recipe and the CLI


def test_recipe_errors_name_the_line_and_never_echo_a_pasted_key(tmp_path):
    from tunelab.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"eval": {"external": [
        {"name": "a", "base_url": "https://x/v1", "model": "m", "api_key_env": KEY,
         "price_per_m_input_tokens": 1, "price_per_m_output_tokens": 1},
        {"name": "tuned", "model": "tiny-test"},
        {"name": "c", "base_url": "https://x/v1", "model": "m"},
        {"name": "d", "predictions": "p.jsonl", "prompt": "rag"},
    ]}}, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    text = str(err.value)
    assert KEY not in text and "api_key_env is the NAME of an environment variable" in text
    assert f"{path}:9: eval.external.1.name: Value error, 'tuned' is a built-in arm" in text
    assert "eval.external.2.price_per_m_input_tokens: Field required" in text
    assert "unknown key 'eval.external.3.prompt'" in text
    path.write_text(yaml.safe_dump({"eval": {"external": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]}}))
    with pytest.raises(ConfigError, match=r"external arm name\(s\) \['a'\] given more than once"):
        load_recipe(path)


def test_a_recipe_without_external_arms_evaluates_as_before(fake_run_template, tmp_path):
    from tunelab.config import load_recipe
    from tunelab.eval.run import evaluate

    run = _run_with(fake_run_template, tmp_path, [])
    metrics = evaluate(run, echo=False)
    assert list(metrics["arms"]) == ["tuned"] and not (run / "eval" / "external").exists()
    assert all("external" not in row and "failures" not in row for row in metrics["arms"].values())
    assert load_recipe(run / "recipe.yaml").eval.external == []


def test_eval_external_adds_arms_to_a_finished_run_without_regenerating(fake_run_template, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.eval import run as run_module

    run = _run_with(fake_run_template, tmp_path, [], arms=("base", "tuned"))
    before = run_module.evaluate(run, echo=False)
    rows_before = (run / "eval" / "predictions.jsonl").read_text().splitlines()
    test = _test_rows(run)
    recorded = tmp_path / "prod.jsonl"
    recorded.write_text("".join(json.dumps({"id": t["id"], "output": t["messages"][-1]["content"]}) + "\n" for t in test))
    arms_file = tmp_path / "arms.yaml"
    arms_file.write_text(yaml.safe_dump({"external": [{"name": "prod", "predictions": "prod.jsonl"}]}))
    monkeypatch.setattr(run_module, "generate", lambda *a, **k: pytest.fail("a built-in arm was regenerated"))
    result = CliRunner().invoke(app, ["eval", str(run), "--external", str(arms_file)])
    assert result.exit_code == 0, result.output
    after = json.loads((run / "eval" / "metrics.json").read_text())
    assert list(after["arms"]) == ["base", "tuned", "prod"]
    assert after["arms"]["base"] == json.loads(json.dumps(before["arms"]["base"]))
    assert after["arms"]["prod"]["primary"] == 1.0 and after["arms"]["prod"]["vs_tuned"]["n"] == 6
    assert after["forgetting"] == json.loads(json.dumps(before["forgetting"]))
    # the verdict is decided anew with the new arm on the prompt-only side; the training check is kept
    assert after["verdict"]["vs"] == "prod" and "prompt-only arm (base, prod)" in after["verdict"]["selection"]
    assert after["verdict"]["provisional"] == before["verdict"]["provisional"] is True
    assert "tuned vs prod" in after["cost"]["break_even"]
    from tunelab.report.html import write_report

    report = write_report(run).with_name("report.md").read_text()
    assert after["arms"]["prod"]["vs_tuned"]["text"] in report and "| prod | 100.0 [100.0, 100.0] |" in report
    rows_after = (run / "eval" / "predictions.jsonl").read_text().splitlines()
    assert rows_after[: len(rows_before)] == rows_before and len(rows_after) == len(rows_before) + 6
    # again: the arm of the same name is replaced, not added twice
    assert CliRunner().invoke(app, ["eval", str(run), "--external", str(arms_file)]).exit_code == 0
    assert len((run / "eval" / "predictions.jsonl").read_text().splitlines()) == len(rows_after)

    # runs compare shows the external arm too, and can compare runs on it
    import shutil

    from tunelab.report.compare import compare_runs

    shutil.copytree(run, tmp_path / "copy")
    comparison = compare_runs([run, tmp_path / "copy"], arm="prod")
    assert dict(comparison.rows)[f"prod: {comparison.primary_metric} (%, 95% CI)"] == ["100.0 [100.0, 100.0]"] * 2
    # a damaged eval/metrics.json stops it with one line naming the file, before anything is generated
    from tunelab.contract import ContractError
    from tunelab.eval.external import read_external_file

    (run / "eval" / "metrics.json").write_text('{"arms": ')
    with pytest.raises(ContractError, match=r"eval/metrics.json: not valid JSON"):
        run_module.add_external_arms(run, read_external_file(arms_file))


def test_external_arms_run_with_the_recipes_arms_only(fake_run_template, tmp_path):
    """curve, drift and update evaluate chosen arms for their own purposes: no external request there."""
    from tunelab.eval.run import evaluate

    recorded = tmp_path / "prod.jsonl"
    recorded.write_text("".join(json.dumps({"id": t["id"], "output": "x"}) + "\n" for t in _test_rows(fake_run_template)))
    run = _run_with(fake_run_template, tmp_path, [{"name": "prod", "predictions": str(recorded)}])
    assert list(evaluate(run, arms=["tuned"], echo=False)["arms"]) == ["tuned"]
    assert list(evaluate(run, echo=False)["arms"]) == ["tuned", "prod"]


def test_the_comparison_with_the_tuned_arm_is_paired_on_the_examples_both_scored():
    from tunelab.eval.external import compare_with_tuned
    from tunelab.eval.metrics import paired_comparison

    per_example = {"tuned": [1.0, 0.0, 1.0, None, 1.0], "tuned+rag": [0.0] * 5, "hosted": [1.0, 1.0, None, 0.0, 0.0]}
    record = {"primary": 0.5, "usd_per_1m_queries": 10.0, "latency_ms_p50": 100.0}
    arms = {"tuned": {**record, "primary": 0.75, "usd_per_1m_queries": 0.25, "latency_ms_p50": 20.0},
            "tuned+rag": {**record, "primary": 0.0}, "hosted": record}
    result = compare_with_tuned("hosted", per_example, arms, ("tuned", "tuned+rag"), seed=0)
    expected = paired_comparison([1.0, 0.0, 1.0], [1.0, 1.0, 0.0], seed=0)
    assert result["arm"] == "tuned" and result["n"] == 3
    assert result["delta"] == expected.delta == 0.0 and result["ci95"] == list(expected.ci95)
    assert result["cost_ratio"] == 0.025 and result["latency_ratio"] == 5.0
    assert result["text"].endswith("on the 3 of 5 examples both scored; tuned costs 1/40 as much per query, "
                                   "at 5x lower p50 latency")
    assert compare_with_tuned("hosted", per_example, {"hosted": record}, ("tuned",), seed=0) is None


def test_an_arm_that_answered_nothing_has_no_score_not_a_zero(fake_run_template, tmp_path, capsys):
    from tunelab.eval.run import evaluate

    recorded = tmp_path / "down.jsonl"
    recorded.write_text("".join(json.dumps({"id": t["id"], "output": None}) + "\n" for t in _test_rows(fake_run_template)))
    run = _run_with(fake_run_template, tmp_path, [{"name": "down", "predictions": str(recorded)}])
    metrics = evaluate(run, echo=True)
    down = metrics["arms"]["down"]
    assert down["primary"] is None and down["ci95"] is None and down["metrics"] == {}
    assert down["failures"] == 6 and down["n_scored"] == 0 and "vs_tuned" not in down
    assert re.search(r"^down +all failed", capsys.readouterr().out, re.MULTILINE)
    assert metrics["verdict"]["external_left_out"] == ["down"]  # not an empty comparison for every arm


def test_external_arms_are_members_of_the_verdict_on_the_examples_every_arm_answered(fake_run_template, tmp_path):
    """The decision takes every arm: an external arm that answers right where the tuned model does not is
    recommended; the example it did not answer is left out of the paired comparison, and the verdict says so."""
    import random

    from test_eval_run import _conversation
    from tunelab.eval.run import evaluate

    run = _run_with(fake_run_template, tmp_path, [])
    rng = random.Random(5)
    test = _test_rows(run) + [_conversation(i, "test", rng) for i in range(106, 118)]
    (run / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    recorded = tmp_path / "prod.jsonl"
    recorded.write_text("".join(json.dumps({"id": t["id"], "output": None if i == 3 else t["messages"][-1]["content"],
                                            "prompt_tokens": 10, "completion_tokens": 5}) + "\n"
                                for i, t in enumerate(test)))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["eval"]["external"] = [{"name": "prod", "predictions": str(recorded)}]
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    metrics = evaluate(run, echo=False)
    verdict = metrics["verdict"]
    assert metrics["arms"]["tuned"]["primary"] == 0.0 and metrics["arms"]["prod"]["n_scored"] == 17
    assert verdict["n"] == 17 and verdict["excluded_failed"] == 1
    assert "1 of 18 examples left out: 1 an external arm did not answer" in verdict["text"]
    assert verdict["recommended"] == "prod" and verdict["winner"] == "prod"
    assert verdict["usd_per_1k_requests"]["prod"] == pytest.approx(metrics["arms"]["prod"]["usd_per_1m_queries"] / 1000)


def test_a_reply_trickling_in_past_timeout_s_is_a_timeout(tmp_path):
    """The socket timeout bounds each read; timeout_s bounds the whole reply."""
    from tunelab.config import EndpointArm
    from tunelab.engine.generate import DecodingSettings
    from tunelab.eval.external import run_endpoint_arm

    class Trickle(QuietHandler):
        def do_POST(self) -> None:
            self.server.hits += 1
            body = b'{"choices": [{"message": {"content": "slow"}}]}' + b" " * 40
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.02)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.hits = 0
    with serving(server):
        arm = EndpointArm(name="h", base_url=base_url(server), model="m", timeout_s=0.5,
                          max_retries=1, price_per_m_input_tokens=0, price_per_m_output_tokens=0)
        [answer] = run_endpoint_arm(arm, [[{"role": "user", "content": "hi"}]], DecodingSettings(),
                                    tmp_path / "c.jsonl").answers
    assert answer.text is None and "timed out" in answer.error and answer.attempts == 2 and server.hits == 2
