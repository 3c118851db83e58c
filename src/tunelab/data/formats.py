"""Read training examples from files and turn each record into an OpenAI-shaped message list.

Reads JSONL (streamed line by line: memory does not grow with file size; parsed by orjson when it
is installed, ~3x faster than json, else by json, with the same records), JSON (an array of records,
read whole; use JSONL for large data), CSV and Parquet (streamed in row batches), or a folder of
these (recursive, sorted, hidden files skipped). Writes nothing; never modifies the input.

Record formats, detected per record (never from the first record alone) unless forced:
  openai             {"messages": [{"role", "content", "name"?, "weight"?, "tool_calls"?, "tool_call_id"?}]}
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}], "system"?}
  alpaca             {"instruction", "input"?, "output", "system"?}
  prompt_completion  {"prompt", "completion"} (strings, or lists of messages as in TRL)

Public API:
  FORMATS, DATA_SUFFIXES
  RawRecord(path, line, value, problem)      one record as read; `problem` is (code, message) when it
                                             could not be parsed at all (invalid_json, invalid_utf8, ...)
  data_files(path) -> (files, skipped)       the data files of a file or folder
  iter_file(path, jsonl=False)               every record of one file, with its 1-based line (JSON:
                                             the line where the element starts; CSV: the line where
                                             the row starts; Parquet: the 1-based row number)
  detect_format(value) -> str | None
  to_draft(value, fmt) -> Draft               the record's messages, not yet validated (validate.py)
"""

from __future__ import annotations

import csv
import difflib
import errno
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tunelab.files import AtomicTextFile

FORMATS = ("openai", "sharegpt", "alpaca", "prompt_completion")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_PARQUET_BATCH_ROWS = 4096
# One record (a JSONL line, a JSON array element, a CSV row) is at most this many bytes: ~64k
# tokens of English, more than the longest context tunelab trains at. Tokenizing holds ~400 bytes
# per record byte (a 1 MiB record peaked near 1 GB): this bounds it to ~100 MB.
MAX_RECORD_BYTES = 256 << 10
_CSV_MAX_CELL_BYTES = MAX_RECORD_BYTES + 1  # the csv module refuses a longer cell (reported by row)
MAX_JSON_ARRAY_BYTES = 64 << 20  # a JSON array file is parsed whole (JSONL streams)
_BOM = b"\xef\xbb\xbf"

# ShareGPT speaker names seen in public datasets -> chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant",
    "tool": "tool", "observation": "tool", "function_response": "tool",
}


@dataclass(slots=True)  # not frozen: a frozen dataclass is ~3x slower to create, per line
class RawRecord:
    path: str
    line: int
    value: Any = None
    problem: tuple[str, str] | None = None  # (code, message) when the record could not be parsed


# ---------------------------------------------------------------------------------------------- files


@dataclass(frozen=True, slots=True)
class Skipped:
    """An entry of a data folder that is not read, and why: nothing is left out without a word."""

    path: Path
    code: str  # skipped_file (a warning) | unreadable_file (an error: data the user meant is missing)
    reason: str


def data_files(path: Path) -> tuple[list[Path], list[Skipped]]:
    """(data files, skipped entries) of a folder, recursive and sorted, following symbolic links to
    files and folders (a folder reached twice, as by a link that loops, is read once); a file is its
    own list. Hidden entries are skipped, and named; so are links to nothing and non-regular files."""
    if not path.is_dir():
        return [path], []
    files: list[Path] = []
    skipped: list[Skipped] = []
    seen_folders = {os.path.realpath(path)}
    pending = [path]
    while pending:
        folder = pending.pop()
        try:
            entries = sorted(folder.iterdir())
        except OSError as err:
            skipped.append(Skipped(folder, "unreadable_file", f"folder cannot be listed ({err.strerror or err}); skipped"))
            continue
        folders = []
        for entry in entries:
            if entry.name.startswith("."):
                skipped.append(Skipped(entry, "skipped_file", "hidden; skipped"))
                continue
            try:
                mode = entry.stat().st_mode  # follows links
            except OSError as err:
                why = "a symbolic link that loops" if err.errno == errno.ELOOP else (
                    "a symbolic link to nothing" if entry.is_symlink() else f"cannot be read ({err.strerror})")
                skipped.append(Skipped(entry, "unreadable_file", f"{why}; skipped"))
                continue
            if stat.S_ISDIR(mode):
                real = os.path.realpath(entry)
                if real in seen_folders:
                    skipped.append(Skipped(entry, "skipped_file", f"links to a folder already read ({real}); skipped"))
                    continue
                seen_folders.add(real)
                folders.append(entry)
            elif not stat.S_ISREG(mode):
                skipped.append(Skipped(entry, "unreadable_file", "not a regular file (a device, pipe or socket); skipped"))
            elif entry.suffix.lower() in DATA_SUFFIXES:
                files.append(entry)
            else:
                skipped.append(Skipped(entry, "skipped_file", "not a .jsonl/.json/.csv/.parquet file; skipped"))
        pending.extend(reversed(folders))
    files.sort()
    skipped.sort(key=lambda s: s.path)
    return files, skipped


