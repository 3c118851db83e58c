"""A run folder keeps working when it moves: eval.graders_file is copied into it as training starts
(train/start.py), and open_run reads the copy when the recipe's absolute path is gone (runs.py)."""

from __future__ import annotations

import shutil

import pytest

from tunelab.config import load_recipe
from tunelab.errors import ConfigError
from tunelab.runs import RunPaths, open_run
from tunelab.specs.graders import read_graders_file
from tunelab.train.start import start_run_dir

GRADERS = '[{"type": "string_check", "name": "said_hi", "input": "{{ sample.output_text }}", "reference": "hi", "operation": "like"}]\n'


def _started_run(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "graders.json").write_text(GRADERS)
    (user / "recipe.yaml").write_text("model: {name: tiny-test}\neval: {graders_file: graders.json, primary: said_hi}\n")
    recipe = load_recipe(user / "recipe.yaml", [f"out_dir={tmp_path / 'runs'}", "name=r"])
    paths = RunPaths(recipe.run_dir)
    start_run_dir(paths, recipe, resume=False)
    return user, paths


def test_moved_run_reads_its_copy_of_the_graders_file(tmp_path, capsys):
    user, paths = _started_run(tmp_path)
    assert paths.graders_copy.read_text() == GRADERS
    assert str(user / "graders.json") in paths.recipe.read_text()  # the recipe keeps the user's path

    # where it was made: the user's file
    assert open_run(paths.root)[1].eval.graders_file == str(user / "graders.json")
    # moved elsewhere and the user's folder gone: the run's copy, said once
    moved = tmp_path / "elsewhere" / "r"
    shutil.move(str(paths.root), moved)
    shutil.rmtree(user)
    capsys.readouterr()
    _, recipe = open_run(moved)
    assert recipe.eval.graders_file == str(RunPaths(moved).graders_copy)
    assert [g.name for g in read_graders_file(recipe.eval.graders_file)] == ["said_hi"]
    said = capsys.readouterr().err
    assert "eval.graders_file" in said and "using the run's copy" in said


def test_without_the_copy_the_error_names_the_missing_file(tmp_path):
    user, paths = _started_run(tmp_path)
    paths.graders_copy.unlink()
    (user / "graders.json").unlink()
    with pytest.raises(ConfigError, match=r"graders.json: graders file not found"):
        open_run(paths.root)


def test_the_status_page_reads_a_moved_runs_recipe_quietly(tmp_path, capsys):
    from tunelab.ui.status import _recipe

    user, paths = _started_run(tmp_path)
    moved = tmp_path / "elsewhere" / "r"
    shutil.move(str(paths.root), moved)
    shutil.rmtree(user)
    capsys.readouterr()
    recipe = _recipe(RunPaths(moved))
    assert recipe is not None and recipe.eval.graders_file == str(RunPaths(moved).graders_copy)
    assert capsys.readouterr().err == ""  # the page polls: it does not repeat the note each time
    RunPaths(moved).graders_copy.unlink()
    assert _recipe(RunPaths(moved)) is None  # no copy either: shown without its recipe, as before
