"""Data files under stress: a record over the size limit is one file:line error and the records
around it are still read, with memory bounded by the limit, not by the line; an endless device is
refused; every entry of a data folder that is not read (dangling or looping links, hidden files,
links to folders already read, pipes) is named with its reason, and linked folders are read."""

import json
import os
import tracemalloc

import pytest

from tunelab.data.check import check_data
from tunelab.data.formats import MAX_RECORD_BYTES
from tunelab.data.validate import read_examples


def chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}


def issues_by_code(path):
    return {(issue.code, os.path.basename(issue.path), issue.line) for issue in check_data(path).issues}


def test_an_oversized_jsonl_line_is_one_error_and_memory_stays_bounded(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [chat("first"), chat("x" * (16 * MAX_RECORD_BYTES)), chat("third")]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    tracemalloc.start()
    results = list(read_examples(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [e.line for e, _ in results if e is not None] == [1, 3]
    [(_, [issue])] = [r for r in results if r[0] is None]
    assert (issue.code, issue.line) == ("record_too_large", 2)
    assert f"{16 * MAX_RECORD_BYTES + len(json.dumps(chat(''))):,} bytes" in issue.message
    assert peak < 8 * MAX_RECORD_BYTES  # the 16x line is never held whole (reading holds ~4 pieces)


def test_oversized_json_array_elements_and_csv_cells_are_errors_at_their_line(tmp_path):
    array = tmp_path / "a.json"
    array.write_text("[\n" + json.dumps(chat("ok")) + ",\n" + json.dumps(chat("y" * (MAX_RECORD_BYTES + 1))) + "\n]\n")
    table = tmp_path / "t.csv"
    table.write_text("prompt,completion\nhi,there\n" + "z" * (MAX_RECORD_BYTES + 10) + ",x\n")
    assert ("record_too_large", "a.json", 3) in issues_by_code(array)
    assert ("record_too_large", "t.csv", 3) in issues_by_code(table)
    assert check_data(array).examples == 1 and check_data(table).examples == 1


def test_a_path_to_an_endless_device_is_refused(tmp_path):
    link = tmp_path / "train.jsonl"
    link.symlink_to("/dev/zero")
    report = check_data(link)
    [issue] = report.issues
    assert issue.code == "unreadable_file" and "not a regular file" in issue.message and report.exit_code == 1


def test_every_entry_of_a_data_folder_that_is_not_read_is_named(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "more.jsonl").write_text(json.dumps(chat("linked folder")) + "\n")
    (data / "a.jsonl").write_text(json.dumps(chat("plain")) + "\n")
    (data / ".hidden.jsonl").write_text(json.dumps(chat("hidden")) + "\n")
    (data / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    (data / "loop.jsonl").symlink_to(data / "loop.jsonl")
    (data / "linked").symlink_to(tmp_path / "elsewhere")
    (data / "sub" / "up").symlink_to(data)
    os.mkfifo(data / "pipe.jsonl")
    report = check_data(data)
    found = {(issue.code, os.path.relpath(issue.path, data), issue.message.split(";")[0]) for issue in report.issues}
    assert found == {
        ("skipped_file", ".hidden.jsonl", "hidden"),
        ("unreadable_file", "dangling.jsonl", "a symbolic link to nothing"),
        ("unreadable_file", "loop.jsonl", "a symbolic link that loops"),
        ("unreadable_file", "pipe.jsonl", "not a regular file (a device, pipe or socket)"),
        ("skipped_file", "sub/up", f"links to a folder already read ({os.path.realpath(data)})"),
    }
    assert report.examples == 2  # a.jsonl and the linked folder's more.jsonl


@pytest.mark.parametrize("size", [MAX_RECORD_BYTES - 200])
def test_a_record_just_under_the_limit_is_read(tmp_path, size):
    path = tmp_path / "edge.jsonl"
    path.write_text(json.dumps(chat("w" * size)) + "\n")
    [(example, issues)] = list(read_examples(path))
    assert example is not None and not [i for i in issues if i.code == "record_too_large"]


def test_near_duplicate_detection_memory_does_not_grow_with_the_file_of_long_records(tmp_path):
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    path = tmp_path / "long.jsonl"
    base = " ".join(rng.choices(words, k=36_000))  # ~200 KB a record
    with path.open("w") as f:
        for i in range(60):
            f.write(json.dumps(chat(f"{i} " + base[i * 7 :])) + "\n")  # near-duplicates of each other
    size = path.stat().st_size
    tracemalloc.start()
    report = check_data(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert report.quality["near_duplicates"] > 0
    # signatures are computed in batches of ~2 MiB of text (~57 bytes of memory per byte while they
    # run), not of 512 records: the whole 12 MB file in one batch peaks near 650 MB
    assert size > 11 << 20 and peak < 200 << 20, (peak, size)


def test_an_oversized_parquet_row_is_an_error_at_its_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p" * (MAX_RECORD_BYTES + 1), "completion": "c2"},
            {"prompt": "p3", "completion": "c3"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = check_data(path)
    assert [(i.code, i.line) for i in report.issues if i.code == "record_too_large"] == [("record_too_large", 2)]
    assert report.examples == 2


def test_generate_inputs_use_the_bounded_reader(tmp_path):
    from tunelab.errors import DataError
    from tunelab.use.chat import read_generation_inputs

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(json.dumps({"prompt": "ok"}).encode() + b"\n" + b'{"prompt": "\xff"}\n'
                     + json.dumps({"prompt": "x" * (2 * MAX_RECORD_BYTES)}).encode() + b"\n" + b"[" * 5000 + b"\n")
    with pytest.raises(DataError) as err:
        read_generation_inputs(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 3 bad line(s); nothing generated"
    assert lines[1].startswith(f"{path}:2: not UTF-8") and lines[2].startswith(f"{path}:3: the record is")
    assert lines[3].startswith(f"{path}:4: not valid JSON")
