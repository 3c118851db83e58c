"""Pack tokenized examples into rows, plan the optimizer steps of a run, and collate rows into tensors.

Reads tokenized examples (`{"input_ids": [...], "labels": [...]}`, labels -100 on untrained tokens,
as written to `*.tokens.jsonl` by the data stage); writes nothing. Three pieces, used by the
training loop, evaluation and the benchmarks alike:

- rows: `pack_rows` puts whole examples into rows of at most `row_tokens` tokens (best-fit
  decreasing: few rows, little padding); `single_rows` is the unpacked path (one example a row).
- the plan: `plan_steps` shuffles the rows with a generator seeded by (seed, epoch), cuts each epoch
  into optimizer steps of at most `tokens_per_step` real tokens and each step into micro-batches of
  at most `micro_batch_tokens` (padded) tokens. A `Step` is pure data, so a run resumes at the exact
  data position by its index.
- `collate`: rows -> input_ids, labels, restarting position_ids and a 4-D block-diagonal causal
  boolean attention mask. Restarting position_ids alone do NOT isolate packed examples under SDPA
  (measured: the second example's logits change); the mask does, so each example sees only itself,
  as if it ran alone.
- `collate_varlen`: the same examples as ONE row without padding between examples, plus the
  cumulative sequence lengths a variable-length attention kernel needs (train/attention.py). No
  (length x length) mask is built, and attention costs each example its own length squared.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100

Row = tuple[int, ...]  # indices of the examples packed into one row, in order


def example_length(example: dict[str, Any]) -> int:
    return len(example["input_ids"])


def trainable_count(example: dict[str, Any]) -> int:
    """Tokens whose prediction is trained. The first token of an example has nothing before it to
    predict it from, so it never counts (the same as running the example alone). A preference pair
    (data/preference.py) says its own count, `loss_units`: its loss is a mean over pairs."""
    units = example.get("loss_units")
    if units is not None:
        return units
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------
# rows


def trained_positions(labels: Sequence[int]) -> list[int]:
    """Indices t whose label is trained (the loss predicts labels[t] from position t - 1). The first token
    has nothing before it and never counts (trainable_count)."""
    return [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[Row]:
    """Best-fit decreasing: longest examples first, each into the row whose free space it fills most
    tightly. Whole examples only; deterministic for the same lengths."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > row_tokens]
    if too_long:
        index, length = max(too_long, key=lambda item: item[1])
        raise ConfigError(
            f"example {index} has {length} tokens, more than a row holds ({row_tokens}); raise "
            f"train.micro_batch_tokens to at least data.max_seq_len ({len(too_long)} example(s) too long)"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # free space -> rows with exactly that much free space; `free_sizes` keeps the keys sorted
    by_free: dict[int, list[int]] = {}
    free_sizes: list[int] = []
    for index in order:
        length = lengths[index]
        at = bisect.bisect_left(free_sizes, length)
        if at < len(free_sizes):
            free = free_sizes[at]
            row_id = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_sizes.pop(at)
        else:
            free = row_tokens
            row_id = len(rows)
            rows.append([])
        rows[row_id].append(index)
        left = free - length
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free_sizes, left)
            by_free[left].append(row_id)
    return [tuple(row) for row in rows]


def single_rows(count: int) -> list[Row]:
    """The unpacked path: one example per row (rows of a micro-batch are padded to the longest)."""
    return [(i,) for i in range(count)]


# ----------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Step:
    """One optimizer step: which rows, split into micro-batches (forward/backward passes).

    `position` is the index of its first row in the epoch's shuffled order: (epoch, position) is the
    data position a checkpoint records. `tokens` counts real (non-pad) tokens; `trainable_tokens`
    the tokens whose prediction is trained: the step's loss is summed over them all and divided by
    this count, whatever the micro-batching (or, under torchrun, the sharding across ranks).
    """

    epoch: int
    position: int
    micro_batches: tuple[tuple[Row, ...], ...]
    tokens: int
    trainable_tokens: int
    progress: float  # fraction of the epoch's rows read once this step is done


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of the rows in an epoch: a fixed function of (seed, epoch), so a resumed
    run reads exactly the rows the uninterrupted one would have."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=generator).tolist()


def group_micro_batches(
    rows: Sequence[Row], row_lengths: Sequence[int], micro_batch_tokens: int, padded: bool = True
) -> list[tuple[Row, ...]]:
    """Split a step's rows into micro-batches whose padded size (rows x longest row) fits
    `micro_batch_tokens`, or, with `padded=False` (the varlen layout: rows end to end), whose
    total length does. Rows are sorted longest first so that rows of similar length share a
    micro-batch (less padding); a row longer than the budget goes alone."""
    order = sorted(range(len(rows)), key=lambda i: (-row_lengths[i], rows[i]))
    batches: list[tuple[Row, ...]] = []
    current: list[Row] = []
    longest = used = 0
    for i in order:
        # rows come longest first, so the batch's longest row is its first one
        width = longest or row_lengths[i]
        size = (len(current) + 1) * width if padded else used + row_lengths[i]
        if current and size > micro_batch_tokens:
            batches.append(tuple(current))
            current, longest, used = [], 0, 0
        if not current:
            longest = row_lengths[i]
        current.append(rows[i])
        used += row_lengths[i]
    if current:
        batches.append(tuple(current))
    return batches


