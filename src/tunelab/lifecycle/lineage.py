"""Runs made from other runs (`tunelab update`, `tunelab rebase`): the parent record, the child run
folder, and the paired comparisons against the parent that both commands report.

Reads the parent's recipe.yaml, manifest.json, data/*.jsonl and eval/predictions.jsonl. Writes the
child run folder: inputs/*.jsonl (the data the child trains and is tested on, kept with the run),
manifest.json with `parent` before training starts (training adds its own keys beside it), and
eval/lineage.json (contract.Lineage), which `tunelab report` and `tunelab runs list` read (runs.read_lineage).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tunelab.config import Recipe
from tunelab.contract import ContractError, Lineage, Manifest, Metrics, PairedResult  # noqa: F401 (imported from here)
from tunelab.errors import ConfigError
from tunelab.eval.paired import SIGNIFICANCE, arm_scores, compare_paired  # noqa: F401 (this module's names before)
from tunelab.files import write_text_atomic
from tunelab.lifecycle.new_data import write_rows
from tunelab.runs import RunPaths, data_fingerprint_id, lineage_path


def write_lineage(paths: RunPaths, lineage: Lineage) -> Path:
    path = lineage_path(paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, lineage.model_dump_json(indent=1))
    return path


def _keys_or_nothing(model: type[Manifest] | type[Metrics], path: Path) -> dict[str, Any]:
    """The file's keys as found; {} when it is missing or broken (the parent's manifest and results are
    optional to these commands: they say what to run when they are missing)."""
    try:
        return model.read_keys(path)
    except ContractError:
        return {}


def parent_record(parent: RunPaths, recipe: Recipe, kind: str) -> dict[str, Any]:
    manifest = _keys_or_nothing(Manifest, parent.manifest)
    return {"kind": kind, "path": str(parent.root), "name": parent.root.name, "model": recipe.model.name,
            "method": recipe.method, "data_fingerprint": data_fingerprint_id(manifest)}


# ---------------------------------------------------------------------------------------------- parent's results


def evaluated_metrics(paths: RunPaths) -> dict[str, Any]:
    """The run's eval/metrics.json with a tuned arm, or a ConfigError saying how to get one."""
    metrics = _keys_or_nothing(Metrics, paths.metrics)
    if "tuned" not in (metrics.get("arms") or {}) or not paths.predictions.is_file():
        raise ConfigError(f"{paths.root}: not evaluated with the tuned arm (no {paths.metrics} with arms.tuned "
                          f"and {paths.predictions}); run: tunelab eval {paths.root}")
    return metrics


def refuse_untrusted_graders(paths: RunPaths, recipe: Recipe, trust_remote_code: bool) -> None:
    """drift, update and rebase score with the run's eval section, whose python graders are a run
    folder's code and whose judges would be sent the user's API keys: refused here, before anything is
    trained or written, unless the user trusts the run."""
    from tunelab.eval.external import refuse_secret_bearing_arms
    from tunelab.eval.graders.evaluation import CONSENT, refuse_python_graders, refuse_secret_bearing
    from tunelab.specs.graders import recipe_graders

    if not trust_remote_code:
        graders = recipe_graders(recipe.eval)
        refuse_python_graders(graders, paths)
        refuse_secret_bearing(graders, recipe.eval.pairwise, paths)
        refuse_secret_bearing_arms(recipe.eval.external, paths.recipe, CONSENT)


# ---------------------------------------------------------------------------------------------- child run


def create_child_run(parent: RunPaths, recipe: Recipe, name: str, kind: str,
                     inputs: Mapping[str, Sequence[dict[str, Any]]], changes: Mapping[str, Any]) -> tuple[Recipe, RunPaths]:
    """A new run folder next to the parent: inputs/<split>.jsonl, manifest.json with `parent`, and
    the recipe to train it with (the parent's, with data pointing at inputs/ and `changes` applied:
    {"model.name": ...} style dotted keys). Refuses a folder that exists."""
    from tunelab.config import apply_overrides

    child = RunPaths(parent.root.parent / name)
    if child.root.exists():
        raise ConfigError(f"{child.root} already exists: choose another name with --name")
    data = recipe.model_dump(mode="json")
    data["name"], data["out_dir"] = name, str(parent.root.parent)
    for split in ("train", "valid", "test"):
        rows = inputs.get(split)
        data["data"][split] = str(child.inputs_file(split)) if rows else None
    data = apply_overrides(data, [f"{key}={json.dumps(value)}" for key, value in changes.items()])
    child_recipe = Recipe.model_validate(data)
    child.root.mkdir(parents=True)
    for split, rows in inputs.items():
        if rows:
            write_rows(child.inputs_file(split), rows)
    Manifest.update_keys(child.manifest, {"parent": parent_record(parent, recipe, kind)})  # training adds the rest
    return child_recipe, child


def without_extras(recipe: Recipe) -> Recipe:
    """The recipe's settings for scoring other data: every example, no forgetting probes (the run's
    own evaluation measured those)."""
    data = recipe.model_dump(mode="json")
    data["eval"].update(limit=None, forgetting=False)
    return Recipe.model_validate(data)
