"""The evaluation of a `method: dpo` run: its supervised parent as the arm `sft`, and preference
accuracy on held-out pairs.

Reads the run's recipe (model.adapter names the supervised parent: a run folder or an adapter
folder), its held-out pairs (data/test.jsonl rows with `rejected`, else data/valid.jsonl) and the
run's own PeftModel, loaded here (the parent's adapter beside the tuned one on it). Writes nothing
itself; eval/run.py puts `arms.sft` (generated on the tuned arm's prompts, scored like every arm)
and `preference` into eval/metrics.json:

  preference: {"n", "split", "loss": dpo.loss (sigmoid, ipo or orpo), "accuracy": {arm: share of pairs whose preferred answer that model
               gives the higher log-probability per answer token}, "log_prob_margin": {arm: the mean
               over pairs of that per-token log-prob, preferred minus rejected}, "reward_accuracy":
               DPO's measure: the share of pairs whose tuned-vs-reference log-ratio (summed log-probs;
               the reference is the parent, else the base, named in "reward_reference") favours the
               preferred answer,
               "vs_sft": tuned vs sft on the primary metric, paired (delta, ci95, p_value, text; and
               repetition_note, also in text, when tuned's answers repeat clearly more: eval/repetition.py),
               "disagreements": up to 5 test prompts where sft and tuned answered differently}

Arms: base (the adapter off), sft (the parent's adapter; only with a parent), tuned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.preference import Pair, tokenize_pair
from tunelab.eval.repetition import repetition_note
from tunelab.runs import RunPaths

if TYPE_CHECKING:
    import torch

    from tunelab.config import Recipe

# eval/run.py's _Inputs, _Generated and _Scored: not imported (eval/run.py imports this module)
_Inputs = _Generated = _Scored = Any

SFT_ARM = "sft"
PARENT_ADAPTER = "sft"  # the PEFT adapter name the parent's weights are loaded under
MAX_PAIRS = 200
_BATCH = 8
_DISAGREEMENTS = 5


def parent_adapter(recipe: Recipe) -> Path | None:
    """The supervised parent's adapter folder of a dpo run, or None (DPO from the base model)."""
    if recipe.method != "dpo" or not recipe.model.adapter:
        return None
    folder = Path(recipe.model.adapter)
    run = RunPaths(folder)  # a run folder: its adapter
    return run.adapter if (run.adapter / "adapter_config.json").is_file() else folder


def held_out_pairs(data_dir: Path, limit: int | None = None) -> tuple[str, list[Pair]]:
    """(split, pairs) of the held-out pairs: the test split's, else the validation split's."""
    for split in ("test", "valid"):
        path = data_dir / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []
        pairs = [Pair(str(path), n, "prepared", row["messages"][:-1], row["messages"][-1]["content"], row["rejected"])
                 for n, row in enumerate(rows, 1) if isinstance(row.get("rejected"), str)]
        if pairs:
            return split, pairs[: limit or MAX_PAIRS]
    return "none", []


def add_parent_arm(inputs: _Inputs, generated: _Generated) -> tuple[_Inputs, _Generated]:
    """The arm `sft`: the parent model on the tuned arm's prompts, with the same decoding and served
    the same way (its adapter merged into the base weights); unchanged inputs when the run has no
    adapter parent or the tuned arm is not evaluated. The parent is loaded here, and released after."""
    from tunelab.engine.generate import generate
    from tunelab.runs import load_run_model

    parent = parent_adapter(inputs.recipe)
    if parent is None or "tuned" not in inputs.chosen or inputs.models.tuned_kind != "adapter":
        return inputs, generated
    prompts = generated.prompts["tuned"]
    model, tokenizer = load_run_model(inputs.paths, inputs.recipe)
    model.load_adapter(str(parent), adapter_name=PARENT_ADAPTER)
    model.set_adapter(PARENT_ADAPTER)
    model = model.merge_and_unload(adapter_names=[PARENT_ADAPTER])  # base + the parent only
    model.eval()
    started = time.perf_counter()
    gens = generate(model, tokenizer, prompts, inputs.settings, inputs.cfg.batch_size)
    wall_s = time.perf_counter() - started
    del model
    generated = dataclasses.replace(
        generated, prompts={**generated.prompts, SFT_ARM: prompts}, generations={**generated.generations, SFT_ARM: gens},
        wall_s={**generated.wall_s, SFT_ARM: wall_s},
    )
    return dataclasses.replace(inputs, chosen=[*inputs.chosen, SFT_ARM]), generated


@contextlib.contextmanager
def _parent_on(model: Any, folder: Path) -> Iterator[Any]:
    """The parent's adapter active on a PeftModel of the run for the block (loaded once), then the run's again."""
    if PARENT_ADAPTER not in model.peft_config:
        model.load_adapter(str(folder), adapter_name=PARENT_ADAPTER)
    previous = model.active_adapter
    model.set_adapter(PARENT_ADAPTER)
    model.eval()
    try:
        yield model
    finally:
        if previous in model.peft_config:
            model.set_adapter(previous)