def iter_file(path: Path, jsonl: bool = False) -> Iterator[RawRecord]:
    """Every record of one data file (nothing for an empty file), read by its suffix, or as JSONL
    whatever its name with `jsonl`; a file that cannot be read yields one record with problem
    `unreadable_file`."""
    name = str(path)
    suffix = ".jsonl" if jsonl else path.suffix.lower()
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # /dev/zero, a pipe: endless or unrepeatable input
            yield RawRecord(name, 0, problem=("unreadable_file", "not a regular file (a device, pipe or socket); "
                                              "give a file"))
            return
        if suffix == ".parquet":
            yield from _iter_parquet(path, name)
        elif suffix == ".csv":
            yield from _iter_csv(path, name)
        elif suffix == ".json" and _first_byte(path) == b"[":
            yield from _iter_json_array(path, name)
        else:  # .jsonl, a .json holding one object per line, or a file named by the user
            yield from _iter_jsonl(path, name)
    except OSError as err:
        yield RawRecord(name, 0, problem=("unreadable_file", f"cannot read ({err.strerror or err})"))


def _first_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(4096)
    head = head.removeprefix(_BOM).lstrip()
    return head[:1]


try:  # orjson parses ~3x faster than json (the largest cost of checking a big JSONL file)
    from orjson import loads as _loads
except ImportError:  # json gives the same records, more slowly
    _loads = json.loads


def _too_large(size: int) -> tuple[str, str]:
    return ("record_too_large", f"the record is {size:,} bytes; at most {MAX_RECORD_BYTES:,} are read "
                                "(split it, or shorten it: it is far longer than any context)")


def _iter_jsonl(path: Path, name: str) -> Iterator[RawRecord]:
    loads = _loads
    with path.open("rb") as f:
        # a line longer than the limit is never held whole: it is skipped in bounded pieces
        for line_number, raw in enumerate(iter(partial(f.readline, MAX_RECORD_BYTES + 1), b""), 1):
            if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_RECORD_BYTES)
                    size += len(raw)
                yield RawRecord(name, line_number, problem=_too_large(size - raw.endswith(b"\n")))
                continue
            if line_number == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            if raw.isspace():
                continue  # blank lines (often a trailing one) are not records
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield RawRecord(name, line_number, problem=("invalid_utf8", f"not UTF-8 (byte {err.start + 1})"))
                continue
            try:
                value = loads(text)
            except RecursionError:  # json (without orjson) on nesting deeper than Python's stack
                yield RawRecord(name, line_number, problem=("invalid_json", "nested too deeply"))
                continue
            except ValueError as err:  # JSONDecodeError; also int parsing limits
                code = "invalid_utf8" if "surrogate" in str(err) else "invalid_json"  # orjson refuses lone surrogates
                yield RawRecord(name, line_number, problem=(code, _json_error(err)))
                continue
            yield RawRecord(name, line_number, value)


def _json_error(err: ValueError) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} (column {err.colno})"
    return str(err).split("\n")[0][:120]


