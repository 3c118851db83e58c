"""eval/graders/evaluation.py: which metric the verdict is about, decided before any generation."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tunelab.errors import ConfigError
from tunelab.eval.graders.evaluation import Primary, choose_primary
from tunelab.eval.metrics import detect_output_kind
from tunelab.runs import RunPaths

JSON_KIND = detect_output_kind(['{"city": "Paris"}', '{"city": "Rome"}', '{"city": "Oslo"}'])
PATHS = RunPaths(root=Path("runs/x"))


def test_without_eval_primary_the_automatic_choice_stands():
    assert choose_primary(None, [], JSON_KIND, False, PATHS) == Primary(JSON_KIND.primary, False, None)


def test_eval_primary_names_a_grader_or_a_computed_metric():
    graders = [SimpleNamespace(name="voice")]
    assert choose_primary("voice", graders, JSON_KIND, False, PATHS) == Primary(
        "voice", True, "eval.primary: the verdict is about grader 'voice'")
    assert choose_primary("json_exact", graders, JSON_KIND, False, PATHS) == Primary(
        "json_exact", False, "eval.primary: the verdict is about built-in metric 'json_exact'")
    assert choose_primary("schema_valid", [], JSON_KIND, True, PATHS).name == "schema_valid"


def test_a_metric_not_computed_for_these_references_is_refused_with_the_choices():
    with pytest.raises(ConfigError) as err:
        choose_primary("schema_valid", [], JSON_KIND, False, PATHS)  # no eval.schema_file
    assert str(err.value) == (
        "runs/x/recipe.yaml: eval.primary: 'schema_valid' is not computed for these references (json output); "
        "choose a grader or one of exact_match, normalized_match, token_f1, rouge_l, json_valid, json_exact, "
        "json_field_accuracy")
