"""The recipe: typed config models, YAML loading and dotted command-line overrides.

Reads a recipe YAML (safe_load) and `key=value` overrides; precedence is defaults < file < command
line. Every problem (unknown keys with the closest valid key, wrong types) is collected and raised
as one ConfigError naming the file, the line and the field. Each default is written once, here.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveFloat,
    PositiveInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from tunelab.errors import ConfigError
from tunelab.specs.graders import (
    Grader,
    PairwiseJudge,
    check_names,
    line_of,
    recipe_graders,
    strip_union_tags,
)
from tunelab.specs.graders import key_lines as _key_lines

# Learning rates that keep general ability: far below pre-training's; LoRA tolerates 10-20x more.
DEFAULT_LR = {"lora": 2.0e-4, "dora": 2.0e-4, "qlora": 2.0e-4, "full": 1.0e-5}
# DPO moves a model that already answers well: a smaller step than supervised tuning (TRL: 1e-6 full;
# LoRA tolerates more), by the weights it trains (dpo.weights)
DEFAULT_DPO_LR = {"lora": 5.0e-5, "dora": 5.0e-5, "full": 1.0e-6}
# train.budget: auto, by the device the run trains on (a CPU run must leave time for evaluation)
DEFAULT_BUDGET = {"cpu": "10m", "cuda": "60m"}
# The evaluation's arms, in the order they run and are shown (base-model arms first). The one
# definition: eval, report and the CLI import these.
ARMS = ("base", "prompt", "rag", "tuned", "tuned+rag")
TUNED_ARMS = ("tuned", "tuned+rag")  # answered by the fine-tuned weights
PROMPT_ONLY_ARMS = tuple(a for a in ARMS if a not in TUNED_ARMS)  # the base model, prompted
RAG_ARMS = ("rag", "tuned+rag")  # with retrieved examples or document chunks
SFT_ARM = "sft"  # a preference-tuned run's supervised parent: fine-tuned weights too

# every per-example metric eval/metrics.py's score_outputs can compute (a grader may not take their names)
BUILTIN_METRICS = ("exact_match", "normalized_match", "token_f1", "rouge_l", "json_valid", "json_exact",
                   "json_field_accuracy", "label_accuracy", "schema_valid")


def is_tuned_arm(arm: str) -> bool:
    """Answered by fine-tuned weights; every other arm (the base model prompted, an external model) is
    what the team would use instead."""
    return arm in TUNED_ARMS or arm == SFT_ARM


# Recipes are a few hundred bytes; these bounds keep a hostile or broken one to a few MB of memory.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000  # values (mappings, lists, scalars) with every YAML alias expanded
MAX_CONFIG_CHARS = 4 << 20  # scalar characters with every YAML alias expanded
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str | float) -> float:
    """'90s', '10m', '2h', '1h30m' or a number of seconds -> seconds (> 0)."""
    value = str(text).strip().lower()
    match = _DURATION.fullmatch(value)
    if match and any(match.groups()):
        hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
        total = hours * 3600 + minutes * 60 + seconds
    else:
        try:
            total = float(value)
        except ValueError:
            raise ValueError(f"'{text}' is not a duration; write e.g. 90s, 10m, 2h or 1h30m") from None
    if not (total > 0 and total < 10 * 365 * 86400):
        raise ValueError(f"'{text}': a duration must be positive and finite")
    return total


class _Section(BaseModel):
    # every number of a recipe is finite and fits 64 bits: `epochs: .inf` would train forever, a seed
    # of 2**70 fails deep inside torch
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _fits_64_bits(cls, value: Any) -> Any:
        if type(value) is int and not -(2**63) <= value < 2**63:
            raise ValueError("must lie between -2**63 and 2**63 - 1")
        return value


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
    # "auto" keys are planned from the data and the budget before step 1 (train/plan.py; the plan
    # and why are printed and written to train/plan.json). A value you set wins over auto.
    budget: str | None = Field(
        "auto", description="wall-clock limit of the training stage: 90s, 10m, 2h, 1h30m; null: none; "
        f"auto = {DEFAULT_BUDGET['cpu']} on CPU, {DEFAULT_BUDGET['cuda']} on a GPU, plus the time replay takes "
        "(at most 15% more; a budget you set includes it) (binds epochs only where they are auto, or when set explicitly)",
    )
    epochs: PositiveFloat | Literal["auto"] = Field(
        "auto", description="passes over the training examples; auto: 3, more for tiny sets (at least "
        "100 examples seen), fewer for large ones (at most 25k examples seen), then capped by the budget",
    )
    lr: float | None = Field(None, gt=0, description="default by method: 2e-4 for LoRA/DoRA/QLoRA, 1e-5 for full")
    tokens_per_step: PositiveInt | Literal["auto"] = Field(
        "auto", description="global batch in real tokens per optimizer step; auto: the mean example "
        "length x examples a step, about 2% of the examples (a power of two, 4 to 256)",
    )
    micro_batch_tokens: int | None = Field(
        None, ge=16, description="tokens per forward pass; default: max_seq_len on CPU, on a GPU the most that fit "
        "85% of its memory (probed before training)",
    )
    max_steps: int | None = Field(
        None, ge=1, description="the run's length in optimizer steps; when set, epochs are ignored"
    )
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every_steps: PositiveInt | Literal["auto"] = Field("auto", description="auto: about 10 evaluations a run")
    eval_max_examples: PositiveInt | Literal["auto"] = Field(
        "auto", description="validation (and train-sample) examples per evaluation; auto: 200, fewer "
        "under a budget so that evaluations take about 15% of it (at least 32)",
    )
    checkpoint_every_steps: PositiveInt | Literal["auto"] = Field("auto", description="auto: at every evaluation")
    keep_checkpoints: int = Field(2, ge=1, description="newest K kept, plus the best")
    early_stop_patience: int | None = Field(3, ge=1, description="evaluations without improvement; null: never stop early")
    max_nonfinite_steps: int = Field(5, ge=1, description="abort after this many consecutive non-finite steps")
    gradient_checkpointing: bool = False
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each decoder layer; auto = when the run is long enough to pay "
        "the compiling back: >= 4M tokens on a GPU, >= 50k tokens (or >= 5 minutes of training at the measured "
        "speed) on a CPU with a C++ compiler installed",
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
    replay: str | None = Field(
        None, description="JSONL of your own general chat examples mixed into training; default: the base model's "
        "own answers to general prompts shipped with tunelab (self-replay, generated once per model)",
    )
    replay_share: float | Literal["auto"] = Field(
        "auto", description="share of each pass's training examples that are replay (never in valid/test), each "
        "pass reading a different slice of the replay pool; 0 = none; auto: as many different replay examples a "
        "pass as 12% of the pass's tokens buys (self-replay rows are their first 12 answer tokens; an auto "
        "budget adds that time), decided in "
        "data/stats.json and train/plan.json with its reason",
    )
    anchor: float = Field(
        1.0, ge=0.0, description="weight of a KL term toward the base model on replay examples' answer tokens "
        "(the base model's top-16 next-token distribution, computed once before training with the adapter "
        "off); 0 = off; nothing without replay",
    )
    seed: int = 0

    @field_validator("replay_share")
    @classmethod
    def _share_below_one(cls, share: float | str) -> float | str:
        if share != "auto" and not 0.0 <= float(share) < 0.9:
            raise ValueError("give a share from 0 (no replay) to below 0.9, or auto")
        return share

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_is_a_duration(cls, budget: Any) -> Any:
        if isinstance(budget, int | float) and not isinstance(budget, bool):
            budget = f"{budget:g}s"  # a bare number is seconds
        if isinstance(budget, str) and budget != "auto":
            parse_duration(budget)
        return budget

    def budget_s(self, device_type: str) -> float | None:
        """The budget in seconds for a run on this kind of device (None: no budget)."""
        if self.budget is None:
            return None
        return parse_duration(DEFAULT_BUDGET["cuda" if device_type == "cuda" else "cpu"] if self.budget == "auto" else self.budget)


# ---------------------------------------------------------------------------------------------- external arms
# eval.external: models the team would really use instead of a fine-tune, scored on the same test set
# through the same graders (eval/external.py runs them; docs/evaluation.md).
EXTERNAL_PROMPTS = {"short": "base", "prompt": "prompt", "rag": "rag"}  # -> the built-in arm whose prompt it gets


class _ExternalArm(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="the arm's name in "
                      "eval/metrics.json and the report; letters, digits, '.', '_', '-' (a file name in eval/external/)")

    @field_validator("name")
    @classmethod
    def _not_a_builtin_arm(cls, name: str) -> str:
        if name in ARMS:
            raise ValueError(f"'{name}' is a built-in arm; give the external arm another name")
        return name


class EndpointArm(_ExternalArm):
    """An OpenAI-compatible chat completions endpoint (hosted API, vLLM, `tunelab serve` ...)."""

    kind: ClassVar[str] = "endpoint"
    base_url: str = Field(pattern=r"^https?://[^\s]+$", description="the API root, e.g. https://api.openai.com/v1")
    model: str = Field(min_length=1, description="the model id the endpoint serves")
    api_key_env: str | None = Field(None, description="the NAME of the environment variable holding the key "
                                    "(never the key); none: no key sent")
    prompt: Literal["short", "prompt", "rag"] = Field("prompt", description="which tunelab prompt it receives: "
                                                      "short = the example's own messages (like base)")
    price_per_m_input_tokens: float = Field(ge=0.0, description="USD per 1M prompt tokens (required: a price of 0 is written out)")
    price_per_m_output_tokens: float = Field(ge=0.0, description="USD per 1M completion tokens")
    concurrency: int = Field(8, ge=1, le=256, description="requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, description="per request")
    max_retries: int = Field(4, ge=0, le=20, description="retries of a request (429, 5xx, timeouts, connection errors)")

    @model_validator(mode="before")
    @classmethod
    def _a_name_not_a_key(cls, data: Any) -> Any:
        # checked on the whole mapping, so that the error never echoes a pasted key
        value = data.get("api_key_env") if isinstance(data, dict) else None
        if value is not None and not (isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value)):
            raise ValueError("api_key_env is the NAME of an environment variable holding the key (e.g. "
                             "OPENAI_API_KEY), not the key itself")
        return data


class LocalArm(_ExternalArm):
    """A local model (alias, HF folder or hub id) through tunelab's generation engine and prompt builder."""

    kind: ClassVar[str] = "local"
    model: str = Field(min_length=1, description="alias | local HF folder | hub id | file.gguf")
    prompt: Literal["short", "prompt", "rag"] = "prompt"
    price_per_m_input_tokens: float | None = Field(None, ge=0.0, description="default: eval.price_per_m_input_tokens")
    price_per_m_output_tokens: float | None = Field(None, ge=0.0, description="default: eval.price_per_m_output_tokens")