def _iter_json_array(path: Path, name: str) -> Iterator[RawRecord]:
    size = path.stat().st_size
    if size > MAX_JSON_ARRAY_BYTES:
        yield RawRecord(name, 0, problem=("unreadable_file", f"a JSON array of {size:,} bytes; JSON arrays are read "
                                          f"whole, so at most {MAX_JSON_ARRAY_BYTES:,}: write large data as JSONL"))
        return
    data = path.read_bytes().removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        yield RawRecord(name, line, problem=("invalid_utf8", f"not UTF-8 (byte {err.start + 1} of the file)"))
        return
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0

    def line_at(index: int) -> int:
        nonlocal line, counted_to
        if index > counted_to:
            line += text.count("\n", counted_to, index)
            counted_to = index
        return line

    position = _skip_space(text, text.index("[") + 1)
    if text.startswith("]", position):
        position += 1
    else:
        while True:
            position = _skip_space(text, position)
            start_line = line_at(position)
            start = position
            try:
                value, position = decoder.raw_decode(text, position)
            except RecursionError:
                yield RawRecord(name, start_line, problem=("invalid_json", "nested too deeply"))
                return
            except ValueError as err:
                where = line_at(getattr(err, "pos", position))
                yield RawRecord(name, where, problem=("invalid_json", _json_error(err)))
                return
            if position - start > MAX_RECORD_BYTES:  # characters: at least as many bytes
                yield RawRecord(name, start_line, problem=_too_large(len(text[start:position].encode())))
            else:
                yield RawRecord(name, start_line, value)
            position = _skip_space(text, position)
            if text.startswith(",", position):
                position += 1
            elif text.startswith("]", position):
                position += 1
                break
            else:
                problem = "unterminated JSON array (missing ']')" if position >= len(text) else "expected ',' or ']'"
                yield RawRecord(name, line_at(position), problem=("invalid_json", problem))
                return
    if text[position:].strip():
        yield RawRecord(name, line_at(position), problem=("invalid_json", "extra data after the JSON array"))


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _iter_csv(path: Path, name: str) -> Iterator[RawRecord]:
    # the csv module refuses cells over 128 KiB by default; chat examples can be longer
    csv.field_size_limit(_CSV_MAX_CELL_BYTES)
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        try:
            reader = csv.DictReader(f)
            header = reader.fieldnames
        except UnicodeDecodeError as err:
            yield RawRecord(name, 1, problem=("invalid_utf8", f"not UTF-8 (byte {err.start + 1})"))
            return
        except csv.Error as err:
            yield RawRecord(name, 1, problem=("invalid_json", f"unreadable CSV header ({err})"))
            return
        if not header:
            return
        start_line = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as err:
                yield RawRecord(name, start_line, problem=("invalid_utf8", f"not UTF-8 (byte {err.start + 1} of a read block)"))
                return
            except csv.Error as err:
                if "field larger than field limit" in str(err):
                    problem = ("record_too_large", f"a cell is over {MAX_RECORD_BYTES:,} bytes, the most a record may be; "
                                                   "the rest of the file is not read")
                else:
                    problem = ("invalid_json", f"unreadable CSV row ({err})")
                yield RawRecord(name, start_line, problem=problem)
                return
            line, start_line = start_line, reader.line_num + 1
            size = sum(len(cell) for cell in row.values() if isinstance(cell, str))
            if size > MAX_RECORD_BYTES:
                yield RawRecord(name, line, problem=_too_large(size))
                continue
            if None in row:  # more cells than header columns
                yield RawRecord(name, line, problem=("not_an_object", f"row has more cells than the {len(header)} header columns"))
                continue
            if all(not (cell or "").strip() for cell in row.values()):
                continue
            yield RawRecord(name, line, _csv_row(row))


def _csv_row(row: dict[str, str | None]) -> dict[str, Any]:
    """CSV cells are text; a cell holding a message list (messages, conversations) is JSON."""
    record: dict[str, Any] = {}
    for key, cell in row.items():
        if cell is None:
            continue
        if key in ("messages", "conversations", "prompt", "completion") and cell.lstrip().startswith("["):
            try:
                record[key] = json.loads(cell)
                continue
            except (ValueError, RecursionError):
                pass  # left as text: the validator reports it (messages_not_a_list)
        record[key] = cell
    return record


def _iter_parquet(path: Path, name: str) -> Iterator[RawRecord]:
    import pyarrow
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            measure = batch.nbytes > MAX_RECORD_BYTES  # else no row of the batch can be over the limit
            for value in batch.to_pylist():
                row += 1
                size = _text_bytes(value) if measure else 0
                if size > MAX_RECORD_BYTES:
                    yield RawRecord(name, row, problem=_too_large(size))
                    continue
                yield RawRecord(name, row, {k: v for k, v in value.items() if v is not None})
    except (pyarrow.ArrowInvalid, pyarrow.ArrowIOError, pyarrow.ArrowNotImplementedError) as err:
        where = f" after row {row}" if row else ""
        yield RawRecord(name, row, problem=("unreadable_file", f"not a readable Parquet file{where} ({str(err)[:120]})"))


def _text_bytes(value: Any) -> int:
    """Characters of text in a nested value (a Parquet row), counted without copying it."""
    total, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return total


# ---------------------------------------------------------------------------------------------- formats


def detect_format(value: Any) -> str | None:
    """The format of one record from its keys, or None when it matches none."""
    if type(value) is not dict:
        return None
    if "messages" in value:
        return "openai"
    if "conversations" in value:
        return "sharegpt"
    if "instruction" in value or ("output" in value and "completion" not in value):
        return "alpaca"
    if "prompt" in value or "completion" in value:
        return "prompt_completion"
    return None


