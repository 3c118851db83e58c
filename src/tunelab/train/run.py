"""`tunelab train`: recipe -> run directory (docs/run-directory.md).

Reads the recipe and the user's data (through tunelab.data.prepare); writes under runs/<name>/:
recipe.yaml (every default written out), manifest.json (versions, seed, git sha, data fingerprint,
tokenizer and chat template sha256), data/ (the data stage), train/plan.json (train/plan.py),
train/log.jsonl + train/tb/ and checkpoints/step-N/ (train/loop.py), then the best weights as
adapter/ (PEFT format, LoRA family) or model/ (a transformers folder with its tokenizer, full
fine-tuning), and train/summary.json.

`resume=True` continues from the newest complete, verified checkpoint and reproduces the loss curve
of an uninterrupted run. Under torchrun (tunelab.train.distributed) rank 0 writes every file
(under train.distributed: fsdp every rank also writes its checkpoint shards).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import random
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import Recipe, TrainConfig, load_recipe
from tunelab.console import say
from tunelab.contract import Manifest, TrainPlan, TrainSummary
from tunelab.errors import ConfigError
from tunelab.files import FolderBusy, hold_dir_lock, replace_dir
from tunelab.runs import RunPaths

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from tunelab.data.pack import Step
    from tunelab.train.checkpoint import Checkpoint, TrainState
    from tunelab.train.distributed import DistContext
    from tunelab.train.loop import EvalSets, LoopResult
    from tunelab.train.plan import DataPlan, Throughput
    from tunelab.train.setup import TrainSetup


@dataclass
class TrainResult:
    run_dir: Path
    output_dir: Path  # adapter/ or model/
    steps: int
    best_step: int | None
    best_val_loss: float | None
    stopped_early: bool
    tokens: int
    train_time_s: float
    method: str
    trainable_params: int
    total_params: int
    model: nn.Module | None = field(default=None, repr=False)  # in memory, holding the saved weights


# ----------------------------------------------------------------------------------------------
# run directory


def _recipe_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return found


def _written_by_tunelab(paths: RunPaths) -> bool:
    """An empty folder, or one that tunelab started (its recipe, stages, manifest — update and rebase
    write it first, with the parent — or prepared data)."""
    return (not any(paths.root.iterdir()) or paths.recipe.is_file() or paths.stages.is_file()
            or paths.manifest.is_file() or paths.data_fingerprint.is_file())


def start_run_dir(paths: RunPaths, recipe: Recipe, resume: bool) -> None:
    """Create runs/<name>/ and write recipe.yaml; refuse to mix two trainings in one folder."""
    started = paths.train_log.exists() or any(paths.checkpoints.glob("step-*"))
    if resume and paths.recipe.is_file():
        old = load_recipe(paths.recipe).model_dump(mode="json")
        changed = _recipe_differences(old, recipe.model_dump(mode="json"))
        if changed:
            raise ConfigError(
                f"{paths.recipe}: --resume needs the recipe the run started with; changed: {', '.join(changed)}. "
                f"Undo the change, or start a new run with name=NEW"
            )
    elif started and not resume:
        raise ConfigError(
            f"{paths.root} already holds a training run; continue it with --resume, or start a new one with name=NEW"
        )
    if paths.root.is_dir() and not _written_by_tunelab(paths):
        # training writes adapter/, model/ and checkpoints/ here: never into a folder of the user's
        raise ConfigError(f"{paths.root} exists and holds files tunelab did not write; choose another name=NEW "
                          "or out_dir=DIR")
    paths.root.mkdir(parents=True, exist_ok=True)
    try:  # one writer per run: a second --resume (or update, rebase, UI start) of it is refused, not mixed in
        hold_dir_lock(paths.root)
    except FolderBusy:
        raise ConfigError(f"{paths.root}: another tunelab process is writing this run; wait for it to end, or stop "
                          "it (Ctrl-C checkpoints a training), then --resume") from None
    paths.recipe.write_text(recipe.to_yaml(), encoding="utf-8")


def _git_sha() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    from tunelab.data.prepare import tokenizer_sha256

    template = (tokenizer.chat_template or "").encode("utf-8", "surrogatepass")
    return {"tokenizer_sha256": tokenizer_sha256(tokenizer), "chat_template_sha256": hashlib.sha256(template).hexdigest()}


def write_manifest(paths: RunPaths, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, data_dir: Path | None) -> None:
    """manifest.json: what produced this run. Keys other stages added are kept."""
    import peft
    import torch
    import transformers

    import tunelab

    manifest = Manifest.read_keys(paths.manifest)
    fingerprint = None
    if data_dir is not None and (data_dir / "fingerprint.json").is_file():
        fingerprint = json.loads((data_dir / "fingerprint.json").read_text())
    manifest.update({
        "tunelab": tunelab.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "git_sha": _git_sha(),
        "model": recipe.model.name, "method": recipe.method, "seed": recipe.train.seed, "data_seed": recipe.data.seed,
        "data_fingerprint": fingerprint, **tokenizer_fingerprint(tokenizer),
    })
    Manifest.model_validate(manifest).write(paths.manifest)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if not isinstance(value, list) else ",".join(map(str, value))
    return out


# ----------------------------------------------------------------------------------------------
# output


def save_output(
    setup: TrainSetup, tokenizer: PreTrainedTokenizerBase, paths: RunPaths, state_dict: dict[str, Any] | None = None
) -> Path:
    """adapter/ for the LoRA family (peft.PeftModel.from_pretrained loads it), model/ for full
    fine-tuning (AutoModelForCausalLM.from_pretrained loads it; the tokenizer is saved with it).
    `state_dict`: the full weights to write instead of the model's own (FSDP: gathered from the shards)."""
    from tunelab.train.setup import ADAPTER_METHODS

    model = setup.model
    if setup.method in ADAPTER_METHODS:
        replace_dir(lambda d: model.save_pretrained(str(d)), paths.adapter)
        return paths.adapter

    def build(folder: Path) -> None:
        # generation should use the KV cache the training run turned off
        model.config.use_cache = True
        try:
            model.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)
        finally:
            model.config.use_cache = False
        tokenizer.save_pretrained(str(folder))

    replace_dir(build, paths.model)
    return paths.model