def plan_steps(
    examples: Sequence[dict[str, Any]],
    rows: Sequence[Row],
    *,
    tokens_per_step: int,
    micro_batch_tokens: int,
    epochs: float,
    seed: int,
    max_steps: int | None = None,
    padded: bool = True,
    rows_of_epoch: Callable[[int], Sequence[Row]] | None = None,
) -> list[Step]:
    """Every optimizer step of a run, in order. Each epoch shuffles the rows (seeded) and cuts them
    into steps of at most `tokens_per_step` real tokens (at least one row a step). A fractional last
    epoch runs that fraction of its steps (rounded up); `max_steps` caps the total. `padded`: see
    group_micro_batches. `rows_of_epoch`: the rows epoch e reads instead of `rows` (replay spread
    across the passes: data/replay.py ReplaySlices)."""
    if not rows:
        raise ConfigError("no training examples to train on (the train split is empty)")
    lengths = [example_length(e) for e in examples]
    trainable = [trainable_count(e) for e in examples]
    steps: list[Step] = []
    epoch = 0
    while epoch < epochs and (max_steps is None or len(steps) < max_steps):
        if rows_of_epoch is not None:
            rows = rows_of_epoch(epoch)
        row_lengths = [sum(lengths[i] for i in row) for row in rows]
        row_trainable = [sum(trainable[i] for i in row) for row in rows]
        order = epoch_order(len(rows), seed, epoch)
        epoch_steps: list[Step] = []
        start = 0
        while start < len(order):
            end, tokens = start, 0
            while end < len(order) and (end == start or tokens + row_lengths[order[end]] <= tokens_per_step):
                tokens += row_lengths[order[end]]
                end += 1
            picked = [order[i] for i in range(start, end)]
            micro = group_micro_batches(
                [rows[r] for r in picked], [row_lengths[r] for r in picked], micro_batch_tokens, padded
            )
            epoch_steps.append(
                Step(epoch, start, tuple(micro), tokens, sum(row_trainable[r] for r in picked), end / len(order))
            )
            start = end
        fraction = min(1.0, epochs - epoch)
        # a small tolerance so that e.g. 0.3 x 10 steps is 3, not 4 after float rounding
        keep = max(1, math.ceil(fraction * len(epoch_steps) - 1e-9))
        steps.extend(epoch_steps[:keep])
        epoch += 1
    return steps[:max_steps] if max_steps is not None else steps


# ----------------------------------------------------------------------------------------------
# tensors


