"""The recipe's way from `tunelab run` to the training loop (bench/recipe_journey.py): which modules it
goes back to after leaving them. The goal: at most two returns to any module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "recipe_journey.py"
MOST_RETURNS = 2


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
    assert max(returns.values()) <= MOST_RETURNS, returns
    # `tunelab run` prepares once: the replay file and the data stage are visited by its prepare stage only,
    # and the training stage trains on what that stage made
    assert stays.count("tunelab.train.self_replay") == 1
    training = stays[stays.index("tunelab.train.run"):]
    assert not {"tunelab.data.prepare", "tunelab.train.start"} & set(training), training
    # the training stage itself, to the loop: each of its modules at most once again
    assert max(bench.returns_by_module(training).values()) <= 1, training
