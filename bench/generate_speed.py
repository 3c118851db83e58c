"""Evaluation-time generation: tunelab's decoding loop vs transformers' `generate`, same prompts, same process.

    .venv/bin/python bench/generate_speed.py                       # the demo's five arms (examples/triage)
    .venv/bin/python bench/generate_speed.py --limit 32 --threads 1
    .venv/bin/python bench/generate_speed.py --mode batching       # batched vs one prompt at a time

`--mode demo` (default) builds the prompts `tunelab eval` builds for examples/triage (recipe, train and
test split, the same PromptBuilder: base, prompt with its ~550-token instructions and shots, rag,
tuned, tuned+rag; the tuned arms' prompts run on the base model, as no adapter is trained here) and
generates them with the recipe's decoding settings and batch size three ways, interleaved arm by arm:

  hf        the previous path: left-padded batches through transformers `model.generate`;
  loop      tunelab.engine.generate.generate(reuse_prefix=False): the shared decoding loop with the
            KV cache allocated once per batch;
  prefix    generate() as `tunelab eval` calls it: the prompts' shared prefix prefilled once per arm.

It reports per arm and in total the wall time (for `prefix`, including the one prefill of the
shared prefix), the speed-up over `hf`, and how many outputs are identical to `hf`'s (greedy; a
different but equivalent computation can only differ where two tokens' logits tie within float
rounding). `--mode batching` is the earlier benchmark: batch sizes against one prompt at a time.
Writes bench/results/generate_speed.json (or --out).
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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads lose 10x on shared cores

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parent.parent / "examples" / "triage"
TOPICS = ["my order", "the invoice", "a refund", "the password reset", "the delivery", "the app", "my account"]
ASKS = [
    "Summarise this customer message in one sentence: {t} has been a problem since {d}.",
    "Write a short, polite reply to a customer asking about {t}.",
    "List two reasons why {t} could be delayed.",
    "Classify the urgency (low, medium, high) of: '{t} failed again on {d}, please fix it now!'",
    "Explain in simple words what a customer should do about {t}.",
]
DAYS = ["Monday", "Tuesday", "last week", "March 3", "yesterday"]
DEMO_OPTIONS = ("mode", "model", "limit", "batch_size", "sides", "prefix_batch_size", "threads")
BATCHING_OPTIONS = ("mode", "model", "prompts", "max_new_tokens", "batch_sizes", "threads")


def make_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = rng.choice(ASKS).format(t=rng.choice(TOPICS), d=rng.choice(DAYS))
        prompts.append([{"role": "user", "content": text}])
    return prompts


def demo_prompts(limit: int | None) -> tuple[dict[str, list[list[dict[str, str]]]], object]:
    """The demo's prompts per arm, built as tunelab eval builds them (eval/run.py), and its recipe."""
    from tunelab.config import load_recipe
    from tunelab.eval.arms import PromptBuilder, build_pool, derive_instructions, task_system_prompt
    from tunelab.eval.metrics import detect_output_kind
    from tunelab.eval.run import read_examples

    recipe = load_recipe(DEMO / "recipe.yaml")
    cfg = recipe.eval
    all_test = read_examples(DEMO / "data" / "test.jsonl")
    test = all_test[: limit or cfg.limit]
    train = read_examples(DEMO / "data" / "train.jsonl")
    kind = detect_output_kind([ex.reference for ex in test], [ex.reference for ex in train])
    builder = PromptBuilder(build_pool(train, all_test), cfg.instructions or derive_instructions(train, kind),
                            cfg.shots, cfg.rag_k, cfg.seed, task_system=task_system_prompt(train))
    return {arm: [builder.build(arm, ex) for ex in test] for arm in cfg.arms}, recipe


