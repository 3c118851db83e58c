"""`tunelab run` end to end on the tiny model: every stage's files, stage skipping on --resume, and
a blocking data problem stopping the run with its message."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "triage" / "recipe.yaml"
FAST = ["model.name=tiny-test", "train.max_steps=2", "train.eval_every_steps=1", "train.eval_max_examples=4",
        "eval.limit=3", "eval.forgetting=false", "eval.arms=[base,rag,tuned]"]


def tunelab(*args):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True)


def test_run_writes_every_stage_and_resume_skips_finished_stages(tmp_path):
    result = tunelab("run", str(EXAMPLE), *FAST, f"out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "triage"
    for name in ("recipe.yaml", "manifest.json", "data/stats.json", "data/test.jsonl", "train/log.jsonl",
                 "train/summary.json", "adapter/adapter_config.json", "eval/metrics.json",
                 "eval/predictions.jsonl", "report.html", "report.md"):
        assert (run / name).is_file(), name
    stages = json.loads((run / "stages.json").read_text())
    assert list(stages) == ["check", "prepare", "train", "eval", "audit", "report"]
    # two steps did not show every example twice: no audit, and the report claims nothing about the data
    assert "audit: skipped" in result.stderr and not (run / "audit").exists()
    assert set(json.loads((run / "eval" / "metrics.json").read_text())["arms"]) == {"base", "rag", "tuned"}
    assert "# " in result.stdout  # the markdown report is printed at the end

    # a second plain run refuses to mix into the finished one
    again = tunelab("run", str(EXAMPLE), *FAST, f"out_dir={tmp_path}")
    assert again.returncode == 2 and "--resume" in again.stderr

    # an interrupted run (eval and report not finished) resumes from eval; training is not redone
    stages.pop("eval")
    stages.pop("report")
    (run / "stages.json").write_text(json.dumps(stages))
    (run / "eval" / "metrics.json").unlink()
    log_before = (run / "train" / "log.jsonl").read_text()
    resumed = tunelab("run", str(EXAMPLE), *FAST, f"out_dir={tmp_path}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train: finished earlier, skipped" in resumed.stderr
    assert (run / "eval" / "metrics.json").is_file()
    assert (run / "train" / "log.jsonl").read_text() == log_before


def test_data_errors_stop_the_run_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    result = tunelab("run", str(EXAMPLE), *FAST, f"out_dir={tmp_path}", f"data.train={bad}", "data.valid=null")
    assert result.returncode == 1
    assert f"{bad}:2: invalid_json" in result.stderr
    assert f"{bad}:1: no_assistant_message" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "triage" / "train").exists()


def test_training_in_child_processes_borrows_the_run_folders_lock(tmp_path):
    from tunelab.files import hold_dir_lock
    from tunelab.pipeline import TrainingFailed, _train_in_children
    from tunelab.runs import RunPaths

    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    hold_dir_lock(paths.root)  # as start_run_dir does
    take = "import sys; from pathlib import Path; from tunelab.files import hold_dir_lock; hold_dir_lock(Path(sys.argv[1]))"
    _train_in_children([sys.executable, "-c", take, str(paths.root)], paths, "tunelab run r.yaml --resume --nproc=2")
    # a process not started by the holder is refused; a failing child stops the run with how to resume
    refused = subprocess.run([sys.executable, "-c", take, str(paths.root)], capture_output=True, text=True)
    assert refused.returncode == 1 and "FolderBusy" in refused.stderr
    with pytest.raises(TrainingFailed, match=r"exit code 3\).*Resume with: tunelab run r.yaml --resume --nproc=2$"):
        _train_in_children([sys.executable, "-c", "raise SystemExit(3)"], paths, "tunelab run r.yaml --resume --nproc=2")


def test_the_training_stage_trains_on_the_data_the_prepare_stage_made(tmp_path, monkeypatch):
    """`tunelab run` prepares once: its training stage is handed what the prepare stage made. Resumed with
    the prepare stage finished, the training stage runs the data stage itself, which reuses data/ as it is."""
    import tunelab.eval.run as evaluation
    import tunelab.train.run as training
    import tunelab.train.start as start
    from tunelab.config import load_recipe
    from tunelab.pipeline import run_pipeline
    from tunelab.runs import RunPaths

    class Stop(Exception):
        pass

    prepared, trained_on = [], []
    prepare_run = start.prepare_run
    monkeypatch.setattr(start, "prepare_run", lambda recipe, paths: prepared.append(prepare_run(recipe, paths))
                        or prepared[-1])

    def train(recipe, **kwargs):
        trained_on.append(kwargs["started"])
        RunPaths(recipe.run_dir).train_log.parent.mkdir(parents=True, exist_ok=True)
        RunPaths(recipe.run_dir).train_log.touch()  # training began: the folder is kept for --resume

    monkeypatch.setattr(training, "train", train)
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: (_ for _ in ()).throw(Stop()))
    recipe = load_recipe(EXAMPLE, [*FAST, f"out_dir={tmp_path}"])
    with pytest.raises(Stop):
        run_pipeline(recipe)
    assert len(prepared) == 1 and trained_on == prepared and not prepared[0].data.reused
    assert RunPaths(recipe.run_dir).manifest.is_file()  # written by the prepare stage, with data/

    stages = json.loads(RunPaths(recipe.run_dir).stages.read_text())
    assert list(stages) == ["check", "prepare", "train"]  # eval stopped the run
    stages.pop("train")
    RunPaths(recipe.run_dir).stages.write_text(json.dumps(stages))
    with pytest.raises(Stop):
        run_pipeline(recipe, resume=True)
    assert len(prepared) == 2 and trained_on[1] is prepared[1] and prepared[1].data.reused