def sequence_logps(model: Any, tokenizer: Any, pairs: list[Pair], per_token: bool = True) -> list[tuple[float, float]]:
    """(log p(preferred), log p(rejected)) of each pair under `model`, per answer token (the mean over
    the answer's tokens: a summed log-prob would favour the shorter answer whatever its content), or
    summed over them (`per_token` False: DPO's sequence log-probs)."""
    import torch

    sides = []
    for pair in pairs:
        chosen, rejected = tokenize_pair(tokenizer, pair)
        sides += [chosen, rejected]
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(sides), _BATCH):
            batch = sides[start : start + _BATCH]
            width = max(len(s.input_ids) for s in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, side in enumerate(batch):
                n = len(side.input_ids)
                ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(side.input_ids), torch.tensor(side.labels), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            out.extend(_label_logps(logits, labels.to(device), per_token).tolist())
    return [(out[2 * i], out[2 * i + 1]) for i in range(len(pairs))]


def _label_logps(logits: torch.Tensor, labels: torch.Tensor, per_token: bool) -> torch.Tensor:
    import torch

    targets = labels[:, 1:]
    keep = targets != -100
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    summed = (logp * keep).sum(dim=1)
    return summed / keep.sum(dim=1).clamp(min=1) if per_token else summed


def preference_section(inputs: _Inputs, generated: _Generated, scored: _Scored) -> dict[str, Any]:
    """eval/metrics.json "preference" (module docstring); marks arms.sft as answered by the parent."""
    from tunelab.eval.metrics import paired_comparison

    split, pairs = held_out_pairs(inputs.paths.data, inputs.cfg.limit)
    section: dict[str, Any] = {"n": len(pairs), "split": split, "loss": inputs.recipe.dpo.loss, "accuracy": {},
                               "log_prob_margin": {}}
    parent = parent_adapter(inputs.recipe)
    if pairs and inputs.models.tuned_kind == "adapter":
        from tunelab.runs import load_run_model

        # the run's own PeftModel (the evaluation's may have merged its adapter away): base, parent, tuned
        model, tokenizer = load_run_model(inputs.paths, inputs.recipe)
        model.eval()
        arms: dict[str, list[tuple[float, float]]] = {}
        with model.disable_adapter():
            arms["base"] = sequence_logps(model, tokenizer, pairs)
        if parent is not None:
            with _parent_on(model, parent):
                arms[SFT_ARM] = sequence_logps(model, tokenizer, pairs)
        arms["tuned"] = sequence_logps(model, tokenizer, pairs)
        # DPO's own measure: the tuned model's log-ratio to its reference (the parent, else the base)
        # favours the preferred answer (what train/log.jsonl's val_preference_acc counts)
        tuned_sums = sequence_logps(model, tokenizer, pairs, per_token=False)
        if parent is not None:
            with _parent_on(model, parent):
                reference_sums = sequence_logps(model, tokenizer, pairs, per_token=False)
        else:
            with model.disable_adapter():
                reference_sums = sequence_logps(model, tokenizer, pairs, per_token=False)
        del model
        section["reward_accuracy"] = sum((tc - rc) - (tr - rr) > 0 for (tc, tr), (rc, rr)
                                         in zip(tuned_sums, reference_sums, strict=True)) / len(pairs)
        section["reward_reference"] = SFT_ARM if parent is not None else "base"
        for arm, logps in arms.items():
            section["accuracy"][arm] = sum(c > r for c, r in logps) / len(logps)
            section["log_prob_margin"][arm] = sum(c - r for c, r in logps) / len(logps)
    if SFT_ARM in scored.arms:
        scored.arms[SFT_ARM].update(model=SFT_ARM, served="adapter merged into the base weights")
        tuned, sft = scored.per_example["tuned"], scored.per_example[SFT_ARM]
        kept = [i for i in range(len(tuned)) if tuned[i] is not None and sft[i] is not None]
        comparison = paired_comparison([tuned[i] for i in kept], [sft[i] for i in kept], seed=inputs.cfg.seed)
        points, (lo, hi) = comparison.delta * 100, (comparison.ci95[0] * 100, comparison.ci95[1] * 100)
        verb = ("beats" if comparison.delta > 0 else "trails") if comparison.significant else "does not differ significantly from"
        section["vs_sft"] = {
            "delta": comparison.delta, "ci95": list(comparison.ci95), "p_value": comparison.p_value,
            "significant": comparison.significant, "n": len(kept),
            "text": f"DPO {verb} its supervised parent on {inputs.primary.name}: {points:+.1f} points, 95% CI "
                    f"[{lo:.1f}, {hi:.1f}], p = {comparison.p_value:.4f} (tuned vs sft, {len(kept)} paired examples)",
        }
        tuned_texts, sft_texts = generated.texts("tuned"), generated.texts(SFT_ARM)
        note = repetition_note("tuned", tuned_texts, SFT_ARM, sft_texts)  # DPO's known failure: looping answers
        if note:
            section["vs_sft"].update(repetition_note=note, text=f"{section['vs_sft']['text']}. {note}")
        section["disagreements"] = [
            {"id": ex.id, "prompt": _last_user(ex.context), "sft": sft_texts[i], "tuned": tuned_texts[i],
             "reference": ex.reference}
            for i, ex in enumerate(inputs.test) if sft_texts[i].strip() != tuned_texts[i].strip()
        ][:_DISAGREEMENTS]
    return section


def _last_user(context: Any) -> str:
    users = [m["content"] for m in context if m.get("role") == "user"]
    return users[-1] if users else ""
