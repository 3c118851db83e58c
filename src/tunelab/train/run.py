"""`tunelab train`: recipe -> run directory (docs/run-directory.md).

Reads the recipe and the user's data; writes under runs/<name>/: recipe.yaml, data/ and manifest.json
(train/start.py: the run folder started, the data stage), train/plan.json (train/plan.py),
train/log.jsonl + train/tb/ and checkpoints/step-N/ (train/loop.py), then the best weights as
adapter/ (PEFT format, LoRA family) or model/ (a transformers folder with its tokenizer, full
fine-tuning), and train/summary.json.

`resume=True` continues from the newest complete, verified checkpoint and reproduces the loss curve
of an uninterrupted run. Under torchrun (tunelab.train.distributed) rank 0 writes every file
(under train.distributed: fsdp every rank also writes its checkpoint shards).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import Recipe, TrainConfig
from tunelab.console import say
from tunelab.contract import DataStats, TrainPlan, TrainSummary
from tunelab.data.pack import Row, example_length, group_micro_batches, pack_rows, plan_steps, single_rows
from tunelab.data.replay import ReplaySlices, replay_read, replay_slices
from tunelab.files import replace_dir
from tunelab.models import load_tokenizer
from tunelab.runs import RunPaths
from tunelab.train.plan import Cut, Machine, Planned, first_cut, plan_training, replay_time_s
from tunelab.train.start import StartedRun, prepare_run, start_run_dir

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from tunelab.data.pack import Step
    from tunelab.train.checkpoint import Checkpoint, TrainState
    from tunelab.train.distributed import DistContext
    from tunelab.train.loop import EvalSets, LoopOptions, LoopResult
    from tunelab.train.plan import Throughput
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


def _attention_description(setup: TrainSetup) -> str:
    if setup.attention != "varlen":
        return "a block-diagonal attention mask"
    import torch

    from tunelab.train.attention import kernel_name

    return f"variable-length attention ({kernel_name(setup.device, setup.autocast_dtype or torch.float32)})"


def _eval_set(examples: Sequence[dict[str, Any]], recipe: Recipe, row_tokens: int) -> Any:
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


@dataclass(frozen=True)
class _Examples:
    """A run's tokenized examples, packed into rows of whole examples and cut into steps (data/pack.py)."""

    recipe: Recipe  # for preference pairs: sized by rows_for_pairs
    train: Sequence[dict[str, Any]]
    valid: Sequence[dict[str, Any]]
    saved: TrainPlan | None  # a resumed run's train/plan.json: its checkpoints count those steps
    lengths: list[int]
    first: Cut  # the steps before any measurement (train/plan.py first_cut)
    first_steps: int  # how many, in micro-batches of the recipe's size
    slices: ReplaySlices | None = None  # replay spread across the passes (data/replay.py); None: all every pass
    pass_lengths: list[int] = field(default_factory=list)  # the examples one pass reads (the planner's view)

    @classmethod
    def prepare(cls, recipe: Recipe, paths: RunPaths, train_examples: Sequence[dict[str, Any]],
                valid_examples: Sequence[dict[str, Any]], resume: bool) -> _Examples:
        if recipe.method == "dpo" or any("loss_units" in e for e in train_examples[:1]):  # preference pairs
            from tunelab.train.preference import rows_for_pairs

            recipe = rows_for_pairs(recipe, train_examples)
        # a resumed run keeps the plan it started with (its checkpoints count those steps)
        saved = TrainPlan.from_file(paths.plan) if resume and paths.plan.is_file() else None
        lengths = [example_length(e) for e in train_examples]
        per_pass = (DataStats.read_keys(paths.data_stats).get("replay") or {}).get("per_pass")
        slices = replay_slices(train_examples, per_pass, recipe.train.seed)
        pass_lengths = lengths if slices is None else [lengths[i] for i in slices.examples_of_pass(0)]
        first = first_cut(pass_lengths, recipe.train, saved)
        examples = cls(recipe, train_examples, valid_examples, saved, lengths, first, 0, slices, pass_lengths)
        return replace(examples, first_steps=len(examples.steps(first, examples.default_layout())))

    def default_layout(self) -> tuple[int, bool]:
        return (self.recipe.train.micro_batch_tokens or self.recipe.data.max_seq_len, True)

    def row_tokens(self, tokens_per_step: int) -> int:
        micro = self.recipe.train.micro_batch_tokens or self.recipe.data.max_seq_len
        longest = max(self.lengths, default=1)
        # a row never holds more than a step: steps keep the planned number of examples
        return min(max(self.recipe.data.max_seq_len, longest), micro, max(longest, tokens_per_step))

    def rows(self, tokens_per_step: int) -> list[Row]:
        if not self.recipe.train.packing:
            return single_rows(len(self.lengths))
        return pack_rows(self.lengths, self.row_tokens(tokens_per_step))

    def rows_of_pass(self, tokens_per_step: int, epoch: int) -> list[Row]:
        """The rows pass `epoch` reads when replay is spread across the passes: the task's examples and
        that pass's replay slice, packed together."""
        assert self.slices is not None
        chosen = self.slices.examples_of_pass(epoch)
        if not self.recipe.train.packing:
            return [(i,) for i in chosen]
        rows = pack_rows([self.lengths[i] for i in chosen], self.row_tokens(tokens_per_step))
        return [tuple(chosen[j] for j in row) for row in rows]

    def steps(self, cut: Cut, layout: tuple[int, bool]) -> list[Step]:
        """`layout`: tokens a micro-batch, padded or not (a GPU probes it at set-up)."""
        by_pass = None if self.slices is None else (lambda epoch: self.rows_of_pass(cut.tokens_per_step, epoch))
        return plan_steps(self.train, self.rows(cut.tokens_per_step), tokens_per_step=cut.tokens_per_step,
                          micro_batch_tokens=layout[0], padded=layout[1], epochs=cut.epochs,
                          seed=self.recipe.train.seed, max_steps=cut.max_steps, rows_of_epoch=by_pass)


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
    examples: _Examples, paths: RunPaths, pad_id: int, device: str | None, ctx: DistContext,
) -> tuple[TrainSetup, tuple[int, bool]]:
    """setup_training for the data's first steps; FSDP loads the model on the CPU and shards
    it onto the GPUs (ctx.prepare). On one GPU without train.micro_batch_tokens the micro-batch size is
    probed: the steps stay the same (cut by tokens_per_step), only their micro-batches change. For
    preference pairs the preference loss and batches, and the reference's log-probs, once
    (train/preference.py). Returns the setup and the micro-batch layout (tokens a pass, padded or not)."""
    from tunelab.train.setup import setup_training

    recipe, first = examples.recipe, examples.first
    layout = examples.default_layout()
    resolved = recipe.train.model_copy(update={"tokens_per_step": first.tokens_per_step})
    setup = setup_training(recipe.model_copy(update={"train": resolved}), examples.first_steps,
                           "cpu" if ctx.lockstep else device)
    ctx.prepare(setup, recipe)
    if recipe.train.micro_batch_tokens is None and setup.device.type == "cuda" and ctx.world_size == 1:
        from tunelab.train.memory import auto_micro_batch_tokens

        micro, tried = auto_micro_batch_tokens(setup, first.tokens_per_step, examples.row_tokens(first.tokens_per_step))
        layout = (micro, setup.attention != "varlen")
        say(f"micro-batch: {micro} tokens a forward pass (probed: {', '.join(str(t['micro_batch_tokens']) for t in tried)})")
    if recipe.method == "dpo":
        from tunelab.train.preference import attach_reference, preference_setup

        preference_setup(setup, recipe.dpo)
        attach_reference(setup, recipe, paths.root, (examples.train, examples.valid), pad_id, ctx.is_main)
    return setup, layout


