"""Typed models of the JSON files stages hand each other in the run directory.

One model per file: manifest.json (Manifest), stages.json (Stages), train/summary.json
(TrainSummary), train/plan.json (TrainPlan) and eval/metrics.json (Metrics, with ArmResult, Verdict and Cost). Writers build the
model and call `write` (atomic, through tunelab.files); readers call `from_file`, which raises
ContractError naming the file and the first field that does not fit, so no reader guesses a shape.
Every key is documented in docs/run-directory.md; tests/test_contract.py writes a real run and reads
every file back through these models.

Key names are a contract with scripts and other tools: add fields, never rename them. Each model
allows extra keys, so a stage may add results before the model names them; sections whose content
varies with the task (overfitting, forgetting, prompts, pools) stay plain mappings here and are
rendered generically by the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from tunelab.errors import DataError, TunelabError
from tunelab.files import write_text_atomic


class ContractError(TunelabError):
    """A run-directory file is missing, is not JSON, or does not have the shape its model describes."""


def _first_problem(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


class _FileModel:
    """from_file / write for the models below (a mixin, so RootModel and BaseModel share it)."""

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        path = Path(path)
        if not path.is_file():
            raise ContractError(f"{path}: missing")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nested too deeply
            raise ContractError(f"{path}: not valid JSON ({err})") from None
        try:
            return cls.model_validate(data)  # type: ignore[attr-defined]
        except ValidationError as err:
            raise ContractError(f"{path}: {_first_problem(err)}") from None

    @classmethod
    def read_keys(cls, path: str | Path) -> dict[str, Any]:
        """The file's keys as found, not checked against the model: for readers that take partial or older
        files (a run evaluated without its training, a folder from another version). {} when the file is
        missing; ContractError when it is not a JSON object."""
        path = Path(path)
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise ContractError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ContractError(f"{path}: not a JSON object")
        return data

    @classmethod
    def update_keys(cls, path: str | Path, keys: dict[str, Any]) -> None:
        """Set these top-level keys of the file atomically, keeping every other key as found (a second writer
        of a file whose owner wrote the rest, or a partial file: nothing is checked against the model)."""
        path = Path(path)
        try:
            data = cls.read_keys(path)
        except ContractError:
            raise DataError(f"{path}: not valid JSON; it is not rewritten") from None
        write_text_atomic(path, json.dumps({**data, **keys}, indent=1) + "\n")

    def write(self, path: str | Path) -> None:
        """Atomically, with the keys the writer set (a field left at its default, e.g. `parent` of a run
        that has none, is not written)."""
        data = self.model_dump(mode="json", exclude_unset=True)  # type: ignore[attr-defined]
        text = json.dumps(data, indent=1, ensure_ascii=False)
        write_text_atomic(Path(path), text + "\n")


class _Record(_FileModel, BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------------- eval/lineage.json
# (writer: lifecycle/lineage.py write_lineage; readers: runs.read_lineage for the report and `runs list`)


class PairedResult(BaseModel):
    """One arm of the child against one of the parent on the same examples (paired by example id)."""

    what: str  # "old test", "new examples", ...
    child_arm: str
    parent_arm: str
    n_examples: int
    child: float
    parent: float
    delta_points: float
    ci95_points: list[float]
    p_value: float
    significant: bool
    text: str


class Lineage(BaseModel):
    """eval/lineage.json of a run made by update or rebase."""

    kind: str  # "update" | "rebase"
    parent: dict[str, Any]  # the manifest's `parent` record
    primary_metric: str | None
    comparisons: list[PairedResult]
    decision: str | None = None  # rebase: "move" | "stay" | "either"
    text: str
    details: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------- data/stats.json
# data/fingerprint.json (writer: data/prepare.py prepare_data, or data/preference.py for `method: dpo`)


class DataStats(_Record):
    """data/stats.json: what the data stage read, kept and dropped, and why. Readers: the plan (its
    replay), `tunelab run`, the report, the UI, `runs list`."""

    counts: dict[str, Any] = Field(description="read, accepted, rejected, train, valid, test, token_rows, "
                                   "by_format; replay (replay examples, counted apart)")
    issues: dict[str, Any] = Field(description="errors, warnings, by_code")
    quality: dict[str, Any] = Field(description="counts per quality finding")
    tokens: dict[str, Any] = Field(description="min, median, p95, max, total, trainable_total per example")
    rejected_by_reason: dict[str, int]
    split: dict[str, Any] = Field(description="seed, how valid and test were made")
    notes: list[str]
    replay: dict[str, Any] | None = Field(None, description="replay examples in training: file, source, share, "
                                          "share_source, examples, available, share_actual, reason")
    kind: Literal["preference"] | None = Field(None, description="'preference' for `method: dpo` (pairs)")


class DataFingerprint(_Record):
    """data/fingerprint.json: what the prepared folder depends on, written last (an unchanged fingerprint
    reuses the folder). Readers: prepare itself, the manifest (its data_fingerprint is this content),
    `tunelab curve`, the preference reference's cache key."""

    version: int
    inputs: dict[str, dict[str, Any]] = Field(description="{role: {path, sha256}}; replay also has share")
    tokenizer_sha256: str
    chat_template_sha256: str
    settings: dict[str, Any] = Field(description="the recipe's data keys")
    sha256: str = Field(description="of all of the above (input paths left out)")
    kind: Literal["preference"] | None = Field(None, description="'preference' for `method: dpo` (pairs)")


