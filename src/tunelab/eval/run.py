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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tunelab.config import ARMS, RAG_ARMS, TUNED_ARMS, Recipe
from tunelab.contract import Metrics, TrainSummary
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
from tunelab.eval.graders.specs import MODEL_GRADER_TYPES, grader_config, recipe_graders
from tunelab.eval.graders.templates import make_item
from tunelab.eval.metrics import (
    OutputKind,
    bootstrap_ci,
    decide_verdict,
    detect_output_kind,
    score_outputs,
    summarize_scores,
)
from tunelab.eval.undertrained import assess_training
from tunelab.files import write_text_atomic
from tunelab.runs import RunPaths, open_run
from tunelab.use.generate import DecodingSettings, Generation, generate

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

    LoRA run: one PeftModel; `base` is the same object under `disable_adapter()`. Full fine-tune: two
    models, the one not in use released first (two 135M copies fit, larger models may not).
    """

    def __init__(self, paths: RunPaths, recipe: Recipe) -> None:
        self.paths, self.recipe = paths, recipe
        self._peft: Any = None
        self._loaded: tuple[str, Any] | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None

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

    @contextlib.contextmanager
    def use(self, which: str) -> Iterator[PreTrainedModel]:
        from tunelab.runs import load_run_model

        kind = self.tuned_kind
        if kind == "adapter":
            if self._peft is None:
                self._peft, self.tokenizer = load_run_model(self.paths, self.recipe)
            if which == "base":
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


# ---------------------------------------------------------------------------------------------- summaries


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def _usd_per_query(prompt_tokens: float, completion_tokens: float, recipe: Recipe) -> float:
    return (prompt_tokens * recipe.eval.price_per_m_input_tokens
            + completion_tokens * recipe.eval.price_per_m_output_tokens) / 1e6


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _read_summary(paths: RunPaths) -> TrainSummary | None:
    return TrainSummary.from_file(paths.train_summary) if paths.train_summary.is_file() else None


def _loss_curve(paths: RunPaths) -> dict[str, Any]:
    rows = _read_jsonl(paths.train_log)
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("val_loss") is not None]
    curve = [{"step": r["step"], "train_loss": r.get("train_loss"), "val_loss": r["val_loss"]} for r in evals]
    events = [r for r in rows if r.get("kind") == "event" and r.get("event") == "overfitting"]
    out: dict[str, Any] = {"loss_curve": curve, "overfitting_events": events}
    if not curve:
        out["note"] = f"no validation evaluations in {paths.train_log}"
        return out
    best = min(curve, key=lambda r: r["val_loss"])
    last = curve[-1]
    out["best_step"] = best["step"]
    out["best_val_loss"] = best["val_loss"]
    out["final_val_loss"] = last["val_loss"]
    out["final_train_loss"] = last["train_loss"]
    out["final_gap"] = None if last["train_loss"] is None else last["val_loss"] - last["train_loss"]
    # The classic signature: validation loss climbed off its minimum while train loss kept falling.
    out["val_rising_while_train_falls"] = bool(
        last["step"] != best["step"] and last["val_loss"] > best["val_loss"]
        and last["train_loss"] is not None and best["train_loss"] is not None
        and last["train_loss"] < best["train_loss"]
    )
    return out


def _verbatim(outputs: Sequence[str], references: Sequence[str], train_answers: set[str]) -> dict[str, float]:
    """How often outputs copy a training answer word for word; copies that are also wrong are the
    memorisation signal (for label tasks every right answer is a 'copy')."""
    n = max(len(outputs), 1)
    copies = [o.strip() in train_answers for o in outputs]
    wrong = [c and o.strip() != r.strip() for c, o, r in zip(copies, outputs, references, strict=True)]
    return {"output_is_train_answer": sum(copies) / n, "wrong_and_train_answer": sum(wrong) / n}


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
    lines.append(f"verdict: {metrics['verdict']['text']}")
    if metrics["cost"].get("text"):
        lines.append(f"cost: {metrics['cost']['text']}")
    if metrics["forgetting"].get("text"):
        lines.append(f"forgetting: {metrics['forgetting']['text']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- graders


@dataclasses.dataclass(frozen=True)
class _Primary:
    name: str
    grader: bool  # a grader's column, else a built-in metric
    reason: str | None  # None: the automatic choice, explained by OutputKind.reason


def _choose_primary(name: str | None, graders: Sequence[Any], kind: OutputKind, has_schema: bool,
                    paths: RunPaths) -> _Primary:
    """eval.primary (a grader or a built-in metric computed for these references), else the automatic
    choice; checked before any generation."""
    if name is None:
        return _Primary(kind.primary, False, None)
    if name in {g.name for g in graders}:
        return _Primary(name, True, f"eval.primary: the verdict is about grader '{name}'")
    computed = ["exact_match", "normalized_match", "token_f1", "rouge_l"]
    computed += {"json": ["json_valid", "json_exact", "json_field_accuracy"], "label": ["label_accuracy"]}.get(kind.kind, [])
    computed += ["schema_valid"] if has_schema else []
    if name not in computed:
        raise ConfigError(f"{paths.recipe}: eval.primary: '{name}' is not computed for these references "
                          f"({kind.kind} output); choose a grader or one of {', '.join(computed)}")
    return _Primary(name, False, f"eval.primary: the verdict is about built-in metric '{name}'")


def _refuse_python_graders(graders: Sequence[Any], paths: RunPaths) -> None:
    """Opening someone else's run folder never runs its code: a python grader there needs consent."""
    for grader in graders:
        for one in grader.graders.values() if getattr(grader, "type", None) == "multi" else (grader,):
            if getattr(one, "type", None) == "python":
                raise ConfigError(
                    f"{paths.recipe}: grader '{one.name}' is Python code from the run folder; tunelab does not run "
                    "a run folder's code unasked: evaluate with --trust-remote-code if you trust this run"
                )


