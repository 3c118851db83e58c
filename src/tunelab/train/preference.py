"""Preference tuning (`method: dpo`): the DPO (IPO, or one-stage ORPO) loss over both answers of
each pair in one batch, or KTO's over unpaired examples and their mismatched KL sides, and the
reference model's log-probs, computed once for the whole run (ORPO has no reference).

Reads pair examples (data/preference.py's *.tokens.jsonl rows: `input_ids` = the chosen side's ids
then the rejected side's, `labels`, `chosen_tokens`, `loss_units` 1) and the TrainSetup of the
weights DPO trains (dpo.weights: a LoRA/DoRA adapter or all of them). Writes
train/reference_logps.json (not for orpo): the reference's sequence log-probs of every train and
valid pair, so a resumed run skips that pass. The training loop stays train/loop.py's: this module passes in its
loss module (PreferenceLoss as setup.loss_module) and its batches (setup.make_batches).

Per pair, with sequence log-probs over the answer tokens only (the prompt is never scored; the
answer's end-of-turn token is), and the reference ref = the model as training starts:
  log_ratio = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))
  reward margin = beta * log_ratio       (the implicit rewards' difference; > 0: ranked right)
  sigmoid (DPO, Rafailov et al. 2023):  -log sigmoid(beta * log_ratio)
  ipo (Azar et al. 2023):               (log_ratio - 1 / (2 beta))^2
  both plus dpo.sft_weight x (-a(chosen)), a = the mean log-prob per answer token (below): supervised
    learning on the preferred answer beside the preference (TRL's rpo_alpha, LLaMA-Factory's
    pref_ftx), which keeps DPO from buying its margin by pushing the rejected answer down alone,
    the likelihood of good text with it (the degenerate repeated lines of a small model).
  orpo (Hong et al. 2024; one stage, no reference: nothing is computed before step 1), with
  lambda = dpo.orpo_lambda and the mean log-prob per answer token a = log pi(answer) / its tokens:
                                        -a(chosen) - lambda * log sigmoid(log_odds), where
      log_odds = (a(chosen) - a(rejected)) - (log(1 - exp a(chosen)) - log(1 - exp a(rejected)))
      reward margin = lambda * (a(chosen) - a(rejected))     (TRL's ORPOTrainer's rewards)
    as TRL's ORPOTrainer (odds_ratio_loss) computes it, except that its supervised term is here the
    mean over each preferred answer's tokens (TRL: over the batch's prompt and answer tokens; the
    prompt is never trained here, as in supervised runs).
  kto (Ethayarajh et al. 2024; unpaired examples, a row's second sequence is its KL side: the same
    prompt with another example's completion), as TRL's KTOTrainer: with r = log pi(completion) -
    log ref(completion) and z = the micro-batch's mean of log pi(KL side) - log ref(KL side), no
    gradient, at least 0:
      desirable:    w_d * (1 - sigmoid(beta * (r - z)))
      undesirable:  w_u * (1 - sigmoid(beta * (z - r)))
      reward margin = beta * r, negated for undesirable examples (> 0: moved the right way)
    (TRL estimates z over the device batch; here over the micro-batch, each example's KL side fixed
    when the data is prepared.)
The loss of a step is the mean over its pairs. Both answers of a pair are packed into the same row
(each attends only to itself: data/pack.py's block-diagonal mask, or varlen attention on a GPU).

The reference is the model as set up, before any step (and before a resumed run loads its
checkpoint): the base with a fresh adapter switched off, or the supervised parent when model.adapter
names one (then the parent's adapter is the starting point, so it stays on). No second model is held:
the reference's log-probs are one forward pass without gradients over the pairs, before step 1.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelab.contract import DataFingerprint
from tunelab.data.pack import (
    Batch,
    Row,
    collate,
    collate_varlen,
    example_length,
    group_micro_batches,
    pack_rows,
)
from tunelab.files import write_text_atomic
from tunelab.runs import RunPaths
from tunelab.train.loop import VARLEN_PAD_MULTIPLE, attention_layout, autocast
from tunelab.train.loss import LOGITS_PER_CHUNK, LOGITS_PER_CHUNK_GPU, CausalLMLoss, LossSums

if TYPE_CHECKING:
    from tunelab.config import DpoConfig, Recipe
    from tunelab.train.setup import TrainSetup


# ----------------------------------------------------------------------------------------------
# batches


@dataclass
class PairBatch:
    """Both answers of every pair of a micro-batch as packed sequences: pair k's chosen side is
    sequence 2k, its rejected side 2k + 1."""

    batch: Batch
    sequence_ids: torch.Tensor  # (rows, length) int64: the sequence of each position, -1 for padding
    reference_logps: torch.Tensor | None  # (2 x pairs,) float32; None while the reference is computed
    pairs: int
    kto_labels: torch.Tensor | None = None  # (pairs,) bool: unpaired examples' labels (True desirable)

    def to(self, device: Any) -> PairBatch:
        reference = None if self.reference_logps is None else self.reference_logps.to(device)
        labels = None if self.kto_labels is None else self.kto_labels.to(device)
        return PairBatch(self.batch.to(device), self.sequence_ids.to(device), reference, self.pairs, labels)

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for PreferenceLoss."""
        return {**self.batch.model_inputs(), "sequence_ids": self.sequence_ids,
                "reference_logps": self.reference_logps, "n_sequences": 2 * self.pairs,
                **({} if self.kto_labels is None else {"kto_labels": self.kto_labels})}


