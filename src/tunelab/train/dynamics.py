"""Training dynamics: each train example's loss every time a step trains on it.

Reads the per-token losses the loss module already returns for every micro-batch of a step
(train/loss.py: LossSums.token_losses, row-major) and the micro-batch's rows (data/pack.py): the
k-th example of a micro-batch owns the next trainable_count(example) of those losses, because
collate and collate_varlen lay examples out row by row and give each example's first label -100.
No extra forward pass: the reduction is one index_add over the step's tokens, once a step.

Writes train/dynamics.jsonl (rank r > 0 of a torchrun run: train/dynamics.rank-r.jsonl), one line
per optimizer step that changed the weights (docs/run-directory.md):
    {"step": 12, "epoch": 1, "examples": [index, ...], "loss_sum": [...], "tokens": [...]}
`examples` index the lines of data/train.tokens.jsonl; `loss_sum` is the example's summed
cross-entropy over its answer tokens (nats) and `tokens` how many there are, so its mean loss is
loss_sum / tokens. A resumed run drops the lines of steps after its checkpoint, so each step
appears once. `read_dynamics` reads them back (the audit: eval/audit.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.pack import Row, trainable_count

if TYPE_CHECKING:
    import torch

DYNAMICS_FILE = "dynamics.jsonl"


def dynamics_path(train_dir: Path, rank: int = 0) -> Path:
    return train_dir / (DYNAMICS_FILE if rank == 0 else f"dynamics.rank-{rank}.jsonl")


def example_losses(
    examples: Sequence[dict[str, Any]], micro_batches: Sequence[Sequence[Row]], token_losses: Sequence[torch.Tensor],
    trainable: Sequence[int] | None = None,
) -> tuple[list[int], list[float], list[int]]:
    """(example indices, summed loss, trainable tokens) of every example of `micro_batches`, from
    each micro-batch's per-token losses. `trainable`: trainable_count of every example, if known."""
    import torch

    order = [index for micro in micro_batches for row in micro for index in row]
    counts = [trainable[i] if trainable is not None else trainable_count(examples[i]) for i in order]
    if not order:
        return [], [], []
    losses = torch.cat([t.detach().float().reshape(-1) for t in token_losses]).cpu()
    if losses.numel() != sum(counts):
        raise RuntimeError(f"training dynamics: {losses.numel()} token losses for {sum(counts)} trainable tokens")
    owner = torch.repeat_interleave(torch.arange(len(order)), torch.tensor(counts, dtype=torch.long))
    sums = torch.zeros(len(order), dtype=torch.float64).index_add_(0, owner, losses.double())
    return order, sums.tolist(), counts


@dataclass
class DynamicsRecorder:
    """Collects a step's per-token losses (`add`, once per micro-batch) and writes the step's line
    (`write_step`) once the step has changed the weights; `discard` forgets a step not taken."""

    path: Path
    examples: Sequence[dict[str, Any]]
    trainable: list[int] = field(default_factory=list)
    _micro: list[Sequence[Row]] = field(default_factory=list)
    _losses: list[Any] = field(default_factory=list)
    _file: Any = None

    @classmethod
    def open(cls, train_dir: Path, examples: Sequence[dict[str, Any]], done_steps: int, rank: int = 0) -> DynamicsRecorder:
        """Start or continue this rank's file: lines of steps after `done_steps` (an interrupted
        run's work past its checkpoint) are dropped."""
        train_dir.mkdir(parents=True, exist_ok=True)
        path = dynamics_path(train_dir, rank)
        kept = []
        if done_steps > 0 and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= done_steps]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        recorder = cls(path, examples, [trainable_count(e) for e in examples])
        recorder._file = path.open("a", encoding="utf-8")
        return recorder

    def add(self, micro: Sequence[Row], losses: torch.Tensor | None) -> None:
        if losses is not None:
            self._micro.append(micro)
            self._losses.append(losses.detach())

    def discard(self) -> None:
        self._micro, self._losses = [], []

    def write_step(self, step: int, epoch: int, keep: bool = True) -> None:
        """Step `step` (1-based, as in log.jsonl) of epoch `epoch` (0-based) trained on what was
        added; `keep=False` (a skipped step): nothing is written."""
        if not keep:
            self.discard()
            return
        order, sums, counts = example_losses(self.examples, self._micro, self._losses, self.trainable)
        self.discard()
        if order and self._file is not None:
            self._file.write(json.dumps({"step": step, "epoch": epoch, "examples": order,
                                         "loss_sum": [round(s, 5) for s in sums], "tokens": counts}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class ExampleDynamics:
    """One train example's losses, in the order the run saw it."""

    index: int
    steps: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    mean_losses: list[float] = field(default_factory=list)  # per answer token, nats
    tokens: int = 0


def read_dynamics(train_dir: Path) -> dict[int, ExampleDynamics]:
    """Every rank's train/dynamics*.jsonl, by example index (examples never seen are absent)."""
    found: dict[int, ExampleDynamics] = {}
    lines = []
    for path in sorted(train_dir.glob("dynamics*.jsonl")):
        lines += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for record in sorted(lines, key=lambda r: r["step"]):
        for index, loss_sum, tokens in zip(record["examples"], record["loss_sum"], record["tokens"], strict=True):
            entry = found.setdefault(index, ExampleDynamics(index))
            entry.steps.append(record["step"])
            entry.epochs.append(record["epoch"])
            entry.mean_losses.append(loss_sum / max(1, tokens))
            entry.tokens = tokens
    return found