def _machine(setup: TrainSetup, examples: _Examples, pad_id: int, ctx: DistContext, budget_started: float) -> Machine:
    """The planner's view of this machine (train/plan.py Machine): the speed measured on the run's own
    first micro-batches, the budget's clock, the smallest answer of all ranks under torchrun, and
    compiling the layers on a CPU once the plan is long enough to pay it back."""
    from tunelab.train.setup import compile_after_plan, compile_layers

    def measure(steps: Sequence[Step]) -> Throughput:
        from tunelab.train.plan import measure_throughput  # looked up now: tests replace it

        return measure_throughput(setup, examples.train, steps, pad_id)

    def compile_if_it_pays(planned_tokens: int, planned_seconds: float = 0.0) -> bool:
        # not under torchrun: compiling layers that FSDP already sharded was not tested on CPU
        if ctx.world_size > 1 or not compile_after_plan(examples.recipe.train.compile, setup.device, planned_tokens,
                                                        planned_seconds):
            return False
        compile_layers(setup.model)
        setup.compiled = True
        return True

    return Machine(
        device=setup.device.type, measure=measure, seconds_spent=lambda: time.monotonic() - budget_started,
        agree=lambda value: _agreed_min(ctx, value, setup.device), compile=compile_if_it_pays,
        compiled=setup.compiled, more_passes=ctx.world_size == 1,
    )


