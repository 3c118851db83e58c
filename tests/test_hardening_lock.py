"""One writer per run folder: while one process writes a run (training, or a --resume of it), a second
`tunelab run --resume` (or train, update, rebase, UI start) of the same run is refused at once, in one
line, and writes nothing; the lock is on the folder itself (no file is added to the run) and ends with
its process."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tunelab.config import load_recipe
from tunelab.errors import ConfigError
from tunelab.runs import RunPaths
from tunelab.train.run import start_run_dir

HOLDER = """
import sys, time
from pathlib import Path
from tunelab.files import hold_dir_lock
hold_dir_lock(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def run_and_holder(tmp_path):
    recipe = load_recipe(None, [f"out_dir={tmp_path}", "name=busy", "model.name=tiny-test"])
    paths = RunPaths(recipe.run_dir)
    paths.root.mkdir(parents=True)
    paths.recipe.write_text(recipe.to_yaml())
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(paths.root)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield recipe, paths, holder
    holder.kill()
    holder.wait()


def test_a_second_writer_of_a_run_is_refused_and_writes_nothing(run_and_holder):
    recipe, paths, holder = run_and_holder
    before = paths.recipe.stat().st_mtime_ns
    with pytest.raises(ConfigError) as refused:
        start_run_dir(paths, recipe, resume=True)
    assert str(refused.value) == (f"{paths.root}: another tunelab process is writing this run; wait for it to end, "
                                  "or stop it (Ctrl-C checkpoints a training), then --resume")
    assert paths.recipe.stat().st_mtime_ns == before and sorted(p.name for p in paths.root.iterdir()) == ["recipe.yaml"]
    holder.kill()
    holder.wait()
    start_run_dir(paths, recipe, resume=True)  # the holder is gone: so is its lock
    start_run_dir(paths, recipe, resume=True)  # this process holds it now: its own stages go on


def test_the_cli_refuses_a_second_resume_in_one_line(run_and_holder, tmp_path):
    from test_pipeline import EXAMPLE, FAST, tunelab

    recipe, paths, holder = run_and_holder
    paths.recipe.unlink()  # the CLI's own recipe is written on the first start; here the holder is first
    started = time.monotonic()
    result = tunelab("run", str(EXAMPLE), *FAST, f"out_dir={tmp_path}", "name=busy", "--resume")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "another tunelab process is writing this run" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60  # refused, not waiting for the holder