# ----------------------------------------------------------------------------------------------
# training


def _row_tokens(recipe: Recipe, lengths: Sequence[int]) -> int:
    cfg = recipe.train
    micro = cfg.micro_batch_tokens or recipe.data.max_seq_len
    longest = max(lengths, default=1)
    return min(max(recipe.data.max_seq_len, longest), micro)


def _attention_description(setup: TrainSetup) -> str:
    if setup.attention != "varlen":
        return "a block-diagonal attention mask"
    import torch

    from tunelab.train.attention import kernel_name

    return f"variable-length attention ({kernel_name(setup.device, setup.autocast_dtype or torch.float32)})"


def _eval_set(examples: Sequence[dict[str, Any]], recipe: Recipe, row_tokens: int) -> Any:
    from tunelab.data.pack import example_length, group_micro_batches, pack_rows
    from tunelab.train.loop import EvalSet

    lengths = [example_length(e) for e in examples]
    rows = pack_rows(lengths, max(row_tokens, max(lengths)))
    row_lengths = [sum(lengths[i] for i in row) for row in rows]
    micro = recipe.train.micro_batch_tokens or recipe.data.max_seq_len
    return EvalSet(examples, group_micro_batches(rows, row_lengths, max(micro, max(row_lengths))))


def _agreed_min(ctx: DistContext, value: int, device: Any) -> int:
    """Under torchrun every rank measured its own speed: all take the smallest answer."""
    if ctx.world_size == 1:
        return value
    import torch

    return -int(ctx.all_reduce_max(torch.tensor(float(-value), device=device)).item())


