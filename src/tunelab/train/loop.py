"""THE training loop: one function, the same for LoRA, DoRA, QLoRA and full fine-tuning.

Reads a TrainSetup (model, loss, optimizer, schedule: the only place methods differ), the tokenized
train examples with their step plan (data/pack.py) and the evaluation sets. Writes, under the run's
train/ and checkpoints/ folders: log.jsonl (one line per step, evaluation and event), TensorBoard
event files in tb/, MLflow metrics when mlflow is installed and MLFLOW_TRACKING_URI is set, and
checkpoints (train/checkpoint.py). A progress bar goes to stderr.

Each optimizer step, top to bottom (train_loop): the step itself (train_step: set the learning rate
· forward/backward over the step's micro-batches, the loss summed over trainable tokens and divided
by the step's trainable-token count · skip the step if the loss or gradient is not finite, else clip
and step) · log · evaluate (best step, overfitting, early stopping: train/events.py) · checkpoint.
SIGTERM/SIGINT stop at the next micro-batch: a checkpoint of the last finished step is written and
TrainingInterrupted (exit code 75) says how to resume.

The seam for torch.distributed is DistContext (train/distributed.py): rank, world size and the
collective operations the loop needs; in one process they do nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tunelab.data.pack import Batch, Row, Step, collate, collate_varlen, example_length
from tunelab.errors import TunelabError
from tunelab.runs import RunPaths
from tunelab.train.checkpoint import (
    Checkpoint,
    TrainState,
    capture_rng,
    checkpoint_dir,
    prune_checkpoints,
    restore_rng,
)
from tunelab.train.distributed import SINGLE_PROCESS, DistContext
from tunelab.train.dynamics import DynamicsRecorder
from tunelab.train.events import Event, Verdict, finite_or_none, judge_evaluation
from tunelab.train.setup import TrainSetup

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again later (with --resume)


class TrainingInterrupted(TunelabError):
    """SIGTERM or SIGINT: a checkpoint was written; the message says how to resume."""

    exit_code = EXIT_INTERRUPTED


class NonFiniteTraining(TunelabError):
    """Too many consecutive steps with a non-finite loss or gradient."""

    exit_code = 1


@dataclass
class EvalSet:
    """A fixed set of tokenized examples evaluated as packed micro-batches."""

    examples: Sequence[dict[str, Any]]
    micro_batches: Sequence[tuple[Row, ...]]


@dataclass
class EvalSets:
    """What the loop evaluates every cfg.eval_every_steps and at the end: the validation set, and a
    fixed sample of the train set (a rising validation loss with a falling train loss: overfitting)."""

    valid: EvalSet
    train_sample: EvalSet | None = None


@dataclass(frozen=True)
class LoopOptions:
    """How a run reports and when it may stop short; the defaults are those of `tunelab train`."""

    resume_command: str = "tunelab train RECIPE --resume"  # said when a signal stops the run
    params: Mapping[str, Any] = field(default_factory=dict)  # the flattened recipe, logged to MLflow
    progress: bool = True  # a progress bar on stderr (rank 0)
    write_checkpoints: bool = True  # False (benchmarks): no checkpoint but the one a signal asks for
    deadline: float | None = None  # time.monotonic() of train.budget's hard stop: the step crossing it is the last
    on_step_end: Callable[[TrainState, TrainSetup], None] | None = None  # tests record weights, benchmarks time steps
    record_dynamics: bool = True  # train/dynamics.jsonl: each example's loss every step (train/dynamics.py)


@dataclass
class LoopResult:
    state: TrainState
    best_checkpoint: Path | None  # the weights the run's output should hold (None: no validation)
    last_checkpoint: Path | None


@dataclass
class StepResult:
    """What one optimizer step did (train_step); losses are over every rank's micro-batches."""

    lr: float
    loss: float = math.nan  # mean over the step's trainable tokens
    token_acc: float = math.nan
    grad_norm: float = math.nan  # before clipping
    skipped: bool = False  # the loss or gradient was not finite (on some rank): parameters unchanged
    stopped_by: str | None = None  # a signal: the step was dropped and nothing else is set
    time_s: float = 0.0