def _replay_time_s(examples: _Examples, device: str, anchor: dict[str, Any] | None) -> float:
    """What an auto budget adds for this run's replay (train/plan.py replay_time_s): one pass's replay
    slice against the task's tokens, and the anchor's seconds."""
    from tunelab.train.anchor import is_replay

    replay = examples.slices.replay_of_pass(0) if examples.slices else [
        i for i, e in enumerate(examples.train) if is_replay(e)]
    replay_tokens = sum(examples.lengths[i] for i in replay)
    task_tokens = sum(n for e, n in zip(examples.train, examples.lengths, strict=True) if not is_replay(e))
    return replay_time_s(examples.recipe.train, device, task_tokens, replay_tokens, anchor["seconds"] if anchor else 0.0)


def _plan(examples: _Examples, setup: TrainSetup, layout: tuple[int, bool], paths: RunPaths, pad_id: int,
          ctx: DistContext, budget_started: float) -> tuple[Planned, float]:
    """train/plan.py's plan for this run (written to train/plan.json by rank 0), the replay share the
    data stage applied in it (data/stats.json) with the KL anchor on its rows, and the learning-rate
    schedule ending where it does; and when train.budget counts from, later by what an auto budget adds
    for replay."""
    from tunelab.train.anchor import attach_anchor, is_replay
    from tunelab.train.setup import LrSchedule

    # the KL anchor's base-model targets on the replay rows, once, before the speed is measured (train/anchor.py)
    anchor = attach_anchor(setup, examples.recipe, examples.train, pad_id)
    replay = DataStats.read_keys(paths.data_stats).get("replay") if ctx.is_main else None
    replay = {**replay, "anchor": anchor} if replay else replay
    # an auto budget adds replay's time: its share of a pass's tokens, and the anchor's targets (train/plan.py)
    added_s = 0 if examples.saved else -_agreed_min(ctx, -round(_replay_time_s(examples, setup.device.type, anchor)),
                                                      setup.device)  # the most any rank needs
    budget_started += added_s
    if replay and added_s:
        replay = {**replay, "budget_added_s": round(added_s, 1)}
    planned = plan_training(
        examples.pass_lengths, [example_length(e) for e in examples.valid], examples.recipe.train,
        lambda cut: examples.steps(cut, layout), _machine(setup, examples, pad_id, ctx, budget_started),
        examples.saved, replay,
    )
    setup.schedule = LrSchedule.from_config(examples.recipe.train, len(planned.steps))  # it ends where the run does
    if ctx.is_main and planned.plan.replay:  # how the replay pool is spread across the passes that will run
        spread = {"per_pass": examples.slices.per_pass if examples.slices else None,
                  "pool": sum(1 for e in examples.train if is_replay(e)), **replay_read(planned.steps, examples.train)}
        planned.plan.replay = {**planned.plan.replay, "spread": spread}
    if ctx.is_main:
        planned.plan.write(paths.plan)
        say(f"plan: {planned.plan.reason}")
        if added_s:
            say(f"replay: the auto budget adds {added_s:.0f} s for the replay rows and the anchor's targets")
    return planned, budget_started