def _check_api_keys(graders: Sequence[Any], paths: RunPaths) -> None:
    """Every judge's API key variable is set, before minutes of generation."""
    from tunelab.eval.graders.judge import JudgeFailed, api_key

    for grader in graders:
        for one in grader.graders.values() if getattr(grader, "type", None) == "multi" else (grader,):
            if hasattr(one, "key_env") and getattr(one, "evaluation_metric", "cosine") == "cosine":
                try:
                    api_key(one)
                except JudgeFailed as err:
                    who = f"grader '{one.name}'" if hasattr(one, "name") else "eval.pairwise"
                    raise ConfigError(f"{paths.recipe}: {who}: {err}") from None


def _verdict_on_scored(per_example: dict[str, list[float | None]], usd_per_query: dict[str, float],
                       prompt_tokens_mean: dict[str, float], seed: int) -> dict[str, Any]:
    """The verdict on the examples every arm's primary scored: a grader failure drops that example
    from the paired comparison (counted), never scores it 0."""
    n = len(next(iter(per_example.values()), []))
    kept = [i for i in range(n) if all(scores[i] is not None for scores in per_example.values())]
    verdict = decide_verdict({arm: [scores[i] for i in kept] for arm, scores in per_example.items()},
                             usd_per_query, prompt_tokens_mean, seed=seed)
    if len(kept) < n:
        verdict["excluded_failed"] = n - len(kept)
        verdict["text"] += (f" ({n - len(kept)} of {n} examples left out: the primary grader failed on them "
                            "in at least one arm; see eval/metrics.json graders.failures)")
    return verdict


def _grader_summary(graders: Sequence[Any], columns: dict[str, dict[str, Any]], test: Sequence[EvalExample],
                    human_labels: str | None, paths: RunPaths) -> dict[str, Any]:
    """metrics.json "graders": the configs, failures per grader and arm (count and first messages),
    and judge/human agreement when eval.human_labels is given."""
    ids = [ex.id for ex in test]
    summary: dict[str, Any] = {
        "configs": [grader_config(g) for g in graders],
        "judge_cache": str(paths.eval / "judge_cache.jsonl") if any(isinstance(g, MODEL_GRADER_TYPES) for g in graders) else None,
        "failures": {g.name: {arm: {"failed": by_name[g.name].failed, "first": by_name[g.name].first_errors(ids)}
                              for arm, by_name in columns.items() if by_name[g.name].failed}
                     for g in graders},
        "human_agreement": None,
    }
    if human_labels:
        from tunelab.eval.graders.human import agreement, read_human_labels

        scores = {arm: {name: column.scores for name, column in by_name.items()} for arm, by_name in columns.items()}
        summary["human_agreement"] = agreement(graders, scores, ids, read_human_labels(human_labels))
    return summary


