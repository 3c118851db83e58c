"""The run directory: the contract between stages (docs/run-directory.md).

Names every path of `runs/<name>/` once, and loads what a finished training left there: the recipe
and the tuned model (base + PEFT adapter, or a full model folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tunelab.config import Recipe, load_recipe
from tunelab.console import say
from tunelab.contract import Lineage
from tunelab.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def data_stats(self) -> Path:
        return self.data / "stats.json"

    @property
    def data_fingerprint(self) -> Path:
        return self.data / "fingerprint.json"

    @property
    def data_issues(self) -> Path:
        return self.data / "issues.jsonl"

    def data_split(self, split: str) -> Path:
        """data/<split>.jsonl: the prepared examples of "train", "valid" or "test"."""
        return self.data / f"{split}.jsonl"

    def data_tokens(self, split: str) -> Path:
        """data/<split>.tokens.jsonl: the tokenized examples of "train" or "valid"."""
        return self.data / f"{split}.tokens.jsonl"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def train_log(self) -> Path:
        return self.train_dir / "log.jsonl"

    @property
    def tensorboard(self) -> Path:
        """train/tb/: TensorBoard event files."""
        return self.train_dir / "tb"

    @property
    def plan(self) -> Path:
        return self.train_dir / "plan.json"

    @property
    def train_summary(self) -> Path:
        return self.train_dir / "summary.json"

    @property
    def reference_logps(self) -> Path:
        """train/reference_logps.json (method: dpo): the reference model's log-probs of every pair, once per run."""
        return self.train_dir / "reference_logps.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    @property
    def graders_copy(self) -> Path:
        """graders_file.yaml: a copy of eval.graders_file as training started, read when the recipe's path is
        gone (the run folder moved to another machine, the file moved)."""
        return self.root / "graders_file.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        return self.eval / "metrics.json"

    @property
    def adapter_scale(self) -> Path:
        return self.eval / "adapter_scale.json"

    @property
    def predictions(self) -> Path:
        return self.eval / "predictions.jsonl"

    @property
    def judge_cache(self) -> Path:
        return self.eval / "judge_cache.jsonl"

    def external_cache(self, arm: str) -> Path:
        """eval/external/<arm>.jsonl: an endpoint arm's cached replies (eval/external.py)."""
        return self.eval / "external" / f"{arm}.jsonl"

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    @property
    def eval_new(self) -> Path:
        """eval/new/: a run made by `tunelab update`, scored on its held-out new examples."""
        return self.eval / "new"

    @property
    def eval_parent_on_new(self) -> Path:
        """eval/parent-on-new/: the parent of a run made by `tunelab update`, on the same new examples."""
        return self.eval / "parent-on-new"

    def inputs_file(self, split: str) -> Path:
        """inputs/<split>.jsonl: the examples a run made by `update` or `rebase` was given (lifecycle/lineage.py)."""
        return self.root / "inputs" / f"{split}.jsonl"

    @property
    def drift(self) -> Path:
        return self.root / "drift"

    def drift_check(self, name: str) -> DriftPaths:
        """drift/<name>/: one `tunelab drift` check (named by its UTC time)."""
        return DriftPaths(self.drift / name)

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"


@dataclass(frozen=True)
class DriftPaths:
    """One drift check's folder, RUN/drift/<UTC time>/ (writer: lifecycle/drift.py)."""

    root: Path

    @property
    def new_examples(self) -> Path:
        """The new labelled examples, as scored."""
        return self.root / "new.jsonl"

    @property
    def eval(self) -> Path:
        """The run's arms scored on the new examples (an evaluation's folder: metrics.json, predictions.jsonl)."""
        return self.root / "eval"

    def rag_fold(self, label: str) -> Path:
        """The rag arm with half of the new examples in its pool, scored on the other half (fold a or b)."""
        return self.root / f"rag-new-{label}"

    @property
    def result(self) -> Path:
        return self.root / "drift.json"


def open_run(run_dir: str | Path, trust_remote_code: bool = False) -> tuple[RunPaths, Recipe]:
    """The run's paths and recipe. A run folder may come from anyone, so its recipe.yaml never turns
    model.trust_remote_code on: only the caller does (the command line, or the user's own recipe
    when `tunelab run` evaluates the run it just trained). A copy asking for it is named and ignored."""
    paths = RunPaths(Path(run_dir))
    if not paths.recipe.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no recipe.yaml); runs are made by `tunelab train`")
    recipe = load_recipe(paths.recipe, graders_file_fallback(paths))
    if recipe.model.trust_remote_code and not trust_remote_code:
        say(f"warning: {paths.recipe} sets model.trust_remote_code: true; ignored (a run folder never runs "
            "a model's code on its own say; pass --trust-remote-code if you trust this model)")
    recipe.model.trust_remote_code = trust_remote_code
    return paths, recipe