def _last_evaluation_s(planned: TrainPlan, has_valid: bool) -> float:
    """Time to keep free at the end of a budget: the final evaluation and saving the output."""
    if not has_valid or not planned.eval_tokens_per_s:
        return 5.0
    tokens = 2 * planned.eval_max_examples * planned.tokens / max(1, planned.examples)
    return tokens / planned.eval_tokens_per_s + 5.0


def _loop_inputs(
    examples: _Examples, planned: Planned, setup: TrainSetup, ctx: DistContext, budget_started: float,
    options: LoopOptions,
) -> tuple[TrainConfig, EvalSets | None, LoopOptions]:
    """The loop's train config (the plan's evaluation intervals and sizes), its evaluation sets, and
    the budget's hard stop in case the machine slows down: the budget less the last evaluation's time."""
    recipe, plan = examples.recipe, planned.plan
    run_cfg = recipe.train.model_copy(update={
        "tokens_per_step": plan.tokens_per_step, "eval_every_steps": plan.eval_every_steps,
        "checkpoint_every_steps": plan.checkpoint_every_steps, "eval_max_examples": plan.eval_max_examples,
    })
    if plan.budget_s is not None and examples.saved is None:
        options = replace(options, deadline=(budget_started + plan.budget_s
                                             - _last_evaluation_s(plan, bool(examples.valid))))
    if ctx.is_main:
        say(
            f"{recipe.method}: {setup.trainable_params:,} of {setup.total_params:,} parameters trainable; "
            f"{len(examples.train)} examples in {len(examples.rows(plan.tokens_per_step))} rows, {len(planned.steps)} "
            f"steps of <= {plan.tokens_per_step} tokens; packed examples kept apart by {_attention_description(setup)}"
        )
    return run_cfg, _eval_sets(recipe, run_cfg, examples, examples.row_tokens(plan.tokens_per_step)), options


def _eval_sets(recipe: Recipe, run_cfg: TrainConfig, examples: _Examples, row_tokens: int) -> EvalSets | None:
    """The validation set and a fixed, seeded sample of the train set, both cut to
    eval_max_examples; None without validation examples."""
    from tunelab.train.loop import EvalSets

    if not examples.valid:
        return None
    sample_size = min(run_cfg.eval_max_examples, len(examples.train))
    sample_ids = sorted(random.Random(run_cfg.seed).sample(range(len(examples.train)), sample_size))
    return EvalSets(
        valid=_eval_set(examples.valid[: run_cfg.eval_max_examples], recipe, row_tokens),
        train_sample=_eval_set([examples.train[i] for i in sample_ids], recipe, row_tokens),
    )


def _save_run(
    recipe: Recipe, paths: RunPaths, tokenizer: PreTrainedTokenizerBase, setup: TrainSetup, result: LoopResult,
    planned_steps: int, budget_started: float, ctx: DistContext,
) -> TrainResult:
    """The run's output is the best checkpoint (by validation loss), else the last weights; then
    train/summary.json."""
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
    return TrainResult(
        run_dir=paths.root, output_dir=output_dir, steps=state.step, best_step=state.best_step,
        best_val_loss=state.best_val_loss, stopped_early=state.stopped_early, tokens=state.tokens,
        train_time_s=state.train_time_s, method=recipe.method, trainable_params=setup.trainable_params,
        total_params=setup.total_params, model=setup.model,
    )


