"""The training plan: examples a step, passes over the data, and how many steps fit the budget.

Reads the train split's example lengths, the recipe's train keys (a value the user set wins over
`auto`) and, when a budget binds, the throughput measured on this machine before step 1 (forward and
backward of the run's own first micro-batches). Writes train/plan.json (TrainPlan): the resolved
values, where each came from, the estimate, and the sentence printed before training. A resumed run
reads the plan back instead of measuring again, so its steps are the ones the checkpoint counted.

One function makes the plan: `plan_training` returns the final TrainPlan and its steps with every
refinement below inside it. It is pure given what it is passed: the example lengths, the recipe's
train keys, how the rows are cut into steps, and the machine (its measuring, its clock, torchrun's
agreement and compiling, as functions: train/run.py passes the real ones, tests fixed ones).

The policy (docs/training.md):
- examples a step: about 2% of the examples, a power of two from 4 to 256 (in the spirit of
  OpenAI's "about 0.2% of the examples"; small sets get small steps, so a few hundred examples make
  over 100 optimizer steps);
- passes: 3; more for tiny sets (at least 100 examples seen, at most 25 passes), fewer for large
  ones (at most 25k examples seen) — the heuristic OpenAI published for its fine-tuning defaults;
- then the budget: the steps that fit the wall-clock budget at the measured speed, with the
  evaluations and a margin counted, and the learning-rate schedule is made for exactly those steps;
  when the passes take under half the budget, up to twice as many passes (more_epochs_for_budget);
  when fewer than 200 steps fit, the same tokens in smaller steps (smaller_step_for_budget);
- compiled layers (train.compile auto on a CPU, when the plan pays the compiling back) run at another
  speed: measured and fitted again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunelab.config import TrainConfig
from tunelab.console import format_duration
from tunelab.contract import TrainPlan
from tunelab.data.passes import auto_epochs

if TYPE_CHECKING:
    from tunelab.data.pack import Step
    from tunelab.train.setup import TrainSetup

    Cutter = Callable[["Cut"], Sequence[Step]]

AUTO = "auto"
TARGET_EVALUATIONS = 10  # validation every ~10% of the plan
EVAL_SHARE = 0.15  # of the budget, for all evaluations together
EVAL_SPEEDUP = 3.0  # tokens/s of a forward pass without gradients over forward+backward (~1/3 of the FLOPs)
MIN_EVAL_EXAMPLES = 32
MAX_EVAL_EXAMPLES = 200
BUDGET_MARGIN = 0.92  # the plan aims below the budget: measured speed varies on a shared machine
MIN_STEPS_UNDER_BUDGET = 200  # when the budget cuts a run shorter, smaller steps keep this many updates
MAX_REPLAY_TIME_SHARE = 0.15  # an auto budget adds at most this for replay (its rows and the anchor's targets)
FILL_BELOW, MAX_EPOCHS_FILL = 0.5, 2.0  # a plan under half the budget gets up to 2x the passes


def auto_examples_per_step(n_examples: int) -> int:
    """About 2% of n (n/48), as a power of two in [4, 256]."""
    if n_examples <= 0:
        return 4
    return int(min(256, max(4, 2 ** round(math.log2(max(1.0, n_examples / 48))))))


@dataclass(frozen=True)
class DataPlan:
    """What the data alone decides (before any measurement)."""

    examples: int
    tokens: int
    examples_per_step: float
    tokens_per_step: int
    epochs: float | None  # None: max_steps decides the length
    sources: dict[str, str]


def plan_from_data(lengths: Sequence[int], cfg: TrainConfig, examples_per_step: int | None = None,
                   epochs: float | None = None) -> DataPlan:
    """`examples_per_step`: instead of the auto choice (the budget asked for smaller steps);
    `epochs`: instead of the auto passes (the budget had room for more: more_epochs_for_budget)."""
    n = len(lengths)
    tokens = int(sum(lengths))
    mean = tokens / n if n else 1.0
    sources = {key: AUTO if getattr(cfg, key) == AUTO else "recipe"
               for key in ("tokens_per_step", "epochs", "eval_every_steps", "checkpoint_every_steps",
                           "eval_max_examples", "budget")}
    if cfg.tokens_per_step == AUTO:
        per_step = examples_per_step or auto_examples_per_step(n)
        tokens_per_step = max(1, round(per_step * mean))
    else:
        tokens_per_step = int(cfg.tokens_per_step)
    if cfg.max_steps is not None:
        epochs, sources["epochs"] = None, "recipe"  # max_steps decides the length
    else:
        epochs = (epochs or auto_epochs(n)) if cfg.epochs == AUTO else float(cfg.epochs)
    return DataPlan(n, tokens, tokens_per_step / mean, tokens_per_step, epochs, sources)


def budget_binds(cfg: TrainConfig) -> bool:
    """The budget shortens a run unless the user fixed its length (epochs or max_steps) and left
    the budget at auto: a key the user set wins over auto."""
    if cfg.budget is None:
        return False
    if cfg.budget != AUTO:
        return True
    return cfg.epochs == AUTO and cfg.max_steps is None


def replay_time_s(cfg: TrainConfig, device: str, task_tokens: int, replay_tokens: int, anchor_s: float) -> float:
    """Seconds an auto budget adds for replay (0 for a budget the recipe set, or none): replay's share of a
    pass's tokens (`replay_tokens` against the task's `task_tokens`) of the budget, and the KL anchor's
    targets (`anchor_s`). Rehearsing general prompts is the price of keeping general ability, paid in
    training time (data/replay.py REPLAY_TOKEN_SHARE of it), not in passes over the task: under a budget
    that also paid for replay, a task still learning lost what replay took (a JSON task: 2.3 passes instead
    of 2.7, 11 points). At most MAX_REPLAY_TIME_SHARE of the budget. A budget the recipe set is kept: replay
    then takes its share of it."""
    if cfg.budget != AUTO or not budget_binds(cfg) or replay_tokens <= 0 or task_tokens <= 0:
        return 0.0
    budget_s = cfg.budget_s(device) or 0.0
    return min(MAX_REPLAY_TIME_SHARE * budget_s, budget_s * replay_tokens / task_tokens + anchor_s)


# ----------------------------------------------------------------------------------------------
# measuring


@dataclass(frozen=True)
class Throughput:
    train_tokens_per_s: float  # forward + backward, real tokens
    eval_tokens_per_s: float  # forward only, no gradients


def measure_throughput(
    setup: TrainSetup, examples: Sequence[dict[str, Any]], plan: Sequence[Step], pad_id: int,
    max_passes: int = 4, max_seconds: float = 20.0,
) -> Throughput:
    """Time forward+backward of the run's first micro-batches (the first pass is warm-up when there
    are more: with compiled layers it is the compiling, counted in the budget as time already spent,
    not in the speed), then a forward pass without gradients (after one untimed, which compiles the
    evaluation's graph). `max_seconds` counts from the end of the warm-up. Gradients and generator
    states are left as they were: the training that follows is the same as without this measurement."""
    import torch

    from tunelab.data.pack import Row
    from tunelab.train.checkpoint import capture_rng, restore_rng
    from tunelab.train.loop import attention_layout, batch_builder

    micro_batches: list[tuple[Row, ...]] = [m for step in plan[:4] for m in step.micro_batches][:max_passes]
    make_batch = batch_builder(setup, examples, pad_id)
    autocast = torch.autocast(setup.device.type, dtype=setup.autocast_dtype or torch.float32,
                              enabled=setup.autocast_dtype is not None)
    rng = capture_rng()
    timings: list[tuple[int, float]] = []

    def sync() -> None:
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)

    was_training = setup.model.training
    setup.model.train()
    started = time.perf_counter()  # reset after the warm-up pass
    with attention_layout(setup):
        for micro in micro_batches:
            batch = make_batch(micro)
            tokens = _real_tokens(examples, micro)
            sync()
            t0 = time.perf_counter()
            with autocast:
                out = setup.loss_module(**batch.model_inputs())
            out.loss_sum.backward()
            sync()
            timings.append((tokens, time.perf_counter() - t0))
            if len(timings) == 1:
                started = time.perf_counter()
            elif time.perf_counter() - started > max_seconds:
                break
        setup.optimizer.zero_grad(set_to_none=True)
        setup.model.eval()
        batch = make_batch(micro_batches[0])
        with torch.no_grad(), autocast:
            for _ in range(2):  # the first is warm-up
                sync()
                t0 = time.perf_counter()
                setup.loss_module(**batch.model_inputs())
                sync()
                forward_s = time.perf_counter() - t0
    setup.model.train(was_training)
    restore_rng(rng)
    timed = timings[1:] if len(timings) > 1 else timings
    train_tps = sum(t for t, _ in timed) / max(1e-9, sum(s for _, s in timed))
    eval_tps = _real_tokens(examples, micro_batches[0]) / max(1e-9, forward_s)
    return Throughput(train_tps, max(eval_tps, train_tps))


def _real_tokens(examples: Sequence[dict[str, Any]], micro: Sequence[Sequence[int]]) -> int:
    return sum(len(examples[i]["input_ids"]) for row in micro for i in row)


# ----------------------------------------------------------------------------------------------
# fitting the budget


def auto_eval_examples(cfg: TrainConfig, budget_s: float | None, throughput: Throughput | None,
                       mean_tokens: float, train_tokens: int | None = None,
                       evaluations: int = TARGET_EVALUATIONS) -> int:
    """Validation examples per evaluation (and as many train-sample examples): all evaluations
    together about EVAL_SHARE of the budget and, once the run's training tokens are known, about
    EVAL_SHARE of its time whether a budget binds or not (a 40-step run does not validate 200
    examples 10 times). A forward pass without gradients runs at `throughput`'s evaluation speed, or
    EVAL_SPEEDUP times the training speed when nothing was measured."""
    if cfg.eval_max_examples != AUTO:
        return int(cfg.eval_max_examples)
    per_example = 2 * max(1.0, mean_tokens)  # a validation example and a train-sample example
    limits = [float(MAX_EVAL_EXAMPLES)]
    if budget_s is not None and throughput is not None:
        limits.append(EVAL_SHARE * budget_s * throughput.eval_tokens_per_s / (TARGET_EVALUATIONS + 1) / per_example)
    if train_tokens is not None:
        speedup = EVAL_SPEEDUP if throughput is None else throughput.eval_tokens_per_s / throughput.train_tokens_per_s
        eval_tokens = EVAL_SHARE / (1 - EVAL_SHARE) * train_tokens * speedup  # forward-pass tokens in that time
        limits.append(eval_tokens / (evaluations + 1) / per_example)  # + 1: the final evaluation
    return int(max(MIN_EVAL_EXAMPLES, min(limits)))


def auto_eval_every(steps: int) -> int:
    """Steps between validations for about TARGET_EVALUATIONS a run."""
    return max(1, math.ceil(steps / TARGET_EVALUATIONS))


def eval_interval(cfg: TrainConfig, steps: int) -> tuple[int, int]:
    """(eval_every_steps, checkpoint_every_steps): auto = about TARGET_EVALUATIONS a run."""
    every = auto_eval_every(steps)
    eval_every = every if cfg.eval_every_steps == AUTO else int(cfg.eval_every_steps)
    checkpoint_every = eval_every if cfg.checkpoint_every_steps == AUTO else int(cfg.checkpoint_every_steps)
    return eval_every, checkpoint_every


def steps_that_fit(
    plan: Sequence[Step], available_s: float, throughput: Throughput, eval_tokens: int, has_eval: bool,
) -> tuple[int, float]:
    """The most steps of `plan` whose training plus evaluations take at most BUDGET_MARGIN of
    `available_s` at the measured speed; (steps, estimated seconds)."""
    eval_s = eval_tokens / throughput.eval_tokens_per_s if has_eval else 0.0

    def cost(n: int) -> float:
        evaluations = math.ceil(n / auto_eval_every(n)) if has_eval else 0
        return cumulative[n] + evaluations * eval_s

    cumulative = [0.0]
    for step in plan:
        cumulative.append(cumulative[-1] + step.tokens / throughput.train_tokens_per_s)
    limit = BUDGET_MARGIN * available_s
    steps = len(plan)
    while steps > 1 and cost(steps) > limit:
        steps -= 1
    return steps, cost(steps)


def more_epochs_for_budget(epochs: float, estimated_s: float, available_s: float) -> float | None:
    """Passes when the data's whole plan (`epochs`, auto) takes under half of the budget: more, up
    to twice as many (what the provisional verdict would ask for), so that the run fills about
    BUDGET_MARGIN of the budget; early stopping and the best checkpoint guard against overfitting.
    None: keep the passes. A small set's 3 passes often end while the validation loss still falls
    (measured: 117 routing examples, 3 passes in 4 of 10 minutes scored 93, 6 passes 99)."""
    if estimated_s <= 0 or estimated_s >= FILL_BELOW * available_s:
        return None
    more = min(MAX_EPOCHS_FILL * epochs, epochs * BUDGET_MARGIN * available_s / estimated_s)
    return round(more, 2) if more > epochs * 1.1 else None


def smaller_step_for_budget(plan: Sequence[Step], fit: int, mean_tokens: float, examples_per_step: float) -> int | None:
    """Examples a step when the budget lets only `fit` steps of `plan` run and that is under
    MIN_STEPS_UNDER_BUDGET: the same tokens in more, smaller steps (the power of two at or below what gives
    MIN_STEPS_UNDER_BUDGET steps, at least 4; the number of updates matters more than their size at this
    scale). Rounded down, not to the nearest: a nearest power above it gave the demo 85 steps of 8 where 4
    gave 170, and smaller steps run a little slower per token besides. 200, not 100: the demo scored 82.5
    with 124 steps of 8 (0.88 of a pass) and 86.5 with 170 steps of 4 (0.6 of a pass), fewer tokens in more
    updates (docs/measurements.md). None: keep the step."""
    if fit >= MIN_STEPS_UNDER_BUDGET:
        return None
    tokens = sum(step.tokens for step in plan[:fit])
    wanted = tokens / (MIN_STEPS_UNDER_BUDGET * max(1.0, mean_tokens))
    smaller = int(max(4, 2 ** math.floor(math.log2(max(1.0, wanted)))))
    return smaller if smaller < round(examples_per_step) else None


def describe(plan: TrainPlan) -> str:
    """The sentence printed before training, e.g. '600 examples, 36k tokens: 16 examples a step,
    3 epochs = 113 steps, about 9.1 min at 150 tokens/s (measured), budget 10m'."""
    tokens = f"{plan.tokens / 1000:.0f}k" if plan.tokens >= 10_000 else f"{plan.tokens:,}"
    epochs = f"{plan.epochs:.3g} epoch{'s' if plan.epochs != 1 else ''}"
    parts = [f"{plan.examples:,} examples, {tokens} tokens: {plan.examples_per_step:.0f} examples a step "
             f"({plan.tokens_per_step:,} tokens), {epochs} = {plan.steps} steps"]
    if plan.estimated_s is not None and plan.train_tokens_per_s is not None:
        how = "measured, compiled layers" if plan.compiled else "measured"
        parts.append(f"about {format_duration(plan.estimated_s)} at {plan.train_tokens_per_s:,.0f} tokens/s ({how})")
    if plan.budget_s is not None:
        parts.append(f"budget {plan.budget}")
    why = ""
    if plan.limited_by == "budget":
        why = f"; the budget cut {plan.epochs_target:g} wanted epochs to {plan.epochs:.2g}"
        if plan.examples_per_step_before_budget:
            why += (f", in steps of {plan.examples_per_step:.0f} examples instead of "
                    f"{plan.examples_per_step_before_budget:.0f} for more updates")
    elif plan.epochs_before_budget:
        why = (f"; the budget had room for {plan.epochs_target:g} epochs instead of {plan.epochs_before_budget:g} "
               "(early stopping keeps the best step)")
    elif plan.limited_by == "max_steps":
        why = "; train.max_steps sets the length"
    return ", ".join(parts) + why + f"; validation every {plan.eval_every_steps} steps on {plan.eval_max_examples} examples"


# ----------------------------------------------------------------------------------------------
# the plan: every refinement in one place


@dataclass(frozen=True)
class Cut:
    """How the packed rows are cut into steps (data/pack.py plan_steps): what a plan's steps depend on."""

    tokens_per_step: int
    epochs: float  # math.inf: max_steps decides the length
    max_steps: int | None


def first_cut(lengths: Sequence[int], cfg: TrainConfig, saved: TrainPlan | None = None) -> Cut:
    """The steps the data asks for, before any measurement; a resumed run's saved plan (its
    checkpoints count those steps) instead of the data's."""
    if saved is not None:
        return Cut(saved.tokens_per_step, saved.epochs_target or math.inf, saved.steps)
    wanted = plan_from_data(lengths, cfg)
    return Cut(wanted.tokens_per_step, wanted.epochs or math.inf, cfg.max_steps)


def _same(value: int) -> int:
    return value


def _no_compiling(planned_tokens: int, planned_seconds: float = 0.0) -> bool:
    return False


@dataclass(frozen=True)
class Machine:
    """What the planner asks of the machine it plans for, passed in as functions so that the plan is
    pure given them (tests pass fixed ones)."""

    device: str  # "cpu" or "cuda": the automatic budget's size
    measure: Callable[[Sequence[Step]], Throughput]  # the speed on these steps' first micro-batches
    seconds_spent: Callable[[], float]  # of train.budget, so far (loading, measuring and compiling count)
    agree: Callable[[int], int] = _same  # torchrun: every rank takes the smallest value of all ranks
    # compiles the layers when a plan of this many tokens, taking this many seconds at the measured speed, pays it back
    compile: Callable[[int, float], bool] = _no_compiling
    compiled: bool = False  # the layers were compiled at set-up already
    more_passes: bool = True  # may add passes when the budget has room (not under torchrun)


@dataclass(frozen=True)
class Planned:
    """The final plan and the steps it runs."""

    plan: TrainPlan
    steps: list[Step] = field(repr=False)


def plan_training(
    lengths: Sequence[int], valid_lengths: Sequence[int], cfg: TrainConfig, cut: Cutter, machine: Machine,
    saved: TrainPlan | None = None, replay: dict[str, Any] | None = None,
) -> Planned:
    """The final training plan (train/plan.json) with every refinement: the data's steps and passes,
    cut to the steps that fit the budget at the measured speed; smaller steps when the budget lets
    fewer than MIN_STEPS_UNDER_BUDGET run; more passes when auto passes end well inside the budget;
    a refit after compiling the layers (the speed is theirs); the replay the data stage applied.
    `lengths`, `valid_lengths`: tokens of each train and validation example; `cut`: the steps of a
    Cut; `saved`: a resumed run's plan, kept as it was (only `compiled` and `replay` are set again)."""
    if saved is not None:
        steps = list(cut(first_cut(lengths, cfg, saved)))[: saved.steps]
        tokens = sum(s.tokens for s in steps)
        compiled = machine.compile(tokens, _seconds(tokens, saved)) or machine.compiled
        return Planned(_finished(saved, compiled, replay), steps)
    wanted = plan_from_data(lengths, cfg)
    steps = cut(first_cut(lengths, cfg))
    planned = _fit(cfg, wanted, steps, valid_lengths, machine, None, None)
    smaller = _smaller_step(cfg, wanted, steps, planned)
    if smaller is not None:
        # the budget lets few steps run: the same tokens in more, smaller steps (the speed is per token)
        shrunk_from = wanted.examples_per_step
        wanted = plan_from_data(lengths, cfg, smaller)
        steps = cut(Cut(wanted.tokens_per_step, wanted.epochs or math.inf, cfg.max_steps))
        planned = _fit(cfg, wanted, steps, valid_lengths, machine, _measured(planned), shrunk_from)
    more = _more_epochs(cfg, planned, machine) if machine.more_passes else None
    if more is not None:
        # the data's passes take under half the budget: more passes (early stopping keeps the best step)
        wanted = plan_from_data(lengths, cfg, smaller, more)
        steps = cut(Cut(wanted.tokens_per_step, wanted.epochs or math.inf, cfg.max_steps))
        planned = _fit(cfg, wanted, steps, valid_lengths, machine, _measured(planned),
                       planned.examples_per_step_before_budget).model_copy(
                           update={"epochs_before_budget": planned.epochs_target})
    tokens = sum(s.tokens for s in steps[: planned.steps])
    compiled = machine.compile(tokens, _seconds(tokens, planned))
    if compiled:
        # compiled layers run at another speed: measure and fit again (the compiling is time the budget spent);
        # the passes stay those chosen above, and so does why
        more_passes = {"epochs_before_budget": planned.epochs_before_budget} if more is not None else {}
        planned = _fit(cfg, wanted, steps, valid_lengths, machine, None, planned.examples_per_step_before_budget
                       ).model_copy(update=more_passes)
    return Planned(_finished(planned, compiled or machine.compiled, replay), list(steps[: planned.steps]))


def _seconds(tokens: int, plan: TrainPlan) -> float:
    """How long `tokens` train at the speed the plan was fitted at (0 when it has none)."""
    return tokens / plan.train_tokens_per_s if plan.train_tokens_per_s else 0.0


def _measured(planned: TrainPlan) -> Throughput:
    """The speed the plan was fitted at (as written in it), for a refit that does not measure again."""
    return Throughput(planned.train_tokens_per_s, planned.eval_tokens_per_s)  # type: ignore[arg-type]


def _finished(planned: TrainPlan, compiled: bool, replay: dict[str, Any] | None) -> TrainPlan:
    planned = planned.model_copy(update={"compiled": compiled})
    planned.reason = describe(planned)
    return planned.model_copy(update={"replay": replay}) if replay else planned


def _fit(
    cfg: TrainConfig, wanted: DataPlan, steps: Sequence[Step], valid_lengths: Sequence[int], machine: Machine,
    throughput: Throughput | None, shrunk_from: float | None,
) -> TrainPlan:
    """The data's wish (`wanted`, `steps`) cut to the steps that fit the budget at the speed
    measured now (or `throughput`, measured already), with the evaluation intervals and sizes that
    go with it. `shrunk_from`: the examples a step the budget made smaller."""
    budget_s = cfg.budget_s(machine.device) if budget_binds(cfg) else None
    mean_tokens = wanted.tokens / max(1, wanted.examples)
    n_steps, estimated_s = len(steps), None
    limited_by = "max_steps" if cfg.max_steps is not None else "data"
    eval_examples = auto_eval_examples(cfg, None, None, mean_tokens)
    if budget_s is not None:
        throughput = throughput or machine.measure(steps)
        available_s = budget_s - machine.seconds_spent()
        eval_examples = machine.agree(auto_eval_examples(cfg, available_s, throughput, mean_tokens))
        n_valid = min(eval_examples, len(valid_lengths))
        eval_tokens = sum(valid_lengths[:n_valid]) + round(n_valid * mean_tokens)
        fit, estimated_s = steps_that_fit(steps, available_s, throughput, eval_tokens, has_eval=n_valid > 0)
        fit = machine.agree(fit)
        if fit < len(steps):
            n_steps, limited_by = fit, "budget"
    eval_every, checkpoint_every = eval_interval(cfg, n_steps)
    # evaluations sized to the training that will run (the budget's size above is an upper bound)
    sized = auto_eval_examples(cfg, None, throughput, mean_tokens, sum(s.tokens for s in steps[:n_steps]),
                               math.ceil(n_steps / eval_every))
    eval_examples = machine.agree(min(eval_examples, sized))
    first_epoch = [s for s in steps if s.epoch == 0]
    steps_per_epoch = max(1, round(len(first_epoch) / max(1e-9, first_epoch[-1].progress)))
    last = steps[n_steps - 1]
    planned = TrainPlan(
        examples=wanted.examples, tokens=wanted.tokens, examples_per_step=round(wanted.examples_per_step, 1),
        tokens_per_step=wanted.tokens_per_step, epochs=round(last.epoch + last.progress, 4),
        epochs_target=wanted.epochs, max_steps=cfg.max_steps, steps=n_steps, steps_per_epoch=steps_per_epoch,
        eval_every_steps=eval_every, checkpoint_every_steps=checkpoint_every, eval_max_examples=eval_examples,
        budget=None if budget_s is None else cfg.budget, budget_s=budget_s, device=machine.device,
        train_tokens_per_s=None if throughput is None else round(throughput.train_tokens_per_s, 1),
        eval_tokens_per_s=None if throughput is None else round(throughput.eval_tokens_per_s, 1),
        estimated_s=None if estimated_s is None else round(estimated_s, 1), limited_by=limited_by,
        sources=wanted.sources, reason="", examples_per_step_before_budget=shrunk_from,
    )
    planned.reason = describe(planned)
    return planned


def _smaller_step(cfg: TrainConfig, wanted: DataPlan, steps: Sequence[Step], planned: TrainPlan) -> int | None:
    """Examples a step that give the budget's tokens more updates, or None (the step stays)."""
    if planned.limited_by != "budget" or cfg.tokens_per_step != AUTO:
        return None
    mean_tokens = wanted.tokens / max(1, wanted.examples)
    return smaller_step_for_budget(steps, planned.steps, mean_tokens, wanted.examples_per_step)


def _more_epochs(cfg: TrainConfig, planned: TrainPlan, machine: Machine) -> float | None:
    """More passes when auto passes end well inside an automatic or set budget, else None."""
    if (cfg.epochs != AUTO or cfg.max_steps is not None or planned.budget_s is None or planned.limited_by != "data"
            or planned.estimated_s is None or not planned.epochs_target):
        return None
    return more_epochs_for_budget(planned.epochs_target, planned.estimated_s, planned.budget_s - machine.seconds_spent())