def _fit_plan(
    recipe: Recipe, wanted: DataPlan, plan: Sequence[Step], setup: TrainSetup, train_examples: Sequence[dict[str, Any]],
    valid_examples: Sequence[dict[str, Any]], pad_id: int, ctx: DistContext, budget_started: float,
    throughput: Throughput | None = None, shrunk_from: float | None = None,
) -> TrainPlan:
    """The plan of a new run: the data's wish (`wanted`, `plan`), cut to the steps that fit the
    budget at the speed measured here (or `throughput`, measured already), with the evaluation
    intervals and sizes that go with it. `shrunk_from`: the examples a step the budget made smaller."""
    from tunelab.train.plan import (
        auto_eval_examples,
        budget_binds,
        describe,
        eval_interval,
        measure_throughput,
        steps_that_fit,
    )

    cfg = recipe.train
    budget_s = cfg.budget_s(setup.device.type) if budget_binds(cfg) else None
    mean_tokens = wanted.tokens / max(1, wanted.examples)
    steps, estimated_s = len(plan), None
    limited_by = "max_steps" if cfg.max_steps is not None else "data"
    eval_examples = auto_eval_examples(cfg, None, None, mean_tokens)
    if budget_s is not None:
        throughput = throughput or measure_throughput(setup, train_examples, plan, pad_id)
        available_s = budget_s - (time.monotonic() - budget_started)
        eval_examples = _agreed_min(ctx, auto_eval_examples(cfg, available_s, throughput, mean_tokens), setup.device)
        n_valid = min(eval_examples, len(valid_examples))
        eval_tokens = sum(len(e["input_ids"]) for e in valid_examples[:n_valid]) + round(n_valid * mean_tokens)
        fit, estimated_s = steps_that_fit(plan, available_s, throughput, eval_tokens, has_eval=n_valid > 0)
        fit = _agreed_min(ctx, fit, setup.device)
        if fit < len(plan):
            steps, limited_by = fit, "budget"
    eval_every, checkpoint_every = eval_interval(cfg, steps)
    # evaluations sized to the training that will run (the budget's size above is an upper bound)
    sized = auto_eval_examples(cfg, None, throughput, mean_tokens, sum(s.tokens for s in plan[:steps]),
                               math.ceil(steps / eval_every))
    eval_examples = _agreed_min(ctx, min(eval_examples, sized), setup.device)
    first_epoch = [s for s in plan if s.epoch == 0]
    steps_per_epoch = max(1, round(len(first_epoch) / max(1e-9, first_epoch[-1].progress)))
    last = plan[steps - 1]
    planned = TrainPlan(
        examples=wanted.examples, tokens=wanted.tokens, examples_per_step=round(wanted.examples_per_step, 1),
        tokens_per_step=wanted.tokens_per_step, epochs=round(last.epoch + last.progress, 4),
        epochs_target=wanted.epochs, max_steps=cfg.max_steps, steps=steps, steps_per_epoch=steps_per_epoch,
        eval_every_steps=eval_every, checkpoint_every_steps=checkpoint_every, eval_max_examples=eval_examples,
        budget=None if budget_s is None else cfg.budget, budget_s=budget_s, device=setup.device.type,
        train_tokens_per_s=None if throughput is None else round(throughput.train_tokens_per_s, 1),
        eval_tokens_per_s=None if throughput is None else round(throughput.eval_tokens_per_s, 1),
        estimated_s=None if estimated_s is None else round(estimated_s, 1), limited_by=limited_by,
        sources=wanted.sources, reason="", examples_per_step_before_budget=shrunk_from,
    )
    planned.reason = describe(planned)
    return planned


def _with_compiled(planned: TrainPlan, compiled: bool) -> TrainPlan:
    """The plan saying whether the layers were compiled (a saved plan of a resumed run included)."""
    from tunelab.train.plan import describe

    planned = planned.model_copy(update={"compiled": compiled})
    planned.reason = describe(planned)
    return planned


