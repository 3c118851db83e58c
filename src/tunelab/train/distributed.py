"""Data-parallel training on torch.distributed, launched by torchrun (one process per GPU or CPU slot).

Reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
the recipe's `train.distributed`; writes nothing itself (rank 0 writes the run's files, see loop.py;
under FSDP every rank writes its checkpoint shards).

The seam between the loop and torch.distributed is DistContext: rank, world size and the collective
operations the loop needs. In one process (SINGLE_PROCESS) they do nothing; ProcessGroupContext
(data-parallel, called ddp in the recipe) and FullyShardedContext (fsdp) do the real ones.

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

`train.distributed: fsdp` (full fine-tuning only): FullyShardedContext shards the model with FSDP2
(`fully_shard` on each decoder layer, then on the loss module, whose forward runs the decoder and
the LM head: so the embedding, final norm and the tied LM head weight are gathered by the root's
pre-forward hook). Each rank holds 1/N of the weights, gradients and AdamW state; a layer's weights
are gathered for its forward and backward only. Gradients are reduce-scattered after every
micro-batch with a divide factor of 1, so they are summed over ranks exactly as above (per-micro-
batch reduction keeps gradients sharded, which is why one shards at all). Forward and backward
passes are collectives here, so every rank runs the same number of them: a rank short of micro-
batches repeats one with zero weight (it would wait for the others anyway). Checkpoints are
sharded (torch.distributed.checkpoint, see checkpoint.py); the output is gathered on rank 0.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.train.checkpoint import (
    DCP_DIR,
    Checkpoint,
    TrainState,
    capture_rng,
    commit_sharded,
    finish_rank_files,
    load_weights,
    restore_rng,
    save_checkpoint,
    sharded_tmp_dir,
    start_sharded,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from tunelab.config import Recipe
    from tunelab.train.setup import TrainSetup

TIMEOUT_ENV = "TUNELAB_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
# gradients are reduced in buckets of about this many bytes: big messages, bounded extra memory
BUCKET_BYTES = 25 * 2**20

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# the seam: what the loop asks of the processes it runs in


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and the collectives the loop uses. One process: rank 0 of 1, and every
    operation is the identity. Under torchrun a subclass does the real all-reduces."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> Sequence[Any]:
        """This rank's share of a step's micro-batches (or of an evaluation set)."""
        return items[self.rank :: self.world_size]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def forward_backward(self) -> contextlib.AbstractContextManager:
        """Around each micro-batch's forward and backward pass (FSDP: they are collectives)."""
        return contextlib.nullcontext()

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """After a step's last micro-batch: sum the gradients over ranks (ProcessGroupContext)."""

    def barrier(self) -> None:
        pass

    # Under FSDP (FullyShardedContext) forward and backward passes are collectives and the
    # parameters are shards: the methods below are where that differs.
    lockstep = False  # passes are collectives: a signal stops a step only at its end, agreed by all

    def lockstep_shard(self, items: Sequence[Any]) -> tuple[Sequence[Any], int]:
        """This rank's passes over its share of `items` and how many of them are real; FSDP pads
        the share with zero-weight repeats so every rank runs as many passes."""
        mine = self.shard(items)
        return mine, len(mine)

    def prepare(self, setup: TrainSetup, recipe: Any) -> None:
        """After setup_training: FSDP shards the model here and rebuilds the optimizer over the shards."""

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip to a global norm; returns the norm before clipping (a plain tensor on every rank)."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def save_checkpoint(self, root: Path, setup: TrainSetup, state: TrainState) -> None:
        """Checkpoint step-N (train/checkpoint.py): rank 0 writes the whole trainable state."""
        if self.is_main:
            save_checkpoint(root, state.step, setup.trainable_state(), setup.optimizer.state_dict(), capture_rng(), state)

    def restore(self, setup: TrainSetup, checkpoint: Checkpoint) -> None:
        """Load a checkpoint's weights, optimizer state and generator states into `setup`."""
        if checkpoint.sharded:
            raise TunelabError(
                f"checkpoint {checkpoint.path} is sharded: written by {checkpoint.world_size} processes with "
                f"train.distributed: fsdp; resume it the same way (--nproc {checkpoint.world_size})"
            )
        setup.load_trainable_state(checkpoint.weights)
        setup.optimizer.load_state_dict(checkpoint.optimizer_state)
        restore_rng(checkpoint.rng)

    def load_weights(self, setup: TrainSetup, path: Path) -> None:
        """Only the weights of a checkpoint (the best one, for the run's output)."""
        setup.load_trainable_state(load_weights(path))

    def full_state_dict(self, setup: TrainSetup) -> dict[str, torch.Tensor] | None:
        """The whole model's weights for the output, or None: the model holds them itself. FSDP:
        gathered to CPU (a collective: every rank calls it)."""
        return None


