"""The tuned arm's latency as deployed: a LoRA adapter merged into the base weights vs left unmerged.

    .venv/bin/python bench/merged_latency.py                       # the demo's tuned prompts, 16 of them
    .venv/bin/python bench/merged_latency.py --limit 32 --threads 1

`tunelab eval` times the tuned arms with the adapter merged into the base weights (eval/run.py
_Models), as a LoRA fine-tune is served; before, they decoded through PEFT's unmerged LoRA layers
(two extra small matmuls on every adapted linear layer, every token). This builds the tuned arm's
prompts of examples/triage as `tunelab eval` does, puts a LoRA adapter of the recipe's shape on the
model (rank 16 on all linear layers, B non-zero so it changes the outputs), and generates them with
the recipe's decoding settings through tunelab's generate, unmerged then merged, interleaved
`--repeats` times in one process. It reports the wall time of each side, the ratio, and how many
greedy outputs are identical. Writes bench/results/merged_latency.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads lose 10x on shared cores

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=16, help="test examples (the tuned arm's prompts)")
    parser.add_argument("--batch-size", type=int, default=None, help="default the recipe's eval.batch_size")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(RESULTS / "merged_latency.json"))
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from generate_speed import demo_prompts  # this folder is on sys.path when run as a script
    from tunelab.engine.generate import DecodingSettings, generate
    from tunelab.models import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts, recipe = demo_prompts(args.limit)
    conversations = prompts["tuned"]
    settings = DecodingSettings(max_new_tokens=recipe.eval.max_new_tokens, seed=recipe.eval.seed)
    batch_size = args.batch_size or recipe.eval.batch_size
    tokenizer = load_tokenizer(args.model)

    def adapted():
        torch.manual_seed(0)  # lora_A is drawn from the global generator: the same adapter on both sides
        model = get_peft_model(load_model(args.model), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                  target_modules="all-linear"))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        return model.eval()

    unmerged = adapted()
    merged = adapted().merge_and_unload()  # the same adapter (same seed), merged as eval/run.py does
    walls: dict[str, list[float]] = {"unmerged": [], "merged": []}
    outputs: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for side, model in (("unmerged", unmerged), ("merged", merged)):
            t0 = time.perf_counter()
            gens = generate(model, tokenizer, conversations, settings, batch_size)
            walls[side].append(time.perf_counter() - t0)
            outputs[side] = [g.text for g in gens]
    best = {side: min(values) for side, values in walls.items()}
    same = sum(a == b for a, b in zip(outputs["unmerged"], outputs["merged"], strict=True))
    result = {
        "benchmark": "merged_latency", "model": args.model, "prompts": len(conversations), "batch_size": batch_size,
        "max_new_tokens": settings.max_new_tokens, "lora_rank": args.rank, "lora_targets": "all-linear",
        "wall_s": walls, "best_wall_s": best, "unmerged_over_merged": best["unmerged"] / best["merged"],
        "identical_outputs": same, "device": str(next(merged.parameters()).device),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "torch": torch.__version__, "load_average_1min_at_end": os.getloadavg()[0],
        "command": f"python bench/merged_latency.py --limit {args.limit} --rank {args.rank} --repeats {args.repeats}"
                   + (f" --threads {args.threads}" if args.threads else ""),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"unmerged {best['unmerged']:.1f} s, merged {best['merged']:.1f} s: unmerged takes "
          f"{result['unmerged_over_merged']:.2f}x as long; identical outputs {same}/{len(conversations)}; wrote {args.out}")


if __name__ == "__main__":
    main()
