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
