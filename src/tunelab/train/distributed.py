"""Data-parallel training on torch.distributed, launched by torchrun (one process per GPU or CPU slot).

Reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
the recipe's `train.distributed`; writes nothing (rank 0 writes the run's files, see loop.py).

How a step is shared: every rank builds the same global step plan (data/pack.py), takes its share
of each step's micro-batches (`DistContext.shard`), divides its summed loss by the step's GLOBAL
trainable-token count, and after the last micro-batch the gradients are summed across ranks with
one bucketed all-reduce per step. A sum of per-rank sums equals the single-process gradient, so the
global batch (tokens per optimizer step) is the same whatever the world size, and nothing is
averaged twice. A rank with no micro-batch in a step contributes zero gradients but still takes
part in every collective, so no rank waits forever for it.

Why an explicit all-reduce and not torch.nn.parallel.DistributedDataParallel: the loss (loss.py)
calls the decoder and the LM head directly, not model.forward, which DDP's reducer needs to see
each step; and DDP cannot run a step on a rank that has no batch. The reduction is the one DDP
does (sum of flattened gradient buckets), done once per optimizer step.

A dead or stuck rank: the process group has a timeout (TUNELAB_DIST_TIMEOUT_S, default 60 s);
a collective that fails or times out raises RankFailed (one line), and torchrun stops the rest.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.train.loop import SINGLE_PROCESS, DistContext

TIMEOUT_ENV = "TUNELAB_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
# gradients are reduced in buckets of about this many bytes: big messages, bounded extra memory
BUCKET_BYTES = 25 * 2**20

T = TypeVar("T")


class RankFailed(TunelabError):
    """A collective failed or timed out: another rank died, was killed or is unreachable."""

    exit_code = 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_strategy(distributed: str, method: str, world_size: int) -> str:
    """`train.distributed` -> none | ddp. auto: none for one process, ddp otherwise (LoRA and
    full fine-tuning alike: every rank holds the whole model)."""
    if distributed == "fsdp":
        raise ConfigError(
            "train.distributed: fsdp (sharded full fine-tuning) is not available yet; use ddp (each GPU holds "
            "the whole model) or auto"
        )
    if distributed == "none" and world_size > 1:
        raise ConfigError(
            f"train.distributed: none, but {world_size} processes were launched; use auto or ddp, or run one process"
        )
    if distributed == "auto":
        return "none" if world_size == 1 else "ddp"
    return distributed


@contextlib.contextmanager
def _collective(rank: int, what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, torch.distributed.DistError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RankFailed(
            f"rank {rank}: {what} failed: another rank stopped or cannot be reached ({first_line[:200]}); "
            "see that rank's error above"
        ) from None


@dataclass(frozen=True)
class ProcessGroupContext(DistContext):
    """DistContext over the default torch.distributed process group."""

    local_rank: int = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        with _collective(self.rank, "all-reduce (sum)"):
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        with _collective(self.rank, "all-reduce (max)"):
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Sum every trainable parameter's gradient over ranks (missing gradients count as zero)."""
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        bucket: list[torch.Tensor] = []
        size = 0
        for param in params:
            bucket.append(param.grad)
            size += param.grad.numel() * param.grad.element_size()
            if size >= BUCKET_BYTES:
                self._reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, grads: list[torch.Tensor]) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for same in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in same])
            self.all_reduce_sum(flat)
            offset = 0
            for grad in same:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def barrier(self) -> None:
        with _collective(self.rank, "barrier"):
            torch.distributed.barrier()

    def device(self) -> str:
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


def init_distributed(timeout_s: float | None = None) -> DistContext:
    """The process group torchrun asked for (nccl on CUDA, gloo on CPU), or SINGLE_PROCESS when
    this process was not launched by torchrun."""
    if not launched_by_torchrun():
        return SINGLE_PROCESS
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if on_gpu else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
            device_id=torch.device("cuda", local_rank) if on_gpu else None,
        )
    return ProcessGroupContext(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown(ctx: DistContext) -> None:
    if isinstance(ctx, ProcessGroupContext) and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main_first(ctx: DistContext, work: Callable[[], T], what: str) -> T | None:
    """Run `work` on rank 0 while the others wait; if it fails there, every rank stops (the
    others with a one-line error, rank 0 with its own) instead of waiting for a timeout."""
    failed = torch.zeros(1, device=ctx.device() if isinstance(ctx, ProcessGroupContext) else "cpu")
    result: T | None = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            result = work()
        except Exception as err:  # re-raised below, after the other ranks heard of it
            error = err
            failed += 1
    ctx.all_reduce_max(failed)
    if error is not None:
        raise error
    if failed.item():
        raise RankFailed(f"rank {ctx.rank}: rank 0 failed while {what}; see its error above")
    return result
