"""The training planner: step size and passes from the data, the steps that fit a budget, and the
run-level behaviour (plan.json, the schedule made for the steps taken, max_steps deciding the length,
the budget's hard stop)."""

from __future__ import annotations

import json
import math

import pytest

from tunelab.config import TrainConfig, load_recipe, parse_duration
from tunelab.data.pack import Step
from tunelab.train.plan import (
    BUDGET_MARGIN,
    MIN_EVAL_EXAMPLES,
    Throughput,
    auto_epochs,
    auto_eval_examples,
    auto_examples_per_step,
    budget_binds,
    eval_interval,
    plan_from_data,
    steps_that_fit,
)


@pytest.mark.parametrize(("n", "per_step", "epochs"), [
    (10, 4, 10.0),      # tiny: small steps, passes until 100 examples were seen
    (150, 4, 3.0),
    (600, 16, 3.0),
    (1000, 16, 3.0),
    (100_000, 256, 0.25),  # large: the biggest step, a quarter of the data (25k examples seen)
])
def test_step_size_and_passes_follow_the_number_of_examples(n, per_step, epochs):
    assert auto_examples_per_step(n) == per_step
    assert auto_epochs(n) == epochs


@pytest.mark.parametrize("n", [150, 200, 300, 600, 1000])
def test_a_few_hundred_examples_get_at_least_100_optimizer_steps(n):
    steps_per_epoch = math.ceil(n / auto_examples_per_step(n))
    assert steps_per_epoch * auto_epochs(n) >= 100


@pytest.mark.parametrize("length", [20, 400])
def test_tokens_per_step_is_examples_per_step_times_the_mean_length(length):
    plan = plan_from_data([length] * 600, TrainConfig())
    assert plan.tokens_per_step == 16 * length
    assert plan.examples_per_step == pytest.approx(16)
    assert plan.epochs == 3.0
    assert plan.sources["tokens_per_step"] == "auto" and plan.sources["budget"] == "auto"


def test_keys_the_user_set_win_over_auto():
    cfg = TrainConfig(tokens_per_step=1000, epochs=1.5, eval_every_steps=7, checkpoint_every_steps=9)
    plan = plan_from_data([50] * 600, cfg)
    assert (plan.tokens_per_step, plan.epochs) == (1000, 1.5)
    assert plan.sources["tokens_per_step"] == plan.sources["epochs"] == "recipe"
    assert eval_interval(cfg, 100) == (7, 9)
    assert eval_interval(TrainConfig(), 95) == (10, 10)  # auto: about 10 evaluations, checkpoints with them


def test_max_steps_decides_the_length_and_epochs_are_ignored():
    plan = plan_from_data([50] * 600, TrainConfig(max_steps=40, epochs=1))
    assert plan.epochs is None


def test_the_budget_binds_unless_the_user_fixed_the_length():
    assert budget_binds(TrainConfig())
    assert not budget_binds(TrainConfig(epochs=2))
    assert not budget_binds(TrainConfig(max_steps=10))
    assert budget_binds(TrainConfig(epochs=2, budget="5m"))  # an explicit budget binds everything
    assert not budget_binds(TrainConfig(budget=None))


