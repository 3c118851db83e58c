"""The record rules: every problem of a data file as an Issue(path, line, code, message, severity).

Reads files through formats.py; writes nothing. Messages quote at most a short excerpt of a value,
because the data may be private. Every code is listed in CODES with its severity and meaning; the
codes are stable (scripts and CI match on them). Errors block `data prepare` and make `data check`
exit 1; warnings do not.

Public API:
  CODES, Issue, Example
  read_examples(path, fmt="auto", system_prompt=None) -> Iterator[(Example | None, list[Issue])]
  validate_record(raw: RawRecord, fmt="auto") -> (Example | None, list[Issue])
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.formats import (
    FORMATS,
    MISSING,
    Draft,
    RawRecord,
    close_to_messages,
    data_files,
    describe_type,
    detect_format,
    iter_file,
    to_draft,
)

ERROR, WARNING = "error", "warning"

# code -> (severity, what it means). docs/data-checks.md lists this table (tests/test_docs.py checks it).
CODES: dict[str, tuple[str, str]] = {
    # files and records
    "unreadable_file": (ERROR, "the file or folder does not exist or cannot be read"),
    "empty_file": (ERROR, "the file has no records"),
    "skipped_file": (WARNING, "an entry of a data folder was skipped: not .jsonl/.json/.csv/.parquet, hidden, or a "
                              "second link to a folder already read"),
    "invalid_utf8": (ERROR, "the line is not UTF-8 text (or holds a lone surrogate escape)"),
    "invalid_json": (ERROR, "the line (or CSV row) does not parse"),
    "record_too_large": (ERROR, "the record is over 256 KiB (formats.MAX_RECORD_BYTES); it is not read"),
    "not_an_object": (ERROR, "the record is not a JSON object"),
    "unknown_format": (ERROR, "the record matches none of openai, sharegpt, alpaca, prompt_completion"),
    # messages
    "missing_messages": (ERROR, "no 'messages' (or 'conversations') list"),
    "messages_not_a_list": (ERROR, "'messages' is not a list"),
    "message_not_an_object": (ERROR, "a message is not an object"),
    "unknown_role": (ERROR, "a role other than system, user, assistant, tool"),
    "missing_content": (ERROR, "a message has no content"),
    "content_not_string": (ERROR, "content is not text (or has non-text parts)"),
    "bad_weight": (ERROR, "weight is not 0 or 1, or is on a non-assistant message"),
    "bad_name": (ERROR, "name is not a string"),
    "bad_tool_call": (ERROR, "tool_calls is not a list of {type, function: {name, arguments}} on an assistant"),
    "no_assistant_message": (ERROR, "nothing to learn: the conversation has no assistant message"),
    "empty_assistant": (ERROR, "an assistant message is empty (it would teach the model to say nothing)"),
    "bad_role_order": (ERROR, "system not first, assistant before user, two user or assistant turns in a row, ..."),
    "last_not_assistant": (WARNING, "the conversation ends with a user/tool message, which is never trained"),
    # tokenization (needs the model's tokenizer and chat template)
    "too_long": (WARNING, "longer than max_seq_len tokens: prepare drops it (listed in rejected.jsonl)"),
    "zero_trainable_tokens": (WARNING, "no token would be trained (every assistant turn has weight 0)"),
    "tools_unsupported": (ERROR, "the example has tool calls but the chat template cannot render them"),
    "template_error": (ERROR, "the chat template failed to render the conversation"),
    "end_of_turn_not_trained": (ERROR, "the chat template's labels would not train the end-of-turn token"),
    "prefix_mismatch": (WARNING, "the template renders earlier turns differently (e.g. drops reasoning): one example per turn"),
    # quality
    "exact_duplicate": (WARNING, "the same conversation appears earlier (prepare drops it when data.dedupe)"),
    "near_duplicate": (WARNING, "almost the same text as an earlier example (MinHash/LSH)"),
    "conflicting_answers": (WARNING, "the same prompt appears earlier with a different answer"),
    "leakage_exact": (WARNING, "a held-out example has the same prompt as a training example (prepare drops the latter)"),
    "leakage_near": (WARNING, "a held-out example is a near-duplicate of a training example (prepare drops the latter)"),
    "length_outlier": (WARNING, "far shorter or longer than the rest of the data"),
    # preference pairs (data/preference.py)
    "not_a_pair": (ERROR, "a record of a preference file is not a pair (input + preferred_output + non_preferred_output, or prompt + chosen + rejected)"),
    "bad_side": (ERROR, "an answer of a pair is not text, an assistant message, or a list of one assistant message"),
    "empty_side": (ERROR, "the preferred or the rejected answer is missing or empty"),
    "identical_pair": (ERROR, "the preferred and rejected answers are the same: nothing to learn"),
    "prompt_not_user": (ERROR, "a pair's prompt does not end with a user message (the answers must reply to one)"),
    "duplicate_pair": (WARNING, "the same prompt and answers appear earlier (prepare drops it when data.dedupe)"),
    # unpaired thumbs up/down examples (dpo.loss: kto)
    "bad_label": (ERROR, "an unpaired example's label is not true (desirable) or false (undesirable)"),
    "conflicting_label": (WARNING, "the same prompt and completion appear earlier with the other label"),
}

ROLES = frozenset(("system", "user", "assistant", "tool"))
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
_EXCERPT_CHARS = 24


def severity_of(code: str) -> str:
    return CODES[code][0]


@dataclass(slots=True)
class Issue:
    path: str
    line: int  # 1-based; 0 for the whole file (or the model's template)
    code: str
    message: str
    severity: str = ""
    related: tuple[str, ...] = ()  # other "path:line"s involved (duplicates, leaks, conflicts)

    def __post_init__(self) -> None:
        if not self.severity:
            self.severity = severity_of(self.code)

    def format(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.code}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "line": self.line, "code": self.code, "severity": self.severity,
                "message": self.message, "related": list(self.related)}


@dataclass(slots=True)
class Example:
    """One valid record, normalised: messages are {"role", "content", optional "weight" (assistant,
    0|1), "name", "tool_calls", "tool_call_id"}."""

    path: str
    line: int
    format: str
    messages: list[dict[str, Any]]
    warnings: list[Issue] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # the record's other keys, for graders (item.<key>)

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"


def excerpt(value: Any) -> str:
    """A short, quoted excerpt of a value for messages (data may be private)."""
    if isinstance(value, str):
        return repr(value if len(value) <= _EXCERPT_CHARS else value[:_EXCERPT_CHARS] + "...")
    text = repr(value)
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "..."


# ---------------------------------------------------------------------------------------------- files


def read_examples(
    path: str | Path, fmt: str = "auto", system_prompt: str | None = None
) -> Iterator[tuple[Example | None, list[Issue]]]:
    """Every record of a file or folder, validated, in order. Streams: one record in memory at a time.
    Yields (Example, warnings) for a valid record and (None, issues) for an invalid one."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from auto, {', '.join(FORMATS)}")
    for raw, problems in iter_raw_records(path):
        if raw is None:
            yield None, problems
            continue
        example, issues = validate_record(raw, fmt)
        if example is not None and system_prompt and example.messages[0]["role"] != "system":
            example.messages.insert(0, {"role": "system", "content": system_prompt})
        yield example, issues


