"""tunelab's trainer vs transformers Trainer + PEFT (and TRL's SFTTrainer when installed), same work.

    python bench/train_speed.py --device cpu --quick      # SmolLM2-135M LoRA on this CPU, both length modes
    python bench/train_speed.py --device cpu --quick --lengths uniform   # short chat data only
    python bench/train_speed.py --device cuda --suite gpu  # 135M / 360M / 1B shapes, LoRA and full, one GPU

Same work on every side: the same model (the real SmolLM2-135M on CPU; random-init models of real
shapes on a GPU, built from one seed, checksummed), the same LoRA settings and initialisation (r16,
alpha 32, all linear layers, dropout 0 so that losses can be compared), the same examples (random
tokens; the last --answer-fraction of each is the trained part) in the same optimizer steps and order, so the same tokens per optimizer step, AdamW
(fused) at a constant learning rate, gradient clipping 1.0, bf16 autocast on a GPU (LoRA on a bf16
base, full fine-tuning on float32 master weights), float32 on CPU.

The baseline is what a user gets by default: batches padded to the longest example, full logits
and the model's own loss. tunelab runs its real training loop (train/loop.py): on a GPU, each
step's examples end to end through the flash variable-length attention kernel with the micro-batch
size its memory probe picks; on CPU, packed rows with a block-diagonal mask; the loss in chunks
over trained positions only.

Measured: non-pad tokens/s over the timed steps (after --warmup steps; compile time is reported
apart as the warm-up time), peak memory (CUDA: max allocated, every side in this process after a
reset; CPU: peak RSS, every side in its own subprocess), MFU, and the per-step losses of both sides,
which must agree (CPU float32: 1e-3; GPU bf16: 0.05 on losses near ln(vocab), bf16 rounding of
different but equivalent kernels). MFU = tokens/s x FLOPs per token / 989e12 (H100/H200 dense bf16
datasheet). FLOPs per token: full = 6 N + attention, LoRA = 4 N + 6 N_lora +
attention (the frozen weights get no weight gradient: forward 2N, backward to the activations 2N),
N = parameters of every matmul (the LM head included, the embedding lookup not), attention =
3 x 4 x layers x heads x head_dim x (mean causal context) — over each example's own length.

CPU length modes (--lengths, default both): "loguniform", lengths log-uniform in 64..512 (packing
removes the padding a padded batch would hold), and "uniform", lengths uniform in 55..66 like real
short chat data (e.g. the demo's tickets; ~1k tokens a step, packed into rows of 256 as the demo's
max_seq_len, one row a micro-batch), where padding is small and packing has almost nothing to remove.

Writes one JSON per configuration under bench/results/ (or --out) and prints, as its last line,
one JSON object: tokens_per_s_ratio, peak_mem_ratio and loss_max_abs_diff (tunelab / baseline;
with several configurations, the worst of each).
"""

from __future__ import annotations

import argparse
import gc
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
import traceback
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PEAK_FLOPS = 989e12  # dense bf16, H100/H200 SXM datasheet
LR = {"lora": 2e-4, "full": 1e-5}
SEED = 0
LOSS_TOLERANCE = {"cpu": 1e-3, "cuda": 0.05}

# real shapes, random weights (no downloads on the GPU machine)
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                        head_dim=64),
}
# a dry run of the GPU suite's code on CPU: python bench/train_speed.py --suite gpu --device cpu --out /tmp/dry.json
SHAPES["tiny"] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
DRY_SUITE = [("tiny", "lora", 8, 4), ("tiny", "full", 8, 8)]
CPU_MODEL = "smollm2-135m-instruct"  # the real default model, from tunelab's cache