class RecordedArm(_ExternalArm):
    """Outputs recorded elsewhere (production): JSONL, one {"id" or "line", "output"} per test example."""

    kind: ClassVar[str] = "recorded"
    predictions: str = Field(min_length=1, description="JSONL file of recorded outputs")
    price_per_m_input_tokens: float | None = Field(None, ge=0.0, description="default: eval.price_per_m_input_tokens")
    price_per_m_output_tokens: float | None = Field(None, ge=0.0, description="default: eval.price_per_m_output_tokens")


def _external_kind(value: Any) -> str:
    """base_url -> endpoint, predictions -> recorded, else a local model."""
    if isinstance(value, dict):
        return "endpoint" if "base_url" in value else "recorded" if "predictions" in value else "local"
    return getattr(value, "kind", "local")


EXTERNAL_KINDS = ("endpoint", "local", "recorded")
ExternalArm = Annotated[
    Annotated[EndpointArm, Tag("endpoint")] | Annotated[LocalArm, Tag("local")] | Annotated[RecordedArm, Tag("recorded")],
    Discriminator(_external_kind),
]


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
    keep: str | None = Field(
        None, description="JSONL of chat examples with references (the test set's format) the fine-tune must not "
        "break, e.g. other tasks the same model serves: base and tuned answer them, scored and compared in "
        "forgetting.keep, flagged beyond eval.forgetting_threshold; relative to the recipe file",
    )
    forgetting_policy: Literal["balance", "task", "report"] = Field(
        "balance", description="the LoRA adapter scale the tuned arm, chat, serve and export use, chosen on the "
        "validation split among eval.adapter_scales: balance = the best task score whose retention and perplexity "
        "stay within eval.forgetting_threshold, giving up at most eval.scale_max_task_loss points (when none does, the "
        "scale within those points that keeps the most general ability, if it keeps more by more than the "
        "threshold); task = the best "
        "task score; report = measure them all, keep 1.0",
    )
    scale_max_task_loss: float = Field(
        3.0, ge=0.0, description="points of validation task score (0-100) eval.forgetting_policy balance may give up "
        "for general ability; a scale that costs more is not kept and the loss stays flagged",
    )
    adapter_scales: list[float] = Field(
        default_factory=lambda: [1.0, 0.875, 0.75, 0.5],
        description="LoRA adapter scales tried (1 = the fine-tune as trained, 0 = the base model; WiSE-FT)",
    )
    price_per_m_input_tokens: float = Field(0.15, ge=0.0, description="USD per 1M prompt tokens, for cost projection")
    price_per_m_output_tokens: float = Field(0.60, ge=0.0, description="USD per 1M completion tokens")
    gpu_price_per_hour: float = Field(2.5, ge=0.0, description="USD, for the training cost estimate")
    tuned_price_per_m_input_tokens: float = Field(
        0.30, ge=0.0, description="USD per 1M prompt tokens served by the fine-tuned model (hosts charge more for "
        "fine-tuned weights than for the base model: OpenAI charged 2x)")
    tuned_price_per_m_output_tokens: float = Field(1.20, ge=0.0, description="USD per 1M completion tokens, fine-tuned")
    requests_per_month: PositiveInt | None = Field(
        None, description="expected requests a month: the training cost is then spread over amortize_months of them "
        "in each fine-tuned arm's cost per request")
    amortize_months: PositiveInt = Field(12, description="months over which the training cost is spread (with "
                                                         "requests_per_month)")
    margin: float = Field(2.0, ge=0.0, le=100.0, description="points (0-100 of the primary's range) by which an "
                          "arm may trail the best and still count as 'as good' when the cheapest such arm is chosen")
    max_latency_ms: PositiveFloat | None = Field(None, description="arms slower than this at p95 are never "
                                                                   "recommended")
    seed: int = 0
    graders: list[Grader] = Field(
        default_factory=list, description="graders in OpenAI's shapes (string_check, text_similarity, python, "
        "score_model, label_model, multi): a column each in eval/metrics.json; see docs/graders.md",
    )
    graders_file: str | None = Field(None, description="JSON or YAML file of more graders (an OpenAI grader JSON, "
                                                       "one object or a list, pastes in unchanged)")
    primary: str | None = Field(None, description="the grader or built-in metric the verdict is about; default: "
                                                  "chosen from the references (JSON fields, label accuracy, token F1)")
    human_labels: str | None = Field(None, description='JSONL of {"id", "score", "arm"?: default tuned}: human '
                                                       "scores -> judge/human agreement and Cohen's kappa")
    pairwise: PairwiseJudge | None = Field(None, description="a judge comparing the verdict's two arms output by "
                                                             "output, in both orders (disagreement = tie)")
    external: list[ExternalArm] = Field(
        default_factory=list, description="more arms on the same test set: an OpenAI-compatible endpoint {name, "
        "base_url, model, api_key_env, prompt, prices}, a local model {name, model, prompt} or recorded outputs "
        "{name, predictions}; see docs/evaluation.md",
    )

    @field_validator("adapter_scales")
    @classmethod
    def _scales_in_range(cls, scales: list[float]) -> list[float]:
        if not scales or any(not 0.0 <= s <= 2.0 for s in scales):
            raise ValueError("give one or more scales between 0 and 2, e.g. [1.0, 0.75, 0.5]")
        return sorted(set(scales), reverse=True)

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: list[str]) -> list[str]:
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
        return arms

    @field_validator("external")
    @classmethod
    def _unique_external_names(cls, arms: list[Any]) -> list[Any]:
        names = [a.name for a in arms]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"external arm name(s) {twice} given more than once")
        return arms