def iter_raw_records(path: str | Path) -> Iterator[tuple[RawRecord | None, list[Issue]]]:
    """Every raw record of a file or folder, in order, as (record, []); a missing path, a skipped or empty
    file and a folder without data files each as (None, [its issue]). Chat records and preference pairs
    are read through this one walk."""
    path = Path(path)
    if not path.exists():
        yield None, [Issue(str(path), 0, "unreadable_file", "no such file or folder")]
        return
    files, skipped = data_files(path)
    for entry in skipped:
        yield None, [Issue(str(entry.path), 0, entry.code, entry.reason)]
    if path.is_dir() and not files:
        yield None, [Issue(str(path), 0, "unreadable_file", "the folder has no .jsonl/.json/.csv/.parquet files")]
    for file in files:
        seen = False
        for raw in iter_file(file):
            seen = True
            yield raw, []
        if not seen:
            yield None, [Issue(str(file), 0, "empty_file", "the file has no records")]


# ---------------------------------------------------------------------------------------------- records


def validate_record(raw: RawRecord, fmt: str = "auto") -> tuple[Example | None, list[Issue]]:
    """Never raises, whatever the record holds."""
    if raw.problem is not None:
        code, message = raw.problem
        return None, [Issue(raw.path, raw.line, code, message)]
    value = raw.value
    if type(value) is not dict:
        return None, [Issue(raw.path, raw.line, "not_an_object", f"the record is {describe_type(value)}, expected an object")]
    if fmt in ("auto", "openai"):  # the common case first, in one pass (the rules below agree with it)
        messages = value.get("messages")
        if type(messages) is list and _plain_and_valid(messages):
            return Example(raw.path, raw.line, "openai", messages, [], extra_keys(value, "openai")), []
    detected = detect_format(value) if fmt == "auto" else fmt
    problems: list[tuple[str, str]] = []
    if detected is None:
        typo = close_to_messages(value)
        if typo is not None:
            problems.append(("missing_messages", f"no 'messages' list (is {excerpt(typo)} a misspelling?)"))
        else:
            keys = ", ".join(excerpt(k) for k in list(value)[:5]) or "none"
            problems.append(("unknown_format", f"matches no known format (keys: {keys}); expected 'messages' "
                             "(OpenAI chat), 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca) "
                             "or 'prompt'+'completion'"))
    elif detected == "openai" and "messages" not in value:
        problems.append(("missing_messages", "no 'messages' list"))
    elif detected == "sharegpt" and "conversations" not in value:
        problems.append(("missing_messages", "no 'conversations' list (ShareGPT)"))
    messages = None
    warnings: list[tuple[str, str]] = []
    if not problems:
        messages = check_messages(to_draft(value, detected), problems, warnings)
    if problems:
        return None, [Issue(raw.path, raw.line, code, message) for code, message in problems]
    issues = [Issue(raw.path, raw.line, code, message) for code, message in warnings]
    return Example(raw.path, raw.line, detected, messages, issues, extra_keys(value, detected)), issues