# (shape, method, examples per step, baseline per-device batch) for --suite gpu, most important first
GPU_SUITE = [
    ("smollm2-135m", "lora", 8, 8),
    ("llama3.2-1b", "lora", 8, 8),
    ("llama3.2-1b", "full", 8, 8),
    ("smollm2-360m", "lora", 8, 8),
    ("smollm2-135m", "full", 8, 8),
    ("smollm2-360m", "full", 8, 8),
    ("llama3.2-1b", "full", 64, 8),  # a large step: where MFU can be reached (baseline accumulates 8 x 8)
]


# ---------------------------------------------------------------------------------------------- work


def make_examples(count: int, vocab_size: int, min_len: int, max_len: int, answer_fraction: float,
                  lengths: str = "loguniform") -> list[dict]:
    rng = random.Random(SEED)
    examples = []
    for _ in range(count):
        if lengths == "uniform":
            length = rng.randint(min_len, max_len)
        else:
            length = int(round(math.exp(rng.uniform(math.log(min_len), math.log(max_len)))))
        ids = [rng.randrange(100, vocab_size - 100) for _ in range(length)]
        answer_start = min(length - 1, int(length * (1 - answer_fraction)))
        examples.append({"input_ids": ids, "labels": [-100] * answer_start + ids[answer_start:]})
    return examples


def build_base(shape: str | None, method: str, device: str):
    """The base model, the same weights on every call (seeded init, or the cached real model)."""
    import torch

    if shape is None:
        from tunelab.models import load_model

        return load_model(CPU_MODEL, dtype="float32", device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, attn_implementation="sdpa")
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    # LoRA trains adapters on a frozen bf16 base; full fine-tuning keeps float32 master weights
    dtype = torch.bfloat16 if (device == "cuda" and method == "lora") else torch.float32
    return model.to(dtype)


def weights_checksum(model) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.detach().float().abs().sum().item() for p in list(model.parameters())[:6]))


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")


def flops_per_token(model, method: str, examples: list[dict]) -> dict[str, float]:
    """Model FLOPs per trained-or-not token (see the module docstring)."""
    import torch

    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    matmul, lora = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if "lora_" in name:
                lora += module.weight.numel()
            elif not name.endswith("embed_tokens"):
                matmul += module.weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    lengths = [len(e["input_ids"]) for e in examples]
    # each token attends to (position + 1) keys: mean context over all tokens of all examples
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    attention = 3 * 4 * config.num_hidden_layers * width * mean_context
    dense = 6 * matmul if method == "full" else 4 * matmul + 6 * lora
    return {"per_token": dense + attention, "matmul_params": matmul, "lora_params": lora, "attention_per_token": attention}


def step_groups(n_steps: int, per_step: int) -> list[list[int]]:
    return [list(range(s * per_step, (s + 1) * per_step)) for s in range(n_steps)]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ---------------------------------------------------------------------------------------------- sides