def hf_generate(model, tokenizer, conversations, settings, batch_size: int) -> list[str]:
    """The previous evaluation path: prompts sorted by length, left-padded batches, `model.generate`
    (greedy, KV cache, stop at end-of-turn). Returns the texts in input order."""
    import torch

    from tunelab.engine.generate import render_prompt
    from tunelab.models import end_of_turn_ids

    prompts = [render_prompt(tokenizer, conv) for conv in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_ids = end_of_turn_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    texts = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(batch):
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention_mask[row, width - len(prompts[i]) :] = 1
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                    max_new_tokens=settings.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                                    use_cache=True, do_sample=False, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(batch):
            tokens = output[row, width:].tolist()
            stop = next((p for p, t in enumerate(tokens) if t in stop_ids), len(tokens))
            texts[i] = tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()
    return texts


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def run_demo(args: argparse.Namespace, model, tokenizer) -> dict:
    from tunelab.engine.generate import DecodingSettings, generate, prefill_shared_prefix, render_prompt

    prompts, recipe = demo_prompts(args.limit)
    settings = DecodingSettings(max_new_tokens=recipe.eval.max_new_tokens, seed=recipe.eval.seed)
    batch_size = args.batch_size or recipe.eval.batch_size
    generate(model, tokenizer, prompts["prompt"][:2], settings, batch_size=2)  # warm-up: first-call allocations
    sides = {
        "hf": lambda convs: hf_generate(model, tokenizer, convs, settings, batch_size),
        "loop": lambda convs: [g.text for g in generate(model, tokenizer, convs, settings, batch_size, reuse_prefix=False)],
        "prefix": lambda convs: [g.text for g in generate(model, tokenizer, convs, settings,
                                                          args.prefix_batch_size or batch_size)],
    }
    sides = {name: run for name, run in sides.items() if name in args.sides.split(",") or name in ("hf", "prefix")}
    arms: dict[str, dict] = {}
    for arm, convs in prompts.items():
        outputs, seconds = {}, {}
        # alternate the order per arm so that a change of load on the machine hits every side alike
        names = list(sides) if len(arms) % 2 == 0 else list(reversed(sides))
        for name in names:
            outputs[name], seconds[name] = timed(lambda n=name, c=convs: sides[n](c))
        ids = [render_prompt(tokenizer, c) for c in convs]
        prefix = prefill_shared_prefix(model, ids)
        arms[arm] = {
            "examples": len(convs), "prompt_tokens_mean": sum(map(len, ids)) / len(ids),
            "shared_prefix_tokens": prefix.length if prefix else 0,
            "wall_s": seconds,
            "speedup": {name: seconds["hf"] / seconds[name] for name in sides if name != "hf"},
            "same_output_as_hf": {name: sum(a == b for a, b in zip(outputs["hf"], outputs[name], strict=True))
                                  for name in sides if name != "hf"},
            "differences": [{"example": i, "hf": a, "prefix": b}
                            for i, (a, b) in enumerate(zip(outputs["hf"], outputs["prefix"], strict=True)) if a != b],
        }
        print(f"{arm:<10} " + "  ".join(f"{n} {seconds[n]:6.1f} s" for n in sides)
              + f"  prefix {arms[arm]['speedup']['prefix']:.2f}x, same {arms[arm]['same_output_as_hf']}"
              f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    total = {name: sum(a["wall_s"][name] for a in arms.values()) for name in sides}
    same = {name: sum(a["same_output_as_hf"][name] for a in arms.values()) for name in sides if name != "hf"}
    return {"mode": "demo", "recipe": str(DEMO / "recipe.yaml"), "batch_size": batch_size,
            "prefix_batch_size": args.prefix_batch_size or batch_size,
            "max_new_tokens": settings.max_new_tokens, "arms": arms, "total_wall_s": total,
            "speedup_total": {name: total["hf"] / total[name] for name in sides if name != "hf"},
            "same_output_total": same, "outputs_compared": sum(a["examples"] for a in arms.values())}


def run_batching(args: argparse.Namespace, model, tokenizer) -> dict:
    from tunelab.engine.generate import DecodingSettings, generate

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
            "same_output_as_single": sum(a.text == b.text for a, b in zip(single, batched, strict=True)) / len(single),
        })
    for row in rows:
        extra = f"  {row['speedup_wall']:.1f}x wall, same output {row['same_output_as_single']:.0%}" if "speedup_wall" in row else ""
        print(f"{row['mode']:<22} batch {row['batch_size']:>3}: {row['wall_s']:7.1f} s  "
              f"{row['tokens_per_s']:7.1f} completion tokens/s{extra}")
    return {"mode": "batching", "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
            "prompt_tokens_mean": sum(g.prompt_tokens for g in single) / len(single), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["demo", "batching"], default="demo")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=None, help="demo: test examples per arm (default the recipe's)")
    parser.add_argument("--batch-size", type=int, default=None, help="demo: default the recipe's eval.batch_size")
    parser.add_argument("--sides", default="hf,loop,prefix", help="demo: hf and prefix always; loop optional")
    parser.add_argument("--prefix-batch-size", type=int, default=None,
                        help="demo: the prefix side's batch size (default --batch-size): a larger eval.batch_size")
    parser.add_argument("--prompts", type=int, default=64, help="batching: number of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="batching")
    parser.add_argument("--batch-sizes", default="16,64", help="batching")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is faster on a CPU shared with other jobs")
    parser.add_argument("--out", default=None, help="default bench/results/generate_speed_demo.json (demo) or "
                        "generate_speed.json (batching)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tunelab.models import load_model, load_tokenizer

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    model.eval()
    result = run_demo(args, model, tokenizer) if args.mode == "demo" else run_batching(args, model, tokenizer)
    result.update({
        "benchmark": "generate_speed", "model": args.model, "decoding": "greedy, stop at end-of-turn",
        "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "torch": torch.__version__,
        "command": "python bench/generate_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if v is not None and k in (DEMO_OPTIONS if args.mode == "demo" else BATCHING_OPTIONS)),
        "load_average_1min_at_end": os.getloadavg()[0],
    })
    args.out = args.out or str(RESULTS / ("generate_speed_demo.json" if args.mode == "demo" else "generate_speed.json"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.mode == "demo":
        print("total: " + "  ".join(f"{n} {s:.1f} s" for n, s in result["total_wall_s"].items())
              + f"; prefix vs hf {result['speedup_total']['prefix']:.2f}x (goal >= 2x), identical outputs "
              f"{result['same_output_total']['prefix']}/{result['outputs_compared']}; wrote {args.out}")
    else:
        best = max(r.get("speedup_wall", 0) for r in result["rows"])
        print(f"batched vs one at a time: {best:.1f}x (goal >= 5x); wrote {args.out}")


if __name__ == "__main__":
    main()
