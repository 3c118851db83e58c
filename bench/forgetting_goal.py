"""The forgetting goal on the bench tasks: retention and perplexity against the task score and the training time
of the unconstrained fine-tune (docs/evaluation.md, Forgetting; issue: keep what it knew).

    python bench/tasks/generate.py
    python bench/forgetting_goal.py --task routing --label unconstrained train.replay_share=0 'eval.adapter_scales=[1]'
    python bench/forgetting_goal.py --task routing --label default          # the shipped recipe: no training keys
    python bench/forgetting_goal.py --collect runs/bench/routing-unc --task routing --label unconstrained

Each run is `tunelab run bench/tasks/<task>/recipe.yaml` with `eval.arms=[tuned]` (the task score of the tuned
arm on the test set; forgetting measures the base model itself) plus the overrides given. Real-model runs: wrap
in the team's lock. Writes one row per (task, label) into bench/results/forgetting.json (other rows stay) with
the command, the overrides and the machine's load, and prints the goal's comparison for the task: retention of
the base-correct probes >= 90% (interval), perplexity <= +5%, task score within 3 points of the row labelled
`unconstrained`, training time <= +15% of it (seconds, and the tokens trained, which a loaded machine does not
distort).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "forgetting.json"
EVAL_ONLY = ["eval.arms=[tuned]"]


def collect(run: Path, task: str, label: str, command: list[str] | None, overrides: list[str],
            load_start: float | None) -> dict[str, Any]:
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    plan = json.loads((run / "train" / "plan.json").read_text())
    stages = json.loads((run / "stages.json").read_text())
    summary_file = run / "train" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    tuned = metrics["arms"]["tuned"]
    forgetting = metrics.get("forgetting") or {}
    kept = forgetting.get("retention") or {}
    ppl = forgetting.get("perplexity") or {}
    scale = forgetting.get("adapter_scale") or {}
    return {
        "task": task, "label": label, "run": str(run), "command": shlex.join(command) if command else None,
        "overrides": overrides, "metric": metrics["primary_metric"],
        "task_score": round(100 * tuned["primary"], 1),
        "task_ci95": [round(100 * v, 1) for v in tuned["ci95"]] if tuned.get("ci95") else None,
        "test_examples": tuned.get("n"),
        "retention": kept.get("value"), "retention_ci95": kept.get("ci95"), "retention_n": kept.get("n"),
        "retention_by_kind": {k: v.get("value") for k, v in (kept.get("by_kind") or {}).items()},
        "perplexity_change": ppl.get("relative_change"), "perplexity_ci95": ppl.get("ci95"),
        "flagged": forgetting.get("flagged"),
        "adapter_scale": scale.get("scale"), "scale_reason": scale.get("reason"),
        "scale_candidates": [{k: c.get(k) for k in ("scale", "task", "retention", "retention_ci95", "perplexity_change")}
                             for c in scale.get("candidates") or []],
        "replay": plan.get("replay"), "anchor": plan.get("anchor"),
        "train_examples": plan["examples"], "train_tokens_per_epoch": plan["tokens"], "steps": plan["steps"],
        "epochs": plan["epochs"], "steps_run": summary.get("steps"),
        "tokens_trained": plan["tokens"] * plan["epochs"],
        "train_s": stages.get("train", {}).get("seconds"), "eval_s": stages.get("eval", {}).get("seconds"),
        "load_average_1m_start": load_start, "load_average_1m_end": round(os.getloadavg()[0], 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def compare(rows: list[dict[str, Any]], task: str) -> list[str]:
    """The goal, row by row, against the task's `unconstrained` row."""
    base = next((r for r in rows if r["task"] == task and r["label"] == "unconstrained"), None)
    lines = [f"{'label':<22} {'task':>6} {'d':>6} {'retention':>18} {'ppl':>7} {'train s':>8} {'tokens x':>8}"]
    for r in (r for r in rows if r["task"] == task):
        kept = "n/a" if r["retention"] is None else (
            f"{r['retention']:.0%} [{r['retention_ci95'][0]:.0%},{r['retention_ci95'][1]:.0%}]")
        d = "" if base is None else f"{r['task_score'] - base['task_score']:+.1f}"
        tokens = "" if base is None else f"{r['tokens_trained'] / base['tokens_trained']:.2f}"
        ppl = "n/a" if r["perplexity_change"] is None else f"{r['perplexity_change']:+.1%}"
        lines.append(f"{r['label']:<22} {r['task_score']:>6} {d:>6} {kept:>18} {ppl:>7} {r['train_s'] or 0:>8.0f} {tokens:>8}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=["routing", "orders", "dates", "replies", "priority"])
    parser.add_argument("--label", required=True, help="the row's name: 'unconstrained' is what others compare to")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--collect", type=Path, help="read this finished run instead of running one")
    parser.add_argument("--note", default=None, help="what the row should say beside its numbers (e.g. the load seen)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    recipe = HERE / "tasks" / args.task / "recipe.yaml"
    load_start = round(os.getloadavg()[0], 2)
    command = None
    if args.collect:
        run = args.collect
    else:
        if not (HERE / "tasks" / args.task / "train.jsonl").is_file():
            raise SystemExit(f"{recipe.parent}: no data; run python bench/tasks/generate.py first")
        name = f"{args.task}-{args.label}-{int(time.time())}"
        command = [sys.executable, "-m", "tunelab", "run", str(recipe), f"out_dir={args.out_dir}", f"name={name}",
                   *EVAL_ONLY, *args.overrides]
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        done = subprocess.run(command, env=env)
        if done.returncode != 0:
            raise SystemExit(f"tunelab run failed ({done.returncode})")
        run = args.out_dir / name
    row = collect(run, args.task, args.label, command, args.overrides, None if args.collect else load_start)
    row["note"] = args.note
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    rows = [r for r in rows if (r["task"], r["label"]) != (args.task, args.label)] + [row]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(json.dumps(row, indent=1))
    print("\n".join(compare(rows, args.task)))


if __name__ == "__main__":
    main()
