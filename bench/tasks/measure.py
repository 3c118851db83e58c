"""Run `tunelab run` with default settings on the bench tasks and tabulate what a user would see.

    python bench/tasks/generate.py
    python bench/tasks/measure.py [--tasks dates,orders] [--out-dir /tmp/task-runs] [key=value ...]

For each task: the plan (steps, epochs, what limited it), each arm's primary score, the tuned arm's
margin over the best of base/prompt/rag, prompt tokens (best prompt-only arm / tuned), whether the
verdict was provisional, and the wall time of every stage. Writes bench/results/tasks.json and prints
a table. Overrides (e.g. train.budget=null train.epochs=3) go to every run; say so when you report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "tasks.json"
PROMPT_ONLY = ("base", "prompt", "rag")


def measure(task: str, out_dir: Path, overrides: list[str]) -> dict:
    recipe = HERE / task / "recipe.yaml"
    if not (HERE / task / "train.jsonl").is_file():
        raise SystemExit(f"{HERE / task}: no data; run python bench/tasks/generate.py first")
    name = f"task-{task}-{int(time.time())}"
    started = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    done = subprocess.run([sys.executable, "-m", "tunelab", "run", str(recipe), f"out_dir={out_dir}", f"name={name}",
                           *overrides], capture_output=True, text=True, env=env)
    wall_s = time.perf_counter() - started
    run = out_dir / name
    if done.returncode != 0:
        return {"task": task, "error": done.stderr[-2000:], "wall_s": wall_s}
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    plan = json.loads((run / "train" / "plan.json").read_text())
    stages = json.loads((run / "stages.json").read_text())
    arms = metrics["arms"]
    scores = {arm: round(100 * row["primary"], 1) for arm, row in arms.items()}
    best_other = max((a for a in PROMPT_ONLY if a in arms), key=lambda a: arms[a]["primary"])
    verdict = metrics["verdict"]
    return {
        "task": task, "run": str(run), "overrides": overrides, "metric": metrics["primary_metric"],
        "examples": plan["examples"], "steps": plan["steps"], "epochs": plan["epochs"],
        "examples_per_step": plan["examples_per_step"], "limited_by": plan["limited_by"],
        "measured_tokens_per_s": plan["train_tokens_per_s"], "scores": scores,
        "tuned_minus_best_prompt_only": round(scores["tuned"] - scores[best_other], 1), "best_prompt_only": best_other,
        "prompt_tokens_ratio": round(arms[best_other]["prompt_tokens_mean"] / arms["tuned"]["prompt_tokens_mean"], 1),
        "verdict": verdict["text"], "provisional": verdict.get("provisional"),
        "forgetting": (metrics.get("forgetting") or {}).get("text"), "compiled": plan.get("compiled"),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "stage_s": {stage: record["seconds"] for stage, record in stages.items()}, "wall_s": round(wall_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="routing,orders,dates,replies")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/tunelab-task-runs"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for task in args.tasks.split(","):
        row = measure(task, args.out_dir, args.overrides)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # rows of the tasks not run this time stay as they were measured (each row says how)
    kept = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    ran = {r["task"] for r in rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": [r for r in kept if r["task"] not in ran] + rows}, indent=1) + "\n")
    print(f"\n{'task':<9} {'ex':>5} {'steps':>5} {'ep':>5} {'tuned':>6} {'best other':>14} {'margin':>7} {'tok x':>6} {'min':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['task']:<9} error: {r['error'][-200:]}")
            continue
        other = f"{r['best_prompt_only']} {r['scores'][r['best_prompt_only']]}"
        print(f"{r['task']:<9} {r['examples']:>5} {r['steps']:>5} {r['epochs']:>5.2f} {r['scores']['tuned']:>6} "
              f"{other:>14} {r['tuned_minus_best_prompt_only']:>7} {r['prompt_tokens_ratio']:>6} {r['wall_s'] / 60:>5.1f}"
              + ("  provisional" if r["provisional"] else ""))


if __name__ == "__main__":
    main()
