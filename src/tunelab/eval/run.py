"""`tunelab eval`: every arm on the same held-out set, then quality, cost, overfitting and forgetting.

Reads a run directory: recipe.yaml, data/train.jsonl (few-shot and retrieval pool, train answers),
data/test.jsonl (or --test FILE: JSONL of {"messages": [...]}), adapter/ or model/ (tuned weights),
train/log.jsonl and train/summary.json (overfitting, training cost). Writes eval/metrics.json (keys in
docs/run-directory.md) and eval/predictions.jsonl (one row per example and arm), and prints a table. With
eval.graders (docs/graders.md): every grader scores every arm, eval.primary names the metric of the
verdict, judge replies are cached in eval/judge_cache.jsonl, and the grader configs are added to
manifest.json.

The base model is loaded once: with a LoRA run the tuned model is base + adapter, and the base arms
run under `disable_adapter()` on the same object. All arms share one PromptBuilder, one
DecodingSettings object, one `generate` and one scorer.

`evaluate` reads as its phases: load and check the inputs, generate every arm, grade, score the arms
and decide the verdict, then cost (eval/cost.py), overfitting (eval/overfitting.py), the still-learning
check (eval/undertrained.py) and forgetting (eval/forgetting.py), and write the files. Grader checks
and records live in eval/graders/evaluation.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tunelab.config import ARMS, RAG_ARMS, TUNED_ARMS, EvalConfig, Recipe, is_tuned_arm
from tunelab.contract import Metrics, TrainSummary
from tunelab.engine.generate import DecodingSettings, Generation, generate
from tunelab.errors import ConfigError, DataError, ModelError
from tunelab.eval.arms import (
    EvalExample,
    PromptBuilder,
    build_document_pool,
    build_pool,
    derive_instructions,
    task_system_prompt,
    to_eval_example,
)
from tunelab.eval.cost import amortised_training_per_query, compare_cost, training_cost, usd_per_query
from tunelab.eval.decision import ArmFacts, decide_verdict
from tunelab.eval.external import Answer, ExternalRun
from tunelab.eval.graders.evaluation import (
    CONSENT,
    Primary,
    grader_summary,
    prepare_graders,
    record_graders_in_manifest,
)
from tunelab.eval.graders.samples import make_item
from tunelab.eval.keep import compare_keep, keep_conversations, read_keep
from tunelab.eval.metrics import (
    OutputKind,
    Scores,
    bootstrap_ci,
    detect_output_kind,
    score_outputs,
    summarize_scores,
)
from tunelab.eval.overfitting import measure_overfitting, task_metric
from tunelab.eval.repetition import arm_repetition, repetition_note
from tunelab.eval.scale_search import SEARCH_MAX_EXAMPLES
from tunelab.eval.undertrained import assess_training
from tunelab.files import write_text_atomic
from tunelab.runs import RunPaths, open_run

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TRAIN_SAMPLE_MAX = 32  # train examples re-answered by the tuned model for the train-vs-test gap


# ---------------------------------------------------------------------------------------------- inputs


def read_conversations(path: Path) -> list[dict[str, Any]]:
    """JSONL of conversations; each row keeps where it came from for error messages and records."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise DataError(f'{path}:{line_number}: messages: expected {{"messages": [{{role, content}}, ...]}}')
            row.setdefault("source", f"{path}:{line_number}")
            rows.append(row)
    return rows


def read_examples(path: Path) -> list[EvalExample]:
    return read_examples_and_items(path)[0]


def read_examples_and_items(path: Path) -> tuple[list[EvalExample], list[dict[str, Any]]]:
    """The examples and, for graders, each record as an item (its extra keys and `reference`)."""
    rows = read_conversations(path)
    examples = [to_eval_example(row, f"{path.name}:{n}") for n, row in enumerate(rows, start=1)]
    return examples, [make_item(row, ex.id, ex.reference) for row, ex in zip(rows, examples, strict=True)]


def _read_schema(schema_file: str | None, paths: RunPaths) -> dict[str, Any] | None:
    if not schema_file:
        return None
    candidates = [Path(schema_file), paths.root / schema_file]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConfigError(f"{paths.recipe}: eval.schema_file: '{schema_file}' not found")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{path}: eval.schema_file is not valid JSON ({err})") from None
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ConfigError(f"{path}: eval.schema_file is not a valid JSON schema ({err.message})") from None
    return schema


