"""THE training loop: one function, the same for LoRA, DoRA, QLoRA and full fine-tuning.

Reads a TrainSetup (model, loss, optimizer, schedule: the only place methods differ), the tokenized
train examples with their step plan (data/pack.py) and the evaluation sets. Writes, under the run's
train/ and checkpoints/ folders: log.jsonl (one line per step, evaluation and event), TensorBoard
event files in tb/, MLflow metrics when mlflow is installed and MLFLOW_TRACKING_URI is set, and
checkpoints (train/checkpoint.py). A progress bar goes to stderr.

Each optimizer step, top to bottom: set the learning rate · forward/backward over the step's
micro-batches (loss summed over trainable tokens, divided by the step's trainable-token count) ·
skip the step if the loss or gradient is not finite, else clip and step · log · evaluate (early
stopping, overfitting) · checkpoint. SIGTERM/SIGINT stop at the next micro-batch: a checkpoint of
the last finished step is written and TrainingInterrupted (exit code 75) says how to resume.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.data.pack import Batch, Row, Step, collate, collate_varlen, example_length
from tunelab.errors import TunelabError
from tunelab.train.checkpoint import (
    Checkpoint,
    TrainState,
    capture_rng,
    checkpoint_dir,
    prune_checkpoints,
    restore_rng,
)
from tunelab.train.distributed import SINGLE_PROCESS, DistContext
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
class LoopResult:
    state: TrainState
    best_checkpoint: Path | None  # the weights the run's output should hold (None: no validation)
    last_checkpoint: Path | None


# ----------------------------------------------------------------------------------------------
# outputs


class _RunLog:
    """train/log.jsonl (truncated on resume to the checkpoint's offset, so every step appears once),
    TensorBoard scalars and, when configured, MLflow metrics. Silent on ranks other than 0."""

    def __init__(self, train_dir: Path, offset: int, step: int, enabled: bool, params: dict[str, Any]):
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.mlflow = None
        if not enabled:
            return
        train_dir.mkdir(parents=True, exist_ok=True)
        path = train_dir / "log.jsonl"
        path.touch()
        self.file = path.open("r+", encoding="utf-8")
        self.file.truncate(offset)
        self.file.seek(offset)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events an interrupted run wrote after the step we continue from
        self.tb = SummaryWriter(str(train_dir / "tb"), purge_step=step + 1)
        if os.environ.get("MLFLOW_TRACKING_URI") and importlib.util.find_spec("mlflow"):
            import mlflow

            self.mlflow = mlflow
            mlflow.start_run(run_name=str(params.get("name", "tunelab")))
            mlflow.log_params({k: v for k, v in params.items() if v is not None})

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
        if self.file is not None:
            self.sync()
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


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


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# evaluation


# Varlen rows are padded to a multiple of this on CUDA: fewer distinct shapes for compiled graphs
# and the allocator, at most 63 padding tokens per micro-batch.
VARLEN_PAD_MULTIPLE = 64


def batch_builder(setup: TrainSetup, examples: Sequence[dict[str, Any]], pad_id: int) -> Callable[[Sequence[Row]], Batch]:
    """rows -> a micro-batch on the setup's device, in the layout its attention takes."""
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


def evaluate(setup: TrainSetup, eval_set: EvalSet, pad_id: int, ctx: DistContext = SINGLE_PROCESS) -> tuple[float, float]:
    """(mean loss, token accuracy) over every trainable token of the set, dropout off."""
    model = setup.model
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=setup.device)
    autocast = torch.autocast(setup.device.type, dtype=setup.autocast_dtype or torch.float32, enabled=setup.autocast_dtype is not None)
    make_batch = batch_builder(setup, eval_set.examples, pad_id)
    with torch.no_grad(), autocast, attention_layout(setup):
        passes, real = ctx.lockstep_shard(eval_set.micro_batches)
        for index, micro in enumerate(passes):
            out = setup.loss_module(**make_batch(micro).model_inputs())
            if index < real:
                sums += torch.stack([out.loss_sum.double(), out.count.double(), out.correct.double()])
    ctx.all_reduce_sum(sums)
    model.train(was_training)
    loss_sum, count, correct = sums.tolist()
    if count == 0:
        return math.nan, math.nan
    return loss_sum / count, correct / count