# ----------------------------------------------------------------------------------------------
# outputs


def _quiet_tensorboard_writer_thread() -> None:
    """TensorBoard writes events from a thread of its own: when the run folder goes away mid-training,
    that thread's OSError is not printed as a traceback; the loop's next write raises the same error,
    which the CLI reports in one line."""
    default = threading.excepthook
    if getattr(default, "tunelab_quiet", False):
        return

    def hook(args: Any) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and args.exc_type is not None and issubclass(
                args.exc_type, OSError):
            return
        default(args)

    hook.tunelab_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class _RunLog:
    """Everything the loop reports, in one place: train/log.jsonl (truncated on resume to the
    checkpoint's offset, so every step appears once), TensorBoard scalars, MLflow metrics when
    configured, and on stderr the progress bar and status lines. Silent on ranks other than 0."""

    def __init__(self, paths: RunPaths, state: TrainState, total_steps: int, device: torch.device, enabled: bool,
                 options: LoopOptions):
        self.enabled, self.device = enabled, device
        self.file = None
        self.tb = None
        self.mlflow = None
        self.bar = None
        self.session_tokens, self.session_started = 0, time.perf_counter()
        if not enabled:
            return
        paths.train_dir.mkdir(parents=True, exist_ok=True)
        path = paths.train_log
        path.touch()
        self.file = path.open("r+", encoding="utf-8")
        self.file.truncate(state.log_offset)
        self.file.seek(state.log_offset)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events an interrupted run wrote after the step we continue from
        self.tb = SummaryWriter(str(paths.tensorboard), purge_step=state.step + 1)
        _quiet_tensorboard_writer_thread()
        if os.environ.get("MLFLOW_TRACKING_URI") and importlib.util.find_spec("mlflow"):
            import mlflow

            self.mlflow = mlflow
            mlflow.start_run(run_name=str(options.params.get("name", "tunelab")))
            mlflow.log_params({k: v for k, v in options.params.items() if v is not None})
        if options.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=state.step, unit="step", file=sys.stderr, dynamic_ncols=True,
                            desc="train")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
        if self.tb is not None:
            for key, value in finite.items():
                self.tb.add_scalar(key, value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in finite.items()}, step=step)

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"tunelab: {message}", file=sys.stderr)
        else:
            print(f"tunelab: {message}", file=sys.stderr, flush=True)

    def event(self, event: Event, say: bool = True) -> None:
        self.write(event.record())
        if say:
            self.say(event.message)

    def step(self, state: TrainState, step: Step, result: StepResult) -> None:
        """A finished step: its train line (a skipped step has its event instead) and the progress bar."""
        self.session_tokens += step.tokens
        if not result.skipped:
            tokens_per_s = step.tokens / result.time_s
            self.write({
                "kind": "train", "step": state.step, "epoch": round(step.epoch + step.progress, 4),
                "loss": result.loss, "token_acc": result.token_acc, "lr": result.lr, "grad_norm": result.grad_norm,
                "tokens": step.tokens, "trainable_tokens": step.trainable_tokens,
                "tokens_per_s": tokens_per_s, "peak_mem_gib": _peak_mem_gib(self.device),
                "elapsed_s": state.train_time_s,
            })
            self.scalars({"train/loss": result.loss, "train/token_acc": result.token_acc, "train/lr": result.lr,
                          "train/grad_norm": result.grad_norm, "train/tokens_per_s": tokens_per_s}, state.step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{result.loss:.4f}", val=f"{state.last_val_loss:.4f}" if state.last_val_loss is not None else "-",
                tok_s=f"{self.session_tokens / (time.perf_counter() - self.session_started):.0f}", refresh=False,
            )

    def evaluation(self, step: int, val: tuple[float, float], train: tuple[float, float], verdict: Verdict) -> None:
        """An eval line ((loss, token accuracy) of the validation set and the train sample), then its events."""
        record = {"kind": "eval", "step": step, "val_loss": finite_or_none(val[0]),
                  "val_token_acc": finite_or_none(val[1]), "train_loss": finite_or_none(train[0]),
                  "train_token_acc": finite_or_none(train[1]), "is_best": verdict.is_best}
        if isinstance(val, Evaluation) and not math.isnan(val.reward_margin):  # preference tuning
            record.update(val_preference_acc=val.token_acc, val_reward_margin=val.reward_margin)
        self.write(record)
        self.scalars({"val/loss": val[0], "val/token_acc": val[1], "train_sample/loss": train[0],
                      "train_sample/token_acc": train[1]}, step)
        for event in verdict.events:
            self.event(event)

    def sync(self) -> int:
        """Flush to disk; the byte offset a checkpoint records."""
        if self.file is None:
            return 0
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.tb is not None:
            self.tb.flush()
        return self.file.tell()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.sync()
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