class DpoConfig(_Section):
    # method: dpo (train/preference.py, docs/training.md): preference pairs, the reference is the model
    # as training starts (the base, or model.adapter's supervised run), its log-probs computed once
    beta: float = Field(0.1, gt=0, description="how far the tuned model may move from the reference: the "
                                               "scale of the implicit reward (smaller: further)")
    loss: Literal["sigmoid", "ipo", "orpo", "kto"] = Field(
        "sigmoid", description="sigmoid = DPO's -log sigmoid(beta x margin); ipo = (margin - 1/(2 beta))^2, "
        "which stops pushing once the margin is reached (less overfitting on small or noisy pairs); orpo = "
        "one stage, no reference: the supervised loss on the preferred answer plus dpo.orpo_lambda x ORPO's "
        "log odds-ratio term (Hong et al. 2024; dpo.beta is not used); kto = unpaired thumbs up/down "
        "examples {prompt, completion, label} (Ethayarajh et al. 2024, as TRL's KTOTrainer)",
    )
    orpo_lambda: float = Field(0.1, gt=0, description="loss orpo: the weight of the odds-ratio term beside the "
                                                      "supervised loss (TRL's ORPOConfig.beta, the paper's lambda)")
    sft_weight: float = Field(1.0, ge=0, description="loss sigmoid or ipo: the weight of a supervised term on the "
                              "preferred answer (its negative mean log-prob per token) added to each pair's loss, "
                              "as TRL's rpo_alpha and LLaMA-Factory's pref_ftx: it keeps the preferred answers likely, "
                              "which stops DPO's answers degenerating into repeated lines; 0: plain DPO/IPO "
                              "(1.0 measured: docs/measurements.md)")
    kto_desirable_weight: float = Field(1.0, gt=0, description="loss kto: the weight of desirable examples' losses "
                                                               "(raise it when they are the fewer)")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="loss kto: the weight of undesirable examples' losses")
    weights: Literal["lora", "dora", "full"] = Field(
        "lora", description="which weights DPO trains: a LoRA (or DoRA) adapter with the lora section, or all of them",
    )