# ---------------------------------------------------------------------------------------------- manifest.json


class Parent(_Record):
    """The run a run made by `update` or `rebase` continues from."""

    path: str | None = None
    data_fingerprint: Any = None


class Manifest(_Record):
    """manifest.json: what produced the run (writer: train/start.py write_manifest)."""

    tunelab: str
    python: str
    torch: str
    transformers: str
    peft: str
    git_sha: str | None
    model: str
    method: str
    seed: int
    data_seed: int
    data_fingerprint: dict[str, Any] | None = Field(description="data/fingerprint.json's content")
    tokenizer_sha256: str
    chat_template_sha256: str
    parent: Parent | None = None
    graders: list[dict[str, Any]] | None = Field(None, description="the grader configs the evaluation used")

    @property
    def data_sha256(self) -> str | None:
        """The one hash that names the prepared data (inputs, tokenizer, template and settings)."""
        value = (self.data_fingerprint or {}).get("sha256")
        return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------------------------- stages.json


class StageRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    done: bool
    seconds: float


class Stages(_FileModel, RootModel[dict[str, StageRecord]]):
    """stages.json: {stage: {"done", "seconds"}} (writer: pipeline.py through `record`, after each stage)."""

    @classmethod
    def load(cls, path: str | Path) -> Stages:
        """The stages a run has finished so far (none where the file does not exist yet)."""
        return cls.from_file(path) if Path(path).is_file() else cls({})

    def done(self, stage: str) -> bool:
        record = self.root.get(stage)
        return record is not None and record.done

    def seconds(self, stage: str) -> float:
        return self.root[stage].seconds

    def total_seconds(self) -> float:
        return sum(record.seconds for record in self.root.values())

    def reset(self, stages: tuple[str, ...]) -> None:
        """Forget these stages (in memory; the next `record` writes the file)."""
        for stage in stages:
            self.root.pop(stage, None)

    def record(self, stage: str, seconds: float, path: str | Path) -> None:
        """Mark `stage` done after `seconds` (rounded to 0.1 s) and rewrite the file atomically. The text is
        json.dumps(indent=1) without a trailing newline, as stages.json has always been written."""
        self.root[stage] = StageRecord(done=True, seconds=round(seconds, 1))
        text = json.dumps(self.model_dump(mode="json"), indent=1)
        write_text_atomic(Path(path), text)


# ---------------------------------------------------------------------------------------------- train/summary.json


class TrainSummary(_Record):
    """train/summary.json: how training ended (writer: train/run.py train_on_examples)."""

    steps: int
    best_step: int | None
    best_val_loss: float | None
    stopped_early: bool
    tokens: int
    trainable_tokens: int
    train_time_s: float
    method: str
    trainable_params: int
    total_params: int
    output: str = Field(description="'adapter' or 'model'")
    output_step: int = Field(description="the step whose weights the output holds")
    planned_steps: int | None = Field(None, description="steps of train/plan.json")
    budget_reached: bool = Field(False, description="the budget's hard stop ended training before the plan did")
    wall_time_s: float | None = Field(None, description="the training stage's wall time, loading included")


# ---------------------------------------------------------------------------------------------- train/plan.json