def _with_replay(planned: TrainPlan, paths: RunPaths, anchor: dict[str, Any] | None = None) -> TrainPlan:
    """The replay share the data stage applied, and why (data/stats.json "replay"), in the plan, with the
    KL anchor on its rows (train/anchor.py) when there is one."""
    try:
        replay = json.loads(paths.data_stats.read_text(encoding="utf-8")).get("replay")
    except (OSError, ValueError):
        return planned
    return planned.model_copy(update={"replay": {**replay, "anchor": anchor}}) if replay else planned


def _more_epochs(recipe: Recipe, planned: TrainPlan, budget_started: float) -> float | None:
    """More passes when auto passes end well inside an automatic or set budget, else None."""
    from tunelab.train.plan import more_epochs_for_budget

    cfg = recipe.train
    if (cfg.epochs != "auto" or cfg.max_steps is not None or planned.budget_s is None or planned.limited_by != "data"
            or planned.estimated_s is None or not planned.epochs_target):
        return None
    available_s = planned.budget_s - (time.monotonic() - budget_started)
    return more_epochs_for_budget(planned.epochs_target, planned.estimated_s, available_s)


def _smaller_step(recipe: Recipe, packing: _Packing, steps: Sequence[Step], planned: TrainPlan) -> int | None:
    """Examples a step that give the budget's tokens more updates, or None (the step stays)."""
    from tunelab.train.plan import smaller_step_for_budget

    if planned.limited_by != "budget" or recipe.train.tokens_per_step != "auto":
        return None
    mean_tokens = packing.wanted.tokens / max(1, packing.wanted.examples)
    return smaller_step_for_budget(steps, planned.steps, mean_tokens, packing.wanted.examples_per_step)


def _last_evaluation_s(planned: TrainPlan, has_valid: bool) -> float:
    """Time to keep free at the end of a budget: the final evaluation and saving the output."""
    if not has_valid or not planned.eval_tokens_per_s:
        return 5.0
    tokens = 2 * planned.eval_max_examples * planned.tokens / max(1, planned.examples)
    return tokens / planned.eval_tokens_per_s + 5.0


