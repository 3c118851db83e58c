"""Graders in an evaluation: the checks before any generation, and what the evaluation records.

Before generating (eval/run.py), from the recipe's eval section: a python grader in a run folder runs
only with the caller's consent, every judge's API key variable is set, a run folder's judge is sent
that key only with the caller's consent, and eval.primary names a
grader or a built-in metric computed for these references. After grading: eval/metrics.json
"graders" (configs, failures per grader and arm, judge/human agreement from eval.human_labels, read
here) and manifest.json "graders" (the configs used; the manifest's other keys kept).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tunelab.contract import Manifest
from tunelab.errors import ConfigError
from tunelab.eval.metrics import UNIT_RANGE
from tunelab.specs.graders import MODEL_GRADER_TYPES, grader_config, recipe_graders

if TYPE_CHECKING:
    from tunelab.config import EvalConfig
    from tunelab.eval.arms import EvalExample
    from tunelab.eval.metrics import OutputKind
    from tunelab.runs import RunPaths


def prepare_graders(cfg: EvalConfig, kind: OutputKind, has_schema: bool, paths: RunPaths,
                    python_graders: bool) -> tuple[list[Any], Primary]:
    """The recipe's graders and the verdict's metric, with a run folder's python graders and secret-bearing
    judges refused unless allowed (`python_graders`: the recipe is the user's own, or they consented), and
    every judge's API key checked."""
    graders = recipe_graders(cfg)
    if not python_graders:
        refuse_python_graders(graders, paths)
    primary = choose_primary(cfg.primary, graders, kind, has_schema, paths)
    check_api_keys(graders, cfg.pairwise, paths)
    if not python_graders:
        refuse_secret_bearing(graders, cfg.pairwise, paths)
    return graders, primary


@dataclasses.dataclass(frozen=True)
class Primary:
    """The metric the verdict is about."""

    name: str
    grader: bool  # a grader's column, else a built-in metric
    reason: str | None  # None: the automatic choice, explained by OutputKind.reason
    declared_range: tuple[float, float] | None = UNIT_RANGE  # None: a grader that declares none (inferred)

    def score_range(self, scores: Sequence[float | None]) -> tuple[tuple[float, float], str]:
        """(low, high) of the primary's scale and where it comes from: declared by the grader (or a
        built-in 0-1 metric), else the smallest of 0-1, 0-10, 0-100 holding every score, else the
        scores' own span."""
        if self.declared_range is not None:
            return self.declared_range, "declared"
        seen = [s for s in scores if s is not None]
        low, high = (min(seen), max(seen)) if seen else UNIT_RANGE
        for candidate in (UNIT_RANGE, (0.0, 10.0), (0.0, 100.0)):
            if candidate[0] <= low and high <= candidate[1]:
                return candidate, "inferred from the scores"
        return ((low, high) if high > low else (low, low + 1.0)), "inferred from the scores (their span)"


def declared_range(grader: Any) -> tuple[float, float] | None:
    """The scale a grader's scores live on: its `range` when it has one, 0-1 for the graders that are
    0-1 by definition, None for a python or multi grader that declares none."""
    value = getattr(grader, "range", None)
    if value is not None:
        return (float(value[0]), float(value[1]))
    return None if getattr(grader, "type", None) in ("python", "multi") else UNIT_RANGE


def choose_primary(name: str | None, graders: Sequence[Any], kind: OutputKind, has_schema: bool,
                    paths: RunPaths) -> Primary:
    """eval.primary (a grader or a built-in metric computed for these references), else the automatic
    choice; checked before any generation."""
    if name is None:
        return Primary(kind.primary, False, None)
    by_name = {g.name: g for g in graders}
    if name in by_name:
        return Primary(name, True, f"eval.primary: the verdict is about grader '{name}'", declared_range(by_name[name]))
    computed = ["exact_match", "normalized_match", "token_f1", "rouge_l"]
    computed += {"json": ["json_valid", "json_exact", "json_field_accuracy"], "label": ["label_accuracy"]}.get(kind.kind, [])
    computed += ["schema_valid"] if has_schema else []
    if name not in computed:
        raise ConfigError(f"{paths.recipe}: eval.primary: '{name}' is not computed for these references "
                          f"({kind.kind} output); choose a grader or one of {', '.join(computed)}")
    return Primary(name, False, f"eval.primary: the verdict is about built-in metric '{name}'")


CONSENT = "add --trust-remote-code if you trust this run"


def refuse_python_graders(graders: Sequence[Any], paths: RunPaths, consent: str = CONSENT) -> None:
    """Opening someone else's run folder never runs its code: a python grader there needs consent."""
    for grader in graders:
        for one in grader.graders.values() if getattr(grader, "type", None) == "multi" else (grader,):
            if getattr(one, "type", None) == "python":
                raise ConfigError(
                    f"{paths.recipe}: grader '{one.name}' is Python code from the run folder; tunelab does not run "
                    f"a run folder's code unasked: {consent}"
                )


def calling_endpoints(graders: Sequence[Any], pairwise: Any) -> list[tuple[str, Any]]:
    """(who, endpoint) for every grader (multi's parts included) and the pairwise judge that calls a
    model endpoint: score_model, label_model, text_similarity with cosine, eval.pairwise."""
    found = []
    for grader in graders:
        for one in grader.graders.values() if getattr(grader, "type", None) == "multi" else (grader,):
            if hasattr(one, "key_env") and getattr(one, "evaluation_metric", "cosine") == "cosine":
                found.append((f"grader '{one.name}'", one))
    return found + ([("eval.pairwise", pairwise)] if pairwise is not None else [])


def refuse_secret_bearing(graders: Sequence[Any], pairwise: Any, paths: RunPaths, consent: str = CONSENT) -> None:
    """Opening someone else's run folder never sends your secrets where it says: a judge there that would
    send an API key from your environment (api_key_env, or OPENAI_API_KEY for api.openai.com) needs
    consent, like a python grader."""
    for who, endpoint in calling_endpoints(graders, pairwise):
        if endpoint.key_env is not None:
            raise ConfigError(
                f"{paths.recipe}: {who} would send the API key in ${endpoint.key_env} to {endpoint.base_url}, "
                "as the run folder's recipe says; tunelab does not send your secrets where a run folder says "
                f"unasked: {consent}"
            )


def check_api_keys(graders: Sequence[Any], pairwise: Any, paths: RunPaths) -> None:
    """Every judge's API key variable is set, before minutes of generation."""
    from tunelab.eval.graders.judge import JudgeFailed, api_key

    for who, endpoint in calling_endpoints(graders, pairwise):
        try:
            api_key(endpoint)
        except JudgeFailed as err:
            raise ConfigError(f"{paths.recipe}: {who}: {err}") from None


def grader_summary(graders: Sequence[Any], columns: dict[str, dict[str, Any]], test: Sequence[EvalExample],
                    human_labels: str | None, paths: RunPaths) -> dict[str, Any]:
    """metrics.json "graders": the configs, failures per grader and arm (count and first messages),
    and judge/human agreement when eval.human_labels is given."""
    ids = [ex.id for ex in test]
    summary: dict[str, Any] = {
        "configs": [grader_config(g) for g in graders],
        "judge_cache": str(paths.judge_cache) if any(isinstance(g, MODEL_GRADER_TYPES) for g in graders) else None,
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


def record_graders_in_manifest(paths: RunPaths, graders: Sequence[Any]) -> None:
    """manifest.json "graders": the configs this evaluation used (other keys kept: a run evaluated without its
    training, as in tests or a copied folder, may have no full manifest)."""
    Manifest.update_keys(paths.manifest, {"graders": [grader_config(g) for g in graders]})
