"""The report's charts show names from the user's files (grader names, arm names) as plain text: a
name like `$\\badmacro$ <b>` is never parsed as matplotlib mathtext (which raised and killed the report)."""

import re

from tunelab.report.plots import quality_bars, tradeoff_scatter

NAME = "$\\badmacro$ <b>"


def test_names_that_look_like_mathtext_are_drawn_as_text():
    arms = {NAME: {"primary": 0.5, "ci95": [0.4, 0.6], "prompt_tokens_mean": 30.0, "latency_ms_p50": 40.0,
                   "usd_per_1m_queries": 1.0},
            "tuned": {"primary": 0.7, "ci95": [0.6, 0.8], "prompt_tokens_mean": 3.0, "latency_ms_p50": 4.0,
                      "usd_per_1m_queries": 0.5}}
    for svg in (quality_bars(arms, NAME, "quality"), tradeoff_scatter(arms, NAME, "tradeoff")):
        assert "$\\badmacro$ &lt;b&gt;" in svg  # the name itself, escaped for SVG


def test_a_damaged_metrics_files_numbers_draw_as_zero_without_a_warning(recwarn):
    arms = {"tuned": {"primary": float("inf"), "ci95": [float("nan"), 1e999], "prompt_tokens_mean": "x",
                      "latency_ms_p50": float("nan")},
            "prompt": {"primary": 0.4, "ci95": "broken", "prompt_tokens_mean": 30.0, "latency_ms_p50": 40.0}}
    bars = quality_bars(arms, "accuracy", "quality")
    scatter = tradeoff_scatter(arms, "accuracy", "tradeoff")
    assert re.findall(r">(\d+\.\d)<", bars) == ["0.0", "40.0"]  # the damaged arm's bar reads 0.0
    assert "<svg" in scatter
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]