def train_on_examples(
    recipe: Recipe,
    paths: RunPaths,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[dict[str, Any]],
    valid_examples: Sequence[dict[str, Any]],
    *,
    resume: bool = False,
    device: str | None = None,
    ctx: DistContext | None = None,
    resume_command: str | None = None,
    on_step_end: Callable[[TrainState, TrainSetup], None] | None = None,
    progress: bool = True,
    budget_started: float | None = None,
) -> TrainResult:
    """Train on tokenized examples ({"input_ids", "labels"}) into an existing run directory.
    `train` calls this after the data stage; tests and benchmarks call it directly.
    `budget_started`: the time.monotonic() from which train.budget counts (default: now).
    `on_step_end` is called after every step (tests record parameters with it)."""
    from tunelab.train.distributed import SINGLE_PROCESS
    from tunelab.train.faults import Faults
    from tunelab.train.loop import LoopOptions, train_loop
    from tunelab.train.plan import Throughput
    from tunelab.train.setup import LrSchedule, compile_after_plan, compile_layers

    ctx = ctx or SINGLE_PROCESS
    budget_started = time.monotonic() if budget_started is None else budget_started
    if recipe.method == "dpo" or any("loss_units" in e for e in train_examples[:1]):  # preference pairs
        from tunelab.train.preference import rows_for_pairs

        recipe = rows_for_pairs(recipe, train_examples)
    faults = Faults.from_environment(ctx.rank)  # tests only (train/faults.py); nothing unless asked for

    # ---- plan the data: rows, then steps (a resumed run keeps the plan it started with)
    packing = _pack(recipe, paths, train_examples, resume)
    steps = packing.steps(recipe.train.micro_batch_tokens or recipe.data.max_seq_len)
    checkpoint = _checkpoint_to_resume(paths, ctx, resume, len(steps))

    # ---- set up the model, loss and optimizer (FSDP shards them here); one GPU probes the micro-batch size
    resolved = recipe.train.model_copy(update={"tokens_per_step": packing.tokens_per_step})
    setup, steps, layout = _set_up(recipe, resolved, packing, steps, device, ctx)
    if recipe.method == "dpo":  # the preference loss and batches; the reference's log-probs, once (train/preference.py)
        from tunelab.train.preference import attach_reference, preference_setup

        preference_setup(setup, recipe.dpo)
        attach_reference(setup, recipe, paths.root, (train_examples, valid_examples), tokenizer.pad_token_id, ctx.is_main)
    from tunelab.train.anchor import attach_anchor  # the KL anchor's base targets on replay rows, once

    anchor = attach_anchor(setup, recipe, train_examples, tokenizer.pad_token_id)

    # ---- fit the budget: measure this machine's speed on the first micro-batches, keep the steps that fit
    planned = packing.saved or _fit_plan(
        recipe, packing.wanted, steps, setup, train_examples, valid_examples, tokenizer.pad_token_id, ctx, budget_started
    )
    smaller = None if packing.saved else _smaller_step(recipe, packing, steps, planned)
    if smaller is not None:
        # the budget lets few steps run: the same tokens in more, smaller steps (the speed is per token)
        shrunk_from = packing.wanted.examples_per_step
        packing = _pack(recipe, paths, train_examples, resume, examples_per_step=smaller)
        steps = packing.steps(*layout)
        planned = _fit_plan(
            recipe, packing.wanted, steps, setup, train_examples, valid_examples, tokenizer.pad_token_id, ctx,
            budget_started, Throughput(planned.train_tokens_per_s, planned.eval_tokens_per_s), shrunk_from,
        )
        resolved = resolved.model_copy(update={"tokens_per_step": packing.tokens_per_step})
    more = None if packing.saved or ctx.world_size > 1 else _more_epochs(recipe, planned, budget_started)
    if more is not None:
        # the data's passes take under half the budget: more passes (early stopping keeps the best step)
        before = planned.epochs_target
        packing = _pack(recipe, paths, train_examples, resume, examples_per_step=smaller, epochs=more)
        steps = packing.steps(*layout)
        planned = _fit_plan(
            recipe, packing.wanted, steps, setup, train_examples, valid_examples, tokenizer.pad_token_id, ctx,
            budget_started, Throughput(planned.train_tokens_per_s, planned.eval_tokens_per_s),
            planned.examples_per_step_before_budget,
        ).model_copy(update={"epochs_before_budget": before})
    tokens = sum(s.tokens for s in steps[: planned.steps])
    if ctx.world_size == 1 and compile_after_plan(recipe.train.compile, setup.device, tokens):
        # a CPU run long enough to pay the compile back: compile, then measure and fit again (the
        # compiling is time the budget already spent). Not under torchrun: compiling layers that
        # FSDP already sharded was not tested on CPU.
        compile_layers(setup.model)
        setup.compiled = True
        if not packing.saved:
            planned = _fit_plan(recipe, packing.wanted, steps, setup, train_examples, valid_examples,
                                tokenizer.pad_token_id, ctx, budget_started, None, planned.examples_per_step_before_budget)
    planned = _with_compiled(planned, setup.compiled)
    steps = steps[: planned.steps]
    setup.schedule = LrSchedule.from_config(resolved, len(steps))  # the schedule ends where the run does
    run_cfg = resolved.model_copy(update={
        "eval_every_steps": planned.eval_every_steps, "checkpoint_every_steps": planned.checkpoint_every_steps,
        "eval_max_examples": planned.eval_max_examples,
    })
    if ctx.is_main:
        planned = _with_replay(planned, paths, anchor)
        planned.write(paths.plan)
        say(f"plan: {planned.reason}")
    deadline = None
    if planned.budget_s is not None and packing.saved is None:
        # a hard stop in case the machine slows down: the budget less the last evaluation's time
        deadline = budget_started + planned.budget_s - _last_evaluation_s(planned, bool(valid_examples))

    # ---- evaluation sets, then the loop
    evals = _eval_sets(recipe, run_cfg, train_examples, valid_examples, packing.row_tokens)
    if ctx.is_main:
        say(
            f"{recipe.method}: {setup.trainable_params:,} of {setup.total_params:,} parameters trainable; "
            f"{len(train_examples)} examples in {len(packing.rows)} rows, {len(steps)} steps of <= "
            f"{packing.tokens_per_step} tokens; packed examples kept apart by {_attention_description(setup)}"
        )
    options = LoopOptions(
        resume_command=resume_command or f"tunelab train {paths.recipe} --resume",
        params=_flat(recipe.model_dump(mode="json")), progress=progress, deadline=deadline,
        on_step_end=faults.install(setup, checkpoint.step if checkpoint else 0, on_step_end),
    )
    result = train_loop(setup, train_examples, steps, run_cfg, paths.root, pad_id=tokenizer.pad_token_id,
                        evals=evals, resume=checkpoint, ctx=ctx, options=options)

    # ---- save the output (the best checkpoint's weights) and train/summary.json
    output_dir = _save_run(recipe, paths, tokenizer, setup, result, len(steps), budget_started, ctx)
    faults.dump(setup.model, ctx.rank)
    state = result.state
    return TrainResult(
        run_dir=paths.root, output_dir=output_dir, steps=state.step, best_step=state.best_step,
        best_val_loss=state.best_val_loss, stopped_early=state.stopped_early, tokens=state.tokens,
        train_time_s=state.train_time_s, method=recipe.method, trainable_params=setup.trainable_params,
        total_params=setup.total_params, model=setup.model,
    )