def run_tunelab(cfg: dict, compile_layers: bool = False) -> dict:
    import torch

    from tunelab.config import load_recipe
    from tunelab.data.pack import Step, example_length, group_micro_batches, pack_rows, trainable_count
    from tunelab.train.attention import kernel_name
    from tunelab.train.loop import LoopOptions, train_loop
    from tunelab.train.memory import auto_micro_batch_tokens
    from tunelab.train.setup import setup_training

    device, method = cfg["device"], cfg["method"]
    reset_memory(device)
    started = time.perf_counter()
    base = build_base(cfg["shape"], method, device)
    checksum = weights_checksum(base)
    examples = make_examples(cfg["steps"] * cfg["examples_per_step"], base.config.vocab_size, cfg["min_len"],
                             cfg["max_len"], cfg["answer_fraction"], cfg.get("lengths", "loguniform"))
    recipe = load_recipe(None, [
        f"method={method}", "lora.dropout=0", "lora.rank=16", "lora.alpha=32", f"train.lr={LR[method]}",
        "train.warmup_ratio=0", "train.lr_schedule=constant", f"train.compile={str(compile_layers).lower()}",
        f"train.seed={SEED}", "train.weight_decay=0", f"train.attention={cfg.get('attention', 'auto')}",
    ])
    setup = setup_training(recipe, cfg["steps"], device, base=base)
    row_tokens = cfg.get("row_tokens") or cfg["max_len"]
    probed = None
    if device == "cuda":
        largest_step = max(sum(example_length(examples[i]) for i in group)
                           for group in step_groups(cfg["steps"], cfg["examples_per_step"]))
        micro_tokens, probed = auto_micro_batch_tokens(setup, largest_step, row_tokens, base.config.vocab_size)
    else:
        micro_tokens = cfg["cpu_micro_batch_tokens"]
    plan = []
    for group in step_groups(cfg["steps"], cfg["examples_per_step"]):
        lengths = [example_length(examples[i]) for i in group]
        rows = [tuple(group[j] for j in row) for row in pack_rows(lengths, row_tokens)]
        row_lengths = [sum(example_length(examples[i]) for i in row) for row in rows]
        micro = group_micro_batches(rows, row_lengths, micro_tokens, padded=setup.attention != "varlen")
        plan.append(Step(0, 0, tuple(micro), sum(lengths), sum(trainable_count(examples[i]) for i in group), 0.0))
    step_end_s: list[float] = []

    def record(_state, _setup) -> None:
        sync(device)
        step_end_s.append(time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as run_root:
        train_loop(setup, examples, plan, recipe.train, Path(run_root), pad_id=0,
                   options=LoopOptions(on_step_end=record, progress=False, write_checkpoints=False))
        log = [json.loads(line) for line in (Path(run_root) / "train" / "log.jsonl").read_text().splitlines()]
    result = {
        "losses": [r["loss"] for r in log if r["kind"] == "train"], "step_end_s": step_end_s,
        "step_tokens": [s.tokens for s in plan], "peak_mem_gib": peak_memory_gib(device), "weights_checksum": checksum,
        "attention": setup.attention, "kernel": kernel_name(setup.device, setup.autocast_dtype or torch.float32)
        if setup.attention == "varlen" else "sdpa+mask", "micro_batch_tokens": micro_tokens,
        "micro_batches_per_step": [len(s.micro_batches) for s in plan], "probe": probed, "compile": compile_layers,
        "flops": flops_per_token(setup.model, method, examples),
    }
    del setup, base
    reset_memory(device)
    return result


def _run_trainer(cfg: dict, kind: str) -> dict:
    """A Trainer-based side: "hf" (transformers Trainer + PEFT, DataCollatorForSeq2Seq padding to the
    longest) or "trl" (TRL's SFTTrainer on the pre-tokenized examples, its own collator; its defaults
    that would change the work are set to match: no gradient checkpointing, no truncation)."""
    import torch
    from peft import get_peft_model
    from transformers import (
        DataCollatorForSeq2Seq,
        PreTrainedTokenizerFast,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    device, method = cfg["device"], cfg["method"]
    reset_memory(device)
    started = time.perf_counter()
    model = build_base(cfg["shape"], method, device)
    checksum = weights_checksum(model)
    model.config.use_cache = False
    model.train()
    if method == "lora":
        torch.manual_seed(SEED)  # the same LoRA initialisation as tunelab's setup (seed, then get_peft_model)
        model = get_peft_model(model, lora_config())
    examples = make_examples(cfg["steps"] * cfg["examples_per_step"], model.config.vocab_size, cfg["min_len"],
                             cfg["max_len"], cfg["answer_fraction"], cfg.get("lengths", "loguniform"))
    losses: list[float] = []
    step_end_s: list[float] = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            step_end_s.append(time.perf_counter() - started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    # a tokenizer only for padding: every side pads with id 0
    from tokenizers import Tokenizer, models

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                        pad_token="<pad>")
    per_device = cfg["baseline_batch"]
    with tempfile.TemporaryDirectory() as out:
        common = dict(
            output_dir=out, per_device_train_batch_size=per_device,
            gradient_accumulation_steps=cfg["examples_per_step"] // per_device, learning_rate=LR[method],
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_steps=cfg["steps"],
            logging_steps=1, save_strategy="no", report_to=[], train_sampling_strategy="sequential",
            dataloader_num_workers=0, use_cpu=device == "cpu", bf16=device == "cuda", optim="adamw_torch_fused",
            seed=SEED, disable_tqdm=True,
        )
        if kind == "trl":
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            args = SFTConfig(**common, gradient_checkpointing=False, max_length=None)
            dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
            trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[Record()])
        else:
            args = TrainingArguments(**common, remove_unused_columns=False)
            dataset = [{"input_ids": e["input_ids"], "labels": e["labels"], "attention_mask": [1] * len(e["input_ids"])}
                       for e in examples]
            collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
            trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[Record()])
        trainer.remove_callback(PrinterCallback)  # its per-step dicts on stdout would bury the results
        trainer.train()
    result = {"losses": losses, "step_end_s": step_end_s, "peak_mem_gib": peak_memory_gib(device),
              "step_tokens": [sum(len(examples[i]["input_ids"]) for i in g)
                              for g in step_groups(cfg["steps"], cfg["examples_per_step"])],
              "weights_checksum": checksum, "optim": args.optim, "attention": "sdpa, padded",
              "flops": flops_per_token(model, method, examples)}
    if kind == "trl":
        import trl

        result["trl_version"] = trl.__version__
    del trainer, model
    reset_memory(device)
    return result


