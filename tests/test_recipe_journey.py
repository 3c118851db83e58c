"""The recipe's way from `tunelab run` to the training loop (bench/recipe_journey.py): which modules it
goes back to after leaving them. The goal is at most two returns to any module; the modules still over
it are listed with their count today, so the way can only get shorter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "recipe_journey.py"
MOST_RETURNS = 2
# over the goal today, because `tunelab run` prepares the data twice (its prepare stage, then the train
# stage's `train`, which starts the run folder and prepares again): lower these when that is fixed
STILL_OVER = {"tunelab.train.run": 4, "tunelab.data.replay": 3, "tunelab.data.prepare": 3}


def _bench():
    spec = importlib.util.spec_from_file_location("recipe_journey", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recipe_goes_back_to_no_module_more_than_twice_on_its_way_to_the_loop(tmp_path, tiny_model_dir):
    bench = _bench()
    stays = bench.journey(bench.tiny_recipe(tmp_path))
    returns = bench.returns_by_module(stays)
    # the way ends in the training stage: the plan is made once, then the model is set up and the loop starts
    assert stays[0] == "tunelab.pipeline" and stays[-1] == "tunelab.train.run" and "tunelab.train.plan" in stays
    over = {module: count for module, count in returns.items() if count > MOST_RETURNS}
    assert all(over.get(module, 0) <= limit for module, limit in STILL_OVER.items()), over
    assert set(over) <= set(STILL_OVER), f"new modules the recipe goes back to more than twice: {over}"
    # the training stage itself, from the data's steps to the loop: each of its modules at most once again
    start = len(stays) - 1 - stays[::-1].index("tunelab.data.prepare")
    training = bench.returns_by_module(stays[start + 1:])
    assert max(training.values()) <= 1, training
