"""Preference pairs ("this answer, not that one"): reading, checking and preparing them for DPO.

Reads pair files (JSONL, JSON, CSV, Parquet or a folder, through formats.py) in three shapes,
detected per record:
  openai_dpo     {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content"}],
                  "non_preferred_output": [...]}                      (OpenAI's DPO fine-tuning files)
  trl            {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages,
                  "system"?}   (TRL; without "prompt", chosen and rejected are whole conversations
                  whose shared beginning is the prompt)
  sharegpt_pair  {"conversations": [...], "chosen": {"from": "gpt", "value"}, "rejected": {...}}
Every problem is an Issue with file:line and a validate.CODES code; the prompt's messages obey the
chat rules of validate.check_messages. Writes (prepare_preferences, called by data.prepare for
`method: dpo`) the data stage's folder with the same file names as for chat data:
  train.jsonl valid.jsonl test.jsonl  {"id", "source", "messages": prompt + [preferred answer],
                                      "rejected": the other answer's text, ...the record's other keys}
                                      (so evaluation reads pairs as chat examples whose reference is
                                      the preferred answer; graders see item.rejected)
  train.tokens.jsonl valid.tokens.jsonl {"id", "input_ids": chosen ids + rejected ids, "labels",
                                      "chosen_tokens": where the rejected sequence starts,
                                      "loss_units": 1 (the loss is a mean over pairs, not tokens)}
  stats.json issues.jsonl rejected.jsonl fingerprint.json  as data/prepare.py writes them.
Only the final answer is trained and scored: earlier assistant turns of a prompt get weight 0.

Public API:
  PAIR_FORMATS, Pair, is_preference_file(path), read_pairs(path, system_prompt=None)
  tokenize_pair(tokenizer, pair_messages, max_seq_len) -> (chosen, rejected) TokenizedExample
  check_preferences(report, inputs, ...)          fills `tunelab data check`'s report (data/check.py)
  prepare_preferences(data, tokenizer, out_dir, raise_on_errors) -> stats   (data/prepare.py, for pairs)
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.contract import DataStats
from tunelab.data.formats import (
    MISSING,
    Draft,
    RawRecord,
    data_files,
    describe_type,
    iter_file,
    to_draft,
    write_json_lines,
)
from tunelab.data.quality import SPLITS, prompt_key
from tunelab.data.validate import Issue, check_messages, excerpt, iter_raw_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tunelab.config import DataConfig
    from tunelab.data.tokenize import TokenizedExample

PAIR_FORMATS = ("openai_dpo", "trl", "sharegpt_pair")
_PAIR_KEYS = {"openai_dpo": ("input", "preferred_output", "non_preferred_output"),
              "trl": ("prompt", "chosen", "rejected", "system"),
              "sharegpt_pair": ("conversations", "chosen", "rejected", "system")}
_FILE_LEVEL = ("unreadable_file", "empty_file", "skipped_file")
_SNIFF_RECORDS = 20


@dataclass(slots=True)
class Pair:
    """One valid pair: the prompt (normalised messages ending with a user turn), and the two answers."""

    path: str
    line: int
    format: str
    prompt: list[dict[str, Any]]
    chosen: str
    rejected: str | None  # None: a chat example of a test file (a reference answer, no pair)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"

    def messages(self, side: str = "chosen") -> list[dict[str, Any]]:
        """The prompt followed by one answer, as a chat conversation."""
        return [*self.prompt, {"role": "assistant", "content": self.chosen if side == "chosen" else self.rejected}]


def detect_pair_format(value: Any) -> str | None:
    if type(value) is not dict:
        return None
    if "preferred_output" in value or "non_preferred_output" in value:
        return "openai_dpo"
    if "chosen" in value or "rejected" in value:
        return "sharegpt_pair" if "conversations" in value else "trl"
    return None


def is_preference_file(path: str | Path) -> bool:
    """Whether a file (or folder) holds preference pairs: the first records that parse as objects
    decide (a chat record among pairs is then reported, by line, as not_a_pair)."""
    path = Path(path)
    if not path.exists():
        return False
    seen = 0
    for file in data_files(path)[0]:
        for raw in iter_file(file):
            if raw.problem is None and type(raw.value) is dict:
                if detect_pair_format(raw.value) is not None:
                    return True
                seen += 1
                if seen >= _SNIFF_RECORDS:
                    return False
    return False


# ---------------------------------------------------------------------------------------------- records


def read_pairs(path: str | Path, system_prompt: str | None = None) -> Iterator[tuple[Pair | None, list[Issue]]]:
    """Every record of a file or folder, validated, in order: (Pair, []) or (None, issues)."""
    for raw, problems in iter_raw_records(path):
        if raw is None:
            yield None, problems
            continue
        pair, issues = validate_pair(raw)
        if pair is not None and system_prompt and pair.prompt[0]["role"] != "system":
            pair.prompt.insert(0, {"role": "system", "content": system_prompt})
        yield pair, issues


def validate_pair(raw: RawRecord) -> tuple[Pair | None, list[Issue]]:
    """Never raises, whatever the record holds."""
    def issues(problems: list[tuple[str, str]]) -> list[Issue]:
        return [Issue(raw.path, raw.line, code, message) for code, message in problems]

    if raw.problem is not None:
        return None, issues([raw.problem])
    value = raw.value
    if type(value) is not dict:
        return None, issues([("not_an_object", f"the record is {describe_type(value)}, expected an object")])
    fmt = detect_pair_format(value)
    if fmt is None:
        return None, issues([("not_a_pair", "not a preference pair (expected input + preferred_output + "
                                            "non_preferred_output, or prompt + chosen + rejected); a file of pairs "
                                            "holds pairs only")])
    problems: list[tuple[str, str]] = []
    if fmt == "openai_dpo":
        prompt, container = _openai_prompt(value, problems)
        chosen = _side(value, "preferred_output", problems)
        rejected = _side(value, "non_preferred_output", problems)
    elif fmt == "sharegpt_pair":
        draft = to_draft(value, "sharegpt")
        prompt, container = (draft.messages if type(draft.messages) is list else None), "conversations"
        if prompt is None:
            problems.append(("messages_not_a_list", f"'conversations' is {describe_type(value['conversations'])}, expected a list"))
        chosen = _side(value, "chosen", problems)
        rejected = _side(value, "rejected", problems)
    else:
        prompt, container, chosen, rejected = _trl(value, problems)
    if problems:
        return None, issues(problems)
    prompt = [*([] if value.get("system") in (None, "") or fmt == "openai_dpo"
                else [{"role": "system", "content": value["system"]}]), *prompt]
    normalised = _check_prompt(prompt, container, chosen, rejected, problems)
    if problems:
        return None, issues(problems)
    used = (*_PAIR_KEYS[fmt], "id", "source", "messages")
    extra = {key: item for key, item in value.items() if isinstance(key, str) and key not in used}
    return Pair(raw.path, raw.line, fmt, normalised, chosen, rejected, extra), []


def _openai_prompt(value: dict[str, Any], problems: list[tuple[str, str]]) -> tuple[list[Any] | None, str]:
    given = value.get("input", MISSING)
    messages = given.get("messages", MISSING) if type(given) is dict else MISSING
    if type(messages) is not list:
        what = describe_type(given) if type(given) is not dict else f"'input.messages' {describe_type(messages)}"
        problems.append(("missing_messages", f"'input' must be an object with a 'messages' list; got {what}"))
        return None, "input.messages"
    return messages, "input.messages"


def _side(value: dict[str, Any], key: str, problems: list[tuple[str, str]]) -> str | None:
    """One answer: text, an assistant message ({role, content} or ShareGPT {from, value}), or a list
    of exactly one such message."""
    side = value.get(key, MISSING)
    if side is MISSING or side is None:
        problems.append(("empty_side", f"'{key}' is missing"))
        return None
    if type(side) is list and len(side) == 1:
        side = side[0]
    if type(side) is dict:
        role = side.get("role", side.get("from", "assistant"))
        text = side.get("content", side.get("value", MISSING))
        if role not in ("assistant", "gpt") or type(text) is not str:
            problems.append(("bad_side", f"'{key}' must be an assistant message with text content (got role "
                                         f"{excerpt(role)}, content {describe_type(text)})"))
            return None
        side = text
    if type(side) is not str:
        problems.append(("bad_side", f"'{key}' is {describe_type(side)}; expected text, an assistant message, "
                                     "or a list of one assistant message"))
        return None
    if not side.strip():
        problems.append(("empty_side", f"'{key}' is empty"))
        return None
    return side


def _trl(value: dict[str, Any], problems: list[tuple[str, str]]) -> tuple[list[Any] | None, str, str | None, str | None]:
    """TRL's standard (prompt given) and implicit-prompt (whole conversations) shapes."""
    prompt = value.get("prompt", MISSING)
    chosen, rejected = value.get("chosen", MISSING), value.get("rejected", MISSING)
    if prompt is MISSING and type(chosen) is list and type(rejected) is list and len(chosen) > 1:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt = chosen[:shared]
        value = {"chosen": chosen[shared:], "rejected": rejected[shared:]}
    if prompt is MISSING or prompt is None:
        problems.append(("missing_messages", "no 'prompt' (text or a list of messages)"))
        return None, "prompt", None, None
    if type(prompt) is str:
        if not prompt.strip():
            problems.append(("prompt_not_user", "'prompt' is empty"))
            return None, "prompt", None, None
        prompt = [{"role": "user", "content": prompt}]
    elif type(prompt) is not list:
        problems.append(("messages_not_a_list", f"'prompt' is {describe_type(prompt)}, expected text or a list of messages"))
        return None, "prompt", None, None
    return prompt, "prompt", _side(value, "chosen", problems), _side(value, "rejected", problems)