@dataclass
class Batch:
    """Model inputs for one micro-batch. `labels` are aligned with `input_ids` (the loss shifts them);
    the first token of every example is -100 so no prediction crosses an example boundary.
    `attention_mask` is None when every row holds one example (plain causal; padding follows it)."""

    input_ids: torch.Tensor  # (rows, length) int64
    labels: torch.Tensor  # (rows, length) int64
    position_ids: torch.Tensor  # (rows, length) int64, restarting at 0 for each example
    attention_mask: torch.Tensor | None  # (rows, 1, length, length) bool, True = may attend
    tokens: int  # real (non-pad) tokens
    trainable_tokens: int
    # variable-length layout (collate_varlen): one row; sequence k spans cu_seqlens[k]:cu_seqlens[k+1]
    cu_seqlens: torch.Tensor | None = None  # (sequences + 1,) int32
    max_seqlen: int = 0  # an upper bound on the longest sequence (a fixed bound avoids recompiles)
    # the KL anchor (train/anchor.py), aligned with labels, when an example of the batch has one:
    # (rows, length, k) base top-k ids, their renormalised log-probs, and weight x prob (0 where none)
    anchor_ids: torch.Tensor | None = None
    anchor_logp: torch.Tensor | None = None
    anchor_coef: torch.Tensor | None = None

    def to(self, device: Any) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.labels), move(self.position_ids), move(self.attention_mask),
            self.tokens, self.trainable_tokens, move(self.cu_seqlens), self.max_seqlen,
            move(self.anchor_ids), move(self.anchor_logp), move(self.anchor_coef),
        )

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for CausalLMLoss (train/loss.py)."""
        inputs = {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids,
                  "attention_mask": self.attention_mask}
        if self.cu_seqlens is not None:
            inputs.update(cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen)
        if self.anchor_coef is not None:
            inputs.update(anchor_ids=self.anchor_ids, anchor_logp=self.anchor_logp, anchor_coef=self.anchor_coef)
        return inputs


def _anchor_tensors(examples: Sequence[dict[str, Any]], placed: Sequence[tuple[int, int, int]],
                    shape: tuple[int, int]) -> tuple[Any, Any, Any]:
    """The anchor tensors of a batch whose example `index` sits in row `r` from offset `at` (placed:
    (index, r, at)); (None, None, None) when none of them has an anchor (train/anchor.py)."""
    import torch

    anchored = [(i, r, at) for i, r, at in placed if examples[i].get("anchor_ids")]
    if not anchored:
        return None, None, None
    k = len(examples[anchored[0][0]]["anchor_ids"][0])
    ids = torch.zeros((*shape, k), dtype=torch.long)
    logp = torch.zeros((*shape, k), dtype=torch.float32)
    coef = torch.zeros((*shape, k), dtype=torch.float32)
    for index, r, at in anchored:
        example = examples[index]
        positions = [at + t for t in range(1, len(example["labels"])) if example["labels"][t] != IGNORE_INDEX]
        values = torch.tensor(example["anchor_logp"], dtype=torch.float32)
        ids[r, positions] = torch.tensor(example["anchor_ids"], dtype=torch.long)
        logp[r, positions] = values
        coef[r, positions] = float(example["anchor_weight"]) * values.exp()
    return ids, logp, coef


def _place(example: dict[str, Any], input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, at: int) -> tuple[int, int]:
    """Write one example into a row's tensors from offset `at`: its tokens, its labels with the first
    one -100 (nothing before it in its example predicts it) and positions from 0. Returns (its
    length, its trained tokens)."""
    import torch

    n = example_length(example)
    input_ids[at : at + n] = torch.tensor(example["input_ids"], dtype=torch.long)
    example_labels = torch.tensor(example["labels"], dtype=torch.long)
    example_labels[0] = IGNORE_INDEX
    labels[at : at + n] = example_labels
    position_ids[at : at + n] = torch.arange(n)
    return n, int((example_labels != IGNORE_INDEX).sum())


def collate(examples: Sequence[dict[str, Any]], rows: Sequence[Row], pad_id: int) -> Batch:
    """Concatenate each row's examples, pad rows to the longest, and build segment-aware inputs.

    Segment k of a row (its k-th example) attends causally to itself only; padding forms a segment
    of its own at the end of the row (it attends to earlier padding, so no attention row is empty
    and SDPA never produces NaN), with labels -100."""
    import torch

    lengths = [sum(example_length(examples[i]) for i in row) for row in rows]
    width = max(lengths)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segments = torch.full((n_rows, width), -1, dtype=torch.long)
    trainable = 0
    placed = []
    for r, row in enumerate(rows):
        at = 0
        for segment, index in enumerate(row):
            n, trained = _place(examples[index], input_ids[r], labels[r], position_ids[r], at)
            placed.append((index, r, at))
            segments[r, at : at + n] = segment
            trainable += trained
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    # one example a row: padding sits after it, where a causal row never looks, so no mask is needed
    # (the padding positions' outputs are garbage, and their labels are -100)
    single = all(len(row) == 1 for row in rows)
    mask = None
    if not single:
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None, :, :]
    anchor = _anchor_tensors(examples, placed, (n_rows, width))
    return Batch(input_ids, labels, position_ids, mask, sum(lengths), trainable, None, 0, *anchor)


def collate_varlen(
    examples: Sequence[dict[str, Any]], rows: Sequence[Row], pad_id: int, *, pad_to_multiple: int = 1, max_seqlen: int = 0
) -> Batch:
    """Every example of `rows`, in order, end to end in one row of shape (1, tokens), with restarting
    position_ids and cu_seqlens marking where each example starts. Nothing is padded between
    examples; with `pad_to_multiple` > 1 the row ends with padding (a sequence of its own, labels
    -100) up to a multiple of it, so that compiled kernels see few distinct shapes. `max_seqlen`
    (0: the longest example) is passed to the kernel as the longest sequence; a fixed bound is
    allowed (it only sizes the kernel's grid) and keeps compiled graphs from specialising on it."""
    import torch

    order = [index for row in rows for index in row]
    lengths = [example_length(examples[i]) for i in order]
    tokens = sum(lengths)
    width = -(-tokens // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((1, width), pad_id, dtype=torch.long)
    labels = torch.full((1, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((1, width), dtype=torch.long)
    boundaries = [0]
    trainable = 0
    at = 0
    placed = []
    for index in order:
        n, trained = _place(examples[index], input_ids[0], labels[0], position_ids[0], at)
        placed.append((index, 0, at))
        trainable += trained
        at += n
        boundaries.append(at)
    if width > tokens:
        position_ids[0, tokens:] = torch.arange(width - tokens)
        boundaries.append(width)
    longest = max(lengths + [width - tokens])
    cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
    anchor = _anchor_tensors(examples, placed, (1, width))
    return Batch(input_ids, labels, position_ids, None, tokens, trainable, cu_seqlens, max(longest, max_seqlen), *anchor)
