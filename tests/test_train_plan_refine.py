"""The one planner (train/plan.py plan_training) on synthetic sizes: every refinement of the plan —
smaller steps when the budget binds, more passes when auto passes end well inside it, max_steps, a
resumed run's saved plan, the ranks' agreement under torchrun, a refit after compiling — with the
machine's speed and clock passed in, so no model runs."""

from __future__ import annotations

import math

import pytest

from tunelab.config import TrainConfig
from tunelab.data.pack import pack_rows, plan_steps
from tunelab.train.plan import BUDGET_MARGIN, Cut, Machine, Throughput, plan_training

MEAN = 78  # tokens an example, about the triage example's


def _cutter(lengths: list[int], row_tokens: int = 512):
    """The steps of a Cut as train/run.py makes them (rows of whole examples, at most a step a row), and
    the cuts asked for."""
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    asked: list[Cut] = []

    def cut(c: Cut):
        asked.append(c)
        rows = pack_rows(lengths, min(row_tokens, max(max(lengths), c.tokens_per_step)))
        return plan_steps(examples, rows, tokens_per_step=c.tokens_per_step, micro_batch_tokens=row_tokens,
                          epochs=c.epochs, seed=0, max_steps=c.max_steps)

    return cut, asked


def _machine(speeds=(300.0,), spent_s=0.0, **kwargs):
    """A machine that measures `speeds` in turn (tokens/s training; 3x that evaluating)."""
    measured: list[int] = []

    def measure(steps):
        measured.append(len(steps))
        speed = speeds[min(len(measured), len(speeds)) - 1]
        return Throughput(speed, 3 * speed)

    return Machine(device="cpu", measure=measure, seconds_spent=lambda: spent_s, **kwargs), measured


def _never_measured(steps):
    raise AssertionError("the planner measured where nothing binds")


def test_a_budget_that_lets_few_steps_run_makes_them_smaller_and_measures_once():
    lengths = [MEAN] * 800
    cut, asked = _cutter(lengths)
    machine, measured = _machine(spent_s=2.0)
    planned = plan_training(lengths, [MEAN] * 100, TrainConfig(budget="40s"), cut, machine)
    plan = planned.plan
    # 800 examples want steps of 16 (3 passes); under 100 of them fit in 40 s at 300 tokens/s: steps of 4
    assert (plan.examples_per_step_before_budget, plan.examples_per_step, plan.tokens_per_step) == (16.0, 4.0, 4 * MEAN)
    assert plan.limited_by == "budget" and plan.budget_s == 40 and plan.epochs_target == 3.0
    assert len(measured) == 1  # measured once, on the data's first steps; the smaller steps reuse it
    assert [c.tokens_per_step for c in asked[:2]] == [16 * MEAN, 4 * MEAN]
    assert plan.steps == len(planned.steps) and plan.estimated_s <= BUDGET_MARGIN * (40 - 2.0)
    assert plan.train_tokens_per_s == 300.0 and plan.epochs < 3
    assert all(step.tokens <= 4 * MEAN for step in planned.steps)
    assert "in steps of 4 examples instead of 16" in plan.reason


def test_auto_passes_that_end_well_inside_the_budget_get_more():
    lengths = [MEAN] * 40
    cut, _ = _cutter(lengths)
    machine, measured = _machine()
    plan = plan_training(lengths, [MEAN] * 8, TrainConfig(budget="200s"), cut, machine).plan
    # 40 examples x 3 passes (~9.4k tokens) at 300 tokens/s take ~40 s of 200: twice the passes, no more
    assert (plan.epochs_before_budget, plan.epochs_target, plan.epochs) == (3.0, 6.0, 6.0)
    assert plan.limited_by == "data" and plan.estimated_s <= BUDGET_MARGIN * 200 and len(measured) == 1
    assert "room for 6 epochs instead of 3" in plan.reason
    # under torchrun the passes stay (the ranks would have to agree on them)
    machine, _ = _machine(more_passes=False)
    plan = plan_training(lengths, [MEAN] * 8, TrainConfig(budget="200s"), cut, machine).plan
    assert (plan.epochs_before_budget, plan.epochs_target, plan.epochs) == (None, 3.0, 3.0)
    # passes the user set are theirs
    plan = plan_training(lengths, [MEAN] * 8, TrainConfig(budget="200s", epochs=3), cut, _machine()[0]).plan
    assert (plan.epochs_before_budget, plan.epochs) == (None, 3.0)


def test_max_steps_sets_the_length_and_nothing_is_measured():
    lengths = [MEAN] * 800
    cut, asked = _cutter(lengths)
    machine = Machine(device="cpu", measure=_never_measured, seconds_spent=lambda: 0.0)
    planned = plan_training(lengths, [MEAN] * 100, TrainConfig(max_steps=5), cut, machine)
    plan = planned.plan
    assert (plan.steps, len(planned.steps), plan.limited_by, plan.max_steps) == (5, 5, "max_steps", 5)
    assert plan.budget_s is None and plan.estimated_s is None and plan.train_tokens_per_s is None
    assert plan.epochs_target is None and asked == [Cut(16 * MEAN, math.inf, 5)]
    assert plan.reason.endswith("; train.max_steps sets the length; validation every 1 steps on "
                                f"{plan.eval_max_examples} examples")


