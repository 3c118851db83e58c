"""Replay spread across the passes (data/replay.py ReplaySlices): every pass reads exactly its share of the
replay pool, consecutive passes read different replay examples, the pool is what the data stage kept (never
in validation or test), the rule is in the data fingerprint, and a real tiny run's plan says what it read."""

from __future__ import annotations

import json
import math

import pytest

from test_data_prepare import _many, _write
from test_replay import _general, _lines, _recipe
from tunelab.data.pack import plan_steps, single_rows
from tunelab.data.passes import auto_epochs
from tunelab.data.prepare import prepare_data
from tunelab.data.replay import (
    MIN_REPLAY_EXAMPLES,
    ReplaySlices,
    auto_per_pass,
    replay_count,
    replay_pool_size,
    replay_read,
    replay_slices,
)


def _examples(task: int, replay: int) -> list[dict]:
    rows = [{"id": f"train-{i}", "input_ids": [1] * 10, "labels": [-100] * 8 + [5, 6]} for i in range(task)]
    rows += [{"id": f"replay-{i}", "input_ids": [2] * 30, "labels": [-100] * 10 + [7] * 20} for i in range(replay)]
    return rows


def test_each_pass_reads_exactly_its_share_and_a_different_slice_until_the_pool_is_used():
    slices = ReplaySlices(task=tuple(range(10)), replay=tuple(range(10, 34)), per_pass=8, seed=3)
    passes = [slices.replay_of_pass(e) for e in range(6)]
    assert all(len(p) == len(set(p)) == 8 for p in passes)
    # 24 in the pool, 8 a pass: passes 0-2 read all 24 once, with no overlap; pass 3 starts again
    assert sorted(passes[0] + passes[1] + passes[2]) == list(range(10, 34))
    assert passes[3:] == passes[:3]
    assert all(slices.examples_of_pass(e)[:10] == list(range(10)) for e in range(6))  # the task every pass
    # deterministic, and another seed orders the pool otherwise
    assert ReplaySlices(slices.task, slices.replay, 8, 3).replay_of_pass(1) == passes[1]
    assert ReplaySlices(slices.task, slices.replay, 8, 4).replay_of_pass(0) != passes[0]
    # a pool that is not a multiple of a pass comes round cyclically: 5 passes of 8 from 20 read each twice
    odd = ReplaySlices((), tuple(range(20)), 8, 0)
    reads = [i for e in range(5) for i in odd.replay_of_pass(e)]
    assert len(reads) == 40 and all(reads.count(i) == 2 for i in range(20))


def test_slices_come_from_the_ids_and_only_when_the_pool_is_larger_than_a_pass():
    examples = _examples(5, 12)
    slices = replay_slices(examples, 4, 0)
    assert slices is not None and slices.task == tuple(range(5)) and slices.replay == tuple(range(5, 17))
    assert replay_slices(examples, 12, 0) is None  # the whole pool every pass: nothing to spread
    assert replay_slices(examples, None, 0) is None  # a data folder from before replay was spread
    assert replay_slices(_examples(5, 0), 4, 0) is None


def test_the_steps_of_each_pass_read_the_task_and_that_pass_slice_only():
    examples = _examples(20, 18)
    slices = replay_slices(examples, 6, 7)
    steps = plan_steps(examples, single_rows(len(examples)), tokens_per_step=60, micro_batch_tokens=512,
                       epochs=3, seed=1, rows_of_epoch=lambda e: [(i,) for i in slices.examples_of_pass(e)])
    for epoch in range(3):
        read = [i for s in steps if s.epoch == epoch for m in s.micro_batches for row in m for i in row]
        assert sorted(read) == list(range(20)) + slices.replay_of_pass(epoch)  # each once, nothing else
    per_pass = [{i for s in steps if s.epoch == e for m in s.micro_batches for row in m for i in row if i >= 20}
                for e in range(3)]
    assert not per_pass[0] & per_pass[1] and not per_pass[1] & per_pass[2] and not per_pass[0] & per_pass[2]
    assert replay_read(steps, examples) == {"read": 18, "reads": 18, "passes": 3}
    # the fraction of a last pass is a fraction of its steps, as without replay
    partial = plan_steps(examples, single_rows(len(examples)), tokens_per_step=60, micro_batch_tokens=512,
                         epochs=1.5, seed=1, rows_of_epoch=lambda e: [(i,) for i in slices.examples_of_pass(e)])
    assert len([s for s in partial if s.epoch == 1]) == math.ceil(len([s for s in steps if s.epoch == 1]) / 2)


@pytest.mark.parametrize(("task", "share", "available", "pool"), [
    (117, 0.1, 128, 48),  # routing at 10%: 13 a pass, 3 auto passes read 39; the pool holds at least 48
    (268, 0.1, 128, 90),  # orders: 30 a pass, 3 passes read 90
    (2000, 0.1, 150, 150),  # a large set: the pool is every usable one
    (117, 0.1, 20, 20),  # only 20 usable: all 20 in the pool
    (20, 0.3, 128, 48),  # 5 auto passes of 9: 45, and the pool holds at least 48
])
def test_a_recipe_share_keeps_a_pool_that_its_auto_passes_read_different_slices_of(task, share, available, pool):
    per_pass = replay_count(task, share)
    assert replay_pool_size(task, per_pass, available) == pool
    passes = math.ceil(auto_epochs(task))
    assert min(pool, per_pass * passes) >= min(available, per_pass * passes) and pool >= min(available, MIN_REPLAY_EXAMPLES)


