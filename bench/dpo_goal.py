"""DPO's quality goal at a larger n: a dpo run's tuned model beside its supervised parent on the test file.

    python bench/dpo_goal.py --dpo runs/house_voice_dpo --parent runs/house_voice_sft \
        --test examples/house_voice/data/test.jsonl --limit 120 --parts quality,preference
    python bench/dpo_goal.py ... --parts forgetting          # another call, merged into the same results file

Parts (each merges its numbers into bench/results/dpo_goal.json, or --out, so a long measurement
can be split over several calls):
  quality      the parent (`sft`) and the dpo run (`tuned`) answer the first --limit test prompts with
               the evaluation's greedy decoding (eval.max_new_tokens of the dpo recipe), each with its
               adapter merged into the base weights (as the evaluation serves them); the grader
               --grader of --graders scores both; the paired comparison (eval/metrics.py
               paired_comparison, the test the verdict and `preference.vs_sft` use): tuned - sft; and
               each arm's answers that repeat a line or loop (eval/repetition.py, as arms.<arm>.repetition)
               with the evaluation's "clearly more" test of tuned against sft. --answers FILE keeps every
               answer (jsonl: line, arm, text, score, repeats).
  preference   the held-out pairs of the dpo run (data/test.jsonl pairs, else data/valid.jsonl):
               DPO's measure, the share whose tuned-vs-parent log-ratio favours the preferred answer
               (`preference.reward_accuracy`), and the per-token preference accuracy of both.
  forgetting_vs_base   the issue's measure: base, parent and tuned on the general probes and text; each
               tuned model's forgetting against the base, and the dpo run's retention of the base's known
               probes minus the parent's, paired over those probes (not worse: >= -threshold, and a
               perplexity change at most threshold above the parent's); 3 x 2-3 min.
  forgetting   the general probes and text (eval/forgetting.py) on the parent and the tuned model,
               compared with the parent as the baseline (what the tuned model lost of what the parent
               knew): flagged beyond --threshold (eval.forgetting_threshold's default, 0.05).
The goal (issue 26): tuned above sft with p < 0.05, reward accuracy >= 0.9, forgetting not flagged,
and (since dpo.sft_weight) the tuned answers repeating no more often than the parent's.
How long (SmolLM2-135M, 2 CPU cores, from this morning's eval speeds: ~30 tokens/s per arm at batch
16 under a load of 8-12, ~64 at batch 64 on a quiet machine): quality at --limit 120 generates up
to 2 x 120 x 72 tokens, 5-10 min, preference 1-2 min; forgetting 2 x (164 probes x 32 tokens + the
general text), 3-6 min. A run folder moved from elsewhere must have its recipe.yaml's paths
(eval.graders_file, data.*) pointing at files that exist: open_run checks the graders file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve().parents[1]


def _models(dpo_run: Path, parent_run: Path) -> dict[str, Any]:
    """{"sft": parent merged, "tuned": dpo merged, "peft": the dpo PeftModel with the parent as adapter "sft"}
    loaded lazily by name."""
    from tunelab.eval.preference import PARENT_ADAPTER
    from tunelab.runs import RunPaths, load_run_model, open_run

    paths, recipe = open_run(dpo_run)
    parent = RunPaths(parent_run).adapter if (RunPaths(parent_run).adapter / "adapter_config.json").is_file() else parent_run

    def load(which: str) -> tuple[Any, Any]:
        model, tokenizer = load_run_model(paths, recipe)
        if which in ("sft", "peft"):
            model.load_adapter(str(parent), adapter_name=PARENT_ADAPTER)
        if which == "sft":
            model.set_adapter(PARENT_ADAPTER)
            model = model.merge_and_unload(adapter_names=[PARENT_ADAPTER])
        elif which == "tuned":
            model = model.merge_and_unload()
        elif which == "base":
            model = model.unload()  # the weights without any adapter
        model.eval()
        return model, tokenizer

    return {"load": load, "recipe": recipe, "paths": paths, "parent": parent}


def quality(ctx: dict[str, Any], test: Path, limit: int, graders_file: Path, grader: str, batch_size: int,
            answers: Path | None = None) -> dict[str, Any]:
    from tunelab.engine.generate import DecodingSettings, generate
    from tunelab.eval.graders.grade import Grading
    from tunelab.eval.metrics import paired_comparison
    from tunelab.eval.repetition import arm_repetition, repeats, repeats_clearly_more
    from tunelab.specs.graders import read_graders_file

    records = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    prompts = [r["messages"][:-1] for r in records]
    items = [{**{k: v for k, v in r.items() if k != "messages"}, "reference": r["messages"][-1]["content"]} for r in records]
    settings = DecodingSettings(max_new_tokens=ctx["recipe"].eval.max_new_tokens, seed=ctx["recipe"].eval.seed)
    graders = [g for g in read_graders_file(graders_file) if g.name == grader]
    out: dict[str, Any] = {"n": len(records), "grader": grader, "max_new_tokens": settings.max_new_tokens, "arms": {}}
    scores: dict[str, list[float]] = {}
    texts: dict[str, list[str]] = {}
    for arm in ("sft", "tuned"):
        model, tokenizer = ctx["load"](arm)
        started = time.perf_counter()
        gens = generate(model, tokenizer, prompts, settings, batch_size)
        wall = time.perf_counter() - started
        del model
        texts[arm] = [g.text for g in gens]
        with Grading(graders) as grading:
            scores[arm] = grading.grade(texts[arm], items)[grader].scores
        valid = [s for s in scores[arm] if s is not None]
        out["arms"][arm] = {"mean": sum(valid) / len(valid), "passed": sum(1 for s in valid if s >= 1.0),
                            "generate_s": round(wall, 1),
                            "completion_tokens": sum(g.completion_tokens for g in gens),
                            "repetition": arm_repetition(texts[arm])}
        print(f"quality: {arm} {out['arms'][arm]}", flush=True)
    kept = [i for i in range(len(records)) if scores["tuned"][i] is not None and scores["sft"][i] is not None]
    comparison = paired_comparison([scores["tuned"][i] for i in kept], [scores["sft"][i] for i in kept],
                                   seed=ctx["recipe"].eval.seed)
    out["tuned_vs_sft"] = {"delta": comparison.delta, "ci95": list(comparison.ci95), "p_value": comparison.p_value,
                           "significant": comparison.significant, "n": len(kept),
                           "wins": sum(scores["tuned"][i] > scores["sft"][i] for i in kept),
                           "losses": sum(scores["tuned"][i] < scores["sft"][i] for i in kept)}
    flags = {arm: [repeats(t) for t in texts[arm]] for arm in texts}
    clearly, share_t, share_s, p = repeats_clearly_more(flags["tuned"], flags["sft"])
    out["repetition_tuned_vs_sft"] = {"tuned": share_t, "sft": share_s, "p_value": p, "clearly_more": clearly,
                                      "only_tuned": sum(a and not b for a, b in zip(flags["tuned"], flags["sft"], strict=True)),
                                      "only_sft": sum(b and not a for a, b in zip(flags["tuned"], flags["sft"], strict=True))}
    if answers is not None:
        answers.parent.mkdir(parents=True, exist_ok=True)
        answers.write_text("".join(json.dumps({"line": i + 1, "arm": arm, "text": texts[arm][i], "score": scores[arm][i],
                                               "repeats": flags[arm][i]}, ensure_ascii=False) + "\n"
                                   for arm in texts for i in range(len(records))), encoding="utf-8")
    out["examples"] = [{"line": i + 1, "sft": texts["sft"][i], "tuned": texts["tuned"][i],
                        "sft_score": scores["sft"][i], "tuned_score": scores["tuned"][i]} for i in range(min(3, len(records)))]
    return out


def preference(ctx: dict[str, Any]) -> dict[str, Any]:
    from tunelab.eval.preference import _parent_on, held_out_pairs, sequence_logps

    split, pairs = held_out_pairs(ctx["paths"].data)
    model, tokenizer = ctx["load"]("peft")
    with _parent_on(model, ctx["parent"]):
        sft_sums = sequence_logps(model, tokenizer, pairs, per_token=False)
        sft_mean = sequence_logps(model, tokenizer, pairs)
    model.set_adapter("default")
    model.eval()
    tuned_sums = sequence_logps(model, tokenizer, pairs, per_token=False)
    tuned_mean = sequence_logps(model, tokenizer, pairs)
    reward = [(tc - sc) - (tr - sr) for (tc, tr), (sc, sr) in zip(tuned_sums, sft_sums, strict=True)]
    return {"n": len(pairs), "split": split, "reward_accuracy": sum(r > 0 for r in reward) / len(pairs),
            "reward_margin_mean": ctx["recipe"].dpo.beta * sum(reward) / len(pairs),
            "per_token_accuracy": {"sft": sum(c > r for c, r in sft_mean) / len(pairs),
                                   "tuned": sum(c > r for c, r in tuned_mean) / len(pairs)}}


def forgetting(ctx: dict[str, Any], threshold: float, batch_size: int) -> dict[str, Any]:
    from tunelab.eval.forgetting import compare_general_ability, measure_general_ability

    abilities = {}
    for arm in ("sft", "tuned"):
        model, tokenizer = ctx["load"](arm)
        started = time.perf_counter()
        abilities[arm] = measure_general_ability(model, tokenizer, seed=ctx["recipe"].eval.seed, batch_size=batch_size,
                                                 stability=arm == "sft")  # the baseline: known in every framing
        print(f"forgetting: {arm} measured in {time.perf_counter() - started:.0f} s", flush=True)
        del model
    compared = compare_general_ability(abilities["sft"], abilities["tuned"], threshold, seed=ctx["recipe"].eval.seed)
    return {"baseline": "sft", "threshold": threshold, "flagged": compared["flagged"], "text": compared["text"],
            "retention": {k: compared["retention"][k]
                          for k in ("value", "ci95", "n", "flagged", "gained", "definition", "plain")},
            "probes": {k: compared["probes"][k] for k in ("n", "base_accuracy", "tuned_accuracy", "delta", "p_value")},
            "perplexity": {k: compared["perplexity"][k] for k in ("base", "tuned", "relative_change", "ci95", "flagged")}}


def forgetting_vs_base(ctx: dict[str, Any], threshold: float, batch_size: int) -> dict[str, Any]:
    """The issue's own measure: each tuned model's forgetting against the base model, the dpo run's beside
    its parent's; the dpo run is not worse when its retention of the base's known probes is at most
    `threshold` (absolute) under the parent's, paired over those probes, and its perplexity change is at
    most `threshold` above the parent's."""
    from tunelab.eval.forgetting import compare_general_ability, measure_general_ability
    from tunelab.eval.metrics import paired_comparison

    abilities = {}
    for arm in ("base", "sft", "tuned"):
        model, tokenizer = ctx["load"](arm)
        started = time.perf_counter()
        abilities[arm] = measure_general_ability(model, tokenizer, seed=ctx["recipe"].eval.seed, batch_size=batch_size,
                                                 stability=arm == "base")  # the baseline: known in every framing
        print(f"forgetting_vs_base: {arm} measured in {time.perf_counter() - started:.0f} s", flush=True)
        del model
    seed = ctx["recipe"].eval.seed
    out: dict[str, Any] = {"baseline": "base", "threshold": threshold, "arms": {}}
    for arm in ("sft", "tuned"):
        compared = compare_general_ability(abilities["base"], abilities[arm], threshold, seed=seed)
        out["arms"][arm] = {"flagged": compared["flagged"], "text": compared["text"],
                            "retention": {k: compared["retention"][k]
                                          for k in ("value", "ci95", "n", "gained", "definition", "plain")},
                            "probe_accuracy": compared["probes"]["tuned_accuracy"],
                            "perplexity_change": compared["perplexity"]["relative_change"]}
    known = [i for i, score in enumerate(abilities["base"].known_for_retention) if score >= 1.0]
    kept = {arm: [abilities[arm].probe_scores[i] for i in known] for arm in ("sft", "tuned")}
    diff = paired_comparison(kept["tuned"], kept["sft"], seed=seed)
    out["base_probe_accuracy"] = float(sum(abilities["base"].probe_scores) / len(abilities["base"].probe_scores))
    out["tuned_minus_sft_retention"] = {"delta": diff.delta, "ci95": list(diff.ci95), "p_value": diff.p_value,
                                        "n": len(known)}
    out["not_worse_than_parent"] = bool(
        diff.delta >= -threshold
        and out["arms"]["tuned"]["perplexity_change"] <= out["arms"]["sft"]["perplexity_change"] + threshold)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dpo", type=Path, required=True, help="the dpo run folder")
    parser.add_argument("--parent", type=Path, required=True, help="its supervised parent (a run folder or an adapter folder)")
    parser.add_argument("--test", type=Path, default=HERE / "examples/house_voice/data/test.jsonl")
    parser.add_argument("--limit", type=int, default=120)
    parser.add_argument("--graders", type=Path, default=HERE / "examples/house_voice/graders.yaml")
    parser.add_argument("--grader", default="house_voice")
    parser.add_argument("--parts", default="quality,preference,forgetting")
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "dpo_goal.json")
    parser.add_argument("--answers", type=Path, default=None, help="quality: write every answer here (jsonl)")
    parser.add_argument("--command", default=None, help="the command line to record (default: this one)")
    args = parser.parse_args()

    import sys

    import torch

    ctx = _models(args.dpo, args.parent)
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update({"benchmark": "dpo_goal", "dpo_run": str(args.dpo), "parent": str(args.parent),
                   "model": ctx["recipe"].model.name, "device": "cpu", "torch_threads": torch.get_num_threads(),
                   "cpu_count": os.cpu_count(), "machine": platform.machine()})
    commands = result.setdefault("commands", {})
    for part in args.parts.split(","):
        started = time.perf_counter()
        if part == "quality":
            value = quality(ctx, args.test, args.limit, args.graders, args.grader, args.batch_size, args.answers)
            value["test"] = str(args.test)
        elif part == "preference":
            value = preference(ctx)
        elif part == "forgetting":
            value = forgetting(ctx, args.threshold, args.batch_size)
        elif part == "forgetting_vs_base":
            value = forgetting_vs_base(ctx, args.threshold, args.batch_size)
        else:
            raise SystemExit(f"unknown part {part!r}: quality, preference, forgetting or forgetting_vs_base")
        value["wall_s"] = round(time.perf_counter() - started, 1)
        value["load_average_1min_at_end"] = os.getloadavg()[0]
        result[part] = value
        commands[part] = args.command or "python " + " ".join(sys.argv)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")  # after each part: nothing lost
        print(json.dumps({part: {k: v for k, v in value.items() if k != "examples"}}, indent=1), flush=True)
    goal = {}
    if "quality" in result:
        goal["tuned_above_sft_p_lt_0.05"] = result["quality"]["tuned_vs_sft"]["delta"] > 0 and result["quality"]["tuned_vs_sft"]["p_value"] < 0.05
        goal["test_lines"] = result["quality"]["n"]
        repetition = result["quality"].get("repetition_tuned_vs_sft")
        if repetition:
            goal["repetition_tuned_le_sft"] = repetition["tuned"] <= repetition["sft"]
    if "preference" in result:
        goal["reward_accuracy_ge_0.9"] = result["preference"]["reward_accuracy"] >= 0.9
    if "forgetting" in result:
        goal["forgetting_vs_parent_not_flagged"] = not result["forgetting"]["flagged"]
    if "forgetting_vs_base" in result:
        goal["forgetting_vs_base_not_worse_than_parent"] = result["forgetting_vs_base"]["not_worse_than_parent"]
    result["goal"] = goal
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({"goal": goal}, indent=1))


if __name__ == "__main__":
    main()
