"""The web app under hostile run folders and requests: Stop signals only a process this server started
(never a pid read from a file: -1, 0, 1, the UI's own, another process); on loopback without --api-key
every request still needs the server's token (from the address it printed), so a local process or
another site's page can neither start, stop nor load anything; Start from a run folder's recipe runs
none of its code and sends none of the user's keys without the form's consent."""

from __future__ import annotations

import html
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tunelab.errors import ConfigError
from tunelab.ui import launch, status
from tunelab.ui.app import create_app

LOCAL = "http://127.0.0.1:7860"
SLEEP = [sys.executable, "-c", "import time; time.sleep(60)", "tunelab"]


def logged_in(runs: Path, **kwargs) -> TestClient:
    app = create_app(runs, **kwargs)
    c = TestClient(app, base_url=LOCAL)
    c.get("/", params={"token": app.state.ui.key})
    return c


def write_recipe(run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(f"name: {run.name}\nmodel:\n  name: tiny-test\nmethod: lora\n")


def write_process(runs: Path, name: str, pid: object, exit_code: object = None, started: object = 0) -> None:
    folder = status.sidecar_dir(runs, name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "process.json").write_text(json.dumps({"pid": pid, "command": ["tunelab"], "started": started,
                                                     "exit_code": exit_code}))


# ---------------------------------------------------------------------------------------------- Stop


@pytest.fixture
def bystander():
    """A process the UI did not start, whose command line even mentions tunelab."""
    process = subprocess.Popen(SLEEP)
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize("pid", ["-1", "0", "1", "self", "group", "bystander"])
def test_stop_never_signals_a_pid_read_from_a_file(tmp_path, bystander, monkeypatch, pid):
    runs = tmp_path / "runs"
    write_recipe(runs / "x")
    value = {"-1": -1, "0": 0, "1": 1, "self": os.getpid(), "group": -os.getpgrp(), "bystander": bystander.pid}[pid]
    write_process(runs, "x", value)
    signalled = []
    monkeypatch.setattr(os, "kill", lambda *a: signalled.append(a))
    monkeypatch.setattr(os, "killpg", lambda *a: signalled.append(a))
    monkeypatch.setattr(signal, "pidfd_send_signal", lambda *a: signalled.append(a))
    c = logged_in(runs)
    assert 'action="/runs/x/stop"' not in c.get("/runs/x").text  # no Stop button for a process it did not start
    response = c.post("/runs/x/stop")
    assert response.status_code == 400 and "did not start it" in response.text
    assert signalled == [] and bystander.poll() is None
    if pid != "self":  # (this test's own command line may name tunelab, through the folder it runs in)
        assert status.process_alive(value) is (pid == "bystander")  # shown as running: only a live tunelab


def test_a_run_started_by_an_earlier_ui_is_not_signalled_by_this_one(tmp_path, bystander):
    runs = tmp_path / "runs"
    write_recipe(runs / "x")
    earlier = launch.Launcher(runs)
    started = earlier.spawn("x", SLEEP)
    try:
        deadline = time.time() + 60
        while not earlier.can_stop("x"):  # the kernel sets a new process's arguments just after its exec
            assert time.time() < deadline
            time.sleep(0.01)
        later = launch.Launcher(runs)  # the UI restarted: process.json still names the live process
        assert not later.can_stop("x")
        with pytest.raises(ConfigError, match="did not start it"):
            later.stop("x")
        assert started.process.poll() is None
    finally:
        started.process.kill()
        started.process.wait()


def test_stop_checks_the_process_is_still_the_one_started(tmp_path):
    runs = tmp_path / "runs"
    ui = launch.Launcher(runs)
    started = ui.spawn("x", SLEEP)
    try:
        deadline = time.time() + 60
        while (identity := launch.proc_identity(started.process.pid)) != started.identity:  # args set just after exec
            assert time.time() < deadline, (identity, started.identity)
            time.sleep(0.01)
        assert identity[1] == b"\0".join(c.encode() for c in SLEEP) + b"\0"
        started.identity = (identity[0] + 1, identity[1])  # as if the pid now named a process started later
        assert not ui.can_stop("x") and ui.stop("x") is False
        assert started.process.poll() is None
        started.identity = identity
        assert ui.stop("x") is True
        assert started.process.wait(timeout=60) == -signal.SIGTERM
        deadline = time.time() + 60
        while ui.can_stop("x"):  # reaped by its wait thread: never signalled again
            assert time.time() < deadline
            time.sleep(0.02)
        assert ui.stop("x") is False
    finally:
        started.process.kill()


@pytest.mark.parametrize("pid", [-1, 0, 1, 2**40])
def test_proc_identity_names_no_process_for_impossible_pids(pid):
    assert launch.proc_identity(pid) is None


# ---------------------------------------------------------------------------------------------- the key on loopback

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "triage" / "recipe.yaml"
PYTHON_GRADER = {"type": "python", "name": "voice", "source": "def grade(sample, item):\n    return 1.0\n"}


def example_recipe(path: Path, **eval_keys) -> Path:
    import yaml

    recipe = yaml.safe_load(EXAMPLE.read_text().replace("data/", str(EXAMPLE.parent / "data") + "/"))
    recipe.setdefault("eval", {}).update({"graders": [], "primary": None, **eval_keys})  # only the graders asked for
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def spawned(monkeypatch):
    """Commands the UI would start (nothing is started)."""
    commands: list[list[str]] = []
    monkeypatch.setattr(launch.Launcher, "spawn", lambda self, name, command: commands.append(command))
    return commands


def test_loopback_is_not_a_user_every_route_needs_the_servers_token(tmp_path, spawned, monkeypatch):
    from tunelab.ui import playground

    runs = tmp_path / "runs"
    write_recipe(runs / "x")
    example_recipe(runs / "demo.yaml")
    monkeypatch.setattr(playground, "_load", lambda run_dir: pytest.fail("a model loaded for a request without the key"))
    app = create_app(runs)
    stranger = TestClient(app, base_url=LOCAL)  # a process on this machine, no Origin header, no cookie
    fields = {"recipe": "demo.yaml", "name": "n1", "overrides": f"eval.graders=[{json.dumps(PYTHON_GRADER)}]"}
    assert stranger.post("/start", data=fields).status_code == 401
    assert stranger.post("/runs/x/stop").status_code == 401
    assert stranger.get("/api/playground/stream", params={"run": "x", "prompt": "hi"}).status_code == 401
    for url in ("/", "/runs/x", "/api/runs/x/state", "/start", "/playground", "/static/ui.js"):
        assert stranger.get(url).status_code == 401, url
    assert "printed" in stranger.get("/", headers={"accept": "text/html"}).text  # a browser is told where the key is
    assert stranger.get("/", params={"token": "guess"}).status_code == 401
    assert stranger.get("/", params={"token": create_app(runs).state.ui.key}).status_code == 401  # another server's
    assert spawned == [] and not (runs / ".ui").exists()

    # the address `tunelab ui` printed: the key goes into a strict, http-only cookie and out of the URL
    opened = stranger.get("/playground", params={"run": "x", "token": app.state.ui.key}, follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/playground?run=x"
    cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and cookie.startswith(app.state.ui.cookie + "=")
    assert stranger.post("/start", data=fields, follow_redirects=False).status_code == 303
    assert len(spawned) == 1


def test_the_token_does_not_open_the_ui_to_other_host_names(tmp_path):
    runs = tmp_path / "runs"
    write_recipe(runs / "x")
    app = create_app(runs)
    rebound = TestClient(app, base_url="http://attacker.example:7860")
    assert rebound.get("/", params={"token": app.state.ui.key}).status_code == 421


def test_the_printed_address_carries_the_token_and_the_api_key_is_never_printed(tmp_path, monkeypatch):
    import uvicorn

    from tunelab.ui.app import serve_ui

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: sockets[0].close())
    said: list[str] = []
    serve_ui(tmp_path / "runs", port=0, announce=said.append)
    serve_ui(tmp_path / "runs", port=0, announce=said.append)
    tokens = [line.split("?token=")[1].split()[0] for line in said]
    assert len(tokens[0]) >= 40 and tokens[0] != tokens[1]  # 32 random bytes, new for each server
    said.clear()
    serve_ui(tmp_path / "runs", port=0, api_key="s3cret-key", announce=said.append)
    assert "token=" not in said[0] and "s3cret-key" not in said[0]


# ---------------------------------------------------------------------------------------------- Start: consent


@pytest.mark.parametrize(("eval_keys", "model_code", "refused"), [
    ({"graders": [PYTHON_GRADER]}, False, "grader 'voice' is Python code from the run folder"),
    ({"graders": [{"type": "score_model", "name": "j", "model": "m", "base_url": "http://judge.example/v1",
                   "api_key_env": "MY_PRIVATE_TOKEN", "input": [{"role": "user", "content": "x"}]}]}, False,
     "grader 'j' would send the API key in $MY_PRIVATE_TOKEN to http://judge.example/v1"),
    ({}, True, "model.trust_remote_code: true runs code shipped with the model"),
    ({"external": [{"name": "hosted", "base_url": "http://judge.example/v1", "model": "m",
                    "api_key_env": "MY_PRIVATE_TOKEN", "price_per_m_input_tokens": 1.0,
                    "price_per_m_output_tokens": 2.0}]}, False,
     "eval.external 'hosted' would send the API key in $MY_PRIVATE_TOKEN to http://judge.example/v1"),
])
def test_start_from_a_run_folders_recipe_needs_consent_for_its_code_and_secrets(tmp_path, spawned, monkeypatch,
                                                                               eval_keys, model_code, refused):
    import yaml

    monkeypatch.setenv("MY_PRIVATE_TOKEN", "ghp_secret")
    runs = tmp_path / "runs"
    recipe = example_recipe(runs / "prev" / "recipe.yaml", **eval_keys)
    if model_code:
        data = yaml.safe_load(recipe.read_text())
        data["model"]["trust_remote_code"] = True
        recipe.write_text(yaml.safe_dump(data))
    c = logged_in(runs)
    response = c.post("/start", data={"recipe": "prev/recipe.yaml", "name": "n1"})
    shown = html.unescape(response.text)
    assert response.status_code == 400 and refused in shown and "tick 'trust this run folder' if you trust this run" in shown
    assert spawned == [] and not (runs / ".ui").exists()
    consented = c.post("/start", data={"recipe": "prev/recipe.yaml", "name": "n1", "trust": "yes"},
                       follow_redirects=False)
    assert consented.status_code == 303 and len(spawned) == 1


def test_a_recipe_at_the_top_of_the_runs_folder_is_the_users_own(tmp_path, spawned):
    runs = tmp_path / "runs"
    example_recipe(runs / "mine.yaml", graders=[PYTHON_GRADER])
    response = logged_in(runs).post("/start", data={"recipe": "mine.yaml", "name": "n1"}, follow_redirects=False)
    assert response.status_code == 303 and len(spawned) == 1


# ---------------------------------------------------------------------------------------------- malformed runs

DEEP = "[" * 100_000 + "]" * 100_000
MALFORMED = [  # (file in the run, content, whether the run is shown as unreadable)
    ("eval/metrics.json", lambda m: {**m, "verdict": "oops"}, True),
    ("eval/metrics.json", lambda m: {**m, "arms": {"tuned": [1, 2]}}, True),
    ("eval/metrics.json", lambda m: [], True),
    ("eval/metrics.json", "not json", True),
    ("eval/metrics.json", DEEP, True),
    ("eval/metrics.json", lambda m: {**m, "arms": {**m["arms"], "tuned": {**m["arms"]["tuned"], "primary": float("inf"),
                                                                          "ci95": [float("nan"), 1e999]}}}, False),
    ("stages.json", {"train": 1}, True),
    ("stages.json", "[1, 2", True),
    (".ui/process.json", {"pid": 12, "command": ["tunelab"], "started": "abc", "exit_code": None}, True),
    (".ui/process.json", {"pid": "12", "command": "tunelab", "started": 0}, True),
    (".ui/process.json", {"pid": True, "command": [], "started": 0}, True),
    (".ui/process.json", DEEP, True),
    ("data/stats.json", {"counts": {"train": "many", "test": [1]}}, False),
    ("data/stats.json", DEEP, False),
    ("train/log.jsonl", '{"kind": "train", "step": "abc", "loss": "x", "elapsed_s": "y"}\n', False),
    ("train/plan.json", {"steps": "all"}, False),
    ("manifest.json", {"parent": [1, {"path": 3}]}, False),
    ("recipe.yaml", "model: [unclosed\n", False),
    ("eval/predictions.jsonl", '{"arm": [1], "id": {"a": 1}, "score": "x", "output": [2]}\n' + DEEP + "\n{}\n[]\n", False),
    ("data/test.jsonl", '{"messages": 3, "id": []}\n' + DEEP + "\n", False),
    ("train/log.jsonl", DEEP + "\n" + '{"kind": "train", "step": 1e308, "loss": 1e999}\n', False),
]


@pytest.fixture
def two_runs(tmp_path):
    from test_report import make_run

    runs = tmp_path / "runs"
    make_run(runs, name="alpha")
    make_run(runs, name="bad", test_file=runs / "alpha-input" / "test.jsonl")
    return runs


@pytest.mark.parametrize("case", range(len(MALFORMED)))
def test_one_malformed_run_file_marks_that_run_and_every_page_still_answers(two_runs, case, monkeypatch):
    from tunelab.ui import playground

    monkeypatch.setattr(playground, "_load", lambda run_dir: pytest.fail("no model loads here"))
    runs = two_runs
    relative, content, unreadable = MALFORMED[case]
    path = status.sidecar_dir(runs, "bad") / "process.json" if relative.startswith(".ui/") else runs / "bad" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if callable(content):
        content = content(json.loads(path.read_text()))
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    c = logged_in(runs)
    page = c.get("/")
    assert page.status_code == 200
    alpha = page.text.split('data-run="alpha"')[1].split("</tr>")[0]
    assert 'data-status="done"' in alpha and "<b>tuned</b>" in alpha  # the other run shows as ever
    bad = page.text.split('data-run="bad"')[1].split("</tr>")[0]
    assert ('data-status="unreadable"' in bad) is unreadable, bad
    if unreadable:
        assert html.escape(str(path)) in bad  # which file, and why
    for url in ("/runs/bad", "/api/runs/bad/state", "/runs/bad/report", "/runs/bad/predictions",
                "/compare?run=alpha&run=bad", "/playground", "/playground?run=bad", "/start"):
        response = c.get(url)
        assert response.status_code in (200, 400, 404), (url, response.status_code)
        assert "Traceback" not in response.text


def test_a_run_linked_from_outside_the_runs_folder_is_never_read(tmp_path, monkeypatch):
    from test_export import make_fake_run
    from test_report import make_run

    runs = tmp_path / "runs"
    make_fake_run(runs / "mine")  # a run with an adapter: the playground's first choice otherwise
    outside = tmp_path / "outside"
    make_run(outside, name="secret")
    (outside / "secret" / "adapter").mkdir()
    (runs / "aaa-linked").symlink_to(outside / "secret")
    make_run(runs, name="half")
    (runs / "half" / "eval" / "metrics.json").unlink()
    (runs / "half" / "eval" / "metrics.json").symlink_to(outside / "secret" / "eval" / "metrics.json")
    verdict = json.loads((outside / "secret" / "eval" / "metrics.json").read_text())["verdict"]["text"]
    c = logged_in(runs)
    listing = c.get("/").text
    assert html.escape(verdict) not in listing and verdict not in listing
    for name in ("aaa-linked", "half"):
        row = listing.split(f'data-run="{name}"')[1].split("</tr>")[0]
        assert 'data-status="unreadable"' in row and "a link out of the runs folder; not followed" in row
    playground = c.get("/playground")
    assert playground.status_code == 200 and 'value="mine"' in playground.text and "aaa-linked" not in playground.text
    assert "aaa-linked" not in c.get("/compare").text
    assert c.get("/runs/aaa-linked").status_code == 404 and c.get("/runs/half").status_code == 404


# ---------------------------------------------------------------------------------------------- bodies


def test_request_bodies_are_capped_before_they_are_read(tmp_path, spawned):
    from tunelab.ui.app import MAX_FORM_BYTES

    runs = tmp_path / "runs"
    example_recipe(runs / "demo.yaml")
    stranger = TestClient(create_app(runs), base_url=LOCAL)
    announced = stranger.post("/login", content=b"key=x", headers={"content-length": str(300 * 2**20),
                                                                    "content-type": "application/x-www-form-urlencoded"})
    assert announced.status_code == 413

    def endless():  # no Content-Length: chunked, 1 MiB at a time
        for _ in range(300):
            yield b"key=" + b"a" * 2**20

    assert stranger.post("/login", content=endless()).status_code == 413
    c = logged_in(runs)
    assert c.post("/start", data={"recipe": "demo.yaml", "name": "n1", "overrides": "a" * MAX_FORM_BYTES}).status_code == 413
    assert spawned == []
    fits = c.post("/start", data={"recipe": "demo.yaml", "name": "n1", "overrides": "eval.limit=2"}, follow_redirects=False)
    assert fits.status_code == 303 and len(spawned) == 1


def test_a_body_without_content_length_is_read_only_up_to_the_cap():
    import asyncio

    from starlette.requests import Request

    from tunelab.ui.app import MAX_FORM_BYTES, TooLarge, read_form

    received = []

    async def receive():  # an endless chunked body, 4 KiB a message
        received.append(4096)
        return {"type": "http.request", "body": b"a" * 4096, "more_body": True}

    request = Request({"type": "http", "method": "POST", "headers": [], "path": "/login"}, receive)
    with pytest.raises(TooLarge):
        asyncio.run(read_form(request))
    assert sum(received) == MAX_FORM_BYTES + 4096  # stopped at the first message past the cap


# ---------------------------------------------------------------------------------------------- fuzz

ODD = ["-5", "0", "99999999999999999999999", "abc", "", "%00", "..", "../alpha", "a" * 3000, "\u202e", "1e309", "nan",
       "alpha", "beta", "tuned", "base,tuned,zzz", "<script>", "{{7*7}}"]
ROUTES = [("/api/runs/{run}/state", ["offset"]), ("/runs/{run}/predictions", ["arm", "slice", "outcome", "disagree", "offset"]),
          ("/compare", ["run", "arm"]), ("/playground", ["run"]), ("/runs/{run}", []), ("/runs/{run}/report", []),
          ("/api/playground/stream", ["run", "prompt", "arms", "max_new_tokens", "system"])]


def test_fuzzed_ui_requests_get_an_answer_never_a_500(two_runs, monkeypatch):
    import random

    from tunelab.ui import playground

    monkeypatch.setattr(playground, "_load", lambda run_dir: pytest.fail("no model loads here"))
    rng = random.Random(29)
    app = create_app(two_runs)
    c = TestClient(app, base_url=LOCAL, raise_server_exceptions=False)
    c.get("/", params={"token": app.state.ui.key})
    for _ in range(150):
        route, keys = rng.choice(ROUTES)
        url = route.format(run=rng.choice(["alpha", "bad", "%2e%2e", "nope"]))
        params = [(k, rng.choice(ODD)) for k in keys for _ in range(rng.choice([0, 1, 1, 2]))]
        response = c.get(url, params=params)
        assert response.status_code < 500, (url, params, response.text[-300:])
    for _ in range(40):
        fields = {k: rng.choice(ODD) for k in rng.sample(["recipe", "name", "trust", "overrides", "train.max_steps",
                                                          "model.name", "key"], 3)}
        for path in ("/start", "/login", f"/runs/{rng.choice(['alpha', 'bad', 'nope'])}/stop"):
            response = c.post(path, data=fields)
            assert response.status_code < 500, (path, fields, response.text[-300:])
    assert not (two_runs / ".ui").exists()  # nothing started
