"""Batched generation vs a one-prompt-at-a-time loop, same prompts, same greedy settings, same process.

    .venv/bin/python bench/generate_speed.py [--model smollm2-135m-instruct] [--prompts 64] [--max-new-tokens 32]

Writes bench/results/generate_speed.json and prints the throughput ratio (goal: >= 5x). Both sides go
through tunelab.eval.generate.generate; the baseline passes batch_size=1, which is exactly a loop
of `model.generate` calls on one prompt each. Completion tokens per second count real tokens only.
Also reports how many batched outputs equal the one-at-a-time outputs (left padding changes float
rounding, so greedy ties may rarely break differently).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = ["my order", "the invoice", "a refund", "the password reset", "the delivery", "the app", "my account"]
ASKS = [
    "Summarise this customer message in one sentence: {t} has been a problem since {d}.",
    "Write a short, polite reply to a customer asking about {t}.",
    "List two reasons why {t} could be delayed.",
    "Classify the urgency (low, medium, high) of: '{t} failed again on {d}, please fix it now!'",
    "Explain in simple words what a customer should do about {t}.",
]
DAYS = ["Monday", "Tuesday", "last week", "March 3", "yesterday"]


def make_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = rng.choice(ASKS).format(t=rng.choice(TOPICS), d=rng.choice(DAYS))
        prompts.append([{"role": "user", "content": text}])
    return prompts


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is faster on a CPU shared with other jobs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_speed.json"))
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tunelab.eval.generate import DecodingSettings, generate
    from tunelab.models import load_model, load_tokenizer

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    prompts = make_prompts(args.prompts)
    settings = DecodingSettings(max_new_tokens=args.max_new_tokens)
    generate(model, tokenizer, prompts[:2], settings, batch_size=2)  # warm-up: first-call allocations

    single, single_s = timed(lambda: generate(model, tokenizer, prompts, settings, batch_size=1))
    single_tokens = sum(g.completion_tokens for g in single)
    rows = [{"mode": "one prompt at a time", "batch_size": 1, "wall_s": single_s,
             "completion_tokens": single_tokens, "tokens_per_s": single_tokens / single_s}]
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        batched, batched_s = timed(lambda b=batch_size: generate(model, tokenizer, prompts, settings, batch_size=b))
        tokens = sum(g.completion_tokens for g in batched)
        rows.append({
            "mode": "batched", "batch_size": batch_size, "wall_s": batched_s, "completion_tokens": tokens,
            "tokens_per_s": tokens / batched_s, "speedup_wall": single_s / batched_s,
            "speedup_tokens_per_s": (tokens / batched_s) / (single_tokens / single_s),
            "same_output_as_single": sum(a.text == b.text for a, b in zip(single, batched, strict=True)) / len(single),
        })

    result = {
        "benchmark": "generate_speed", "model": args.model, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "decoding": "greedy, stop at end-of-turn",
        "device": str(next(model.parameters()).device), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
        "prompt_tokens_mean": sum(g.prompt_tokens for g in single) / len(single),
        "rows": rows,
        "command": "python bench/generate_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        extra = f"  {row['speedup_wall']:.1f}x wall, same output {row['same_output_as_single']:.0%}" if "speedup_wall" in row else ""
        print(f"{row['mode']:<22} batch {row['batch_size']:>3}: {row['wall_s']:7.1f} s  "
              f"{row['tokens_per_s']:7.1f} completion tokens/s{extra}")
    best = max(r.get("speedup_wall", 0) for r in rows)
    print(f"batched vs one at a time: {best:.1f}x (goal >= 5x); wrote {args.out}")


if __name__ == "__main__":
    main()
