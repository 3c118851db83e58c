"""The record rules and the readers: every code at its line, every format and file type, fuzzing."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.check import check_data
from tunelab.data.formats import RawRecord
from tunelab.data.validate import CODES, read_examples, validate_record

FIXTURES = Path(__file__).parent / "fixtures" / "data"
DEFECTS = FIXTURES / "defects.jsonl"

# line -> the one code expected there (tests/fixtures/data/generate.py writes the file)
EXPECTED = {
    2: "invalid_json", 3: "invalid_utf8", 4: "not_an_object", 5: "missing_messages", 6: "messages_not_a_list",
    8: "unknown_role", 9: "missing_content", 10: "content_not_string", 11: "no_assistant_message",
    12: "empty_assistant", 13: "bad_role_order", 14: "unknown_format", 16: "message_not_an_object",
    17: "bad_weight", 18: "bad_name", 19: "bad_tool_call", 20: "last_not_assistant", 21: "zero_trainable_tokens",
}
EXPECTED_WITH_TOKENS = {**EXPECTED, 22: "too_long", 25: "tools_unsupported"}
VALID_LINES = {1, 7, 15, 24, 26}


def _by_line(issues):
    found: dict[int, list[str]] = {}
    for issue in issues:
        assert issue.path == str(DEFECTS)
        found.setdefault(issue.line, []).append(issue.code)
    return found


def test_each_defect_gives_exactly_its_code_at_its_line_structure_only():
    report = check_data(DEFECTS)
    assert _by_line(report.issues) == {line: [code] for line, code in EXPECTED.items()}
    assert report.records == 25  # the blank line 23 is not a record
    assert report.exit_code == 1


def test_each_defect_gives_exactly_its_code_at_its_line_with_tokens(tokenizer):
    report = check_data(DEFECTS, tokenizer=tokenizer, max_seq_len=64)
    assert _by_line(report.issues) == {line: [code] for line, code in EXPECTED_WITH_TOKENS.items()}
    assert not VALID_LINES & {issue.line for issue in report.issues}
    assert report.tokens is not None and report.quality["too_long"] == 1


def test_every_code_has_a_severity_and_issue_lines_read_path_line_code():
    assert all(severity in ("error", "warning") for severity, _ in CODES.values())
    report = check_data(DEFECTS)
    first = report.issues[0]
    assert first.format() == f"{DEFECTS}:2: invalid_json: {first.message}"
    assert {i.severity for i in report.issues if i.code == "last_not_assistant"} == {"warning"}
    assert {i.severity for i in report.issues if i.code == "invalid_json"} == {"error"}


def test_messages_quote_only_a_short_excerpt(tmp_path):
    secret = "my-secret-" + "x" * 500
    path = tmp_path / "private.jsonl"
    path.write_text(json.dumps({"messages": [{"role": secret, "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    [issue] = check_data(path).issues
    assert issue.code == "unknown_role" and "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" not in issue.message
    assert len(issue.message) < 120


def test_empty_and_missing_files(tmp_path):
    [issue] = check_data(FIXTURES / "empty.jsonl").issues
    assert (issue.code, issue.line) == ("empty_file", 0)
    [issue] = check_data(tmp_path / "nope.jsonl").issues
    assert issue.code == "unreadable_file"


# ---------------------------------------------------------------------------------------------- formats


def _examples(path, fmt="auto"):
    return list(read_examples(path, fmt))


def test_format_is_detected_per_record_not_from_the_first(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"instruction": "Plural of mouse?", "input": "", "output": "mice"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "weight": 0},
                           {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}], "system": "Be kind."},
        {"prompt": "2+2?", "completion": "4"},
        {"instruction": "Translate", "input": "cat", "output": "chat", "system": "You translate to French."},
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = _examples(path)
    assert [e.format for e, _ in results] == ["alpaca", "openai", "sharegpt", "prompt_completion", "alpaca", "prompt_completion"]
    assert results[0][0].messages == [{"role": "user", "content": "Plural of mouse?"}, {"role": "assistant", "content": "mice"}]
    assert results[2][0].messages == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "weight": 0}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
    ]
    assert results[4][0].messages[:2] == [{"role": "system", "content": "You translate to French."},
                                          {"role": "user", "content": "Translate\n\ncat"}]
    assert [e.line for e, _ in results] == [1, 2, 3, 4, 5, 6]


def test_forced_format_reports_missing_fields(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    [(example, issues), (bad, bad_issues)] = _examples(path, "alpaca")
    assert example is not None and not issues
    assert bad is None and [(i.code, i.line) for i in bad_issues] == [("missing_content", 2)]
    [(none, issues), _] = _examples(path, "openai")
    assert none is None and [i.code for i in issues] == ["missing_messages"]


def test_openai_fields_name_weight_tools_and_content_parts(tmp_path):
    path = tmp_path / "openai.jsonl"
    record = {"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "5 C"},
        {"role": "assistant", "content": "5 C.", "weight": 1},
    ]}
    path.write_text(json.dumps(record) + "\n")
    [(example, issues)] = _examples(path)
    assert not issues
    assert example.messages[0] == {"role": "system", "content": "Be brief."}
    assert example.messages[1] == {"role": "user", "content": "Weather in Oslo?", "name": "ann"}
    assert example.messages[2]["tool_calls"][0]["function"]["name"] == "w" and example.messages[2]["content"] == ""
    assert example.messages[3] == {"role": "tool", "content": "5 C", "tool_call_id": "1"}
    assert example.messages[4]["weight"] == 1


def test_json_array_csv_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (folder / "a.json").write_text("[\n  " + json.dumps({"messages": conversation}) + ',\n\n  {"messages": 5}\n]\n')
    (folder / "b.csv").write_text('instruction,input,output\n"Say ""hi""",,hi\n"multi\nline",,x\n,,\n')
    (folder / "c.csv").write_text("messages\n" + '"' + json.dumps(conversation).replace('"', '""') + '"\n')
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}, {"prompt": "p2", "completion": None}]), folder / "d.parquet")
    (folder / "notes.txt").write_text("not data")
    (folder / ".hidden.jsonl").write_text("garbage\n")
    results = _examples(folder)
    where = [(Path(i.path).name, i.line, i.code) for _, issues in results for i in issues]
    assert where == [
        (".hidden.jsonl", 0, "skipped_file"),  # skipped, and said so
        ("notes.txt", 0, "skipped_file"),
        ("a.json", 4, "messages_not_a_list"),
        ("d.parquet", 2, "missing_content"),
    ]
    good = [(Path(e.path).name, e.line, e.format) for e, _ in results if e is not None]
    assert good == [("a.json", 2, "openai"), ("b.csv", 2, "alpaca"), ("b.csv", 3, "alpaca"), ("c.csv", 2, "openai"),
                    ("d.parquet", 1, "prompt_completion")]
    csv_example = next(e for e, _ in results if e is not None and e.line == 2 and e.path.endswith("b.csv"))
    assert csv_example.messages[0]["content"] == 'Say "hi"'