def _parse_arms(arms: str | Sequence[str] | None, recipe: Recipe) -> list[str]:
    chosen = [a.strip() for a in arms.split(",")] if isinstance(arms, str) else list(arms or recipe.eval.arms)
    unknown = [a for a in chosen if a not in ARMS]
    if unknown or not chosen:
        raise ConfigError(f"--arms: unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    return [a for a in ARMS if a in chosen]  # fixed order: base arms first, then tuned ones


# ---------------------------------------------------------------------------------------------- models


class _Models:
    """The base and tuned models of a run, each loaded at most once.

    LoRA run: one PeftModel; `base` is the same object under `disable_adapter()`, and for the tuned
    arms the adapter is merged into the base weights in place, as it would be deployed (no extra
    matmuls a token; the base arms and forgetting's base measurement run first, so nothing needs the
    unmerged weights again). Full fine-tune: two models, the one not in use released first (two 135M
    copies fit, larger models may not).
    """

    def __init__(self, paths: RunPaths, recipe: Recipe) -> None:
        self.paths, self.recipe = paths, recipe
        self._peft: Any = None
        self._merged = False
        self._loaded: tuple[str, Any] | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def release(self) -> None:
        """Drop the loaded weights (the tokenizer stays): another model is about to be loaded."""
        self._peft, self._loaded = None, None

    @property
    def tuned_kind(self) -> str | None:
        if self.paths.model.is_dir():
            return "model"
        if self.paths.adapter.is_dir():
            return "adapter"
        return None

    def _load_base(self) -> PreTrainedModel:
        from tunelab.models import load_model, load_tokenizer

        m = self.recipe.model
        model = load_model(m.name, dtype=m.dtype, revision=m.revision, trust_remote_code=m.trust_remote_code)
        self.tokenizer = self.tokenizer or load_tokenizer(m.name, m.revision, m.trust_remote_code)
        return model

    def merged(self, model: PreTrainedModel) -> PreTrainedModel:
        """The tuned model as it would be deployed: a LoRA adapter merged into the base weights (at the scale
        it is set to), after which the base arms can no longer run on this object."""
        if self.tuned_kind == "adapter" and not self._merged:
            self._peft, self._merged = self._peft.merge_and_unload(), True
            return self._peft
        return model

    @contextlib.contextmanager
    def use(self, which: str) -> Iterator[PreTrainedModel]:
        from tunelab.runs import load_run_model

        kind = self.tuned_kind
        if kind == "adapter":
            if self._peft is None:
                self._peft, self.tokenizer = load_run_model(self.paths, self.recipe)
            if which == "base":
                if self._merged:
                    raise RuntimeError("the adapter is merged into the base weights: run the base arms first")
                with self._peft.disable_adapter():
                    yield self._peft
            else:
                yield self._peft
            return
        if self._loaded is None or self._loaded[0] != which:
            self._loaded = None  # release the other model before loading this one
            if which == "base":
                self._loaded = ("base", self._load_base())
            else:
                model, self.tokenizer = load_run_model(self.paths, self.recipe)
                self._loaded = ("tuned", model)
        yield self._loaded[1]


def _arm_model(arm: str) -> str:
    return "tuned" if arm in TUNED_ARMS else "base"


def _served(arm: str, tuned_kind: str | None) -> str:
    """How an arm's model was served while it was timed (metrics.json arms.<arm>.served)."""
    if _arm_model(arm) == "base":
        return "base model"
    return "adapter merged into the base weights" if tuned_kind == "adapter" else "fine-tuned weights"


# ---------------------------------------------------------------------------------------------- summaries


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def _read_summary(paths: RunPaths) -> TrainSummary | None:
    return TrainSummary.from_file(paths.train_summary) if paths.train_summary.is_file() else None


def format_table(metrics: dict[str, Any]) -> str:
    primary = metrics["primary_metric"]
    header = f"{'arm':<10} {primary:>20} {'95% CI':>15} {'prompt tok':>10} {'compl tok':>9} {'p50 ms':>8} {'p95 ms':>8}"
    lines = [header, "-" * len(header)]
    for arm, row in metrics["arms"].items():
        if row["primary"] is None:  # the primary grader failed on every example of this arm
            lines.append(f"{arm:<10} {'all failed':>20} {'':>15} {row['prompt_tokens_mean']:>10.1f}")
            continue
        lo, hi = row["ci95"]
        lines.append(
            f"{arm:<10} {row['primary']:>20.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} {row['prompt_tokens_mean']:>10.1f} "
            f"{row['completion_tokens_mean']:>9.1f} {row['latency_ms_p50']:>8.0f} {row['latency_ms_p95']:>8.0f}"
        )
    batch = next(iter(metrics["arms"].values()))["batch_size"] if metrics["arms"] else 0
    lines.append(f"(n = {metrics['n_examples']} test examples; latency per query = its batch's wall time, batch size {batch})")
    for name in [config["name"] for config in (metrics.get("graders") or {}).get("configs", [])]:
        cells = []
        for arm, row in metrics["arms"].items():
            column = row["graders"][name]
            failed = f" ({column['failed']} failed)" if column["failed"] else ""
            cells.append(f"{arm} {'—' if column['mean'] is None else format(column['mean'], '.3f')}{failed}")
        lines.append(f"grader {name}: " + ", ".join(cells))
    for arm, row in metrics["arms"].items():
        if "external" in row:  # eval.external: what it was compared on, and against the fine-tune
            compared = f"{row['failures']} failed, scored on {row['n_scored']} of {row['n_examples']}"
            lines.append(f"external {arm} ({row['external']['kind']}): {compared}"
                         + (f"; {row['vs_tuned']['text']}" if row.get("vs_tuned") else ""))
    lines.append(f"verdict: {metrics['verdict']['text']}")
    if metrics["cost"].get("text"):
        lines.append(f"cost: {metrics['cost']['text']}")
    if metrics["forgetting"].get("text"):
        lines.append(f"forgetting: {metrics['forgetting']['text']}")
    if (metrics["forgetting"].get("keep") or {}).get("text"):
        lines.append(f"must keep: {metrics['forgetting']['keep']['text']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- verdict


def _verdict_on_scored(inputs: _Inputs, scored: _Scored, training: dict[str, Any] | None) -> dict[str, Any]:
    """The verdict on the examples every arm's primary scored: a grader failure drops that example
    from the paired comparison (counted), never scores it 0, and so does an example an external arm
    did not answer (eval.external). Fine-tuned arms carry the training cost spread over
    eval.requests_per_month when it is given."""
    cfg = inputs.cfg
    # an external arm that answered nothing has nothing to compare: left out (named) rather than emptying
    # the comparison of every other arm
    silent = [arm for arm, missing in scored.unanswered.items() if len(missing) == len(scored.per_example[arm])]
    per_example = {arm: scores for arm, scores in scored.per_example.items() if arm not in silent}
    n = len(next(iter(per_example.values()), []))
    kept = [i for i in range(n) if all(scores[i] is not None for scores in per_example.values())]
    amortised = amortised_training_per_query(training, cfg)
    facts = {}
    for arm, scores in per_example.items():
        tuned = is_tuned_arm(arm)
        row = scored.arms[arm]
        measured = row.get("latency_measured", True)  # recorded outputs without latency_ms: unknown, not 0
        facts[arm] = ArmFacts(
            scores=[scores[i] for i in kept], usd_per_query=scored.usd_per_query[arm] + (amortised if tuned else 0.0),
            tuned=tuned, latency_ms_p50=row["latency_ms_p50"] if measured else None,
            latency_ms_p95=row["latency_ms_p95"] if measured else None,
            prompt_tokens_mean=row["prompt_tokens_mean"],
        )
    score_range, range_source = inputs.primary.score_range([s for scores in per_example.values() for s in scores])
    verdict = decide_verdict(facts, margin_points=cfg.margin, score_range=score_range,
                             max_latency_ms=cfg.max_latency_ms, seed=cfg.seed)
    verdict["score_range"], verdict["score_range_source"] = list(score_range), range_source
    verdict["training_amortised_usd_per_query"] = amortised
    if len(kept) < n:
        verdict["excluded_failed"] = n - len(kept)
        unanswered = {i for arm, missing in scored.unanswered.items() if arm not in silent for i in missing}
        reasons = [f"{len(unanswered)} an external arm did not answer (arms.<name>.failed_examples)"] if unanswered else []
        if n - len(kept) > len(unanswered):
            reasons.append(f"{n - len(kept) - len(unanswered)} the primary grader failed on in at least one arm "
                           "(graders.failures)")
        verdict["text"] += f" ({n - len(kept)} of {n} examples left out: {'; '.join(reasons)})"
    if silent:
        verdict["external_left_out"] = silent
        verdict["text"] += f" ({', '.join(silent)}: answered no example, left out)"
    return verdict


# ---------------------------------------------------------------------------------------------- evaluate


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What every phase of an evaluation reads, loaded and checked before any generation."""

    paths: RunPaths
    recipe: Recipe
    chosen: list[str]  # the arms, in ARMS order
    test_path: Path
    test: list[EvalExample]  # the evaluated test examples (after --limit)
    items: list[dict[str, Any]]  # the graders' view of each test example
    train: list[EvalExample]
    kind: OutputKind
    schema: dict[str, Any] | None
    graders: list[Any]
    primary: Primary
    builder: PromptBuilder  # holds the few-shot/retrieval pools and the instructions
    settings: DecodingSettings
    models: _Models
    run_forgetting: bool
    train_sample: list[EvalExample]  # train examples the tuned model re-answers (train-vs-test gap)
    train_sample_items: list[dict[str, Any]]
    scale_search: str | None = None  # why the adapter scales are not searched; None: they are
    valid: list[EvalExample] = dataclasses.field(default_factory=list)  # the scale search's examples
    external: list[Any] = dataclasses.field(default_factory=list)  # eval.external (+ --external): other models
    recorded: dict[str, list[Answer]] = dataclasses.field(default_factory=dict)  # recorded arms' answers, checked
    keep: list[EvalExample] = dataclasses.field(default_factory=list)  # eval.keep (eval/keep.py), with a tuned arm

    @property
    def cfg(self) -> EvalConfig:
        return self.recipe.eval

    @property
    def references(self) -> list[str]:
        return [ex.reference for ex in self.test]


@dataclasses.dataclass(frozen=True)
class _Generated:
    """Every arm's outputs, and what the tuned and base models produced besides."""

    prompts: dict[str, list[list[dict[str, str]]]]  # arm -> one conversation per test example
    generations: dict[str, list[Generation]]
    wall_s: dict[str, float]  # arm -> seconds its generate call took
    train_sample_outputs: list[str]
    abilities: dict[str, Any]  # "base"/"tuned" -> forgetting.GeneralAbility, when forgetting runs
    external: dict[str, ExternalRun] = dataclasses.field(default_factory=dict)  # eval/external.py
    adapter_scale: Any = None  # contract.AdapterScale, when the scale search ran
    keep_outputs: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # "base"/"tuned" -> eval.keep answers

    def texts(self, arm: str) -> list[str]:
        return [g.text for g in self.generations[arm]]


@dataclasses.dataclass(frozen=True)
class _Scored:
    """The arms scored: metrics.json "arms", what the verdict compares, and eval/predictions.jsonl rows."""

    arms: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    per_example: dict[str, list[float | None]] = dataclasses.field(default_factory=dict)  # primary, per test example
    usd_per_query: dict[str, float] = dataclasses.field(default_factory=dict)
    prompt_tokens_mean: dict[str, float] = dataclasses.field(default_factory=dict)
    prediction_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    unanswered: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # external arm -> examples it failed


def evaluate(
    run_dir: str | Path,
    arms: str | Sequence[str] | None = None,
    test_file: str | Path | None = None,
    limit: int | None = None,
    *,
    echo: bool = True,
    trust_remote_code: bool = False,
    python_graders: bool = False,
    recipe: Recipe | None = None,
    train_file: str | Path | None = None,
    out_dir: str | Path | None = None,
    external: Sequence[Any] = (),
) -> dict[str, Any]:
    """Evaluate the arms of a run on its test split; returns what it writes to eval/metrics.json.
    `trust_remote_code` comes from the caller, never from the run's recipe.yaml (runs.open_run), and
    so does `python_graders`: a python grader in a run folder's recipe is code, and a judge there with an
    API key would be sent the user's secret, both only when the caller says the recipe is the user's
    own (tunelab run, curve) or the user asked for it.
    For `tunelab drift` and `update` (tunelab.lifecycle), which score a run on other data without
    touching its own results: `recipe` replaces the run's recipe.yaml settings, `train_file` its
    data/train.jsonl (the few-shot and retrieval pool), and `out_dir` its eval/ folder. The recipe's
    eval.external arms run with the recipe's arms (`arms` None: tunelab run, tunelab eval without --arms),
    not when a caller picks arms for a purpose of its own (curve, drift, update: no request is paid for
    there); `external` arms (config.EndpointArm | LocalArm | RecordedArm) always run."""
    started = time.perf_counter()
    inputs = _load_inputs(run_dir, arms, test_file, limit, trust_remote_code=trust_remote_code,
                          python_graders=python_graders, recipe=recipe, train_file=train_file, external=external,
                          recipe_external=arms is None, out_dir=out_dir)
    cfg = inputs.cfg
    generated = _generate_arms(inputs)
    if inputs.recipe.method == "dpo":  # the supervised parent answers too, as the arm `sft` (eval/preference.py)
        from tunelab.eval.preference import add_parent_arm

        inputs, generated = add_parent_arm(inputs, generated)
    columns, sample_columns, external_columns = _grade_arms(inputs, generated)

    # --- quality per arm, and the verdict on the primary metric
    metrics = _header(inputs)
    scored = _score_arms(inputs, generated, columns)
    _score_external_arms(inputs, generated, external_columns, scored)
    metrics["arms"] = scored.arms
    summary = _read_summary(inputs.paths)
    metrics["verdict"] = _verdict_on_scored(inputs, scored, training_cost(summary, cfg.gpu_price_per_hour))
    metrics["primary_range"] = metrics["verdict"]["score_range"]
    if inputs.graders:
        metrics["graders"] = grader_summary(inputs.graders, columns, inputs.test, cfg.human_labels, inputs.paths)
    pairwise = _compare_pairwise(inputs, generated, metrics["verdict"])
    if pairwise is not None:
        metrics["pairwise"] = pairwise

    # --- cost, overfitting, a still-learning check on the verdict, forgetting
    tokens_per_s = {arm: row["tokens_per_s"] for arm, row in scored.arms.items()}
    metrics["cost"] = compare_cost(scored.usd_per_query, scored.prompt_tokens_mean, tokens_per_s, metrics["verdict"],
                                   summary, cfg)
    metrics["overfitting"] = _overfitting(inputs, generated, sample_columns, scored.arms)
    metrics["training_check"] = _check_training(inputs, metrics["overfitting"], metrics["verdict"],
                                                 metrics.get("primary_range"))
    metrics["forgetting"] = _forgetting(inputs, generated.abilities)
    if inputs.run_forgetting:
        metrics["forgetting"]["adapter_scale"] = (generated.adapter_scale.model_dump(mode="json") if generated.adapter_scale
                                                  else {"skipped": inputs.scale_search})
    if generated.keep_outputs:
        metrics["forgetting"]["keep"] = compare_keep(inputs.keep, generated.keep_outputs["base"],
                                                     generated.keep_outputs["tuned"], cfg.forgetting_threshold,
                                                     seed=cfg.seed, file=cfg.keep)
    _mention_forgetting(metrics["verdict"], metrics["forgetting"])
    _mention_repetition(metrics["verdict"], generated)
    if inputs.recipe.method == "dpo":  # preference accuracy of base, sft and tuned on held-out pairs
        from tunelab.eval.preference import preference_section

        metrics["preference"] = preference_section(inputs, generated, scored)

    # --- what the arms saw, so a reader can check the comparison was fair
    metrics["prompts"] = _prompts_seen(inputs, generated.prompts)
    metrics["pools"] = _pools(inputs)
    metrics["seed"] = cfg.seed
    metrics["elapsed_s"] = time.perf_counter() - started

    _write_results(inputs, metrics, scored.prediction_rows, out_dir)
    if generated.adapter_scale is not None:
        generated.adapter_scale.write(inputs.paths.adapter_scale)
    if echo:
        print(format_table(metrics))
    return metrics


# ---------------------------------------------------------------------------------------------- evaluate: inputs


def _load_inputs(run_dir: str | Path, arms: str | Sequence[str] | None, test_file: str | Path | None,
                 limit: int | None, *, trust_remote_code: bool, python_graders: bool, recipe: Recipe | None,
                 train_file: str | Path | None, external: Sequence[Any] = (),
                 recipe_external: bool = True, out_dir: str | Path | None = None) -> _Inputs:
    """The run's settings, test and train examples, graders and prompts; every check that can fail runs
    here, before the base arms spend minutes generating."""
    paths, run_recipe = open_run(run_dir, trust_remote_code)
    recipe = recipe or run_recipe
    cfg = recipe.eval
    chosen = _parse_arms(arms, recipe)
    limit = limit or cfg.limit

    # --- data: test set, train pool (leak-checked against the whole test file), output kind
    test_path = Path(test_file) if test_file else paths.data_split("test")
    all_test, all_items = read_examples_and_items(test_path)
    if not all_test:
        raise DataError(f"{test_path}: no test examples")
    test = all_test[:limit] if limit else all_test
    train_path = Path(train_file) if train_file else paths.data_split("train")
    train, train_items = read_examples_and_items(train_path) if train_path.is_file() else ([], [])
    from tunelab.eval.external import builtin_arm, check_external, refuse_secret_bearing_arms

    if recipe_external and not python_graders:  # a run folder's recipe, without the caller's consent
        refuse_secret_bearing_arms(cfg.external, paths.recipe, CONSENT)
    external_arms = [*(cfg.external if recipe_external else ()), *external]
    recorded = check_external(external_arms, all_test, len(test), chosen, test_path)
    prompted = [*chosen, *(builtin_arm(a) for a in external_arms)]  # the built-in prompts the arms need
    if not train and any(a in prompted for a in ("prompt", *RAG_ARMS)):
        raise DataError(f"{train_path}: not found or empty; the prompt and rag arms draw their examples from it")
    kind = detect_output_kind([ex.reference for ex in test], [ex.reference for ex in train])
    schema = _read_schema(cfg.schema_file, paths)
    graders, primary = prepare_graders(cfg, kind, schema is not None, paths, python_graders)
    builder = _prompt_builder(cfg, prompted, train, all_test, kind)
    settings = DecodingSettings(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)

    models = _Models(paths, recipe)
    if models.tuned_kind is None and any(a in chosen for a in TUNED_ARMS):
        # fail before the base arms spend minutes generating
        raise ModelError(f"{paths.root}: has neither adapter/ nor model/ for the tuned arms; has its training "
                         "finished? (evaluate prompt-only arms with --arms base,prompt,rag)")
    run_forgetting = cfg.forgetting and any(a in chosen for a in TUNED_ARMS) and models.tuned_kind is not None
    scale_search = _why_no_scale_search(run_forgetting, recipe, models.tuned_kind, out_dir)
    valid_path = paths.data_split("valid")
    valid = read_examples(valid_path) if scale_search is None and valid_path.is_file() else []
    if scale_search is None and not valid:
        scale_search = f"no validation examples ({valid_path}) to compare the scales on"
    keep = read_keep(cfg.keep) if cfg.keep and models.tuned_kind and any(a in chosen for a in TUNED_ARMS) else []
    rng = random.Random(cfg.seed)
    # positions, not examples: the same draw as sampling the examples, and their items come along
    picked = rng.sample(range(len(train)), min(len(train), len(test), TRAIN_SAMPLE_MAX)) if "tuned" in chosen else []
    return _Inputs(
        paths=paths, recipe=recipe, chosen=chosen, test_path=test_path, test=test, items=all_items[: len(test)],
        train=train, kind=kind, schema=schema, graders=graders, primary=primary, builder=builder,
        settings=settings, models=models, run_forgetting=run_forgetting,
        train_sample=[train[i] for i in picked], train_sample_items=[train_items[i] for i in picked],
        external=external_arms, recorded=recorded, scale_search=scale_search, valid=valid, keep=keep,
    )


def _why_no_scale_search(run_forgetting: bool, recipe: Recipe, tuned_kind: str | None,
                         out_dir: str | Path | None) -> str | None:
    """Why the adapter scales are not compared (eval/scale_search.py), or None when they are."""
    from tunelab.eval.scale_search import SCALED_METHODS

    if not run_forgetting:
        return "general ability is not measured (eval.forgetting off, or no tuned arm)"
    if tuned_kind != "adapter" or recipe.method not in SCALED_METHODS:
        return f"method {recipe.method}: only a LoRA adapter's update is scaled"
    if out_dir is not None:
        return "scoring other data: the run's chosen scale is kept"
    return None


def _prompt_builder(cfg: EvalConfig, chosen: Sequence[str], train: Sequence[EvalExample],
                    all_test: Sequence[EvalExample], kind: OutputKind) -> PromptBuilder:
    """One PromptBuilder for every arm: the train pool and, with eval.rag_docs for a rag arm, document
    chunks, both leak-checked against the whole test file."""
    pool = build_pool(train, all_test)
    documents = None
    if cfg.rag_docs and any(a in chosen for a in RAG_ARMS):
        from tunelab.eval.retrieval import read_document_chunks

        documents = build_document_pool(read_document_chunks(cfg.rag_docs), all_test)
    instructions = cfg.instructions or derive_instructions(train, kind)
    return PromptBuilder(pool, instructions, cfg.shots, cfg.rag_k, cfg.seed, documents,
                         task_system=task_system_prompt(train))


# ---------------------------------------------------------------------------------------------- evaluate: generation


def _generate_arms(inputs: _Inputs) -> _Generated:
    """Every arm on the test set, the train sample with the tuned model and the forgetting probes with
    both: base-model arms first, then tuned, so each model is needed in one stretch."""
    from tqdm import tqdm

    from tunelab.eval.forgetting import STABILITY_SYSTEM_PROMPTS, general_probes

    cfg, models = inputs.cfg, inputs.models
    scales = 0 if inputs.scale_search else len(cfg.adapter_scales)  # the search measures the tuned probes too
    total = (len(inputs.test) * (len(inputs.chosen) + len(inputs.external)) + len(inputs.train_sample)
             + ((2 + len(STABILITY_SYSTEM_PROMPTS)) * len(general_probes()) if inputs.run_forgetting else 0)
             + scales * min(len(inputs.valid), SEARCH_MAX_EXAMPLES) + max(scales - 1, 0) * len(general_probes())
             + 2 * len(inputs.keep))
    bar = tqdm(total=total, desc="eval", unit="gen", file=sys.stderr, dynamic_ncols=True)
    prompts = {arm: [inputs.builder.build(arm, ex) for ex in inputs.test] for arm in inputs.chosen}
    generations: dict[str, list[Generation]] = {}
    wall_s: dict[str, float] = {}
    abilities: dict[str, Any] = {}
    train_sample_outputs: list[str] = []
    adapter_scale = None
    keep_outputs: dict[str, list[str]] = {}
    for which in ("base", "tuned"):
        phase_arms = [a for a in inputs.chosen if _arm_model(a) == which]
        if not phase_arms and not ((inputs.run_forgetting or inputs.keep) and which == "base"):
            continue
        with models.use(which) as model:
            if which == "tuned" and inputs.scale_search is None:
                bar.set_description("adapter scales")
                search = _search_scale(inputs, model, abilities["base"], bar)
                adapter_scale, abilities["tuned"] = search.record, search.ability
            if which == "tuned":
                model = models.merged(model)  # timed as deployed; the scale search needed the adapter apart
            for arm in phase_arms:
                generations[arm], wall_s[arm] = _timed_generate(inputs, bar, arm, model, prompts[arm])
            if which == "tuned" and inputs.train_sample:
                conversations = [inputs.builder.build("tuned", ex) for ex in inputs.train_sample]
                sample_gens, _ = _timed_generate(inputs, bar, "tuned:train-sample", model, conversations)
                train_sample_outputs = [g.text for g in sample_gens]
            if inputs.keep:  # the user's must-keep examples, as the base and tuned arms are asked
                keep_gens, _ = _timed_generate(inputs, bar, f"keep:{which}", model, keep_conversations(inputs.keep))
                keep_outputs[which] = [g.text for g in keep_gens]
            if inputs.run_forgetting and which not in abilities:
                from tunelab.eval.forgetting import measure_general_ability

                bar.set_description(f"forgetting:{which}")
                abilities[which] = measure_general_ability(  # the base model: what it knows in every framing
                    model, models.tokenizer, seed=cfg.seed, batch_size=cfg.batch_size, progress=bar.update,
                    stability=which == "base",
                )
        del model  # a full fine-tune's other model can then be released before the next phase loads
    external = _run_external_arms(inputs, bar, prompts)
    bar.close()
    return _Generated(prompts, generations, wall_s, train_sample_outputs, abilities, external,
                      adapter_scale=adapter_scale, keep_outputs=keep_outputs)


def _search_scale(inputs: _Inputs, model: Any, base_ability: Any, bar: Any) -> Any:
    """The tuned model at every eval.adapter_scales on the validation split; leaves it at the chosen one."""
    from tunelab.eval.scale_search import search_adapter_scale

    cfg = inputs.cfg
    metric = inputs.kind.primary if inputs.primary.grader else inputs.primary.name
    return search_adapter_scale(
        model, inputs.models.tokenizer, valid=inputs.valid, builder=inputs.builder, kind=inputs.kind, metric=metric,
        schema=inputs.schema, settings=inputs.settings, base=base_ability, scales=cfg.adapter_scales,
        policy=cfg.forgetting_policy, threshold=cfg.forgetting_threshold, seed=cfg.seed, batch_size=cfg.batch_size,
        progress=bar.update, max_task_loss=cfg.scale_max_task_loss,
    )


def _run_external_arms(inputs: _Inputs, bar: Any, prompts: dict[str, list[list[dict[str, str]]]]) -> dict[str, ExternalRun]:
    """eval.external: endpoints (cached in eval/external/<name>.jsonl), local models, recorded outputs; token
    counts an arm did not report are counted with the run's tokenizer."""
    from tunelab.config import EndpointArm, LocalArm
    from tunelab.eval import external as ext

    runs: dict[str, ExternalRun] = {}
    for arm in inputs.external:
        bar.set_description(f"external:{arm.name}")
        conversations = [inputs.builder.build(ext.builtin_arm(arm), ex) for ex in inputs.test]
        prompts[arm.name] = conversations
        if isinstance(arm, EndpointArm):
            run = ext.run_endpoint_arm(arm, conversations, inputs.settings,
                                       inputs.paths.external_cache(arm.name), progress=bar.update)
        elif isinstance(arm, LocalArm):
            inputs.models.release()  # the run's own models are done: one model in memory at a time
            run = ext.run_local_arm(arm, conversations, inputs.settings, inputs.cfg.batch_size, progress=bar.update)
        else:
            run = ExternalRun(arm, [dataclasses.replace(a) for a in inputs.recorded[arm.name]])
            bar.update(len(inputs.test))
        if any(a.text is not None and (a.prompt_tokens is None or a.completion_tokens is None) for a in run.answers):
            if inputs.models.tokenizer is None:
                from tunelab.models import load_tokenizer

                m = inputs.recipe.model
                inputs.models.tokenizer = load_tokenizer(m.name, m.revision, m.trust_remote_code)
            ext.fill_token_counts(run, conversations, inputs.models.tokenizer)
        runs[arm.name] = run
    return runs


def _timed_generate(inputs: _Inputs, bar: Any, label: str, model: Any,
                    conversations: list[list[dict[str, str]]]) -> tuple[list[Generation], float]:
    """One generate call with the evaluation's shared settings, and its wall time in seconds."""
    bar.set_description(label)
    t0 = time.perf_counter()
    result = generate(model, inputs.models.tokenizer, conversations, inputs.settings, inputs.cfg.batch_size,
                      progress=bar.update)
    return result, time.perf_counter() - t0


def _grade_arms(inputs: _Inputs, generated: _Generated) -> tuple[dict[str, dict[str, Any]], dict[str, Any],
                                                                 dict[str, dict[str, Any]]]:
    """Every grader's column for every arm, and for the train sample when the verdict is a grader's
    (judge replies cached in the run's eval/judge_cache.jsonl)."""
    from tunelab.eval.graders.grade import Grading

    columns: dict[str, dict[str, Any]] = {}
    with Grading(inputs.graders, inputs.paths.judge_cache) as grading:
        for arm in inputs.chosen if inputs.graders else ():
            columns[arm] = grading.grade(generated.texts(arm), inputs.items)
        sample_columns = (grading.grade(generated.train_sample_outputs, inputs.train_sample_items)
                          if generated.train_sample_outputs and inputs.primary.grader else {})
        # an external arm is graded on the examples it answered (its columns are over those only)
        external_columns = {name: grading.grade([a.text for a in run.answers if a.text is not None],
                                                [item for item, a in zip(inputs.items, run.answers, strict=True)
                                                 if a.text is not None])
                            for name, run in generated.external.items()} if inputs.graders else {}
    return columns, sample_columns, external_columns


# ---------------------------------------------------------------------------------------------- evaluate: scores


def _header(inputs: _Inputs) -> dict[str, Any]:
    """The first keys of eval/metrics.json (the arms come next): what was measured, on what, with which
    decoding."""
    cfg = inputs.cfg
    return {
        "primary_metric": inputs.primary.name,
        "primary_reason": inputs.primary.reason or inputs.kind.reason,
        "auto_metric": inputs.kind.primary,
        "output_kind": inputs.kind.kind,
        "n_examples": len(inputs.test),
        "test_file": str(inputs.test_path),
        "model": inputs.recipe.model.name,
        "tuned_weights": inputs.models.tuned_kind,
        "decoding": {**dataclasses.asdict(inputs.settings), "stop": "end-of-turn", "batch_size": cfg.batch_size,
                     "prefix_cache": True},
    }


def _primary_scores(primary: Primary, scores: Scores, columns: dict[str, Any]) -> list[float | None]:
    """The verdict's metric per example: a grader's column, or a built-in metric."""
    return columns[primary.name].scores if primary.grader else scores.per_example[primary.name]


def _score_arms(inputs: _Inputs, generated: _Generated, columns: dict[str, dict[str, Any]]) -> _Scored:
    """Every arm's built-in metrics and grader columns, tokens, latency and price, and its prediction rows."""
    scored = _Scored()
    for arm in inputs.chosen:
        scores = score_outputs(generated.texts(arm), inputs.references, inputs.kind, inputs.schema)
        arm_columns = columns.get(arm, {})
        primary_scores = _primary_scores(inputs.primary, scores, arm_columns)
        gens = generated.generations[arm]
        result = _arm_result(inputs, arm, gens, generated.wall_s[arm], primary_scores, scores, arm_columns)
        scored.arms[arm] = result
        scored.per_example[arm] = primary_scores
        scored.usd_per_query[arm] = usd_per_query(result["prompt_tokens_mean"], result["completion_tokens_mean"],
                                                  inputs.cfg, tuned=is_tuned_arm(arm))
        scored.prompt_tokens_mean[arm] = result["prompt_tokens_mean"]
        scored.prediction_rows.extend(_prediction_rows(inputs, arm, gens, primary_scores, arm_columns))
    return scored


def _score_external_arms(inputs: _Inputs, generated: _Generated, columns: dict[str, dict[str, Any]],
                         scored: _Scored) -> None:
    """External arms into `scored`, scored on the examples each answered (a failed request is neither a wrong
    answer nor dropped silently: `failures` and `n_scored` say what was compared), then each against the
    best fine-tuned arm on the examples both scored."""
    from tunelab.eval import external as ext

    cfg, n = inputs.cfg, len(inputs.test)
    for name, run in generated.external.items():
        answered = ext.answered_indices(run)
        texts = [run.answers[i].text or "" for i in answered]
        scores = score_outputs(texts, [inputs.references[i] for i in answered], inputs.kind, inputs.schema)
        arm_columns = columns.get(name, {})
        primary_scores = ext.expand(_primary_scores(inputs.primary, scores, arm_columns), answered, n)
        builtin = ext.builtin_arm(run.arm)
        shots = [len(inputs.builder.shots_for(builtin, ex)) for ex in inputs.test]
        summaries = ({g.name: summarize_scores(arm_columns[g.name].scores, seed=cfg.seed,
                                               pass_threshold=getattr(g, "pass_threshold", None))
                      for g in inputs.graders} if inputs.graders else None)
        # no answer at all: no metric (a mean over nothing is not 0)
        means = {**scores.means(), **{g: summarize_scores(c.scores)["mean"] for g, c in arm_columns.items()}}
        result = ext.arm_record(
            run, primary_scores, means if answered else {},
            summaries, [ex.id for ex in inputs.test], float(np.mean(shots)) if shots else 0.0,
            {**dataclasses.asdict(inputs.settings), "batch_size": cfg.batch_size},
            (cfg.price_per_m_input_tokens, cfg.price_per_m_output_tokens), cfg.seed)
        result["repetition"] = arm_repetition(texts)  # of the answers it gave
        scored.arms[name] = result
        scored.per_example[name] = primary_scores
        scored.unanswered[name] = [i for i, a in enumerate(run.answers) if a.text is None]
        scored.usd_per_query[name] = result["usd_per_1m_queries"] / 1e6
        scored.prompt_tokens_mean[name] = result["prompt_tokens_mean"]
        position_of = {i: position for position, i in enumerate(answered)}
        for i, (ex, answer) in enumerate(zip(inputs.test, run.answers, strict=True)):
            position = position_of.get(i)
            row = {"id": ex.id, "arm": name, "prompt_tokens": answer.prompt_tokens,
                   "completion_tokens": answer.completion_tokens, "output": answer.text, "reference": ex.reference,
                   "score": primary_scores[i], "latency_ms": answer.latency_s * 1000,
                   "finish_reason": answer.finish_reason if answer.text is not None else "failed",
                   "shot_ids": [s.id for s in inputs.builder.shots_for(builtin, ex)]}
            if answer.text is None:
                row["error"] = answer.error
            if answer.tokens_counted:
                row["tokens_counted"] = True
            if inputs.graders and position is not None:
                row["scores"] = {g: c.scores[position] for g, c in arm_columns.items()}
            scored.prediction_rows.append(row)
    for name in generated.external:
        comparison = ext.compare_with_tuned(name, scored.per_example, scored.arms, TUNED_ARMS, cfg.seed)
        if comparison is not None:
            scored.arms[name]["vs_tuned"] = comparison


def _arm_result(inputs: _Inputs, arm: str, gens: Sequence[Generation], wall_s: float,
                primary_scores: Sequence[float | None], scores: Scores, arm_columns: dict[str, Any]) -> dict[str, Any]:
    """eval/metrics.json arms.<arm> (contract.ArmResult)."""
    cfg = inputs.cfg
    scored = [s for s in primary_scores if s is not None]
    latencies_ms = [g.latency_s * 1000 for g in gens]
    prompt_mean = float(np.mean([g.prompt_tokens for g in gens]))
    completion_mean = float(np.mean([g.completion_tokens for g in gens]))
    shot_counts = [len(inputs.builder.shots_for(arm, ex)) for ex in inputs.test]
    result: dict[str, Any] = {
        "primary": float(np.mean(scored)) if scored else None,
        "ci95": list(bootstrap_ci(scored, seed=cfg.seed)) if scored else None,
        "prompt_tokens_mean": prompt_mean,
        "completion_tokens_mean": completion_mean,
        "latency_ms_p50": _percentile(latencies_ms, 50),
        "latency_ms_p95": _percentile(latencies_ms, 95),
        "batch_size": cfg.batch_size,
        "tokens_per_s": sum(g.completion_tokens for g in gens) / wall_s if wall_s > 0 else 0.0,
        "usd_per_1m_queries": usd_per_query(prompt_mean, completion_mean, cfg, tuned=is_tuned_arm(arm)) * 1e6,
        "model": _arm_model(arm),
        "served": _served(arm, inputs.models.tuned_kind),
        "shots_mean": float(np.mean(shot_counts)),
        "finish_reasons": dict(Counter(g.finish_reason for g in gens)),
        "decoding": dataclasses.asdict(inputs.settings),
        # the KV cache of the leading tokens all this arm's prompts share was computed once (engine/generate.py)
        "prefix_reused_tokens": gens[0].prefix_reused_tokens if gens else 0,
        "latency_note": "wall time of the query's batch; a prompt prefix shared by all the arm's queries is "
                        "prefilled once per arm and reused (as servers with prefix caching do), not counted",
        "metrics": {**scores.means(), **{name: summarize_scores(c.scores)["mean"] for name, c in arm_columns.items()}},
        "repetition": arm_repetition([g.text for g in gens]),  # eval/repetition.py: answers looping on a line
    }
    if inputs.graders:
        result["graders"] = {
            g.name: summarize_scores(arm_columns[g.name].scores, seed=cfg.seed, pass_threshold=getattr(g, "pass_threshold", None))
            for g in inputs.graders
        }
    return result


def _prediction_rows(inputs: _Inputs, arm: str, gens: Sequence[Generation], primary_scores: Sequence[float | None],
                     arm_columns: dict[str, Any]) -> list[dict[str, Any]]:
    """eval/predictions.jsonl rows of one arm: one per test example, with every grader's score and error."""
    rows = []
    for i, (ex, gen, score) in enumerate(zip(inputs.test, gens, primary_scores, strict=True)):
        row = {
            "id": ex.id, "arm": arm, "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens, "output": gen.text, "reference": ex.reference,
            "score": score, "latency_ms": gen.latency_s * 1000, "finish_reason": gen.finish_reason,
            "shot_ids": [s.id for s in inputs.builder.shots_for(arm, ex)],
        }
        if inputs.graders:
            row["scores"] = {name: c.scores[i] for name, c in arm_columns.items()}
            errors = {name: c.errors[i] for name, c in arm_columns.items() if c.errors[i] is not None}
            if errors:
                row["grader_errors"] = errors
        rows.append(row)
    return rows


def _compare_pairwise(inputs: _Inputs, generated: _Generated, verdict: dict[str, Any]) -> dict[str, Any] | None:
    """eval.pairwise: the judge compares the verdict's two arms output by output (None without a pair)."""
    best, vs = verdict["best_arm"], verdict["vs"]
    if inputs.cfg.pairwise is None or not best or not vs:
        return None
    from tunelab.eval.graders.judge import JudgeCache
    from tunelab.eval.graders.pairwise import compare_pairwise

    return compare_pairwise(
        inputs.cfg.pairwise, best, vs, generated.texts(best), generated.texts(vs), inputs.items,
        JudgeCache(inputs.paths.judge_cache), seed=inputs.cfg.seed,
    )


# ---------------------------------------------------------------------------------------------- evaluate: beyond quality


def _overfitting(inputs: _Inputs, generated: _Generated, sample_columns: dict[str, Any],
                 arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Loss curves, verbatim copies of train answers, and the tuned arm's metric on train vs test."""
    task = None
    if generated.train_sample_outputs:
        references = [ex.reference for ex in inputs.train_sample]
        scores = score_outputs(generated.train_sample_outputs, references, inputs.kind, inputs.schema)
        tuned = arms["tuned"]
        task = task_metric(inputs.primary.name, _primary_scores(inputs.primary, scores, sample_columns),
                           tuned["primary"], tuned["ci95"], inputs.cfg.seed)
    summary = _read_summary(inputs.paths)  # output_step: the weights the tuned arms ran
    return measure_overfitting(inputs.paths.train_log, inputs.references, [ex.reference for ex in inputs.train],
                               {arm: generated.texts(arm) for arm in inputs.chosen}, task,
                               summary.output_step if summary else None)


def _check_training(inputs: _Inputs, overfitting: dict[str, Any], verdict: dict[str, Any],
                    score_range: Sequence[float] | None) -> dict[str, Any]:
    """A verdict on a model that is still learning is provisional, and says what to run (the verdict is
    updated in place)."""
    task = overfitting.get("task_metric") or {}
    check = (assess_training(inputs.paths, task.get("train_sample"), task.get("test"), inputs.primary.name,
                             score_range)
             if "tuned" in inputs.chosen else {"provisional": False, "reason": None, "suggestion": None, "signals": {}})
    verdict.update(provisional=check["provisional"], provisional_reason=check["reason"])
    if check["provisional"]:
        verdict["text"] = f"provisional, {check['reason']}. {verdict['text']}"
    return check


def _forgetting(inputs: _Inputs, abilities: dict[str, Any]) -> dict[str, Any]:
    """General ability, base vs tuned, or why it was not measured."""
    cfg = inputs.cfg
    if not inputs.run_forgetting:
        return {"skipped": "eval.forgetting is off" if not cfg.forgetting else "no tuned model evaluated"}
    from tunelab.eval.forgetting import compare_general_ability, probe_records

    result = compare_general_ability(abilities["base"], abilities["tuned"], cfg.forgetting_threshold, seed=cfg.seed)
    result["probe_outputs"] = probe_records(abilities["base"], abilities["tuned"])
    return result


def _mention_forgetting(verdict: dict[str, Any], forgetting: dict[str, Any]) -> None:
    """A fine-tuned arm recommended at a measured cost in general ability, or on the user's must-keep set
    (eval.keep), says so in its first sentence."""
    recommended = verdict.get("recommended")
    if not recommended or not is_tuned_arm(recommended):
        return
    notes = []
    if forgetting.get("flagged") and forgetting.get("text"):
        notes.append(f"It costs general ability: {forgetting['text']}.")
    keep = forgetting.get("keep") or {}
    if keep.get("flagged") and keep.get("text"):
        notes.append(f"It breaks what must keep working: {keep['text']}.")
    if notes:
        _add_to_headline(verdict, " ".join(notes))


def _mention_repetition(verdict: dict[str, Any], generated: _Generated) -> None:
    """The fine-tuned arm the verdict is about says so when its answers repeat a line or loop clearly more
    often than those of the arm it is compared with (eval/repetition.py): graders rarely penalise it."""
    best, vs = verdict.get("best_arm"), verdict.get("vs")
    if not best or not vs or not is_tuned_arm(best) or not {best, vs} <= generated.generations.keys():
        return
    note = repetition_note(best, generated.texts(best), vs, generated.texts(vs))
    if note is None:
        return
    verdict["repetition_note"] = note
    _add_to_headline(verdict, f"{note}.")


def _add_to_headline(verdict: dict[str, Any], sentence: str) -> None:
    """`sentence` appended to the verdict's headline, and to its text right after the headline there (at the
    end of the text when the text does not hold the headline)."""
    headline = verdict.get("headline")
    if headline and headline in verdict["text"]:
        verdict["text"] = verdict["text"].replace(headline, f"{headline} {sentence}", 1)
    else:
        verdict["text"] += f" {sentence}"
    if headline:
        verdict["headline"] = f"{headline} {sentence}"


def _prompts_seen(inputs: _Inputs, prompts: dict[str, list[list[dict[str, str]]]]) -> dict[str, Any]:
    """eval/metrics.json "prompts": the instructions, shots and retrieval the arms saw, and one prompt each."""
    cfg, builder = inputs.cfg, inputs.builder
    return {
        "instructions": builder.instructions,
        "instructions_source": "recipe eval.instructions" if cfg.instructions else "derived from the train split",
        "shots": cfg.shots,
        "rag_k": cfg.rag_k,
        "few_shot_ids": [s.id for s in builder.fixed_shots],
        "retrieval": f"BM25 over chunks of {cfg.rag_docs}" if builder.documents is not None else "BM25 over train user prompts",
        "example": {arm: prompts[arm][0] for arm in inputs.chosen},
    }


def _pools(inputs: _Inputs) -> dict[str, Any]:
    """eval/metrics.json "pools": the few-shot/retrieval candidates and those refused as test leaks."""
    pool, documents = inputs.builder.pool, inputs.builder.documents
    return {
        "train_examples": len(inputs.train), "pool_size": len(pool.shots), "refused": pool.refused,
        "documents": None if documents is None else {"chunks": len(documents.shots), "refused": documents.refused},
    }


def _write_results(inputs: _Inputs, metrics: dict[str, Any], prediction_rows: Sequence[dict[str, Any]],
                   out_dir: str | Path | None) -> None:
    """eval/predictions.jsonl, the grader configs in manifest.json, then eval/metrics.json (into `out_dir`
    instead of the run's eval/ when given; the manifest is then left alone)."""
    paths = inputs.paths
    out = Path(out_dir) if out_dir else paths.eval
    write_text_atomic(out / paths.predictions.name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prediction_rows))
    if inputs.graders and out_dir is None:
        record_graders_in_manifest(paths, inputs.graders)
    Metrics.model_validate(metrics).write(out / paths.metrics.name)


# ---------------------------------------------------------------------------------------------- adding external arms


def add_external_arms(run_dir: str | Path, external: Sequence[Any], *, echo: bool = True,
                      trust_remote_code: bool = False, python_graders: bool = False) -> dict[str, Any]:
    """`tunelab eval RUN --external FILE`: score more arms on a run already evaluated, without retraining or
    regenerating: the other arms' rows of eval/predictions.jsonl and records of eval/metrics.json are reused,
    the new arms answer the same test examples (the same --test file and --limit), and the verdict and cost
    are recomputed with them; overfitting, forgetting and the training check are kept as they were. An arm
    of the same name is replaced. Without an earlier evaluation, this is `evaluate` with the arms added."""
    paths = RunPaths(Path(run_dir))
    if not paths.metrics.is_file():
        return evaluate(run_dir, echo=echo, trust_remote_code=trust_remote_code, python_graders=python_graders,
                        external=external)
    started = time.perf_counter()
    Metrics.from_file(paths.metrics)  # a damaged file is an error here (one line naming it), not a guess
    previous = Metrics.read_keys(paths.metrics)  # its keys as they are: written back with the arms added
    names = {arm.name for arm in external}
    kept_arms = {arm: row for arm, row in previous["arms"].items() if arm not in names}
    builtin = [arm for arm in ARMS if arm in kept_arms]
    test_path = Path(previous["test_file"])
    inputs = _load_inputs(run_dir, builtin or None, test_path, previous["n_examples"],
                          trust_remote_code=trust_remote_code, python_graders=python_graders, recipe=None,
                          train_file=None, external=external, recipe_external=False)
    rows = [json.loads(line) for line in paths.predictions.read_text(encoding="utf-8").splitlines() if line.strip()]
    scored = _Scored(prediction_rows=[r for r in rows if r.get("arm") not in names])
    ids = [ex.id for ex in inputs.test]
    for arm, record in kept_arms.items():
        by_id = {r["id"]: r for r in rows if r.get("arm") == arm}
        if set(by_id) != set(ids):
            raise DataError(f"{paths.predictions}: the rows of arm '{arm}' are not the {len(ids)} examples of "
                            f"{test_path}; run `tunelab eval {run_dir}` again to evaluate every arm anew")
        scored.arms[arm] = record
        scored.per_example[arm] = [by_id[i]["score"] for i in ids]
        if "external" in record:  # an external arm added before: the examples it did not answer
            scored.unanswered[arm] = [n for n, i in enumerate(ids) if by_id[i].get("output") is None]
        scored.usd_per_query[arm] = record["usd_per_1m_queries"] / 1e6
        scored.prompt_tokens_mean[arm] = record["prompt_tokens_mean"]

    from tqdm import tqdm

    bar = tqdm(total=len(inputs.test) * len(external), desc="external", unit="gen", file=sys.stderr, dynamic_ncols=True)
    prompts: dict[str, list[list[dict[str, str]]]] = {}
    generated = _Generated(prompts, {}, {}, [], {}, _run_external_arms(inputs, bar, prompts))
    bar.close()
    _, _, external_columns = _grade_arms(dataclasses.replace(inputs, chosen=[]), generated)
    _score_external_arms(inputs, generated, external_columns, scored)

    metrics = {**previous, "arms": scored.arms}
    summary = _read_summary(paths)
    metrics["verdict"] = _verdict_on_scored(inputs, scored, training_cost(summary, inputs.cfg.gpu_price_per_hour))
    metrics["primary_range"] = metrics["verdict"]["score_range"]
    check = previous.get("training_check") or {}
    metrics["verdict"].update(provisional=bool(check.get("provisional")), provisional_reason=check.get("reason"))
    if check.get("provisional"):
        metrics["verdict"]["text"] = f"provisional, {check['reason']}. {metrics['verdict']['text']}"
    metrics["cost"] = compare_cost(scored.usd_per_query, scored.prompt_tokens_mean,
                                   {arm: row["tokens_per_s"] for arm, row in scored.arms.items()}, metrics["verdict"],
                                   summary, inputs.cfg)
    metrics["elapsed_s"] = previous["elapsed_s"] + time.perf_counter() - started
    write_text_atomic(paths.predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored.prediction_rows))
    Metrics.model_validate(metrics).write(paths.metrics)
    if echo:
        print(format_table(metrics))
    return metrics