def train_on_examples(
    recipe: Recipe, paths: RunPaths, tokenizer: PreTrainedTokenizerBase, train_examples: Sequence[dict[str, Any]],
    valid_examples: Sequence[dict[str, Any]], *, resume: bool = False, device: str | None = None,
    ctx: DistContext | None = None, resume_command: str | None = None,
    on_step_end: Callable[[TrainState, TrainSetup], None] | None = None, progress: bool = True,
    budget_started: float | None = None,
) -> TrainResult:
    """Train on tokenized examples ({"input_ids", "labels"}) into an existing run directory:
    prepare -> set up -> plan -> loop -> save. `train` calls this after the data stage; tests and
    benchmarks call it directly. `budget_started`: the time.monotonic() from which train.budget
    counts (default: now). `on_step_end` is called after every step (tests record parameters with it)."""
    from tunelab.train.distributed import SINGLE_PROCESS
    from tunelab.train.loop import LoopOptions, train_loop

    ctx, pad_id = ctx or SINGLE_PROCESS, tokenizer.pad_token_id
    budget_started = time.monotonic() if budget_started is None else budget_started

    # ---- prepare: the data's steps before any measurement (a resumed run keeps its plan), the checkpoint
    examples = _Examples.prepare(recipe, paths, train_examples, valid_examples, resume)
    checkpoint = _checkpoint_to_resume(paths, ctx, resume, examples.first_steps)

    # ---- set up the model, loss and optimizer (FSDP shards them here); one GPU probes the micro-batch size
    setup, layout = _set_up(examples, paths, pad_id, device, ctx)

    # ---- plan: this machine's speed, the steps that fit the budget, smaller steps or more passes (train/plan.py)
    planned, deadline_from = _plan(examples, setup, layout, paths, pad_id, ctx, budget_started)

    # ---- the loop
    run_cfg, evals, options = _loop_inputs(examples, planned, setup, ctx, deadline_from, LoopOptions(
        resume_command=resume_command or f"tunelab train {paths.recipe} --resume",
        params=_flat(examples.recipe.model_dump(mode="json")), progress=progress,
        on_step_end=on_step_end,
    ))
    result = train_loop(setup, examples.train, planned.steps, run_cfg, paths.root, pad_id=pad_id, evals=evals,
                        resume=checkpoint, ctx=ctx, options=options)

    # ---- save the output (the best checkpoint's weights) and train/summary.json
    return _save_run(examples.recipe, paths, tokenizer, setup, result, len(planned.steps), budget_started, ctx)


def train(
    recipe: Recipe, resume: bool = False, *, resume_command: str | None = None, device: str | None = None,
    progress: bool = True, started: StartedRun | None = None,
) -> TrainResult:
    """Data stage, then training, into runs/<name>/ (see the module docstring). Under torchrun rank 0
    starts the run directory and prepares the data while the other ranks wait, then every rank trains.
    `started`: the run directory started and its data prepared already (`tunelab run`'s own stages, in
    this process); train.budget then counts from this call."""
    from tunelab.data.prepare import PreparedData
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
        if started is None:

            def start() -> StartedRun:
                start_run_dir(paths, recipe, resume)
                return prepare_run(recipe, paths)

            started = main_first(ctx, start, "preparing the run directory and data")
            if started is None:  # another rank: read what rank 0 wrote
                tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
                started = StartedRun(tokenizer, PreparedData(paths.data, {}))
            budget_started += started.replay_s  # the base model answering, once per model: not training
        return train_on_examples(
            recipe, paths, started.tokenizer, started.data.tokenized("train"), started.data.tokenized("valid"),
            resume=resume, device=device, ctx=ctx, resume_command=resume_command, progress=progress,
            budget_started=budget_started,
        )
    finally:
        shutdown(ctx)
