"""What each arm costs per query and when training pays for itself: eval/metrics.json "cost".

Reads nothing itself: eval/run.py hands it each arm's mean token counts and throughput, the verdict's
two arms and train/summary.json (TrainSummary); the prices are the recipe's eval keys
(price_per_m_input_tokens, price_per_m_output_tokens, gpu_price_per_hour). Writes nothing.
"""

from __future__ import annotations

import math
from typing import Any

from tunelab.config import EvalConfig, is_tuned_arm
from tunelab.contract import TrainSummary


def usd_per_query(prompt_tokens: float, completion_tokens: float, cfg: EvalConfig, tuned: bool = False) -> float:
    """Serving cost of one query: the fine-tuned model at the tuned prices (hosts charge more for it)."""
    if tuned:
        return (prompt_tokens * cfg.tuned_price_per_m_input_tokens
                + completion_tokens * cfg.tuned_price_per_m_output_tokens) / 1e6
    return (prompt_tokens * cfg.price_per_m_input_tokens
            + completion_tokens * cfg.price_per_m_output_tokens) / 1e6


def amortised_training_per_query(training: dict[str, Any] | None, cfg: EvalConfig) -> float:
    """The training cost spread over eval.amortize_months of eval.requests_per_month (0 without them)."""
    if training is None or cfg.requests_per_month is None:
        return 0.0
    return training["usd"] / (cfg.requests_per_month * cfg.amortize_months)


def training_cost(summary: TrainSummary | None, gpu_price_per_hour: float) -> dict[str, Any] | None:
    """The training run's wall time priced at the GPU's hourly rate (None without train/summary.json)."""
    if summary is None:
        return None
    return {"train_time_s": summary.train_time_s,
            "usd": summary.train_time_s / 3600 * gpu_price_per_hour,
            "basis": "train/summary.json train_time_s x eval.gpu_price_per_hour (wall time of the "
                     "training run on whatever machine ran it)"}


def break_even(usd_per_query_by_arm: dict[str, float], training_usd: float) -> dict[str, dict[str, Any]]:
    """Every tuned arm against every prompt-only arm: what a query saves, and after how many queries the
    savings repay training (None when the tuned arm is not cheaper)."""
    tuned = [a for a in usd_per_query_by_arm if is_tuned_arm(a)]
    others = [a for a in usd_per_query_by_arm if not is_tuned_arm(a)]
    result: dict[str, dict[str, Any]] = {}
    for tuned_arm in tuned:
        for other in others:
            saved = usd_per_query_by_arm[other] - usd_per_query_by_arm[tuned_arm]
            result[f"{tuned_arm} vs {other}"] = {
                "usd_saved_per_query": saved,
                "queries": math.ceil(training_usd / saved) if saved > 0 else None,
            }
    return result


def compare_cost(usd_per_query_by_arm: dict[str, float], prompt_tokens_mean: dict[str, float],
                 tokens_per_s: dict[str, float], verdict: dict[str, Any], summary: TrainSummary | None,
                 cfg: EvalConfig) -> dict[str, Any]:
    """eval/metrics.json "cost" for the evaluated arms (the keys of `usd_per_query_by_arm`, in order);
    its text is about the verdict's pair."""
    training = training_cost(summary, cfg.gpu_price_per_hour)
    pairs = break_even(usd_per_query_by_arm, training["usd"]) if training is not None else {}
    cost: dict[str, Any] = {
        "prices": {"usd_per_m_input_tokens": cfg.price_per_m_input_tokens,
                   "usd_per_m_output_tokens": cfg.price_per_m_output_tokens,
                   "tuned_usd_per_m_input_tokens": cfg.tuned_price_per_m_input_tokens,
                   "tuned_usd_per_m_output_tokens": cfg.tuned_price_per_m_output_tokens,
                   "gpu_usd_per_hour": cfg.gpu_price_per_hour,
                   "requests_per_month": cfg.requests_per_month, "amortize_months": cfg.amortize_months},
        "per_arm": {arm: {"usd_per_query": usd, "usd_per_1m_queries": usd * 1e6, "usd_per_1k_requests": usd * 1e3,
                          "prompt_tokens_mean": prompt_tokens_mean[arm], "tokens_per_s": tokens_per_s[arm]}
                    for arm, usd in usd_per_query_by_arm.items()},
        "training": training,
        "break_even": pairs,
        "break_even_queries": None,
    }
    pair = f"{verdict['best_arm']} vs {verdict['vs']}"
    if pair in pairs:
        queries = pairs[pair]["queries"]
        cost["break_even_queries"] = queries
        cost["text"] = (
            f"training cost ${training['usd']:.2f} is repaid by shorter prompts after {queries:,} queries ({pair})"
            if queries is not None
            else f"{verdict['best_arm']} is not cheaper per query than {verdict['vs']}: training is never repaid by prompt savings"
        )
    elif training is None and any(is_tuned_arm(a) for a in usd_per_query_by_arm):
        cost["text"] = "no train/summary.json: training cost and break-even unknown"
    return cost
