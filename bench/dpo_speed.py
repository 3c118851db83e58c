"""A DPO step vs a supervised step on the same tokens, on CPU; and TRL's DPOTrainer on the same pairs.

    python bench/dpo_speed.py                         # SmolLM2-135M-Instruct, LoRA r16, this CPU
    python bench/dpo_speed.py --model tiny-test --steps 4    # a smoke run in seconds
    python bench/dpo_speed.py --trl-python /tmp/trl-venv/bin/python   # + TRL's DPOTrainer, in its own venv

Same work on both tunelab sides: the same model and LoRA adapter (r16, alpha 32, all linear layers,
dropout 0), the same pairs (a prompt of a few sentences, two answers; tokenized once through the
chat template, data/preference.py), the same optimizer (AdamW, constant learning rate, clipping 1.0)
and the same steps of `--pairs-per-step` pairs. The supervised step trains on the same 2 x N
sequences (prompt + preferred answer, prompt + rejected answer; labels on the answers) packed into
rows of the same size: the same tokens through the same model. Each step goes through the training
loop's own train_step (train/loop.py). The DPO step uses the reference log-probs computed once
beforehand (train/preference.py: attach_reference); that pass is timed apart, and so is what a
reference forward pass in every step would add (what tunelab's cache saves). The two kinds of step
alternate, so a load change on a shared machine hits both alike; the ratio is of the median steps.

TRL's side (when --trl-python names a Python with trl installed: TRL is not a tunelab dependency)
runs DPOTrainer in a subprocess on the same model folder and the same pair texts, with PEFT LoRA of
the same settings, the same pairs per step (no accumulation), the same learning rate and beta, and
its default reference (the adapter switched off, a forward pass every step): the ratio is of
real (non-pad) tokens per second, each side counting its own (TRL renders the prompt with the same
chat template, so the counts agree within a few tokens).

Writes bench/results/dpo_speed.json (or --out) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ["the", "order", "ships", "on", "monday", "and", "the", "invoice", "follows", "by", "mail", "within", "two", "working", "days", "unless", "the", "customer", "asks", "for", "a", "faster", "delivery", "which", "costs", "extra", "and", "needs", "approval", "from", "the", "team", "lead"]
SEED = 0


def make_pairs(count: int, prompt_words: int, answer_words: int) -> list[dict[str, str]]:
    """Deterministic text pairs: {"prompt", "chosen", "rejected"}."""
    rng = random.Random(SEED)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    return [{"prompt": text(prompt_words), "chosen": text(answer_words), "rejected": text(answer_words)}
            for _ in range(count)]


# ---------------------------------------------------------------------------------------------- tunelab


def run_tunelab(args: argparse.Namespace, pairs: list[dict[str, str]]) -> dict[str, Any]:
    import torch

    from tunelab.config import load_recipe
    from tunelab.data.pack import Step, example_length, group_micro_batches, pack_rows, trainable_count
    from tunelab.data.preference import Pair, pair_row, tokenize_pair
    from tunelab.models import load_model, load_tokenizer
    from tunelab.train.loop import batch_builder, train_step
    from tunelab.train.loss import CausalLMLoss
    from tunelab.train.preference import PreferenceLoss, pair_batches, reference_logps
    from tunelab.train.setup import setup_training

    torch.manual_seed(SEED)
    tokenizer = load_tokenizer(args.model)
    rows = []
    for n, p in enumerate(pairs):
        pair = Pair("bench", n, "trl", [{"role": "user", "content": p["prompt"]}], p["chosen"], p["rejected"])
        rows.append(pair_row(f"p{n}", *tokenize_pair(tokenizer, pair)))
    sequences = []
    for row in rows:
        n = row["chosen_tokens"]
        sequences += [{"input_ids": row["input_ids"][:n], "labels": row["labels"][:n]},
                      {"input_ids": row["input_ids"][n:], "labels": row["labels"][n:]}]
    recipe = load_recipe(None, [
        "method=lora", "lora.dropout=0", f"train.lr={args.lr}", "train.lr_schedule=constant", "train.warmup_ratio=0",
        "train.compile=false", "train.weight_decay=0",
    ])
    base = load_model(args.model, dtype="float32", device="cpu")
    setup = setup_training(recipe, args.steps, "cpu", base=base)
    sft_loss, dpo_loss = CausalLMLoss(setup.model), PreferenceLoss(setup.model, args.beta)
    row_tokens = max(args.row_tokens, max(example_length(r) for r in rows))

    # the reference: once, before training (timed apart)
    setup.loss_module = dpo_loss
    started = time.perf_counter()
    for row, logps in zip(rows, reference_logps(setup, rows, 0, row_tokens, adapter_off=True), strict=True):
        row["reference_logps"] = logps
    reference_s = time.perf_counter() - started

    def plan(examples: list[dict[str, Any]], groups: list[list[int]]) -> list[Step]:
        steps = []
        for group in groups:
            lengths = [example_length(examples[i]) for i in group]
            packed = [tuple(group[j] for j in r) for r in pack_rows(lengths, row_tokens)]
            row_lengths = [sum(example_length(examples[i]) for i in r) for r in packed]
            micro = group_micro_batches(packed, row_lengths, row_tokens)
            steps.append(Step(0, 0, tuple(micro), sum(lengths), sum(trainable_count(examples[i]) for i in group), 0.0))
        return steps

    k = args.pairs_per_step
    pair_groups = [list(range(s * k, (s + 1) * k)) for s in range(args.steps)]
    dpo_plan = plan(rows, pair_groups)
    sft_plan = plan(sequences, [[j for i in g for j in (2 * i, 2 * i + 1)] for g in pair_groups])
    assert [s.tokens for s in dpo_plan] == [s.tokens for s in sft_plan]  # the same tokens, step by step
    stop = type("NoSignal", (), {"received": None})()
    from tunelab.train.distributed import SINGLE_PROCESS

    def step(kind: str, index: int) -> float:
        setup.loss_module = dpo_loss if kind == "dpo" else sft_loss
        setup.make_batches = (lambda ex, pad: pair_batches(setup, ex, pad)) if kind == "dpo" else None
        examples, steps = (rows, dpo_plan) if kind == "dpo" else (sequences, sft_plan)
        result = train_step(setup, steps[index], index, batch_builder(setup, examples, 0), SINGLE_PROCESS, stop, 1.0)
        return result.time_s

    def reference_forward(index: int) -> float:
        """What recomputing the reference in this step would add: a forward pass without gradients, adapter off."""
        build = pair_batches(setup, rows, 0)
        started = time.perf_counter()
        with torch.no_grad(), setup.model.disable_adapter():
            for micro in dpo_plan[index].micro_batches:
                dpo_loss.sequence_logps(**build(micro).model_inputs())
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"sft": [], "dpo": [], "reference_forward": []}
    for index in range(args.steps):
        for kind in ("sft", "dpo") if index % 2 == 0 else ("dpo", "sft"):
            times[kind].append(step(kind, index))
        times["reference_forward"].append(reference_forward(index))
    timed = {kind: values[args.warmup:] for kind, values in times.items()}
    median = {kind: statistics.median(values) for kind, values in timed.items()}
    tokens = statistics.mean(s.tokens for s in dpo_plan[args.warmup:])
    return {
        "model": args.model, "pairs": len(rows), "pairs_per_step": k, "steps": args.steps, "warmup": args.warmup,
        "tokens_per_step_mean": round(tokens, 1), "row_tokens": row_tokens,
        "sft_step_s_median": round(median["sft"], 4), "dpo_step_s_median": round(median["dpo"], 4),
        "dpo_vs_sft_step_ratio": round(median["dpo"] / median["sft"], 3),
        "reference_forward_s_median": round(median["reference_forward"], 4),
        "dpo_uncached_vs_sft_step_ratio": round((median["dpo"] + median["reference_forward"]) / median["sft"], 3),
        "reference_pass_s": round(reference_s, 3),
        "reference_pass_share_of_one_epoch": round(reference_s / (median["dpo"] * len(rows) / k), 3),
        "dpo_tokens_per_s": round(tokens / median["dpo"], 1), "sft_tokens_per_s": round(tokens / median["sft"], 1),
        "step_s": {kind: [round(v, 4) for v in values] for kind, values in times.items()},
    }


# ---------------------------------------------------------------------------------------------- TRL


def run_trl(cfg: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer (runs in the Python named by --trl-python; imports no tunelab)."""
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32)
    pairs = cfg["pairs"]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    step_s: list[float] = []
    tokens: list[int] = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_s.append(time.perf_counter() - self.started)

    args = DPOConfig(
        output_dir=cfg["out"], per_device_train_batch_size=cfg["pairs_per_step"], gradient_accumulation_steps=1,
        learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=cfg["steps"], logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        beta=cfg["beta"], loss_type=["sigmoid"], gradient_checkpointing=False, seed=SEED, disable_tqdm=True,
        dataloader_num_workers=0, max_length=None,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                         callbacks=[Record()])
    for row in trainer.train_dataset:  # its own real tokens: prompt + chosen + prompt + rejected
        tokens.append(2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"]))
    trainer.train()
    per_step = [sum(tokens[s * cfg["pairs_per_step"] : (s + 1) * cfg["pairs_per_step"]]) for s in range(cfg["steps"])]
    timed = step_s[cfg["warmup"]:]
    mean_tokens = statistics.mean(per_step[cfg["warmup"]:])
    return {"trl_version": trl.__version__, "step_s": [round(v, 4) for v in step_s],
            "step_s_median": round(statistics.median(timed), 4), "tokens_per_step_mean": round(mean_tokens, 1),
            "tokens_per_s": round(mean_tokens / statistics.median(timed), 1),
            "precompute_ref_log_probs": args.precompute_ref_log_probs}


def trl_side(args: argparse.Namespace, pairs: list[dict[str, str]]) -> dict[str, Any]:
    import tempfile

    from tunelab.models import resolve_reference

    with tempfile.TemporaryDirectory() as out:
        cfg = {"model_dir": str(resolve_reference(args.model).path), "pairs": pairs, "pairs_per_step": args.pairs_per_step,
               "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "beta": args.beta, "out": out}
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        env.pop("PYTHONPATH", None)
        done = subprocess.run([args.trl_python, __file__, "--trl-side"], input=json.dumps(cfg), capture_output=True,
                              text=True, env=env, timeout=3600)
    if done.returncode != 0:
        return {"skipped": f"TRL side failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}",
                "stderr_tail": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of each kind (the first --warmup untimed)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--answer-words", type=int, default=30)
    parser.add_argument("--row-tokens", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--trl-python", help="a Python with trl installed (a throwaway venv): adds TRL's DPOTrainer")
    parser.add_argument("--out", type=Path, default=RESULTS / "dpo_speed.json")
    parser.add_argument("--trl-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_side:  # inside the TRL venv: the config comes on stdin
        print(json.dumps(run_trl(json.loads(sys.stdin.read()))))
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    pairs = make_pairs(args.steps * args.pairs_per_step, args.prompt_words, args.answer_words)
    result: dict[str, Any] = {
        "bench": "dpo_speed", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "tunelab": run_tunelab(args, pairs),
    }
    result["goal"] = {"dpo_vs_sft_step_ratio_max": 2.2,
                      "met": result["tunelab"]["dpo_vs_sft_step_ratio"] <= 2.2}
    if args.trl_python:
        trl = trl_side(args, pairs)
        result["trl"] = trl
        if "tokens_per_s" in trl:
            result["dpo_tokens_per_s_vs_trl"] = round(result["tunelab"]["dpo_tokens_per_s"] / trl["tokens_per_s"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("tunelab", "trl")} | {
        "dpo_vs_sft_step_ratio": result["tunelab"]["dpo_vs_sft_step_ratio"],
        "dpo_uncached_vs_sft_step_ratio": result["tunelab"]["dpo_uncached_vs_sft_step_ratio"]}))


if __name__ == "__main__":
    main()