@dataclass
class _Packing:
    """The train examples packed into rows (data/pack.py), and how the rows are cut into steps."""

    examples: Sequence[dict[str, Any]]
    rows: list[tuple[int, ...]]
    row_tokens: int
    tokens_per_step: int
    epochs: float
    max_steps: int | None
    seed: int
    wanted: DataPlan  # what the data alone asks for (train/plan.py)
    saved: TrainPlan | None  # a resumed run's train/plan.json

    def steps(self, micro_batch_tokens: int, padded: bool = True) -> list[Step]:
        from tunelab.data.pack import plan_steps

        return plan_steps(
            self.examples, self.rows, tokens_per_step=self.tokens_per_step, micro_batch_tokens=micro_batch_tokens,
            epochs=self.epochs, seed=self.seed, max_steps=self.max_steps, padded=padded,
        )


def _pack(recipe: Recipe, paths: RunPaths, train_examples: Sequence[dict[str, Any]], resume: bool,
          examples_per_step: int | None = None, epochs: float | None = None) -> _Packing:
    """`examples_per_step`, `epochs`: replace the data's choice (the budget asked for smaller
    steps, or had room for more passes)."""
    from tunelab.data.pack import example_length, pack_rows, single_rows
    from tunelab.train.plan import plan_from_data

    cfg = recipe.train
    lengths = [example_length(e) for e in train_examples]
    # a resumed run keeps the plan it started with (its checkpoints count those steps)
    saved = TrainPlan.from_file(paths.plan) if resume and paths.plan.is_file() else None
    wanted = plan_from_data(lengths, cfg, examples_per_step, epochs)
    tokens_per_step = saved.tokens_per_step if saved else wanted.tokens_per_step
    # a row never holds more than a step: steps keep the planned number of examples
    row_tokens = min(_row_tokens(recipe, lengths), max(max(lengths, default=1), tokens_per_step))
    rows = pack_rows(lengths, row_tokens) if cfg.packing else single_rows(len(lengths))
    if saved:
        epochs, max_steps = saved.epochs_target or math.inf, saved.steps
    else:
        epochs, max_steps = wanted.epochs or math.inf, cfg.max_steps
    return _Packing(train_examples, rows, row_tokens, tokens_per_step, epochs, max_steps, cfg.seed, wanted, saved)


