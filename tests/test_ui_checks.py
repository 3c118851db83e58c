"""The UI's request checks called directly, without HTTP: the guard's verdict for each kind of
request (loopback host, API key by header or cookie, cross-site posts), which run names and files
resolve inside the runs folder, the log reader's whole-line offsets, and the forms' parsing."""

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.ui import status
from tunelab.ui.app import (
    NotFound,
    file_inside,
    host_is_loopback,
    key_matches,
    parse_form,
    playground_options,
    prediction_filter,
    presented_key,
    read_log_records,
    refusal,
    run_folder,
    start_from_form,
    start_overrides,
)
from tunelab.ui.launch import Launcher
from tunelab.ui.predictions import PredictionFilter

# ---------------------------------------------------------------------------------------------- guard


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:7860", "localhost", "LocalHost:80", "[::1]", "[::1]:7860"])
def test_loopback_host_headers(host):
    assert host_is_loopback(host)


@pytest.mark.parametrize("host", ["", "attacker.example", "attacker.example:7860", "localhost.attacker.example",
                                  "127.0.0.2", "127.0.0.1.nip.io:7860", "[::2]:7860"])
def test_other_host_headers_are_not_loopback(host):
    assert not host_is_loopback(host)


def test_a_key_matches_only_itself_and_nothing_matches_when_no_key_is_set():
    assert key_matches("s3cret", "s3cret")
    assert not key_matches("s3cre", "s3cret") and not key_matches("s3cret ", "s3cret") and not key_matches("", "k")
    assert not key_matches("", None) and not key_matches("anything", None)


@pytest.mark.parametrize("authorization, cookie, key", [
    ("Bearer k1", "c", "k1"), ("bearer  k1 ", "c", "k1"), ("BEARER k1", "", "k1"),
    ("", "c", "c"), ("Basic k1", "c", "c"), ("Bearerk1", "", ""),
])
def test_the_key_presented_is_the_bearer_token_else_the_cookie(authorization, cookie, key):
    assert presented_key(authorization, cookie) == key


LOCAL = {"host": "127.0.0.1:7860"}


# any_host: the UI was started with --api-key (else: loopback only, the key is the token it printed)
@pytest.mark.parametrize("method, path, headers, cookie, any_host, verdict", [
    ("GET", "/", LOCAL, "k", False, None),
    ("GET", "/", LOCAL, "", False, "api-key"),  # loopback is not a user: no key, no page
    ("GET", "/", {**LOCAL, "accept": "text/html"}, "", False, "login"),
    ("GET", "/api/playground/stream", LOCAL, "", False, "api-key"),
    ("POST", "/start", LOCAL, "", False, "api-key"),  # a local process posting without the key
    ("POST", "/runs/a/stop", LOCAL, "wrong", False, "api-key"),
    ("GET", "/", {"host": "attacker.example:7860"}, "k", False, "loopback-only"),
    ("GET", "/", {}, "k", False, "loopback-only"),
    ("GET", "/", {"host": "ui.example"}, "", True, "api-key"),
    ("GET", "/", {"host": "ui.example", "authorization": "Bearer k"}, "", True, None),
    ("GET", "/", {"host": "ui.example"}, "k", True, None),
    ("GET", "/", {"host": "ui.example", "authorization": "Bearer wrong"}, "k", True, "api-key"),
    ("GET", "/runs/a", {"host": "ui.example", "accept": "text/html,*/*"}, "", True, "login"),
    ("POST", "/start", {"host": "ui.example", "accept": "text/html"}, "", True, "api-key"),
    ("GET", "/login", {"host": "ui.example"}, "", True, None),
    ("POST", "/login", {"host": "ui.example"}, "", True, None),
    ("POST", "/login", LOCAL, "", False, None),
    ("GET", "/static/ui.css", {"host": "ui.example"}, "", True, None),
    ("GET", "/static/ui.js", {"host": "ui.example"}, "", True, "api-key"),
    ("POST", "/runs/a/stop", {**LOCAL, "origin": "http://attacker.example"}, "k", False, "cross-site"),
    ("POST", "/runs/a/stop", {**LOCAL, "origin": "http://127.0.0.1:7860"}, "k", False, None),
    ("POST", "/runs/a/stop", LOCAL, "k", False, None),
    ("POST", "/login", {"host": "ui.example", "origin": "http://attacker.example"}, "", True, "cross-site"),
    # a page of another site, or of another port of this host (same-site: the cookie goes with it)
    ("GET", "/api/playground/stream", {**LOCAL, "sec-fetch-site": "cross-site"}, "k", False, "cross-site"),
    ("GET", "/api/playground/stream", {**LOCAL, "sec-fetch-site": "same-site"}, "k", False, "cross-site"),
    ("GET", "/api/runs/a/state", {**LOCAL, "sec-fetch-site": "same-site"}, "k", False, "cross-site"),
    ("POST", "/runs/a/stop", {**LOCAL, "sec-fetch-site": "same-site"}, "k", False, "cross-site"),
    ("GET", "/api/playground/stream", {**LOCAL, "sec-fetch-site": "same-origin"}, "k", False, None),
    ("GET", "/runs/a", {**LOCAL, "sec-fetch-site": "cross-site"}, "k", False, None),  # a link to a page: shows it
    ("GET", "/runs/a", {**LOCAL, "sec-fetch-site": "none"}, "k", False, None),
])
def test_the_guard_refuses_exactly_these_requests(method, path, headers, cookie, any_host, verdict):
    assert refusal(method, path, headers, cookie, "k", any_host) == verdict