def _sides(example: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(chosen, rejected) of a pair example. An example that is not a pair (the GPU memory probe's
    random rows) is cut in half: the same tokens and the same work."""
    ids, labels = example["input_ids"], example["labels"]
    n = example.get("chosen_tokens", len(ids) // 2)
    return {"input_ids": ids[:n], "labels": labels[:n]}, {"input_ids": ids[n:], "labels": labels[n:]}


def pair_batches(
    setup: TrainSetup, examples: Sequence[dict[str, Any]], pad_id: int
) -> Callable[[Sequence[Row]], PairBatch]:
    """rows of pairs -> a PairBatch on the setup's device, in the layout its attention takes."""
    varlen = setup.attention == "varlen"
    longest = max((example_length(e) for e in examples), default=1)
    unpaired = any("kto_label" in e for e in examples[:1]) or getattr(setup.loss_module, "loss", None) == "kto"
    multiple = VARLEN_PAD_MULTIPLE if setup.device.type == "cuda" else 1

    def build(rows: Sequence[Row]) -> PairBatch:
        sequences: list[dict[str, Any]] = []
        sequence_rows: list[Row] = []
        reference: list[float] | None = []
        labels: list[bool] = []
        for row in rows:
            local = []
            for index in row:
                example = examples[index]
                local += [len(sequences), len(sequences) + 1]
                sequences.extend(_sides(example))
                labels.append(bool(example.get("kto_label", 1)))  # the memory probe's rows: any label
                logps = example.get("reference_logps")
                if logps is None and "chosen_tokens" not in example:
                    logps = (0.0, 0.0)  # not a pair (memory probe): any reference does the same work
                reference = None if logps is None or reference is None else [*reference, *logps]
            sequence_rows.append(tuple(local))
        if varlen:
            batch = collate_varlen(sequences, sequence_rows, pad_id, pad_to_multiple=multiple, max_seqlen=longest)
            layout = [[i for row in sequence_rows for i in row]]
        else:
            batch = collate(sequences, sequence_rows, pad_id)
            layout = [list(row) for row in sequence_rows]
        sequence_ids = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
        for r, row in enumerate(layout):
            at = 0
            for s in row:
                n = example_length(sequences[s])
                sequence_ids[r, at : at + n] = s
                at += n
        pairs = len(sequences) // 2
        reference_logps = None if reference is None else torch.tensor(reference, dtype=torch.float32)
        kto_labels = torch.tensor(labels, dtype=torch.bool) if unpaired else None
        return PairBatch(batch, sequence_ids, reference_logps, pairs, kto_labels).to(setup.device)

    return build


# ----------------------------------------------------------------------------------------------
# the loss


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 softcap: float | None, compute_dtype: torch.dtype) -> torch.Tensor:
    logits = (hidden.to(compute_dtype) @ weight.to(compute_dtype).T).float()
    if bias is not None:
        logits = logits + bias.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
                softcap: float | None = None, compute_dtype: torch.dtype | None = None,
                chunk_rows: int | None = None) -> torch.Tensor:
    """log p(target) of each row of hidden (N, H) under the LM head weight (V, H): (N,) float32.
    Chunked like loss.py, and each chunk's logits are recomputed in the backward pass instead of
    kept (activation checkpointing), so no (tokens x vocab) tensor outlives its chunk."""
    per_chunk = LOGITS_PER_CHUNK_GPU if hidden.is_cuda else LOGITS_PER_CHUNK
    chunk_rows = chunk_rows or max(1, per_chunk // weight.shape[0])
    compute_dtype = compute_dtype or weight.dtype
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for start in range(0, hidden.shape[0], chunk_rows):
        args = (hidden[start : start + chunk_rows], weight, bias, targets[start : start + chunk_rows], softcap, compute_dtype)
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if grad else _chunk_logps(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2 (as TRL computes it)."""
    x = x.clamp(max=-1e-7)  # an answer the model is certain of (mean log-prob 0): odds stay finite
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(policy: torch.Tensor, tokens: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reward margin) per pair (the module docstring's orpo) from summed log-probs and answer
    token counts laid out chosen, rejected, chosen, ..."""
    mean = policy / tokens.clamp(min=1)
    chosen, rejected = mean[0::2], mean[1::2]
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return -chosen - lam * F.logsigmoid(log_odds), lam * (chosen - rejected)


def kto_losses(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reward margin) per unpaired example (the module docstring's kto) from sequence log-probs
    laid out completion, KL side, completion, ..."""
    log_ratio = policy[0::2] - reference[0::2]
    kl = (policy[1::2] - reference[1::2]).mean().detach().clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - log_ratio))))
    return losses, torch.where(desirable, beta * log_ratio, -beta * log_ratio)


def preference_losses(policy: torch.Tensor, reference: torch.Tensor, beta: float, loss: str,
                      tokens: torch.Tensor | None = None, sft_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reward margin) per pair from sequence log-probs laid out chosen, rejected, chosen, ...;
    with `sft_weight`, plus that times the preferred answer's negative mean log-prob per token (`tokens`:
    each sequence's answer token count, same layout)."""
    log_ratio = (policy[0::2] - reference[0::2]) - (policy[1::2] - reference[1::2])
    margin = beta * log_ratio
    losses = (log_ratio - 1.0 / (2.0 * beta)) ** 2 if loss == "ipo" else -F.logsigmoid(margin)
    if sft_weight and tokens is not None:
        losses = losses - sft_weight * policy[0::2] / tokens[0::2].clamp(min=1)
    return losses, margin


class PreferenceLoss(CausalLMLoss):
    """The model plus the preference loss, as one module (the seam DDP wraps, like CausalLMLoss):
    forward(PairBatch.model_inputs()) -> LossSums(loss summed over pairs, pairs, pairs ranked
    right, reward margins summed)."""

    def __init__(self, model: nn.Module, beta: float, loss: str = "sigmoid", chunk_rows: int | None = None,
                 orpo_lambda: float = 0.1, kto_weights: tuple[float, float] = (1.0, 1.0), sft_weight: float = 0.0) -> None:
        super().__init__(model, chunk_rows)
        self.beta, self.loss, self.orpo_lambda, self.kto_weights = beta, loss, orpo_lambda, kto_weights
        self.sft_weight = sft_weight  # sigmoid and ipo: the supervised term on the preferred answer

    @property
    def needs_reference(self) -> bool:
        return self.loss != "orpo"

    def sequence_logps(
        self, input_ids: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor, n_sequences: int,
        position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0, **_: Any,
    ) -> torch.Tensor:
        """(n_sequences,) float32: each sequence's summed log-prob of its labelled (answer) tokens."""
        return self._sequence_logps(input_ids, labels, sequence_ids, n_sequences, position_ids, attention_mask,
                                    cu_seqlens, max_seqlen)[0]

    def _sequence_logps(
        self, input_ids: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor, n_sequences: int,
        position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
        max_seqlen: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probs, labelled token counts), each (n_sequences,)."""
        hidden, head = self.hidden_states(input_ids, position_ids, attention_mask, cu_seqlens, max_seqlen)
        targets = labels[:, 1:]
        trainable = targets != -100
        logps = token_logps(hidden[:, :-1][trainable], head.weight, targets[trainable], getattr(head, "bias", None),
                            self.softcap, self.compute_dtype(hidden, head), self.chunk_rows)
        owner = sequence_ids[:, 1:][trainable]
        return logps.new_zeros(n_sequences).index_add(0, owner, logps), torch.bincount(owner, minlength=n_sequences)

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor,
        reference_logps: torch.Tensor | None, n_sequences: int, position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0,
        kto_labels: torch.Tensor | None = None,
    ) -> LossSums:
        if reference_logps is None and self.needs_reference:
            raise RuntimeError("preference batch without reference log-probs: attach_reference runs before training")
        policy, tokens = self._sequence_logps(input_ids, labels, sequence_ids, n_sequences, position_ids,
                                              attention_mask, cu_seqlens, max_seqlen)
        if self.loss == "orpo":
            losses, margins = orpo_losses(policy, tokens, self.orpo_lambda)
        elif self.loss == "kto":
            if kto_labels is None:
                raise RuntimeError("dpo.loss kto needs unpaired examples (kto_label in the rows)")
            losses, margins = kto_losses(policy, reference_logps, kto_labels, self.beta, *self.kto_weights)
        else:
            losses, margins = preference_losses(policy, reference_logps, self.beta, self.loss, tokens, self.sft_weight)
        pairs = torch.tensor(n_sequences // 2, device=policy.device)
        return LossSums(losses.sum(), pairs, (margins > 0).sum(), reward_margin_sum=margins.detach().sum())


def rows_for_pairs(recipe: Recipe, examples: Sequence[dict[str, Any]]) -> Recipe:
    """The recipe the training stage sizes its rows and micro-batches by: data.max_seq_len bounds
    each side of a pair, so a pair (never split across rows) is up to twice as long. Refuses pairs
    without `method: dpo`, and chat examples with it."""
    from tunelab.errors import ConfigError

    pairs = any("loss_units" in e for e in examples[:1])
    if pairs and recipe.method != "dpo":
        raise ConfigError(f"data.train ({recipe.data.train}) holds preference pairs: train on them with method: dpo "
                          "(or give chat examples)")
    if not pairs and examples:
        raise ConfigError(f"method: dpo trains on preference pairs, but data.train ({recipe.data.train}) holds chat "
                          "examples (see docs/data-checks.md for the pair formats)")
    unpaired = any("kto_label" in e for e in examples[:1])
    if unpaired != (recipe.dpo.loss == "kto"):
        raise ConfigError(
            f"data.train ({recipe.data.train}) holds unpaired {{prompt, completion, label}} examples: train on them "
            "with dpo.loss: kto" if unpaired else
            f"dpo.loss: kto trains on unpaired {{prompt, completion, label}} examples, but data.train "
            f"({recipe.data.train}) holds pairs: choose dpo.loss sigmoid, ipo or orpo")
    data = recipe.data.model_copy(update={"max_seq_len": 2 * recipe.data.max_seq_len})
    return recipe.model_copy(update={"data": data})


def preference_setup(setup: TrainSetup, cfg: DpoConfig) -> TrainSetup:
    """The setup of the weights DPO trains, with the preference loss and its batches passed in."""
    setup.loss_module = PreferenceLoss(setup.model, cfg.beta, cfg.loss, orpo_lambda=cfg.orpo_lambda,
                                       kto_weights=(cfg.kto_desirable_weight, cfg.kto_undesirable_weight),
                                       sft_weight=cfg.sft_weight)
    setup.make_batches = lambda examples, pad_id: pair_batches(setup, examples, pad_id)
    return setup


# ----------------------------------------------------------------------------------------------
# the reference


def reference_logps(
    setup: TrainSetup, examples: Sequence[dict[str, Any]], pad_id: int, micro_batch_tokens: int, adapter_off: bool,
) -> list[tuple[float, float]]:
    """(chosen, rejected) sequence log-probs of each pair under the model as it stands (dropout off),
    with the PEFT adapter switched off when `adapter_off`."""
    if not examples:
        return []
    lengths = [example_length(e) for e in examples]
    width = max(micro_batch_tokens, max(lengths))
    rows = pack_rows(lengths, width)
    micro_batches = group_micro_batches(rows, [sum(lengths[i] for i in row) for row in rows], width)
    build = pair_batches(setup, [{k: v for k, v in e.items() if k != "reference_logps"} for e in examples], pad_id)
    model, module = setup.model, setup.loss_module
    was_training = model.training
    model.eval()
    found: dict[int, tuple[float, float]] = {}
    switch_off = model.disable_adapter() if adapter_off and hasattr(model, "disable_adapter") else nullcontext()
    with torch.no_grad(), switch_off, autocast(setup), attention_layout(setup):
        for micro in micro_batches:
            batch = build(micro)
            logps = module.sequence_logps(**batch.model_inputs()).tolist()
            for k, index in enumerate(i for row in micro for i in row):
                found[index] = (logps[2 * k], logps[2 * k + 1])
    model.train(was_training)
    return [found[i] for i in range(len(examples))]


def _cache_key(recipe: Recipe, paths: RunPaths) -> str:
    data_sha = DataFingerprint.read_keys(paths.data_fingerprint).get("sha256", "none")
    what = {"data": data_sha, "model": recipe.model.model_dump(mode="json"), "weights": recipe.dpo.weights,
            "lora": recipe.lora.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def attach_reference(
    setup: TrainSetup, recipe: Recipe, run_root: Path, splits: Sequence[Sequence[dict[str, Any]]], pad_id: int,
    write: bool = True,
) -> int:
    """Sets `reference_logps` on every pair of `splits` (train, valid): from train/reference_logps.json
    when it was written for this data, model and adapter settings, else computed now (and written
    when `write`). Returns how many pairs were computed: none for dpo.loss orpo, which has no
    reference (its pairs get none, and no file is written)."""
    if recipe.dpo.loss == "orpo":
        return 0
    paths = RunPaths(run_root)
    path = paths.reference_logps
    key = _cache_key(recipe, paths)
    cached: dict[str, list[float]] = {}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            cached = saved["logps"]
    missing = [e for split in splits for e in split if e["id"] not in cached]
    if missing:
        micro = recipe.train.micro_batch_tokens or recipe.data.max_seq_len
        adapter_off = recipe.dpo.weights != "full" and not recipe.model.adapter
        for example, logps in zip(missing, reference_logps(setup, missing, pad_id, micro, adapter_off), strict=True):
            if not all(math.isfinite(v) for v in logps):
                raise RuntimeError(f"pair {example['id']}: the reference log-prob is not finite")
            cached[example["id"]] = list(logps)
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({"key": key, "logps": cached}) + "\n")
    for split in splits:
        for example in split:
            example["reference_logps"] = tuple(cached[example["id"]])
    return len(missing)