def test_budget_defaults_per_device_and_durations_parse():
    assert TrainConfig().budget_s("cpu") == 600 and TrainConfig().budget_s("cuda") == 3600
    assert [parse_duration(t) for t in ("90s", "10m", "2h", "1h30m", "45")] == [90, 600, 7200, 5400, 45]
    for bad in ("10 minutes", "-5", "inf", "nan", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_a_bad_budget_is_one_line_naming_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  budget: ten minutes\n")
    with pytest.raises(Exception) as err:
        load_recipe(recipe)
    assert str(err.value).startswith(f"{recipe}:2: train.budget:") and "10m" in str(err.value)


def _steps(n: int, tokens: int) -> list[Step]:
    return [Step(0, i, ((),), tokens, tokens // 2, (i + 1) / n) for i in range(n)]


def test_steps_that_fit_keep_training_and_evaluations_inside_the_budget():
    plan = _steps(500, 1000)
    speed = Throughput(train_tokens_per_s=1000.0, eval_tokens_per_s=3000.0)  # 1 s a step
    steps, estimated = steps_that_fit(plan, available_s=120, throughput=speed, eval_tokens=3000, has_eval=True)
    assert estimated <= BUDGET_MARGIN * 120
    # one more step would not fit: the answer is the largest that does
    more, more_s = steps_that_fit(plan[: steps + 1], available_s=10**6, throughput=speed, eval_tokens=3000, has_eval=True)
    assert more == steps + 1 and more_s > BUDGET_MARGIN * 120
    assert steps_that_fit(plan[:50], 10**6, speed, 3000, True)[0] == 50  # room to spare: the whole plan


def test_a_budget_that_allows_few_steps_makes_them_smaller():
    from tunelab.train.plan import MIN_STEPS_UNDER_BUDGET, smaller_step_for_budget

    plan = _steps(200, 16 * 80)  # 16 examples of 80 tokens a step
    assert MIN_STEPS_UNDER_BUDGET == 200
    # 37 steps fit: the same 47k tokens as ~148 steps of 4 examples (4 is the floor)
    assert smaller_step_for_budget(plan, fit=37, mean_tokens=80, examples_per_step=16) == 4
    # 60 steps fit: 77k tokens, ~240 steps of 4 (8 would be ~120: fewer than 200)
    assert smaller_step_for_budget(plan, fit=60, mean_tokens=80, examples_per_step=16) == 4
    # 120 steps fit: 154k tokens, ~240 steps of 8 (the power of two at or below 9.6 examples)
    assert smaller_step_for_budget(plan, fit=120, mean_tokens=80, examples_per_step=16) == 8
    for fit in range(1, MIN_STEPS_UNDER_BUDGET):  # whenever a step is made smaller, at least 200 of them fit
        smaller = smaller_step_for_budget(plan, fit=fit, mean_tokens=80, examples_per_step=16)
        if smaller is not None and smaller > 4:
            assert fit * 16 / smaller >= MIN_STEPS_UNDER_BUDGET
    assert smaller_step_for_budget(plan, fit=MIN_STEPS_UNDER_BUDGET, mean_tokens=80, examples_per_step=16) is None
    assert smaller_step_for_budget(plan, fit=5, mean_tokens=80, examples_per_step=4) is None  # 4 is the floor


def test_evaluation_size_shrinks_with_the_budget_but_not_below_a_floor():
    speed = Throughput(100.0, 300.0)
    assert auto_eval_examples(TrainConfig(), None, None, 60) == 200  # no budget: as before
    small = auto_eval_examples(TrainConfig(), 60, speed, 60)
    large = auto_eval_examples(TrainConfig(), 36_000, speed, 60)
    assert small == MIN_EVAL_EXAMPLES and large == 200
    assert auto_eval_examples(TrainConfig(eval_max_examples=17), 60, speed, 60) == 17


def test_evaluation_size_follows_the_training_that_will_run_without_a_budget():
    from tunelab.train.plan import EVAL_SHARE

    # 40 steps of 1200 tokens, 10 evaluations: at the measured 3x speed of a forward pass, 15% of the
    # training time evaluates 0.15/0.85 * 48k * 3 = 25.4k tokens, 11 times 2 x 60 tokens: 19 examples
    speed = Throughput(100.0, 300.0)
    assert auto_eval_examples(TrainConfig(), None, speed, 60, train_tokens=48_000, evaluations=10) == MIN_EVAL_EXAMPLES
    n = auto_eval_examples(TrainConfig(), None, speed, 60, train_tokens=480_000, evaluations=10)
    assert n == int(EVAL_SHARE / (1 - EVAL_SHARE) * 480_000 * 3 / 11 / 120) == 192
    # nothing measured: a forward pass is taken as 3x the training speed, the same answer
    assert auto_eval_examples(TrainConfig(), None, None, 60, train_tokens=480_000, evaluations=10) == 192
    assert auto_eval_examples(TrainConfig(), None, None, 60, train_tokens=10**9, evaluations=10) == 200
    # the budget's size stays an upper bound; a set value wins
    assert auto_eval_examples(TrainConfig(), 60, speed, 60, train_tokens=10**9) == MIN_EVAL_EXAMPLES
    assert auto_eval_examples(TrainConfig(eval_max_examples=500), None, None, 60, train_tokens=100) == 500


# ---------------------------------------------------------------------------------------------- runs

FAST = ["model.name=tiny-test", "eval.forgetting=false", "eval.limit=4", "eval.max_new_tokens=4"]


def _train(example_recipe, out_dir, *overrides):
    from tunelab.train.run import train

    recipe = load_recipe(example_recipe, [*FAST, f"out_dir={out_dir}", *overrides])
    return train(recipe, progress=False), recipe


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "train" / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def example_recipe():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "examples" / "triage" / "recipe.yaml"


AUTO_TRAIN = ["train.max_steps=null", "train.epochs=auto", "train.tokens_per_step=auto", "train.eval_every_steps=auto",
              "train.checkpoint_every_steps=auto", "train.eval_max_examples=auto", "train.micro_batch_tokens=null",
              "train.early_stop_patience=null"]


def test_a_budget_run_writes_its_plan_and_its_schedule_ends_where_the_run_does(example_recipe, tmp_path, monkeypatch):
    import tunelab.train.plan as plan_module

    # a machine as slow as the default model on 2 cores (the tiny model is ~50x faster): few steps fit
    measured = []
    monkeypatch.setattr(plan_module, "measure_throughput",
                        lambda *a, **k: measured.append(1) or Throughput(train_tokens_per_s=300.0, eval_tokens_per_s=900.0))
    result, recipe = _train(example_recipe, tmp_path, *AUTO_TRAIN, "train.budget=40s", "name=b")
    plan = json.loads((result.run_dir / "train" / "plan.json").read_text())
    summary = json.loads((result.run_dir / "train" / "summary.json").read_text())
    assert plan["limited_by"] == "budget" and plan["budget_s"] == 40 and plan["train_tokens_per_s"] == 300
    assert measured == [1]  # measured once, reused when the steps were made smaller
    # fewer than 100 steps of 16 examples fit: the same tokens in steps of 4
    assert (round(plan["examples_per_step_before_budget"]), round(plan["examples_per_step"])) == (16, 4)
    assert "instead of 16" in plan["reason"] and "budget 40s" in plan["reason"] and plan["sources"]["epochs"] == "auto"
    assert plan["estimated_s"] <= 0.92 * 40
    # the whole stage stayed within the budget (+10%), and the cosine ran to its floor on the last step
    assert summary["wall_time_s"] <= 44 and not summary["budget_reached"]
    steps = [r for r in _log(result.run_dir) if r["kind"] == "train"]
    assert len(steps) == plan["steps"] >= 3
    assert steps[-1]["lr"] == pytest.approx(recipe.train.lr * recipe.train.min_lr_ratio)
    assert steps[-2]["lr"] > steps[-1]["lr"]


def test_max_steps_sets_the_run_length_whatever_the_epochs(example_recipe, tmp_path):
    result, _ = _train(example_recipe, tmp_path, "train.max_steps=3", "train.epochs=0.001", "name=m",
                       "train.eval_every_steps=100")
    assert result.steps == 3
    plan = json.loads((result.run_dir / "train" / "plan.json").read_text())
    assert plan["limited_by"] == "max_steps" and plan["steps"] == 3 and plan["budget_s"] is None


def test_the_deadline_stops_after_the_step_that_crosses_it(example_recipe, tmp_path, monkeypatch):
    import tunelab.train.plan as plan_module
    import tunelab.train.run as run

    # a machine that turns slow after planning: the deadline has passed when the loop starts. The speed
    # the plan is fitted at is fixed, so that the plan has several steps on a loaded machine too (a plan of
    # one step ends with that step, before any deadline is looked at)
    monkeypatch.setattr(plan_module, "measure_throughput",
                        lambda *a, **k: Throughput(train_tokens_per_s=3000.0, eval_tokens_per_s=9000.0))
    monkeypatch.setattr(run, "_last_evaluation_s", lambda planned, has_valid: planned.budget_s + 1000)
    result, _ = _train(example_recipe, tmp_path, *AUTO_TRAIN, "train.budget=30s", "name=d")
    summary = json.loads((result.run_dir / "train" / "summary.json").read_text())
    events = [r for r in _log(result.run_dir) if r.get("event") == "budget_reached"]
    assert summary["budget_reached"] and result.steps == 1 and len(events) == 1
    assert json.loads((result.run_dir / "train" / "plan.json").read_text())["steps"] > 1  # the deadline cut it
    assert (result.run_dir / "adapter").is_dir()  # the run still ends with its output


def test_more_passes_when_the_data_plan_takes_under_half_the_budget():
    from tunelab.train.plan import more_epochs_for_budget

    assert more_epochs_for_budget(3.0, 120.0, 600.0) == 6.0  # far under: twice the passes, no more
    assert more_epochs_for_budget(3.0, 290.0, 600.0) == round(3 * BUDGET_MARGIN * 600 / 290, 2)  # fills the budget
    assert more_epochs_for_budget(3.0, 300.0, 600.0) is None  # half the budget or more: as planned
    assert more_epochs_for_budget(3.0, 0.0, 600.0) is None


def test_a_small_set_gets_more_passes_when_the_budget_has_room(example_recipe, tmp_path, monkeypatch):
    import tunelab.train.plan as plan_module

    lines = (example_recipe.parent / "data" / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (tmp_path / "valid.jsonl").write_text("\n".join(lines[40:48]) + "\n")
    # 40 examples x 3 passes (~9k tokens) at 300 tokens/s take ~35 s of a 200 s budget
    monkeypatch.setattr(plan_module, "measure_throughput",
                        lambda *a, **k: Throughput(train_tokens_per_s=300.0, eval_tokens_per_s=900.0))
    result, _ = _train(example_recipe, tmp_path / "runs", *AUTO_TRAIN, "train.budget=200s", "train.compile=false",
                       f"data.train={tmp_path / 'train.jsonl'}", f"data.valid={tmp_path / 'valid.jsonl'}", "name=more")
    plan = json.loads((result.run_dir / "train" / "plan.json").read_text())
    assert (plan["epochs_before_budget"], plan["epochs_target"]) == (3.0, 6.0)
    assert plan["epochs"] == 6.0 and plan["steps"] == result.steps and plan["limited_by"] == "data"
    assert "room for 6 epochs instead of 3" in plan["reason"]
    assert plan["estimated_s"] <= BUDGET_MARGIN * 200
