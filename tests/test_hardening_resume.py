"""The README's own layout: `my-task.yaml` beside `data/train.jsonl`, run from that folder. The run's
stored recipe.yaml names the user's files by absolute path, so `tunelab run my-task.yaml --resume`
(printed when a run stops) finds the recipe unchanged, and the report's "reproduce" command trains on
the user's data again (not on the run's own prepared split, which lives at RUN/data/train.jsonl)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tunelab.config import load_recipe

EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "examples" / "triage" / "data" / "train.jsonl"
FAST = ["model.name=tiny-test", "train.max_steps=2", "train.eval_every_steps=1", "train.eval_max_examples=4",
        "eval.limit=2", "eval.forgetting=false", "eval.arms=[base,tuned]"]
RECIPE = "name: my-task\nmodel: {name: smollm2-135m-instruct}\ndata:\n  train: data/train.jsonl\n"


def tunelab(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # PYTHONPATH made absolute: the commands run from the user's folder, not this checkout
    python_path = os.pathsep.join(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": python_path})


def test_the_readme_layout_resumes_and_reproduces_from_its_own_folder(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text("".join(EXAMPLE_DATA.read_text().splitlines(True)[:40]))
    (project / "my-task.yaml").write_text(RECIPE)

    first = tunelab(project, "run", "my-task.yaml", *FAST)
    assert first.returncode == 0, first.stderr[-3000:]
    run = project / "runs" / "my-task"
    stored = yaml.safe_load((run / "recipe.yaml").read_text())
    assert stored["data"]["train"] == str(project / "data" / "train.jsonl")  # absolute: found from anywhere
    assert (run / "data" / "train.jsonl").is_file()  # the prepared split a relative path would have named
    assert load_recipe(run / "recipe.yaml").data.train == str(project / "data" / "train.jsonl")

    # the command printed after a stop: the recipe is the same one
    resumed = tunelab(project, "run", "my-task.yaml", *FAST, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "changed" not in resumed.stderr and "train: finished earlier, skipped" in resumed.stderr

    # the report's reproduce command, from another folder, as a new run: the user's 40 records again
    reproduce = tunelab(tmp_path, "run", str(run / "recipe.yaml"), "name=again")
    assert reproduce.returncode == 0, reproduce.stderr[-3000:]
    counts = [json.loads((folder / "data" / "stats.json").read_text())["counts"]
              for folder in (run, tmp_path / "runs" / "again")]  # out_dir stays relative: where one runs it
    assert counts[0] == counts[1]
    assert sum(counts[0][split] for split in ("train", "valid", "test")) == 40


def test_data_paths_in_overrides_are_made_absolute_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "elsewhere.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(None, ["data.train=elsewhere.jsonl", "data.valid=missing.jsonl"])
    assert recipe.data.train == str(tmp_path / "elsewhere.jsonl")
    assert recipe.data.valid == str(tmp_path / "missing.jsonl")
