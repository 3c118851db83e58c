"""`tunelab ui` in a real browser: Playwright drives the system Chromium (/usr/bin/chromium, nothing
downloaded) against `tunelab ui --port 0` serving a runs folder built here: two finished runs on the
same test set (tests/test_report.py: make_run), one with a real tiny-test LoRA adapter for the
playground (tests/test_export.py: make_fake_run), and a live run whose train/log.jsonl this test appends
to. Checks the runs list, the live curve gaining a point, a run's verdict and embedded report, compare,
and the playground's streamed answers; saves a screenshot of each page into pytest's tmp_path, so a
test run leaves the checkout as it was. To refresh the pictures of docs/ui.md (docs/ui/*.png), run it
with TUNELAB_UPDATE_SCREENSHOTS=1:

    TUNELAB_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest -q tests/test_ui_browser.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_export import make_fake_run
from test_report import make_run

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SHOTS = Path(__file__).resolve().parents[1] / "docs" / "ui"
UPDATE_SHOTS = os.environ.get("TUNELAB_UPDATE_SCREENSHOTS") == "1"
PAGES = ("runs", "run-live", "run-report", "compare", "playground")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: apt-get install -y chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is absent: pip install playwright")


def log_record(step: int) -> str:
    return json.dumps({"kind": "train", "step": step, "loss": 2.5 * 0.9**step, "token_acc": 0.3 + 0.02 * step,
                       "elapsed_s": 3.0 * step}) + "\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("ui") / "runs"
    make_run(root, name="triage-lora")
    make_run(root, name="triage-small", tuned_quality=0.6, test_file=root / "triage-lora-input" / "test.jsonl")
    make_fake_run(root / "tiny")
    make_run(root, name="tiny", model="tiny-test", n_examples=12)
    # its train split: the playground's system prompt and the rag arms' retrieval pool
    (root / "tiny" / "data" / "train.jsonl").write_text((root / "tiny" / "data" / "test.jsonl").read_text())
    live = root / "live"
    (live / "train").mkdir(parents=True)
    (live / "recipe.yaml").write_text("name: live\nmodel:\n  name: smollm2-135m-instruct\nmethod: lora\n"
                                      "train:\n  max_steps: 30\n")
    (live / "train" / "log.jsonl").write_text("".join(log_record(step) for step in range(1, 9)))
    return root


@pytest.fixture(scope="module")
def server_and_token(runs):
    # from the runs folder's parent, so pages (and screenshots) name it "runs"
    python_path = os.pathsep.join(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "--out-dir", "runs", "--port", "0"],
                               cwd=runs.parent, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": python_path})
    line = process.stderr.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", line)
    assert match, line + process.stderr.read() if process.poll() is not None else line
    yield f"http://127.0.0.1:{match[1]}", match[2]
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(server_and_token):
    return server_and_token[0]


@pytest.fixture(scope="module")
def page(server_and_token):
    server, token = server_and_token
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        requests: list[str] = []
        context.on("request", lambda request: requests.append(request.url))
        tab = context.new_page()
        tab.set_default_timeout(20_000)
        tab.goto(f"{server}/?token={token}")  # the address `tunelab ui` printed: its key goes into a cookie
        assert "?token=" not in tab.url
        yield tab
        browser.close()
        outside = [url for url in requests if not url.startswith(server)]
        assert not outside, f"the UI reached outside itself: {outside[:3]}"


def docs_shots_stat() -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(DOCS_SHOTS.glob("*.png"))}


@pytest.fixture(scope="module")
def docs_shots_before() -> dict[str, tuple[int, int]]:
    return docs_shots_stat()


@pytest.fixture(scope="module")
def shots(tmp_path_factory, docs_shots_before) -> Path:
    """Where the screenshots go: docs/ui/ only when asked (TUNELAB_UPDATE_SCREENSHOTS=1)."""
    return DOCS_SHOTS if UPDATE_SHOTS else tmp_path_factory.mktemp("screenshots")


def shot(page, shots: Path, name: str, full_page: bool = True) -> None:
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=full_page)


def test_runs_list_links_each_run_and_sorts(page, server, shots):
    page.goto(server + "/")
    rows = page.locator("#runs tbody tr")
    assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.run)")) == ["live", "tiny", "triage-lora",
                                                                                 "triage-small"]
    assert page.locator('tr[data-run="live"] .status').inner_text() == "training"
    assert page.locator('tr[data-run="triage-lora"] .status').inner_text() == "done"
    page.locator("#runs th", has_text="tuned score").click()  # highest first
    order = rows.evaluate_all("rows => rows.map(r => r.dataset.run)")
    assert order.index("triage-lora") < order.index("triage-small")
    shot(page, shots, "runs")
    page.locator('a[href="/runs/triage-lora"]').click()
    page.wait_for_url(server + "/runs/triage-lora")


def test_live_run_curve_gains_a_point_while_watched(page, server, runs, shots):
    page.goto(server + "/runs/live")
    loss = page.locator("#chart-loss")
    page.wait_for_function("() => document.querySelector('#chart-loss').dataset.points === '8'")
    assert page.locator("#status").inner_text() == "training"
    assert "step 8 of 30" in page.locator("#detail").inner_text() and "ETA" in page.locator("#eta").inner_text()
    with (runs / "live" / "train" / "log.jsonl").open("a") as f:
        f.write(log_record(9))
    page.wait_for_function("() => document.querySelector('#chart-loss').dataset.points === '9'")
    assert "step 9 of 30" in page.locator("#detail").inner_text()
    assert loss.locator("path.train").count() == 1
    shot(page, shots, "run-live")


def test_finished_run_shows_verdict_and_report(page, server, shots):
    page.goto(server + "/runs/triage-lora")
    assert page.locator("#verdict").inner_text().startswith("Verdict: fine-tuning beats")
    report = page.frame_locator("#report")
    assert report.locator("h2", has_text="Where the arms disagree").count() == 1
    page.wait_for_function("() => document.querySelector('#chart-loss').dataset.points === '40'")
    shot(page, shots, "run-report", full_page=False)  # the top: verdict, curves, the report begins
    page.goto(server + "/runs/triage-lora/predictions?arm=tuned&outcome=wrong")
    arms = page.locator("#predictions tbody tr").evaluate_all("rows => rows.map(r => r.dataset.arm + r.className)")
    assert arms and set(arms) == {"tunedwrong"}


def test_compare_two_runs(page, server, shots):
    page.goto(server + "/compare")
    page.check('input[name="run"][value="triage-lora"]')
    page.check('input[name="run"][value="triage-small"]')
    page.click("#compare-form button")
    assert "triage-small vs triage-lora" in page.locator("#paired-tests").inner_text()
    assert page.locator("#comparison thead th").all_inner_texts()[1:] == ["triage-lora", "triage-small"]
    shot(page, shots, "compare")


def test_playground_streams_base_tuned_and_rag_side_by_side(page, server, shots):
    page.goto(server + "/playground?run=tiny")
    assert page.input_value("#pg-system") == "Triage the ticket. Reply with JSON only."  # the task's, from train
    page.fill("#pg-prompt", "My router never came, order 10001!")
    page.fill("#pg-max", "16")
    page.check('input[name="arm"][value="tuned+rag"]')
    page.click("#pg-send")
    for arm in ("base", "tuned", "tuned+rag"):
        page.wait_for_selector(f'article[data-arm="{arm}"][data-done="yes"]', timeout=60_000)
    texts = page.locator(".answer-text").all_inner_texts()
    assert any(text.strip() for text in texts)  # the random tiny base model may answer with end-of-turn at once
    prompt_tokens = {}
    for arm in ("base", "tuned", "tuned+rag"):
        stats = page.locator(f'article[data-arm="{arm}"] .answer-stats').inner_text()
        found = re.search(r"(\d+) prompt tokens · \d+ completion tokens · \d+ ms", stats)
        assert found, stats
        prompt_tokens[arm] = int(found[1])
    assert prompt_tokens["base"] == prompt_tokens["tuned"] < prompt_tokens["tuned+rag"]  # retrieval adds examples
    assert page.locator("#pg-status").inner_text() == "done"
    shot(page, shots, "playground")


def test_each_page_was_photographed_and_docs_ui_is_untouched_unless_asked(shots, docs_shots_before):
    assert sorted(p.stem for p in shots.glob("*.png")) == sorted(PAGES)  # the tests above took them
    if not UPDATE_SHOTS:
        assert docs_shots_stat() == docs_shots_before  # `make test` leaves the git tree clean
