"""score_model, label_model and cosine against a real OpenAI-compatible HTTP server on 127.0.0.1
started here: one call per (sample, grader), the cache on re-run, retries, failures recorded per
example, and a multi grader over a judge."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import ThreadingHTTPServer

import pytest

from stand_in import QuietHandler, base_url, serving
from tunelab.eval.graders.grade import Grading
from tunelab.eval.graders.judge import JudgeCache
from tunelab.eval.graders.pairwise import compare_pairwise
from tunelab.specs.graders import PairwiseJudge, parse_graders


class FakeJudge(ThreadingHTTPServer):
    """Scores by the text under judgement: 'great' -> 0.9 as JSON, 'fine' -> prose with 0.5, 'crash' -> HTTP
    500 always, 'flaky' -> 500 once then 0.7; labels: 'please' -> polite else rude. Records every request."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.headers_seen: list[str | None] = []
        self.lock = threading.Lock()
        self.failed_once: set[str] = set()

    @property
    def base_url(self) -> str:
        return base_url(self)


class _Handler(QuietHandler):
    server: FakeJudge

    def do_POST(self) -> None:
        body = self.read_json()
        with self.server.lock:
            self.server.requests.append({"path": self.path, **body})
            self.server.headers_seen.append(self.headers.get("Authorization"))
        if self.path == "/v1/embeddings":
            text = body["input"].lower()
            self.reply_json(200, {"data": [{"embedding": [text.count(c) for c in "abcdefghijklmnopqrstuvwxyz"]}]})
            return
        prompt = body["messages"][-1]["content"]
        if "PAIR" in prompt:  # pairwise: the longer reply wins; a "biased" judge always says A
            a, b = (re.search(rf"{x}<(.*?)>", prompt, re.DOTALL).group(1) for x in ("A", "B"))
            choice = "A" if "biased" in prompt else "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
            self.reply_json(200, {"choices": [{"message": {"role": "assistant", "content": choice}}]})
            return
        answer = re.search(r"ANSWER<(.*?)>", prompt, re.DOTALL).group(1)
        if "crash" in answer:
            self.reply_json(500, {"error": {"message": "boom"}})
            return
        if "flaky" in answer:
            with self.server.lock:
                first = answer not in self.server.failed_once
                self.server.failed_once.add(answer)
            if first:
                self.reply_json(503, {"error": {"message": "busy"}})
                return
        if "labels" in prompt:
            content = "polite" if "please" in answer else '{"result": "rude"}'
        elif "great" in answer:
            content = '{"result": 0.9, "steps": []}'
        elif "flaky" in answer:
            content = '{"result": 0.7}'
        elif "wild" in answer:
            content = '{"result": 7}'
        else:
            content = "I would give this a 0.5 overall."
        self.reply_json(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})


@pytest.fixture()
def judge_server():
    with serving(FakeJudge()) as server:
        yield server


def score_grader(server: FakeJudge, **extra) -> dict:
    return {"type": "score_model", "name": "quality", "model": "judge-1", "base_url": server.base_url,
            "max_retries": 1, "input": [{"role": "system", "content": "You grade answers."},
                                        {"role": "user", "content": "Question {{ item.q }} ANSWER<{{ sample.output_text }}>"}],
            "sampling_params": {"temperature": 0, "max_completions_tokens": 20}, **extra}


def test_score_model_one_call_per_sample_then_the_cache(judge_server, tmp_path):
    graders = parse_graders([score_grader(judge_server)], "test")
    outputs = ["a great answer", "a fine answer", "another great one"]
    items = [{"q": i} for i in range(3)]
    cache = tmp_path / "judge_cache.jsonl"
    with Grading(graders, cache) as grading:
        column = grading.grade(outputs, items)["quality"]
    assert column.scores == [0.9, 0.5, 0.9]  # JSON {"result"} and a number in prose both read
    assert len(judge_server.requests) == 3
    assert Counter(json.dumps(r["messages"]) for r in judge_server.requests).most_common(1)[0][1] == 1
    first = judge_server.requests[0]
    assert first["model"] == "judge-1" and first["temperature"] == 0 and first["max_tokens"] == 20
    assert first["messages"][0] == {"role": "system", "content": "You grade answers."}
    assert '"result"' in first["messages"][-1]["content"]  # the reply shape is asked for
    assert judge_server.headers_seen == [None] * 3  # no api_key_env: no key sent to a local server

    with Grading(graders, cache) as grading:  # re-running eval does not pay twice
        again = grading.grade(outputs, items)["quality"]
    assert again.scores == column.scores and len(judge_server.requests) == 3
    with Grading(graders, cache) as grading:  # a new output is one new call
        grading.grade([*outputs, "great news"], [*items, {"q": 9}])
    assert len(judge_server.requests) == 4


