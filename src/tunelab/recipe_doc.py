"""The recipe reference in docs/recipe.md, built from the config models so that it cannot drift.

Reads the pydantic models of tunelab.config (each key's default, allowed values and description);
writes the generated part of docs/recipe.md, between GENERATED_START and GENERATED_END.
`python -m tunelab.recipe_doc` rewrites that part in place; tests/test_docs.py fails when it is stale.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tunelab.config import Recipe

GENERATED_START = "<!-- generated from src/tunelab/config.py: run `python -m tunelab.recipe_doc` to update -->"
GENERATED_END = "<!-- end of generated part -->"
DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "recipe.md"

# Meanings of keys whose Field has no description yet. A description in config.py wins; move these
# there when a section is next edited (config.py is the one home of a key's default and meaning).
_MEANINGS = {
    "method": "lora (default), dora, qlora (4-bit base, CUDA only) or full fine-tuning; dpo: preference "
              "tuning on pairs (the dpo section)",
    "out_dir": "folder that holds the run folders",
    "lora.rank": "rank r of the LoRA matrices",
    "lora.alpha": "LoRA scaling numerator: updates are scaled by alpha / rank",
    "lora.dropout": "dropout on the LoRA input",
    "train.epochs": "passes over the training examples (max_steps, when set, decides instead)",
    "train.warmup_ratio": "fraction of the steps with a linear learning-rate warm-up",
    "train.lr_schedule": "learning-rate decay after warm-up",
    "train.weight_decay": "AdamW weight decay",
    "train.grad_clip": "gradient norm clipped to this",
    "train.eval_every_steps": "validation loss (and a train sample's loss) every N optimizer steps and at the end",
    "train.checkpoint_every_steps": "checkpoint every N optimizer steps (and at each new best and at the end)",
    "train.gradient_checkpointing": "recompute activations in the backward pass: less memory, slower steps",
    "train.packing": "put several whole examples in one row (kept apart by the attention setting)",
    "train.seed": "seed of the shuffling, the train sample and the weight initialisation of adapters",
    "eval.arms": "arms evaluated: base, prompt, rag, tuned, tuned+rag (see docs/evaluation.md)",
    "eval.max_new_tokens": "generation limit per answer",
    "eval.batch_size": "prompts generated together (latency is reported at this batch size)",
    "eval.forgetting": "measure general ability of the base and tuned model (perplexity and probes)",
    "eval.seed": "seed of the few-shot choice, the train sample and the bootstrap",
}


def _section_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _type_text(annotation: Any) -> str:
    """`lora | dora`, `int`, `float | null`: what a user may write for a key."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) if not isinstance(a, str) else a for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_text(a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return f"list of {_type_text(item)}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def render() -> str:
    """The generated part: one table per section, keys in the order of the models."""
    top = [(name, field) for name, field in Recipe.model_fields.items() if not _section_model(field.annotation)]
    sections = [(name, _section_model(field.annotation)) for name, field in Recipe.model_fields.items()
                if _section_model(field.annotation)]
    lines = [GENERATED_START, ""]

    def table(title: str, prefix: str, fields: list[tuple[str, Any]]) -> None:
        lines.extend([f"### {title}", "", "| key | values | default | meaning |", "|---|---|---|---|"])
        for name, field in fields:
            meaning = (field.description or _MEANINGS.get(f"{prefix}{name}", "")).replace("|", "\\|")
            lines.append(f"| `{prefix}{name}` | {_type_text(field.annotation)} | {_default_text(field)} | {meaning} |")
        lines.append("")

    table("top level", "", top)
    for name, model in sections:
        doc = (model.__doc__ or "").strip().splitlines()
        table(f"`{name}` ({model.__name__})" + (f": {doc[0]}" if doc else ""), f"{name}.", list(model.model_fields.items()))
    lines.append(GENERATED_END)
    return "\n".join(lines) + "\n"


def generated_part(text: str) -> str | None:
    """The generated part of a docs/recipe.md text, markers included; None when the markers are missing."""
    start, end = text.find(GENERATED_START), text.find(GENERATED_END)
    if start < 0 or end < start:
        return None
    return text[start:end + len(GENERATED_END)] + "\n"


def update(path: Path = DOC_PATH) -> bool:
    """Rewrite the generated part of `path` in place; True when it changed."""
    text = path.read_text(encoding="utf-8")
    old = generated_part(text)
    if old is None:
        raise SystemExit(f"{path}: the markers {GENERATED_START!r} ... {GENERATED_END!r} are missing")
    new_text = text.replace(old, render())
    if new_text == text:
        return False
    path.write_text(new_text, encoding="utf-8")
    return True


if __name__ == "__main__":
    changed = update(Path(sys.argv[1]) if len(sys.argv) > 1 else DOC_PATH)
    print(f"{DOC_PATH}: {'updated' if changed else 'already up to date'}")
