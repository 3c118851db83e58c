"""Everything that differs between LoRA, DoRA, QLoRA and full fine-tuning, so the loop need not know.

Reads the recipe (model, method, lora, train sections); builds the model (through tunelab.models),
wraps it with PEFT for the LoRA family, and creates the AdamW optimizer and the learning-rate
schedule. Writes nothing. Device and precision: float32 on CPU; on CUDA bfloat16 autocast, with a
bfloat16 frozen base for the LoRA family and float32 master weights for full fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.train.loss import CausalLMLoss

if TYPE_CHECKING:
    from tunelab.config import Recipe, TrainConfig
    from tunelab.data.pack import Row

ADAPTER_METHODS = ("lora", "dora", "qlora")


@dataclass(frozen=True)
class LrSchedule:
    """Linear warmup to `peak_lr`, then cosine or linear decay to `min_lr_ratio * peak_lr` at the last
    step (or constant). A pure function of the step, so resuming needs nothing but the step number."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    kind: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1

    @classmethod
    def from_config(cls, cfg: TrainConfig, total_steps: int) -> LrSchedule:
        warmup = math.ceil(cfg.warmup_ratio * total_steps)
        return cls(float(cfg.lr), total_steps, warmup, cfg.lr_schedule, cfg.min_lr_ratio)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based: the step about to be taken)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return self.peak_lr
        min_lr = self.min_lr_ratio * self.peak_lr
        # the decay ends ON the last step (index total_steps - 1): the run takes its floor learning rate
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - 1 - self.warmup_steps))
        if self.kind == "linear":
            return self.peak_lr - (self.peak_lr - min_lr) * progress
        return min_lr + (self.peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainSetup:
    """The trained model, its loss module, optimizer and schedule, and where and how it runs."""

    model: nn.Module  # a peft.PeftModel for the LoRA family, the transformers model for full
    loss_module: CausalLMLoss
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    device: torch.device
    autocast_dtype: torch.dtype | None  # bfloat16 on CUDA; None: run in the parameters' dtype
    method: str
    trainable_params: int
    total_params: int
    attention: str = "mask"  # how packed examples are kept apart: "varlen" (train/attention.py) or "mask"
    compiled: bool = False  # decoder layers compiled (compile_layers)
    # (examples, pad_id) -> (rows -> micro-batch) for a loss_module that is not CausalLMLoss's
    # (preference tuning, train/preference.py); None: the packed rows of data/pack.py
    make_batches: Callable[[Sequence[dict[str, Any]], int], Callable[[Sequence[Row]], Any]] | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: every trainable tensor by name (the adapter, or the whole model).
        Tied weights appear once (named_parameters drops duplicates)."""
        return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise TunelabError(
                f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                "was it written by a different recipe (method, lora, model)?"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name])


def resolve_device(device: str | None = None) -> torch.device:
    from tunelab.models import default_device

    return torch.device(device or default_device())


def _load_4bit(recipe: Recipe, device: torch.device) -> nn.Module:
    """QLoRA base: 4-bit NF4 weights through bitsandbytes (CUDA only). tunelab.models.load_model has
    no quantization option, so this resolves the reference there and loads it here."""
    if device.type != "cuda":
        raise ConfigError(
            "method: qlora needs a CUDA GPU: its 4-bit weights run on bitsandbytes CUDA kernels only. "
            "On this machine use method=lora (the same adapters on a float32 base; small models fit easily)."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("method: qlora needs the bitsandbytes package: pip install bitsandbytes") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunelab.models import resolve_reference

    ref = resolve_reference(recipe.model.name)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        ref.path, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": device.index or 0},
        revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code, use_safetensors=True,
    )
    model.config.use_cache = False
    return model


def build_model(recipe: Recipe, device: torch.device, base: nn.Module | None = None) -> tuple[nn.Module, torch.dtype | None]:
    """The model to train, in training mode, and the autocast dtype to run it under (or None).
    `base` (benchmarks): an already built transformers model to use instead of loading recipe.model."""
    from tunelab.models import load_model

    method = recipe.method
    on_gpu = device.type == "cuda"
    autocast = torch.bfloat16 if on_gpu and recipe.model.dtype in ("auto", "bfloat16") else None
    if base is None and method == "qlora":
        base = _load_4bit(recipe, device)
    elif base is None:
        # full fine-tuning keeps float32 master weights on GPU (bf16 AdamW updates lose small steps);
        # the frozen base of LoRA can live in bf16
        dtype = "float32" if (on_gpu and method == "full" and recipe.model.dtype == "auto") else recipe.model.dtype
        base = load_model(
            recipe.model.name, dtype=dtype, device=str(device), revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    cfg = recipe.train
    if cfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method in ADAPTER_METHODS:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
        targets: Any = recipe.lora.targets
        lora = LoraConfig(
            r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
            target_modules=targets, use_dora=method == "dora", bias="none", task_type="CAUSAL_LM",
        )
        # LoRA's initial A matrices come from the global generator: seed it so runs repeat
        torch.manual_seed(cfg.seed)
        try:
            model = get_peft_model(base, lora)
        except ValueError as err:
            raise ConfigError(f"lora.targets: {err}") from None
        if recipe.model.adapter:
            from tunelab.engine.adapter import load_adapter_weights

            load_adapter_weights(model, recipe.model.adapter, recipe)
    else:
        if recipe.model.adapter:
            raise ConfigError("model.adapter: only the LoRA family (lora, dora, qlora) starts from an adapter; "
                              "for method full set model.name to the parent run's model/ folder")
        model = base
        for param in model.parameters():
            param.requires_grad_(True)
    model.train()
    return model, autocast


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not norms or biases); the fused kernel (CUDA and CPU)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=float(cfg.lr), betas=(0.9, 0.999), eps=1e-8, fused=True)


def resolve_attention(choice: str, device: torch.device, autocast: torch.dtype | None, packing: bool) -> str:
    """train.attention -> "varlen" | "mask". auto: varlen where its fast kernel runs (CUDA, bf16), the
    masked padded rows elsewhere (on CPU varlen runs a per-example reference, correct but no faster)."""
    if choice != "auto":
        return choice
    from tunelab.train.attention import kernel_name

    fast = kernel_name(device, autocast or torch.float32) == "flash-varlen"
    return "varlen" if packing and fast else "mask"


# Measured on an H200 (bench/results/train_speed_gpu.json): compiling costs 7-84 s and makes steps
# 1.26-1.84x faster; at ~10k tokens/s eager this many tokens take ~400 s, of which it saves 80-180 s.
COMPILE_MIN_TOKENS = 4_000_000
# Measured on 2 CPU cores (docs/performance.md, "Compiled layers on CPU"): inductor's C++ kernels fuse
# the norms, activations, rotary embeddings and LoRA additions; steps 1.14-1.39x faster on short chat
# data, ~25 s to compile with an empty cache. At ~170 tokens/s eager this many tokens take ~5 min,
# of which compiling saves about a minute.
COMPILE_MIN_TOKENS_CPU = 50_000
# The same in time: a plan that trains this long pays the compile back whatever its tokens. The budget cuts a
# CPU run's tokens to what fits in it, so a budget-bound plan at a slow speed (the demo: 41k tokens, 6 min at
# 109 tokens/s) trained eager for the whole budget; 1.14x faster steps save 0.12 x 300 s = 37 s for ~25 s of compiling.
COMPILE_MIN_SECONDS_CPU = 300.0


def should_compile(choice: bool | str, device: torch.device, planned_tokens: int) -> bool:
    """At setup: train.compile true/false as set; auto = on a GPU when the run is long enough to pay
    the compile back. On a CPU, auto waits for the plan (compile_after_plan): the budget there
    decides how much of the data a run trains on."""
    if choice != "auto":
        return bool(choice)
    return device.type == "cuda" and planned_tokens >= COMPILE_MIN_TOKENS


def compile_after_plan(choice: bool | str, device: torch.device, planned_tokens: int,
                       planned_seconds: float = 0.0) -> bool:
    """train.compile auto on a CPU, once the plan is known: compile when its tokens, or its training time
    at the measured speed, pay the compile back and inductor can build its C++ kernels here (a compiler
    is installed)."""
    long_enough = planned_tokens >= COMPILE_MIN_TOKENS_CPU or planned_seconds >= COMPILE_MIN_SECONDS_CPU
    return choice == "auto" and device.type == "cpu" and long_enough and compiler_works()


_COMPILER_WORKS: dict[str, bool] = {}


def compiler_works() -> bool:
    """Whether torch.compile can build a CPU kernel here (it needs a C++ compiler): one tiny function
    compiled once a process. A laptop without a compiler trains eagerly instead of failing."""
    if "cpu" not in _COMPILER_WORKS:
        try:
            double = torch.compile(lambda x: x * 2.0 + 1.0, dynamic=False)
            _COMPILER_WORKS["cpu"] = bool(torch.equal(double(torch.ones(3)), torch.full((3,), 3.0)))
        except Exception:  # any failure of the toolchain means: no compiling here
            _COMPILER_WORKS["cpu"] = False
    return _COMPILER_WORKS["cpu"]


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer in place (regional compilation): identical layers share one
    compiled graph, so compiling costs one layer's time, and parameter names (checkpoints, adapters)
    stay those of the model. Dynamic shapes: micro-batches differ in length."""
    from tunelab.train.loss import causal_lm_parts

    decoder, _ = causal_lm_parts(model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        decoder.compile(dynamic=True)
        return
    for layer in layers:
        layer.compile(dynamic=True)


def setup_training(
    recipe: Recipe, total_steps: int, device: str | torch.device | None = None, base: nn.Module | None = None
) -> TrainSetup:
    """Model, loss, optimizer and schedule for a run of `total_steps` optimizer steps. `base`: see build_model."""
    if recipe.method == "dpo":  # the setup of the weights it trains (its loss and batches: train/preference.py)
        recipe = recipe.model_copy(update={"method": recipe.dpo.weights})
    device = device if isinstance(device, torch.device) else resolve_device(device)
    model, autocast = build_model(recipe, device, base)
    loss_module = CausalLMLoss(model)
    compiled = should_compile(recipe.train.compile, device, total_steps * recipe.train.tokens_per_step)
    if compiled:
        if device.type == "cpu" and not compiler_works():
            raise ConfigError("train.compile: true, but torch.compile cannot build CPU kernels here (it needs a "
                              "C++ compiler such as g++ or clang++); install one or set train.compile=false")
        compile_layers(model)
    seen: set[int] = set()
    total = trainable = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return TrainSetup(
        model=model, loss_module=loss_module, optimizer=build_optimizer(model, recipe.train, device),
        schedule=LrSchedule.from_config(recipe.train, total_steps), device=device, autocast_dtype=autocast,
        method=recipe.method, trainable_params=trainable, total_params=total,
        attention=resolve_attention(recipe.train.attention, device, autocast, recipe.train.packing), compiled=compiled,
    )
