"""No output folder given to tunelab loses a user's files: the current folder, its parents, the home
folder, the run being read, a symbolic link and a folder with anything tunelab did not write are
refused, with or without --force, and every file in them survives byte for byte."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.errors import ConfigError
from tunelab.files import check_output_dir, replace_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def user_tree(tmp_path, monkeypatch):
    """A user's project folder (the current folder) holding their own files and a run."""
    home = tmp_path / "home"
    project = home / "project"
    (project / "notes").mkdir(parents=True)
    (project / "train.jsonl").write_text('{"messages": []}\n')
    (project / "notes" / "plan.md").write_text("my plan")
    (home / "diary.txt").write_text("dear diary")
    run = project / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: demo\n")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.chdir(project)
    monkeypatch.setenv("HOME", str(home))
    return home, project, run


@pytest.mark.parametrize("target, reason", [
    (".", "current folder"), ("..", "it is your home folder"), ("notes/..", "current folder"), ("../..", "holds the current folder"),
    ("runs", "which this command reads"), ("runs/demo", "which this command reads"),
    ("runs/demo/out", "which this command reads"), ("notes", "did not write (plan.md)"), ("/", "root"),
])
def test_protected_output_folders_are_refused_even_with_force(user_tree, target, reason):
    home, project, run = user_tree
    before = snapshot(home)
    with pytest.raises(ConfigError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_output_dir(Path(target), reads=[run], manifest="export.json", force=True)
    assert snapshot(home) == before


def test_a_symlinked_output_folder_is_refused_and_its_target_kept(user_tree):
    home, project, run = user_tree
    (project / "link").symlink_to(project / "notes")
    with pytest.raises(ConfigError, match="symbolic link"):
        check_output_dir(project / "link", reads=[run], manifest="export.json", force=True)
    assert (project / "notes" / "plan.md").read_text() == "my plan"


def test_an_earlier_output_listed_in_its_manifest_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "export"
    replace_dir(lambda tmp: ((tmp / "a.bin").write_text("1"), (tmp / "export.json").write_text('{"files": {"a.bin": ""}}')), out)
    with pytest.raises(ConfigError, match="--force"):
        check_output_dir(out, reads=[], manifest="export.json", force=False)
    check_output_dir(out, reads=[], manifest="export.json", force=True)
    replace_dir(lambda tmp: (tmp / "b.bin").write_text("2"), out)
    assert sorted(os.listdir(out)) == ["b.bin"]
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left behind


def test_a_failed_build_keeps_the_old_folder_and_leaves_no_temporary_one(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def fail(tmp: Path) -> None:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        replace_dir(fail, out)
    assert snapshot(out) == {"old.txt": b"old"} and sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.parametrize("target", [".", "..", "notes", "runs/demo"])
def test_cli_export_force_into_a_users_folder_deletes_nothing(user_tree, target):
    home, project, run = user_tree
    before = snapshot(home)
    result = subprocess.run([sys.executable, "-m", "tunelab", "export", "runs/demo", "--out", target, "--force"],
                            capture_output=True, text=True, cwd=project,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --out") and result.stderr.count("\n") == 1
    assert snapshot(home) == before


def test_data_prepare_never_overwrites_a_users_file_of_the_same_name(tmp_path, tokenizer):
    import json

    from tunelab.config import Recipe
    from tunelab.data.prepare import prepare_data
    from tunelab.errors import DataError

    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({**chat, "messages": [{"role": "user", "content": f"q{i}"}, chat["messages"][1]]})
                           + "\n" for i in range(20)))
    out = tmp_path / "data"
    out.mkdir()
    (out / "test.jsonl").write_text("my own held-out set")
    recipe = Recipe.model_validate({"data": {"train": str(raw)}})
    with pytest.raises(ConfigError, match=r"holds test.jsonl, which data prepare would overwrite"):
        prepare_data(recipe, tokenizer, out)
    assert (out / "test.jsonl").read_text() == "my own held-out set"

    fresh = tmp_path / "fresh"
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{oops\n")
    with pytest.raises(DataError):
        prepare_data(Recipe.model_validate({"data": {"train": str(broken)}}), tokenizer, fresh)
    assert sorted(os.listdir(fresh)) == ["issues.jsonl"]
    prepare_data(recipe, tokenizer, fresh)  # its own failed output is not a user's file
    assert (fresh / "fingerprint.json").is_file()


def test_an_output_folder_under_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"notes.txt is a file, not a folder"):
        check_output_dir(tmp_path / "notes.txt" / "export", reads=[], manifest="export.json", force=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_generate_never_overwrites_a_file_it_did_not_write(tmp_path):
    import json

    from tunelab.use.chat import check_out_path

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "hi"}) + "\n")
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"my": "notes"}\n')
    with pytest.raises(ConfigError, match="not an earlier `tunelab generate` output"):
        check_out_path(source, mine)
    earlier = tmp_path / "out.jsonl"
    earlier.write_text(json.dumps({"line": 1, "id": None, "messages": [], "output": "x"}) + "\n")
    check_out_path(source, earlier)  # an earlier output may be replaced
    with pytest.raises(ConfigError, match="is a folder"):
        check_out_path(source, tmp_path)
    assert mine.read_text() == '{"my": "notes"}\n'


def test_a_file_system_refusal_is_one_line_not_a_traceback(tmp_path, tiny_model_dir):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    result = subprocess.run([sys.executable, "-m", "tunelab", "data", "prepare", str(tmp_path / "train.jsonl"),
                             "--out", str(tmp_path / "notes.txt" / "prepared"), "--model", "tiny-test"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'notes.txt'}") and "Traceback" not in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_training_never_writes_into_a_folder_of_the_users(tmp_path):
    from tunelab.config import load_recipe
    from tunelab.errors import ConfigError
    from tunelab.runs import RunPaths
    from tunelab.train.run import start_run_dir

    mine = tmp_path / "src"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    recipe = load_recipe(None, [f"out_dir={tmp_path}", "name=src", "model.name=tiny-test"])
    with pytest.raises(ConfigError, match="holds files tunelab did not write"):
        start_run_dir(RunPaths(mine), recipe, resume=False)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    start_run_dir(RunPaths(tmp_path / "new"), recipe, resume=False)  # a new or empty folder is fine
    assert (tmp_path / "new" / "recipe.yaml").is_file()