def close_to_messages(value: dict[str, Any]) -> str | None:
    """A key that looks like a misspelt 'messages' (e.g. 'mesages', 'message'), if any."""
    for key in value:
        if isinstance(key, str) and difflib.get_close_matches(key.lower(), ["messages", "conversations"], n=1, cutoff=0.75):
            return key
    return None


MISSING = object()  # a required field that the record lacks (distinct from null)


@dataclass(slots=True)
class Draft:
    """A record's messages before validation. `messages` may be anything (the validator says what is
    wrong); `container` names the field it came from; `labels[i]` names message i's field when the
    messages were built from other fields (alpaca, prompt/completion)."""

    messages: Any
    container: str
    labels: list[str] | None = None

    def label(self, index: int) -> str:
        if self.labels is not None and index < len(self.labels):
            return self.labels[index]
        return f"{self.container}[{index}]"


def to_draft(value: dict[str, Any], fmt: str) -> Draft:
    """The record's messages in OpenAI shape, values copied as they are (possibly invalid)."""
    if fmt == "openai":
        return Draft(value.get("messages", MISSING), "messages")
    if fmt == "sharegpt":
        return _sharegpt(value)
    if fmt == "alpaca":
        return _alpaca(value)
    return _prompt_completion(value)


def _system(value: dict[str, Any]) -> list[dict[str, Any]]:
    system = value.get("system")
    return [] if system is None or system == "" else [{"role": "system", "content": system}]


def _sharegpt(value: dict[str, Any]) -> Draft:
    turns = value.get("conversations", MISSING)
    if type(turns) is not list:
        return Draft(turns, "conversations")
    messages: list[Any] = []
    labels: list[str] = []
    if value.get("system") not in (None, ""):
        messages.append({"role": "system", "content": value["system"]})
        labels.append("system")
    for index, turn in enumerate(turns):
        labels.append(f"conversations[{index}]")
        if type(turn) is not dict or "role" in turn:
            messages.append(turn)  # some ShareGPT files already use role/content
            continue
        speaker = turn.get("from", MISSING)
        role = SHAREGPT_ROLES.get(speaker.lower(), speaker) if isinstance(speaker, str) else speaker
        message = {"role": role, "content": turn.get("value", MISSING)}
        if "weight" in turn:
            message["weight"] = turn["weight"]
        messages.append(message)
    return Draft(messages, "conversations", labels)


def _alpaca(value: dict[str, Any]) -> Draft:
    messages = _system(value)
    labels = ["system"] * len(messages)
    instruction = value.get("instruction", MISSING)
    extra = value.get("input")
    if isinstance(instruction, str) and isinstance(extra, str):
        user, user_label = (instruction + "\n\n" + extra if extra.strip() else instruction), "instruction"
    elif extra is not None and not isinstance(extra, str):
        user, user_label = extra, "input"
    else:
        user, user_label = instruction, "instruction"
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": value.get("output", MISSING)})
    return Draft(messages, "instruction", [*labels, user_label, "output"])


def _prompt_completion(value: dict[str, Any]) -> Draft:
    prompt = value.get("prompt", MISSING)
    completion = value.get("completion", MISSING)
    messages: list[Any] = _system(value)
    labels = ["system"] * len(messages)
    if type(prompt) is list:  # conversational prompt/completion (TRL)
        messages.extend(prompt)
        labels.extend(f"prompt[{i}]" for i in range(len(prompt)))
    else:
        messages.append({"role": "user", "content": prompt})
        labels.append("prompt")
    if type(completion) is list:
        messages.extend(completion)
        labels.extend(f"completion[{i}]" for i in range(len(completion)))
    else:
        messages.append({"role": "assistant", "content": completion})
        labels.append("completion")
    return Draft(messages, "prompt", labels)


def describe_type(value: Any) -> str:
    """'a string', 'null', 'a number', ... for messages about wrong types."""
    if value is None:
        return "null"
    if value is MISSING:
        return "missing"
    return {
        str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object",
    }.get(type(value), type(value).__name__)


def dump_json_line(value: Any) -> str:
    """One JSON line as tunelab writes them (UTF-8 text, no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False) + "\n"


def write_json_lines(path: Path, rows: Iterable[Any]) -> None:
    """A JSONL file of `rows`, written atomically (a reader never sees half of it)."""
    out = AtomicTextFile(path)
    for row in rows:
        out.write(dump_json_line(row))
    out.commit()
