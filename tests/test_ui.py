"""`tunelab ui` routes through FastAPI's TestClient: status derived from a run's files and process,
live log offsets, predictions filters, compare, user text escaped, no file outside the runs folder
(`..`, encoded, absolute, symlinks), the API key and loopback host checks, the playground's answers
equal to the evaluation's decoding, and a run started from the UI that runs to the end on its own.

Finished runs are the report's fixtures (tests/test_report.py: make_run); the playground's run has a
real tiny-test LoRA adapter (tests/test_export.py: make_fake_run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from test_export import make_fake_run
from test_report import HOSTILE, make_run
from tunelab.errors import ConfigError
from tunelab.ui import status
from tunelab.ui.app import create_app, serve_ui

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "triage" / "recipe.yaml"
LOCAL = "http://127.0.0.1:7860"
HTML = {"accept": "text/html"}


def client(runs: Path, api_key: str | None = None, login: bool = True) -> TestClient:
    """A client of a new UI server; logged in (the cookie set by the address `tunelab ui` prints) unless
    asked not to, or when an API key is given."""
    app = create_app(runs, api_key=api_key)
    c = TestClient(app, base_url=LOCAL)
    if login and api_key is None:
        assert c.get("/", params={"token": app.state.ui.key}, follow_redirects=False).status_code == 303
    return c


def append_log(run: Path, records: list[dict]) -> None:
    log = run / "train" / "log.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def train_record(step: int, elapsed_s: float = 0.0) -> dict:
    return {"kind": "train", "step": step, "loss": 2.0 / step, "token_acc": 0.1 * step, "elapsed_s": elapsed_s}


def write_recipe(run: Path, extra: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(f"name: {run.name}\nmodel:\n  name: tiny-test\nmethod: lora\n{extra}")


def write_process(runs: Path, name: str, pid: int, exit_code: int | None, console: str = "") -> None:
    folder = status.sidecar_dir(runs, name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "process.json").write_text(json.dumps({"pid": pid, "command": ["tunelab"], "started": 0,
                                                     "exit_code": exit_code}))
    (folder / "console.log").write_text(console)


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    make_run(root, name="alpha")
    make_run(root, name="beta", tuned_quality=0.5, test_file=root / "alpha-input" / "test.jsonl")
    return root


# ---------------------------------------------------------------------------------------------- status


@pytest.mark.parametrize(("facts", "expected"), [
    ({"alive": True}, "preparing"),
    ({"alive": True, "steps_logged": 3}, "training"),
    ({"alive": True, "steps_logged": 3, "trained": True}, "evaluating"),
    ({"alive": False, "exit_code": 0, "evaluated": True}, "done"),
    ({"alive": False, "evaluated": True}, "done"),
    ({"alive": False, "exit_code": 75, "steps_logged": 3}, "stopped"),
    ({"alive": False, "exit_code": -15}, "stopped"),
    ({"alive": False, "exit_code": 1, "console_tail": ["error: data.train: no such file"]}, "failed"),
    ({"alive": False, "console_tail": ["tunelab: [3/5] train", "error: boom"]}, "failed"),
    ({"alive": False, "steps_logged": 3}, "stopped"),
    ({"alive": False, "trained": True}, "stopped"),
])
def test_status_rules(facts, expected):
    arguments = {"alive": False, "exit_code": None, "trained": False, "steps_logged": 0, "evaluated": False,
                 "console_tail": [], **facts}
    assert status.derive_status(**arguments)[0] == expected


def test_failed_run_names_its_error_and_stopped_run_says_how_to_continue(tmp_path):
    runs = tmp_path / "runs"
    write_recipe(runs / "bad")
    write_process(runs, "bad", pid=2**22 + 7, exit_code=1, console="tunelab: [1/5] check\nerror: data.train: not found\n")
    write_recipe(runs / "halted")
    append_log(runs / "halted", [train_record(1, 5.0)])
    write_process(runs, "halted", pid=2**22 + 9, exit_code=75)
    bad, halted = status.read_run_state(runs, "bad"), status.read_run_state(runs, "halted")
    assert (bad.status, bad.detail) == ("failed", "error: data.train: not found")
    assert halted.status == "stopped" and "--resume" in halted.detail


def test_live_run_started_elsewhere_is_training_with_progress_and_eta(tmp_path):
    runs = tmp_path / "runs"
    run = runs / "live"
    write_recipe(run, "train:\n  max_steps: 40\n")
    append_log(run, [train_record(step, elapsed_s=2.0 * step) for step in range(1, 11)])
    state = status.read_run_state(runs, "live")
    assert (state.status, state.step, state.total_steps) == ("training", 10, 40)
    assert state.eta_s == pytest.approx(60.0)  # 30 steps left at 2 s a step
    assert state.detail.startswith("step 10 of 40")
    # train/plan.json (the autopilot's) decides the total when present
    (run / "train" / "plan.json").write_text(json.dumps({"steps": 20, "budget_s": 60.0}))
    assert status.read_run_state(runs, "live").total_steps == 20
    # nothing written for longer than the activity window: no longer counted as running
    assert status.read_run_state(runs, "live", now=time.time() + status.ACTIVE_WINDOW_S + 1).status == "stopped"


def test_running_process_is_alive_and_evaluation_progress_comes_from_its_bar(tmp_path):
    runs = tmp_path / "runs"
    run = runs / "ev"
    write_recipe(run, "eval:\n  arms: [base, rag, tuned]\n  limit: 4\n")
    (run / "data").mkdir()
    (run / "data" / "stats.json").write_text(json.dumps({"counts": {"train": 50, "test": 10}}))
    (run / "stages.json").write_text(json.dumps({"train": {"done": True, "seconds": 3}}))
    bars = "base:   0%|     | 0/12 [00:00<?]\rbase:  33%|##   | 4/12\rrag:  33%|##   | 4/12\rrag:  50%|###  | 6/12"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "tunelab"])
    try:
        write_process(runs, "ev", pid=sleeper.pid, exit_code=None, console=f"tunelab: [4/5] eval\n{bars}")
        state = status.read_run_state(runs, "ev")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert state.status == "evaluating" and state.started_by_ui
    progress = [(a.arm, a.state, a.done, a.total) for a in state.eval_progress]
    assert progress == [("base", "done", 4, 4), ("rag", "running", 2, 4), ("tuned", "waiting", 0, 4)]
    assert state.status_line == "rag:  50%|###  | 6/12"


# ---------------------------------------------------------------------------------------------- pages


def test_runs_list_links_every_run_with_status_score_verdict_and_parent(runs):
    manifest = json.loads((runs / "beta" / "manifest.json").read_text())
    (runs / "beta" / "manifest.json").write_text(json.dumps({**manifest, "parent": {"path": str(runs / "alpha")}}))
    page = client(runs).get("/").text
    for name in ("alpha", "beta"):
        assert f'<a href="/runs/{name}">{name}</a>' in page
    assert page.count('data-status="done"') == 2
    assert "93.3 [" in page and "json_field_accuracy" in page and "fine-tuning beats" in page
    assert '<a href="/runs/alpha">alpha</a></td>\n  <td data-value="' in page  # beta's parent column links alpha


def test_run_page_shows_the_verdict_first_and_embeds_the_report(runs):
    page = client(runs).get("/runs/alpha").text
    assert page.index('id="verdict"') < page.index('id="curves"') < page.index('id="report"')
    assert 'src="/runs/alpha/report"' in page
    report = client(runs).get("/runs/alpha/report")
    assert report.status_code == 200 and "default-src 'none'" in report.headers["content-security-policy"]
    assert "Where the arms disagree" in report.text


def test_log_api_returns_only_whole_new_lines_from_the_offset(tmp_path):
    runs = tmp_path / "runs"
    write_recipe(runs / "live")
    append_log(runs / "live", [train_record(1), train_record(2)])
    c = client(runs)
    first = c.get("/api/runs/live/state").json()
    assert [r["step"] for r in first["records"]] == [1, 2]
    with (runs / "live" / "train" / "log.jsonl").open("a") as f:
        f.write(json.dumps(train_record(3)) + "\n" + '{"kind": "train", "step": 4, "lo')  # 4 is half written
    second = c.get(f"/api/runs/live/state?offset={first['offset']}").json()
    assert [r["step"] for r in second["records"]] == [3]
    assert second["state"]["status"] == "training"


def test_predictions_filter_by_arm_outcome_slice_and_disagreement(runs):
    c = client(runs)
    wrong_tuned = c.get("/runs/alpha/predictions?arm=tuned&outcome=wrong").text
    rows = wrong_tuned.split("<tbody>")[1].split("</tbody>")[0]
    assert rows.count("<tr ") == rows.count('class="wrong" data-arm="tuned"') > 0
    seen = c.get("/runs/alpha/predictions?slice=seen").text.split("<tbody>")[1]
    assert "new_combo" not in seen and ">seen<" in seen
    predictions = [json.loads(line) for line in (runs / "alpha" / "eval" / "predictions.jsonl").read_text().splitlines()]
    by_id: dict[str, set] = {}
    for p in predictions:
        by_id.setdefault(p["id"], set()).add(p["score"])
    disagreeing = {i for i, scores in by_id.items() if len(scores) > 1}
    page = c.get("/runs/alpha/predictions?disagree=1").text
    assert f"the arms disagree on {len(disagreeing)} of {len(by_id)} examples" in page
    assert all(f"<td>{i} " in page for i in sorted(disagreeing)[:5])


def test_compare_shows_runs_compare_table_and_paired_test(runs, tmp_path):
    page = client(runs).get("/compare?run=alpha&run=beta").text
    assert "<th>alpha</th><th>beta</th>" in page
    assert "beta vs alpha:" in page and "p = " in page
    make_run(runs, name="other", n_examples=12)  # another test set: refused with runs compare's reason
    page = client(runs).get("/compare?run=alpha&run=other").text
    assert "were not evaluated on the same examples" in page


def test_user_text_is_escaped_everywhere(runs):
    metrics_path = runs / "alpha" / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["verdict"]["text"] = f"verdict {HOSTILE}"
    metrics_path.write_text(json.dumps(metrics))
    (runs / "<b>odd name").mkdir()
    (runs / "<b>odd name" / "recipe.yaml").write_text(f"name: x\nmodel:\n  name: '{HOSTILE}'\n")
    c = client(runs)
    for url in ("/", "/runs/alpha", "/runs/alpha/predictions?arm=base"):
        page = c.get(url).text
        assert "<script>alert" not in page and "<img src=" not in page and "<b>odd" not in page, url
    assert "&lt;script&gt;alert" in c.get("/runs/alpha/predictions?arm=base").text
    assert "&lt;b&gt;odd name" in c.get("/").text


def test_no_route_serves_a_file_outside_the_runs_folder(runs, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "recipe.yaml").write_text("name: secret\n")
    (secret / "report.html").write_text("SECRET")
    (runs / "escape").symlink_to(secret, target_is_directory=True)
    (runs / "beta" / "report.html").symlink_to(secret / "report.html")
    (runs / "alpha" / "eval" / "predictions.jsonl").unlink()
    (runs / "alpha" / "eval" / "predictions.jsonl").symlink_to(secret / "predictions.jsonl")
    (secret / "predictions.jsonl").write_text(json.dumps({"id": "1", "arm": "base", "output": "SECRET"}) + "\n")
    write_recipe(runs / "gamma")
    write_process(runs, "gamma", pid=2**22 + 11, exit_code=1)
    (status.sidecar_dir(runs, "gamma") / "console.log").unlink()
    (status.sidecar_dir(runs, "gamma") / "console.log").symlink_to(secret / "report.html")
    c = client(runs)
    for url in ("/runs/escape/report", "/runs/escape", "/runs/beta/report", "/runs/..%2Fsecret/report",
                "/runs/%2e%2e/report", "/runs/..%2F..%2Fsecret/report", f"/runs/{secret}/report",
                f"/runs/%2F{str(secret).lstrip('/').replace('/', '%2F')}/report", "/static/..%2Fapp.py",
                "/static/app.py", "/api/runs/escape/state", "/runs/escape/predictions",
                "/runs/alpha/predictions", "/runs/gamma", "/api/runs/gamma/state"):
        response = c.get(url)
        assert response.status_code == 404 and "SECRET" not in response.text, url
    assert "SECRET" not in c.get("/").text


def test_api_key_is_required_on_every_request(runs):
    c = client(runs, api_key="s3cret")
    for url in ("/", "/runs/alpha", "/runs/alpha/report", "/api/runs/alpha/state", "/static/ui.js"):
        assert c.get(url).status_code == 401, url
        assert c.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401, url
        assert c.get(url, headers={"authorization": "Bearer s3cret"}).status_code == 200, url
    assert 'name="key"' in c.get("/", headers=HTML).text  # a browser gets the login form
    assert c.post("/login", data={"key": "nope"}).status_code == 401
    logged_in = client(runs, api_key="s3cret")
    assert logged_in.post("/login", data={"key": "s3cret"}, follow_redirects=False).status_code == 303
    assert logged_in.get("/runs/alpha").status_code == 200  # the cookie carries the key


def test_other_hosts_need_an_api_key_and_loopback_checks_the_host_header(runs):
    with pytest.raises(ConfigError, match="--api-key"):
        serve_ui(runs, host="0.0.0.0", port=0)
    rebound = TestClient(create_app(runs), base_url="http://attacker.example:7860")
    assert rebound.get("/").status_code == 421
    cross_site = client(runs).post("/runs/alpha/stop", headers={"origin": "http://attacker.example"})
    assert cross_site.status_code == 403


def test_start_refuses_bad_input_with_its_message_and_starts_nothing(runs):
    (runs / "demo.yaml").write_text(EXAMPLE.read_text().replace("data/", str(EXAMPLE.parent / "data") + "/"))
    c = client(runs)
    assert "demo.yaml" in c.get("/start").text
    for fields, message in (({"name": "alpha"}, "exists"), ({"name": "../x"}, "run name"),
                            ({"name": "n1", "train.max_steps": "-3"}, "max_steps"),
                            ({"name": "n2", "overrides": "nonsense"}, "expected key=value"),
                            ({"name": "n3", "recipe": "../../etc/passwd"}, "choose one of the recipes")):
        response = c.post("/start", data={"recipe": "demo.yaml", **fields})
        assert response.status_code == 400 and message in response.text, fields
    assert not (runs / ".ui").exists()


# ---------------------------------------------------------------------------------------------- playground


def test_playground_streams_the_evaluations_answers_and_loads_the_models_once(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    from tunelab.engine.generate import DecodingSettings, generate
    from tunelab.runs import load_tuned_model
    from tunelab.ui import playground

    runs = tmp_path / "runs"
    make_fake_run(runs / "fake")
    loads = []
    real_load = playground._load
    monkeypatch.setattr(playground, "_load", lambda run_dir: loads.append(run_dir) or real_load(run_dir))
    c = client(runs)

    def ask(prompt: str) -> dict[str, dict]:
        answers: dict[str, dict] = {}
        with c.stream("GET", "/api/playground/stream", params={"run": "fake", "prompt": prompt, "arms": "base,tuned",
                                                               "max_new_tokens": 12}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    entry = answers.setdefault(data.get("arm", event), {"text": "", "events": []})
                    entry["events"].append(event)
                    entry["text"] += data.get("text", "") if event == "piece" else ""
                    entry.update(data if event == "end" else {})
        return answers

    first = ask("What is the capital of France?")
    # a client that leaves mid-answer frees the models for the next one
    with c.stream("GET", "/api/playground/stream", params={"run": "fake", "prompt": "Tell me a long story",
                                                           "arms": "tuned", "max_new_tokens": 500}) as response:
        next(line for line in response.iter_lines() if line == "event: piece")
    again = ask("And of Italy?")
    assert again["tuned"]["events"][-1] == "end" and again["base"]["events"][-1] == "end"
    assert len(loads) == 1  # loaded on the first message, kept for the next ones
    model, tokenizer = load_tuned_model(runs / "fake")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    settings = DecodingSettings(max_new_tokens=12)
    [tuned] = generate(model, tokenizer, [messages], settings)
    with model.disable_adapter(), torch.no_grad():
        [base] = generate(model, tokenizer, [messages], settings)
    assert first["tuned"]["text"] == tuned.text and first["base"]["text"] == base.text
    assert tuned.text != base.text  # the adapter matters: two different columns
    for arm, expected in (("base", base), ("tuned", tuned)):
        assert first[arm]["events"][0] == "start" and first[arm]["events"][-1] == "end"
        assert first[arm]["prompt_tokens"] == expected.prompt_tokens
        assert first[arm]["completion_tokens"] == expected.completion_tokens and first[arm]["latency_ms"] > 0


# ---------------------------------------------------------------------------------------------- a real run


def test_a_run_started_from_the_ui_runs_on_its_own_to_the_end(tmp_path, tiny_model_dir):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "demo.yaml").write_text(EXAMPLE.read_text().replace("data/", str(EXAMPLE.parent / "data") + "/"))
    c = client(runs)
    fields = {"recipe": "demo.yaml", "name": "ui-run", "train.max_steps": "2", "model.name": "tiny-test",
              "eval.limit": "2", "overrides": "train.eval_max_examples=4\neval.forgetting=false\neval.arms=[base,tuned]"}
    started = c.post("/start", data=fields, follow_redirects=False)
    assert started.status_code == 303 and started.headers["location"] == "/runs/ui-run"
    process = json.loads((runs / ".ui" / "ui-run" / "process.json").read_text())
    assert os.getsid(process["pid"]) != os.getsid(0)  # its own session: closing the tab or the UI leaves it running
    seen = set()
    deadline = time.time() + 240
    while time.time() < deadline:
        state = c.get("/api/runs/ui-run/state").json()["state"]
        seen.add(state["status"])
        if state["status"] not in ("preparing", "training", "evaluating"):
            break
        time.sleep(0.5)
    assert state["status"] == "done", c.get("/api/runs/ui-run/state").json()["console"]
    assert seen & {"preparing", "training", "evaluating"}
    console = (runs / ".ui" / "ui-run" / "console.log").read_text()
    assert re.search(r"\[\d/\d\] train", console) and "tunelab: done in" in console  # the CLI's own output
    assert 'id="verdict"' in c.get("/runs/ui-run").text


def test_a_missing_runs_folder_is_shown_not_an_error(tmp_path):
    c = client(tmp_path / "not-yet")
    assert "does not exist yet" in c.get("/").text
    for url in ("/compare", "/playground", "/start"):
        assert c.get(url).status_code == 200, url


def test_stop_sends_sigterm_to_the_run_the_ui_started(tmp_path):
    runs = tmp_path / "runs"
    write_recipe(runs / "going")
    app = create_app(runs)
    c = TestClient(app, base_url=LOCAL)
    c.get("/", params={"token": app.state.ui.key})
    started = app.state.ui.launcher.spawn("going", [sys.executable, "-c", "import time; time.sleep(60)", "tunelab"])
    try:
        deadline = time.time() + 60
        while not app.state.ui.launcher.can_stop("going"):  # the kernel sets its arguments just after its exec
            assert time.time() < deadline
            time.sleep(0.01)
        assert 'action="/runs/going/stop"' in c.get("/runs/going").text
        assert c.post("/runs/going/stop", follow_redirects=False).status_code == 303
        assert started.process.wait(timeout=10) == -15  # SIGTERM: what makes training checkpoint and exit 75
        deadline = time.time() + 10
        while json.loads((runs / ".ui" / "going" / "process.json").read_text())["exit_code"] is None:
            assert time.time() < deadline
            time.sleep(0.05)
        assert 'action="/runs/going/stop"' not in c.get("/runs/going").text  # ended: nothing left to stop
    finally:
        started.process.kill()