class _Checkpoints:
    """This run's checkpoints/step-N: writes one (after its event line, so the log offset it records
    includes that line), prunes the older ones (keeping the best), remembers the best and the last."""

    def __init__(self, root: Path, setup: TrainSetup, ctx: DistContext, log: _RunLog, keep: int, state: TrainState,
                 resume: Checkpoint | None):
        self.root, self.setup, self.ctx, self.log, self.keep = root, setup, ctx, log, keep
        self.best = checkpoint_dir(root, state.best_step) if state.best_step is not None else None
        self.last = resume.path if resume is not None else None
        self.saved_at = state.step if resume is not None else None  # the step self.last holds

    def save(self, state: TrainState, reason: str, is_best: bool = False) -> Path:
        if self.ctx.is_main:
            self.log.event(Event(state.step, "checkpoint", reason), say=False)
            state.log_offset = self.log.sync()
        self.ctx.save_checkpoint(self.root, self.setup, state)
        if self.ctx.is_main:
            prune_checkpoints(self.root, self.keep, {state.best_step} if state.best_step is not None else set())
        self.ctx.barrier()
        self.saved_at, self.last = state.step, checkpoint_dir(self.root, state.step)
        if is_best:
            self.best = self.last
        return self.last


class _StopSignals:
    """SIGTERM/SIGINT set a flag the loop checks between micro-batches; a second signal acts as usual
    (so a stuck checkpoint write can still be interrupted)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)




def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Linux reports the peak resident set size in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _agreed(ctx: DistContext, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any (one process: the flag itself)."""
    if ctx.world_size == 1:
        return flag
    return bool(ctx.all_reduce_max(torch.tensor(1.0 if flag else 0.0, device=device)).item())


# ----------------------------------------------------------------------------------------------
# micro-batches and evaluation


# Varlen rows are padded to a multiple of this on CUDA: fewer distinct shapes for compiled graphs
# and the allocator, at most 63 padding tokens per micro-batch.
VARLEN_PAD_MULTIPLE = 64


def batch_builder(setup: TrainSetup, examples: Sequence[dict[str, Any]], pad_id: int) -> Callable[[Sequence[Row]], Batch]:
    """rows -> a micro-batch on the setup's device, in the layout its attention takes."""
    if setup.make_batches is not None:  # a loss of its own (preference tuning) builds its own batches
        return setup.make_batches(examples, pad_id)
    if setup.attention != "varlen":
        return lambda rows: collate(examples, rows, pad_id).to(setup.device)
    # a fixed bound on sequence length: the kernel's grid, so compiled graphs do not specialise on it
    longest = max((example_length(e) for e in examples), default=1)
    multiple = VARLEN_PAD_MULTIPLE if setup.device.type == "cuda" else 1
    return lambda rows: collate_varlen(examples, rows, pad_id, pad_to_multiple=multiple, max_seqlen=longest).to(setup.device)


def attention_layout(setup: TrainSetup) -> contextlib.AbstractContextManager:
    if setup.attention != "varlen":
        return contextlib.nullcontext()
    from tunelab.train.attention import use_varlen_attention

    return use_varlen_attention(setup.model)


def autocast(setup: TrainSetup) -> torch.autocast:
    """bfloat16 autocast on CUDA (setup.autocast_dtype); off otherwise."""
    return torch.autocast(setup.device.type, dtype=setup.autocast_dtype or torch.float32,
                          enabled=setup.autocast_dtype is not None)