class TrainPlan(_Record):
    """train/plan.json: the training plan chosen before step 1, and why (writer: train/run.py with
    train/plan.py; a resumed run reads it back)."""

    examples: int
    tokens: int = Field(description="real tokens in one pass over the training examples")
    examples_per_step: float = Field(description="planned: tokens_per_step / mean example length")
    tokens_per_step: int
    epochs: float = Field(description="passes the planned steps make (a fraction when the budget cut them)")
    epochs_target: float | None = Field(description="passes wanted before the budget; None: max_steps decides")
    max_steps: int | None
    steps: int
    steps_per_epoch: int
    eval_every_steps: int
    checkpoint_every_steps: int
    eval_max_examples: int
    budget: str | None
    budget_s: float | None
    device: str
    train_tokens_per_s: float | None = Field(description="measured before step 1 (None: not measured)")
    eval_tokens_per_s: float | None
    estimated_s: float | None
    limited_by: Literal["data", "budget", "max_steps"]
    sources: dict[str, Literal["auto", "recipe"]]
    reason: str = Field(description="the sentence printed before training")
    examples_per_step_before_budget: float | None = Field(
        None, description="the data's step size, when the budget made steps smaller to keep ~200 updates"
    )
    compiled: bool = Field(False, description="decoder layers compiled (train.compile): the measured speed is theirs")
    epochs_before_budget: float | None = Field(
        None, description="the data's passes, when the budget had room for more (up to twice as many)"
    )
    replay: dict[str, Any] | None = Field(
        None, description="replay examples in training (data/stats.json replay): file, source, share, examples, reason"
    )


# ---------------------------------------------------------------------------------------------- eval/metrics.json


class ArmResult(_Record):
    """eval/metrics.json arms.<arm>."""

    primary: float | None = Field(description="None when the primary grader failed on every example")
    ci95: tuple[float, float] | None
    prompt_tokens_mean: float
    completion_tokens_mean: float
    latency_ms_p50: float
    latency_ms_p95: float
    batch_size: int
    tokens_per_s: float
    usd_per_1m_queries: float
    model: str = Field(description="'base' or 'tuned'; 'external' for an eval.external arm")
    served: str | None = Field(None, description="how the arm's model was served while timed (adapter merged, ...)")
    shots_mean: float
    finish_reasons: dict[str, int]
    decoding: dict[str, Any]
    metrics: dict[str, Any] = Field(description="every metric's mean (one entry per grader with graders)")
    graders: dict[str, dict[str, Any]] | None = Field(
        None, description="per grader: mean, ci95, scored and failed examples (eval.graders)"
    )
    prefix_reused_tokens: int | None = Field(
        None, description="leading prompt tokens shared by all the arm's queries, prefilled once and reused"
    )
    latency_note: str | None = Field(None, description="what the latency figures include")
    repetition: dict[str, Any] | None = Field(
        None, description="answers that repeat a line or loop on words (eval/repetition.py): share, n, "
        "repeated_line, looping_words, definition"
    )


class Verdict(_Record):
    """eval/metrics.json verdict: the best fine-tuned arm against the best prompt-only arm."""

    best_arm: str | None
    vs: str | None
    delta: float | None = Field(description="a fraction, not points")
    ci95: tuple[float, float] | None
    p_value: float | None
    winner: str | None
    recommended: str | None
    significant: bool
    text: str
    provisional: bool = False
    provisional_reason: str | None = None
    excluded_failed: int | None = Field(None, description="examples left out: the primary grader failed on them")
    headline: str | None = Field(None, description="one sentence: what to use, its cost per 1k requests, how sure")
    margin: float | None = Field(None, description="eval.margin: points an arm may trail the best and count as good")
    recommended_reason: str | None = Field(None, description="why `recommended` (or why none)")
    n: int | None = Field(None, description="examples every arm was scored on (what the decision saw)")
    n_needed: int | None = Field(None, description="about how many test examples would settle what is open")
    as_good: list[str] = Field(default_factory=list, description="arms shown within the margin of every other arm")
    usd_per_1k_requests: dict[str, float] = Field(default_factory=dict, description="per arm, as the decision "
                                                  "ranked them (training amortised in when asked)")
    score_range: tuple[float, float] | None = Field(None, description="the primary's [low, high]: points are of it")
    too_slow: list[str] = Field(default_factory=list, description="arms over eval.max_latency_ms at p95")
    delta_points: float | None = Field(None, description="delta as points of the primary's range")
    means_points: dict[str, float] = Field(default_factory=dict, description="each arm's mean, points of the range")
    score_range_source: str | None = Field(None, description="'declared' or how the range was inferred")
    training_amortised_usd_per_query: float | None = Field(None, description="training cost added to each "
                                                           "fine-tuned arm's cost per request (0 without "
                                                           "eval.requests_per_month)")
    selection: str | None = Field(None, description="which arms were compared and how (multiplicity)")
    repetition_note: str | None = Field(None, description="set when best_arm's answers repeat clearly more "
                                        "than vs's (eval/repetition.py); also appended to text and headline")