class Recipe(_Section):
    name: str = Field("run", description="run folder name under out_dir")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: Literal["lora", "dora", "qlora", "full", "dpo"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    out_dir: str = "runs"

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str) -> str:
        # the run folder must stay inside out_dir: "../x", "/tmp/x" or "a/b" would put it elsewhere
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError("must be one folder name (no '/', '\\', '.' or '..'): the run is written to out_dir/name")
        return name

    @model_validator(mode="after")
    def _method_defaults(self) -> Recipe:
        if self.train.lr is None:
            if self.method != "dpo":
                self.train.lr = DEFAULT_LR[self.method]
            elif self.dpo.loss == "orpo":  # mostly supervised learning (one stage, from the base): its rates
                self.train.lr = DEFAULT_LR[self.dpo.weights]
            else:
                self.train.lr = DEFAULT_DPO_LR[self.dpo.weights]
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_yaml(self, explain_auto: bool = False) -> str:
        """The recipe as YAML; `explain_auto` adds what each `auto` value means as a comment."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if not explain_auto:
            return text
        lines, section = [], None
        for line in text.splitlines():
            if not line.startswith(" ") and line.endswith(":"):
                section = type(self).model_fields.get(line[:-1])
            key, _, value = line.strip().partition(": ")
            model = section.annotation if section is not None else None
            field = model.model_fields.get(key) if isinstance(model, type) and issubclass(model, BaseModel) else None
            if line.startswith("  ") and value == "auto" and field is not None and field.description:
                line = f"{line}  # {field.description}"
            lines.append(line)
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# loading


def _valid_keys(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


_UNION_MEMBER = re.compile(r"^(constrained-\w+|literal\[.*\]|int|float|str|bool|none|function-\w+\[.*\])$")


def _describe(errors: list[dict[str, Any]], source: str, key_lines: dict[tuple[str, ...], int]) -> list[str]:
    problems: dict[tuple[str, ...], str] = {}
    for err in errors:
        # a value checked against each member of a union (e.g. a number or 'auto') fails once per
        # member: one line for the key, its messages joined
        loc = strip_union_tags(tuple(str(p) for p in err["loc"] if not _UNION_MEMBER.match(str(p))))
        loc = tuple(p for i, p in enumerate(loc) if not (p in EXTERNAL_KINDS and i > 1 and loc[i - 2] == "external"))
        dotted = ".".join(loc) if loc else "(recipe)"
        line = key_lines.get(loc) or key_lines.get(loc[:-1]) or line_of(loc, key_lines)
        where = f"{source}:{line}" if line else source
        if err["type"] == "extra_forbidden":
            candidates = _valid_keys(Recipe, loc[:-1])
            close = difflib.get_close_matches(loc[-1], candidates, n=1, cutoff=0.5)
            hint = f" (did you mean '{'.'.join((*loc[:-1], close[0]))}'?)" if close else ""
            problems[loc] = f"{where}: unknown key '{dotted}'{hint}"
        elif loc in problems:
            problems[loc] = problems[loc].replace(", got ", f" or {err['msg'][0].lower()}{err['msg'][1:]}, got ", 1)
        else:
            got = err.get("input")
            got_text = f", got {got!r}" if not isinstance(got, dict | list) and got is not None else ""
            problems[loc] = f"{where}: {dotted}: {err['msg']}{got_text}"
    return list(problems.values())


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001); the value is parsed as YAML (numbers, null, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.lr=1e-4")
    value = load_yaml_text(raw, f"override '{text}'") if raw.strip() else None
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


def _expanded_size(root: yaml.Node, source: str) -> tuple[int, int]:
    """(nodes, scalar characters) of a YAML node graph with every alias expanded, counted without
    expanding it: each node's size is computed once. Refuses an alias that contains itself."""
    sizes: dict[int, tuple[int, int]] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = (1, len(node.value))
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            active.discard(key)
            sized = [sizes[id(child)] for child in children]
            sizes[key] = (1 + sum(n for n, _ in sized), sum(c for _, c in sized))
            continue
        if key in active:
            raise ConfigError(f"{source}:{node.start_mark.line + 1}: a YAML alias refers to itself")
        active.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def load_yaml_text(text: str, source: str) -> Any:
    """YAML (or JSON) text -> Python values, bounded: at most MAX_CONFIG_BYTES of text and, with
    every alias expanded, MAX_CONFIG_NODES nodes and MAX_CONFIG_CHARS scalar characters, so that a
    small file of nested aliases cannot make validation walk millions of paths. Every config file
    tunelab reads goes through here."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text):,} characters; a config file is at most {MAX_CONFIG_BYTES:,}")
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        nodes, chars = _expanded_size(root, source)
        if nodes > MAX_CONFIG_NODES or chars > MAX_CONFIG_CHARS:
            raise ConfigError(
                f"{source}: expands to {nodes:,} values and {chars:,} characters through YAML aliases; a config "
                f"is at most {MAX_CONFIG_NODES:,} values and {MAX_CONFIG_CHARS:,} characters (write it out plainly)"
            )
        return loader.construct_document(root)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    data = load_yaml_text(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping of keys (name, model, data, ...), got {type(data).__name__}")
    return data, text


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Defaults < file < overrides. Relative data paths in the file are resolved against its folder, and
    those in overrides against the working directory; either way they are made absolute, so the run's
    stored recipe.yaml names the user's files from anywhere (--resume, the report's reproduce command)."""
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
                    section[key] = os.path.abspath(value if Path(value).exists() and not resolved.exists() else resolved)
        section = data.get("eval")
        if isinstance(section, dict):
            for key in ("graders_file", "human_labels", "keep"):
                value = section.get(key)
                if isinstance(value, str) and not Path(value).is_absolute() and (path.parent / value).exists():
                    section[key] = str((path.parent / value).resolve())  # the run's recipe.yaml finds it anywhere
            resolve_external_paths(section.get("external"), path.parent)
    data = apply_overrides(data, list(overrides))
    section = data.get("data")
    if isinstance(section, dict):  # data paths given as overrides: relative to the working directory
        for key in ("train", "valid", "test"):
            if isinstance(section.get(key), str) and section[key] and not Path(section[key]).is_absolute():
                section[key] = os.path.abspath(section[key])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = _describe(err.errors(), source, _key_lines(text))
        raise ConfigError("\n".join(problems)) from None
    _check_graders(recipe.eval, source, _key_lines(text))
    return recipe


