"""Does the data audit find planted errors? The real default model on small tasks with wrong answers planted.

    python bench/audit_planted.py --task routing --variant planted   # 10% of labels replaced by another label
    python bench/audit_planted.py --task routing --variant clean     # the same task, no planted error
    python bench/audit_planted.py --task routing --variant cleaned   # the planted file without the audit's top N
    python bench/audit_planted.py --task orders --variant planted    # 10% of JSON answers with one field swapped

Tasks come from bench/tasks/generate.py (routing: five made-up team codes; orders: free text -> nested
JSON), cut to --train examples (default 200) and 100 test examples, seeded. Planted errors are
plausible: another team code; one item's colour or size replaced by another valid one. Each variant
trains the default model with `tunelab train` defaults but train.epochs=--epochs (3) and
train.budget=--budget (an upper bound), audits the run
with the tuned model's answer to every training example (so every ranking below can be scored), and
scores the tuned model on the test set with the task's metric.

Detection, for every candidate ranking (the audit's signals alone and combined): of the P planted
errors, the share in the top 2P (recall@2P) and the share of the top P that are planted
(precision@P); and what the audit claims (flagged examples, right and wrong). Recovery (variant
cleaned): quality(cleaned) - quality(planted) over quality(clean) - quality(planted).
Writes runs under --out (default /tmp/audit-bench) and merges its numbers into
bench/results/audit_planted.json.

Recovery, re-planned so that it can show the effect (`--recovery`; one command runs the three runs
in order, or `--recovery --variant V` one of them, each under the team's real-model lock):

    python bench/audit_planted.py --task routing --recovery [--variant planted|cleaned|clean]

errors planted in the training file only (a separate clean validation file: the best step is chosen
on right answers; a separate test file of --test examples, default 300), every run `tunelab run` with the
same recipe and seeds (tuned arm only); the cleaned copy leaves out exactly what the planted run's
audit flags (`--write-clean --drop-flagged`, the default advice), and the cleaned run's own
eval/metrics.json `cleaned` holds its paired comparison with the planted run. Reported: each run's
test score, the paired differences (cleaned - planted, clean - planted, clean - cleaned: 95% CI and
p) and the share of the loss recovered with a paired bootstrap interval.
`--recovery --folds K` (after the planted run) audits the planted run out of fold and scores that
ranking's detection beside the run's own (its own audit/ is put back afterwards).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

os_env = __import__("os").environ
os_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "audit_planted.json"
PLANT_SHARE = 0.10
N_TEST = 100


def _generator():
    spec = importlib.util.spec_from_file_location("bench_tasks_generate", HERE / "tasks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plant(task: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: another label, or one JSON field swapped for another valid value."""
    if task == "routing":
        return rng.choice([c for c in ("Q7-NET", "Q7-PAY", "Q7-HW", "Q7-ACC", "Q7-SHIP") if c != answer])
    value = json.loads(answer)
    item = rng.choice(value["items"])
    field = rng.choice(["color", "size"])
    choices = {"color": ["black", "white", "navy", "red", "green", "grey"], "size": ["S", "M", "L", "XL"]}[field]
    item[field] = rng.choice([c for c in choices if c != item[field]])
    return json.dumps(value, separators=(",", ":"))


