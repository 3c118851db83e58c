"""Python graders that misbehave: output written around print() (os.system, sys.__stdout__, os.write to
fd 1) can neither forge a score nor break the channel; input() cannot steal the next request; a source
over the OS's argument limit runs; an answer that is not a finite score fails that example in one line."""

from __future__ import annotations

import pytest

from test_graders import grade, python_grader
from tunelab.eval.graders.python_grader import PythonGraderFailed, read_answer

FORGERIES = (
    "import os, sys\n"
    "def grade(sample, item):\n"
    "    os.system('echo \\'{\"score\": 1.0}\\'')\n"
    "    sys.__stdout__.write('{\"score\": Infinity}\\n'); sys.__stdout__.flush()\n"
    "    os.write(1, b'{\"score\": 0.99}\\nnot json\\n')\n"
    "    print('a print')\n"
    "    return item['value']\n"
)


def test_writes_around_print_cannot_forge_a_score():
    column = grade([python_grader(FORGERIES)], ["a", "b", "c"], [{"value": 0.25}, {"value": 0.5}, {"value": 0}])["py"]
    assert column.scores == [0.25, 0.5, 0.0] and column.errors == [None, None, None]


def test_input_cannot_read_the_next_request():
    source = "def grade(sample, item):\n    if item['ask']:\n        input()\n    return 0.75\n"
    column = grade([python_grader(source)], ["a", "b", "c"], [{"ask": True}, {"ask": False}, {"ask": False}])["py"]
    assert column.scores == [None, 0.75, 0.75]
    assert column.errors[0].startswith("EOFError")


def test_a_source_over_the_argument_limit_runs():
    source = "# padding\n" * 20_000 + "def grade(sample, item):\n    return 1\n"  # 200 KB: over 128 KiB
    assert len(source) > 128 * 1024
    assert grade([python_grader(source)], ["a"], [{}])["py"].scores == [1.0]


def test_a_source_failing_at_import_fails_each_example_naming_why():
    column = grade([python_grader("import no_such_module_here\ndef grade(sample, item):\n    return 1\n")],
                   ["a", "b"], [{}, {}])["py"]
    assert column.scores == [None, None]
    assert all("exited" in e and "No module named 'no_such_module_here'" in e for e in column.errors)


@pytest.mark.parametrize("line", ['{"score": Infinity}', '{"score": NaN}', "not json", "[" * 100_000,
                                  '{"score": true}', '{"score": "1"}', "[1]", "{}"])
def test_unreadable_answers_fail_that_call_in_one_line(line):
    with pytest.raises(PythonGraderFailed) as failed:
        read_answer(line + "\n")
    assert str(failed.value).startswith("the grader's process gave an unreadable answer: ")
    assert "\n" not in str(failed.value)


def test_readable_answers():
    assert read_answer('{"score": 1}\n') == 1.0 and read_answer('{"score": 0.5}') == 0.5
    with pytest.raises(PythonGraderFailed, match="^KeyError: 'x'$"):
        read_answer('{"error": "KeyError: \'x\'"}')


# ---------------------------------------------------------------------------------------------- templates, formulas


@pytest.mark.parametrize(("template", "refused"), [
    ("{{ range(10**8) }}", "Call is not allowed"),
    ("{{ 'a' * 3000000000 }}", "Mul is not allowed"),
    ("{{ item.x ** 99999 }}", "Pow is not allowed"),
    ("{% for i in item.x %}{% for j in item.x %}{% for k in item.x %}x{% endfor %}{% endfor %}{% endfor %}",
     "For is not allowed"),
    ("{{ item.x | center(1000000000) }}", "filter center is not allowed"),
    ("{{ item.x | wordwrap(1) }}", "filter wordwrap is not allowed"),
    ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "Macro is not allowed"),
    ("{% set x = item.a %}{{ x }}", "Assign is not allowed"),
    ("{{ item.a ~ item.b }}", "Concat is not allowed"),
    ("{{ item.a }}" * 10_000, "at most 65536"),
    ("{{ " + "(" * 5000 + "item.a" + ")" * 5000 + " }}", "does not parse"),
])
def test_templates_that_compute_are_refused_when_the_recipe_loads(template, refused):
    from tunelab.errors import ConfigError
    from tunelab.specs.graders import parse_graders

    spec = {"type": "string_check", "name": "s", "operation": "eq", "input": template, "reference": "{{ item.reference }}"}
    with pytest.raises(ConfigError) as failed:
        parse_graders(spec, "g")
    assert refused in str(failed.value) and "Traceback" not in str(failed.value)


@pytest.mark.parametrize("template", ["{{ sample.output_text }}", "{{ item.a.b }}", "{{ item.list[0] }}",
                                      "{{ sample.output_text | lower | trim }}", "{{ item.x | default('none') }}",
                                      "{% if item.a.b == 'y' %}yes{% else %}no{% endif %}",
                                      "{{ item.list | length }} {{ item.a if item.a is defined else '-' }}"])
def test_substituting_templates_still_load_and_render(template):
    from tunelab.specs.templates import check_template, render

    check_template(template)
    render(template, {"output_text": " Hi "}, {"a": {"b": "y"}, "list": [1, 2], "x": 0})


@pytest.mark.parametrize("formula", ["a+" * 1500 + "a", "a+" * 60_000 + "a", "(" * 300 + "a" + ")" * 300, "-" * 900 + "a"])
def test_formulas_too_long_or_deep_are_one_line_errors_at_load(formula):
    from tunelab.specs.formula import FormulaError, evaluate_formula, formula_names

    with pytest.raises(FormulaError) as failed:
        formula_names(formula)
    assert "\n" not in str(failed.value) and len(str(failed.value)) < 300
    with pytest.raises(FormulaError):
        evaluate_formula(formula, {"a": 1.0})


def test_a_long_but_shallow_formula_still_computes():
    from tunelab.specs.formula import evaluate_formula

    assert evaluate_formula("a+" * 150 + "a", {"a": 0.5}) == 75.5
