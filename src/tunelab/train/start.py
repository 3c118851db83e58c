"""Starting a training run: the run folder and its recipe.yaml, the data stage, manifest.json.

Reads the recipe, the user's data (through tunelab.data.prepare) and the replay file; writes under
runs/<name>/: recipe.yaml (every default written out; start_run_dir also takes the folder's lock), data/
(the data stage) and manifest.json (versions, seed, git sha, data fingerprint, tokenizer and chat template
sha256). `tunelab train` calls start_run_dir and prepare_run before it trains; `tunelab run` calls them in
its own stages and hands what prepare_run returns to its training stage, so the data is prepared once.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import Recipe, load_recipe
from tunelab.contract import DataFingerprint, Manifest
from tunelab.errors import ConfigError
from tunelab.files import FolderBusy, hold_dir_lock
from tunelab.models import load_tokenizer
from tunelab.runs import RunPaths
from tunelab.train.self_replay import build_self_replay

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tunelab.data.prepare import PreparedData


def _recipe_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return found


def _written_by_tunelab(paths: RunPaths) -> bool:
    """An empty folder, or one that tunelab started (its recipe, stages, manifest — update and rebase
    write it first, with the parent — or prepared data)."""
    return (not any(paths.root.iterdir()) or paths.recipe.is_file() or paths.stages.is_file()
            or paths.manifest.is_file() or paths.data_fingerprint.is_file())


def start_run_dir(paths: RunPaths, recipe: Recipe, resume: bool) -> None:
    """Create runs/<name>/ and write recipe.yaml; refuse to mix two trainings in one folder."""
    started = paths.train_log.exists() or any(paths.checkpoints.glob("step-*"))
    if resume and paths.recipe.is_file():
        old = load_recipe(paths.recipe).model_dump(mode="json")
        changed = _recipe_differences(old, recipe.model_dump(mode="json"))
        if changed:
            raise ConfigError(
                f"{paths.recipe}: --resume needs the recipe the run started with; changed: {', '.join(changed)}. "
                f"Undo the change, or start a new run with name=NEW"
            )
    elif started and not resume:
        raise ConfigError(
            f"{paths.root} already holds a training run; continue it with --resume, or start a new one with name=NEW"
        )
    if paths.root.is_dir() and not _written_by_tunelab(paths):
        # training writes adapter/, model/ and checkpoints/ here: never into a folder of the user's
        raise ConfigError(f"{paths.root} exists and holds files tunelab did not write; choose another name=NEW "
                          "or out_dir=DIR")
    paths.root.mkdir(parents=True, exist_ok=True)
    try:  # one writer per run: a second --resume (or update, rebase, UI start) of it is refused, not mixed in
        hold_dir_lock(paths.root)
    except FolderBusy:
        raise ConfigError(f"{paths.root}: another tunelab process is writing this run; wait for it to end, or stop "
                          "it (Ctrl-C checkpoints a training), then --resume") from None
    paths.recipe.write_text(recipe.to_yaml(), encoding="utf-8")
    graders_file = recipe.eval.graders_file
    if graders_file and Path(graders_file).is_file() and not (resume and paths.graders_copy.is_file()):
        # the run keeps its graders when the folder moves (runs.open_run reads the copy if the path is gone)
        paths.graders_copy.write_bytes(Path(graders_file).read_bytes())


def _git_sha() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    from tunelab.data.prepare import tokenizer_sha256  # numpy: not at `tunelab --help`

    template = (tokenizer.chat_template or "").encode("utf-8", "surrogatepass")
    return {"tokenizer_sha256": tokenizer_sha256(tokenizer), "chat_template_sha256": hashlib.sha256(template).hexdigest()}


def write_manifest(paths: RunPaths, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, data_dir: Path | None) -> None:
    """manifest.json: what produced this run. Keys other stages added are kept."""
    import peft
    import torch
    import transformers

    import tunelab

    manifest = Manifest.read_keys(paths.manifest)
    # the prepared folder's data/fingerprint.json (a curve's points share their reference run's)
    fingerprint = DataFingerprint.read_keys(data_dir / "fingerprint.json") or None if data_dir is not None else None
    manifest.update({
        "tunelab": tunelab.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "git_sha": _git_sha(),
        "model": recipe.model.name, "method": recipe.method, "seed": recipe.train.seed, "data_seed": recipe.data.seed,
        "data_fingerprint": fingerprint, **tokenizer_fingerprint(tokenizer),
    })
    Manifest.model_validate(manifest).write(paths.manifest)



def replay_file_for(recipe: Recipe) -> Path | None:
    """The general examples mixed into training (data/replay.py): train.replay, else the base model's own
    answers (generated once per model); None with train.replay_share 0 and for preference tuning (replay
    examples are supervised answers)."""
    if recipe.train.replay_share == 0 or recipe.method == "dpo":
        return None
    if recipe.train.replay:
        path = Path(recipe.train.replay)
        if not path.is_file():
            raise ConfigError(f"train.replay: {path}: file not found")
        return path
    return build_self_replay(recipe.model)


@dataclass
class StartedRun:
    """What the data stage hands to training: the run's tokenizer, its prepared data, and the seconds the
    base model spent answering the self-replay prompts (once per model; not counted in train.budget)."""

    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    replay_s: float = 0.0


def prepare_run(recipe: Recipe, paths: RunPaths) -> StartedRun:
    """The data stage of a started run folder: the tokenizer, the replay file, data/ (reused as it is when
    its fingerprint is unchanged), then manifest.json."""
    from tunelab.data.prepare import prepare_data

    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    replay_started = time.monotonic()
    replay_file = replay_file_for(recipe)
    replay_s = time.monotonic() - replay_started
    prepared = prepare_data(recipe, tokenizer, paths.data, replay_file=replay_file)
    write_manifest(paths, recipe, tokenizer, prepared.out_dir)
    return StartedRun(tokenizer, prepared, replay_s)