# ---------------------------------------------------------------------------------------------- paths


@pytest.fixture
def runs(tmp_path):
    out = tmp_path / "runs"
    (out / "alpha").mkdir(parents=True)
    (out / "alpha" / "recipe.yaml").write_text("name: alpha\n")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "recipe.yaml").write_text("name: secret\n")
    (tmp_path / "secret" / "report.html").write_text("SECRET")
    return out


def test_a_run_with_a_recipe_or_a_ui_process_resolves_to_its_folder(runs):
    assert run_folder(runs, runs.resolve(), "alpha") == runs / "alpha"
    status.sidecar_dir(runs, "starting").mkdir(parents=True)
    (status.sidecar_dir(runs, "starting") / "process.json").write_text("{}")
    assert run_folder(runs, runs.resolve(), "starting") == runs / "starting"


@pytest.mark.parametrize("name", ["..", "../secret", "a/b", "/etc", ".ui", "", "alpha/..", "nope", "x" * 101])
def test_a_name_that_is_not_a_plain_existing_run_is_not_found(runs, name):
    with pytest.raises(NotFound):
        run_folder(runs, runs.resolve(), name)


def test_a_run_linked_out_of_the_runs_folder_or_showing_a_file_from_outside_is_not_found(runs):
    (runs / "escape").symlink_to(runs.parent / "secret", target_is_directory=True)
    (runs / "alpha" / "report.html").symlink_to(runs.parent / "secret" / "report.html")
    for name in ("escape", "alpha"):
        with pytest.raises(NotFound):
            run_folder(runs, runs.resolve(), name)


def test_only_files_inside_the_root_are_served(runs):
    root = runs.resolve()
    assert file_inside(root, runs / "alpha" / "recipe.yaml") == root / "alpha" / "recipe.yaml"
    (runs / "alpha" / "link.html").symlink_to(runs.parent / "secret" / "report.html")
    for path in (runs / "alpha" / "link.html", runs / "alpha", runs / "missing.txt",
                 runs / ".." / "secret" / "report.html"):
        with pytest.raises(NotFound):
            file_inside(root, path)


# ---------------------------------------------------------------------------------------------- log reader


def test_the_log_reader_returns_whole_new_train_and_eval_lines_and_where_to_go_on(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"kind": "train", "step": 1}, {"kind": "plan"}, "not json", [1], {"kind": "eval", "step": 1}]
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    log.write_text(text + '{"kind": "train", "st')  # the last line is half written
    records, offset, reset = read_log_records(log, 0)
    assert records == [{"kind": "train", "step": 1}, {"kind": "eval", "step": 1}]
    assert (offset, reset) == (len(text.encode()), False)
    assert read_log_records(log, offset) == ([], offset, False)
    with log.open("a") as f:
        f.write('ep": 2}\n')
    assert read_log_records(log, offset) == ([{"kind": "train", "step": 2}], log.stat().st_size, False)


def test_an_offset_past_the_end_means_the_log_was_truncated_and_reading_starts_over(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"kind": "train", "step": 1}) + "\n")
    assert read_log_records(log, 10_000) == ([{"kind": "train", "step": 1}], log.stat().st_size, True)


# ---------------------------------------------------------------------------------------------- forms


def test_a_form_body_parses_with_repeats_blanks_and_bad_bytes():
    assert parse_form(b"key=a&blank=&key=c+d&x=%2F") == {"key": ["a", "c d"], "blank": [""], "x": ["/"]}
    assert parse_form(b"key=\xff") == {"key": ["\ufffd"]}


def test_the_predictions_query_drops_unknown_outcomes_and_negative_offsets():
    assert prediction_filter("tuned", "seen", "wrong", "1", 20) == PredictionFilter("tuned", "seen", "wrong", True, 20)
    assert prediction_filter("", "", "maybe", "yes", -5) == PredictionFilter("", "", "", False, 0)


@pytest.mark.parametrize("arms, tokens, expected", [
    ("base,tuned", 64, (["base", "tuned"], 64)), (",base,,", 0, (["base"], 1)), ("", -9, ([], 1)),
    ("tuned", 1024, (["tuned"], 1024)), ("tuned", 10**9, (["tuned"], 1024)),
])
def test_playground_options_drop_blank_arms_and_clamp_tokens_to_1_to_1024(arms, tokens, expected):
    assert playground_options(arms, tokens) == expected


def test_start_overrides_take_the_filled_named_fields_in_order_then_the_free_lines():
    fields = {"eval.limit": "20", "train.max_steps": "5", "model.name": "", "overrides": " a=1 \n\n  b.c=2\n",
              "name": "n1", "recipe": "r.yaml"}
    assert start_overrides(fields) == ["train.max_steps=5", "eval.limit=20", "a=1", "b.c=2"]
    assert start_overrides({}) == []


@pytest.mark.parametrize("recipe", ["", "../../etc/passwd", "missing.yaml", "secret/recipe.yaml"])
def test_starting_from_a_recipe_not_listed_is_refused_and_starts_nothing(runs, recipe):
    with pytest.raises(TunelabError) as caught:
        start_from_form(Launcher(runs), {"recipe": recipe, "name": "n1"})
    assert str(caught.value) == f"recipe '{recipe}': choose one of the recipes listed"
    assert not (runs / "n1").exists() and not (runs / ".ui").exists()