def graders_file_fallback(paths: RunPaths, announce: bool = True) -> list[str]:
    """The override pointing eval.graders_file at the run's copy when the path its recipe.yaml names is gone
    (`announce`: say so; a page that polls the run does not)."""
    try:
        named = (yaml.safe_load(paths.recipe.read_text(encoding="utf-8")) or {}).get("eval", {}).get("graders_file")
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return []  # load_recipe names the problem
    if not isinstance(named, str) or not named or Path(named).is_file() or (paths.root / named).is_file():
        return []
    if not paths.graders_copy.is_file():
        return []  # load_recipe's "graders file not found" names the path
    if announce:
        say(f"note: {paths.recipe}: eval.graders_file {named} not found; using the run's copy {paths.graders_copy}")
    return [f"eval.graders_file={paths.graders_copy}"]


def load_tuned_model(
    run_dir: str | Path, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The fine-tuned model of a run: base + adapter (kept unmerged) for LoRA, the saved folder for full."""
    paths, recipe = open_run(run_dir, trust_remote_code)
    return load_run_model(paths, recipe, device, dtype)


def load_run_model(
    paths: RunPaths, recipe: Recipe, device: str | None = None, dtype: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """load_tuned_model for a run already opened with open_run (whose recipe decides trust_remote_code)."""
    from tunelab.models import load_model, load_tokenizer

    trust_remote_code = recipe.model.trust_remote_code
    run_dir = paths.root
    dtype = dtype or recipe.model.dtype
    if paths.model.is_dir():
        model = load_model(str(paths.model), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return model, load_tokenizer(str(paths.model), trust_remote_code=trust_remote_code)
    if not paths.adapter.is_dir():
        raise ModelError(f"{run_dir}: has neither adapter/ nor model/; has its training finished?")
    weights = paths.adapter / "adapter_model.safetensors"
    if not weights.is_file():
        found = ", ".join(sorted(p.name for p in paths.adapter.iterdir())) or "nothing"
        raise ModelError(f"{weights}: not found (the folder holds {found}); tunelab loads adapter weights from "
                         "safetensors only, never pickle (.bin): re-save it with safe_serialization=True")
    from peft import PeftModel

    base = load_model(
        recipe.model.name, dtype=dtype, device=device, revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    model = PeftModel.from_pretrained(base, str(paths.adapter))
    model.eval()
    if paths.adapter_scale.is_file():
        from tunelab.contract import AdapterScale

        set_adapter_scale(model, AdapterScale.from_file(paths.adapter_scale).scale)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    return model, tokenizer


def set_adapter_scale(model: nn.Module, scale: float) -> int:
    """Scale every LoRA layer's update to `scale` times what training left, in place (WiSE-FT: 0 is the
    base model, 1 the fine-tune as trained); merging afterwards merges at that scale. Relative to the
    trained scaling, so calling it again never compounds. Returns the number of LoRA layers scaled."""
    layers = 0
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and hasattr(module, "lora_A"):
            trained = module.__dict__.setdefault("_tunelab_trained_scaling", dict(scaling))
            for adapter, value in trained.items():
                scaling[adapter] = value * scale
            layers += 1
    return layers


# ---------------------------------------------------------------------------------------------- lineage
# (runs made by `tunelab update` or `rebase`: lifecycle/lineage.py makes them; the report and
# `runs list` read them through these)


def lineage_path(paths: RunPaths) -> Path:
    return paths.eval / "lineage.json"


def read_lineage(paths: RunPaths) -> Lineage | None:
    path = lineage_path(paths)
    if not path.is_file():
        return None
    try:
        return Lineage.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def data_fingerprint_id(manifest: Mapping[str, Any]) -> str | None:
    """12 hex digits naming the data a run was trained on (its manifest's data_fingerprint: the
    fingerprint's own sha256 where it has one, else a hash of the whole fingerprint), or None."""
    fingerprint = manifest.get("data_fingerprint")
    if not isinstance(fingerprint, dict) or not fingerprint:
        return None
    own = fingerprint.get("sha256")
    return own[:12] if isinstance(own, str) else hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def parent_paths(child: RunPaths, parent: Mapping[str, Any]) -> RunPaths:
    """The parent's folder: the sibling of the same name (children are made next to their parent, so
    this holds wherever the two are moved together), else the path recorded at creation."""
    sibling = child.root.parent / str(parent.get("name") or "")
    return RunPaths(sibling if parent.get("name") and (sibling / "recipe.yaml").is_file() else Path(str(parent.get("path"))))


@contextlib.contextmanager
def removed_unless_trained(paths: RunPaths) -> Iterator[None]:
    """Remove the run folder this command just made (tunelab run, update, rebase) when what runs inside
    fails before training logged a step or wrote a checkpoint (a base model that does not load, bad
    data), so a retry with the same name starts clean; a run with training progress is kept for --resume."""
    try:
        yield
    except BaseException:
        if not paths.train_log.exists() and not any(paths.checkpoints.glob("step-*")):
            shutil.rmtree(paths.root, ignore_errors=True)
        raise
