"""`tunelab data audit RUN --folds K`: out-of-fold scores, for the audit's cleanest signal.

A model trained on an example has partly memorised it, wrong answer included: its loss on that
example and its answer to it lean towards the label. Here each example is scored by a model that
never saw it (confident learning's out-of-fold probabilities, Northcutt et al.): the training
examples are dealt into K folds (`assign_folds`: seeded by train.seed, sizes differing by at most
one), and for each fold a model is trained with the run's recipe on the other K-1 folds, then scores
the examples of its own fold: the loss of the answer in the file (nats per answer token), its own
greedy answer, and how sure it is of that answer. Every training example is scored exactly once,
out of fold. The audit (eval/audit.py rank) then ranks by the out-of-fold loss instead of the last
pass's, and takes the out-of-fold model's answers for its disagreement and flag rule.

Reads RUN/data/{train,valid}.tokens.jsonl, RUN/data/train.jsonl and the run's recipe. Writes
RUN/audit/folds/fold-<k>/ (each fold's run folder: recipe.yaml, train/, adapter/; its checkpoints
are deleted once it has trained) and RUN/audit/folds/folds.json (`FoldsSummary`: the assignment and
each fold's training). Costs K trainings of (K-1)/K of the data each.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.eval.audit import (
    AuditRow,
    AuditSummary,
    HeldOut,
    _base_id,
    answer_confidences,
    audit_run,
    load_examples,
)
from tunelab.files import write_text_atomic
from tunelab.runs import RunPaths

MAX_FOLDS = 20


@dataclass
class FoldsSummary:
    folds: int
    seed: int
    assignment: dict[str, int]  # example id -> its fold
    trained_on: list[int] = field(default_factory=list)  # per fold: training rows (the other folds' examples)
    steps: list[int] = field(default_factory=list)  # per fold: optimiser steps
    train_time_s: list[float] = field(default_factory=list)


def assign_folds(ids: Sequence[str], k: int, seed: int) -> dict[str, int]:
    """Each id's fold, 0..k-1: the ids in a seeded shuffle of their sorted order, dealt in turn (so the
    assignment depends on the set of ids and the seed only, and fold sizes differ by at most one)."""
    if k < 2:
        raise ConfigError(f"--folds {k}: at least 2 (each fold is scored by a model trained on the others)")
    unique = sorted(set(ids))
    if k > len(unique):
        raise ConfigError(f"--folds {k}: the run has {len(unique)} training examples; at most one fold per example")
    random.Random(f"folds-{seed}").shuffle(unique)
    return {example_id: i % k for i, example_id in enumerate(unique)}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def audit_with_folds(run_dir: str | Path, k: int, *, device: str | None = None, trust_remote_code: bool = False,
                     score: Callable[[Any, Any, Sequence[Any]], list[HeldOut]] | None = None,
                     ) -> tuple[list[AuditRow], AuditSummary, FoldsSummary]:
    """The audit (RUN/audit/) ranked by out-of-fold scores from k trainings (see the module docstring)."""
    examples = load_examples(RunPaths(Path(run_dir)))
    held, folds = out_of_fold(run_dir, k, examples, device=device, trust_remote_code=trust_remote_code, score=score)
    rows, summary = audit_run(run_dir, trust_remote_code=trust_remote_code, held_out=held)
    return rows, summary, folds


def out_of_fold(run_dir: str | Path, k: int, examples: Sequence[Any], *, device: str | None = None,
                trust_remote_code: bool = False,
                score: Callable[[Any, Any, Sequence[Any]], list[HeldOut]] | None = None,
                ) -> tuple[dict[str, HeldOut], FoldsSummary]:
    """Train k models, each on all folds but one, and score the held-out fold's `examples`
    (eval/audit.py _Example: id, context, answer). `score(model, tokenizer, fold examples)` replaces
    the scoring (tests)."""
    from tunelab.config import Recipe
    from tunelab.models import load_tokenizer
    from tunelab.runs import open_run
    from tunelab.train.anchor import is_replay
    from tunelab.train.run import start_run_dir, train_on_examples

    if not 2 <= k <= MAX_FOLDS:
        raise ConfigError(f"--folds {k}: from 2 to {MAX_FOLDS}")
    paths, recipe = open_run(run_dir, trust_remote_code)
    if recipe.method == "dpo":
        raise ConfigError(f"--folds: {paths.root} is a preference run; the audit needs one answer per example")
    rows = _read_jsonl(paths.data_tokens("train"))
    if not rows:
        raise ConfigError(f"{paths.data / 'train.tokens.jsonl'}: not found or empty; is {paths.root} a trained run?")
    valid = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in _read_jsonl(paths.data_tokens("valid"))]
    assignment = assign_folds([e.id for e in examples], k, recipe.train.seed)
    # replay rows (general prompts, not the user's examples: never audited) train every fold, as in the run
    missing = {_base_id(r["id"]) for r in rows if not is_replay(r)} - set(assignment)
    if missing:
        raise ConfigError(f"{paths.root}: tokenized rows without an example in data/train.jsonl: {sorted(missing)[:3]}")
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    score = score or _score_with(recipe, device)
    summary = FoldsSummary(folds=k, seed=recipe.train.seed, assignment=assignment)
    held: dict[str, HeldOut] = {}
    folder = paths.audit / "folds"
    for fold in range(k):
        data = recipe.model_dump(mode="json")
        data.update(name=f"fold-{fold}", out_dir=str(folder))
        fold_recipe = Recipe.model_validate(data)
        fold_paths = RunPaths(fold_recipe.run_dir)
        if fold_paths.root.exists():  # an earlier --folds of this run: trained again from scratch
            shutil.rmtree(fold_paths.root)
        start_run_dir(fold_paths, fold_recipe, resume=False)
        # ids kept: they mark the replay rows the run's anchor and replay slices read (train/anchor.py)
        train = [{"id": r["id"], "input_ids": r["input_ids"], "labels": r["labels"]} for r in rows
                 if is_replay(r) or assignment[_base_id(r["id"])] != fold]
        result = train_on_examples(fold_recipe, fold_paths, tokenizer, train, valid, device=device, progress=False)
        shutil.rmtree(fold_paths.checkpoints, ignore_errors=True)
        summary.trained_on.append(len(train))
        summary.steps.append(result.steps)
        summary.train_time_s.append(round(result.train_time_s, 1))
        mine = [e for e in examples if assignment[e.id] == fold]
        for example, scored in zip(mine, score(result.model, tokenizer, mine), strict=True):
            held[example.id] = HeldOut(fold, scored.loss, scored.model_answer, scored.model_confidence)
        del result
    write_text_atomic(folder / "folds.json", json.dumps(asdict(summary), indent=1) + "\n")
    return held, summary


def _score_with(recipe: Any, device: str | None) -> Callable[[Any, Any, Sequence[Any]], list[HeldOut]]:
    def score(model: Any, tokenizer: Any, examples: Sequence[Any]) -> list[HeldOut]:
        from tunelab.engine.generate import DecodingSettings, generate

        contexts = [list(e.context) for e in examples]
        label_p = answer_confidences(model, tokenizer, contexts, [e.answer for e in examples])
        settings = DecodingSettings(max_new_tokens=recipe.eval.max_new_tokens)
        was_training = model.training
        model.eval()
        try:
            texts = [g.text for g in generate(model, tokenizer, contexts, settings, recipe.eval.batch_size)]
        finally:
            model.train(was_training)
        own_p = answer_confidences(model, tokenizer, contexts, texts)
        return [HeldOut(-1, -math.log(max(p, 1e-12)) if p is not None else math.inf, text, q)
                for p, text, q in zip(label_p, texts, own_p, strict=True)]

    return score