# ----------------------------------------------------------------------------------------------
# the loop


def train_loop(
    setup: TrainSetup,
    examples: Sequence[dict[str, Any]],
    plan: Sequence[Step],
    cfg: Any,
    run_root: Path,
    *,
    pad_id: int,
    valid: EvalSet | None = None,
    train_sample: EvalSet | None = None,
    resume: Checkpoint | None = None,
    ctx: DistContext = SINGLE_PROCESS,
    params: dict[str, Any] | None = None,
    resume_command: str = "tunelab train RECIPE --resume",
    nan_at_step: int | None = None,
    on_step_end: Callable[[TrainState, TrainSetup], None] | None = None,
    progress: bool = True,
    write_checkpoints: bool = True,
    deadline: float | None = None,
) -> LoopResult:
    """Run the optimizer steps of `plan` from step 0 (or from `resume`), evaluating on `valid` and
    `train_sample` every cfg.eval_every_steps and at the end. `cfg` is a TrainConfig.
    `nan_at_step` (tests only) turns the loss of that step (1-based) into NaN; `on_step_end` is
    called after every step (tests record parameters with it); `write_checkpoints=False`
    (benchmarks) skips every checkpoint. `deadline` (a time.monotonic() value, from train.budget):
    the last step is the one that ends after it, then the final evaluation and checkpoint."""
    model, optimizer, schedule = setup.model, setup.optimizer, setup.schedule
    device = setup.device
    checkpoints = run_root / "checkpoints"
    state = TrainState()
    if resume is not None:
        ctx.restore(setup, resume)
        state = resume.state
        if state.step < len(plan) and (plan[state.step].epoch, plan[state.step].position) != (state.epoch, state.position):
            raise TunelabError(
                f"checkpoint {resume.path}: its data position (epoch {state.epoch}, row {state.position}) is not where "
                f"step {state.step + 1} of this run starts; the data or recipe changed since it was written"
            )
    log = _RunLog(run_root / "train", state.log_offset, state.step, ctx.is_main, params or {})
    if resume is not None:
        log.write({"kind": "event", "step": state.step, "event": "resume", "message": f"resumed from {resume.path}"})
    best_path = checkpoint_dir(checkpoints, state.best_step) if state.best_step is not None else None
    last_path = resume.path if resume is not None else None
    saved_at = state.step if resume is not None else None
    finished = state.step >= len(plan) or state.stopped_early
    autocast = torch.autocast(device.type, dtype=setup.autocast_dtype or torch.float32, enabled=setup.autocast_dtype is not None)
    params_list = setup.trainable_parameters()
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), initial=state.step, unit="step", file=sys.stderr, dynamic_ncols=True, desc="train")

    def say(message: str) -> None:
        if not ctx.is_main:
            return
        if bar is not None:
            bar.write(f"tunelab: {message}", file=sys.stderr)
        else:
            print(f"tunelab: {message}", file=sys.stderr, flush=True)

    def checkpoint(reason: str) -> Path:
        nonlocal saved_at, last_path
        if ctx.is_main:
            log.write({"kind": "event", "step": state.step, "event": "checkpoint", "message": reason})
            state.log_offset = log.sync()
        ctx.save_checkpoint(checkpoints, setup, state)
        if ctx.is_main:
            keep = {state.best_step} if state.best_step is not None else set()
            prune_checkpoints(checkpoints, cfg.keep_checkpoints, keep)
        ctx.barrier()
        saved_at, last_path = state.step, checkpoint_dir(checkpoints, state.step)
        return last_path

    stopped_by: str | None = None
    session_tokens, session_started = 0, time.perf_counter()
    val_loss: float | None = state.last_val_loss
    make_batch = batch_builder(setup, examples, pad_id)
    model.train()
    try:
        with _StopSignals() as stop, attention_layout(setup):
            while not finished:
                step = plan[state.step]
                step_started = time.perf_counter()
                rng_at_step_start = capture_rng()

                # ---- set the learning rate (a pure function of the step)
                lr = schedule.lr_at(state.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # ---- forward/backward: accumulate the step's micro-batches; every trainable token weighs 1/N
                scale = 1.0 / max(1, step.trainable_tokens)
                my_micro_batches, real = ctx.lockstep_shard(step.micro_batches)
                sums = torch.zeros(3, dtype=torch.float64, device=device)
                for index, micro in enumerate(my_micro_batches):
                    if stop.received and not ctx.lockstep:
                        break
                    batch = make_batch(micro)
                    with ctx.forward_backward():
                        with autocast:
                            out = setup.loss_module(**batch.model_inputs())
                        loss_sum = out.loss_sum
                        if nan_at_step == state.step + 1 and index == 0:
                            loss_sum = loss_sum * float("nan")
                        (loss_sum * (scale if index < real else 0.0)).backward()
                    if index < real:
                        sums += torch.stack([loss_sum.detach().double(), out.count.double(), out.correct.double()])
                stopped_by = stop.received
                if ctx.world_size > 1:
                    # every rank stops at the same step, even one whose signal came later or never
                    flag = torch.tensor(1.0 if stopped_by else 0.0, device=device)
                    if ctx.all_reduce_max(flag).item() and not stopped_by:
                        stopped_by = "a signal to another rank"
                if stopped_by:
                    # a half-accumulated step is dropped: parameters are still those of the last step
                    optimizer.zero_grad(set_to_none=True)
                    restore_rng(rng_at_step_start)
                    break
                ctx.all_reduce_sum(sums)
                loss_sum_total, count_total, correct_total = sums.tolist()
                if int(count_total) != step.trainable_tokens:
                    raise RuntimeError(f"step {state.step + 1}: loss saw {int(count_total)} trainable tokens, plan says {step.trainable_tokens}")
                loss = loss_sum_total / max(1, step.trainable_tokens)

                # ---- clip and step, or skip a step whose loss or gradient is not finite (every rank agrees)
                ctx.sync_gradients(params_list)
                grad_norm = ctx.clip_grad_norm(params_list, cfg.grad_clip)
                bad = torch.tensor(0.0 if (math.isfinite(loss) and bool(torch.isfinite(grad_norm))) else 1.0, device=device)
                skipped = bool(ctx.all_reduce_max(bad).item())
                if not skipped:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                if state.step < len(plan):
                    state.epoch, state.position = plan[state.step].epoch, plan[state.step].position
                state.tokens += step.tokens
                state.trainable_tokens += step.trainable_tokens
                step_time_s = time.perf_counter() - step_started
                state.train_time_s += step_time_s
                session_tokens += step.tokens

                # ---- log
                if skipped:
                    state.nonfinite_streak += 1
                    message = (
                        f"step {state.step}: loss {loss:.4g}, gradient norm {float(grad_norm):.4g}: not finite; step "
                        f"skipped, parameters unchanged ({state.nonfinite_streak} in a row)"
                    )
                    log.write({"kind": "event", "step": state.step, "event": "nonfinite_skipped", "message": message})
                    say(message)
                    if state.nonfinite_streak >= cfg.max_nonfinite_steps:
                        raise NonFiniteTraining(
                            f"{state.nonfinite_streak} consecutive steps had a non-finite loss or gradient (last: step "
                            f"{state.step}); training diverged. Lower train.lr, check the data, or use model.dtype=float32"
                        )
                else:
                    state.nonfinite_streak = 0
                    token_acc = correct_total / max(1, step.trainable_tokens)
                    tokens_per_s = step.tokens / step_time_s
                    record = {
                        "kind": "train", "step": state.step, "epoch": round(step.epoch + step.progress, 4),
                        "loss": loss, "token_acc": token_acc, "lr": lr, "grad_norm": float(grad_norm),
                        "tokens": step.tokens, "trainable_tokens": step.trainable_tokens,
                        "tokens_per_s": tokens_per_s, "peak_mem_gib": _peak_mem_gib(device),
                        "elapsed_s": state.train_time_s,
                    }
                    log.write(record)
                    log.scalars({"train/loss": loss, "train/token_acc": token_acc, "train/lr": lr,
                                 "train/grad_norm": float(grad_norm), "train/tokens_per_s": tokens_per_s}, state.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss:.4f}", val=f"{val_loss:.4f}" if val_loss is not None else "-",
                        tok_s=f"{session_tokens / (time.perf_counter() - session_started):.0f}", refresh=False,
                    )
                finished = state.step >= len(plan)
                if deadline is not None and not finished and _agreed(ctx, time.monotonic() >= deadline, device):
                    finished = True
                    state.extra["budget_reached"] = state.step
                    message = (f"budget reached at step {state.step} of {len(plan)}: the machine ran slower than "
                               "measured before step 1; stopping here (the learning rate had not finished decaying)")
                    log.write({"kind": "event", "step": state.step, "event": "budget_reached", "message": message})
                    say(message)

                # ---- evaluate: validation and a fixed train sample; best checkpoint, early stopping, overfitting
                new_best = False
                if valid is not None and (state.step % cfg.eval_every_steps == 0 or finished):
                    eval_started = time.perf_counter()
                    val_loss, val_acc = evaluate(setup, valid, pad_id, ctx)
                    train_loss, train_acc = evaluate(setup, train_sample, pad_id, ctx) if train_sample else (math.nan, math.nan)
                    state.train_time_s += time.perf_counter() - eval_started
                    new_best = math.isfinite(val_loss) and (state.best_val_loss is None or val_loss < state.best_val_loss)
                    log.write({"kind": "eval", "step": state.step, "val_loss": _finite_or_none(val_loss),
                               "val_token_acc": _finite_or_none(val_acc), "train_loss": _finite_or_none(train_loss),
                               "train_token_acc": _finite_or_none(train_acc), "is_best": new_best})
                    log.scalars({"val/loss": val_loss, "val/token_acc": val_acc, "train_sample/loss": train_loss,
                                 "train_sample/token_acc": train_acc}, state.step)
                    if (state.last_val_loss is not None and state.last_train_loss is not None
                            and val_loss > state.last_val_loss and train_loss < state.last_train_loss):
                        message = (f"overfitting at step {state.step}: validation loss rose {state.last_val_loss:.4f} -> "
                                   f"{val_loss:.4f} while train loss fell {state.last_train_loss:.4f} -> {train_loss:.4f}")
                        log.write({"kind": "event", "step": state.step, "event": "overfitting", "message": message})
                        say(message)
                    state.last_val_loss, state.last_train_loss = _finite_or_none(val_loss), _finite_or_none(train_loss)
                    if new_best:
                        state.best_val_loss, state.best_step = val_loss, state.step
                        state.evals_without_improvement = 0
                    else:
                        state.evals_without_improvement += 1
                        patience = cfg.early_stop_patience
                        if patience is not None and state.evals_without_improvement >= patience and not finished:
                            state.stopped_early = finished = True
                            message = (f"early stop at step {state.step}: no better validation loss in {patience} "
                                       f"evaluation(s); keeping the best, step {state.best_step} (val loss {state.best_val_loss:.4f})")
                            log.write({"kind": "event", "step": state.step, "event": "early_stop", "message": message})
                            say(message)

                # ---- checkpoint: periodically, at a new best, and at the end
                if write_checkpoints and (new_best or finished or state.step % cfg.checkpoint_every_steps == 0):
                    path = checkpoint("best" if new_best else "end" if finished else "periodic")
                    if new_best:
                        best_path = path
                if on_step_end is not None:
                    on_step_end(state, setup)

            # one process: a signal during the last step's evaluation or checkpoint also counts; several:
            # only the agreed decision (a signal after it reached one rank only)
            reason = stop.received if ctx.world_size == 1 else stopped_by
            if reason:
                path = last_path if saved_at == state.step else checkpoint(f"stopped by {reason}")
                say(f"stopped by {reason} after step {state.step}; checkpoint {path}")
                raise TrainingInterrupted(
                    f"stopped by {reason} after step {state.step}; checkpoint saved in {path}\n"
                    f"resume with: {resume_command}"
                )
    finally:
        if bar is not None:
            bar.close()
        log.close()
    return LoopResult(state, best_path, last_path)
