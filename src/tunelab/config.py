"""The recipe: typed config models, YAML loading and dotted command-line overrides.

Reads a recipe YAML (safe_load) and `key=value` overrides; precedence is defaults < file < command
line. Every problem (unknown keys with the closest valid key, wrong types) is collected and raised
as one ConfigError naming the file, the line and the field. Each default is written once, here.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import ConfigError

# Learning rates that keep general ability: far below pre-training's; LoRA tolerates 10-20x more.
DEFAULT_LR = {"lora": 2.0e-4, "dora": 2.0e-4, "qlora": 2.0e-4, "full": 1.0e-5}
ARMS = ("base", "prompt", "rag", "tuned", "tuned+rag")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field("smollm2-135m-instruct", description="alias | local HF folder | hub id | file.gguf")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run code shipped with a hub model; off unless asked")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, float32 on CPU"
    )
    adapter: str | None = Field(
        None, description="LoRA family: start from this PEFT adapter folder's weights instead of a fresh "
        "adapter (tunelab update sets it to the parent run's adapter/); it must fit the model and the lora section",
    )


class DataConfig(_Section):
    train: str | None = Field(None, description="training examples: JSONL, JSON, CSV, Parquet or a folder")
    valid: str | None = Field(None, description="optional: else a seeded split of train")
    test: str | None = Field(None, description="optional: else a seeded split of train; used by eval only")
    format: Literal["auto", "openai", "alpaca", "sharegpt", "prompt_completion"] = Field(
        "auto", description="auto: detected per record"
    )
    max_seq_len: int = Field(512, gt=8, description="tokens; longer examples are reported and dropped")
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="split off train when valid is not given")
    valid_max: int = Field(1000, ge=1, description="cap on the number of split-off validation examples")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="split off train when test is not given")
    test_max: int = Field(1000, ge=1, description="cap on the number of split-off test examples")
    dedupe: bool = Field(True, description="drop exact duplicates (listed in rejected.jsonl)")
    system_prompt: str | None = Field(None, description="added to examples that have no system message")
    seed: int = Field(0, description="seed of the splits")


class LoraConfig(_Section):
    rank: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: str | list[str] = Field("all-linear", description="'all-linear' or module names, e.g. [q_proj, v_proj]")


class TrainConfig(_Section):
    epochs: float = Field(2, gt=0)
    lr: float | None = Field(None, gt=0, description="default by method: 2e-4 for LoRA/DoRA/QLoRA, 1e-5 for full")
    tokens_per_step: int = Field(8192, ge=1, description="global batch in trainable-or-not real tokens per optimizer step")
    micro_batch_tokens: int | None = Field(
        None, ge=16, description="tokens per forward pass; default: max_seq_len on CPU, on a GPU the most that fit "
        "85% of its memory (probed before training)",
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every_steps: int = Field(50, ge=1)
    eval_max_examples: int = Field(200, ge=1, description="validation (and train-sample) examples per evaluation")
    checkpoint_every_steps: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="newest K kept, plus the best")
    early_stop_patience: int | None = Field(3, ge=1, description="evaluations without improvement; null: never stop early")
    max_nonfinite_steps: int = Field(5, ge=1, description="abort after this many consecutive non-finite steps")
    gradient_checkpointing: bool = False
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each decoder layer; auto = on a GPU when the run is long enough "
        "(>= 4M tokens) to pay back up to a minute and a half of compiling",
    )
    packing: bool = True
    attention: Literal["auto", "varlen", "mask"] = Field(
        "auto", description="how packed examples are kept apart: varlen = examples end to end through a "
        "variable-length attention kernel (flash on GPU); mask = padded rows with a block-diagonal mask; "
        "auto = varlen on a GPU in bf16, mask elsewhere",
    )
    distributed: Literal["auto", "ddp", "fsdp", "none"] = Field(
        "auto", description="under torchrun (--nproc N): ddp = every rank holds the model, gradients summed; "
        "fsdp = method full only: weights, gradients and AdamW state sharded over ranks (FSDP2), for a model "
        "that does not fit one GPU with them; auto = none for one process, else ddp (less communication)",
    )
    seed: int = 0


class EvalConfig(_Section):
    arms: list[str] = Field(default_factory=lambda: list(ARMS))
    shots: int = Field(5, ge=0, description="few-shot examples in the prompt arm")
    rag_k: int = Field(5, ge=1, description="retrieved examples in the rag arms")
    rag_docs: str | None = Field(None, description="folder of documents to retrieve from instead of the train split")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1, description="evaluate only the first N test examples")
    instructions: str | None = Field(None, description="prompt arm's instructions; default derived from system prompts")
    schema_file: str | None = Field(None, description="JSON schema the outputs must conform to")
    forgetting: bool = True
    forgetting_threshold: float = Field(0.05, ge=0.0, description="flag a relative drop in general ability beyond this")
    price_per_m_input_tokens: float = Field(0.15, ge=0.0, description="USD per 1M prompt tokens, for cost projection")
    price_per_m_output_tokens: float = Field(0.60, ge=0.0, description="USD per 1M completion tokens")
    gpu_price_per_hour: float = Field(2.5, ge=0.0, description="USD, for the training cost estimate")
    seed: int = 0

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: list[str]) -> list[str]:
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
        return arms


class Recipe(_Section):
    name: str = Field("run", description="run folder name under out_dir")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: Literal["lora", "dora", "qlora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    out_dir: str = "runs"

    @model_validator(mode="after")
    def _method_defaults(self) -> Recipe:
        if self.train.lr is None:
            self.train.lr = DEFAULT_LR[self.method]
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# loading


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each mapping key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = (*path, str(key_node.value))
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _valid_keys(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(errors: list[dict[str, Any]], source: str, key_lines: dict[tuple[str, ...], int]) -> list[str]:
    problems = []
    for err in errors:
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc) if loc else "(recipe)"
        line = key_lines.get(loc) or key_lines.get(loc[:-1])
        where = f"{source}:{line}" if line else source
        if err["type"] == "extra_forbidden":
            candidates = _valid_keys(Recipe, loc[:-1])
            close = difflib.get_close_matches(loc[-1], candidates, n=1, cutoff=0.5)
            hint = f" (did you mean '{'.'.join((*loc[:-1], close[0]))}'?)" if close else ""
            problems.append(f"{where}: unknown key '{dotted}'{hint}")
        else:
            got = err.get("input")
            got_text = f", got {got!r}" if not isinstance(got, dict | list) and got is not None else ""
            problems.append(f"{where}: {dotted}: {err['msg']}{got_text}")
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001); the value is parsed as YAML (numbers, null, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err.__class__.__name__})") from None
    # YAML 1.1 reads 1e-4 as a string (it wants 1.0e-4); users type the former.
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping of keys (name, model, data, ...), got {type(data).__name__}")
    return data, text


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Defaults < file < overrides. Relative data paths in the file are resolved against its folder."""
    data: dict[str, Any] = {}
    text = ""
    source = "<overrides>"
    if path is not None:
        path = Path(path)
        data, text = _read_yaml(path)
        source = str(path)
        section = data.get("data")
        if isinstance(section, dict):
            for key in ("train", "valid", "test"):
                value = section.get(key)
                if isinstance(value, str) and not Path(value).is_absolute():
                    resolved = path.parent / value
                    # keep paths the user wrote relative to the working directory working too
                    section[key] = value if Path(value).exists() and not resolved.exists() else str(resolved)
    data = apply_overrides(data, list(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        problems = _describe(err.errors(), source, _key_lines(text))
        raise ConfigError("\n".join(problems)) from None
