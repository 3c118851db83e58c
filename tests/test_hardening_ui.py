"""The web app under hostile run folders and requests: Stop signals only a process this server started
(never a pid read from a file: -1, 0, 1, the UI's own, another process), ..."""

from __future__ import annotations

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
    c = TestClient(create_app(runs), base_url=LOCAL)
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
        assert earlier.can_stop("x")
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
        identity = launch.proc_identity(started.process.pid)
        assert identity == started.identity and identity[1] == b"\0".join(c.encode() for c in SLEEP) + b"\0"
        started.identity = (identity[0] + 1, identity[1])  # as if the pid now named a process started later
        assert not ui.can_stop("x") and ui.stop("x") is False
        assert started.process.poll() is None
        started.identity = identity
        assert ui.stop("x") is True
        assert started.process.wait(timeout=10) == -signal.SIGTERM
        deadline = time.time() + 10
        while ui.can_stop("x"):  # reaped by its wait thread: never signalled again
            assert time.time() < deadline
            time.sleep(0.02)
        assert ui.stop("x") is False
    finally:
        started.process.kill()


@pytest.mark.parametrize("pid", [-1, 0, 1, 2**40])
def test_proc_identity_names_no_process_for_impossible_pids(pid):
    assert launch.proc_identity(pid) is None
