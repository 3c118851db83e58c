"""The user's new examples for `tunelab drift` and `tunelab update`, checked like training data.

Reads a data file or folder in any format `tunelab data check` reads, through the same record rules
(tunelab.data.validate); writes nothing itself (`write_rows` writes what the caller asks). A record
whose only problem is that it has no assistant message is an unlabelled input: drift measures input
shift on those. Every other problem stops with its file:line, as in `tunelab data check`. Examples
become the data stage's row shape {"id", "source", "messages"}, so eval and prepare read them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.formats import RawRecord, data_files, dump_json_line, iter_file
from tunelab.data.quality import conversation_id
from tunelab.data.validate import read_examples, validate_record
from tunelab.errors import DataError

UNLABELLED = "no_assistant_message"
ERRORS_SHOWN = 20
_PLACEHOLDER = {"role": "assistant", "content": "(no answer)"}


@dataclass
class NewData:
    path: Path
    labelled: list[dict[str, Any]]  # rows whose last message is the reference answer
    unlabelled: list[dict[str, Any]]  # rows with inputs only

    @property
    def all_rows(self) -> list[dict[str, Any]]:
        return self.labelled + self.unlabelled


def _row(messages: list[dict[str, Any]], source: str) -> dict[str, Any]:
    return {"id": f"new-{conversation_id(messages)}", "source": source, "messages": messages}


def _unlabelled_rows(path: Path, places: set[tuple[str, int]], fmt: str, system_prompt: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Re-read the records that only lack an answer: valid with a placeholder answer appended -> inputs."""
    rows, problems = [], []
    for file in data_files(path)[0]:
        for raw in iter_file(file):
            if (raw.path, raw.line) not in places:
                continue
            messages = raw.value.get("messages") if isinstance(raw.value, dict) else None
            if not isinstance(messages, list):
                problems.append(f"{raw.path}:{raw.line}: {UNLABELLED}: only OpenAI chat records ('messages') can be unlabelled inputs")
                continue
            example, issues = validate_record(RawRecord(raw.path, raw.line, {**raw.value, "messages": [*messages, _PLACEHOLDER]}), fmt)
            if example is None:
                problems.extend(issue.format() for issue in issues)
                continue
            inputs = example.messages[:-1]
            if system_prompt and inputs[0]["role"] != "system":
                inputs.insert(0, {"role": "system", "content": system_prompt})
            rows.append(_row(inputs, example.source))
    return rows, problems


def read_new_data(path: str | Path, fmt: str = "auto", system_prompt: str | None = None) -> NewData:
    """Every record of `path` as a labelled or unlabelled row; DataError listing file:line problems otherwise."""
    path = Path(path)
    labelled: list[dict[str, Any]] = []
    problems: list[str] = []
    unlabelled_at: set[tuple[str, int]] = set()
    for example, issues in read_examples(path, fmt, system_prompt):
        if example is not None:
            labelled.append(_row(example.messages, example.source))
        elif [issue.code for issue in issues] == [UNLABELLED]:
            unlabelled_at.add((issues[0].path, issues[0].line))
        else:
            problems.extend(issue.format() for issue in issues if issue.severity == "error")
    unlabelled, more = _unlabelled_rows(path, unlabelled_at, fmt, system_prompt) if unlabelled_at else ([], [])
    problems += more
    if problems:
        shown = problems[:ERRORS_SHOWN]
        rest = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DataError("\n".join(shown) + rest + f"\n{len(problems)} error(s) in {path}: fix them "
                        f"(`tunelab data check {path}` lists every problem)")
    if not labelled and not unlabelled:
        raise DataError(f"{path}: no examples")
    return NewData(path, labelled, unlabelled)


def user_text(row: dict[str, Any]) -> str:
    """What the model is asked: the user turns before the answer (all of them for an unlabelled row)."""
    messages = row["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return "\n".join(str(m.get("content") or "") for m in messages[:last] if m["role"] == "user")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A data-stage JSONL file (data/train.jsonl ...): one row per line."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(dump_json_line(row) for row in rows), encoding="utf-8")
    tmp.replace(path)
    return path