SINGLE_PROCESS = DistContext()


# ----------------------------------------------------------------------------------------------
# torchrun: one process group, data-parallel (ddp) or sharded (fsdp)


class RankFailed(TunelabError):
    """A collective failed or timed out: another rank died, was killed or is unreachable."""

    exit_code = 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_strategy(distributed: str, method: str, world_size: int) -> str:
    """`train.distributed` -> none | ddp | fsdp. auto: none for one process, ddp otherwise (LoRA and
    full fine-tuning alike: the models tunelab targets fit one GPU with their AdamW state, and DDP
    communicates once per step where FSDP gathers every layer for every pass); fsdp when asked."""
    if distributed == "fsdp" and method != "full":
        raise ConfigError(
            f"train.distributed: fsdp shards full fine-tuning only, but method is {method}; its adapter is small "
            "and every GPU can hold the model: use ddp or auto"
        )
    if distributed == "none" and world_size > 1:
        raise ConfigError(
            f"train.distributed: none, but {world_size} processes were launched; use auto or ddp, or run one process"
        )
    if distributed == "auto":
        return "none" if world_size == 1 else "ddp"
    return distributed


@contextlib.contextmanager
def _collective(rank: int, what: str, compute: bool = False) -> Iterator[None]:
    """Turn a failed collective into RankFailed. `compute`: the block also computes (FSDP's forward
    and backward), so only errors of the communication library count; others (out of memory, a bug)
    pass unchanged."""
    from torch.distributed.checkpoint.api import CheckpointException  # DCP's, a BaseException

    try:
        yield
    except (RuntimeError, torch.distributed.DistError, CheckpointException) as err:
        from_comms = isinstance(err, torch.distributed.DistError) or any(
            name in str(err).lower() for name in ("gloo", "nccl")
        )
        if compute and (isinstance(err, torch.OutOfMemoryError) or not from_comms):
            raise
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