def run_hf(cfg: dict) -> dict:
    return _run_trainer(cfg, "hf")


def run_trl(cfg: dict) -> dict:
    """TRL's SFTTrainer, when trl (and datasets) are installed."""
    import importlib.util

    missing = [name for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        return {"skipped": f"not installed: {', '.join(missing)}"}
    return _run_trainer(cfg, "trl")


def run_tunelab_compiled(cfg: dict) -> dict:
    return run_tunelab(cfg, compile_layers=True)


SIDES = {"tunelab": run_tunelab, "tunelab_compiled": run_tunelab_compiled, "hf": run_hf, "trl": run_trl}


# ---------------------------------------------------------------------------------------------- summary


def timed(side: dict, warmup: int) -> dict:
    """tokens/s over the steps after `warmup`, excluding the last (which ends with the run's cleanup)."""
    ends, tokens = side["step_end_s"], side["step_tokens"]
    last = len(ends) - 1
    seconds = ends[last - 1] - ends[warmup - 1]
    tokens_per_s = sum(tokens[warmup:last]) / seconds
    return {"tokens_per_s": tokens_per_s, "warmup_s": ends[warmup - 1], "timed_steps": last - warmup,
            "mfu_pct": 100 * tokens_per_s * side["flops"]["per_token"] / PEAK_FLOPS}


def loss_max_abs_diff(ours: dict, baseline: dict) -> float:
    """The largest difference between the two sides' losses at the same step."""
    return max(abs(a - b) for a, b in zip(ours["losses"], baseline["losses"], strict=False))


def compare(cfg: dict, sides: dict[str, dict]) -> dict:
    base, ours = sides["hf"], sides["tunelab"]
    b, t = timed(base, cfg["warmup"]), timed(ours, cfg["warmup"])
    diff = loss_max_abs_diff(ours, base)
    record = {
        "tokens_per_s_ratio": round(t["tokens_per_s"] / b["tokens_per_s"], 3),
        "peak_mem_ratio": round(ours["peak_mem_gib"] / base["peak_mem_gib"], 3),
        "loss_max_abs_diff": diff,
        "loss_tolerance": LOSS_TOLERANCE[cfg["device"]],
        "losses_agree": diff <= LOSS_TOLERANCE[cfg["device"]],
        "same_initial_weights": ours["weights_checksum"] == base["weights_checksum"],
        "config": cfg,
    }
    trl = sides.get("trl", {})
    if "skipped" not in trl and trl:
        r = timed(trl, cfg["warmup"])
        record["trl_tokens_per_s_ratio"] = round(t["tokens_per_s"] / r["tokens_per_s"], 3)
        record["trl_peak_mem_ratio"] = round(ours["peak_mem_gib"] / trl["peak_mem_gib"], 3)
        record["trl_loss_max_abs_diff"] = loss_max_abs_diff(ours, trl)
    for name, side in sides.items():
        if "skipped" in side:
            record[name] = side
            continue
        summary = timed(side, cfg["warmup"])
        record[name] = {**{k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()},
                        **{k: v for k, v in side.items() if k not in ("step_end_s",)}}
        record[name]["peak_mem_gib"] = round(side["peak_mem_gib"], 3)
    if "tunelab_compiled" in sides:
        record["compiled"] = compiled_summary(cfg, sides)
    return record


def compiled_summary(cfg: dict, sides: dict[str, dict]) -> dict:
    """train.compile=true against the baselines and against eager tunelab: the steady speed, the
    compiling (the warm-up's extra seconds) and the run length from which compiling pays."""
    ours, eager = timed(sides["tunelab_compiled"], cfg["warmup"]), timed(sides["tunelab"], cfg["warmup"])
    extra_s = ours["warmup_s"] - eager["warmup_s"]
    saved_per_token = 1 / eager["tokens_per_s"] - 1 / ours["tokens_per_s"]
    summary = {
        "vs_eager_tokens_per_s_ratio": round(ours["tokens_per_s"] / eager["tokens_per_s"], 3),
        "extra_warmup_s": round(extra_s, 1),
        "pays_back_after_tokens": round(extra_s / saved_per_token) if saved_per_token > 0 else None,
        "loss_max_abs_diff_vs_eager": loss_max_abs_diff(sides["tunelab_compiled"], sides["tunelab"]),
    }
    for name in ("hf", "trl"):
        if sides.get(name) and "skipped" not in sides[name]:
            summary[f"{name}_tokens_per_s_ratio"] = round(ours["tokens_per_s"] / timed(sides[name], cfg["warmup"])["tokens_per_s"], 3)
            summary[f"{name}_peak_mem_ratio"] = round(sides["tunelab_compiled"]["peak_mem_gib"] / sides[name]["peak_mem_gib"], 3)
    return summary


def versions() -> dict:
    import peft
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------------------------------------- driver


def run_side_in_subprocess(name: str, cfg: dict) -> dict:
    """CPU: each side in its own process, so that its peak RSS is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--side", name, "--side-config", json.dumps(cfg), "--out", out.name]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


# --lengths on CPU: the work per optimizer step of each mode (see the module docstring)
CPU_MODES = {
    "loguniform": {"examples_per_step": 16, "baseline_batch": 4, "min_len": 64, "max_len": 512,
                   "answer_fraction": 0.3, "cpu_micro_batch_tokens": 512},
    # rows of 256 as the demo's max_seq_len, micro-batches of one row as tunelab's CPU default (max_seq_len):
    # 1024-token micro-batches measured 0.57-0.88x of that here (docs/performance.md)
    "uniform": {"examples_per_step": 16, "baseline_batch": 4, "min_len": 55, "max_len": 66, "row_tokens": 256,
                "answer_fraction": 0.3, "cpu_micro_batch_tokens": 256},
}


def cpu_quick(args: argparse.Namespace, lengths: str) -> list[dict]:
    steps = args.steps or (3 if args.quick else 6)
    cfg = {"device": "cpu", "shape": None, "model": CPU_MODEL, "method": "lora", "steps": steps, "warmup": 1,
           "lengths": lengths, **CPU_MODES[lengths]}
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads lose 10x on shared cores
    sides = {}
    for name in ("tunelab", "tunelab_compiled", "hf") if args.compile else ("tunelab", "hf"):
        sides[name] = run_side_in_subprocess(name, cfg)
        print(f"{name}: done", file=sys.stderr)
    import importlib.util

    if all(importlib.util.find_spec(name) for name in ("trl", "datasets")):
        sides["trl"] = run_side_in_subprocess("trl", cfg)
        print("trl: done", file=sys.stderr)
    else:
        sides["trl"] = run_trl(cfg)  # says what is missing
    record = compare(cfg, sides)
    record["machine"] = {"load_avg_1m_at_end": os.getloadavg()[0]}
    return [record]


def _guarded(run, cfg: dict, **kwargs) -> dict:
    """One side; a failure is recorded, not raised, so the rest of the suite still runs."""
    try:
        return run(cfg, **kwargs)
    except Exception as err:
        traceback.print_exc()
        reset_memory(cfg["device"])
        return {"skipped": f"failed: {type(err).__name__}: {str(err)[:300]}"}


def gpu_suite(args: argparse.Namespace) -> list[dict]:
    """Pass 1: every configuration, baseline then tunelab (eager). Pass 2, while the time budget
    lasts: tunelab with compiled layers for the --compile-only configurations. The results file is
    rewritten after each run, so a run cut short keeps what it finished."""
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    deadline = time.perf_counter() + args.budget_s
    out = Path(args.out) if args.out else RESULTS / "train_speed_gpu.json"
    suite = [c for c in (GPU_SUITE if device == "cuda" else DRY_SUITE)
             if not args.only or f"{c[0]}:{c[1]}" in args.only.split(",")]
    records: list[dict] = []
    info = versions()

    def save() -> None:
        write({"command": f"python bench/train_speed.py --device {device} --suite gpu" + (" --compile" if args.compile else ""),
               "versions": info, "results": records}, out)

    for shape, method, per_step, baseline_batch in suite:
        if time.perf_counter() > deadline:
            print(f"skipped {shape} {method} x{per_step}: time budget spent", file=sys.stderr)
            continue
        cfg = {"device": device, "shape": shape, "method": method, "steps": args.steps or 12, "warmup": args.warmup,
               "examples_per_step": per_step, "baseline_batch": baseline_batch, "min_len": 64, "max_len": 1024,
               "answer_fraction": 1.0, "cpu_micro_batch_tokens": 1024}
        sides = {"hf": _guarded(run_hf, cfg), "tunelab": _guarded(run_tunelab, cfg), "trl": _guarded(run_trl, cfg)}
        if "skipped" in sides["tunelab"]:
            # the fast path failed on this machine: measure the portable one rather than nothing
            failed = sides["tunelab"]["skipped"]
            sides["tunelab"] = _guarded(run_tunelab, {**cfg, "attention": "mask"})
            sides["tunelab"]["varlen_failed"] = failed
        record = {"config": cfg, **sides} if any("skipped" in sides[k] for k in ("hf", "tunelab")) else compare(cfg, sides)
        records.append(record)
        save()
        mfu = record.get("tunelab", {}).get("mfu_pct")
        line = {k: record.get(k) for k in ("tokens_per_s_ratio", "peak_mem_ratio", "loss_max_abs_diff")}
        print(f"{shape} {method} x{per_step}: {line} tunelab MFU {mfu}", file=sys.stderr, flush=True)
    if args.compile:
        wanted = args.compile_only.split(",")
        order = sorted(records, key=lambda r: wanted.index(f"{r['config']['shape']}:{r['config']['method']}")
                       if f"{r['config']['shape']}:{r['config']['method']}" in wanted else len(wanted))
        for record in order:
            cfg = record["config"]
            if f"{cfg['shape']}:{cfg['method']}" not in wanted or "tokens_per_s_ratio" not in record:
                continue
            if time.perf_counter() > deadline:
                print(f"skipped compiling {cfg['shape']} {cfg['method']}: time budget spent", file=sys.stderr)
                continue
            compiled = _guarded(run_tunelab, cfg, compile_layers=True)
            if "skipped" not in compiled:
                compiled.update(timed(compiled, cfg["warmup"]))
                compiled["tokens_per_s_ratio"] = round(compiled["tokens_per_s"] / record["hf"]["tokens_per_s"], 3)
                compiled["loss_max_abs_diff"] = loss_max_abs_diff(compiled, record["hf"])
                compiled.pop("step_end_s")
                print(f"{cfg['shape']} {cfg['method']} x{cfg['examples_per_step']} compiled: "
                      f"{compiled['tokens_per_s_ratio']}x, MFU {compiled['mfu_pct']:.1f}%, "
                      f"warm-up {compiled['warmup_s']:.0f} s", file=sys.stderr, flush=True)
            record["tunelab_compiled"] = compiled
            save()
    return records


def write(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--suite", choices=["cpu", "gpu"], default=None,
                        help="default: cpu on --device cpu, gpu on cuda; --suite gpu --device cpu is a dry run on a tiny shape")
    parser.add_argument("--quick", action="store_true", help="CPU: 3 optimizer steps a side (1 warm-up)")
    parser.add_argument("--lengths", choices=["loguniform", "uniform", "both"], default="both",
                        help="CPU: example lengths log-uniform 64..512, uniform 55..66 (short chat data), or both runs")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps a side (CPU 6 or 3 with --quick; GPU 12)")
    parser.add_argument("--warmup", type=int, default=3, help="GPU: untimed first steps")
    parser.add_argument("--compile", action="store_true", help="also time tunelab with train.compile=true (on CPU: "
                        "in its own process, its steady speed, the compiling's extra seconds and when it pays back)")
    parser.add_argument("--compile-only", default="llama3.2-1b:lora,smollm2-360m:lora,llama3.2-1b:full,smollm2-135m:lora",
                        help="GPU: the shape:method configurations to time compiled, in this order")
    parser.add_argument("--only", default="", help="GPU: comma-separated shape:method to run (default all)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="GPU: start no configuration after this many seconds")
    parser.add_argument("--out", default=None, help="the JSON results file (default bench/results/train_speed_{cpu,gpu}.json)")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--side-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = SIDES[args.side](json.loads(args.side_config))
        Path(args.out).write_text(json.dumps(result))
        return
    suite = args.suite or ("gpu" if args.device == "cuda" else "cpu")
    if suite == "cpu":
        records = []
        for lengths in (["loguniform", "uniform"] if args.lengths == "both" else [args.lengths]):
            record = cpu_quick(args, lengths)[0]
            options = " --quick" if args.quick else ""
            options += f" --steps {args.steps}" if args.steps else ""
            options += " --compile" if args.compile else ""
            record["command"] = f"python bench/train_speed.py --device cpu{options} --lengths {lengths}"
            record["versions"] = versions()
            name = "train_speed_cpu.json" if lengths == "loguniform" else "train_speed_cpu_uniform.json"
            write(record, Path(args.out).with_name(f"{Path(args.out).stem}_{lengths}.json") if args.out else RESULTS / name)
            line = {k: record.get(k) for k in ("tokens_per_s_ratio", "peak_mem_ratio", "loss_max_abs_diff",
                                               "trl_tokens_per_s_ratio", "trl_peak_mem_ratio", "compiled")}
            print(f"{lengths}: {line}", file=sys.stderr, flush=True)
            records.append(record)
    else:
        records = gpu_suite(args)
    compared = [r for r in records if "tokens_per_s_ratio" in r]
    if not compared:
        raise SystemExit("no configuration produced a comparison")
    summary = {
        "tokens_per_s_ratio": min(r["tokens_per_s_ratio"] for r in compared),
        "peak_mem_ratio": max(r["peak_mem_ratio"] for r in compared),
        "loss_max_abs_diff": max(r["loss_max_abs_diff"] for r in compared),
        "configurations": len(compared),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
