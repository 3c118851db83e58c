"""Start and stop `tunelab run` from the UI, as detached processes that outlive the browser tab.

Reads recipe files in the runs folder (`*.yaml`/`*.yml` at its top level, and each run's resolved
recipe.yaml). Writes, per started run, `<runs>/.ui/<name>/process.json` ({pid, command, started,
exit_code}) and `console.log` (the process's stdout and stderr: exactly what the CLI prints). The run
folder itself is left to `tunelab run`, which refuses to start in a non-empty one.

The process runs in a new session, so closing the tab (or stopping the UI with Ctrl-C) does not stop
it; the UI records its exit code when it is still there to see it end (else tunelab.ui.status infers
the outcome from the run's files).

Stop signals only a process this server started (a Launcher keeps each one's Popen, a pidfd, and its
start time and command line from /proc): a pid read from a file is never proof that the process is
ours, so a run started by an earlier UI, or a process.json naming pid -1, 0 or another process, is
never signalled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import Recipe, load_recipe
from tunelab.errors import ConfigError
from tunelab.eval.external import refuse_secret_bearing_arms
from tunelab.eval.graders.evaluation import refuse_python_graders, refuse_secret_bearing
from tunelab.files import write_text_atomic
from tunelab.runs import RunPaths
from tunelab.specs.graders import recipe_graders
from tunelab.ui.status import sidecar_dir

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=.*$")
UI_CONSENT = "tick 'trust this run folder' if you trust this run"


def check_run_name(name: str) -> str:
    if not RUN_NAME.match(name) or ".." in name:
        raise ConfigError(f"run name '{name}': use letters, digits, '.', '_' and '-' (up to 100), starting "
                          "with a letter or digit")
    return name


def recipe_files(out_dir: Path) -> list[Path]:
    """Recipes one can start from: YAML files at the top of the runs folder, then each run's recipe.yaml."""
    if not out_dir.is_dir():
        return []
    top = sorted(p for p in out_dir.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml"))
    runs = sorted(RunPaths(p).recipe for p in out_dir.iterdir() if RunPaths(p).recipe.is_file()
                  and not p.name.startswith("."))
    return [p for p in top + runs if p.resolve().is_relative_to(out_dir.resolve())]


def _write_process(folder: Path, record: dict) -> None:
    write_text_atomic(folder / "process.json", json.dumps(record))


def proc_identity(pid: int) -> tuple[int, bytes] | None:
    """(start time in clock ticks since boot, command line) of a live, non-zombie process, from /proc;
    None when it is gone, a zombie, or /proc cannot tell."""
    if pid <= 1:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state is field 3, starttime field 22
    if len(fields) < 20 or fields[0] in ("Z", "X") or not fields[19].isdigit():
        return None
    return int(fields[19]), cmdline


@dataclass
class Started:
    """A process this server started: the Popen (whose wait thread is the only reaper of its pid), a
    pidfd where the kernel has them (a signal through it can reach no other process), and its identity:
    the start time /proc showed right after the start, and the command line it was started with."""

    process: subprocess.Popen
    pidfd: int | None
    identity: tuple[int, bytes] | None


class Launcher:
    """Starts runs and stops the ones it started, for one UI server's lifetime."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._started: dict[str, Started] = {}
        self._lock = threading.Lock()

    def start(self, recipe: Path, name: str, overrides: list[str], trusted: bool = False) -> list[str]:
        """Validate, then start `python -m tunelab run RECIPE name=NAME out_dir=OUT overrides...` detached.
        Returns the command. Bad input raises ConfigError before any process starts; so does a run
        folder's recipe.yaml that would run code or send a secret, unless `trusted` (see refuse_untrusted)."""
        out_dir = self.out_dir
        check_run_name(name)
        if recipe.resolve() not in {p.resolve() for p in recipe_files(out_dir)}:
            raise ConfigError(f"{recipe}: not a recipe in {out_dir}")
        bad = [o for o in overrides if not OVERRIDE.match(o)]
        if bad:
            raise ConfigError(f"override '{bad[0]}': expected key=value, e.g. train.max_steps=20")
        if (out_dir / name).exists() or sidecar_dir(out_dir, name).exists():
            raise ConfigError(f"{out_dir / name}: a run of that name exists; choose another name")
        arguments = [*overrides, f"name={name}", f"out_dir={out_dir.resolve()}"]
        loaded = load_recipe(recipe, arguments)  # a bad recipe or override fails here, with its file:line message
        if recipe.resolve().parent != out_dir.resolve() and not trusted:
            refuse_untrusted(recipe, loaded)
        command = [sys.executable, "-m", "tunelab", "run", str(recipe.resolve()), *arguments]
        self.spawn(name, command)
        return command

    def spawn(self, name: str, command: list[str]) -> Started:
        """Run `command` detached (a new session), its output in the sidecar's console.log; process.json
        records it and, once it ends, its exit code."""
        folder = sidecar_dir(self.out_dir, name)
        folder.mkdir(parents=True)
        console = (folder / "console.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=env)
        finally:
            console.close()
        try:
            pidfd: int | None = os.pidfd_open(process.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: the Popen and /proc checks remain
            pidfd = None
        # the command line as given, not as /proc shows it now: just after exec the kernel may not have set it yet
        seen = proc_identity(process.pid)
        expected = b"".join(os.fsencode(arg) + b"\0" for arg in command)
        started = Started(process, pidfd, (seen[0], expected) if seen is not None else None)
        with self._lock:
            self._started[name] = started
        record = {"pid": process.pid, "command": command, "started": time.time(), "exit_code": None}
        _write_process(folder, record)

        def wait() -> None:  # reaps the child (no zombie counted as alive) and keeps its exit code
            code = process.wait()
            with self._lock:
                if started.pidfd is not None:
                    os.close(started.pidfd)
                    started.pidfd = None
            record["exit_code"] = code
            _write_process(folder, record)

        threading.Thread(target=wait, name=f"tunelab-ui-wait-{name}", daemon=True).start()
        return started

    def can_stop(self, name: str) -> bool:
        """Whether run `name` is a process this server started and it is still running, as itself."""
        with self._lock:
            started = self._started.get(name)
            return started is not None and _still_ours(started)

    def stop(self, name: str) -> bool:
        """SIGTERM to a run this server started: training checkpoints and exits 75. False when it has
        ended; ConfigError for a run this server did not start."""
        with self._lock:
            started = self._started.get(name)
            if started is None:
                raise ConfigError(f"run '{name}': this UI did not start it (or started it before a restart); it "
                                  "stops only the processes it started itself: stop it where it runs (Ctrl-C)")
            if not _still_ours(started):
                return False
            if started.pidfd is not None:
                signal.pidfd_send_signal(started.pidfd, signal.SIGTERM)
            else:
                os.kill(started.process.pid, signal.SIGTERM)
            return True


def refuse_untrusted(recipe_file: Path, recipe: Recipe) -> None:
    """A run's recipe.yaml is the run folder's, not the user's: like `tunelab eval RUN`, starting from it
    runs no code it names (python graders, model code) and sends no API key to its judges or external
    arms unless the user ticks "trust" on the form. (A YAML file at the top of the runs folder is the user's own.)"""
    if recipe.model.trust_remote_code:
        raise ConfigError(f"{recipe_file}: model.trust_remote_code: true runs code shipped with the model, as the run "
                          f"folder's recipe says; tunelab does not run a run folder's code unasked: {UI_CONSENT}")
    paths = RunPaths(recipe_file.parent)
    graders = recipe_graders(recipe.eval)
    refuse_python_graders(graders, paths, UI_CONSENT)
    refuse_secret_bearing(graders, recipe.eval.pairwise, paths, UI_CONSENT)
    refuse_secret_bearing_arms(recipe.eval.external, recipe_file, UI_CONSENT)


def _still_ours(started: Started) -> bool:
    """Not reaped (so its pid is not reused), not this server or its group, and /proc shows the same
    process that was started (start time and command line)."""
    pid = started.process.pid
    if started.process.returncode is not None or pid <= 1 or pid == os.getpid():
        return False
    try:
        if os.getpgid(pid) == os.getpgrp():
            return False
    except OSError:
        return False
    return started.identity is None or proc_identity(pid) == started.identity
