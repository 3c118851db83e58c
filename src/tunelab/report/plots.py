"""The report's charts as inline SVG strings (matplotlib, object API: no pyplot, no global backend).

Reads plain values handed over by report/html.py; writes nothing. Each SVG is stripped of its XML
prolog, metadata and namespace URLs so the page references nothing outside itself, and scales with
the page (viewBox kept, fixed size removed). Ids inside an SVG are salted with the chart name so two
charts on one page never share a marker or clip-path id.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

ARM_COLORS = {"base": "#8c8c8c", "prompt": "#e08a1e", "rag": "#b0568f", "tuned": "#1f77b4", "tuned+rag": "#2a9d5c"}
_FALLBACK_COLORS = ("#555555", "#7a5195", "#ef5675", "#ffa600")
_PROLOG = re.compile(r"^.*?(?=<svg)", re.DOTALL)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)
_NAMESPACES = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')
_SIZE = re.compile(r'<svg([^>]*?)\s+width="[^"]*"\s+height="[^"]*"')


def arm_color(arm: str, index: int = 0) -> str:
    return ARM_COLORS.get(arm, _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)])


def to_svg(fig: Any, name: str) -> str:
    import matplotlib as mpl
    from matplotlib.text import Text

    for text in fig.findobj(Text):  # names from the user's files ("$\\badmacro$") are text, never mathtext
        text.set_parse_math(False)
    buffer = io.StringIO()
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = _METADATA.sub("", _PROLOG.sub("", buffer.getvalue(), count=1))
    # The HTML parser gives inline <svg> its namespaces; leaving the URLs out keeps the page free of any.
    text = _NAMESPACES.sub("", text)
    text = _SIZE.sub(r'<svg\1 role="img" aria-label="' + name + '" style="width:100%;height:auto"', text, count=1)
    return text


def new_figure(width_in: float = 7.0, height_in: float = 3.4) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in))
    return fig


def style_axes(ax: Any) -> None:
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _mark_steps(ax: Any, best_step: int | None, stop_step: int | None, overfit_steps: Sequence[int]) -> None:
    if best_step is not None:
        ax.axvline(best_step, color="#2a9d5c", linestyle="--", linewidth=1.2, label=f"best checkpoint (step {best_step})")
    for i, step in enumerate(overfit_steps):
        ax.axvline(step, color="#d62728", linestyle=":", linewidth=1.2, label="overfitting signal" if i == 0 else None)
    if stop_step is not None:
        ax.axvline(stop_step, color="#555555", linestyle="-.", linewidth=1.0, label=f"early stop (step {stop_step})")


def training_curve(
    train_rows: Sequence[Mapping[str, Any]],
    eval_rows: Sequence[Mapping[str, Any]],
    train_key: str,
    eval_keys: Mapping[str, str],
    ylabel: str,
    name: str,
    best_step: int | None = None,
    stop_step: int | None = None,
    overfit_steps: Sequence[int] = (),
) -> str:
    """Per-step training values as a thin line, evaluation points as markers, key steps as lines.

    eval_keys maps a log key to its legend label, e.g. {"val_loss": "validation"}.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    style_axes(ax)
    steps = [r["step"] for r in train_rows if r.get(train_key) is not None]
    values = [r[train_key] for r in train_rows if r.get(train_key) is not None]
    if steps:
        ax.plot(steps, values, color="#9ecae1", linewidth=1.0, label="train (each step)")
    styles = (("#1f77b4", "o"), ("#e08a1e", "s"), ("#555555", "^"))
    for (key, label), (color, marker) in zip(eval_keys.items(), styles, strict=False):
        points = [(r["step"], r[key]) for r in eval_rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), color=color, marker=marker, markersize=4, linewidth=1.6, label=label)
    _mark_steps(ax, best_step, stop_step, overfit_steps)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    # below the axes: inside, it hides the curve it explains
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    return to_svg(fig, name)


