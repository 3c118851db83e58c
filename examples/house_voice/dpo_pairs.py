"""Preference pairs from a supervised run's own slips: the house voice reference vs what the run wrote.

    tunelab run examples/house_voice/recipe.yaml name=house_voice_sft            # 1. supervised first
    python examples/house_voice/dpo_pairs.py runs/house_voice_sft                # 2. its slips -> pairs
    tunelab run examples/house_voice/dpo.yaml                                    # 3. DPO from that run

Reads the run's tuned model (runs.load_tuned_model) and the example's train and valid files;
generates the run's answer to each prompt with the evaluation's greedy decoding, grades it with
graders.yaml's house_voice grader, and writes, for every answer that breaks a rule, one pair in TRL's
shape: {"prompt": [system, user], "chosen": the reference reply, "rejected": the run's reply, and the
record's other keys (the grader's item fields)}. Writes data/pairs_train.jsonl and
data/pairs_valid.jsonl next to this file (or --out-dir); never touches the input files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the supervised run folder (runs/NAME)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "data")
    parser.add_argument("--limit", type=int, default=None, help="prompts per split (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from tunelab.engine.generate import DecodingSettings, generate
    from tunelab.eval.graders.grade import Grading
    from tunelab.runs import load_tuned_model
    from tunelab.specs.graders import read_graders_file

    model, tokenizer = load_tuned_model(args.run)
    graders = [g for g in read_graders_file(HERE / "graders.yaml") if g.name == "house_voice"]
    settings = DecodingSettings(max_new_tokens=args.max_new_tokens)
    for split in ("train", "valid"):
        records = [json.loads(line) for line in (HERE / "data" / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        records = records[: args.limit] if args.limit else records
        prompts = [r["messages"][:-1] for r in records]
        outputs = [g.text for g in generate(model, tokenizer, prompts, settings, args.batch_size)]
        items = [{k: v for k, v in r.items() if k != "messages"} for r in records]
        with Grading(graders) as grading:
            scores = grading.grade(outputs, items)["house_voice"].scores
        pairs = [
            {"prompt": r["messages"][:-1], "chosen": r["messages"][-1]["content"], "rejected": output,
             **{k: v for k, v in r.items() if k != "messages"}}
            for r, output, score in zip(records, outputs, scores, strict=True)
            if score is not None and score < 1.0 and output.strip() and output.strip() != r["messages"][-1]["content"].strip()
        ]  # an empty answer is a slip too, but not an answer to prefer against: left out (counted below)
        path = args.out_dir / f"pairs_{split}.jsonl"
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        passed = sum(1 for s in scores if s == 1.0)
        mean = sum(s for s in scores if s is not None) / max(1, len(scores))
        empty = sum(1 for output in outputs if not output.strip())
        print(f"{split}: {len(records)} prompts, the run followed every rule on {passed} (house_voice mean "
              f"{mean:.3f}), answered nothing on {empty}; {len(pairs)} pairs -> {path}")


if __name__ == "__main__":
    main()
