"""`tunelab runs list` and `tunelab runs compare`: runs side by side on the same eval set.

Reads each run's recipe.yaml, manifest.json, eval/metrics.json and eval/predictions.jsonl. `list`
writes nothing and shows lineage (the run a run was updated or rebased from, its data fingerprint);
`compare` returns markdown (printed by the CLI) and, when asked, writes one self-contained HTML file.
Runs are comparable only when they were evaluated on the same examples: the same example ids with
the same references in the compared arm, else a clear error. The paired
test (bootstrap interval + sign-flip permutation, tunelab.eval.metrics.paired_comparison) is run on
the per-example scores of that arm, each run against the first one named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import ARMS
from tunelab.contract import Manifest, Metrics
from tunelab.errors import ConfigError
from tunelab.eval.metrics import delta_points
from tunelab.files import write_text_atomic
from tunelab.report.html import fmt, pct_ci, read_jsonl, read_model
from tunelab.runs import RunPaths, data_fingerprint_id

MAX_IDS_SHOWN = 5


@dataclass
class RunRow:
    name: str
    path: Path
    model: str | None
    method: str | None
    status: str
    primary_metric: str | None = None
    tuned_primary: float | None = None
    tuned_ci95: list[float] | None = None
    parent: str | None = None  # "update of NAME" / "rebase of NAME" (tunelab.lifecycle)
    data_fingerprint: str | None = None


def _recipe_fields(paths: RunPaths) -> dict[str, Any]:
    import yaml

    try:
        value = yaml.safe_load(paths.recipe.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def run_status(paths: RunPaths) -> str:
    """The furthest stage whose output exists."""
    if paths.report_html.is_file():
        return "reported"
    if paths.metrics.is_file():
        return "evaluated"
    if paths.adapter.is_dir() or paths.model.is_dir() or paths.train_summary.is_file():
        return "trained"
    if paths.train_log.is_file():
        return "training (or stopped)"
    if paths.data_stats.is_file():
        return "prepared"
    return "created"


def list_runs(out_dir: str | Path) -> list[RunRow]:
    out = Path(out_dir)
    if not out.is_dir():
        raise ConfigError(f"{out}: no such folder (runs live under the recipe's out_dir, default runs/)")
    rows = []
    for folder in sorted(p for p in out.iterdir() if RunPaths(p).recipe.is_file()):
        paths = RunPaths(folder)
        recipe = _recipe_fields(paths)
        model = recipe.get("model")
        row = RunRow(folder.name, folder, model.get("name") if isinstance(model, dict) else None,
                     recipe.get("method"), run_status(paths))
        manifest = read_model(paths.manifest, Manifest)
        if manifest.ok:
            parent = manifest.value.parent
            row.parent = f"{parent.model_extra.get('kind')} of {parent.model_extra.get('name')}" if parent else None
            row.data_fingerprint = data_fingerprint_id(manifest.value.model_dump(mode="json"))
        metrics = read_model(paths.metrics, Metrics)
        if metrics.ok:
            row.primary_metric = metrics.value.primary_metric
            tuned = metrics.value.arms.get("tuned")
            if tuned is not None:
                row.tuned_primary, row.tuned_ci95 = tuned.primary, list(tuned.ci95)
        rows.append(row)
    return rows


def format_run_list(rows: list[RunRow]) -> str:
    if not rows:
        return "no runs"
    header = ("name", "model", "method", "status", "tuned (%, 95% CI)", "parent", "data")
    table = [header] + [
        (r.name, r.model or "—", r.method or "—", r.status,
         f"{pct_ci(r.tuned_primary, r.tuned_ci95)} {r.primary_metric}" if r.tuned_primary is not None else "—",
         r.parent or "—", r.data_fingerprint or "—")
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)


# ---------------------------------------------------------------------------------------------- compare


@dataclass
class LoadedRun:
    label: str
    paths: RunPaths
    recipe: dict[str, Any]
    manifest: Manifest | None
    metrics: Metrics
    scores: dict[str, float]  # example id -> score of the compared arm
    references: dict[str, str]


@dataclass
class Comparison:
    arm: str
    primary_metric: str
    n_examples: int
    labels: list[str]
    rows: list[tuple[str, list[str]]]  # (what, one cell per run)
    tests: list[dict[str, Any]] = field(default_factory=list)  # one per run after the first, vs the first


def _load(run_dir: Path, label: str, arm: str) -> LoadedRun:
    paths = RunPaths(run_dir)
    if not paths.recipe.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no recipe.yaml)")
    metrics = read_model(paths.metrics, Metrics)
    if not metrics.ok:
        raise ConfigError(f"{metrics.note(paths.root)}; evaluate it first: tunelab eval {run_dir}")
    predictions = read_jsonl(paths.predictions)
    if not predictions.ok:
        raise ConfigError(f"{predictions.note(paths.root)}; evaluate it first: tunelab eval {run_dir}")
    if predictions.bad_lines:
        raise ConfigError(f"{paths.predictions}:{predictions.bad_lines[0]}: not a JSON object; re-run tunelab eval")
    scores, references = {}, {}
    for row in predictions.value:
        if row.get("arm") != arm:
            continue
        example_id = str(row.get("id"))
        if row.get("score") is None and row.get("grader_errors"):
            continue  # the primary grader failed on this example (counted in metrics.json): nothing to pair
        if not isinstance(row.get("score"), int | float):
            raise ConfigError(f"{paths.predictions}: example {example_id} of arm {arm} has no numeric score")
        scores[example_id] = float(row["score"])
        references[example_id] = str(row.get("reference"))
    if not scores:
        arms = sorted({str(r.get("arm")) for r in predictions.value})
        raise ConfigError(f"{paths.predictions}: no predictions of arm '{arm}' (it has: {', '.join(arms) or 'none'})")
    manifest = read_model(paths.manifest, Manifest)
    return LoadedRun(label, paths, _recipe_fields(paths), manifest.value if manifest.ok else None,
                     metrics.value, scores, references)


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [p.name for p in run_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in run_dirs]


def _check_same_eval_set(runs: list[LoadedRun], arm: str) -> None:
    first = runs[0]
    for other in runs[1:]:
        only_first = sorted(set(first.scores) - set(other.scores))
        only_other = sorted(set(other.scores) - set(first.scores))
        if only_first or only_other:
            parts = []
            for run, ids in ((first, only_first), (other, only_other)):
                if ids:
                    shown = ", ".join(ids[:MAX_IDS_SHOWN]) + (", ..." if len(ids) > MAX_IDS_SHOWN else "")
                    parts.append(f"{len(ids)} only in {run.paths.root} ({shown})")
            raise ConfigError(
                f"{first.paths.root} and {other.paths.root} were not evaluated on the same examples "
                f"(arm {arm}: {len(first.scores)} vs {len(other.scores)} examples; " + "; ".join(parts)
                + "): compare runs evaluated on the same test file with the same eval.limit")
        differing = sorted(i for i in first.scores if first.references[i] != other.references[i])
        if differing:
            shown = ", ".join(differing[:MAX_IDS_SHOWN])
            raise ConfigError(
                f"{first.paths.root} and {other.paths.root} have the same example ids but different references "
                f"for {len(differing)} of them ({shown}): they were evaluated on different test sets")
        if other.metrics.primary_metric != first.metrics.primary_metric:
            raise ConfigError(
                f"{first.paths.root} scores {first.metrics.primary_metric} but {other.paths.root} scores "
                f"{other.metrics.primary_metric}: their per-example scores are not comparable")


def compare_runs(run_dirs: list[str | Path], arm: str = "tuned", seed: int = 0) -> Comparison:
    from tunelab.eval.metrics import paired_comparison

    if len(run_dirs) < 2:
        raise ConfigError("runs compare needs two or more run directories")
    dirs = [Path(d) for d in run_dirs]
    labels = _labels(dirs)
    runs = [_load(d, label, arm) for d, label in zip(dirs, labels, strict=True)]
    _check_same_eval_set(runs, arm)
    ids = sorted(runs[0].scores)
    primary = runs[0].metrics.primary_metric

    def cell(run: LoadedRun, what: str) -> str:
        model = run.recipe.get("model")
        arms = run.metrics.arms
        if what == "model":
            return str(model.get("name")) if isinstance(model, dict) else "—"
        if what == "method":
            return str(run.recipe.get("method") or "—")
        if what == "data fingerprint":
            value = run.manifest.data_sha256 if run.manifest is not None else None
            return value[:12] if value else "—"
        if what == "verdict":
            return run.metrics.verdict.text
        if what.startswith("arm:"):
            name, _, field_name = what[4:].partition("|")
            row = arms.get(name)
            if row is None:
                return "—"
            if field_name == "primary":
                return pct_ci(row.primary, row.ci95, run.metrics.primary_range)
            return fmt(getattr(row, field_name))
        raise ValueError(what)

    extra = sorted({a for r in runs for a in r.metrics.arms if a not in ARMS})  # eval.external arms
    arm_names = [a for a in ARMS if any(a in r.metrics.arms for r in runs)] + extra
    wanted = [("model", "model"), ("method", "method"), ("data fingerprint", "data fingerprint")]
    wanted += [(f"{a}: {primary} (%, 95% CI)", f"arm:{a}|primary") for a in arm_names]
    wanted += [(f"{arm}: prompt tokens / query", f"arm:{arm}|prompt_tokens_mean"),
               (f"{arm}: latency p50 (ms)", f"arm:{arm}|latency_ms_p50"), ("verdict", "verdict")]
    rows = [(title, [cell(r, what) for r in runs]) for title, what in wanted]

    tests = []
    base = runs[0]
    for other in runs[1:]:
        result = paired_comparison([other.scores[i] for i in ids], [base.scores[i] for i in ids], seed=seed)
        score_range = base.metrics.primary_range  # the same primary on the same examples: one scale
        points = delta_points(result.delta, score_range)
        lo, hi = delta_points(result.ci95[0], score_range), delta_points(result.ci95[1], score_range)
        measured = (f"{other.label} vs {base.label}: {points:+.1f} points of {primary} ({arm} arm), "
                    f"95% CI [{lo:+.1f}, {hi:+.1f}], p = {result.p_value:.4g}")
        if result.significant:
            text = f"{measured}: {other.label if result.delta > 0 else base.label} is better"
        else:
            text = f"{measured}: no significant difference"
        tests.append({"a": other.label, "b": base.label, "delta_points": points, "ci95_points": [lo, hi],
                      "p_value": result.p_value, "significant": result.significant, "text": text})
    return Comparison(arm, primary, len(ids), labels, rows, tests)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_comparison_markdown(comparison: Comparison) -> str:
    lines = [f"# tunelab runs compare: {' vs '.join(comparison.labels)}", "",
             f"Same {comparison.n_examples} test examples in every run (ids and references checked). "
             f"Paired test on the per-example {comparison.primary_metric} of the {comparison.arm} arm "
             "(bootstrap 95% interval, sign-flip permutation p-value), each run against the first.", "",
             "| | " + " | ".join(_md_cell(label) for label in comparison.labels) + " |",
             "|---|" + "---|" * len(comparison.labels)]
    lines += [f"| {_md_cell(title)} | " + " | ".join(_md_cell(c) for c in cells) + " |" for title, cells in comparison.rows]
    lines += ["", "## Paired test", ""]
    lines += [f"- {test['text']}" for test in comparison.tests]
    return "\n".join(lines) + "\n"


def render_comparison_html(comparison: Comparison) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("tunelab", "report"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template("compare.html.jinja").render(c=comparison)


def write_comparison_html(comparison: Comparison, out: str | Path) -> Path:
    out = Path(out)
    write_text_atomic(out, render_comparison_html(comparison))
    return out