class Evaluation(NamedTuple):
    loss: float
    token_acc: float  # preference tuning: the share of pairs whose preferred answer the model ranks higher
    reward_margin: float = math.nan  # preference tuning: the mean reward margin (preferred - rejected)


def evaluate(setup: TrainSetup, eval_set: EvalSet, pad_id: int, ctx: DistContext = SINGLE_PROCESS) -> Evaluation:
    """(mean loss, token accuracy[, reward margin]) over every trainable token (or pair) of the set, dropout off."""
    model = setup.model
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=setup.device)
    margins = False
    make_batch = batch_builder(setup, eval_set.examples, pad_id)
    with torch.no_grad(), autocast(setup), attention_layout(setup):
        passes, real = ctx.lockstep_shard(eval_set.micro_batches)
        for index, micro in enumerate(passes):
            out = setup.loss_module(**make_batch(micro).model_inputs())
            margin = out.reward_margin_sum
            margins = margin is not None
            if index < real:
                sums += torch.stack([out.loss_sum.double(), out.count.double(), out.correct.double(),
                                     margin.double() if margins else sums.new_zeros(())])
    ctx.all_reduce_sum(sums)
    model.train(was_training)
    loss_sum, count, correct, margin_sum = sums.tolist()
    if count == 0:
        return Evaluation(math.nan, math.nan)
    return Evaluation(loss_sum / count, correct / count, margin_sum / count if margins else math.nan)


# ----------------------------------------------------------------------------------------------
# the step


