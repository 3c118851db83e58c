"""`tunelab rebase RUN --model NEW_BASE`: the same recipe and data on a new base model, and whether to move.

Reads the parent run (recipe.yaml, data/{train,valid,test}.jsonl, eval/ of its own evaluation).
Writes a new run folder next to it (tunelab.lifecycle.lineage): the parent's prepared splits as
inputs/ (the same examples, the same test set), the parent's recipe with model.name = NEW_BASE,
trained from a fresh adapter (or, with carry_adapter, from the parent's adapter, which must fit the
new base: refused in one line otherwise, before anything is written) and evaluated with every arm
of the recipe; then eval/lineage.json with the migration verdict and the report. The verdict pairs
the new tuned arm with the old one, and the new base's best prompt-only arm with the old base's,
on the same test examples.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.config import Recipe
from tunelab.console import say
from tunelab.errors import ConfigError
from tunelab.lifecycle.lineage import (
    Lineage,
    PairedResult,
    arm_scores,
    compare_paired,
    create_child_run,
    evaluated_metrics,
    parent_record,
    refuse_untrusted_graders,
    write_lineage,
)
from tunelab.lifecycle.new_data import read_rows
from tunelab.runs import RunPaths, open_run, removed_unless_trained


def _slug(model: str) -> str:
    name = Path(model.rstrip("/")).name or model
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _check_carry(recipe_data: dict) -> None:
    """Build the new base with the parent's adapter once, before any folder is made: a misfit is refused here."""
    import torch

    from tunelab.train.setup import build_model

    build_model(Recipe.model_validate(recipe_data), torch.device("cpu"))


def _decide(tuned: PairedResult, prompt_only: PairedResult, child_prompt_arm: str, parent_prompt_arm: str) -> tuple[str, str]:
    lo, hi = tuned.ci95_points
    head = (f"new tuned {100 * tuned.child:.1f} vs old tuned {100 * tuned.parent:.1f} "
            f"({tuned.delta_points:+.1f}, 95% CI [{lo:+.1f}, {hi:+.1f}], p = {tuned.p_value:.3g})")
    base = (f"new base {child_prompt_arm} {100 * prompt_only.child:.1f} vs old base {parent_prompt_arm} "
            f"{100 * prompt_only.parent:.1f}")
    if tuned.significant and tuned.delta_points > 0:
        decision, why = "move", ""
    elif tuned.significant:
        decision, why = "stay", ""
    else:
        decision, why = "either", " (no significant difference: decide on cost, latency and support of the base)"
    text = f"{decision}: {head}{why}; {base}"
    if prompt_only.child >= tuned.parent:
        text += f"; the new base without fine-tuning already reaches the old fine-tune ({child_prompt_arm})"
    return decision, text


def rebase(run_dir: str | Path, model: str, *, name: str | None = None, carry_adapter: bool = False,
           trust_remote_code: bool = False) -> Lineage:
    """See the module docstring. `trust_remote_code` (the user's --trust-remote-code, as for `tunelab eval`)
    lets the models' code and the parent's python graders run."""
    from tunelab.eval.run import evaluate
    from tunelab.report.html import write_report
    from tunelab.train.run import train

    parent, recipe = open_run(run_dir, trust_remote_code)
    refuse_untrusted_graders(parent, recipe, trust_remote_code)
    if model == recipe.model.name:
        raise ConfigError(f"--model {model}: {parent.root} already uses this base model")
    parent_metrics = evaluated_metrics(parent)
    changes: dict[str, object] = {"model.name": model, "model.revision": None, "model.adapter": None}
    if carry_adapter:
        if recipe.method == "full" or not parent.adapter.is_dir():
            raise ConfigError(f"--carry-adapter: {parent.root} has no adapter/ (only LoRA-family runs have one)")
        changes["model.adapter"] = str(parent.adapter)
        data = recipe.model_dump(mode="json")
        data["model"].update(name=model, revision=None, adapter=str(parent.adapter))
        _check_carry(data)
    inputs = {split: read_rows(parent.data / f"{split}.jsonl") for split in ("train", "valid", "test")
              if (parent.data / f"{split}.jsonl").is_file()}
    child_recipe, child = create_child_run(parent, recipe, name or f"{parent.root.name}-on-{_slug(model)}", "rebase",
                                           inputs, changes)
    say(f"{child.root}: the recipe and data of {parent.root} on {model}")
    with removed_unless_trained(child):  # a failed start leaves no folder behind
        train(child_recipe)
    child_metrics = evaluate(child.root, trust_remote_code=trust_remote_code, python_graders=trust_remote_code)
    lineage = migration_verdict(parent, recipe, child, parent_metrics, child_metrics)
    write_lineage(child, lineage)
    write_report(child.root)
    return lineage


def migration_verdict(parent: RunPaths, recipe: Recipe, child: RunPaths, parent_metrics: dict, child_metrics: dict) -> Lineage:
    """Paired on the same test examples: new tuned vs old tuned, new base's best prompt-only arm vs the old base's."""
    seed = recipe.eval.seed
    tuned = compare_paired("tuned", arm_scores(child.eval, "tuned"), arm_scores(parent.eval, "tuned"), seed=seed)
    child_arm = (child_metrics.get("verdict") or {}).get("vs")
    parent_arm = (parent_metrics.get("verdict") or {}).get("vs")
    comparisons = [tuned]
    if child_arm and parent_arm:
        prompt_only = compare_paired("best prompt-only", arm_scores(child.eval, child_arm), arm_scores(parent.eval, parent_arm),
                                     child_arm=child_arm, parent_arm=parent_arm, seed=seed)
        comparisons.append(prompt_only)
        decision, text = _decide(tuned, prompt_only, child_arm, parent_arm)
    else:
        decision = "move" if tuned.significant and tuned.delta_points > 0 else "stay" if tuned.significant else "either"
        text = f"{decision}: {tuned.text}"
    return Lineage(kind="rebase", parent=parent_record(parent, recipe, "rebase"),
                   primary_metric=child_metrics.get("primary_metric"), comparisons=comparisons, decision=decision,
                   text=text, details={"new_base": child_metrics.get("model"), "old_base": recipe.model.name})