class FullyShardedContext(ProcessGroupContext):
    """FSDP2: the model, its gradients and optimizer state sharded over ranks (module docstring)."""

    lockstep = True

    def lockstep_shard(self, items: Sequence[Any]) -> tuple[Sequence[Any], int]:
        mine = list(self.shard(items))
        if not items:
            return mine, 0
        passes = math.ceil(len(items) / self.world_size)
        return mine + [items[0]] * (passes - len(mine)), len(mine)

    def forward_backward(self) -> contextlib.AbstractContextManager:
        """Around each forward/backward: its all-gathers and reduce-scatters fail as RankFailed."""
        return _collective(self.rank, "forward/backward (FSDP all-gather, reduce-scatter)", compute=True)

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Nothing: FSDP reduce-scattered (summed) each gradient during backward."""

    def prepare(self, setup: TrainSetup, recipe: Recipe) -> None:
        """Shard the model (loaded on the CPU, so no GPU ever holds all of it) onto this rank's device,
        and point the optimizer's parameter groups at the sharded parameters."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = torch.device(self.device())
        on_gpu = device.type == "cuda"
        bf16 = on_gpu and recipe.model.dtype in ("auto", "bfloat16")
        # bfloat16 compute, float32 gradient reduction (and float32 master weights for AdamW)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        mesh = init_device_mesh(device.type, (self.world_size,))
        model = setup.model
        names = {id(param): name for name, param in model.named_parameters()}
        old_groups = [(group, [names[id(p)] for p in group["params"]]) for group in setup.optimizer.param_groups]
        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
        if not layers:  # no layer class named: the decoder's ModuleLists (transformers' `layers`)
            layers = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
        with _collective(self.rank, "sharding the model (FSDP)"):
            for layer in layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(setup.loss_module, mesh=mesh, mp_policy=policy)
        for module in (*layers, setup.loss_module):
            # the loop divides by the GLOBAL trainable-token count: sum over ranks, do not average
            module.set_gradient_divide_factor(1.0)
            # a plain SUM reduce-scatter (a custom factor otherwise asks for PREMUL_SUM, which gloo lacks)
            module.set_force_sum_reduction_for_comms(True)
        # the optimizer has no state yet (AdamW creates it at the first step): point it at the shards
        params = dict(model.named_parameters())
        for group, group_names in old_groups:
            group["params"] = [params[name] for name in group_names]
        setup.device = device
        setup.autocast_dtype = torch.bfloat16 if bf16 else None

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        with _collective(self.rank, "gradient norm"):
            # over DTensor gradients the norm is reduced across ranks (the global norm)
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def save_checkpoint(self, root: Path, setup: TrainSetup, state: TrainState) -> None:
        """Every rank writes its shards (DCP) and rng; rank 0 the state, the manifest and COMPLETE."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.is_main:
            start_sharded(root, state.step)
        self.barrier()
        tmp = sharded_tmp_dir(root, state.step)
        model_state, optimizer_state = get_state_dict(setup.model, setup.optimizer)
        with _collective(self.rank, "writing a sharded checkpoint"):
            dcp.save({"model": model_state, "optimizer": optimizer_state},
                     storage_writer=dcp.FileSystemWriter(str(tmp / DCP_DIR), sync_files=True))
        files = finish_rank_files(tmp, self.rank, capture_rng())
        every_rank: list[Any] = [None] * self.world_size
        with _collective(self.rank, "gathering the checkpoint's file list"):
            torch.distributed.all_gather_object(every_rank, files)
        if self.is_main:
            commit_sharded(root, state.step, {k: v for part in every_rank for k, v in part.items()}, self.world_size, state)

    def restore(self, setup: TrainSetup, checkpoint: Checkpoint) -> None:
        """Load a sharded checkpoint into the sharded model and optimizer. Another world size works:
        DCP reads each rank's new shards from whichever files hold them; each rank then takes rank 0's
        generator states (dropout masks cannot repeat across a different split of the data anyway)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not checkpoint.sharded:
            raise TunelabError(
                f"checkpoint {checkpoint.path} is not sharded (written with train.distributed: ddp or none); "
                "resume it the same way"
            )
        model_state, optimizer_state = get_state_dict(setup.model, setup.optimizer)
        both = {"model": model_state, "optimizer": optimizer_state}
        with _collective(self.rank, "reading a sharded checkpoint"):
            dcp.load(both, storage_reader=dcp.FileSystemReader(str(checkpoint.path / DCP_DIR)))
        set_state_dict(setup.model, setup.optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
        own = checkpoint.path / f"rng-{self.rank}.json"
        same_split = checkpoint.world_size == self.world_size and own.is_file()
        restore_rng(json.loads(own.read_text()) if same_split else checkpoint.rng)

    def load_weights(self, setup: TrainSetup, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        problem = verify_checkpoint(path)
        if problem is not None:
            raise TunelabError(f"checkpoint {path} is unusable: {problem}")
        model_state = get_model_state_dict(setup.model)
        with _collective(self.rank, "reading a sharded checkpoint"):
            dcp.load({"model": model_state}, storage_reader=dcp.FileSystemReader(str(path / DCP_DIR)))
        set_model_state_dict(setup.model, model_state)

    def full_state_dict(self, setup: TrainSetup) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with _collective(self.rank, "gathering the weights"):
            # every rank takes part; rank 0 alone receives the weights, on the CPU
            full = get_model_state_dict(setup.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # a tied weight once, under its first name, as the model's own save_pretrained writes it
        tied = {n for n, _ in setup.model.named_parameters(remove_duplicate=False)}
        tied -= {n for n, _ in setup.model.named_parameters()}
        return {name: tensor for name, tensor in full.items() if name not in tied}


def with_strategy(ctx: DistContext, strategy: str) -> DistContext:
    """The context for a resolved strategy: FSDP needs a process group (torchrun); without one,
    fsdp runs as one ordinary process (the same training, nothing to shard over)."""
    if strategy == "fsdp" and isinstance(ctx, ProcessGroupContext):
        return FullyShardedContext(rank=ctx.rank, world_size=ctx.world_size, local_rank=ctx.local_rank)
    return ctx


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
