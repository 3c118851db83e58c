"""The run report: renders a run directory's files into report.html and report.md; never recomputes.

Reads (each optional; a missing or unreadable file makes its section say so):
  recipe.yaml, manifest.json, data/stats.json, data/issues.jsonl, data/test.jsonl, train/log.jsonl,
  train/summary.json, eval/metrics.json, eval/predictions.jsonl (manifest, summary and metrics
  through their typed models in tunelab.contract; a file that does not fit its model is reported as
  unreadable, never guessed at; data/stats.json through its model's partial reader, so older stats show
  the keys they have), and a test file's sibling
  `<stem>.slices.jsonl` ({"line", "slice"} per test line, e.g. examples/triage/data/) when present.
Writes report.html (self-contained: CSS and SVG charts inline, no URL of any kind, user text escaped
by Jinja's autoescape) and report.md (the summary printed at the end of `tunelab run`).

The only arithmetic here is presentational: ratios of two reported numbers, means of reported
per-example scores grouped by slice, and picking which disagreements to show.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import ARMS, PROMPT_ONLY_ARMS
from tunelab.contract import ContractError, DataStats, Manifest, Metrics, TrainSummary
from tunelab.eval.decision import format_usd
from tunelab.eval.metrics import to_fraction, to_points
from tunelab.files import write_text_atomic
from tunelab.report.preference import describe_preference
from tunelab.runs import RunPaths

MAX_DISAGREEMENTS = 8
MAX_ISSUES_SHOWN = 20
MAX_AUDIT_SHOWN = 20
SECTIONS = (
    ("verdict", "Verdict"), ("data", "Data"), ("training", "Training"), ("arms", "Arms"),
    ("overfitting", "Overfitting"), ("forgetting", "Forgetting"), ("examples", "Where the arms disagree"),
    ("manifest", "Manifest"),
)
PLOTS = ("plot-loss", "plot-accuracy", "plot-quality", "plot-tradeoff")


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class RunFile:
    """One file of the run: its parsed value, or why there is none."""

    path: Path
    value: Any = None
    problem: str | None = None  # None when read; else "missing" or what is wrong
    bad_lines: list[int] = field(default_factory=list)  # JSONL lines that did not parse (reported, not hidden)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def note(self, root: Path) -> str:
        rel = self.path.relative_to(root) if self.path.is_relative_to(root) else self.path
        if self.problem == "missing":
            return f"{rel} is missing"
        return f"{rel} could not be read: {self.problem}"


def read_json(path: Path) -> RunFile:
    if not path.is_file():
        return RunFile(path, problem="missing")
    try:
        return RunFile(path, json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nested too deeply
        return RunFile(path, problem=f"not valid JSON ({err})")


def _read_through(path: Path, reader: Callable[[Path], Any]) -> RunFile:
    """A run file read by one of its contract model's readers; a missing or damaged file is named."""
    if not path.is_file():
        return RunFile(path, problem="missing")
    try:
        return RunFile(path, reader(path))
    except ContractError as err:
        return RunFile(path, problem=str(err).removeprefix(f"{path}: "))


def read_model(path: Path, model: type[Manifest] | type[Metrics] | type[TrainSummary]) -> RunFile:
    """A run file parsed into its contract model (RunFile.value is the model)."""
    return _read_through(path, model.from_file)


def read_keys(path: Path, model: type[DataStats] | type[Metrics]) -> RunFile:
    """A run file's keys as found, read through its contract model's partial reader (RunFile.value is a
    dict): for files whose older or partial versions are shown as they are."""
    return _read_through(path, model.read_keys)


def read_jsonl(path: Path) -> RunFile:
    if not path.is_file():
        return RunFile(path, problem="missing")
    rows, bad = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply
                bad.append(number)
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad.append(number)
    return RunFile(path, rows, bad_lines=bad)


# ---------------------------------------------------------------------------------------------- formatting


def fmt(value: Any) -> str:
    """A number or value as a person reads it: thousands separators, 4 significant digits, '—' for none."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3g}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, list | tuple | dict) and not value:
        return "none"
    if isinstance(value, list | tuple):
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value) and len(value) <= 8:
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return ", ".join(fmt(v) for v in value) if all(not isinstance(v, dict | list) for v in value) else json.dumps(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def pct(value: Any) -> str:
    return "—" if not isinstance(value, int | float) else f"{100 * value:.1f}"


def pct_ci(primary: Any, ci: Any, score_range: Sequence[float] | None = None) -> str:
    """A primary score and its interval as points of the metric's range (0-100)."""
    if not isinstance(primary, int | float):
        return "—"
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(v, int | float) for v in ci):
        return (f"{to_points(primary, score_range):.1f} [{to_points(ci[0], score_range):.1f}, "
                f"{to_points(ci[1], score_range):.1f}]")
    return f"{to_points(primary, score_range):.1f}"