# the keys each format reads into messages, and the keys prepared rows write themselves
_FORMAT_KEYS = {"openai": ("messages",), "sharegpt": ("conversations", "system"),
                "alpaca": ("instruction", "input", "output", "system"), "prompt_completion": ("prompt", "completion", "system")}
_PREPARED_KEYS = ("id", "source", "messages")


def extra_keys(value: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A record's keys beside its conversation (metadata, a reference answer, fields a grader reads)."""
    used = (*_FORMAT_KEYS.get(fmt, ()), *_PREPARED_KEYS)
    return {key: item for key, item in value.items() if isinstance(key, str) and key not in used}


def check_messages(
    draft: Draft, problems: list[tuple[str, str]], warnings: list[tuple[str, str]]
) -> list[dict[str, Any]] | None:
    """The normalised messages, or None with `problems` filled. The rules, in order: each message is
    an object with a known role and text content (tool-call-only assistants may have none); weight
    0|1 on assistants only; then the conversation: at least one non-empty assistant turn, system
    first, user before the first assistant, no two user or assistant turns in a row, tool results
    right after an assistant's tool calls."""
    messages = draft.messages
    if type(messages) is not list:
        problems.append(("messages_not_a_list", f"'{draft.container}' is {describe_type(messages)}, expected a list of messages"))
        return None
    if _plain_and_valid(messages):
        return messages
    normalised: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if type(message) is not dict:
            problems.append(("message_not_an_object", f"{draft.label(index)}: is {describe_type(message)}, expected an object with role and content"))
            continue
        role = message.get("role", MISSING)
        if type(role) is not str or role not in ROLES:
            alias = _ROLE_ALIASES.get(role) if type(role) is str else None
            if alias is None:
                shown = excerpt(role) if type(role) is str else describe_type(role)
                problems.append(("unknown_role", f"{draft.label(index)}: role {shown} is not one of system, user, assistant, tool"))
                continue
            role = alias
        content = message.get("content", MISSING)
        tool_calls = message.get("tool_calls")
        if content is MISSING or content is None:
            if not (role == "assistant" and tool_calls):
                problems.append(("missing_content", f"{draft.label(index)}: {role} message has no content"))
                continue
            content = ""
        elif type(content) is not str:
            content = _text_parts(content, draft.label(index), problems)
            if content is None:
                continue
        if not content.isascii():
            try:
                content.encode("utf-8")
            except UnicodeEncodeError:
                problems.append(("invalid_utf8", f"{draft.label(index)}: content holds a lone surrogate (\\ud800-\\udfff escape)"))
                continue
        if len(message) == 2:  # the common case: role and content only
            normalised.append({"role": role, "content": content})
            continue
        out = {"role": role, "content": content}
        if not _extras(message, role, out, draft.label(index), problems):
            continue
        normalised.append(out)
    if problems or len(normalised) != len(messages):
        return None
    _check_conversation(normalised, draft, problems, warnings)
    return None if problems else normalised


def _plain_and_valid(messages: list[Any]) -> bool:
    """The common case, checked in one tight pass: optional system, then user/assistant turns
    alternating, ending with a non-empty assistant; each message exactly {role, content} with text.
    Anything else (or any doubt) takes the full rules, which say what is wrong."""
    if len(messages) < 2:
        return False
    expected = "user"
    for message in messages:
        if type(message) is not dict or len(message) != 2:
            return False
        content = message.get("content")
        if type(content) is not str or not (content.isascii() or _encodable(content)):
            return False
        role = message.get("role")
        if role != expected:
            if role == "system" and message is messages[0]:
                continue
            return False
        if expected == "user":
            expected = "assistant"
        elif not content or content.isspace():
            return False
        else:
            expected = "user"
    return expected == "user"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_parts(content: Any, label: str, problems: list[tuple[str, str]]) -> str | None:
    """OpenAI content parts: a list of {"type": "text", "text": ...} is joined; anything else is refused."""
    if type(content) is list and content and all(
        type(part) is dict and part.get("type") == "text" and type(part.get("text")) is str for part in content
    ):
        return "".join(part["text"] for part in content)
    if type(content) is list:
        problems.append(("content_not_string", f"{label}: content parts other than text (e.g. images) are not supported"))
    else:
        problems.append(("content_not_string", f"{label}: content is {describe_type(content)}, expected a string"))
    return None


def _extras(message: dict[str, Any], role: str, out: dict[str, Any], label: str, problems: list[tuple[str, str]]) -> bool:
    """Copies weight, name, tool_calls, tool_call_id into `out`; False (with a problem) when invalid."""
    ok = True
    weight = message.get("weight")
    if weight is not None:
        if role != "assistant":
            problems.append(("bad_weight", f"{label}: weight is only allowed on assistant messages"))
            ok = False
        elif type(weight) not in (int, float, bool) or weight not in (0, 1):
            problems.append(("bad_weight", f"{label}: weight must be 0 or 1, got {excerpt(weight)}"))
            ok = False
        else:
            out["weight"] = int(weight)
    name = message.get("name")
    if name is not None:
        if type(name) is not str:
            problems.append(("bad_name", f"{label}: name is {describe_type(name)}, expected a string"))
            ok = False
        else:
            out["name"] = name
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        problem = _tool_call_problem(tool_calls, role)
        if problem:
            problems.append(("bad_tool_call", f"{label}: {problem}"))
            ok = False
        else:
            out["tool_calls"] = tool_calls
    tool_call_id = message.get("tool_call_id")
    if tool_call_id is not None:
        if type(tool_call_id) is not str:
            problems.append(("bad_tool_call", f"{label}: tool_call_id is {describe_type(tool_call_id)}, expected a string"))
            ok = False
        else:
            out["tool_call_id"] = tool_call_id
    return ok


def _tool_call_problem(tool_calls: Any, role: str) -> str | None:
    if role != "assistant":
        return "tool_calls are only allowed on assistant messages"
    if type(tool_calls) is not list or not tool_calls:
        return "tool_calls must be a non-empty list"
    for index, call in enumerate(tool_calls):
        function = call.get("function") if type(call) is dict else None
        if type(function) is not dict or type(function.get("name")) is not str or not function["name"]:
            return f"tool_calls[{index}] needs function.name"
        if type(function.get("arguments")) not in (str, dict):
            return f"tool_calls[{index}].function.arguments must be a JSON string or an object"
    return None


def _check_conversation(
    messages: list[dict[str, Any]], draft: Draft, problems: list[tuple[str, str]], warnings: list[tuple[str, str]]
) -> None:
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants:
        problems.append(("no_assistant_message", f"'{draft.container}' has no assistant message: nothing to learn"))
        return
    for index in assistants:
        message = messages[index]
        if not message["content"].strip() and not message.get("tool_calls"):
            problems.append(("empty_assistant", f"{draft.label(index)}: assistant content is empty"))
    order = _role_order_problem(messages, draft)
    if order:
        problems.append(("bad_role_order", order))
    if problems:
        return
    if all(messages[i].get("weight", 1) == 0 for i in assistants):
        warnings.append(("zero_trainable_tokens", "every assistant message has weight 0: nothing is trained"))
    if messages[-1]["role"] != "assistant":
        last = len(messages) - 1
        warnings.append(("last_not_assistant", f"{draft.label(last)}: ends with a {messages[-1]['role']} message, which is never trained"))


def _role_order_problem(messages: list[dict[str, Any]], draft: Draft) -> str | None:
    previous = None
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if index != 0:
                return f"{draft.label(index)}: a system message must come first"
        elif role == "user":
            if previous == "user":
                return f"{draft.label(index - 1)} and {draft.label(index)} are both user messages"
            if previous == "tool":
                return f"{draft.label(index)}: a user message right after a tool result (the assistant answers it first)"
        elif role == "assistant":
            if previous in (None, "system"):
                return f"{draft.label(index)}: an assistant message before any user message"
            if previous == "assistant":
                return f"{draft.label(index - 1)} and {draft.label(index)} are both assistant messages"
        elif not (previous == "tool" or (previous == "assistant" and messages[index - 1].get("tool_calls"))):
            return f"{draft.label(index)}: a tool message must follow an assistant message with tool_calls"
        previous = role
    return None