def test_json_array_errors_name_their_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"messages": []},\n {"messages": [}\n]')
    results = _examples(path)
    assert [(i.line, i.code) for _, issues in results for i in issues] == [(2, "no_assistant_message"), (3, "invalid_json")]


def test_bom_crlf_and_lone_surrogates(tmp_path):
    path = tmp_path / "bom.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n" + b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}\r\n')
    results = _examples(path)
    assert results[0][0] is not None and not results[0][1]
    assert [(i.line, i.code) for i in results[1][1]] == [(2, "invalid_utf8")]


def test_system_prompt_is_added_only_where_missing(tmp_path):
    path = tmp_path / "s.jsonl"
    with_system = [{"role": "system", "content": "Own."}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path.write_text(json.dumps({"messages": with_system[1:]}) + "\n" + json.dumps({"messages": with_system}) + "\n")
    [(first, _), (second, _)] = list(read_examples(path, system_prompt="Recipe."))
    assert first.messages[0] == {"role": "system", "content": "Recipe."}
    assert second.messages[0] == {"role": "system", "content": "Own."}


def test_reading_jsonl_streams_memory_does_not_grow_with_the_file(tmp_path):
    line = json.dumps({"messages": [{"role": "user", "content": "q " * 50}, {"role": "assistant", "content": "a " * 50}]}) + "\n"

    def peak_bytes(lines: int) -> int:
        path = tmp_path / f"f{lines}.jsonl"
        path.write_text(line * lines)
        tracemalloc.start()
        count = sum(1 for example, _ in read_examples(path) if example is not None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == lines
        return peak

    small, large = peak_bytes(1_000), peak_bytes(20_000)  # 20x the data
    assert large < small * 1.5 + 50_000, (small, large)


# ---------------------------------------------------------------------------------------------- fuzz

_keys = st.sampled_from(["messages", "conversations", "role", "content", "from", "value", "instruction", "input", "output",
                         "prompt", "completion", "weight", "name", "tool_calls", "function", "arguments", "system", "type", "text"])
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8) | st.sampled_from(
    ["user", "assistant", "system", "tool", "human", "gpt", "developer", "text"])
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys | st.text(max_size=4), inner, max_size=5),
                     max_leaves=25)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_json, fmt=st.sampled_from(["auto", "openai", "sharegpt", "alpaca", "prompt_completion"]))
