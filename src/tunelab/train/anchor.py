"""KL anchor to the base model on replay rows (`train.anchor`): the fine-tune is asked to keep the base
model's whole next-token distribution on the general examples it rehearses, not only its greedy answer.

Self-replay trains on the base model's greedy answers (data/replay.py); a one-hot target on them makes the
model more certain than it was (measured on routing: perplexity on general text rose +12% with 50 replay
examples). The anchor adds, on every trained token of a replay example, `train.anchor` x KL(p_base || p_model)
over the base model's ANCHOR_TOP_K most likely tokens (renormalised): the KL term of ASFT-style anchoring.

The base model's top-k log-probs are computed ONCE, before step 1, with the PEFT adapter switched off (the
same weights the run starts from, so no second model is held), and kept on the examples in memory
(`anchor_ids`, `anchor_logp`); a resumed run computes them again, equal. They are cached per base model
(`cached_base_top_k`: <tunelab home>/anchor/<model>/<digest>.safetensors, one entry an example, keyed by its
tokens): the auto replay pool is the same rows run after run, so only the first run pays for them. The cache
key is the weights themselves (a digest of every base tensor, not the model's name), the dtype, device and
attention layout, so a changed model or setting computes them again. Each step computes the term
inside the loss's chunked cross-entropy on the logits it already has (train/loss.py,
linear_cross_entropy's `anchor`): no extra forward pass, no extra projection, and no extra pass over the
vocabulary either: the term's gradient, sum_j coef_j x (softmax - one_hot(id_j)), is the softmax scaled by
1 + sum_j coef_j (folded into the exp the cross-entropy's gradient computes anyway) less coef_j at the k ids.
Replay examples are the training rows whose id starts with `replay-` (data/prepare.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunelab.data.pack import example_length, pack_rows, trained_positions
from tunelab.models import cache_folder_name, tunelab_home
from tunelab.train.loop import attention_layout, autocast, batch_builder

if TYPE_CHECKING:
    from tunelab.config import Recipe
    from tunelab.train.setup import TrainSetup

ANCHOR_TOP_K = 16  # the base model's most likely tokens kept per position (most of its mass on its own answers)
REPLAY_ID_PREFIX = "replay-"
ROW_TOKENS = 512  # examples packed per forward pass when computing the targets
CACHE_RULE = 1  # how targets are computed and cached; a new rule computes them again
SAMPLE_STRIDE = 997  # the weights digest reads every SAMPLE_STRIDE-th value of a tensor, and its sum


def is_replay(example: dict[str, Any]) -> bool:
    return str(example.get("id", "")).startswith(REPLAY_ID_PREFIX)


def top_k_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probs renormalised over the k) of each row of `logits` (positions x vocabulary)."""
    top = torch.log_softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
    return top.indices, top.values - torch.logsumexp(top.values, dim=-1, keepdim=True)


def base_top_k(setup: TrainSetup, examples: Sequence[dict[str, Any]], pad_id: int, k: int = ANCHOR_TOP_K,
               adapter_off: bool = True, row_tokens: int = ROW_TOKENS) -> list[tuple[list[list[int]], list[list[float]]]]:
    """Per example, per trained token: the base model's top-k (ids, renormalised log-probs) of that token,
    computed with dropout off and the PEFT adapter switched off (`adapter_off`); examples packed into rows
    of `row_tokens` (each attends to itself only), one row a forward pass."""
    if not examples:
        return []
    model = setup.model
    module = getattr(setup.loss_module, "module", setup.loss_module)  # DDP wraps the loss module
    build = batch_builder(setup, examples, pad_id)
    lengths = [example_length(e) for e in examples]
    rows = pack_rows(lengths, max(row_tokens, max(lengths)))
    softcap = getattr(module, "softcap", None)
    was_training = model.training
    model.eval()
    found: dict[int, tuple[list[list[int]], list[list[float]]]] = {}
    switch_off = model.disable_adapter() if adapter_off and hasattr(model, "disable_adapter") else nullcontext()
    try:
        with torch.no_grad(), switch_off, autocast(setup), attention_layout(setup):
            for row in rows:
                batch = build([row])
                hidden, head = module.hidden_states(batch.input_ids, batch.position_ids, batch.attention_mask,
                                                    batch.cu_seqlens, batch.max_seqlen)
                at = 0
                for index in row:  # both layouts place a row's examples end to end from offset 0
                    positions = [at + t - 1 for t in trained_positions(examples[index]["labels"])]
                    logits = head(hidden[0, positions])
                    if softcap is not None:
                        logits = torch.tanh(logits.float() / softcap) * softcap
                    ids, logp = top_k_targets(logits, k)
                    found[index] = (ids.tolist(), logp.float().tolist())
                    at += lengths[index]
    finally:
        model.train(was_training)
    return [found[i] for i in range(len(examples))]


Targets = tuple[list[list[int]], list[list[float]]]