def _checkpoint_to_resume(paths: RunPaths, ctx: DistContext, resume: bool, planned_steps: int) -> Checkpoint | None:
    """With `resume`, the newest complete, verified checkpoint (None: start from step 0). Removes
    the temporary folders of checkpoints an earlier run did not finish writing."""
    from tunelab.train.checkpoint import find_resumable, load_checkpoint, remove_temporary

    checkpoint = None
    if resume:
        path, skipped = find_resumable(paths.checkpoints)
        tell = say if ctx.is_main else lambda _message: None
        for line in skipped:
            tell(line)
        if path is None:
            tell(f"no complete checkpoint in {paths.checkpoints}; starting from step 0")
        else:
            checkpoint = load_checkpoint(path)
            tell(f"resuming from {path} (step {checkpoint.step} of {planned_steps})")
    if ctx.is_main:  # one remover: two ranks deleting the same folder would race
        remove_temporary(paths.checkpoints)
    return checkpoint


def _set_up(
    recipe: Recipe, resolved: TrainConfig, packing: _Packing, steps: list[Step], device: str | None, ctx: DistContext
) -> tuple[TrainSetup, list[Step], tuple[int, bool]]:
    """setup_training with the resolved train config; FSDP loads the model on the CPU and shards it
    onto the GPUs (ctx.prepare). On one GPU without train.micro_batch_tokens the micro-batch size is
    probed: the steps stay the same (cut by tokens_per_step), only their micro-batches change.
    Returns the setup, the steps and their micro-batch layout (tokens a pass, padded or not)."""
    from tunelab.train.setup import setup_training

    setup = setup_training(recipe.model_copy(update={"train": resolved}), len(steps), "cpu" if ctx.lockstep else device)
    ctx.prepare(setup, recipe)
    layout = (recipe.train.micro_batch_tokens or recipe.data.max_seq_len, True)
    if recipe.train.micro_batch_tokens is None and setup.device.type == "cuda" and ctx.world_size == 1:
        from tunelab.train.memory import auto_micro_batch_tokens

        micro, tried = auto_micro_batch_tokens(setup, packing.tokens_per_step, packing.row_tokens)
        layout = (micro, setup.attention != "varlen")
        steps = packing.steps(*layout)
        say(f"micro-batch: {micro} tokens a forward pass (probed: {', '.join(str(t['micro_batch_tokens']) for t in tried)})")
    return setup, steps, layout


def _eval_sets(
    recipe: Recipe, run_cfg: TrainConfig, train_examples: Sequence[dict[str, Any]],
    valid_examples: Sequence[dict[str, Any]], row_tokens: int,
) -> EvalSets | None:
    """The validation set and a fixed, seeded sample of the train set, both cut to
    eval_max_examples; None without validation examples."""
    from tunelab.train.loop import EvalSets

    if not valid_examples:
        return None
    sample_size = min(run_cfg.eval_max_examples, len(train_examples))
    sample_ids = sorted(random.Random(run_cfg.seed).sample(range(len(train_examples)), sample_size))
    return EvalSets(
        valid=_eval_set(valid_examples[: run_cfg.eval_max_examples], recipe, row_tokens),
        train_sample=_eval_set([train_examples[i] for i in sample_ids], recipe, row_tokens),
    )


