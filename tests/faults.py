"""Fault injection for the tests: environment variables that make a real training run fail in a chosen
way, so the tests can check what the run does then (tests/test_train_loop.py in process,
tests/test_distributed.py through `tunelab train --nproc 2`, whose ranks are separate processes and
load it through tests/faults_site/sitecustomize.py). Nothing of it is in tunelab: `patch` wraps the
training loop and the saving of the output from the outside (a forward hook on the loss module, a
step callback, a dump after the output is saved).

  TUNELAB_INJECT_NAN_AT_STEP=STEP[@RANK]  the loss of optimizer step STEP (1-based) is NaN, on every
                                          rank or on RANK only: the first micro-batch's loss sum is
                                          multiplied by NaN, so its gradient is NaN too
  TUNELAB_TEST_KILL_AT_STEP=STEP[@RANK]   that rank dies by SIGKILL (as by the OOM killer) right
                                          after step STEP and its checkpoint
  TUNELAB_TEST_DUMP_PARAMS=DIR            at the end every rank saves its trainable tensors (FSDP:
                                          gathered from the shards) to DIR/rank-R.safetensors

Reads the environment; writes only DIR/rank-R.safetensors.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from tunelab.train.checkpoint import TrainState
    from tunelab.train.setup import TrainSetup

SITE = Path(__file__).resolve().parent / "faults_site"  # on PYTHONPATH: every process of a run loads `patch`
NAN_ENV = "TUNELAB_INJECT_NAN_AT_STEP"
KILL_ENV = "TUNELAB_TEST_KILL_AT_STEP"
DUMP_ENV = "TUNELAB_TEST_DUMP_PARAMS"

StepCallback = Callable[["TrainState", "TrainSetup"], None]


def step_for_rank(value: str | None, rank: int) -> int | None:
    """"STEP" (every rank) or "STEP@RANK" (that rank only) -> the step meant for this rank, or None."""
    if not value:
        return None
    step, _, only_rank = value.partition("@")
    return int(step) if not only_rank or int(only_rank) == rank else None


@dataclass
class Faults:
    """The faults asked for this rank; with none asked, install and dump do nothing."""

    nan_at_step: int | None = None
    kill_at_step: int | None = None
    dump_dir: Path | None = None

    @classmethod
    def from_environment(cls, rank: int) -> Faults:
        dump = os.environ.get(DUMP_ENV)
        return cls(step_for_rank(os.environ.get(NAN_ENV), rank), step_for_rank(os.environ.get(KILL_ENV), rank),
                   Path(dump) if dump else None)

    def install(self, setup: TrainSetup, start_step: int, on_step_end: StepCallback | None) -> StepCallback | None:
        """Call right before the loop, which starts after `start_step` steps (0, or a checkpoint's).
        Returns the loop's on_step_end: the caller's, then the step count and the kill."""
        if self.nan_at_step is None and self.kill_at_step is None:
            return on_step_end
        steps_done = start_step
        poisoned = False

        def poison(_module: nn.Module, _args: Any, out: Any) -> Any:
            nonlocal poisoned
            import torch

            # the loop's training passes only: evaluation runs without gradients
            if poisoned or not torch.is_grad_enabled() or steps_done + 1 != self.nan_at_step:
                return None
            poisoned = True
            return out._replace(loss_sum=out.loss_sum * float("nan"))

        def after_step(state: TrainState, step_setup: TrainSetup) -> None:
            nonlocal steps_done
            if on_step_end is not None:
                on_step_end(state, step_setup)
            steps_done = state.step
            if state.step == self.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

        if self.nan_at_step is not None:
            setup.loss_module.register_forward_hook(poison)
        return after_step

    def dump(self, model: nn.Module, rank: int) -> None:
        """DIR/rank-R.safetensors: this rank's trainable tensors (FSDP: a collective, every rank calls it)."""
        if self.dump_dir is None:
            return
        from safetensors.torch import save_file
        from torch.distributed.tensor import DTensor

        tensors = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
                   for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(self.dump_dir / f"rank-{rank}.safetensors"))


def asked() -> bool:
    return any(os.environ.get(name) for name in (NAN_ENV, KILL_ENV, DUMP_ENV))


def patch(set_attribute: Callable[[Any, str, Any], None] = setattr) -> None:
    """Wrap tunelab's training loop and output saving with the faults the environment asks for (read when
    a run starts, per rank). `set_attribute`: pytest's monkeypatch.setattr in process (undone after the
    test), setattr in a rank of its own."""
    import tunelab.train.loop as loop
    import tunelab.train.run as run

    train_loop, save_run = loop.train_loop, run._save_run

    def faulty_loop(setup: TrainSetup, *args: Any, **kwargs: Any) -> Any:
        ctx, resume, options = kwargs["ctx"], kwargs.get("resume"), kwargs["options"]
        faults = Faults.from_environment(ctx.rank)
        on_step_end = faults.install(setup, resume.step if resume else 0, options.on_step_end)
        return train_loop(setup, *args, **{**kwargs, "options": replace(options, on_step_end=on_step_end)})

    def save_then_dump(*args: Any) -> Any:
        trained = save_run(*args)
        setup, ctx = args[3], args[-1]
        Faults.from_environment(ctx.rank).dump(setup.model, ctx.rank)
        return trained

    set_attribute(loop, "train_loop", faulty_loop)
    set_attribute(run, "_save_run", save_then_dump)