def _number(value: Any) -> float:
    """A plotted number: a damaged metrics file's inf, nan or non-number draws as 0, never breaks the figure."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _interval(row: Mapping[str, Any]) -> tuple[float, float]:
    ci = row.get("ci95")
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return _number(row.get("primary")), _number(row.get("primary"))
    return _number(ci[0]), _number(ci[1])


def quality_bars(arms: Mapping[str, Mapping[str, Any]], metric_name: str, name: str) -> str:
    """One horizontal bar per arm: the primary metric with its 95% interval."""
    fig = new_figure(7.0, 0.55 * max(len(arms), 2) + 0.9)
    ax = fig.add_subplot()
    style_axes(ax)
    names = list(arms)
    values = [100 * _number(arms[a].get("primary")) for a in names]
    lows, highs = [], []
    for arm, value in zip(names, values, strict=True):
        low, high = _interval(arms[arm])
        lows.append(max(value - 100 * low, 0.0))
        highs.append(max(100 * high - value, 0.0))
    positions = list(range(len(names)))[::-1]
    ax.barh(positions, values, color=[arm_color(a, i) for i, a in enumerate(names)], height=0.6,
            xerr=[lows, highs], error_kw={"ecolor": "#333333", "capsize": 3, "linewidth": 1})
    for pos, value in zip(positions, values, strict=True):
        ax.text(value + 1, pos + 0.22, f"{value:.1f}", fontsize=8, color="#333333")
    ax.set_yticks(positions, names)
    ax.set_xlim(0, 105)
    ax.set_xlabel(f"{metric_name} (%), 95% interval")
    return to_svg(fig, name)


def tradeoff_scatter(arms: Mapping[str, Mapping[str, Any]], metric_name: str, name: str) -> str:
    """Quality (y) against prompt tokens per query (x, log scale); marker area grows with p50 latency."""
    fig = new_figure(7.0, 3.8)
    ax = fig.add_subplot()
    style_axes(ax)
    latencies = [_number(a.get("latency_ms_p50")) for a in arms.values()]
    largest = max(latencies, default=0.0) or 1.0
    placed: list[tuple[float, float]] = []  # label anchors so far: a label next to an earlier one moves down
    for i, (arm, row) in enumerate(arms.items()):
        x = max(_number(row.get("prompt_tokens_mean")), 1.0)
        y = 100 * _number(row.get("primary"))
        latency = _number(row.get("latency_ms_p50"))
        low, high = _interval(row)
        ax.errorbar([x], [y], yerr=[[max(y - 100 * low, 0)], [max(100 * high - y, 0)]], fmt="none",
                    ecolor="#999999", capsize=3, linewidth=1)
        ax.scatter([x], [y], s=60 + 600 * latency / largest, color=arm_color(arm, i), alpha=0.8,
                   edgecolors="white", linewidths=1, label=f"{arm}: p50 {latency:,.0f} ms", zorder=3)
        near = sum(1 for px, py in placed if abs(py - y) < 6 and 0.8 < px / x < 1.25)
        placed.append((x, y))
        ax.annotate(arm, (x, y), xytext=(9, 6 - 11 * near), textcoords="offset points", fontsize=9)
    ax.set_xscale("log")
    xs = [max(_number(r.get("prompt_tokens_mean")), 1.0) for r in arms.values()]
    ax.set_xlim(min(xs, default=10) / 1.6, max(xs, default=1000) * 1.6)
    ticks = [t for t in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
             if min(xs, default=10) / 1.6 <= t <= max(xs, default=1000) * 1.6]
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("prompt tokens per query (log scale)")
    ax.set_ylabel(f"{metric_name} (%)")
    ax.set_ylim(-5, 110)
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    return to_svg(fig, name)


def scale_tradeoff(candidates: Sequence[Mapping[str, Any]], chosen: float | None, metric_name: str,
                   threshold: float, name: str) -> str:
    """Validation task score (y) against retention of the base model's general probes (x), one point per
    LoRA adapter scale (eval/adapter_scale.json candidates), the chosen scale ringed, the threshold shaded."""
    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot()
    style_axes(ax)
    points = [(float(c["retention"]) * 100, float(c["task"]) * 100, float(c["scale"])) for c in candidates
              if c.get("retention") is not None and c.get("task") is not None]
    ax.axvspan(100 * (1 - threshold), 101, color="#2a9d5c", alpha=0.08, label=f"retention within {threshold:.0%}")
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], color="#1f77b4", linewidth=1, alpha=0.6)
    for x, y, scale in points:
        picked = chosen is not None and abs(scale - chosen) < 1e-9
        ax.scatter([x], [y], s=140 if picked else 50, color="#1f77b4", edgecolors="#d62728" if picked else "white",
                   linewidths=2.5 if picked else 1, zorder=3, label=f"chosen: scale {scale:g}" if picked else None)
        ax.annotate(f"{scale:g}", (x, y), xytext=(7, 5), textcoords="offset points", fontsize=9)
    xs = [p[0] for p in points] or [100.0]
    ax.set_xlim(min(min(xs) - 5, 100 * (1 - threshold) - 5), 101)
    ax.set_ylim(-5, 110)
    ax.set_xlabel("retention of general probes the base model knew (%)")
    ax.set_ylabel(f"validation {metric_name} (%)")
    ax.legend(fontsize=8, frameon=False, loc="lower left")
    return to_svg(fig, name)
