"""A verdict on a model that is still learning is provisional and says what to run."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.eval.undertrained import assess_training, validation_trend
from tunelab.runs import RunPaths

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "triage" / "recipe.yaml"


def _run_dir(tmp_path: Path, val_losses: list[tuple[int, float]], plan: dict | None = None) -> RunPaths:
    paths = RunPaths(tmp_path / "run")
    paths.train_log.parent.mkdir(parents=True)
    paths.train_log.write_text("".join(json.dumps({"kind": "eval", "step": s, "val_loss": v}) + "\n"
                                       for s, v in val_losses))
    if plan is not None:
        paths.plan.write_text(json.dumps(plan))
    return paths


def test_validation_loss_still_falling_makes_the_verdict_provisional(tmp_path):
    paths = _run_dir(tmp_path, [(10, 2.0), (20, 1.5), (40, 1.2), (50, 1.0)],
                     {"limited_by": "budget", "budget_s": 300, "epochs": 0.5})
    trend = validation_trend(paths.train_log)
    assert (trend["from_step"], trend["to_step"]) == (40, 50) and trend["relative_change"] < -0.15
    check = assess_training(paths, train_sample_score=0.9, test_score=0.8, metric="exact_match")
    assert check["provisional"] and "validation loss -17%" in check["reason"]
    assert check["suggestion"] == "run again with train.budget=10m"  # twice what limited it


def test_a_small_absolute_drop_near_zero_loss_is_not_still_learning(tmp_path):
    paths = _run_dir(tmp_path, [(10, 1.0), (70, 0.04), (96, 0.022)], {"limited_by": "data", "epochs": 3})
    assert validation_trend(paths.train_log)["relative_change"] < -0.4
    assert not assess_training(paths, train_sample_score=1.0, test_score=0.93, metric="label_accuracy")["provisional"]


def test_a_flat_curve_and_learned_training_examples_give_a_final_verdict(tmp_path):
    paths = _run_dir(tmp_path, [(10, 2.0), (20, 1.0), (40, 0.9), (50, 0.895)], {"limited_by": "data", "epochs": 3})
    check = assess_training(paths, train_sample_score=0.95, test_score=0.9, metric="exact_match")
    assert not check["provisional"] and check["reason"] is None


def test_a_low_score_on_its_own_training_examples_is_undertrained_unless_they_were_learned(tmp_path):
    paths = _run_dir(tmp_path, [(10, 1.0), (50, 0.99)], {"limited_by": "data", "epochs": 3})
    low = assess_training(paths, train_sample_score=0.27, test_score=0.20, metric="exact_match")
    assert low["provisional"] and "exact_match on its own training examples only 27%" in low["reason"]
    assert low["suggestion"] == "run again with train.epochs=6"
    # a hard task the model did learn: far better on what it saw than on held-out examples
    hard = assess_training(paths, train_sample_score=0.45, test_score=0.2, metric="token_f1")
    assert not hard["provisional"]


def test_a_deliberately_short_run_gets_a_provisional_verdict_everywhere(tmp_path):
    """tiny-test, 2 steps: the console, metrics.json and the report all say it."""
    import subprocess
    import sys

    args = ["model.name=tiny-test", "train.max_steps=2", "train.eval_every_steps=1", "train.eval_max_examples=4",
            "eval.limit=4", "eval.max_new_tokens=4", "eval.forgetting=false", f"out_dir={tmp_path}", "name=short"]
    done = subprocess.run([sys.executable, "-m", "tunelab", "run", str(EXAMPLE), *args], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "short"
    verdict = json.loads((run / "eval" / "metrics.json").read_text())["verdict"]
    assert verdict["provisional"] is True and "still learning" in verdict["provisional_reason"]
    assert "train.max_steps=4" in verdict["provisional_reason"]
    assert verdict["text"].startswith("provisional")
    assert "provisional" in done.stdout  # the console's verdict line
    html = (run / "report.html").read_text()
    section = html[html.index('<section id="verdict"'):]
    section = section[: section.index("</section>")]
    assert "Provisional verdict" in section