def _check_prompt(prompt: list[Any], container: str, chosen: str, rejected: str,
                  problems: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The prompt's messages by the chat rules (with the preferred answer after them), then: it ends
    with a user turn, and the answers differ. Earlier assistant turns get weight 0 (never trained)."""
    last = prompt[-1] if prompt else None
    if type(last) is not dict or last.get("role") != "user":
        got = "no messages" if last is None else f"a {excerpt(last.get('role')) if type(last) is dict else describe_type(last)} message"
        problems.append(("prompt_not_user", f"the prompt must end with a user message (the answers reply to it); it ends with {got}"))
        return []
    labels = [f"{container}[{i}]" for i in range(len(prompt))] + ["chosen"]
    warnings: list[tuple[str, str]] = []
    messages = check_messages(Draft([*prompt, {"role": "assistant", "content": chosen}], container, labels), problems, warnings)
    if messages is None:
        return []
    if chosen.strip() == rejected.strip():
        problems.append(("identical_pair", f"the preferred and rejected answers are the same ({excerpt(chosen)}): nothing to learn"))
        return []
    prompt_messages = messages[:-1]
    for message in prompt_messages:
        if message["role"] == "assistant":
            message["weight"] = 0
    return prompt_messages


# ---------------------------------------------------------------------------------------------- quality


def pair_key(pair: Pair) -> bytes:
    """The same for pairs with the same prompt and the same two answers, in every process."""
    text = prompt_key(pair.messages()).hex() + "\x1f" + pair.chosen.strip() + "\x1f" + (pair.rejected or "").strip()
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass
class PairQuality:
    issues: list[Issue]
    duplicates: list[tuple[int, int]]  # (later, first) within a split
    leaks: list[tuple[int, int]]  # (earlier-split pair, held-out pair) sharing a prompt


def pair_quality(splits: list[str], pairs: list[Pair]) -> PairQuality:
    """Duplicated pairs within a split, and held-out pairs whose prompt is in an earlier split (the
    same prompt with other answers still teaches the held-out answer)."""
    result = PairQuality([], [], [])
    first_of: dict[tuple[str, bytes], int] = {}
    prompts: dict[bytes, list[int]] = {}
    for index, (split, pair) in enumerate(zip(splits, pairs, strict=True)):
        key = (split, pair_key(pair))
        if key in first_of:
            first = first_of[key]
            result.duplicates.append((index, first))
            result.issues.append(Issue(pair.path, pair.line, "duplicate_pair", f"the same pair as {pairs[first].source}",
                                       related=(pairs[first].source,)))
        else:
            first_of[key] = index
        prompts.setdefault(prompt_key(pair.messages()), []).append(index)
    for group in prompts.values():
        for held_out in group:
            split_id = SPLITS.index(splits[held_out])
            earlier = [i for i in group if SPLITS.index(splits[i]) < split_id]
            if not earlier:
                continue
            result.leaks.extend((i, held_out) for i in earlier)
            pair = pairs[held_out]
            result.issues.append(Issue(pair.path, pair.line, "leakage_exact",
                                       f"the same prompt as {splits[earlier[0]]} pair {pairs[earlier[0]].source}",
                                       related=tuple(pairs[i].source for i in earlier[:5])))
    result.issues.sort(key=lambda issue: (issue.path, issue.line, issue.code))
    return result


# ---------------------------------------------------------------------------------------------- tokens


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, pair: Pair, max_seq_len: int | None = None
) -> tuple[TokenizedExample, TokenizedExample]:
    """(chosen, rejected): the prompt and each answer through the chat template, labels on that
    answer only (its end-of-turn token included). Raises TemplateProblem."""
    from tunelab.data.tokenize import tokenize_conversation

    return (tokenize_conversation(tokenizer, pair.messages("chosen"), max_seq_len),
            tokenize_conversation(tokenizer, pair.messages("rejected"), max_seq_len))


def pair_row(pair_id: str, chosen: TokenizedExample, rejected: TokenizedExample) -> dict[str, Any]:
    """A *.tokens.jsonl row of a pair (see the module docstring)."""
    return {"id": pair_id, "input_ids": chosen.input_ids + rejected.input_ids, "labels": chosen.labels + rejected.labels,
            "chosen_tokens": len(chosen.input_ids), "loss_units": 1}


def _too_long(pair: Pair, chosen: TokenizedExample, rejected: TokenizedExample, max_seq_len: int) -> Issue | None:
    if not (chosen.truncated or rejected.truncated):
        return None
    side = "preferred" if chosen.length >= rejected.length else "rejected"
    return Issue(pair.path, pair.line, "too_long",
                 f"prompt + {side} answer is {max(chosen.length, rejected.length)} tokens > max_seq_len {max_seq_len}")


# ---------------------------------------------------------------------------------------------- data check


def check_preferences(
    report: Any, inputs: list[tuple[str, Path]], *, model: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None, max_seq_len: int = 512, system_prompt: str | None = None,
    add: Callable[[Issue], None],
) -> None:
    """`tunelab data check` on pair files: fills data/check.py's CheckReport (`report`) with the
    records, quality and (with a model or tokenizer) token counts; `add` reports each issue."""
    splits: list[str] = []
    pairs: list[Pair] = []
    for split, path in inputs:
        if path.exists():
            report.bytes_read += sum(f.stat().st_size for f in data_files(path)[0])
        for pair, issues in read_pairs(path, system_prompt):
            for issue in issues:
                add(issue)
            if pair is not None:
                splits.append(split)
                pairs.append(pair)
                report.formats[pair.format] += 1
            if pair is not None or any(issue.code not in _FILE_LEVEL for issue in issues):
                report.records += 1
    report.examples = len(pairs)
    quality = pair_quality(splits, pairs)
    for issue in quality.issues:
        add(issue)
    report.quality = {"duplicate_pairs": len(quality.duplicates), "leakage": len({h for _, h in quality.leaks})}
    if (tokenizer is None and model is None) or not pairs:
        return
    from tunelab.data.tokenize import TemplateProblem, token_stats

    report.model = model or getattr(tokenizer, "name_or_path", None) or "tokenizer"
    if tokenizer is None:
        from tunelab.models import load_tokenizer

        tokenizer = load_tokenizer(model)
    lengths, trainable = array("Q"), array("Q")
    too_long = 0
    for pair in pairs:
        try:
            chosen, rejected = tokenize_pair(tokenizer, pair, max_seq_len)
        except TemplateProblem as err:
            add(Issue(pair.path, pair.line, err.code, str(err)))
            continue
        lengths.append(chosen.length + rejected.length)
        trainable.append(chosen.trainable_tokens + rejected.trainable_tokens)
        issue = _too_long(pair, chosen, rejected, max_seq_len)
        if issue is not None:
            too_long += 1
            add(issue)
    report.quality["too_long"] = too_long
    report.tokens = token_stats(lengths, trainable)
    report.notes.append("preference pairs: tokens count the prompt twice (once with each answer); "
                        "trainable tokens are the two answers")


# ---------------------------------------------------------------------------------------------- prepare


def preference_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """data/prepare.py's fingerprint of the inputs and settings, marked as preference data (the same
    file prepared as chat data is another folder)."""
    fingerprint = {**fingerprint, "kind": "preference"}
    fingerprint["sha256"] = hashlib.sha256((fingerprint["sha256"] + "\0preference").encode()).hexdigest()
    return fingerprint


def _read_chat_test(path: str, data: Any, into: list[Pair], issues: list[Issue]) -> int:
    """A test file of chat examples for a dpo run: each becomes a Pair without a rejected answer
    (its prompt and its final assistant answer, the reference). Returns the records read."""
    from tunelab.data.validate import read_examples

    read = 0
    for example, record_issues in read_examples(path, data.format, data.system_prompt):
        issues.extend(record_issues)
        if example is None:
            read += any(issue.code not in _FILE_LEVEL for issue in record_issues)
            continue
        read += 1
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        into.append(Pair(example.path, example.line, example.format, example.messages[:last],
                         example.messages[last]["content"], None, example.extra))
    return read


@dataclass
class _Member:
    split: str
    pair: Pair
    id: str = ""
    rejected: tuple[str, str] | None = None  # (reason code, message)


def prepare_preferences(
    data: DataConfig, tokenizer: PreTrainedTokenizerBase, out_dir: Path, raise_on_errors: Callable[[list[Issue]], None],
) -> dict[str, Any]:
    """The pair-specific part of the data stage (data/prepare.py: prepare_data checks the output folder,
    the fingerprint and reuse): reads, checks, splits, dedupes and tokenizes the pairs and writes the
    files of the module docstring into `out_dir`. `raise_on_errors(issues)` raises when any is an
    error. Returns stats.json's content."""
    from tunelab.data.split import assign_splits
    from tunelab.data.tokenize import TemplateProblem, end_of_turn_probe, token_stats

    # read and validate; any error blocks
    issues: list[Issue] = []
    by_role: dict[str, list[Pair]] = {"train": [], "valid": [], "test": []}
    records_read = 0
    for role in ("train", "valid", "test"):
        path = getattr(data, role)
        if path is None:
            continue
        if role == "test" and not is_preference_file(path):  # chat examples: the arms answer them as for any run
            records_read += _read_chat_test(path, data, by_role["test"], issues)
            continue
        for pair, record_issues in read_pairs(path, data.system_prompt):
            issues.extend(record_issues)
            if pair is not None:
                by_role[role].append(pair)
            if pair is not None or any(issue.code not in _FILE_LEVEL for issue in record_issues):
                records_read += 1
    problem = end_of_turn_probe(tokenizer)
    if problem:
        issues.append(Issue(f"chat template of {getattr(tokenizer, 'name_or_path', '') or 'the model'}", 0,
                            "end_of_turn_not_trained", problem))
    raise_on_errors(issues)

    # split by prompt (all pairs of a prompt share a split), then duplicates and leakage
    pool = by_role["train"]
    splits = assign_splits([prompt_key(p.messages()) for p in pool], data.seed, data.valid_fraction, data.valid_max,
                           data.test_fraction, data.test_max, make_valid=data.valid is None, make_test=data.test is None)
    members = [_Member(s, p) for s, p in zip(splits, pool, strict=True)]
    members += [_Member("valid", p) for p in by_role["valid"]] + [_Member("test", p) for p in by_role["test"]]
    members.sort(key=lambda m: SPLITS.index(m.split))
    quality = pair_quality([m.split for m in members], [m.pair for m in members])
    issues.extend(quality.issues)
    if data.dedupe:
        for later, first in quality.duplicates:
            members[later].rejected = ("duplicate_pair", f"the same pair as {members[first].pair.source}")
    for earlier, held_out in quality.leaks:
        if members[earlier].rejected is None:
            held = members[held_out]
            members[earlier].rejected = ("leakage", f"the same prompt as {held.split} pair {held.pair.source}")
    taken: set[str] = set()
    for member in members:
        base = f"{member.split}-{pair_key(member.pair).hex()[:12]}"
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}-{n}"
        taken.add(candidate)
        member.id = candidate

    # tokenize train and valid (test pairs are tokenized by the evaluation)
    lengths, trainable = array("q"), array("q")
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "valid": []}
    for member in members:
        if member.split not in rows or member.rejected is not None:
            continue
        pair = member.pair
        try:
            chosen, rejected = tokenize_pair(tokenizer, pair, data.max_seq_len)
        except TemplateProblem as err:
            issues.append(Issue(pair.path, pair.line, err.code, str(err)))
            continue
        issue = _too_long(pair, chosen, rejected, data.max_seq_len)
        if issue is not None:
            issues.append(issue)
            member.rejected = ("too_long", issue.message)
            continue
        rows[member.split].append(pair_row(member.id, chosen, rejected))
        lengths.append(len(chosen.input_ids) + len(rejected.input_ids))
        trainable.append(chosen.trainable_tokens + rejected.trainable_tokens)

    # outputs
    for split in SPLITS:
        write_json_lines(out_dir / f"{split}.jsonl", [
            {"id": m.id, "source": m.pair.source, "messages": m.pair.messages("chosen"),
             **({} if m.pair.rejected is None else {"rejected": m.pair.rejected}), **m.pair.extra}
            for m in members if m.split == split and m.rejected is None
        ])
    for split, split_rows in rows.items():
        write_json_lines(out_dir / f"{split}.tokens.jsonl", split_rows)
    dropped = [m for m in members if m.rejected is not None]
    write_json_lines(out_dir / "rejected.jsonl", [
        {"id": m.id, "source": m.pair.source, "split": m.split, "reason": m.rejected[0], "message": m.rejected[1],
         "messages": m.pair.messages("chosen"), "rejected": m.pair.rejected}
        for m in dropped
    ])
    write_json_lines(out_dir / "issues.jsonl", [issue.to_dict() for issue in issues])
    kept = Counter(m.split for m in members if m.rejected is None)
    codes = Counter(issue.code for issue in issues)
    stats = {
        "kind": "preference",
        "counts": {"read": records_read, "accepted": len(members), "rejected": len(dropped), "train": kept["train"],
                   "valid": kept["valid"], "test": kept["test"],
                   "token_rows": {s: len(r) for s, r in rows.items()},
                   "by_format": dict(Counter(m.pair.format for m in members))},
        "issues": {"errors": sum(1 for i in issues if i.severity == "error"),
                   "warnings": sum(1 for i in issues if i.severity == "warning"), "by_code": dict(sorted(codes.items()))},
        "quality": {"duplicate_pairs": len(quality.duplicates), "leakage": len({h for _, h in quality.leaks}),
                    "too_long": codes["too_long"]},
        "tokens": token_stats(lengths, trainable),
        "rejected_by_reason": dict(Counter(m.rejected[0] for m in dropped)),
        "split": {"seed": data.seed,
                  "valid": "file" if data.valid is not None else f"{data.valid_fraction:g} of train (max {data.valid_max})",
                  "test": "file" if data.test is not None else f"{data.test_fraction:g} of train (max {data.test_max})"},
        "notes": [],
    }
    DataStats.model_validate(stats).write(out_dir / "stats.json")
    raise_on_errors(issues)
    return stats