def resolve_external_paths(arms: Any, folder: Path) -> None:
    """eval.external: a recorded arm's predictions file, and a local arm's model folder, relative to the
    file that names them (so the run's recipe.yaml finds them from anywhere)."""
    for arm in arms if isinstance(arms, list) else ():
        for key in ("predictions", "model"):
            value = arm.get(key) if isinstance(arm, dict) and "base_url" not in arm else None
            if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).exists():
                arm[key] = str((folder / value).resolve())


def _check_graders(cfg: EvalConfig, source: str, key_lines: dict[tuple[str, ...], int]) -> None:
    """Graders from the recipe and eval.graders_file together: unique names, and eval.primary names one
    of them or a built-in metric."""

    def where(*key: str) -> str:
        line = key_lines.get(("eval", *key))
        return f"{source}:{line}" if line else source

    graders = recipe_graders(cfg)
    problems = [f"{where('graders')}: eval.graders: {p}" for p in check_names(graders, BUILTIN_METRICS)]
    names = [g.name for g in graders]
    if cfg.primary is not None and cfg.primary not in (*names, *BUILTIN_METRICS):
        close = difflib.get_close_matches(cfg.primary, [*names, *BUILTIN_METRICS], n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(f"{where('primary')}: eval.primary: '{cfg.primary}' is neither a grader "
                        f"({', '.join(names) or 'none given'}) nor a built-in metric "
                        f"({', '.join(BUILTIN_METRICS)}){hint}")
    if problems:
        raise ConfigError("\n".join(problems))