def train_step(
    setup: TrainSetup, step: Step, index: int, make_batch: Callable[[Sequence[Row]], Batch], ctx: DistContext,
    stop: _StopSignals, grad_clip: float, dynamics: DynamicsRecorder | None = None,
) -> StepResult:
    """Optimizer step `index` (0-based) of the plan, which is `step`. A signal (`stop`) drops a
    half-accumulated step: the parameters and generator states stay those of the last step."""
    started, rng_at_start = time.perf_counter(), capture_rng()

    # ---- set the learning rate (a pure function of the step)
    lr = setup.schedule.lr_at(index)
    for group in setup.optimizer.param_groups:
        group["lr"] = lr

    # ---- forward/backward: accumulate this rank's micro-batches; every trainable token weighs 1/N
    scale = 1.0 / max(1, step.trainable_tokens)  # N: the step's trainable tokens on all ranks
    passes, real = ctx.lockstep_shard(step.micro_batches)
    sums = torch.zeros(3, dtype=torch.float64, device=setup.device)
    for pass_index, micro in enumerate(passes):
        if stop.received and not ctx.lockstep:
            break
        batch = make_batch(micro)
        with ctx.forward_backward():
            with autocast(setup):
                out = setup.loss_module(**batch.model_inputs())
            (out.loss_sum * (scale if pass_index < real else 0.0)).backward()
        if pass_index < real:
            sums += torch.stack([out.loss_sum.detach().double(), out.count.double(), out.correct.double()])
            if dynamics is not None:
                dynamics.add(micro, out.token_losses)
    stopped_by = stop.received
    if _agreed(ctx, bool(stopped_by), setup.device) and not stopped_by:
        stopped_by = "a signal to another rank"  # every rank stops at the same step
    if stopped_by:
        if dynamics is not None:
            dynamics.discard()
        setup.optimizer.zero_grad(set_to_none=True)
        restore_rng(rng_at_start)
        return StepResult(lr, stopped_by=stopped_by)
    ctx.all_reduce_sum(sums)
    loss_sum, count, correct = sums.tolist()
    if int(count) != step.trainable_tokens:
        raise RuntimeError(f"step {index + 1}: loss saw {int(count)} trainable tokens, plan says {step.trainable_tokens}")
    loss = loss_sum / max(1, step.trainable_tokens)

    # ---- clip and step, or skip a step whose loss or gradient is not finite (every rank agrees)
    params = setup.trainable_parameters()
    ctx.sync_gradients(params)
    grad_norm = ctx.clip_grad_norm(params, grad_clip)
    skipped = _agreed(ctx, not (math.isfinite(loss) and bool(torch.isfinite(grad_norm))), setup.device)
    if not skipped:
        setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return StepResult(lr, loss, correct / max(1, step.trainable_tokens), float(grad_norm), skipped,
                      time_s=time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# the loop


def train_loop(
    setup: TrainSetup, examples: Sequence[dict[str, Any]], plan: Sequence[Step], cfg: Any, run_root: Path, *,
    pad_id: int, evals: EvalSets | None = None, resume: Checkpoint | None = None, ctx: DistContext = SINGLE_PROCESS,
    options: LoopOptions = LoopOptions(),
) -> LoopResult:
    """Run the optimizer steps of `plan` from step 0 (or from `resume`), evaluating `evals` every
    cfg.eval_every_steps and at the end. `cfg` is a TrainConfig."""
    state = _resumed_state(setup, plan, resume, ctx)
    paths = RunPaths(run_root)
    log = _RunLog(paths, state, len(plan), setup.device, ctx.is_main, options)
    if resume is not None:
        log.event(Event(state.step, "resume", f"resumed from {resume.path}"), say=False)
    checkpoints = _Checkpoints(paths.checkpoints, setup, ctx, log, cfg.keep_checkpoints, state, resume)
    make_batch = batch_builder(setup, examples, pad_id)
    dynamics = DynamicsRecorder.open(paths.train_dir, examples, state.step, ctx.rank) if options.record_dynamics else None
    finished = state.step >= len(plan) or state.stopped_early
    stopped_by: str | None = None
    setup.model.train()
    try:
        with _StopSignals() as stop, attention_layout(setup):
            while not finished:
                # ---- one optimizer step: plan -> micro-batches -> loss -> step (or a skip)
                step = plan[state.step]
                result = train_step(setup, step, state.step, make_batch, ctx, stop, cfg.grad_clip, dynamics)
                stopped_by = result.stopped_by
                if stopped_by:
                    break
                _advance(state, plan, result)

                # ---- log: a train line, or an event for a skipped step (too many in a row: give up)
                if result.skipped:
                    state.nonfinite_streak += 1
                    log.event(_skipped_event(state, result))
                    if state.nonfinite_streak >= cfg.max_nonfinite_steps:
                        raise _diverged(state)
                    check_weights_finite(setup, ctx, state.step)  # skipping cannot mend weights already lost
                else:
                    state.nonfinite_streak = 0
                if dynamics is not None:  # a skipped step changed nothing: its losses are not kept
                    dynamics.write_step(state.step, step.epoch, keep=not result.skipped)
                log.step(state, step, result)
                finished = state.step >= len(plan)
                if not finished and _past(options.deadline, ctx, setup.device):
                    finished = True
                    log.event(_budget_reached(state, len(plan)))

                # ---- evaluate: validation and a fixed train sample; best step, overfitting, early stop
                is_best = False
                if evals is not None and (state.step % cfg.eval_every_steps == 0 or finished):
                    verdict = _evaluate(setup, evals, pad_id, ctx, state, cfg.early_stop_patience, finished, log)
                    is_best, finished = verdict.is_best, finished or verdict.stop

                # ---- checkpoint: periodically, at a new best, and at the end
                if options.write_checkpoints and (is_best or finished or state.step % cfg.checkpoint_every_steps == 0):
                    checkpoints.save(state, "best" if is_best else "end" if finished else "periodic", is_best)
                if options.on_step_end is not None:
                    options.on_step_end(state, setup)

            # one process: a signal during the last step's evaluation or checkpoint also counts; several:
            # only the agreed decision (a signal after it reached one rank only)
            reason = stop.received if ctx.world_size == 1 else stopped_by
            if reason:
                raise _interrupted(reason, state, checkpoints, log, options.resume_command)
    finally:
        log.close()
        if dynamics is not None:
            dynamics.close()
    return LoopResult(state, checkpoints.best, checkpoints.last)


def _resumed_state(setup: TrainSetup, plan: Sequence[Step], resume: Checkpoint | None, ctx: DistContext) -> TrainState:
    """A new run's state, or the checkpoint's after loading it into `setup` (weights, optimizer and
    generator states) and checking that its data position is where its next step starts."""
    if resume is None:
        return TrainState()
    ctx.restore(setup, resume)
    state = resume.state
    if state.step < len(plan) and (plan[state.step].epoch, plan[state.step].position) != (state.epoch, state.position):
        raise TunelabError(
            f"checkpoint {resume.path}: its data position (epoch {state.epoch}, row {state.position}) is not where "
            f"step {state.step + 1} of this run starts; the data or recipe changed since it was written"
        )
    return state


def _advance(state: TrainState, plan: Sequence[Step], result: StepResult) -> None:
    """Past step state.step of the plan (skipped or not, its data was used)."""
    step = plan[state.step]
    state.step += 1
    if state.step < len(plan):
        state.epoch, state.position = plan[state.step].epoch, plan[state.step].position
    state.tokens += step.tokens
    state.trainable_tokens += step.trainable_tokens
    state.train_time_s += result.time_s


def _skipped_event(state: TrainState, result: StepResult) -> Event:
    return Event(state.step, "nonfinite_skipped", (
        f"step {state.step}: loss {result.loss:.4g}, gradient norm {result.grad_norm:.4g}: not finite; step "
        f"skipped, parameters unchanged ({state.nonfinite_streak} in a row)"
    ))


def _diverged(state: TrainState) -> NonFiniteTraining:
    return NonFiniteTraining(
        f"{state.nonfinite_streak} consecutive steps had a non-finite loss or gradient (last: step "
        f"{state.step}); training diverged. Lower train.lr, check the data, or use model.dtype=float32"
    )


def check_weights_finite(setup: TrainSetup, ctx: DistContext, step: int) -> None:
    """NonFiniteTraining when a trainable weight holds inf or NaN (a step with a finite loss and
    gradient can still overflow them, e.g. train.lr=1e300): such weights are never saved or evaluated."""
    named = [(name, p) for name, p in setup.model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        bad = next((name for name, p in named
                    if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())), None)
    if _agreed(ctx, bad is not None, setup.device):
        where = f" ({bad} holds inf or NaN)" if bad else " (on another rank)"
        raise NonFiniteTraining(
            f"the weights are not finite after step {step}{where}; training diverged, nothing was saved. "
            "Lower train.lr, check the data, or use model.dtype=float32"
        )


def _past(deadline: float | None, ctx: DistContext, device: torch.device) -> bool:
    """train.budget's deadline has passed (on any rank: every rank stops at the same step)."""
    return deadline is not None and _agreed(ctx, time.monotonic() >= deadline, device)


def _budget_reached(state: TrainState, planned_steps: int) -> Event:
    state.extra["budget_reached"] = state.step
    return Event(state.step, "budget_reached", (
        f"budget reached at step {state.step} of {planned_steps}: the machine ran slower than measured before "
        "step 1; stopping here (the learning rate had not finished decaying)"
    ))


def _evaluate(
    setup: TrainSetup, evals: EvalSets, pad_id: int, ctx: DistContext, state: TrainState, patience: int | None,
    last_step: bool, log: _RunLog,
) -> Verdict:
    """Both sets evaluated (their time counts as training time), judged (train/events.py), logged."""
    started = time.perf_counter()
    val = evaluate(setup, evals.valid, pad_id, ctx)
    train = evaluate(setup, evals.train_sample, pad_id, ctx) if evals.train_sample else (math.nan, math.nan)
    state.train_time_s += time.perf_counter() - started
    verdict = judge_evaluation(state, val[0], train[0], patience, last_step)
    log.evaluation(state.step, val, train, verdict)
    return verdict


def _interrupted(
    reason: str, state: TrainState, checkpoints: _Checkpoints, log: _RunLog, resume_command: str
) -> TrainingInterrupted:
    """After a signal: the last finished step is checkpointed (if it is not yet), and the error says how to resume."""
    path = checkpoints.last if checkpoints.saved_at == state.step else checkpoints.save(state, f"stopped by {reason}")
    log.say(f"stopped by {reason} after step {state.step}; checkpoint {path}")
    return TrainingInterrupted(
        f"stopped by {reason} after step {state.step}; checkpoint saved in {path}\nresume with: {resume_command}"
    )