def test_a_resumed_run_keeps_its_saved_plan_whatever_the_machine_says_now():
    lengths = [MEAN] * 800
    cut, _ = _cutter(lengths)
    saved = plan_training(lengths, [MEAN] * 100, TrainConfig(budget="40s"), cut, _machine()[0]).plan
    cut, asked = _cutter(lengths)
    # nothing is measured again, and the budget spent so far changes nothing: the checkpoints count these steps
    machine = Machine(device="cpu", measure=_never_measured, seconds_spent=lambda: 39.0)
    planned = plan_training(lengths, [MEAN] * 100, TrainConfig(budget="40s"), cut, machine, saved=saved)
    assert planned.plan == saved and len(planned.steps) == saved.steps
    assert asked == [Cut(saved.tokens_per_step, saved.epochs_target, saved.steps)]


def test_under_torchrun_every_rank_takes_the_smallest_answer_of_all():
    lengths = [MEAN] * 800
    cut, _ = _cutter(lengths)
    asked: list[int] = []

    def agree(value: int) -> int:  # another rank, slower: it fits 7 steps and evaluates on 7 examples
        asked.append(value)
        return min(value, 7)

    machine, _ = _machine(agree=agree)
    plan = plan_training(lengths, [MEAN] * 100, TrainConfig(budget="40s", tokens_per_step=16 * MEAN), cut, machine).plan
    assert (plan.steps, plan.eval_max_examples, plan.limited_by) == (7, 7, "budget")
    assert len(asked) == 3 and asked[1] > 7  # evaluation size, steps that fit here, the evaluation size again


def test_compiling_measures_and_fits_again_at_the_compiled_speed():
    lengths = [MEAN] * 800
    cut, _ = _cutter(lengths)
    compiled_for: list[tuple[int, float]] = []

    def compile_layers(planned_tokens: int, planned_seconds: float) -> bool:
        compiled_for.append((planned_tokens, planned_seconds))
        return True

    machine, measured = _machine(speeds=(300.0, 600.0), compile=compile_layers)
    before = plan_training(lengths, [MEAN] * 100, TrainConfig(budget="40s"), cut, _machine()[0])
    planned = plan_training(lengths, [MEAN] * 100, TrainConfig(budget="40s"), cut, machine)
    plan = planned.plan
    eager_tokens = sum(step.tokens for step in before.steps)
    # asked with the eager plan's tokens and how long they take at the speed it was fitted at
    assert compiled_for == [(eager_tokens, eager_tokens / 300.0)]
    assert len(measured) == 2 and plan.train_tokens_per_s == 600.0 and plan.compiled
    assert plan.steps > before.plan.steps  # twice the speed: more of the same small steps fit
    assert plan.examples_per_step_before_budget == 16.0 and "measured, compiled layers" in plan.reason
    assert not before.plan.compiled and "epochs_before_budget" not in plan.model_dump(exclude_unset=True)


def test_a_compiled_run_with_more_passes_still_says_why_it_has_them():
    lengths = [MEAN] * 40
    cut, _ = _cutter(lengths)
    machine, measured = _machine(speeds=(300.0, 600.0), compile=lambda planned_tokens, planned_seconds: True)
    plan = plan_training(lengths, [MEAN] * 8, TrainConfig(budget="200s"), cut, machine).plan
    assert (plan.epochs_before_budget, plan.epochs_target, plan.epochs, plan.compiled) == (3.0, 6.0, 6.0, True)
    assert "room for 6 epochs instead of 3" in plan.reason and "compiled layers" in plan.reason and len(measured) == 2


@pytest.mark.parametrize("replay", [None, {"share": 0.1, "examples": 4, "source": "self"}])
def test_the_replay_the_data_stage_applied_is_in_the_plan(replay):
    lengths = [MEAN] * 40
    cut, _ = _cutter(lengths)
    plan = plan_training(lengths, [], TrainConfig(budget=None, epochs=1), cut, _machine()[0], replay=replay).plan
    assert plan.replay == replay and plan.limited_by == "data" and plan.steps == 40 // 4


@pytest.mark.parametrize(("cfg", "device", "task", "replay", "anchor_s", "added"), [
    (TrainConfig(), "cpu", 20_000, 2_400, 10.0, 600 * 0.12 + 10.0),  # 10m auto: 12% of it and the anchor's 10 s
    (TrainConfig(), "cpu", 20_000, 2_400, 30.0, 600 * 0.15),  # at most 15% of the budget
    (TrainConfig(), "cpu", 20_000, 0, 10.0, 0.0),  # no replay rows: nothing
    (TrainConfig(budget="10m"), "cpu", 20_000, 2_400, 10.0, 0.0),  # the recipe's own budget is kept
    (TrainConfig(budget=None), "cpu", 20_000, 2_400, 10.0, 0.0),  # no budget: nothing to add to
    (TrainConfig(epochs=3), "cpu", 20_000, 2_400, 10.0, 0.0),  # passes the recipe fixed: the auto budget does not bind
])
def test_an_auto_budget_adds_replay_time_and_a_recipe_budget_is_kept(cfg, device, task, replay, anchor_s, added):
    from tunelab.train.plan import MAX_REPLAY_TIME_SHARE, replay_time_s

    assert MAX_REPLAY_TIME_SHARE == 0.15
    assert replay_time_s(cfg, device, task, replay, anchor_s) == pytest.approx(added)
