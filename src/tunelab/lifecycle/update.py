"""`tunelab update RUN --add NEW`: continue a fine-tune with new examples, without forgetting the old ones.

Reads the parent run (recipe.yaml, data/{train,valid,test}.jsonl, adapter/ or model/, its eval/)
and the new examples (checked as training data). Splits the new examples (seeded, by prompt, like
the data stage) into train, valid and a held-out part; replays a seeded share of the parent's
training examples beside the new ones. Writes a new run folder next to the parent
(tunelab.lifecycle.lineage: inputs/, manifest.json with `parent`), trains it from the parent's
weights (LoRA family: the parent adapter via recipe key model.adapter; full: model.name = the
parent's model/ folder) or, with from_scratch, from the base model; then evaluates it on the
parent's test set (eval/, as any run) and on the new held-out part (eval/new/), scores the parent on
that part too (eval/parent-on-new/), and writes eval/lineage.json and the report.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.console import say
from tunelab.errors import ConfigError, DataError
from tunelab.runs import open_run, removed_unless_trained

if TYPE_CHECKING:
    from tunelab.lifecycle.lineage import Lineage

NEW_TEST = "new_test"  # inputs/new_test.jsonl: the held-out part of the new examples


@dataclass(frozen=True)
class UpdateSettings:
    replay: float = 0.3  # share of the parent's training examples trained on again beside the new ones
    new_test_fraction: float = 0.3  # of the new examples, held out to measure the update on
    new_valid_fraction: float = 0.1  # of the new examples, for validation loss (with the parent's valid split)


def _split_new(rows: list[dict], seed: int, settings: UpdateSettings, test_max: int, valid_max: int) -> dict[str, list[dict]]:
    from tunelab.data.quality import prompt_key
    from tunelab.data.split import assign_splits

    splits = assign_splits([prompt_key(r["messages"]) for r in rows], seed, settings.new_valid_fraction, valid_max,
                           settings.new_test_fraction, test_max, make_valid=True, make_test=True)
    parts: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for row, split in zip(rows, splits, strict=True):
        parts[split].append(row)
    return parts


def update(run_dir: str | Path, new_file: str | Path, *, replay: float = UpdateSettings.replay,
           from_scratch: bool = False, name: str | None = None, settings: UpdateSettings = UpdateSettings(),
           trust_remote_code: bool = False) -> Lineage:
    """See the module docstring. `trust_remote_code` (the user's --trust-remote-code, as for `tunelab eval`)
    lets the parent's model code and python graders run."""
    from tunelab.eval.run import evaluate
    from tunelab.lifecycle.lineage import (
        Lineage,
        arm_scores,
        compare_paired,
        create_child_run,
        evaluated_metrics,
        parent_record,
        refuse_untrusted_graders,
        without_extras,
        write_lineage,
    )
    from tunelab.lifecycle.new_data import read_new_data, read_rows
    from tunelab.report.html import write_report
    from tunelab.train.run import train

    parent, recipe = open_run(run_dir, trust_remote_code)
    refuse_untrusted_graders(parent, recipe, trust_remote_code)
    if not 0.0 <= replay <= 1.0:
        raise ConfigError(f"--replay {replay}: a share of the parent's training examples, from 0 to 1")
    parent_metrics = evaluated_metrics(parent)
    changes: dict[str, object] = {}
    if not from_scratch:
        if recipe.method == "full":
            if not parent.model.is_dir():
                raise ConfigError(f"{parent.root}: no model/ to continue from; has its training finished? (or --from-scratch)")
            changes["model.name"] = str(parent.model)
        else:
            if not parent.adapter.is_dir():
                raise ConfigError(f"{parent.root}: no adapter/ to continue from; has its training finished? (or --from-scratch)")
            changes["model.adapter"] = str(parent.adapter)

    new = read_new_data(new_file, recipe.data.format, recipe.data.system_prompt)
    if new.unlabelled:
        raise DataError(f"{new.unlabelled[0]['source']}: no_assistant_message: update trains on the new examples, so each "
                        f"needs its answer ({len(new.unlabelled)} have none; tunelab drift measures unlabelled inputs)")
    parts = _split_new(new.labelled, recipe.data.seed, settings, recipe.data.test_max, recipe.data.valid_max)
    if not parts["train"] or not parts["test"]:
        raise DataError(f"{new_file}: {len(new.labelled)} examples split into {len(parts['train'])} to train on and "
                        f"{len(parts['test'])} to test on: give more new examples (both parts need at least one)")
    old_train = read_rows(parent.data_split("train"))
    replayed = random.Random(recipe.train.seed).sample(old_train, round(replay * len(old_train)))
    old_valid = read_rows(parent.data_split("valid")) if parent.data_split("valid").is_file() else []
    inputs = {"train": parts["train"] + replayed, "valid": parts["valid"] + old_valid,
              "test": read_rows(parent.data_split("test")), NEW_TEST: parts["test"]}
    child_recipe, child = create_child_run(parent, recipe, name or f"{parent.root.name}-update", "update", inputs, changes)
    start = "the base model" if from_scratch else f"the parent's {'model' if recipe.method == 'full' else 'adapter'}"
    say(f"{child.root}: training from {start} on {len(parts['train'])} new + {len(replayed)} replayed examples; "
        f"{len(parts['test'])} new examples held out")

    with removed_unless_trained(child):  # a failed start leaves no folder behind
        train(child_recipe)
    trusted = {"trust_remote_code": trust_remote_code, "python_graders": trust_remote_code}
    evaluate(child.root, **trusted)
    new_test = child.inputs_file(NEW_TEST)
    best_prompt_only = (parent_metrics.get("verdict") or {}).get("vs")
    arms = ["tuned"] + ([best_prompt_only] if best_prompt_only else [])
    say(f"scoring the update ({', '.join(arms)}) and the parent (tuned) on the {len(parts['test'])} held-out new examples")
    evaluate(child.root, arms=arms, test_file=new_test, recipe=without_extras(child_recipe), out_dir=child.eval_new, echo=False,
             **trusted)
    evaluate(parent.root, arms=["tuned"], test_file=new_test, recipe=without_extras(recipe),
             out_dir=child.eval_parent_on_new, echo=False, **trusted)

    seed = recipe.eval.seed
    old = compare_paired("old test", arm_scores(child.eval, "tuned"), arm_scores(parent.eval, "tuned"), seed=seed)
    fresh = compare_paired("new examples", arm_scores(child.eval_new, "tuned"),
                           arm_scores(child.eval_parent_on_new, "tuned"), seed=seed)
    lineage = Lineage(
        kind="update", parent=parent_record(parent, recipe, "update"), primary_metric=parent_metrics.get("primary_metric"),
        comparisons=[old, fresh], text=f"{old.text}; {fresh.text}",
        details={"from": start, "new_examples": {k: len(v) for k, v in parts.items()}, "replayed": len(replayed),
                 "replay": replay, "parent_train_examples": len(old_train)},
    )
    write_lineage(child, lineage)
    write_report(child.root)
    return lineage
