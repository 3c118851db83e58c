"""The run directory: the contract between stages (docs/run-directory.md).

Names every path of `runs/<name>/` once, and loads what a finished training left there: the recipe
and the tuned model (base + PEFT adapter, or a full model folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import Recipe, load_recipe
from tunelab.errors import ConfigError, ModelError

if TYPE_CHECKING:
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
    def train_log(self) -> Path:
        return self.root / "train" / "log.jsonl"

    @property
    def plan(self) -> Path:
        return self.root / "train" / "plan.json"

    @property
    def train_summary(self) -> Path:
        return self.root / "train" / "summary.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

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
        return self.root / "eval" / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "eval" / "predictions.jsonl"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"


def open_run(run_dir: str | Path) -> tuple[RunPaths, Recipe]:
    paths = RunPaths(Path(run_dir))
    if not paths.recipe.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no recipe.yaml); runs are made by `tunelab train`")
    return paths, load_recipe(paths.recipe)


def load_tuned_model(
    run_dir: str | Path, device: str | None = None, dtype: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The fine-tuned model of a run: base + adapter (kept unmerged) for LoRA, the saved folder for full."""
    from tunelab.models import load_model, load_tokenizer

    paths, recipe = open_run(run_dir)
    dtype = dtype or recipe.model.dtype
    if paths.model.is_dir():
        return load_model(str(paths.model), dtype=dtype, device=device), load_tokenizer(str(paths.model))
    if not paths.adapter.is_dir():
        raise ModelError(f"{run_dir}: has neither adapter/ nor model/; has its training finished?")
    from peft import PeftModel

    base = load_model(
        recipe.model.name, dtype=dtype, device=device, revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    model = PeftModel.from_pretrained(base, str(paths.adapter))
    model.eval()
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    return model, tokenizer