def weights_digest(model: torch.nn.Module, with_adapter: bool) -> str:
    """What the targets are computed from: each tensor's name, shape, dtype, sum and a strided sample of its
    values; the LoRA tensors only `with_adapter` (switched off, they do not change the targets)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and not with_adapter:
                continue
            flat = param.detach().reshape(-1)
            total = sum(chunk.double().sum().item() for chunk in flat.split(1 << 22))  # no whole-tensor copy
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{total:.10e}".encode())
            digest.update(flat[::SAMPLE_STRIDE].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def anchor_cache_path(setup: TrainSetup, k: int, adapter_off: bool) -> Path:
    """The cache file of the targets of this model (its weights), k, dtype, device and attention layout."""
    key = json.dumps({"rule": CACHE_RULE, "weights": weights_digest(setup.model, with_adapter=not adapter_off),
                      "k": k, "autocast": str(setup.autocast_dtype), "device": setup.device.type,
                      "attention": setup.attention, "torch": torch.__version__}, sort_keys=True)
    name = getattr(getattr(setup.model, "config", None), "name_or_path", "") or "model"
    return tunelab_home() / "anchor" / cache_folder_name(Path(str(name)).name) / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def example_key(example: dict[str, Any]) -> str:
    """An example's cache entry: its tokens and which of them are trained."""
    return hashlib.sha256(json.dumps([example["input_ids"], example["labels"]]).encode()).hexdigest()[:32]


def _read_cache(path: Path) -> dict[str, torch.Tensor]:
    """The cache's tensors, or none when it is missing or unreadable (it is computed again, never trusted)."""
    from safetensors.torch import load_file

    try:
        return load_file(path) if path.is_file() else {}
    except Exception:  # a torn or foreign file: compute the targets again and write a good one
        return {}


def _write_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp))
        os.replace(tmp, path)  # readers (another rank, another run) see the old file or the new one
    except OSError:
        tmp.unlink(missing_ok=True)  # a cache that cannot be written only costs the next run the same seconds


def cached_base_top_k(setup: TrainSetup, examples: Sequence[dict[str, Any]], pad_id: int, k: int = ANCHOR_TOP_K,
                      adapter_off: bool = True) -> tuple[list[Targets], int]:
    """`base_top_k` of `examples`, read from the cache where an entry holds them (entries of the right shape
    only) and computed for the rest, which then join the cache. Returns (targets, examples read from it)."""
    path = anchor_cache_path(setup, k, adapter_off)
    cache = _read_cache(path)
    keys = [example_key(e) for e in examples]
    found: dict[int, Targets] = {}
    for index, (key, example) in enumerate(zip(keys, examples, strict=True)):
        ids, logp = cache.get(f"{key}.ids"), cache.get(f"{key}.logp")
        positions = len(trained_positions(example["labels"]))
        if (ids is not None and logp is not None and ids.ndim == 2 and ids.shape == logp.shape
                and ids.shape[0] == positions and (positions == 0 or 0 < ids.shape[1] <= k)):
            found[index] = (ids.tolist(), logp.tolist())
    missing = [i for i in range(len(examples)) if i not in found]
    if missing:
        computed = base_top_k(setup, [examples[i] for i in missing], pad_id, k, adapter_off)
        for index, (ids, logp) in zip(missing, computed, strict=True):
            found[index] = (ids, logp)
            width = len(ids[0]) if ids else 0
            cache[f"{keys[index]}.ids"] = torch.tensor(ids, dtype=torch.int64).reshape(len(ids), width)
            cache[f"{keys[index]}.logp"] = torch.tensor(logp, dtype=torch.float32).reshape(len(logp), width)
        _write_cache(path, cache)
    return [found[i] for i in range(len(examples))], len(examples) - len(missing)


def attach_anchor(setup: TrainSetup, recipe: Recipe, train_examples: Sequence[dict[str, Any]],
                  pad_id: int) -> dict[str, Any] | None:
    """Sets `anchor_ids`, `anchor_logp` and `anchor_weight` on every replay example of `train_examples`
    when train.anchor > 0 (nothing for preference tuning or a run without replay). Returns what
    train/plan.json `replay.anchor` records, or None."""
    weight = float(recipe.train.anchor)
    replay = [e for e in train_examples if is_replay(e)]
    if weight <= 0 or not replay or recipe.method == "dpo":
        return None
    started = time.perf_counter()
    adapter_off = not recipe.model.adapter  # a run continuing from an adapter anchors to where it starts
    targets, cached = cached_base_top_k(setup, replay, pad_id, ANCHOR_TOP_K, adapter_off)
    for example, (ids, logp) in zip(replay, targets, strict=True):
        example["anchor_ids"], example["anchor_logp"], example["anchor_weight"] = ids, logp, weight
    return {"weight": weight, "top_k": ANCHOR_TOP_K, "examples": len(replay), "cached": cached,
            "tokens": sum(len(e["anchor_ids"]) for e in replay), "seconds": round(time.perf_counter() - started, 2),
            "reference": "the base model (adapter off), computed once before step 1 or read from the cache"}
