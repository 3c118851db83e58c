"""eval/cost.py on small hand-made inputs: price per query, break-even queries, and the cost sentence."""

from __future__ import annotations

import pytest

from tunelab.config import EvalConfig
from tunelab.contract import TrainSummary
from tunelab.eval.cost import (
    amortised_training_per_query,
    break_even,
    compare_cost,
    training_cost,
    usd_per_query,
)

# prices and per-query costs are binary fractions, so every expected value below is exact
CFG = EvalConfig(price_per_m_input_tokens=1.0, price_per_m_output_tokens=4.0, gpu_price_per_hour=2.0)
USD = {"base": 0.75, "prompt": 1.0, "tuned": 0.25, "tuned+rag": 1.5}


def _summary(train_time_s: float) -> TrainSummary:
    return TrainSummary(steps=10, best_step=None, best_val_loss=None, stopped_early=False, tokens=100,
                        trainable_tokens=40, train_time_s=train_time_s, method="lora", trainable_params=1,
                        total_params=2, output="adapter", output_step=10)


def _verdict(best: str | None, vs: str | None) -> dict:
    return {"best_arm": best, "vs": vs}


def test_usd_per_query_prices_prompt_and_completion_tokens_per_million():
    assert usd_per_query(1000, 250, CFG) == (1000 * 1.0 + 250 * 4.0) / 1e6


def test_fine_tuned_queries_are_priced_at_the_tuned_rates_and_carry_amortised_training():
    cfg = EvalConfig(price_per_m_input_tokens=1.0, price_per_m_output_tokens=4.0, tuned_price_per_m_input_tokens=2.0,
                     tuned_price_per_m_output_tokens=8.0, requests_per_month=1000, amortize_months=4)
    assert usd_per_query(1000, 250, cfg, tuned=True) == (1000 * 2.0 + 250 * 8.0) / 1e6
    assert amortised_training_per_query({"usd": 2.0}, cfg) == 2.0 / 4000
    assert amortised_training_per_query({"usd": 2.0}, CFG) == 0.0  # no requests_per_month: nothing spread
    assert amortised_training_per_query(None, cfg) == 0.0


def test_training_cost_is_wall_time_at_the_gpu_rate():
    assert training_cost(_summary(5400), 2.0)["usd"] == 3.0
    assert training_cost(None, 2.0) is None


def test_break_even_pairs_every_tuned_arm_with_every_prompt_only_arm():
    pairs = break_even(USD, training_usd=10.0)
    assert list(pairs) == ["tuned vs base", "tuned vs prompt", "tuned+rag vs base", "tuned+rag vs prompt"]
    assert pairs["tuned vs base"] == {"usd_saved_per_query": 0.5, "queries": 20}
    assert pairs["tuned vs prompt"] == {"usd_saved_per_query": 0.75, "queries": 14}  # 13.3 rounds up
    assert pairs["tuned+rag vs base"] == {"usd_saved_per_query": -0.75, "queries": None}  # never repaid
    assert pairs["tuned+rag vs prompt"]["queries"] is None


def test_cost_names_the_verdicts_pair():
    tokens = {arm: 64.0 for arm in USD}
    cost = compare_cost(USD, tokens, {arm: 10.0 for arm in USD}, _verdict("tuned", "prompt"), _summary(3600), CFG)
    assert cost["training"]["usd"] == 2.0
    assert cost["break_even_queries"] == 3  # $2 / $0.75 saved per query = 2.7 queries, rounded up
    assert cost["text"] == "training cost $2.00 is repaid by shorter prompts after 3 queries (tuned vs prompt)"
    assert cost["per_arm"]["prompt"] == {"usd_per_query": 1.0, "usd_per_1m_queries": 1e6,
                                         "usd_per_1k_requests": 1e3, "prompt_tokens_mean": 64.0, "tokens_per_s": 10.0}
    assert cost["prices"] == {"usd_per_m_input_tokens": 1.0, "usd_per_m_output_tokens": 4.0, "gpu_usd_per_hour": 2.0,
                              "tuned_usd_per_m_input_tokens": 0.3, "tuned_usd_per_m_output_tokens": 1.2,
                              "requests_per_month": None, "amortize_months": 12}

    dearer = compare_cost(USD, tokens, dict.fromkeys(USD, 1.0), _verdict("tuned+rag", "base"), _summary(3600), CFG)
    assert dearer["break_even_queries"] is None
    assert dearer["text"] == "tuned+rag is not cheaper per query than base: training is never repaid by prompt savings"


@pytest.mark.parametrize(("arms", "text"), [
    (["base", "tuned"], "no train/summary.json: training cost and break-even unknown"),
    (["base", "prompt"], None),  # no tuned arm: nothing to repay
])
def test_cost_without_a_training_summary(arms, text):
    usd = {arm: USD[arm] for arm in arms}
    cost = compare_cost(usd, dict.fromkeys(arms, 1.0), dict.fromkeys(arms, 1.0), _verdict(None, None), None, CFG)
    assert cost["training"] is None and cost["break_even"] == {} and cost["break_even_queries"] is None
    assert cost.get("text") == text