def describe_mapping(value: Any, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """A nested result dict (cost, forgetting, overfitting, manifest) for display, whatever keys the
    producing stage chose: a lead sentence ("text", or "skipped" with its reason), a flag ("flagged"),
    top-level key/value rows, one group of rows per nested dict, a table for each {row: {column: value}}
    dict and for each list of records (the long ones are shown folded)."""
    out: dict[str, Any] = {"text": None, "flagged": None, "rows": [], "groups": [], "tables": [], "lists": []}
    if not isinstance(value, dict):
        if value is not None:
            out["rows"].append(("value", fmt(value)))
        return out

    def flatten(node: Mapping[str, Any], prefix: str, rows: list[tuple[str, str]]) -> None:
        for key, item in node.items():
            name = f"{prefix}{key}"
            if isinstance(item, dict) and _is_matrix(item):
                columns: list[str] = []
                for inner in item.values():
                    columns += [c for c in inner if c not in columns]
                table_rows = [[str(k), *(fmt(inner.get(c)) for c in columns)] for k, inner in item.items()]
                out["tables"].append({"title": name, "columns": ["", *columns], "rows": table_rows})
            elif isinstance(item, dict) and item:
                flatten(item, f"{name}.", rows)
            elif isinstance(item, list) and item and all(isinstance(r, dict) for r in item):
                columns = []
                for record in item:
                    columns += [c for c in record if c not in columns]
                out["lists"].append({"title": name, "columns": columns,
                                     "rows": [[fmt(r.get(c)) for c in columns] for r in item]})
            else:
                rows.append((name, fmt(item)))

    for key, item in value.items():
        if key in exclude:
            continue
        if key in ("text", "skipped") and isinstance(item, str):
            out["text"] = item if key == "text" else f"skipped: {item}"
        elif key == "flagged" and isinstance(item, bool):
            out["flagged"] = item
        elif isinstance(item, dict) and item and not _is_matrix(item):
            rows: list[tuple[str, str]] = []
            flatten(item, "", rows)
            if rows:
                out["groups"].append({"title": str(key), "rows": rows})
        else:
            flatten({key: item}, "", out["rows"])
    return out


def _is_matrix(node: Mapping[str, Any]) -> bool:
    """{row: {col: scalar}} with at least two rows: better read as a table than as dotted keys."""
    inner = list(node.values())
    return len(inner) >= 2 and all(
        isinstance(v, dict) and v and all(not isinstance(x, dict) for x in v.values()) for v in inner
    )


# ---------------------------------------------------------------------------------------------- sections


def _ordered_arms(arms: Mapping[str, Any]) -> list[str]:
    return [a for a in ARMS if a in arms] + sorted(a for a in arms if a not in ARMS)


def _on_unit_scale(row: dict[str, Any], score_range: Sequence[float] | None) -> dict[str, Any]:
    primary, ci = row.get("primary"), row.get("ci95")
    return {**row, "primary": None if primary is None else to_fraction(primary, score_range),
            "ci95": None if ci is None else [to_fraction(v, score_range) for v in ci]}


def _verdict(metrics: RunFile, root: Path) -> dict[str, Any]:
    if not metrics.ok:
        return {"available": False, "note": f"No verdict: {metrics.note(root)} (run `tunelab eval`)."}
    data: Metrics = metrics.value
    verdict, arms = data.verdict, data.arms
    best, vs, recommended = verdict.best_arm, verdict.vs, verdict.recommended
    costs = data.usd_per_1m_queries()
    per_1k = verdict.usd_per_1k_requests or {arm: usd / 1000 for arm, usd in costs.items()}
    as_good, too_slow = set(verdict.as_good), set(verdict.too_slow)

    def status(arm: str) -> str:
        if arm == recommended:
            return "recommended"
        return "too slow" if arm in too_slow else "as good (within the margin)" if arm in as_good else ""

    # every arm, cheapest first: what the decision chose among
    shown = sorted(arms, key=lambda a: (per_1k.get(a, math.inf), list(arms).index(a)))
    rows = [{"arm": arm, "quality": pct_ci(arms[arm].primary, arms[arm].ci95, data.primary_range),
             "prompt_tokens": fmt(arms[arm].prompt_tokens_mean), "latency": fmt(arms[arm].latency_ms_p50),
             "cost": _usd_text(per_1k.get(arm)), "status": status(arm), "recommended": arm == recommended}
            for arm in shown]
    facts = []
    if best in arms and vs in arms:
        b, v = arms[best], arms[vs]
        bt, vt = b.prompt_tokens_mean, v.prompt_tokens_mean
        if bt > 0 and vt > 0:
            ratio = vt / bt
            if abs(ratio - 1) < 0.05:
                facts.append(f"{best} and {vs} send about as many prompt tokens per query ({bt:.0f} vs {vt:.0f})")
            elif ratio > 1:
                facts.append(f"{best} sends {ratio:.1f}x fewer prompt tokens per query than {vs} ({bt:.0f} vs {vt:.0f})")
            else:
                facts.append(f"{best} sends {1 / ratio:.1f}x more prompt tokens per query than {vs} ({bt:.0f} vs {vt:.0f})")
        facts.append(f"median latency {b.latency_ms_p50:,.0f} ms ({best}) vs {v.latency_ms_p50:,.0f} ms ({vs}) at batch "
                     f"size {fmt(b.batch_size)}")
    if data.cost.text:
        facts.append(data.cost.text)
    training = data.cost.training
    if training is not None:
        facts.append(f"training cost {training.usd:,.2f} USD ({training.train_time_s:,.0f} s of training)")
    if verdict.selection:
        facts.append(f"how the arms were compared: {verdict.selection}")
    delta, ci = verdict.delta, verdict.ci95
    graders = data.graders or {}
    human = graders.get("human_agreement") if isinstance(graders.get("human_agreement"), dict) else {}
    facts += [row["text"] for row in human.values() if isinstance(row, dict) and isinstance(row.get("text"), str)]
    if isinstance((data.pairwise or {}).get("text"), str):
        facts.append(data.pairwise["text"])
    for row in arms.values():  # eval.external arms, each against the best fine-tuned arm
        comparison = (row.model_extra or {}).get("vs_tuned")
        if isinstance(comparison, dict) and isinstance(comparison.get("text"), str):
            facts.append(comparison["text"])
    headline = verdict.headline or verdict.text
    detail = verdict.text[len(headline):].strip() if verdict.text.startswith(headline) else verdict.text
    return {
        "available": True, "note": None, "text": verdict.text, "headline": headline, "detail": detail or None,
        "best_arm": best, "vs": vs, "recommended": recommended, "significant": verdict.significant,
        "delta": f"{100 * delta:+.1f} points" if delta is not None else "—",
        "ci95": f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci is not None else "—",
        "p_value": fmt(verdict.p_value), "rows": rows, "facts": facts, "margin": verdict.margin,
        "primary_metric": data.primary_metric, "n_examples": data.n_examples,
        "provisional_reason": verdict.provisional_reason if verdict.provisional else None,
    }


def _usd_text(value: float | None) -> str:
    return "—" if value is None else format_usd(value)


def _data(stats: RunFile, issues: RunFile, root: Path) -> dict[str, Any]:
    if not stats.ok:
        return {"available": False, "note": f"{stats.note(root)}: data preparation has not run or failed."}
    value = stats.value
    groups = []
    for key, title in (("counts", "Examples"), ("issues", "Problems found"), ("quality", "Quality findings"),
                       ("tokens", "Tokens per example (chat template applied)")):
        section = value.get(key)
        if isinstance(section, dict):
            rows = [(k, fmt(v)) for k, v in section.items() if not isinstance(v, dict)]
            for k, v in section.items():
                if isinstance(v, dict):
                    rows += [(f"{k}: {inner}", fmt(n)) for inner, n in v.items()]
            groups.append({"title": title, "rows": rows or [("(none)", "0")]})
    other = {k: v for k, v in value.items() if k not in ("counts", "issues", "quality", "tokens")}
    issue_rows = []
    if issues.ok:
        for row in issues.value[:MAX_ISSUES_SHOWN]:
            # the keys of data/validate.py Issue.to_dict
            where = row.get("path") or ""
            if row.get("line") is not None:
                where = f"{where}:{row['line']}"
            issue_rows.append({"severity": row.get("severity", ""), "code": row.get("code", ""),
                               "where": where, "message": row.get("message", "")})
    return {
        "available": True, "note": None, "groups": groups, "other": describe_mapping(other) if other else None,
        "issues": issue_rows, "issues_total": len(issues.value) if issues.ok else None,
        "issues_note": None if issues.ok else issues.note(root),
    }


def _audit(root: Path) -> dict[str, Any]:
    """The top of RUN/audit/ (eval/audit.py), shown under Data; absent when the run has no audit."""
    from tunelab.eval.audit import read_audit

    found = read_audit(root)
    if found is None:
        return {"available": False}
    rows, summary = found
    shown = [{"where": f"{r['file']}:{r['line']}", "suspicion": f"{r['suspicion']:.1f}", "answer": r["answer"],
              "model_answer": "—" if r["model_answer"] is None else r["model_answer"], "flagged": r["flagged"]}
             for r in rows[:MAX_AUDIT_SHOWN]]
    title = "Suspect training examples" if summary["claims_errors"] else "Hardest training examples (no error claimed)"
    return {"available": True, "title": title, "how_to_read": summary["how_to_read"], "rows": shown,
            "total": len(rows), "flagged": summary["flagged"]}


def _cleaned(paths: RunPaths) -> dict[str, Any]:
    """eval/metrics.json `cleaned` (eval/cleaned.py): trained on a cleaned copy of another run's data (read
    as found: shown even when another part of the file does not check)."""
    metrics = read_json(paths.metrics)
    value = (metrics.value or {}).get("cleaned") if metrics.ok and isinstance(metrics.value, dict) else None
    if not isinstance(value, dict) or not value.get("text"):
        return {"available": False}
    lines = value.get("dropped_lines") or []
    return {"available": True, "text": value["text"], "parent": value.get("parent_run"), "source": value.get("source"),
            "dropped": f"{len(lines)} line(s) of {value.get('source')}: {', '.join(map(str, lines[:40]))}"
                       + (" ..." if len(lines) > 40 else "")}


def _training(log: RunFile, summary: RunFile, root: Path, rise: Any = None) -> dict[str, Any]:
    """`rise`: eval/metrics.json overfitting.val_rise, the judgement against the curve's noise; without
    it (older runs) the badge shows the events training wrote."""
    out: dict[str, Any] = {"available": log.ok or summary.ok, "notes": [], "plots": {}}
    for f in (log, summary):
        if not f.ok:
            out["notes"].append(f.note(root))
        elif f.bad_lines:
            out["notes"].append(f"{f.note(root).split(' is ')[0]}: lines {f.bad_lines[:10]} did not parse")
    summary_value = summary.value.model_dump(mode="json") if summary.ok else {}
    out["summary"] = [(k, fmt(v)) for k, v in summary_value.items()]
    rows = log.value if log.ok else []
    train_rows = [r for r in rows if r.get("kind") == "train" and isinstance(r.get("step"), int | float)]
    eval_rows = [r for r in rows if r.get("kind") == "eval" and isinstance(r.get("step"), int | float)]
    events = [r for r in rows if r.get("kind") == "event"]
    best_step = summary_value.get("best_step")
    if best_step is None:
        best = [r["step"] for r in eval_rows if r.get("is_best")]
        best_step = best[-1] if best else None
    stop_steps = [r.get("step") for r in events if r.get("event") == "early_stop"]
    stop_step = stop_steps[0] if stop_steps else None
    overfit_steps = [r.get("step") for r in events if r.get("event") == "overfitting" and r.get("step") is not None]
    if isinstance(rise, dict) and "rising" in rise:
        overfit_steps = [rise["rise_step"]] if rise["rising"] and rise.get("rise_step") is not None else []
    out.update(
        best_step=best_step, stop_step=stop_step, overfit_steps=overfit_steps,
        stopped_early=summary_value.get("stopped_early", stop_step is not None),
        events=[{"step": fmt(r.get("step")), "event": r.get("event", ""), "message": r.get("message", "")} for r in events],
        evals=[{"step": fmt(r["step"]), "val_loss": fmt(r.get("val_loss")), "val_token_acc": pct(r.get("val_token_acc")),
                "train_loss": fmt(r.get("train_loss")), "train_token_acc": pct(r.get("train_token_acc")),
                "is_best": bool(r.get("is_best"))} for r in eval_rows],
        last=train_rows[-1] if train_rows else None,
    )
    if train_rows or eval_rows:
        from tunelab.report import plots

        marks = {"best_step": best_step, "stop_step": stop_step, "overfit_steps": overfit_steps}
        out["plots"]["plot-loss"] = plots.training_curve(
            train_rows, eval_rows, "loss", {"val_loss": "validation", "train_loss": "train sample"}, "loss",
            "plot-loss", **marks)
        out["plots"]["plot-accuracy"] = plots.training_curve(
            train_rows, eval_rows, "token_acc", {"val_token_acc": "validation", "train_token_acc": "train sample"},
            "token accuracy", "plot-accuracy", **marks)
    return out


def _arms(metrics: RunFile, root: Path) -> dict[str, Any]:
    if not metrics.ok:
        return {"available": False, "note": f"{metrics.note(root)} (run `tunelab eval`)."}
    data: Metrics = metrics.value
    arms = data.arms
    order = _ordered_arms(arms)
    metric_names: list[str] = []
    for arm in order:
        metric_names += [m for m in arms[arm].metrics if m not in metric_names]
    rows = []
    for arm in order:
        row = arms[arm]
        values = [row.metrics.get(m) for m in metric_names]
        rows.append({
            "arm": arm, "quality": pct_ci(row.primary, row.ci95, data.primary_range),
            "prompt_tokens": fmt(row.prompt_tokens_mean), "completion_tokens": fmt(row.completion_tokens_mean),
            "latency_p50": fmt(row.latency_ms_p50), "latency_p95": fmt(row.latency_ms_p95),
            "batch_size": fmt(row.batch_size), "cost": fmt(row.usd_per_1m_queries),
            "metrics": [pct(v) if _is_fraction(v) else fmt(v) for v in values],
            "tokens_per_s": fmt(row.tokens_per_s), "hit_limit": fmt(row.finish_reasons.get("length", 0)),
            "repeats": pct((row.repetition or {}).get("share")),  # eval/repetition.py
        })
    plots_out = {}
    if order:
        from tunelab.report import plots

        # plotted as fractions of the primary's range, so a 1-10 judge draws on the same 0-100 axis
        ordered = {a: _on_unit_scale(arms[a].model_dump(mode="json"), data.primary_range) for a in order}
        plots_out["plot-quality"] = plots.quality_bars(ordered, data.primary_metric, "plot-quality")
        plots_out["plot-tradeoff"] = plots.tradeoff_scatter(ordered, data.primary_metric, "plot-tradeoff")
    prompts = data.prompts
    examples = prompts.get("example") if isinstance(prompts.get("example"), dict) else {}
    seen = {"instructions": prompts.get("instructions") if isinstance(prompts.get("instructions"), str) else None,
            "about": [(k, fmt(v)) for k, v in prompts.items() if k not in ("instructions", "example")],
            "examples": [{"arm": arm, "messages": [m for m in messages if isinstance(m, dict)]}
                         for arm, messages in examples.items() if isinstance(messages, list)]}
    return {"available": True, "note": None, "primary_metric": data.primary_metric, "primary_reason": data.primary_reason,
            "n_examples": data.n_examples, "rows": rows, "metric_names": metric_names,
            "show_cost": bool(order), "cost": describe_mapping(data.cost.model_dump(mode="json")), "plots": plots_out,
            "prompts": seen, "graders": _grader_rows(data.model_dump(mode="json"), order),
            "decoding": ", ".join(f"{k} {fmt(v)}" for k, v in data.decoding.items())}


def _grader_rows(data: Mapping[str, Any], order: list[str]) -> list[dict[str, Any]]:
    """One row per grader of eval/metrics.json: its type and, per arm, mean [95% CI] over the examples
    it scored, with the failures counted."""
    graders = data.get("graders") if isinstance(data.get("graders"), dict) else {}
    configs = [c for c in graders.get("configs") or [] if isinstance(c, dict) and isinstance(c.get("name"), str)]
    arms = data.get("arms") or {}
    rows = []
    for config in configs:
        cells = []
        for arm in order:
            column = (arms[arm].get("graders") or {}).get(config["name"])
            if not isinstance(column, dict) or not isinstance(column.get("mean"), int | float):
                cells.append("all failed" if isinstance(column, dict) else "—")
                continue
            ci = column.get("ci95")
            text = f"{column['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) and len(ci) == 2 else "")
            if column.get("failed"):
                text += f", {column['failed']} failed"
            cells.append(text)
        rows.append({"name": config["name"], "type": config.get("type", "—"), "cells": cells,
                     "primary": config["name"] == data.get("primary_metric")})
    return rows


def _overfitting(value: Any, metrics: RunFile, training: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """Lead sentences from the numbers eval reported (named in eval/run.py), then everything else."""
    out: dict[str, Any] = {"available": value is not None or bool(training.get("overfit_steps")), "note": None,
                           "findings": [], "flagged": None, "details": None}
    if value is None:
        out["note"] = metrics.note(root) if not metrics.ok else "eval/metrics.json has no overfitting results"
    if not isinstance(value, dict):
        out["details"] = describe_mapping(value) if value is not None else None
        return out
    task = value.get("task_metric")
    if isinstance(task, dict) and isinstance(task.get("train_sample"), int | float) and isinstance(task.get("test"), int | float):
        gap = task.get("train_minus_test")
        out["findings"].append(
            f"{task.get('arm', 'tuned')} scores {pct(task['train_sample'])}% {task.get('metric', '')} on "
            f"{fmt(task.get('train_sample_n'))} training examples and {pct(task['test'])}% on the test set"
            + (f" (train - test: {100 * gap:+.1f} points)" if isinstance(gap, int | float) else ""))
    rising = value.get("val_rising_while_train_falls")
    if isinstance(rising, bool):
        out["flagged"] = rising
        out["findings"].append(
            f"validation loss rose off its minimum (step {fmt(value.get('best_step'))}, {fmt(value.get('best_val_loss'))}) "
            f"to {fmt(value.get('final_val_loss'))} while train loss kept falling" if rising else
            f"validation loss did not rise while train loss fell (best at step {fmt(value.get('best_step'))}, "
            f"final {fmt(value.get('final_val_loss'))})")
    rise = value.get("val_rise")
    if isinstance(rise, dict) and isinstance(rise.get("tolerance"), int | float):
        where = {"before the rise": "come before the rise", "after the rise": "come after the rise"}.get(
            rise.get("evaluated_checkpoint") or "", "")
        out["findings"].append(
            f"a rise counts beyond {fmt(rise['tolerance'])} (the validation loss's own noise)"
            + (f"; it began at step {fmt(rise.get('rise_step'))}" if rise.get("rise_step") is not None else "")
            + (f"; the evaluated weights (step {fmt(rise.get('evaluated_step'))}) {where}" if where else ""))
    copies = value.get("reference_is_train_answer")
    if isinstance(copies, int | float):
        out["findings"].append(f"{pct(copies)}% of test references are word for word a training answer "
                               "(outputs that copy a training answer are counted per arm below)")
    # the loss curve and its events are drawn and listed in the Training section
    out["details"] = describe_mapping(value, exclude=("loss_curve", "overfitting_events"))
    return out


def _is_fraction(value: Any) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_inputs(test: RunFile) -> dict[str, dict[str, Any]]:
    """id -> {"input": last user message, "source": "file:line"} from the run's prepared test split."""
    out = {}
    if not test.ok:
        return out
    for row in test.value:
        messages = row.get("messages") if isinstance(row.get("messages"), list) else []
        users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        out[str(row.get("id"))] = {"input": users[-1] if users else "", "source": row.get("source")}
    return out


def example_slices(inputs: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, str], list[Path]]:
    """Test example id -> its slice, from the `<stem>.slices.jsonl` beside each example's test file;
    and the slice files found."""
    slice_files: dict[Path, dict[int, str] | None] = {}
    slice_of: dict[str, str] = {}
    for example_id, info in inputs.items():
        source = info.get("source")
        if not isinstance(source, str) or ":" not in source:
            continue
        file_part, _, line = source.rpartition(":")
        if not line.isdigit():
            continue
        test_file = Path(file_part)
        slices_path = test_file.with_name(f"{test_file.stem}.slices.jsonl")
        if slices_path not in slice_files:
            loaded = read_jsonl(slices_path)
            slice_files[slices_path] = (
                {int(r["line"]): str(r["slice"]) for r in loaded.value if "line" in r and "slice" in r}
                if loaded.ok else None
            )
        table = slice_files[slices_path]
        if table and int(line) in table:
            slice_of[example_id] = table[int(line)]
    return slice_of, sorted(p for p, t in slice_files.items() if t)


def _slices(predictions: Sequence[Mapping[str, Any]], inputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean per-example score by test slice and arm, when the test file has a `<stem>.slices.jsonl`."""
    slice_of, slice_files = example_slices(inputs)
    if not slice_of:
        return {"available": False}
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in predictions:
        name = slice_of.get(str(row.get("id")))
        if name is not None and isinstance(row.get("score"), int | float):
            scores[name][row.get("arm", "?")].append(float(row["score"]))
    arms = _ordered_arms({a: None for per_arm in scores.values() for a in per_arm})
    rows = []
    for name in sorted(scores):
        counts = {len(v) for v in scores[name].values()}
        rows.append({"slice": name, "n": max(counts) if counts else 0,
                     "values": [pct(sum(v) / len(v)) if (v := scores[name].get(a)) else "—" for a in arms]})
    return {"available": True, "arms": arms, "rows": rows,
            "files": [str(p) for p in slice_files]}


def _disagreements(predictions: Sequence[Mapping[str, Any]], inputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    by_id: dict[str, dict[str, Mapping[str, Any]]] = defaultdict(dict)
    for row in predictions:
        by_id[str(row.get("id"))][str(row.get("arm"))] = row
    candidates = []
    for example_id, per_arm in by_id.items():
        scores = {a: float(r["score"]) for a, r in per_arm.items() if isinstance(r.get("score"), int | float)}
        if len(scores) < 2 or max(scores.values()) == min(scores.values()):
            continue
        tuned = scores.get("tuned", scores.get("tuned+rag"))
        others = [scores[a] for a in PROMPT_ONLY_ARMS if a in scores]
        tuned_gap = abs(tuned - max(others)) if tuned is not None and others else 0.0
        candidates.append((-tuned_gap, -(max(scores.values()) - min(scores.values())), example_id))
    candidates.sort()
    examples = []
    for _, _, example_id in candidates[:MAX_DISAGREEMENTS]:
        per_arm = by_id[example_id]
        arms = _ordered_arms(per_arm)
        reference = next((r.get("reference") for r in per_arm.values() if r.get("reference") is not None), "")
        examples.append({
            "id": example_id, "input": inputs.get(example_id, {}).get("input"), "reference": reference,
            "source": inputs.get(example_id, {}).get("source"),
            "arms": [{"arm": a, "output": per_arm[a].get("output", ""), "score": per_arm[a].get("score"),
                      "score_text": fmt(per_arm[a].get("score"))} for a in arms],
        })
    return {"n_disagree": len(candidates), "n_total": len(by_id), "examples": examples}


def _lineage(paths: RunPaths) -> dict[str, Any]:
    """A run made by `tunelab update` or `rebase` (eval/lineage.json): its parent, the paired
    comparisons, and the parent's numbers beside this run's on the same test set."""
    from tunelab.runs import parent_paths, read_lineage

    lineage = read_lineage(paths)
    if lineage is None:
        return {"available": False}
    parent = parent_paths(paths, lineage.parent)
    parent_metrics = read_keys(parent.metrics, Metrics)
    own_metrics = read_keys(paths.metrics, Metrics)
    parent_arms = (parent_metrics.value or {}).get("arms", {}) if parent_metrics.ok else {}
    own_arms = (own_metrics.value or {}).get("arms", {}) if own_metrics.ok else {}
    rows = [{"arm": arm, "parent": pct_ci((parent_arms.get(arm) or {}).get("primary"), (parent_arms.get(arm) or {}).get("ci95")),
             "own": pct_ci((own_arms.get(arm) or {}).get("primary"), (own_arms.get(arm) or {}).get("ci95"))}
            for arm in _ordered_arms({**parent_arms, **own_arms})]
    return {"available": True, "kind": lineage.kind, "text": lineage.text, "decision": lineage.decision,
            "parent_name": lineage.parent.get("name"), "parent_model": lineage.parent.get("model"),
            "parent_report": str(parent.report_html), "parent_note": None if parent_metrics.ok else parent_metrics.note(parent.root),
            "comparisons": [c.text for c in lineage.comparisons], "rows": rows}


# ---------------------------------------------------------------------------------------------- assembly


def build_report_context(run_dir: str | Path) -> dict[str, Any]:
    """Everything the templates show, read from the run's files (see the module docstring)."""
    paths = RunPaths(Path(run_dir))
    root = paths.root
    recipe_text = paths.recipe.read_text(encoding="utf-8", errors="replace") if paths.recipe.is_file() else None
    recipe: dict[str, Any] = {}
    if recipe_text:
        import yaml

        try:
            loaded = yaml.safe_load(recipe_text)
            recipe = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            recipe = {}
    manifest = read_model(paths.manifest, Manifest)
    stats = read_keys(paths.data_stats, DataStats)
    issues = read_jsonl(paths.data_issues)
    test = read_jsonl(paths.data_split("test"))
    log = read_jsonl(paths.train_log)
    summary = read_model(paths.train_summary, TrainSummary)
    metrics = read_model(paths.metrics, Metrics)
    predictions = read_jsonl(paths.predictions)

    inputs = test_inputs(test)
    preds = predictions.value if predictions.ok else []
    model = (recipe.get("model") or {}).get("name") if isinstance(recipe.get("model"), dict) else None
    overfitting_value = metrics.value.overfitting if metrics.ok else None
    training = _training(log, summary, root,
                         overfitting_value.get("val_rise") if isinstance(overfitting_value, dict) else None)
    arms = _arms(metrics, root)
    forgetting_value = metrics.value.forgetting if metrics.ok else None
    return {
        "name": recipe.get("name") or root.name, "run_dir": str(root), "model": model,
        "method": recipe.get("method"), "sections": SECTIONS,
        "verdict": _verdict(metrics, root),
        "preference": describe_preference(getattr(metrics.value, "preference", None) if metrics.ok else None),
        "lineage": _lineage(paths),
        "data": _data(stats, issues, root),
        "audit": _audit(root),
        "cleaned": _cleaned(paths),
        "training": training,
        "arms": arms,
        "overfitting": {**_overfitting(overfitting_value, metrics, training, root),
                        "events": [e for e in training.get("events", []) if e["event"] == "overfitting"],
                        "slices": _slices(preds, inputs)},
        "forgetting": {
            "available": forgetting_value is not None,
            "note": None if forgetting_value is not None else (
                metrics.note(root) if not metrics.ok else "eval/metrics.json has no forgetting results "
                "(eval.forgetting: false, or the tuned arm was not evaluated)"),
            "details": describe_mapping(forgetting_value) if forgetting_value is not None else None,
            "plots": _scale_plot(forgetting_value),
            "findings": _keep_line(forgetting_value),
        },
        "examples": {"available": predictions.ok, "note": None if predictions.ok else predictions.note(root),
                     "bad_lines": predictions.bad_lines, **_disagreements(preds, inputs)},
        "manifest": {"available": manifest.ok, "note": None if manifest.ok else manifest.note(root),
                     "details": describe_mapping(manifest.value.model_dump(mode="json")) if manifest.ok else None,
                     "recipe_text": recipe_text, "command": f"tunelab run {paths.recipe}"},
    }


def _keep_line(forgetting: Mapping[str, Any] | None) -> list[str]:
    """The must-keep set (eval.keep) in one line, flagged or not; nothing without one."""
    keep = (forgetting or {}).get("keep") if isinstance(forgetting, Mapping) else None
    if not isinstance(keep, Mapping) or not keep.get("text"):
        return []
    name = Path(str(keep["file"])).name if keep.get("file") else "—"
    return [f"Must-keep set (eval.keep, {name}): {keep['text']}"]


def _scale_plot(forgetting: Mapping[str, Any] | None) -> dict[str, str]:
    """Task score against retention across the adapter scales tried (eval/adapter_scale.json), if any."""
    scale = (forgetting or {}).get("adapter_scale")
    if not isinstance(scale, dict) or not isinstance(scale.get("candidates"), list) or not scale["candidates"]:
        return {}
    from tunelab.report import plots

    try:
        return {"plot-scales": plots.scale_tradeoff(scale["candidates"], scale.get("scale"), str(scale.get("metric")),
                                                    float(scale.get("threshold") or 0.05), "plot-scales")}
    except (KeyError, TypeError, ValueError):  # a damaged file: the details table still shows what is there
        return {}


def render_html(context: Mapping[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tunelab", "report"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    plots = {**context["training"].get("plots", {}), **context["arms"].get("plots", {}),
             **context["forgetting"].get("plots", {})}
    safe_plots = {name: jinja2.utils.markupsafe.Markup(svg) for name, svg in plots.items()}
    return env.get_template("report.html.jinja").render(**context, plots=safe_plots)


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(context: Mapping[str, Any]) -> str:
    lines = [f"# tunelab report: {context['name']}", ""]
    if context["model"]:
        lines += [f"model {context['model']}, method {context['method']}, run {context['run_dir']}", ""]
    verdict = context["verdict"]
    lines += ["## Verdict", ""]
    if verdict["available"]:
        if verdict.get("provisional_reason"):
            lines += [f"> **Provisional verdict**: {verdict['provisional_reason']}", ""]
        lines += [f"**{verdict['headline']}**", ""] + ([verdict["detail"], ""] if verdict.get("detail") else [])
        if verdict.get("recommended"):
            lines += [f"Use: **{verdict['recommended']}**", ""]
        lines += ["| arm (cheapest first) | cost / 1k requests | points, 95% CI | decision |", "|---|---|---|---|"]
        lines += [f"| {r['arm']} | {r['cost']} | {r['quality']} | {r['status']} |" for r in verdict["rows"]] + [""]
        lines += [f"- {fact}" for fact in verdict["facts"]] + ([""] if verdict["facts"] else [])
    else:
        lines += [verdict["note"], ""]
    lineage = context["lineage"]
    if lineage["available"]:
        lines += [f"## Parent ({lineage['kind']} of {lineage['parent_name']}, report: {lineage['parent_report']})", "",
                  f"**{lineage['text']}**", "", "| arm | parent | this run |", "|---|---|---|"]
        lines += [f"| {row['arm']} | {row['parent']} | {row['own']} |" for row in lineage["rows"]] + [""]
    if context.get("preference"):  # a dpo run: what preference tuning changed
        lines += ["## What DPO changed", "", context["preference"]["text"], ""]
        lines += [f"- {_md_escape(ex['prompt'])}: sft `{_md_escape(ex['sft'])}` -> tuned `{_md_escape(ex['tuned'])}`"
                  for ex in context["preference"]["examples"]] + [""]
    arms = context["arms"]
    lines += ["## Arms", ""]
    if arms["available"]:
        lines += [f"{arms['primary_metric']} (%, 95% interval) on {fmt(arms['n_examples'])} test examples", "",
                  "| arm | quality | prompt tokens | completion tokens | latency p50 ms | latency p95 ms |"
                  + (" cost / 1M queries |" if arms["show_cost"] else ""),
                  "|---|---|---|---|---|---|" + ("---|" if arms["show_cost"] else "")]
        for row in arms["rows"]:
            lines.append(f"| {row['arm']} | {row['quality']} | {row['prompt_tokens']} | {row['completion_tokens']} | "
                         f"{row['latency_p50']} | {row['latency_p95']} |" + (f" {row['cost']} |" if arms["show_cost"] else ""))
        lines.append("")
        if any(row["repeats"] != "—" for row in arms["rows"]):
            lines += ["Answers that repeat a line or loop on the same words (%): "
                      + ", ".join(f"{row['arm']} {row['repeats']}" for row in arms["rows"]), ""]
        if arms["graders"]:
            names = [row["arm"] for row in arms["rows"]]
            lines += ["## Graders", "", "mean [95% interval] over the examples each grader scored", "",
                      "| grader | type | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
            lines += [f"| {_md_escape(g['name'])}{' (primary)' if g['primary'] else ''} | {g['type']} | "
                      + " | ".join(g["cells"]) + " |" for g in arms["graders"]]
            lines.append("")
    else:
        lines += [arms["note"], ""]
    data = context["data"]
    lines += ["## Data", ""]
    if data["available"]:
        for group in data["groups"]:
            lines.append(f"- {group['title']}: " + ", ".join(f"{k} {v}" for k, v in group["rows"]))
        lines.append("")
    else:
        lines += [data["note"], ""]
    audit = context["audit"]
    if audit["available"]:
        lines += [f"### {audit['title']} (audit/audit.jsonl)", "", audit["how_to_read"], "",
                  "| where | suspicion | answer | model answer |", "|---|---|---|---|"]
        lines += [f"| {_md_escape(r['where'])} | {r['suspicion']}{' flagged' if r['flagged'] else ''} | "
                  f"{_md_escape(r['answer'])} | {_md_escape(r['model_answer'])} |" for r in audit["rows"]] + [""]
    if context["cleaned"]["available"]:
        lines += ["### Trained on a cleaned copy", "", f"**{context['cleaned']['text']}**", "",
                  f"Left out: {context['cleaned']['dropped']}", ""]
    training = context["training"]
    lines += ["## Training", ""]
    if training["available"]:
        if training["summary"]:
            lines.append("- " + ", ".join(f"{k} {v}" for k, v in training["summary"]))
        lines.append(f"- best checkpoint: step {fmt(training['best_step'])}; stopped early: {fmt(training['stopped_early'])}")
        for event in training["events"]:
            if event["event"] in ("overfitting", "early_stop", "nonfinite_skipped"):
                lines.append(f"- step {event['step']}: {event['event']}: {_md_escape(event['message'])}")
        lines.append("")
    for note in training["notes"]:
        lines += [note, ""]
    for key, title in (("overfitting", "Overfitting"), ("forgetting", "Forgetting")):
        section = context[key]
        lines += [f"## {title}", ""]
        details = section.get("details")
        findings = section.get("findings") or []
        lines += [f"- {finding}" for finding in findings] + ([""] if findings else [])
        if details and details["text"]:
            lines += [details["text"] + (" (flagged)" if details["flagged"] else ""), ""]
        elif details and not findings:
            rows = details["rows"] + [(f"{g['title']}.{k}", v) for g in details["groups"] for k, v in g["rows"]]
            lines += [", ".join(f"{k} {v}" for k, v in rows[:8]), ""]
        if key == "overfitting" and section["slices"]["available"]:
            s = section["slices"]
            lines += ["Quality by test slice (%):", "",
                      "| slice | n | " + " | ".join(s["arms"]) + " |", "|---|---|" + "---|" * len(s["arms"])]
            lines += [f"| {r['slice']} | {r['n']} | " + " | ".join(r["values"]) + " |" for r in s["rows"]]
            lines.append("")
        if section.get("note") and not details:
            lines += [section["note"], ""]
    lines += ["## Files", "", f"- HTML report: {Path(context['run_dir']) / 'report.html'}",
              f"- reproduce: `{context['manifest']['command']}`", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write report.html and report.md into the run directory; returns the path of report.html."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        from tunelab.errors import ConfigError

        raise ConfigError(f"{run_dir}: no such run directory")
    context = build_report_context(paths.root)
    write_text_atomic(paths.report_html, render_html(context))
    write_text_atomic(paths.report_md, render_markdown(context))
    return paths.report_html