def make_task(task: str, n_train: int, folder: Path) -> dict:
    """train_planted.jsonl, train_clean.jsonl, test.jsonl and planted.json (1-based lines) in `folder`."""
    generator = _generator()
    rng = random.Random(f"{task}-audit")
    spec = generator.TASKS[task](rng)
    seen, rows = set(), []
    while len(rows) < n_train + N_TEST:
        prompt, answer = spec["example"]()
        if prompt not in seen:
            seen.add(prompt)
            rows.append([{"role": "system", "content": spec["system"]}, {"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}])
    train, test = rows[:n_train], rows[n_train:]
    planted = sorted(rng.sample(range(n_train), round(PLANT_SHARE * n_train)))
    wrong = [json.loads(json.dumps(m)) for m in train]
    for i in planted:
        wrong[i][-1]["content"] = _plant(task, wrong[i][-1]["content"], rng)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train_clean", train), ("train_planted", wrong), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in part))
    meta = {"task": task, "planted_lines": [i + 1 for i in planted], "max_new_tokens": spec["max_new_tokens"]}
    (folder / "planted.json").write_text(json.dumps(meta))
    return meta


def train_and_audit(folder: Path, name: str, train_file: Path, budget: str, epochs: str, max_new_tokens: int,
                    audit: bool = True, reuse: bool = False) -> tuple[Path, float]:
    from tunelab.config import load_recipe
    from tunelab.eval.audit import audit_run
    from tunelab.train.run import train

    recipe = load_recipe(None, [f"out_dir={folder}", f"name={name}", f"data.train={train_file}",
                                f"data.test={folder / 'test.jsonl'}", f"train.budget={budget}", f"train.epochs={epochs}",
                                f"eval.max_new_tokens={max_new_tokens}"])
    started = time.perf_counter()
    if not (reuse and (folder / name / "train" / "summary.json").is_file()):
        train(recipe, progress=False)
    if audit:
        audit_run(folder / name, answers=10**6)  # every example answered: every ranking can be scored
    return folder / name, time.perf_counter() - started


def test_quality(run: Path, folder: Path) -> float:
    """The tuned model's primary metric on the test set (the task's own scorer)."""
    from tunelab.engine.generate import DecodingSettings, generate
    from tunelab.eval.arms import to_eval_example
    from tunelab.eval.metrics import detect_output_kind, score_outputs
    from tunelab.runs import load_tuned_model, open_run

    _, recipe = open_run(run)
    test = [to_eval_example(json.loads(line), f"t{i}") for i, line in enumerate((folder / "test.jsonl").open())]
    train_answers = [to_eval_example(json.loads(line), "x").reference
                     for line in (folder / "train_clean.jsonl").open()]
    kind = detect_output_kind([e.reference for e in test], train_answers)
    model, tokenizer = load_tuned_model(run)
    outputs = [g.text for g in generate(model, tokenizer, [list(e.context) for e in test],
                                        DecodingSettings(max_new_tokens=recipe.eval.max_new_tokens), 16)]
    return round(score_outputs(outputs, [e.reference for e in test], kind).means()[kind.primary], 4)


def detection(run: Path, planted_lines: list[int]) -> dict:
    """recall@2P and precision@P of each candidate ranking, and the audit's own claims."""
    from tunelab.eval.audit import ModelAnswer, load_examples, rank, read_audit
    from tunelab.eval.metrics import detect_output_kind
    from tunelab.runs import RunPaths

    rows, summary = read_audit(run)
    planted = set(planted_lines) & {r["line"] for r in rows}  # the valid split took the others
    p = len(planted)
    examples = load_examples(RunPaths(run))
    kind = detect_output_kind([e.answer for e in examples])
    answers = {r["id"]: ModelAnswer(r["model_answer"], r.get("model_confidence"))
               for r in rows if r["model_answer"] is not None}

    def score(lines: list[int]) -> dict:
        return {"recall_at_2p": round(len(planted & set(lines[: 2 * p])) / max(1, p), 3),
                "precision_at_p": round(len(planted & set(lines[:p])) / max(1, p), 3)}

    candidates = {}
    for signal in ("mean_loss", "late_loss", "final_loss", "one_minus_confidence", "cartography"):
        by_dynamics = rank(examples, kind, {}, signal=signal)
        candidates[f"{signal} alone"] = score([r.line for r in by_dynamics])
        combined = rank(examples, kind, answers, signal=signal)
        candidates[f"{signal} + disagreement"] = score([r.line for r in combined])
    by_loss = rank(examples, kind, {})
    order = {r.id: i for i, r in enumerate(by_loss)}
    disagreeing = sorted(rows, key=lambda r: (-(r["disagreement"] or 0.0), order[r["id"]]))
    candidates["disagreement alone (ties by mean_loss)"] = score([r["line"] for r in disagreeing])
    flagged = [r["line"] for r in rows if r["flagged"]]
    return {
        "planted": p, "examples": len(rows), "passes_min": summary["passes_min"], "kind": summary["kind"],
        "shipped": score([r["line"] for r in rows]), "candidates": candidates,
        "flagged": len(flagged), "flagged_planted": len(planted & set(flagged)),
        "model_disagrees_planted": sum(1 for r in rows if r["line"] in planted and (r["disagreement"] or 0) >= 0.5),
        "model_disagrees_clean": sum(1 for r in rows if r["line"] not in planted and (r["disagreement"] or 0) >= 0.5),
        "claims_errors": summary["claims_errors"], "how_to_read": summary["how_to_read"],
    }


def rerank(run: Path) -> None:
    """Rank an audited run again with this code's ranking, from the answers its audit.jsonl holds
    (no model needed): for a ranking changed after the run was audited."""
    from dataclasses import asdict

    from tunelab.eval.audit import ModelAnswer, load_examples, rank, read_audit
    from tunelab.eval.metrics import detect_output_kind
    from tunelab.files import write_text_atomic
    from tunelab.runs import RunPaths

    rows, summary = read_audit(run)
    answers = {r["id"]: ModelAnswer(r["model_answer"], r.get("model_confidence"))
               for r in rows if r["model_answer"] is not None}
    examples = load_examples(RunPaths(run))
    new = rank(examples, detect_output_kind([e.answer for e in examples]), answers)
    write_text_atomic(run / "audit" / "audit.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in new))


# ---------------------------------------------------------------------------------------------- recovery


RECOVERY_VARIANTS = ("planted", "cleaned", "clean")


DETAILS = ["My order number is {d}.", "I am on the {plan} plan.", "It started {when}.", "I have been a customer for {y} years.",
           "My customer id is {d}.", "I use the app on my {device}.", "I already tried {tried}.", "This is urgent for {who}."]


def _with_details(task: str, prompt: str, rng: random.Random) -> str:
    """Routing's messages with one or two context sentences that name no team (order number, plan, when it
    started...), so that a few hundred messages are not near-duplicates of each other: the team still
    follows from the complaint alone."""
    if task != "routing":
        return prompt
    fills = {"d": str(rng.randint(10000, 99999)), "plan": rng.choice(["basic", "family", "pro", "student", "business"]),
             "when": rng.choice(["yesterday", "on Monday", "last week", "two days ago", "after the update", "today"]),
             "y": str(rng.randint(2, 12)), "device": rng.choice(["phone", "tablet", "laptop", "work computer"]),
             "tried": rng.choice(["restarting", "the help page", "calling you", "logging out and in"]),
             "who": rng.choice(["my work", "my family", "my shop", "me"])}
    extra = " ".join(d.format(**fills) for d in rng.sample(DETAILS, rng.choice([1, 2])))
    head, sep, tail = prompt.partition(". ")
    return f"{head}. {extra} {tail}" if sep else f"{prompt} {extra}"


def make_recovery_task(task: str, n_train: int, n_valid: int, n_test: int, folder: Path) -> dict:
    """train_clean.jsonl, train_planted.jsonl (PLANT_SHARE of its answers planted), valid.jsonl and
    test.jsonl (both clean), distinct prompts throughout; recovery.json: the planted 1-based lines."""
    from tunelab.data.quality import near_duplicate_texts

    generator = _generator()
    rng = random.Random(f"{task}-audit-recovery")
    spec = generator.TASKS[task](rng)
    seen, pool = set(), []
    while len(pool) < 4 * (n_train + n_valid + n_test):
        prompt, answer = spec["example"]()
        prompt = _with_details(task, prompt, rng)
        if prompt not in seen:
            seen.add(prompt)
            pool.append([{"role": "system", "content": spec["system"]}, {"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}])
    # no two examples nearly alike (a margin under the data check's 0.8): prepare would drop a training
    # example that leaks into the test set, and the three runs must train on the same examples
    near: dict[int, set[int]] = {}
    for later, earlier, _ in near_duplicate_texts(((i, f"{m[1]['content']} {m[2]['content']}") for i, m in enumerate(pool)),
                                                  threshold=0.7):
        near.setdefault(later, set()).add(earlier)
    kept: set[int] = set()
    rows = []
    for i, messages in enumerate(pool):
        if len(rows) == n_train + n_valid + n_test:
            break
        if not near.get(i, set()) & kept:
            kept.add(i)
            rows.append(messages)
    if len(rows) < n_train + n_valid + n_test:
        raise SystemExit(f"{task}: only {len(rows)} examples unlike each other; ask for fewer")
    train, valid, test = rows[:n_train], rows[n_train:n_train + n_valid], rows[n_train + n_valid:]
    planted = sorted(rng.sample(range(n_train), round(PLANT_SHARE * n_train)))
    wrong = [json.loads(json.dumps(m)) for m in train]
    for i in planted:
        wrong[i][-1]["content"] = _plant(task, wrong[i][-1]["content"], rng)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train_clean", train), ("train_planted", wrong), ("valid", valid), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in part))
    meta = {"task": task, "planted_lines": [i + 1 for i in planted], "max_new_tokens": spec["max_new_tokens"],
            "train": n_train, "valid": n_valid, "test": n_test}
    (folder / "recovery.json").write_text(json.dumps(meta))
    return meta


def run_recovery_variant(folder: Path, variant: str, args: argparse.Namespace, meta: dict) -> dict:
    """One `tunelab run` of the recovery measurement (the cleaned copy written from the planted run's audit)."""
    from tunelab.config import load_recipe
    from tunelab.eval.audit import read_audit, write_clean
    from tunelab.pipeline import run_pipeline

    out = {"variant": variant}
    if variant == "cleaned":
        found = read_audit(folder / "planted")
        if found is None:
            raise SystemExit(f"{folder / 'planted'}: no audit; run --variant planted first")
        rows, summary = found
        if not summary["flagged"]:
            return {**out, "skipped": "the planted run's audit flags nothing: nothing to leave out"}
        _, dropped = write_clean(rows, 0, folder / "train_cleaned.jsonl", drop_flagged=True, run_dir=folder / "planted")
        out.update(dropped=len(dropped), dropped_planted=len(set(dropped) & set(meta["planted_lines"])))
    train_file = folder / {"planted": "train_planted.jsonl", "cleaned": "train_cleaned.jsonl",
                           "clean": "train_clean.jsonl"}[variant]
    overrides = [f"out_dir={folder}", f"name={variant}", f"data.train={train_file}", f"data.valid={folder / 'valid.jsonl'}",
                 f"data.test={folder / 'test.jsonl'}", f"train.epochs={args.epochs}", f"train.budget={args.budget}",
                 f"eval.max_new_tokens={meta['max_new_tokens']}", "eval.arms=[tuned]", "eval.forgetting=false",
                 *([f"model.name={args.model}"] if args.model else [])]
    recipe = load_recipe(None, overrides)
    if (folder / variant).exists():
        import shutil

        shutil.rmtree(folder / variant)  # this script's own run folder: measured again from scratch
    started = time.perf_counter()
    run_pipeline(recipe)
    plan = json.loads((folder / variant / "train" / "plan.json").read_text())
    stages = json.loads((folder / variant / "stages.json").read_text())
    out.update(seconds=round(time.perf_counter() - started, 1), steps=plan["steps"], epochs=plan["epochs"],
               stage_seconds={k: round(v.get("seconds", 0.0), 1) if isinstance(v, dict) else v for k, v in stages.items()},
               command=" ".join(["python", *sys.argv]), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if variant == "planted":
        out["audit"] = detection(folder / "planted", meta["planted_lines"])
    metrics = json.loads((folder / variant / "eval" / "metrics.json").read_text())
    out["test_quality"] = round(metrics["arms"]["tuned"]["primary"], 4)
    if metrics.get("cleaned"):
        out["cleaned_section"] = {k: metrics["cleaned"].get(k) for k in ("text", "helped", "note", "test")}
    return out


def recovery_summary(folder: Path, seed: int = 0) -> dict:
    """Paired differences between the runs that exist, and the share of the loss recovered."""
    import numpy as np

    from tunelab.eval.paired import arm_scores, compare_paired

    scores = {v: arm_scores(folder / v / "eval", "tuned") for v in RECOVERY_VARIANTS
              if (folder / v / "eval" / "predictions.jsonl").is_file()}
    out: dict = {"test_quality": {v: round(sum(s.values()) / len(s), 4) for v, s in scores.items()}}
    for a, b in (("cleaned", "planted"), ("clean", "planted"), ("clean", "cleaned")):
        if a in scores and b in scores:
            out[f"{a}_vs_{b}"] = compare_paired(f"{b} -> {a}", scores[a], scores[b], seed=seed).model_dump(mode="json")
    if len(scores) == 3:
        ids = sorted(scores["planted"])
        table = np.array([[scores[v][i] for i in ids] for v in ("planted", "cleaned", "clean")])
        rng = np.random.default_rng(seed)
        shares = []
        for _ in range(2000):
            means = table[:, rng.integers(0, len(ids), len(ids))].mean(axis=1)
            lost = means[2] - means[0]
            if lost > 0:
                shares.append((means[1] - means[0]) / lost)
        means = table.mean(axis=1)
        lost = means[2] - means[0]
        out["lost_points"] = round(100 * lost, 2)
        out["regained_points"] = round(100 * (means[1] - means[0]), 2)
        out["share_recovered"] = round((means[1] - means[0]) / lost, 3) if lost > 0 else None
        out["share_recovered_ci95"] = ([round(float(np.percentile(shares, q)), 3) for q in (2.5, 97.5)]
                                       if len(shares) >= 1000 else None)
        out["share_ci_note"] = (f"paired bootstrap over the {len(ids)} test examples (training-run noise not included: "
                                "one run each); resamples where nothing was lost are left out")
    return out


def folds_measurement(folder: Path, k: int, planted_lines: list[int]) -> dict:
    """The planted run audited out of fold (`--folds k`) against its own-model audit: the same
    detection numbers. The run's own audit/ is put back afterwards (the cleaned copy is written from it)."""
    import shutil

    from tunelab.eval.folds import audit_with_folds

    run = folder / "planted"
    saved = folder / "planted-audit-own-model"
    if saved.exists():
        shutil.rmtree(saved)
    shutil.copytree(run / "audit", saved, ignore=shutil.ignore_patterns("folds"))
    started = time.perf_counter()
    try:
        rows, summary, trained = audit_with_folds(run, k)
    finally:
        for name in ("audit.jsonl", "summary.json"):
            shutil.copy2(saved / name, run / "audit" / name)
    rows = [r.__dict__ for r in rows]
    planted = set(planted_lines) & {r["line"] for r in rows}
    p = len(planted)
    lines = [r["line"] for r in rows]
    flagged = {r["line"] for r in rows if r["flagged"]}
    own = detection(run, planted_lines)
    return {"folds": k, "seconds": round(time.perf_counter() - started, 1), "steps": trained.steps,
            "train_time_s": trained.train_time_s, "planted": p,
            "out_of_fold": {"recall_at_2p": round(len(planted & set(lines[: 2 * p])) / max(1, p), 3),
                            "precision_at_p": round(len(planted & set(lines[:p])) / max(1, p), 3),
                            "flagged": len(flagged), "flagged_planted": len(planted & flagged)},
            "own_model": {**own["shipped"], "flagged": own["flagged"], "flagged_planted": own["flagged_planted"]}}


def recovery(args: argparse.Namespace) -> None:
    folder = args.out / f"{args.task}-recovery"
    meta = json.loads((folder / "recovery.json").read_text()) if (folder / "recovery.json").is_file() else \
        make_recovery_task(args.task, args.train, args.valid, args.test, folder)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"results": []}
    section = previous.setdefault("recovery_v2", {}).setdefault(args.task, {"runs": {}})
    section.pop("status", None)  # "not run" until a run of this script
    section["design"] = {k: meta[k] for k in ("train", "valid", "test")} | {
        "planted": len(meta["planted_lines"]), "epochs": args.epochs, "budget": args.budget,
        "model": args.model or "smollm2-135m-instruct (default)",
        "command": f"python bench/audit_planted.py --task {args.task} --recovery"}
    if args.folds:  # after --variant planted (and cleaned, which reads the planted run's own audit)
        section["folds"] = folds_measurement(folder, args.folds, meta["planted_lines"])
        section["folds"]["command"] = f"python bench/audit_planted.py --task {args.task} --recovery --folds {args.folds}"
        RESULTS.write_text(json.dumps(previous, indent=1) + "\n")
        print(json.dumps(section["folds"], indent=1))
        return
    for variant in ([args.variant] if args.variant else RECOVERY_VARIANTS):
        result = run_recovery_variant(folder, variant, args, meta)
        section["runs"][variant] = result
        section["summary"] = recovery_summary(folder)
        RESULTS.write_text(json.dumps(previous, indent=1) + "\n")
        print(json.dumps(result, indent=1), flush=True)
    print(json.dumps(section["summary"], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["routing", "orders"], required=True)
    parser.add_argument("--variant", choices=["planted", "clean", "cleaned"])
    parser.add_argument("--recovery", action="store_true", help="the recovery measurement (module docstring)")
    parser.add_argument("--train", type=int, default=None, help="training examples (200; --recovery: 80)")
    parser.add_argument("--valid", type=int, default=20, help="--recovery: clean validation examples")
    parser.add_argument("--test", type=int, default=300, help="--recovery: test examples")
    parser.add_argument("--folds", type=int, default=0, help="--recovery: audit the planted run out of fold (K trainings)")
    parser.add_argument("--model", default=None, help="model.name (default: the recipe's default model)")
    parser.add_argument("--budget", default=None, help="train.budget: an upper bound on a loaded machine (20m; "
                        "--recovery: 15m)")
    parser.add_argument("--epochs", default="3", help="train.epochs: the audit needs every example seen twice")
    parser.add_argument("--out", type=Path, default=Path("/tmp/audit-bench"))
    parser.add_argument("--no-test", action="store_true", help="skip scoring the test set")
    parser.add_argument("--reuse", action="store_true", help="a run that finished training: audit and score it only")
    parser.add_argument("--rerank", action="store_true", help="an audited run: rank it again, score the detection only")
    args = parser.parse_args()
    if args.recovery:
        args.train, args.budget = args.train or 80, args.budget or "15m"
        recovery(args)
        return
    if args.variant is None:
        parser.error("--variant is required (or --recovery)")
    args.train, args.budget = args.train or 200, args.budget or "20m"

    folder = args.out / args.task
    meta = json.loads((folder / "planted.json").read_text()) if (folder / "planted.json").is_file() else \
        make_task(args.task, args.train, folder)
    if args.rerank:
        rerank(folder / args.variant)
        found = detection(folder / args.variant, meta["planted_lines"] if args.variant == "planted" else [])
        previous = json.loads(RESULTS.read_text())
        for r in previous["results"]:
            if (r["task"], r["variant"]) == (args.task, args.variant):
                r["audit"] = found
        RESULTS.write_text(json.dumps(previous, indent=1) + "\n")
        print(json.dumps(found, indent=1))
        return
    train_file = folder / ("train_clean.jsonl" if args.variant == "clean" else "train_planted.jsonl")
    dropped = None
    if args.variant == "cleaned":
        from tunelab.eval.audit import read_audit, write_clean

        rows, _ = read_audit(folder / "planted")
        in_train = set(meta["planted_lines"]) & {r["line"] for r in rows}
        _, dropped = write_clean(rows, len(in_train), folder / "train_cleaned.jsonl")
        train_file = folder / "train_cleaned.jsonl"
    run, seconds = train_and_audit(folder, args.variant, train_file, args.budget, args.epochs, meta["max_new_tokens"],
                                   audit=args.variant != "cleaned", reuse=args.reuse)
    plan = json.loads((run / "train" / "plan.json").read_text())
    result = {"task": args.task, "variant": args.variant, "train_examples": args.train, "budget": args.budget,
              "epochs_asked": args.epochs,
              "train_and_audit_s": round(seconds, 1), "steps": plan["steps"], "epochs": plan["epochs"],
              "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(["python", *sys.argv])}
    if args.variant == "clean":
        result["audit"] = detection(run, [])
    elif args.variant == "planted":
        result["audit"] = detection(run, meta["planted_lines"])
    else:
        result["dropped_planted"] = len(set(dropped) & set(meta["planted_lines"]))
        result["dropped"] = len(dropped)
    if not args.no_test:
        result["test_quality"] = test_quality(run, folder)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"results": []}
    previous["results"] = [r for r in previous["results"] if (r["task"], r["variant"]) != (args.task, args.variant)]
    previous["results"].append(result)
    runs = {r["variant"]: r for r in previous["results"] if r["task"] == args.task}
    if all(v in runs and "test_quality" in runs[v] for v in ("planted", "clean", "cleaned")):
        lost = runs["clean"]["test_quality"] - runs["planted"]["test_quality"]
        regained = runs["cleaned"]["test_quality"] - runs["planted"]["test_quality"]
        previous.setdefault("recovery", {})[args.task] = {
            "lost": round(lost, 4), "regained": round(regained, 4),
            "share_recovered": round(regained / lost, 3) if lost > 0 else None}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(previous, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