def test_validator_never_raises_on_any_json(value, fmt):
    example, issues = validate_record(RawRecord("f.jsonl", 1, value), fmt)
    assert (example is None) == any(i.severity == "error" for i in issues)
    assert all(i.code in CODES and i.line == 1 for i in issues)
    if example is not None:
        assert all(isinstance(m["content"], str) for m in example.messages)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=st.lists(st.binary(max_size=60) | _json.map(lambda v: json.dumps(v).encode()), max_size=8),
       suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_readers_never_raise_on_random_bytes(tmp_path_factory, lines, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"f{suffix}"
    path.write_bytes(b"\n".join(lines))
    for example, issues in read_examples(path):
        assert example is not None or issues
        assert all(i.code in CODES for i in issues)


@pytest.mark.parametrize("fmt", ["openai", "sharegpt", "alpaca", "prompt_completion"])
def test_forced_formats_accept_their_own_records(tmp_path, fmt):
    record = {
        "openai": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "alpaca": {"instruction": "q", "output": "a"},
        "prompt_completion": {"prompt": "q", "completion": "a"},
    }[fmt]
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(record) + "\n")
    [(example, issues)] = _examples(path, fmt)
    assert not issues and [m["content"] for m in example.messages] == ["q", "a"]


def test_a_corrupt_parquet_file_is_unreadable_not_a_crash(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    [issue] = check_data(path).issues
    assert issue.code == "unreadable_file" and "Parquet" in issue.message


def test_training_estimate_counts_only_examples_prepare_would_train(tokenizer):
    from tunelab.data.tokenize import tokenize_conversation

    report = check_data(DEFECTS, model="tiny-test", max_seq_len=64, epochs=2, gpu_price_per_hour=3.0)
    trained_lines = {1, 7, 15, 20, 24, 26}  # valid, fit in 64 tokens, have a trained token (21: weight 0, 22: too long)
    expected = sum(len(tokenize_conversation(tokenizer, e.messages).input_ids)
                   for e, _ in read_examples(DEFECTS) if e is not None and e.line in trained_lines)
    estimate = report.estimate
    assert estimate.train_tokens == int(expected * 0.8)  # 10% valid + 10% test split off by prepare
    assert abs(estimate.seconds - 2 * estimate.train_tokens / estimate.tokens_per_s) < 1e-9
    assert abs(estimate.cost_usd - estimate.seconds / 3600 * 3.0) < 1e-12