def _save_run(
    recipe: Recipe, paths: RunPaths, tokenizer: PreTrainedTokenizerBase, setup: TrainSetup, result: LoopResult,
    planned_steps: int, budget_started: float, ctx: DistContext,
) -> Path:
    """The run's output is the best checkpoint (by validation loss), else the last weights; then
    train/summary.json. Returns the output folder (adapter/ or model/)."""
    from tunelab.train.loop import check_weights_finite

    state = result.state
    if result.best_checkpoint is not None and state.best_step != state.step:
        ctx.load_weights(setup, result.best_checkpoint)
    check_weights_finite(setup, ctx, state.best_step if state.best_step is not None else state.step)
    output_dir = paths.adapter if recipe.method != "full" else paths.model
    full_weights = ctx.full_state_dict(setup)
    if ctx.is_main:
        output_dir = save_output(setup, tokenizer, paths, full_weights)
        summary = TrainSummary(
            steps=state.step, best_step=state.best_step, best_val_loss=state.best_val_loss,
            stopped_early=state.stopped_early, tokens=state.tokens, trainable_tokens=state.trainable_tokens,
            train_time_s=round(state.train_time_s, 3), method=recipe.method, trainable_params=setup.trainable_params,
            total_params=setup.total_params, output=output_dir.name,
            output_step=state.best_step if state.best_step is not None else state.step, planned_steps=planned_steps,
            budget_reached=bool(state.extra.get("budget_reached")),
            wall_time_s=round(time.monotonic() - budget_started, 3),
        )
        summary.write(paths.train_summary)
        say(f"trained {state.step} steps; {output_dir} holds the weights of step {summary.output_step}")
    ctx.barrier()
    return output_dir


def replay_file_for(recipe: Recipe) -> Path | None:
    """The general examples mixed into training (data/replay.py): train.replay, else the base model's own
    answers (generated once per model); None with train.replay_share 0 and for preference tuning (replay
    examples are supervised answers). `tunelab run`'s prepare stage calls it too, so the train stage finds
    the data prepared."""
    from tunelab.train.self_replay import build_self_replay

    if recipe.train.replay_share == 0 or recipe.method == "dpo":
        return None
    if recipe.train.replay:
        path = Path(recipe.train.replay)
        if not path.is_file():
            raise ConfigError(f"train.replay: {path}: file not found")
        return path
    return build_self_replay(recipe.model)


def train(
    recipe: Recipe, resume: bool = False, *, resume_command: str | None = None, device: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Data stage, then training, into runs/<name>/ (see the module docstring). Under torchrun rank 0
    prepares the run directory and the data while the other ranks wait, then every rank trains."""
    from tunelab.data.prepare import PreparedData, prepare_data
    from tunelab.models import load_tokenizer
    from tunelab.train.distributed import (
        ProcessGroupContext,
        init_distributed,
        main_first,
        resolve_strategy,
        shutdown,
        with_strategy,
    )

    budget_started = time.monotonic()  # train.budget counts the whole stage, loading included
    ctx = init_distributed()
    try:
        ctx = with_strategy(ctx, resolve_strategy(recipe.train.distributed, recipe.method, ctx.world_size))
        if isinstance(ctx, ProcessGroupContext):
            device = device or ctx.device()
        paths = RunPaths(recipe.run_dir)

        def prepare() -> tuple[PreTrainedTokenizerBase, PreparedData, float]:
            start_run_dir(paths, recipe, resume)
            tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
            replay_started = time.monotonic()
            replay_file = replay_file_for(recipe)
            replay_s = time.monotonic() - replay_started  # the base model answering, once per model: not training
            prepared = prepare_data(recipe, tokenizer, paths.data, replay_file=replay_file)
            write_manifest(paths, recipe, tokenizer, prepared.out_dir)
            return tokenizer, prepared, replay_s

        done = main_first(ctx, prepare, "preparing the run directory and data")
        if done is None:  # another rank: read what rank 0 wrote
            tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
            prepared = PreparedData(paths.data, {})
        else:
            tokenizer, prepared, replay_s = done
            budget_started += replay_s
        return train_on_examples(
            recipe, paths, tokenizer, prepared.tokenized("train"), prepared.tokenized("valid"), resume=resume,
            device=device, ctx=ctx, resume_command=resume_command, progress=progress, budget_started=budget_started,
        )
    finally:
        shutdown(ctx)
