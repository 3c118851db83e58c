"""Start and stop `tunelab run` from the UI, as detached processes that outlive the browser tab.

Reads recipe files in the runs folder (`*.yaml`/`*.yml` at its top level, and each run's resolved
recipe.yaml). Writes, per started run, `<runs>/.ui/<name>/process.json` ({pid, command, started,
exit_code}) and `console.log` (the process's stdout and stderr: exactly what the CLI prints). The run
folder itself is left to `tunelab run`, which refuses to start in a non-empty one.

The process runs in a new session, so closing the tab (or stopping the UI with Ctrl-C) does not stop
it; the UI records its exit code when it is still there to see it end (else tunelab.ui.status infers
the outcome from the run's files).
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
from pathlib import Path

from tunelab.errors import ConfigError
from tunelab.files import write_text_atomic
from tunelab.ui.status import read_process, sidecar_dir

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=.*$")


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
    runs = sorted(p / "recipe.yaml" for p in out_dir.iterdir() if (p / "recipe.yaml").is_file()
                  and not p.name.startswith("."))
    return [p for p in top + runs if p.resolve().is_relative_to(out_dir.resolve())]


def _write_process(folder: Path, record: dict) -> None:
    write_text_atomic(folder / "process.json", json.dumps(record))


def start_run(out_dir: Path, recipe: Path, name: str, overrides: list[str]) -> list[str]:
    """Validate, then start `python -m tunelab run RECIPE name=NAME out_dir=OUT overrides...` detached.
    Returns the command. Bad input raises ConfigError before any process starts."""
    from tunelab.config import load_recipe

    check_run_name(name)
    if recipe.resolve() not in {p.resolve() for p in recipe_files(out_dir)}:
        raise ConfigError(f"{recipe}: not a recipe in {out_dir}")
    bad = [o for o in overrides if not OVERRIDE.match(o)]
    if bad:
        raise ConfigError(f"override '{bad[0]}': expected key=value, e.g. train.max_steps=20")
    if (out_dir / name).exists() or sidecar_dir(out_dir, name).exists():
        raise ConfigError(f"{out_dir / name}: a run of that name exists; choose another name")
    arguments = [*overrides, f"name={name}", f"out_dir={out_dir.resolve()}"]
    load_recipe(recipe, arguments)  # a bad recipe or override fails here, with its file:line message
    command = [sys.executable, "-m", "tunelab", "run", str(recipe.resolve()), *arguments]
    folder = sidecar_dir(out_dir, name)
    folder.mkdir(parents=True)
    console = (folder / "console.log").open("ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env)
    finally:
        console.close()
    record = {"pid": process.pid, "command": command, "started": time.time(), "exit_code": None}
    _write_process(folder, record)

    def wait() -> None:  # reaps the child (no zombie counted as alive) and keeps its exit code
        record["exit_code"] = process.wait()
        _write_process(folder, record)

    threading.Thread(target=wait, name=f"tunelab-ui-wait-{name}", daemon=True).start()
    return command


def stop_run(out_dir: Path, name: str) -> bool:
    """SIGTERM to a run the UI started: training checkpoints and exits 75. False when it is not running."""
    process = read_process(out_dir, name)
    if process is None or not process.alive:
        return False
    os.kill(process.pid, signal.SIGTERM)
    return True