def _record_graders_in_manifest(paths: RunPaths, graders: Sequence[Any]) -> None:
    """manifest.json "graders": the configs this evaluation used (other keys kept)."""
    manifest: dict[str, Any] = {}
    if paths.manifest.is_file():
        try:
            manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
        except ValueError:
            raise DataError(f"{paths.manifest}: not valid JSON; it is not rewritten") from None
    manifest["graders"] = [grader_config(g) for g in graders]
    # a run evaluated without its training (tests, copied folders) may have no full manifest: keys kept as found
    write_text_atomic(paths.manifest, json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- evaluate


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
) -> dict[str, Any]:
    """Evaluate the arms of a run on its test split; returns what it writes to eval/metrics.json.
    `trust_remote_code` comes from the caller, never from the run's recipe.yaml (runs.open_run), and
    so does `python_graders`: a python grader in a run folder's recipe is code, run only when the
    caller says the recipe is the user's own (tunelab run, curve) or the user asked for it.
    For `tunelab drift` and `update` (tunelab.lifecycle), which score a run on other data without
    touching its own results: `recipe` replaces the run's recipe.yaml settings, `train_file` its
    data/train.jsonl (the few-shot and retrieval pool), and `out_dir` its eval/ folder."""
    started = time.perf_counter()
    paths, run_recipe = open_run(run_dir, trust_remote_code)
    recipe = recipe or run_recipe
    cfg = recipe.eval
    chosen = _parse_arms(arms, recipe)
    limit = limit or cfg.limit

    # --- data: test set, train pool (leak-checked against the whole test file), output kind
    test_path = Path(test_file) if test_file else paths.data / "test.jsonl"
    all_test, all_items = read_examples_and_items(test_path)
    if not all_test:
        raise DataError(f"{test_path}: no test examples")
    test = all_test[:limit] if limit else all_test
    items = all_items[: len(test)]
    train_path = Path(train_file) if train_file else paths.data / "train.jsonl"
    train, train_items = read_examples_and_items(train_path) if train_path.is_file() else ([], [])
    if not train and any(a in chosen for a in ("prompt", *RAG_ARMS)):
        raise DataError(f"{train_path}: not found or empty; the prompt and rag arms draw their examples from it")
    references = [ex.reference for ex in test]
    kind = detect_output_kind(references, [ex.reference for ex in train])
    schema = _read_schema(cfg.schema_file, paths)
    graders = recipe_graders(cfg)
    if not python_graders:
        _refuse_python_graders(graders, paths)
    primary = _choose_primary(cfg.primary, graders, kind, schema is not None, paths)
    _check_api_keys([*graders, *([cfg.pairwise] if cfg.pairwise else [])], paths)
    pool = build_pool(train, all_test)
    documents = None
    if cfg.rag_docs and any(a in chosen for a in RAG_ARMS):
        from tunelab.eval.retrieval import read_document_chunks

        documents = build_document_pool(read_document_chunks(cfg.rag_docs), all_test)
    instructions = cfg.instructions or derive_instructions(train, kind)
    builder = PromptBuilder(pool, instructions, cfg.shots, cfg.rag_k, cfg.seed, documents,
                            task_system=task_system_prompt(train))
    settings = DecodingSettings(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)

    models = _Models(paths, recipe)
    if models.tuned_kind is None and any(a in chosen for a in TUNED_ARMS):
        # fail before the base arms spend minutes generating
        raise ModelError(f"{paths.root}: has neither adapter/ nor model/ for the tuned arms; has its training "
                         "finished? (evaluate prompt-only arms with --arms base,prompt,rag)")
    run_forgetting = cfg.forgetting and any(a in chosen for a in TUNED_ARMS) and models.tuned_kind is not None
    rng = random.Random(cfg.seed)
    # positions, not examples: the same draw as sampling the examples, and their items come along
    picked = rng.sample(range(len(train)), min(len(train), len(test), TRAIN_SAMPLE_MAX)) if "tuned" in chosen else []
    train_sample = [train[i] for i in picked]
    train_sample_items = [train_items[i] for i in picked]

    from tqdm import tqdm

    from tunelab.eval.forgetting import general_probes

    total = len(test) * len(chosen) + len(train_sample) + (2 * len(general_probes(cfg.seed)) if run_forgetting else 0)
    bar = tqdm(total=total, desc="eval", unit="gen", file=sys.stderr, dynamic_ncols=True)
    decoding_used: dict[str, dict[str, Any]] = {}

    def run_generate(label: str, model: Any, conversations: list[list[dict[str, str]]]) -> tuple[list[Generation], float]:
        bar.set_description(label)
        t0 = time.perf_counter()
        result = generate(model, models.tokenizer, conversations, settings, cfg.batch_size, progress=bar.update)
        decoding_used[label] = dataclasses.asdict(settings)
        return result, time.perf_counter() - t0

    # --- generation: base-model arms first, then tuned, so each model is needed in one stretch
    prompts = {arm: [builder.build(arm, ex) for ex in test] for arm in chosen}
    generations: dict[str, list[Generation]] = {}
    wall_s: dict[str, float] = {}
    abilities: dict[str, Any] = {}
    train_sample_outputs: list[str] = []
    for which in ("base", "tuned"):
        phase_arms = [a for a in chosen if _arm_model(a) == which]
        if not phase_arms and not (run_forgetting and which == "base"):
            continue
        with models.use(which) as model:
            for arm in phase_arms:
                generations[arm], wall_s[arm] = run_generate(arm, model, prompts[arm])
            if which == "tuned" and train_sample:
                sample_gens, _ = run_generate("tuned:train-sample", model,
                                              [builder.build("tuned", ex) for ex in train_sample])
                train_sample_outputs = [g.text for g in sample_gens]
            if run_forgetting:
                from tunelab.eval.forgetting import measure_general_ability

                bar.set_description(f"forgetting:{which}")
                abilities[which] = measure_general_ability(
                    model, models.tokenizer, seed=cfg.seed, batch_size=cfg.batch_size, progress=bar.update
                )
        del model  # a full fine-tune's other model can then be released before the next phase loads
    bar.close()

    # --- graders: every grader scores every arm's outputs (judge replies cached in the run)
    from tunelab.eval.graders.grade import Grading

    columns: dict[str, dict[str, Any]] = {}
    with Grading(graders, paths.eval / "judge_cache.jsonl") as grading:
        for arm in chosen if graders else ():
            columns[arm] = grading.grade([g.text for g in generations[arm]], items)
        sample_columns = (grading.grade(train_sample_outputs, train_sample_items)
                          if train_sample_outputs and primary.grader else {})

    # --- quality per arm
    metrics: dict[str, Any] = {
        "primary_metric": primary.name,
        "primary_reason": primary.reason or kind.reason,
        "auto_metric": kind.primary,
        "output_kind": kind.kind,
        "n_examples": len(test),
        "test_file": str(test_path),
        "model": recipe.model.name,
        "tuned_weights": models.tuned_kind,
        "decoding": {**dataclasses.asdict(settings), "stop": "end-of-turn", "batch_size": cfg.batch_size,
                     "prefix_cache": True},
        "arms": {},
    }
    per_example: dict[str, list[float]] = {}
    usd_per_query: dict[str, float] = {}
    prompt_tokens_mean: dict[str, float] = {}
    prediction_rows: list[dict[str, Any]] = []
    for arm in chosen:
        gens = generations[arm]
        outputs = [g.text for g in gens]
        scores = score_outputs(outputs, references, kind, schema)
        arm_columns = columns.get(arm, {})
        primary_scores = (arm_columns[primary.name].scores if primary.grader
                          else scores.per_example[primary.name])
        per_example[arm] = primary_scores
        scored = [s for s in primary_scores if s is not None]
        latencies_ms = [g.latency_s * 1000 for g in gens]
        prompt_mean = float(np.mean([g.prompt_tokens for g in gens]))
        completion_mean = float(np.mean([g.completion_tokens for g in gens]))
        usd_per_query[arm] = _usd_per_query(prompt_mean, completion_mean, recipe)
        prompt_tokens_mean[arm] = prompt_mean
        shot_counts = [len(builder.shots_for(arm, ex)) for ex in test]
        metrics["arms"][arm] = {
            "primary": float(np.mean(scored)) if scored else None,
            "ci95": list(bootstrap_ci(scored, seed=cfg.seed)) if scored else None,
            "prompt_tokens_mean": prompt_mean,
            "completion_tokens_mean": completion_mean,
            "latency_ms_p50": _percentile(latencies_ms, 50),
            "latency_ms_p95": _percentile(latencies_ms, 95),
            "batch_size": cfg.batch_size,
            "tokens_per_s": sum(g.completion_tokens for g in gens) / wall_s[arm] if wall_s[arm] > 0 else 0.0,
            "usd_per_1m_queries": usd_per_query[arm] * 1e6,
            "model": _arm_model(arm),
            "shots_mean": float(np.mean(shot_counts)),
            "finish_reasons": dict(Counter(g.finish_reason for g in gens)),
            "decoding": decoding_used[arm],
            # the KV cache of the leading tokens all this arm's prompts share was computed once (eval/generate.py)
            "prefix_reused_tokens": gens[0].prefix_reused_tokens if gens else 0,
            "latency_note": "wall time of the query's batch; a prompt prefix shared by all the arm's queries is "
                            "prefilled once per arm and reused (as servers with prefix caching do), not counted",
            "metrics": {**scores.means(), **{name: summarize_scores(c.scores)["mean"] for name, c in arm_columns.items()}},
        }
        if graders:
            metrics["arms"][arm]["graders"] = {
                g.name: summarize_scores(arm_columns[g.name].scores, seed=cfg.seed, pass_threshold=getattr(g, "pass_threshold", None))
                for g in graders
            }
        for i, (ex, gen, score) in enumerate(zip(test, gens, primary_scores, strict=True)):
            prediction_rows.append({
                "id": ex.id, "arm": arm, "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": gen.completion_tokens, "output": gen.text, "reference": ex.reference,
                "score": score, "latency_ms": gen.latency_s * 1000, "finish_reason": gen.finish_reason,
                "shot_ids": [s.id for s in builder.shots_for(arm, ex)],
            })
            if graders:
                prediction_rows[-1]["scores"] = {name: c.scores[i] for name, c in arm_columns.items()}
                errors = {name: c.errors[i] for name, c in arm_columns.items() if c.errors[i] is not None}
                if errors:
                    prediction_rows[-1]["grader_errors"] = errors
    metrics["verdict"] = _verdict_on_scored(per_example, usd_per_query, prompt_tokens_mean, cfg.seed)
    if graders:
        metrics["graders"] = _grader_summary(graders, columns, test, cfg.human_labels, paths)
    best, vs = metrics["verdict"]["best_arm"], metrics["verdict"]["vs"]
    if cfg.pairwise is not None and best and vs:
        from tunelab.eval.graders.judge import JudgeCache
        from tunelab.eval.graders.pairwise import compare_pairwise

        metrics["pairwise"] = compare_pairwise(
            cfg.pairwise, best, vs, [g.text for g in generations[best]], [g.text for g in generations[vs]], items,
            JudgeCache(paths.eval / "judge_cache.jsonl"), seed=cfg.seed,
        )

    # --- cost: per query, per 1M queries, and when training pays for itself
    summary = _read_summary(paths)
    training = None
    if summary is not None:
        training = {"train_time_s": summary.train_time_s,
                    "usd": summary.train_time_s / 3600 * cfg.gpu_price_per_hour,
                    "basis": "train/summary.json train_time_s x eval.gpu_price_per_hour (wall time of the "
                             "training run on whatever machine ran it)"}
    break_even: dict[str, Any] = {}
    verdict = metrics["verdict"]
    if training is not None:
        for tuned_arm in (a for a in chosen if a in TUNED_ARMS):
            for other in (a for a in chosen if a not in TUNED_ARMS):
                saved = usd_per_query[other] - usd_per_query[tuned_arm]
                break_even[f"{tuned_arm} vs {other}"] = {
                    "usd_saved_per_query": saved,
                    "queries": math.ceil(training["usd"] / saved) if saved > 0 else None,
                }
    cost: dict[str, Any] = {
        "prices": {"usd_per_m_input_tokens": cfg.price_per_m_input_tokens,
                   "usd_per_m_output_tokens": cfg.price_per_m_output_tokens,
                   "gpu_usd_per_hour": cfg.gpu_price_per_hour},
        "per_arm": {arm: {"usd_per_query": usd_per_query[arm], "usd_per_1m_queries": usd_per_query[arm] * 1e6,
                          "prompt_tokens_mean": prompt_tokens_mean[arm],
                          "tokens_per_s": metrics["arms"][arm]["tokens_per_s"]} for arm in chosen},
        "training": training,
        "break_even": break_even,
        "break_even_queries": None,
    }
    pair = f"{verdict['best_arm']} vs {verdict['vs']}"
    if pair in break_even:
        cost["break_even_queries"] = break_even[pair]["queries"]
        queries = break_even[pair]["queries"]
        cost["text"] = (
            f"training cost ${training['usd']:.2f} is repaid by shorter prompts after {queries:,} queries ({pair})"
            if queries is not None
            else f"{verdict['best_arm']} is not cheaper per query than {verdict['vs']}: training is never repaid by prompt savings"
        )
    elif training is None and any(a in chosen for a in TUNED_ARMS):
        cost["text"] = "no train/summary.json: training cost and break-even unknown"
    metrics["cost"] = cost

    # --- overfitting: loss curves, task metric on train vs test, verbatim copies of train answers
    overfitting = _loss_curve(paths)
    train_answers = {ex.reference.strip() for ex in train}
    overfitting["reference_is_train_answer"] = (
        sum(r.strip() in train_answers for r in references) / len(references)
    )
    overfitting["verbatim"] = {arm: _verbatim([g.text for g in generations[arm]], references, train_answers)
                               for arm in chosen}
    if train_sample_outputs:
        sample_scores = score_outputs(train_sample_outputs, [ex.reference for ex in train_sample], kind, schema)
        sample_primary = [s for s in (sample_columns[primary.name].scores if primary.grader
                                      else sample_scores.per_example[primary.name]) if s is not None]
        test_primary = metrics["arms"]["tuned"]["primary"]
    if train_sample_outputs and sample_primary and test_primary is not None:
        overfitting["task_metric"] = {
            "arm": "tuned", "metric": primary.name, "train_sample_n": len(train_sample),
            "train_sample": float(np.mean(sample_primary)),
            "train_sample_ci95": list(bootstrap_ci(sample_primary, seed=cfg.seed)),
            "test": test_primary, "test_ci95": metrics["arms"]["tuned"]["ci95"],
            "train_minus_test": float(np.mean(sample_primary)) - test_primary,
        }
    metrics["overfitting"] = overfitting

    # --- a verdict on a model that is still learning is provisional, and says what to run
    task = overfitting.get("task_metric") or {}
    check = (assess_training(paths, task.get("train_sample"), task.get("test"), metrics["primary_metric"])
             if "tuned" in chosen else {"provisional": False, "reason": None, "suggestion": None, "signals": {}})
    verdict.update(provisional=check["provisional"], provisional_reason=check["reason"])
    if check["provisional"]:
        verdict["text"] = f"provisional, {check['reason']}. {verdict['text']}"
    metrics["training_check"] = check

    # --- forgetting
    if run_forgetting:
        from tunelab.eval.forgetting import compare_general_ability, probe_records

        metrics["forgetting"] = compare_general_ability(
            abilities["base"], abilities["tuned"], cfg.forgetting_threshold, seed=cfg.seed
        )
        metrics["forgetting"]["probe_outputs"] = probe_records(abilities["base"], abilities["tuned"])
    else:
        reason = "eval.forgetting is off" if not cfg.forgetting else "no tuned model evaluated"
        metrics["forgetting"] = {"skipped": reason}

    # --- what the arms saw, so a reader can check the comparison was fair
    metrics["prompts"] = {
        "instructions": instructions,
        "instructions_source": "recipe eval.instructions" if cfg.instructions else "derived from the train split",
        "shots": cfg.shots,
        "rag_k": cfg.rag_k,
        "few_shot_ids": [s.id for s in builder.fixed_shots],
        "retrieval": f"BM25 over chunks of {cfg.rag_docs}" if documents is not None else "BM25 over train user prompts",
        "example": {arm: prompts[arm][0] for arm in chosen},
    }
    metrics["pools"] = {
        "train_examples": len(train), "pool_size": len(pool.shots), "refused": pool.refused,
        "documents": None if documents is None else {"chunks": len(documents.shots), "refused": documents.refused},
    }
    metrics["seed"] = cfg.seed
    metrics["elapsed_s"] = time.perf_counter() - started

    out = Path(out_dir) if out_dir else paths.eval
    write_text_atomic(out / paths.predictions.name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prediction_rows))
    if graders and out_dir is None:
        _record_graders_in_manifest(paths, graders)
    Metrics.model_validate(metrics).write(out / paths.metrics.name)
    if echo:
        print(format_table(metrics))
    return metrics

