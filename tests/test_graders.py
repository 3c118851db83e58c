"""Graders: each type's scores on known strings, templates, multi's formula, python graders' timeout
and errors, recipe/file validation with file:line, and `tunelab grade` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.config import load_recipe
from tunelab.errors import ConfigError
from tunelab.eval.graders.grade import Grading
from tunelab.eval.graders.samples import make_sample
from tunelab.specs.formula import FormulaError, evaluate_formula, formula_names
from tunelab.specs.graders import parse_graders, read_graders_file
from tunelab.specs.templates import TemplateProblem, render

REPO = Path(__file__).resolve().parents[1]


def grade(graders: list[dict], outputs: list[str], items: list[dict]) -> dict:
    with Grading(parse_graders(graders, "test")) as grading:
        return grading.grade(outputs, items)


def string_check(operation: str) -> dict:
    return {"type": "string_check", "name": operation, "operation": operation,
            "input": "{{ sample.output_text }}", "reference": "{{ item.reference }}"}


# ---------------------------------------------------------------------------------------------- string_check


def test_string_check_operations_on_known_strings():
    outputs = ["Paris", "paris is nice", "Lyon"]
    items = [{"reference": "Paris"}] * 3
    columns = grade([string_check(op) for op in ("eq", "ne", "like", "ilike")], outputs, items)
    assert columns["eq"].scores == [1.0, 0.0, 0.0]
    assert columns["ne"].scores == [0.0, 1.0, 1.0]
    assert columns["like"].scores == [1.0, 0.0, 0.0]  # case-sensitive containment
    assert columns["ilike"].scores == [1.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------- text_similarity


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3",
                                    "rouge_4", "rouge_5", "rouge_l"])
def test_text_similarity_is_one_for_equal_zero_for_disjoint_and_between_for_overlap(metric):
    reference = "the parcel left our warehouse on monday morning"
    outputs = [reference, "the parcel left our warehouse on tuesday evening", "zzz qqq"]
    grader = {"type": "text_similarity", "name": metric, "evaluation_metric": metric, "pass_threshold": 0.99,
              "input": "{{ sample.output_text }}", "reference": "{{ item.reference }}"}
    same, close, far = grade([grader], outputs, [{"reference": reference}] * 3)[metric].scores
    assert same == pytest.approx(1.0, abs=0.01)
    assert far < 0.15
    assert far < close < same


def test_text_similarity_known_values():
    pair = ("the cat sat on a mat", "the cat sat on the mat")
    graders = [{"type": "text_similarity", "name": m, "evaluation_metric": m, "input": "{{ sample.output_text }}",
                "reference": "{{ item.reference }}"} for m in ("rouge_1", "rouge_2", "fuzzy_match")]
    columns = grade(graders, [pair[0]], [{"reference": pair[1]}])
    assert columns["rouge_1"].scores == [pytest.approx(5 / 6)]  # 5 of 6 unigrams shared both ways
    assert columns["rouge_2"].scores == [pytest.approx(3 / 5)]  # 3 of 5 bigrams
    assert columns["fuzzy_match"].scores == [pytest.approx(1 - 4 / 42)]  # Indel distance 4 over 42 characters


def test_cosine_without_an_embedding_model_is_refused_at_load():
    with pytest.raises(ConfigError, match="cosine needs an embedding model"):
        parse_graders({"type": "text_similarity", "name": "c", "evaluation_metric": "cosine", "input": "a",
                       "reference": "b"}, "g.json")


# ---------------------------------------------------------------------------------------------- templates


def test_templates_read_nested_item_paths_output_json_and_render_objects_as_json():
    sample = make_sample('Sure: {"ticket": {"priority": "high"}, "tags": ["a"]}')
    item = {"customer": {"tier": "gold", "ids": [7, 8]}, "items": 3}
    assert render("{{ sample.output_json.ticket.priority }}", sample, item) == "high"
    assert render("{{ item.customer.tier }}/{{ item.customer.ids[1] }}", sample, item) == "gold/8"
    assert render("{{ item.items }}", sample, item) == "3"  # a key named like a dict method is the key
    assert json.loads(render("{{ item.customer }}", sample, item)) == item["customer"]
    # what the model did not produce renders empty; what the data lacks is an error naming the key
    assert render("[{{ sample.output_json.missing }}]", make_sample("no json here"), item) == "[]"
    with pytest.raises(TemplateProblem, match=r"item.customer has no key 'tire' \(keys: ids, tier\)"):
        render("{{ item.customer.tire }}", sample, item)


def test_templates_are_sandboxed():
    with pytest.raises(TemplateProblem):
        render("{{ item.__class__.__mro__[1].__subclasses__() }}", make_sample("x"), {})


def test_a_missing_item_key_fails_that_example_with_the_graders_name_not_a_zero():
    grader = {"type": "string_check", "name": "city", "operation": "eq", "input": "{{ sample.output_text }}",
              "reference": "{{ item.city }}"}
    column = grade([grader], ["Rome", "Rome"], [{"city": "Rome"}, {"town": "Rome"}])["city"]
    assert column.scores == [1.0, None]
    assert column.failed == 1 and "has no key 'city'" in column.errors[1]


# ---------------------------------------------------------------------------------------------- multi


def test_multi_combines_its_graders_by_the_formula():
    multi = {"type": "multi", "name": "combo", "calculate_output": "0.25 * exact + 0.75 * max(inside, 0) ^ 2",
             "graders": {"exact": string_check("eq"), "inside": string_check("ilike")}}
    column = grade([multi], ["Paris", "in paris", "Lyon"], [{"reference": "Paris"}] * 3)["combo"]
    assert column.scores == [1.0, 0.75, 0.0]


def test_multi_takes_openai_list_form_and_refuses_unknown_names():
    as_list = {"type": "multi", "name": "m", "calculate_output": "(eq + ilike) / 2",
               "graders": [string_check("eq"), string_check("ilike")]}
    assert sorted(parse_graders(as_list, "g")[0].graders) == ["eq", "ilike"]
    with pytest.raises(ConfigError, match=r"calculate_output names \['nope'\]"):
        parse_graders({**as_list, "calculate_output": "eq + nope"}, "g")


@pytest.mark.parametrize("formula", ["__import__('os').system('true')", "a.__class__", "a[0]", "open('x')",
                                     "lambda: 1", "a if a else a", "'text'", "a < 1"])
def test_unsafe_formulas_are_refused(formula):
    with pytest.raises(FormulaError):
        formula_names(formula)
    with pytest.raises(FormulaError):
        evaluate_formula(formula, {"a": 1.0})


def test_formula_arithmetic():
    scores = {"a": 0.5, "b": 0.25}
    assert evaluate_formula("a + b * 2", scores) == 1.0
    assert evaluate_formula("a ^ 2", scores) == 0.25  # ^ is power, as in OpenAI's formulas
    assert evaluate_formula("min(a, b) + abs(-1) + floor(1.7) + sqrt(4)", scores) == 4.25
    assert formula_names("min(a, b) + log(c)") == {"a", "b", "c"}
    with pytest.raises(FormulaError, match="failed"):
        evaluate_formula("a / (b - 0.25)", scores)


# ---------------------------------------------------------------------------------------------- python


def python_grader(source: str, **extra) -> dict:
    return {"type": "python", "name": "py", "source": source, **extra}


def test_python_grader_partial_credit_and_per_example_errors():
    source = (
        "def grade(sample, item):\n"
        "    text = sample['output_text']\n"
        "    print('graders may print')\n"
        "    rules = [text.startswith('Hi'), text.endswith('Bye'), len(text) <= item['max_chars']]\n"
        "    return sum(rules) / len(rules)\n"
    )
    column = grade([python_grader(source)], ["Hi there. Bye", "Hi there, this is long. Bye", "Yo", "Hi"],
                   [{"max_chars": 14}, {"max_chars": 14}, {"max_chars": 5}, {}])["py"]
    assert column.scores[:3] == [1.0, pytest.approx(2 / 3), pytest.approx(1 / 3)]
    assert column.scores[3] is None and column.errors[3] == "KeyError: 'max_chars'"


def test_python_grader_timeout_fails_that_call_and_the_next_call_works():
    source = "import time\ndef grade(sample, item):\n    time.sleep(item['sleep_s'])\n    return 0.5\n"
    column = grade([python_grader(source, timeout_s=0.5)], ["a", "b"], [{"sleep_s": 30}, {"sleep_s": 0}])["py"]
    assert column.scores == [None, 0.5]
    assert "did not return within timeout_s 0.5 s" in column.errors[0]


def test_python_grader_bad_return_values_are_errors_not_zeros():
    source = "def grade(sample, item):\n    return item['value']\n"
    column = grade([python_grader(source)], ["x"] * 3, [{"value": "1"}, {"value": float("nan")}, {"value": 1}])["py"]
    assert column.scores == [None, None, 1.0]
    assert "returned str, expected a number" in column.errors[0]


def test_python_source_is_checked_at_load():
    with pytest.raises(ConfigError, match="must define a function grade"):
        parse_graders(python_grader("def score(sample, item):\n    return 1\n"), "g")
    with pytest.raises(ConfigError, match="not valid Python"):
        parse_graders(python_grader("def grade(sample, item)\n    return 1\n"), "g")


# ---------------------------------------------------------------------------------------------- recipes and files


def test_recipe_errors_name_file_line_and_field(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: x\n"
        "eval:\n"
        "  graders:\n"
        "    - {type: string_check, name: a, input: x, reference: y, operation: eq}\n"
        "    - type: python\n"
        "      name: b\n"
        "    - type: magic\n"
        "      name: c\n"
    )
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{recipe}:5: eval.graders.1.source: Field required")
    assert lines[1].startswith(f"{recipe}:7: eval.graders.2:") and "'magic'" in lines[1]


def test_unknown_primary_and_duplicate_names_are_refused_at_load(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("eval:\n  graders:\n    - {type: string_check, name: voice, input: x, reference: y, "
                      "operation: eq}\n  primary: voise\n")
    with pytest.raises(ConfigError, match=rf"{recipe}:4: eval.primary: 'voise' is neither.*did you mean 'voice'"):
        load_recipe(recipe)
    assert load_recipe(recipe, ["eval.primary=voice"]).eval.primary == "voice"
    assert load_recipe(recipe, ["eval.primary=token_f1"]).eval.primary == "token_f1"  # a built-in metric
    with pytest.raises(ConfigError, match="built-in metric's name"):
        load_recipe(recipe, ["eval.graders=[{type: string_check, name: token_f1, input: x, reference: y, operation: eq}]"])


def test_an_openai_grader_json_pastes_in_unchanged(tmp_path):
    openai_grader = {  # as OpenAI's graders guide writes a score_model grader
        "type": "score_model", "name": "my_score_model", "model": "o4-mini-2025-04-16",
        "input": [{"role": "system", "content": "You are an expert grader."},
                  {"role": "user", "content": [{"type": "input_text", "text": "Reference: {{ item.reference }}. "
                                                "Model answer: {{ sample.output_text }}"}]}],
        "range": [0, 1], "sampling_params": {"seed": 42, "temperature": 1, "max_completions_tokens": 32768},
        "pass_threshold": 0.5,
    }
    (tmp_path / "graders.json").write_text(json.dumps(openai_grader, indent=2))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("eval:\n  graders_file: graders.json\n  primary: my_score_model\n")
    loaded = load_recipe(recipe)
    assert Path(loaded.eval.graders_file) == tmp_path / "graders.json"
    (grader,) = read_graders_file(loaded.eval.graders_file)
    assert grader.base_url == "https://api.openai.com/v1" and grader.key_env == "OPENAI_API_KEY"
    assert grader.input[1].text.startswith("Reference: {{ item.reference }}")


def test_a_graders_file_error_names_its_line(tmp_path):
    path = tmp_path / "graders.json"
    path.write_text('[\n  {"type": "label_model", "name": "tone", "model": "m",\n   "input": [{"role": "user", '
                    '"content": "x"}],\n   "labels": ["polite", "rude"],\n   "passing_labels": ["kind"]}\n]\n')
    with pytest.raises(ConfigError, match=rf"^{path}:2: graders\[0\]: .*passing_labels \['kind'\] are not in labels"):
        read_graders_file(path)


# ---------------------------------------------------------------------------------------------- tunelab grade


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_grade_command_end_to_end(tmp_path):
    graders = tmp_path / "graders.yaml"
    graders.write_text(
        "- {type: string_check, name: exact, operation: eq, input: '{{ sample.output_text }}', "
        "reference: '{{ item.reference }}'}\n"
        "- type: python\n"
        "  name: polite\n"
        "  source: |\n"
        "    def grade(sample, item):\n"
        "        return float('please' in sample['output_text'].lower()) * item['weight']\n"
    )
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in [
        {"sample": {"output_text": "Yes"}, "item": {"reference": "Yes", "weight": 1}},
        {"sample": {"output_text": "Please wait"}, "item": {"reference": "Yes", "weight": 0.5}},
        {"sample": {"output_text": "please"}, "item": {"reference": "please"}},
    ]))
    done = run_cli("grade", str(graders), str(samples))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["scores"] for line in lines] == [{"exact": 1.0, "polite": 0.0}, {"exact": 0.0, "polite": 0.5},
                                                  {"exact": 1.0, "polite": None}]
    assert lines[2]["errors"] == {"polite": "KeyError: 'weight'"}
    assert "polite (python): mean 0.250 over 2 samples, 1 failed" in done.stderr

    samples.write_text('{"sample": {"output_text": "ok"}}\n{"sample": {"text": "no"}}\n')
    bad = run_cli("grade", str(graders), str(samples))
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [f'error: {samples}:2: sample.output_text: expected {{"sample": '
                                               '{"output_text": "..."}, "item": {...}}']


def test_every_grader_example_in_the_docs_loads():
    import re

    import yaml

    text = (REPO / "docs" / "graders.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL) if b.startswith("- type:")]
    assert len(blocks) == 6  # one per grader type
    types = {parse_graders(yaml.safe_load(block), "docs/graders.md")[0].type for block in blocks}
    assert types == {"string_check", "text_similarity", "python", "score_model", "label_model", "multi"}
    recipe_block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL) if b.startswith("eval:"))
    section = yaml.safe_load(recipe_block)["eval"]
    assert parse_graders(section["graders"], "docs")[0].name == section["primary"]


def test_human_labels_file_errors_name_the_line(tmp_path):
    from tunelab.eval.graders.human import read_human_labels

    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "test-1", "score": 1}\n{"id": "test-2", "arm": "rag", "score": 0.5}\n')
    assert read_human_labels(path) == {("test-1", "tuned"): 1.0, ("test-2", "rag"): 0.5}
    path.write_text('{"id": "test-1", "score": 1}\n\n{"id": "test-2", "score": "high"}\n')
    with pytest.raises(ConfigError, match=rf'^{path}:3: expected {{"id": ..., "score": number'):
        read_human_labels(path)


def test_template_typos_are_refused_at_load():
    grader = {**string_check("eq"), "reference": "{{ itme.reference }}"}
    with pytest.raises(ConfigError, match=r"graders\[0\]\.reference: .*uses itme; templates read only sample and item"):
        parse_graders(grader, "g")
    with pytest.raises(ConfigError, match="does not parse"):
        parse_graders({**string_check("eq"), "input": "{{ sample.output_text "}, "g")
    judge = {"type": "score_model", "name": "j", "model": "m", "input": [{"role": "user", "content": "{{ sample_a.x }}"}]}
    with pytest.raises(ConfigError, match="uses sample_a"):
        parse_graders(judge, "g")


def test_a_pasted_key_in_api_key_env_is_refused_without_echoing_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("eval:\n  graders:\n    - type: label_model\n      name: tone\n      model: m\n"
                      "      api_key_env: sk-proj-abc123secret\n      labels: [a, b]\n      passing_labels: [a]\n"
                      "      input: [{role: user, content: x}]\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert "the NAME of an environment variable" in str(err.value) and "abc123secret" not in str(err.value)
    assert str(err.value).startswith(f"{recipe}:3: eval.graders.0:")


def test_a_run_recipe_with_graders_reloads_unchanged(tmp_path):
    import re

    import yaml

    docs = (REPO / "docs" / "graders.md").read_text()
    graders = [yaml.safe_load(b)[0] for b in re.findall(r"```yaml\n(.*?)```", docs, re.DOTALL) if b.startswith("- type:")]
    recipe = load_recipe(None, [f"eval.graders={json.dumps(graders)}", "eval.primary=overall"])
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())  # what a run directory keeps
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again.eval.graders == recipe.eval.graders and again.eval.primary == "overall"
    assert len(again.eval.graders) == 6