def test_auto_keeps_the_whole_pool_records_the_pass_share_and_the_rule_is_fingerprinted(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _many(120))
    replay = _write(tmp_path / "general.jsonl", _general(100))
    prepared = prepare_data(_recipe("auto", str(replay), train=str(train)), tokenizer, tmp_path / "out",
                            replay_file=replay)
    task = prepared.stats["counts"]["train"]
    stats = prepared.stats["replay"]
    assert 0 < stats["per_pass"] < stats["examples"] == 100 == len(_lines(prepared.path("replay")))
    rows = prepared.tokenized("train")
    task_tokens = sum(len(r["input_ids"]) for r in rows if not r["id"].startswith("replay-"))
    lengths = [len(r["input_ids"]) for r in rows if r["id"].startswith("replay-")]
    assert stats["per_pass"] == auto_per_pass(task_tokens, sum(lengths) / len(lengths), 100)[0]
    assert stats["share_actual"] == stats["per_pass"] / (task + stats["per_pass"])
    pool = {r["id"] for r in _lines(prepared.path("replay"))}
    assert pool <= {row["id"] for row in prepared.tokenized("train")}
    assert not pool & {row["id"] for row in prepared.tokenized("valid")}
    for split in ("valid", "test"):
        assert not pool & {r["id"] for r in prepared.conversations(split)}
    fingerprint = json.loads((tmp_path / "out" / "fingerprint.json").read_text())
    assert fingerprint["inputs"]["replay"]["share"] == "auto-5/spread-1"


FAST = ["model.name=tiny-test", "eval.forgetting=false", "eval.limit=4", "eval.max_new_tokens=4"]


def test_a_run_reads_a_different_replay_slice_each_pass_and_its_plan_says_so(tmp_path):
    from pathlib import Path

    from tunelab.config import load_recipe
    from tunelab.train.run import train

    general = _write(tmp_path / "general.jsonl", _general(60))
    data = _write(tmp_path / "train.jsonl", _many(80))
    recipe_file = Path(__file__).resolve().parents[1] / "examples" / "triage" / "recipe.yaml"
    recipe = load_recipe(recipe_file, [*FAST, f"out_dir={tmp_path}", "name=spread", f"data.train={data}",
                                       "data.valid=null", "data.test=null", f"train.replay={general}",
                                       "train.replay_share=0.1", "train.epochs=3", "train.max_steps=null",
                                       "train.budget=null", "train.compile=false", "train.anchor=0.5"])
    result = train(recipe, progress=False)
    stats = json.loads((result.run_dir / "data" / "stats.json").read_text())
    plan = json.loads((result.run_dir / "train" / "plan.json").read_text())
    per_pass, pool = stats["replay"]["per_pass"], stats["replay"]["examples"]
    assert per_pass == replay_count(stats["counts"]["train"], 0.1) and pool > per_pass
    spread = plan["replay"]["spread"]
    assert spread["per_pass"] == per_pass and spread["pool"] == pool and spread["passes"] == 3
    assert spread["reads"] == 3 * per_pass and spread["read"] == min(pool, 3 * per_pass)
    assert plan["replay"]["anchor"]["examples"] == pool  # the anchor's targets: the whole pool, once
    # the planner sees one pass: the task and one slice, not the whole pool
    assert plan["examples"] == stats["counts"]["train"] + per_pass


def test_an_auto_budget_adds_the_replay_time_it_plans_and_the_plan_says_so(tmp_path):
    from pathlib import Path

    from tunelab.config import TrainConfig, load_recipe
    from tunelab.train.plan import replay_time_s
    from tunelab.train.run import train

    general = _write(tmp_path / "general.jsonl", _general(60))
    data = _write(tmp_path / "train.jsonl", _many(80))
    recipe_file = Path(__file__).resolve().parents[1] / "examples" / "triage" / "recipe.yaml"
    common = [*FAST, f"out_dir={tmp_path}", f"data.train={data}", "data.valid=null", "data.test=null",
              f"train.replay={general}", "train.max_steps=null", "train.compile=false"]
    result = train(load_recipe(recipe_file, [*common, "name=auto"]), progress=False)  # budget and share auto
    plan = json.loads((result.run_dir / "train" / "plan.json").read_text())
    rows = [json.loads(line) for line in (result.run_dir / "data" / "train.tokens.jsonl").read_text().splitlines()]
    replay = replay_slices(rows, plan["replay"]["per_pass"], 0)
    first = replay.replay_of_pass(0) if replay else [i for i, r in enumerate(rows) if r["id"].startswith("replay-")]
    task_tokens = sum(len(r["input_ids"]) for r in rows if not r["id"].startswith("replay-"))
    wanted = replay_time_s(TrainConfig(), "cpu", task_tokens, sum(len(rows[i]["input_ids"]) for i in first),
                           plan["replay"]["anchor"]["seconds"])
    assert plan["budget"] == "auto" and plan["replay"]["budget_added_s"] == round(wanted) > 0
    # a budget the recipe set is the whole budget: replay takes its share of it
    kept = train(load_recipe(recipe_file, [*common, "name=set", "train.budget=10m"]), progress=False)
    assert "budget_added_s" not in json.loads((kept.run_dir / "train" / "plan.json").read_text())["replay"]
