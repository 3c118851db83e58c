"""tunelab's training loop vs transformers Trainer + PEFT: LoRA on SmolLM2-135M on this CPU.

    python bench/train_cpu.py --quick          # one run a side, 3 steps: ~4 min on 2 idle cores
    python bench/train_cpu.py                  # two runs a side (ABBA), 6 steps

Same model and LoRA initialisation (r16, alpha 32, all linear layers, dropout 0 so that the losses
can be compared), same data (random-token examples with lengths log-uniform in 64..512; the last
30% of each is the trained "answer"), the same examples in the same optimizer steps, in the same
order (so the same tokens per optimizer step), AdamW at a constant learning rate, grad clip 1.0.
The baseline is what a user gets by default: batches of 4 examples padded to the longest, 4
accumulation steps, full logits and the model's own loss. tunelab packs each step's examples into
rows (no padding, isolated by block-diagonal masks) and computes the loss in chunks over the
trained positions only.

Each side runs in its own subprocess (so peak RSS is its own) with the same environment; the first
optimizer step is warm-up and not timed. On a shared machine the load drifts: with repeats the
sides run in ABBA order and each side's fastest run counts. tokens/s counts real (non-pad) tokens. Writes
bench/results/train_cpu.json and prints one JSON line: tokens_per_s_ratio, peak_mem_ratio
(tunelab / baseline) and loss_max_abs_diff over the per-step losses (the baseline logs its loss
rounded to 4 decimals).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "train_cpu.json"
MODEL = "smollm2-135m-instruct"
EXAMPLES_PER_MICRO_BATCH = 4  # the baseline's per-device batch
ACCUMULATION = 4  # the baseline's gradient accumulation steps
LR = 2e-4
SEED = 0


def make_examples(count: int, vocab_size: int, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        length = int(round(math.exp(rng.uniform(math.log(64), math.log(512)))))
        ids = [rng.randrange(100, vocab_size - 100) for _ in range(length)]
        answer_start = int(length * 0.7)
        examples.append({"input_ids": ids, "labels": [-100] * answer_start + ids[answer_start:]})
    return examples


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def step_groups(steps: int) -> list[list[int]]:
    per_step = EXAMPLES_PER_MICRO_BATCH * ACCUMULATION
    return [list(range(s * per_step, (s + 1) * per_step)) for s in range(steps)]


# ---------------------------------------------------------------------------------------------- sides


def run_tunelab(steps: int, micro_batch_tokens: int) -> dict:
    from tunelab.config import load_recipe
    from tunelab.data.pack import Step, example_length, group_micro_batches, pack_rows, trainable_count
    from tunelab.models import load_tokenizer
    from tunelab.train.loop import train_loop
    from tunelab.train.setup import setup_training

    tokenizer = load_tokenizer(MODEL)
    examples = make_examples(steps * EXAMPLES_PER_MICRO_BATCH * ACCUMULATION, len(tokenizer))
    recipe = load_recipe(None, [
        f"model.name={MODEL}", "model.dtype=float32", "lora.dropout=0", f"train.lr={LR}", "train.warmup_ratio=0",
        "train.lr_schedule=constant", "train.checkpoint_every_steps=100000", f"train.micro_batch_tokens={micro_batch_tokens}",
    ])
    plan = []
    for group in step_groups(steps):
        lengths = [example_length(examples[i]) for i in group]
        rows = [tuple(group[j] for j in row) for row in pack_rows(lengths, 512)]
        row_lengths = [sum(example_length(examples[i]) for i in row) for row in rows]
        micro = group_micro_batches(rows, row_lengths, micro_batch_tokens)
        plan.append(Step(0, 0, tuple(micro), sum(lengths), sum(trainable_count(examples[i]) for i in group), 0.0))
    setup = setup_training(recipe, len(plan), "cpu")
    step_end_s: list[float] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_root:
        train_loop(setup, examples, plan, recipe.train, Path(run_root), pad_id=tokenizer.pad_token_id,
                   on_step_end=lambda state, _setup: step_end_s.append(time.perf_counter()), progress=False)
        log = [json.loads(line) for line in (Path(run_root) / "train" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "train"]
    return {"losses": losses, "step_end_s": [t - started for t in step_end_s], "peak_rss_gib": peak_rss_gib(),
            "step_tokens": [s.tokens for s in plan]}


def run_baseline(steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from tunelab.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    examples = make_examples(steps * EXAMPLES_PER_MICRO_BATCH * ACCUMULATION, len(tokenizer))
    model = load_model(MODEL, dtype="float32", device="cpu")
    model.train()
    torch.manual_seed(SEED)  # the same LoRA initialisation as tunelab's setup (seed 0, then get_peft_model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             bias="none", task_type="CAUSAL_LM"))
    order = [i for group in step_groups(steps) for i in group]
    dataset = [{"input_ids": examples[i]["input_ids"], "labels": examples[i]["labels"],
                "attention_mask": [1] * len(examples[i]["input_ids"])} for i in order]
    step_tokens = [sum(len(examples[i]["input_ids"]) for i in group) for group in step_groups(steps)]
    losses: list[float] = []
    step_end_s: list[float] = []
    started = time.perf_counter()

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end_s.append(time.perf_counter() - started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=EXAMPLES_PER_MICRO_BATCH,
            gradient_accumulation_steps=ACCUMULATION, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, max_steps=steps, logging_steps=1, save_strategy="no", report_to=[],
            train_sampling_strategy="sequential", dataloader_num_workers=0, use_cpu=True, seed=SEED,
            disable_tqdm=True, remove_unused_columns=False,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[Record()])
        trainer.train()
    return {"losses": losses, "step_end_s": step_end_s, "peak_rss_gib": peak_rss_gib(), "step_tokens": step_tokens,
            "optim": args.optim}


# ---------------------------------------------------------------------------------------------- driver


def tokens_per_s(side: dict, warmup_steps: int = 1) -> float:
    ends, tokens = side["step_end_s"], side["step_tokens"]
    return sum(tokens[warmup_steps:]) / (ends[-1] - ends[warmup_steps - 1])


def run_side(name: str, steps: int, micro_batch_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--side", name, "--steps", str(steps),
                   "--micro-batch-tokens", str(micro_batch_tokens), "--out", out.name]
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 optimizer steps a side (1 warm-up), one run each")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps a side (default 6, --quick 3)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side, ABBA order (default 2, --quick 1)")
    parser.add_argument("--micro-batch-tokens", type=int, default=512, help="tunelab: tokens per forward pass (its default: max_seq_len)")
    parser.add_argument("--side", choices=["tunelab", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 6)
    repeats = args.repeats or (1 if args.quick else 2)
    if args.side:
        result = run_tunelab(steps, args.micro_batch_tokens) if args.side == "tunelab" else run_baseline(steps)
        Path(args.out).write_text(json.dumps(result))
        return

    # OpenMP threads that spin-wait lose 10x+ on shared cores (measured here); both sides get the same
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # ABBA order cancels a steady drift in the machine's load; each side's best run is reported
    order = ["tunelab", "baseline"] + ["baseline", "tunelab"] * (repeats > 1) + ["tunelab", "baseline"] * max(0, repeats - 2)
    runs: dict[str, list[dict]] = {"tunelab": [], "baseline": []}
    for name in order:
        result = run_side(name, steps, args.micro_batch_tokens)
        result["tokens_per_s"] = tokens_per_s(result)
        runs[name].append(result)
        print(f"{name}: {result['tokens_per_s']:.1f} tokens/s, peak RSS {result['peak_rss_gib']:.2f} GiB", file=sys.stderr)
    tunelab = max(runs["tunelab"], key=lambda r: r["tokens_per_s"])
    baseline = max(runs["baseline"], key=lambda r: r["tokens_per_s"])
    peak = {name: max(r["peak_rss_gib"] for r in side) for name, side in runs.items()}
    n = min(len(tunelab["losses"]), len(baseline["losses"]))
    summary = {
        "tokens_per_s_ratio": round(tunelab["tokens_per_s"] / baseline["tokens_per_s"], 3),
        "peak_mem_ratio": round(peak["tunelab"] / peak["baseline"], 3),
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(tunelab["losses"][:n], baseline["losses"][:n], strict=True)),
    }
    options = (" --quick" if args.quick else "") + (f" --steps {args.steps}" if args.steps else "")
    options += (f" --repeats {args.repeats}" if args.repeats else "")
    record = {
        **summary,
        "command": "python bench/train_cpu.py" + options,
        "model": MODEL, "method": "lora r16 alpha32 all-linear dropout0", "steps": steps, "timed_steps": steps - 1,
        "repeats": repeats, "tokens_per_step_mean": sum(tunelab["step_tokens"]) / steps,
        "examples_per_step": EXAMPLES_PER_MICRO_BATCH * ACCUMULATION,
        "tunelab": {"tokens_per_s": round(tunelab["tokens_per_s"], 1), "peak_rss_gib": round(peak["tunelab"], 3),
                    "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in runs["tunelab"]],
                    "losses": tunelab["losses"], "micro_batch_tokens": args.micro_batch_tokens},
        "baseline": {"tokens_per_s": round(baseline["tokens_per_s"], 1), "peak_rss_gib": round(peak["baseline"], 3),
                     "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in runs["baseline"]],
                     "losses": baseline["losses"], "optim": baseline["optim"],
                     "what": f"transformers Trainer + PEFT, batch {EXAMPLES_PER_MICRO_BATCH} padded, accumulation {ACCUMULATION}"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_avg_1m_at_end": os.getloadavg()[0]},
    }
    import peft
    import torch
    import transformers

    record["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