def test_failed_calls_are_retried_then_recorded_per_example(judge_server, tmp_path, monkeypatch):
    from tunelab.eval.graders import judge

    monkeypatch.setattr(judge, "RETRY_FIRST_WAIT_S", 0.01)
    graders = parse_graders([score_grader(judge_server)], "test")
    with Grading(graders, tmp_path / "cache.jsonl") as grading:
        column = grading.grade(["flaky one", "crash now", "wild guess"], [{"q": 1}, {"q": 2}, {"q": 3}])["quality"]
    assert column.scores == [0.7, None, None]
    assert "HTTP 500" in column.errors[1] and "after 2 attempt(s)" in column.errors[1]
    assert "outside range [0, 1]" in column.errors[2]
    calls = Counter(re.search(r"ANSWER<(.*?)>", r["messages"][-1]["content"]).group(1) for r in judge_server.requests)
    assert calls == {"flaky one": 2, "crash now": 2, "wild guess": 1}  # one retry each, none for a reply


def test_label_model_passing_labels_and_api_key_from_the_named_variable(judge_server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sekret")
    grader = {"type": "label_model", "name": "tone", "model": "judge-1", "base_url": judge_server.base_url,
              "api_key_env": "MY_JUDGE_KEY", "labels": ["polite", "rude"], "passing_labels": ["polite"],
              "input": [{"role": "user", "content": "Pick from labels. ANSWER<{{ sample.output_text }}>"}]}
    with Grading(parse_graders([grader], "test")) as grading:
        column = grading.grade(["please hold", "go away"], [{}, {}])["tone"]
    assert column.scores == [1.0, 0.0]
    assert judge_server.headers_seen == ["Bearer sekret"] * 2


def test_multi_over_a_judge_and_a_string_check(judge_server):
    multi = {"type": "multi", "name": "overall", "calculate_output": "0.5 * quality + 0.5 * mentions",
             "graders": [score_grader(judge_server),
                         {"type": "string_check", "name": "mentions", "operation": "ilike",
                          "input": "{{ sample.output_text }}", "reference": "{{ item.keyword }}"}]}
    with Grading(parse_graders([multi], "test")) as grading:
        column = grading.grade(["a great answer", "a fine answer"], [{"q": 1, "keyword": "Great"},
                                                                      {"q": 2, "keyword": "great"}])["overall"]
    assert column.scores == [pytest.approx(0.95), pytest.approx(0.25)]
    assert len(judge_server.requests) == 2


def test_cosine_through_an_embeddings_endpoint(judge_server):
    grader = {"type": "text_similarity", "name": "cos", "evaluation_metric": "cosine", "embedding_model": "emb",
              "base_url": judge_server.base_url, "input": "{{ sample.output_text }}", "reference": "{{ item.reference }}"}
    with Grading(parse_graders([grader], "test")) as grading:
        column = grading.grade(["abc", "abc", "xyz"], [{"reference": "cab"}, {"reference": "abc"}, {"reference": "abc"}])
    assert column["cos"].scores == [pytest.approx(1.0), pytest.approx(1.0), 0.0]
    assert {r["path"] for r in judge_server.requests} == {"/v1/embeddings"}
    assert sorted(r["input"] for r in judge_server.requests) == ["abc", "cab", "xyz"]  # each text embedded once


def pairwise_judge(server: FakeJudge, bias: str = "") -> PairwiseJudge:
    return PairwiseJudge.model_validate({
        "model": "judge-1", "base_url": server.base_url,
        "input": [{"role": "user", "content": "PAIR " + bias + " about {{ item.q }}: A<{{ sample_a.output_text }}> "
                                              "B<{{ sample_b.output_text }}>"}]})


def test_pairwise_judge_asks_both_orders_and_a_position_preference_is_a_tie(judge_server):
    outputs_a, outputs_b = ["a long answer", "x", "same"], ["short", "a much longer answer", "same"]
    items = [{"q": i} for i in range(3)]
    fair = compare_pairwise(pairwise_judge(judge_server), "tuned", "rag", outputs_a, outputs_b, items, JudgeCache(None))
    assert (fair["wins"], fair["losses"], fair["ties"], fair["position_disagreements"]) == (1, 1, 1, 0)
    # two orders per example; equal outputs make one prompt, asked once
    shown = [re.search(r"A<(.*?)>", r["messages"][-1]["content"]).group(1) for r in judge_server.requests]
    assert sorted(shown) == sorted(["a long answer", "x", "short", "a much longer answer", "same"])
    assert fair["win_rate"] == 0.5

    biased = compare_pairwise(pairwise_judge(judge_server, "biased"), "tuned", "rag", outputs_a, outputs_b, items,
                              JudgeCache(None))
    assert (biased["wins"], biased["losses"], biased["ties"], biased["position_disagreements"]) == (0, 0, 3, 3)
    assert biased["win_rate"] == 0.5