class ArmCost(_Record):
    usd_per_query: float
    usd_per_1m_queries: float
    usd_per_1k_requests: float | None = None
    prompt_tokens_mean: float
    tokens_per_s: float


class TrainingCost(_Record):
    train_time_s: float
    usd: float
    basis: str


class BreakEven(_Record):
    usd_saved_per_query: float
    queries: int | None = Field(description="None when the tuned arm is not cheaper per query")


class Cost(_Record):
    """eval/metrics.json cost."""

    prices: dict[str, float | None] = Field(description="the eval.price_* keys; requests_per_month None when not given")
    per_arm: dict[str, ArmCost]
    training: TrainingCost | None
    break_even: dict[str, BreakEven] = Field(description="keys '<tuned arm> vs <other arm>'")
    break_even_queries: int | None
    text: str | None = None


class Metrics(_Record):
    """eval/metrics.json (writer: eval/run.py evaluate)."""

    primary_metric: str
    primary_reason: str
    output_kind: str
    n_examples: int
    test_file: str
    model: str
    tuned_weights: str | None = Field(description="'adapter', 'model', or None without tuned weights")
    decoding: dict[str, Any]
    arms: dict[str, ArmResult]
    verdict: Verdict
    cost: Cost
    overfitting: dict[str, Any]
    forgetting: dict[str, Any] = Field(description="the comparison, or {'skipped': reason}")
    prompts: dict[str, Any]
    pools: dict[str, Any]
    training_check: dict[str, Any] | None = Field(
        None, description="eval/undertrained.py: the signals behind verdict.provisional"
    )
    primary_range: tuple[float, float] | None = Field(None, description="[low, high] of the primary metric's scale")
    auto_metric: str | None = Field(None, description="the metric chosen from the references, had eval.primary not named one")
    graders: dict[str, Any] | None = Field(
        None, description="grader configs, failures per grader and arm, judge cache, human agreement"
    )
    pairwise: dict[str, Any] | None = Field(None, description="eval.pairwise: the judge's comparison in both orders")
    cleaned: dict[str, Any] | None = Field(
        None, description="eval/cleaned.py: a run trained on a cleaned copy, against the run it was cleaned from"
    )
    seed: int
    elapsed_s: float

    def usd_per_1m_queries(self) -> dict[str, float]:
        return {arm: result.usd_per_1m_queries for arm, result in self.arms.items()}


# ---------------------------------------------------------------------------------------------- eval/adapter_scale.json


class ScaleCandidate(_Record):
    scale: float
    task: float | None = Field(description="the task metric on the validation examples at this scale")
    retention: float | None = Field(description="share of the base model's known general probes still known")
    retention_ci95: list[float] | None
    perplexity_change: float | None = Field(description="relative change of perplexity on the general text")
    within_threshold: bool = Field(description="retention and perplexity within eval.forgetting_threshold")


class AdapterScale(_Record):
    """eval/adapter_scale.json: the LoRA adapter scale chosen by the evaluation (WiSE-FT), read by every
    loader of the run's tuned model (runs.load_run_model: the tuned arm, chat, serve, export)."""

    scale: float = Field(description="multiplies the update of every LoRA layer (1 = as trained, 0 = base model)")
    policy: Literal["balance", "task", "report"]
    reason: str
    metric: str = Field(description="the task metric compared across scales")
    split: str = Field(description="the examples it was compared on (the validation split)")
    n_examples: int
    threshold: float
    candidates: list[ScaleCandidate]


RUN_FILES: dict[str, type[_FileModel]] = {
    "manifest.json": Manifest,
    "stages.json": Stages,
    "data/stats.json": DataStats,
    "data/fingerprint.json": DataFingerprint,
    "train/summary.json": TrainSummary,
    "train/plan.json": TrainPlan,
    "eval/metrics.json": Metrics,
}  # files every finished run has; eval/adapter_scale.json (AdapterScale) only where a scale was chosen
