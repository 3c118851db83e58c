"""`data prepare`: read, validate, split, dedupe, tokenize; write the data stage's output folder.

Reads recipe.data (train, optional valid/test files, format, max_seq_len, splits, dedupe,
system_prompt) and a tokenizer with a chat template. Writes into out_dir:
  train.jsonl valid.jsonl test.jsonl   {"id", "source": "path:line", "messages": [...]} per example, plus
                                       the record's other keys as they were (graders read them as item.<key>)
  train.tokens.jsonl valid.tokens.jsonl {"id", "input_ids", "labels"} (labels -100 except trained
                                       assistant tokens and their end-of-turn token)
  stats.json      counts, issues by code, quality counts, token statistics (keys: see DataStats)
  issues.jsonl    every issue (errors, warnings, quality findings), one per line
  rejected.jsonl  every accepted example that was dropped, with its reason and message
  replay.jsonl    the replay examples mixed into training (data/replay.py): tokenized into
                  train.tokens.jsonl only, never split off to valid/test, not in train.jsonl (the few-shot
                  and retrieval pool stays the task's)
  fingerprint.json  sha256 of the inputs, tokenizer, chat template and settings; written last
Never writes next to or over the input files (an output path that is an input is refused).

Rules: any error blocks (DataError with a summary; issues.jsonl is still written). Nothing accepted
is dropped silently: accepted = train + valid + test + rejected, and every rejected example is in
rejected.jsonl. Dropped are: exact duplicates within a split (when data.dedupe), training examples
whose prompt equals, or whose text nearly equals, a held-out example (always: evaluation must never
see training examples; a valid example that matches a test example is dropped from valid the same
way), examples longer than max_seq_len, and examples with no trainable token. Ids are
"<split>-<12 hex digits of the conversation hash>": stable across runs and additions.
An unchanged fingerprint reuses the folder as it is, without re-tokenizing.

Public API: prepare_data(recipe, tokenizer, out_dir) -> PreparedData; data_fingerprint(...).
"""

from __future__ import annotations

import hashlib
import json
import sys
from array import array
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import DataConfig, Recipe, TrainConfig
from tunelab.contract import ContractError, DataFingerprint, DataStats
from tunelab.data.formats import data_files, dump_json_line, write_json_lines
from tunelab.data.preference import is_preference_file, preference_fingerprint, prepare_preferences
from tunelab.data.quality import SPLITS, QualityIndex, conversation_id, prompt_key
from tunelab.data.replay import (
    auto_per_pass,
    choose_replay,
    decide_replay_share,
    replay_count,
    replay_head,
    replay_pool_size,
    replay_share_key,
)
from tunelab.data.split import assign_splits
from tunelab.data.tokenize import (
    TemplateProblem,
    TokenizedExample,
    end_of_turn_probe,
    token_stats,
    tokenize_for_training,
)
from tunelab.data.validate import Example, Issue, read_examples
from tunelab.errors import ConfigError, DataError
from tunelab.files import AtomicTextFile, sha256_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DATA_VERSION = 2  # bump when the outputs change meaning: older fingerprints then never match (2: extra keys kept)
OUTPUT_FILES = (
    "train.jsonl", "valid.jsonl", "test.jsonl", "train.tokens.jsonl", "valid.tokens.jsonl",
    "stats.json", "issues.jsonl", "rejected.jsonl", "replay.jsonl",
)
_FILE_LEVEL = ("unreadable_file", "empty_file", "skipped_file")
_PROGRESS_MIN_EXAMPLES = 2000


@dataclass
class PreparedData:
    out_dir: Path
    stats: dict[str, Any]
    reused: bool = False  # the fingerprint matched: nothing was recomputed

    def path(self, split: str, tokens: bool = False) -> Path:
        return self.out_dir / (f"{split}.tokens.jsonl" if tokens else f"{split}.jsonl")

    def conversations(self, split: str) -> list[dict[str, Any]]:
        """{"id", "source", "messages"} of a split (train, valid or test)."""
        return _read_jsonl(self.path(split))

    def tokenized(self, split: str) -> list[dict[str, Any]]:
        """{"id", "input_ids", "labels"} of train or valid."""
        return _read_jsonl(self.path(split, tokens=True))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- fingerprint


def _sha256_input(path: Path) -> str:
    """A file's sha256; for a folder, the sha256 of its data files' relative names and hashes."""
    if not path.exists():
        return "missing"
    if path.is_file():
        return sha256_file(path)
    files, _ = data_files(path)
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path)}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(sorted(map(str, tokenizer.all_special_tokens)))
    return _sha256_text(vocabulary + "\0" + special)


def data_fingerprint(data: DataConfig, tokenizer: PreTrainedTokenizerBase,
                     replay: tuple[Path, float | str] | None = None) -> dict[str, Any]:
    """What the prepared folder depends on; equal fingerprints mean equal outputs. `replay`: the replay
    file and its share of training examples (data/replay.py: replay_share_key)."""
    inputs = {role: {"path": str(getattr(data, role)), "sha256": _sha256_input(Path(getattr(data, role)))}
              for role in ("train", "valid", "test") if getattr(data, role) is not None}
    if replay is not None:
        inputs["replay"] = {"path": str(replay[0]), "sha256": _sha256_input(replay[0]), "share": replay[1]}
    settings = data.model_dump(mode="json", exclude={"train", "valid", "test"})
    fingerprint = {
        "version": DATA_VERSION,
        "inputs": inputs,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "chat_template_sha256": _sha256_text(tokenizer.chat_template or ""),
        "settings": settings,
    }
    # paths may be spelt differently between runs; the contents are what matters
    hashed = {**fingerprint, "inputs": {role: value["sha256"] + (f"@{value['share']}" if "share" in value else "")
                                        for role, value in inputs.items()}}
    fingerprint["sha256"] = _sha256_text(json.dumps(hashed, sort_keys=True))
    return fingerprint


def _reusable(out_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """stats.json of a previous preparation with the same fingerprint, or None."""
    try:
        previous = DataFingerprint.read_keys(out_dir / "fingerprint.json")
        stats = DataStats.read_keys(out_dir / "stats.json")
    except (OSError, ContractError):
        return None
    if previous.get("sha256") != fingerprint["sha256"] or not all((out_dir / name).is_file() for name in OUTPUT_FILES):
        return None
    return stats


# ---------------------------------------------------------------------------------------------- writing


def _refuse_overwriting_inputs(data: DataConfig, out_dir: Path) -> None:
    inputs = set()
    for role in ("train", "valid", "test"):
        value = getattr(data, role)
        if value is not None:
            files, _ = data_files(Path(value))
            inputs.update(f.resolve() for f in files if f.exists())
    for name in (*OUTPUT_FILES, "fingerprint.json"):
        target = (out_dir / name).resolve()
        if target in inputs:
            raise ConfigError(f"{target}: is an input file; choose another --out folder (tunelab never modifies your data)")


def _refuse_overwriting_foreign_files(out_dir: Path) -> None:
    """A folder prepare did not write may hold files of the same names (a user's own train.jsonl):
    they are never overwritten. Prepare's folders are known by fingerprint.json, or, after a failed
    prepare, by issues.jsonl alone holding tunelab's issue lines."""
    if (out_dir / "fingerprint.json").is_file():
        return
    clashes = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if clashes == ["issues.jsonl"]:
        try:
            with (out_dir / "issues.jsonl").open(encoding="utf-8") as f:
                line = f.readline(1 << 16)
            if not line.strip():  # empty: nothing to lose
                return
            first = json.loads(line)
            if isinstance(first, dict) and {"path", "line", "code"} <= set(first):
                return
        except (OSError, ValueError):
            pass
    if clashes:
        raise ConfigError(f"--out {out_dir}: holds {', '.join(clashes)}, which data prepare would overwrite and did not "
                          "write (no fingerprint.json); choose a new folder, or move them (tunelab never overwrites "
                          "your files)")


# ---------------------------------------------------------------------------------------------- prepare


@dataclass
class _Member:
    split: str
    example: Example
    id: str = ""
    rejected: tuple[str, str] | None = None  # (reason code, message)
    token_rows: int = 0  # rows written to <split>.tokens.jsonl (more than 1 for a per-turn fallback)
    replay: bool = False  # a replay example (data/replay.py): trained on, in no split's own files
    tokens: int = 0  # tokens of its rows once tokenized
    head: bool = False  # a self-replay example: its row trains the first answer tokens only (data/replay.py replay_head)


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, out_dir: Path,
                 replay_file: Path | None = None) -> PreparedData:
    """`replay_file`: general chat examples mixed into training at train.replay_share (tunelab train passes
    train.replay or the base model's own answers; None: no replay)."""
    data = recipe.data
    if data.train is None:
        raise ConfigError("data.train is not set: give a training file (tunelab data prepare FILE --out DIR)")
    out_dir = Path(out_dir)
    _refuse_overwriting_inputs(data, out_dir)
    _refuse_overwriting_foreign_files(out_dir)
    pairs = recipe.method == "dpo" or is_preference_file(data.train)  # preference pairs: data/preference.py
    # replay examples are supervised answers: a preference run has no place for them
    replay = replay_file if replay_file is not None and not pairs and recipe.train.replay_share != 0 else None
    fingerprint = data_fingerprint(data, tokenizer, (replay, replay_share_key(recipe.train)) if replay else None)
    fingerprint = preference_fingerprint(fingerprint) if pairs else fingerprint
    stats = _reusable(out_dir, fingerprint)
    if stats is not None:
        return PreparedData(out_dir, stats, reused=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fingerprint.json").unlink(missing_ok=True)  # a half-written folder must never look reusable
    if pairs:  # their own rules, the same files
        stats = prepare_preferences(data, tokenizer, out_dir, lambda issues: _raise_on_errors(issues, out_dir))
        write_json_lines(out_dir / "replay.jsonl", [])  # no replay for pairs: a dpo run learns a preference
        DataFingerprint.model_validate(fingerprint).write(out_dir / "fingerprint.json")
        return PreparedData(out_dir, stats)

    # read and validate every input
    issues: list[Issue] = []
    by_role: dict[str, list[Example]] = {"train": [], "valid": [], "test": []}
    records_read = 0
    formats: Counter[str] = Counter()
    for role in ("train", "valid", "test"):
        path = getattr(data, role)
        if path is None:
            continue
        for example, record_issues in read_examples(path, data.format, data.system_prompt):
            issues.extend(record_issues)
            if example is not None:
                by_role[role].append(example)
                formats[example.format] += 1
                records_read += 1
            elif any(issue.code not in _FILE_LEVEL for issue in record_issues):
                records_read += 1
    template_problem = end_of_turn_probe(tokenizer)
    if template_problem:
        issues.append(Issue(_model_name(tokenizer), 0, "end_of_turn_not_trained", template_problem))
    _raise_on_errors(issues, out_dir)

    # split the training file when no valid/test file is given (by prompt: equal prompts stay together)
    pool = by_role["train"]
    splits = assign_splits(
        [prompt_key(e.messages) for e in pool], data.seed, data.valid_fraction, data.valid_max,
        data.test_fraction, data.test_max, make_valid=data.valid is None, make_test=data.test is None,
    )
    members = [_Member(s, e) for s, e in zip(splits, pool, strict=True)]
    members += [_Member("valid", e) for e in by_role["valid"]] + [_Member("test", e) for e in by_role["test"]]
    members.sort(key=lambda m: SPLITS.index(m.split))  # stable: file order within each split

    # quality across splits; drop duplicates and anything a held-out example would leak from
    index = QualityIndex()
    for member in members:
        index.add(member.split, member.example.path, member.example.line, member.example.messages)
    quality = index.findings()
    issues.extend(quality.issues)
    if data.dedupe:
        for duplicate, first in quality.exact_duplicates:
            members[duplicate].rejected = ("exact_duplicate", f"the same conversation as {index.source(first)}")
    leaked: dict[int, int] = {}
    for earlier, held_out in quality.leaks:
        leaked.setdefault(earlier, held_out)
    # near-duplicates of a leaked example leak too, transitively within its split (the near-duplicate
    # check pairs each example with a few neighbours, not with every member of a large cluster)
    neighbours: dict[int, list[int]] = {}
    for later, earlier in quality.near_duplicates:
        neighbours.setdefault(later, []).append(earlier)
        neighbours.setdefault(earlier, []).append(later)
    frontier = list(leaked)
    while frontier:
        current = frontier.pop()
        for other in neighbours.get(current, ()):
            if other not in leaked and members[other].split == members[current].split:
                leaked[other] = leaked[current]
                frontier.append(other)
    for earlier, held_out in leaked.items():
        if members[earlier].rejected is None:
            held = members[held_out]
            members[earlier].rejected = ("leakage", f"the same or nearly the same as {held.split} example {held.example.source}")

    replay_stats = _add_replay(members, recipe.train, replay, data, issues) if replay else None
    _raise_on_errors(issues, out_dir)

    _assign_ids(members)
    token_issues, prefix_fallbacks, lengths, trainable = _tokenize(members, tokenizer, data.max_seq_len, out_dir)
    issues.extend(token_issues)
    if prefix_fallbacks:
        first = prefix_fallbacks[0]
        issues.append(Issue(_model_name(tokenizer), 0, "prefix_mismatch",
                            f"the chat template renders earlier turns differently in {len(prefix_fallbacks)} examples "
                            f"(first: {first}); each trained turn became its own example"))

    stats = _stats(members, issues, quality.counts(), records_read, formats, quality.notes, data, token_stats(lengths, trainable))
    if replay_stats is not None:
        _hold_replay_tokens(members, replay_stats)
        stats["replay"] = replay_stats
    _write_outputs(out_dir, members, issues, stats)
    _raise_on_errors(issues, out_dir)
    DataFingerprint.model_validate(fingerprint).write(out_dir / "fingerprint.json")
    return PreparedData(out_dir, stats)


def _add_replay(members: list[_Member], train: TrainConfig, replay_file: Path, data: DataConfig,
                issues: list[Issue]) -> dict[str, Any]:
    """Replay examples joining the training split at `replay.share` of its kept examples: never one whose
    prompt is a held-out or training example's (it would leak, or duplicate); problems in the file are issues."""
    candidates = []
    empty = not replay_file.read_text(encoding="utf-8").strip()  # e.g. no base-model answer passed the check
    for example, record_issues in [] if empty else read_examples(replay_file, "auto", data.system_prompt):
        issues.extend(record_issues)
        if example is not None:
            candidates.append(example)
    taken = {prompt_key(m.example.messages) for m in members}
    fresh, seen = [], set()
    for example in candidates:
        key = prompt_key(example.messages)
        if key not in taken and key not in seen:
            seen.add(key)
            fresh.append(example)
    task = sum(1 for m in members if m.split == "train" and m.rejected is None)
    replay = decide_replay_share(train, replay_file, task, len(fresh))
    auto = replay.share_source == "auto"
    wanted = replay_count(task, replay.share)  # a pass's share; the pool is spread across the passes
    # auto keeps every usable one: a pass's slice is what its share of the tokens buys (_hold_replay_tokens)
    chosen = choose_replay(fresh, len(fresh) if auto else replay_pool_size(task, wanted, len(fresh)), data.seed)
    members.extend(_Member("train", example, replay=True, head=replay.source == "self") for example in chosen)
    stats = replay.to_dict(len(chosen), len(fresh))
    per_pass = min(wanted, len(chosen))
    if per_pass < wanted and not auto:
        stats["reason"] += (f"; only {len(fresh)} usable replay examples (after the quality check and leaving out "
                            "prompts of your data), so the share is smaller")
    stats["per_pass"] = per_pass
    stats["share_actual"] = per_pass / (task + per_pass) if task + per_pass else 0.0
    return stats


def _hold_replay_tokens(members: list[_Member], stats: dict[str, Any]) -> None:
    """Auto replay's `per_pass`, what its share of a pass's tokens buys once the examples are tokenized
    (data/replay.py auto_per_pass); a recipe's own train.replay_share is kept as asked."""
    if stats.get("share_source") != "auto":
        return
    task = [m for m in members if m.split == "train" and not m.replay and m.rejected is None]
    replay = [m.tokens for m in members if m.replay and m.rejected is None]
    per_pass, why = auto_per_pass(sum(m.tokens for m in task), sum(replay) / len(replay) if replay else 0.0, len(replay))
    stats["per_pass"] = per_pass
    stats["share"] = stats["share_actual"] = per_pass / (len(task) + per_pass) if task or per_pass else 0.0
    stats["reason"] = f"{why}; {stats['reason']}"


def _model_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return f"chat template of {getattr(tokenizer, 'name_or_path', '') or 'the model'}"


def _raise_on_errors(issues: list[Issue], out_dir: Path) -> None:
    errors = [issue for issue in issues if issue.severity == "error"]
    if not errors:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_lines(out_dir / "issues.jsonl", [issue.to_dict() for issue in issues])
    codes = Counter(issue.code for issue in errors)
    by_code = ", ".join(f"{code} {n}" for code, n in codes.most_common())
    raise DataError(
        f"{len(errors)} error(s) in the data ({by_code}); first: {errors[0].format()}. "
        f"All issues: {out_dir / 'issues.jsonl'} (or run `tunelab data check`)"
    )


def _assign_ids(members: list[_Member]) -> None:
    taken: set[str] = set()
    for member in members:
        base = f"{'replay' if member.replay else member.split}-{conversation_id(member.example.messages)}"
        candidate, n = base, 1
        while candidate in taken:  # identical conversations kept with data.dedupe off
            n += 1
            candidate = f"{base}-{n}"
        taken.add(candidate)
        member.id = candidate


def _tokenize(
    members: list[_Member], tokenizer: PreTrainedTokenizerBase, max_seq_len: int, out_dir: Path
) -> tuple[list[Issue], list[str], array, array]:
    """Tokenizes train and valid, writing *.tokens.jsonl as it goes (token ids never pile up in
    memory); returns the issues, the examples that needed the per-turn fallback, and each written
    row's length and trainable tokens."""
    issues: list[Issue] = []
    prefix_fallbacks: list[str] = []
    lengths, trainable = array("q"), array("q")
    writers = {split: AtomicTextFile(out_dir / f"{split}.tokens.jsonl") for split in ("train", "valid")}
    todo = [m for m in members if m.split in writers and m.rejected is None]
    try:
        _tokenize_into(todo, writers, tokenizer, max_seq_len, issues, prefix_fallbacks, lengths, trainable)
    except BaseException:  # interrupted or failed: leave no temporary files behind, then re-raise
        for writer in writers.values():
            writer.abandon()
        raise
    for writer in writers.values():
        writer.commit()
    return issues, prefix_fallbacks, lengths, trainable


def _tokenize_into(todo: list[_Member], writers: dict[str, AtomicTextFile], tokenizer: PreTrainedTokenizerBase,
                   max_seq_len: int, issues: list[Issue], prefix_fallbacks: list[str], lengths: array, trainable: array) -> None:
    from tqdm import tqdm

    for member in tqdm(todo, desc="tokenizing", unit="ex", file=sys.stderr, disable=len(todo) < _PROGRESS_MIN_EXAMPLES):
        example = member.example
        try:
            parts = tokenize_for_training(tokenizer, example.messages, max_seq_len)
        except TemplateProblem as err:
            issues.append(Issue(example.path, example.line, err.code, str(err)))
            continue
        longest = max((p.length for p in parts), default=0)
        if any(p.truncated for p in parts):
            message = f"{longest} tokens > max_seq_len {max_seq_len}"
            member.rejected = ("too_long", message)
            issues.append(Issue(example.path, example.line, "too_long", message))
            continue
        if sum(p.trainable_tokens for p in parts) == 0:
            member.rejected = ("zero_trainable_tokens", "no assistant token would be trained")
            if not any(w.code == "zero_trainable_tokens" for w in example.warnings):
                issues.append(Issue(example.path, example.line, "zero_trainable_tokens", "no assistant token would be trained"))
            continue
        if member.head:
            parts = [_head_row(part) for part in parts]
        if not parts[0].prefix_ok:
            prefix_fallbacks.append(example.source)
        for k, part in enumerate(parts, 1):
            row_id = f"{member.id}/turn-{k}" if len(parts) > 1 else member.id
            writers[member.split].write(dump_json_line({"id": row_id, "input_ids": part.input_ids, "labels": part.labels}))
            lengths.append(len(part.input_ids))
            trainable.append(part.trainable_tokens)
        member.token_rows = len(parts)
        member.tokens = sum(len(p.input_ids) for p in parts)


def _head_row(part: TokenizedExample) -> TokenizedExample:
    """A self-replay row cut to its first answer tokens (data/replay.py replay_head)."""
    input_ids, labels = replay_head(part.input_ids, part.labels)
    return replace(part, input_ids=input_ids, labels=labels)


def _stats(members: list[_Member], issues: list[Issue], quality: dict[str, int], records_read: int,
           formats: Counter[str], notes: list[str], data: DataConfig, tokens: dict[str, float]) -> dict[str, Any]:
    replayed = [m for m in members if m.replay]
    members = [m for m in members if not m.replay]  # the counts are the user's data; replay has its own
    kept = Counter(m.split for m in members if m.rejected is None)
    rejected = [m for m in members if m.rejected is not None]
    codes = Counter(issue.code for issue in issues)
    return {
        "counts": {
            "read": records_read, "accepted": len(members), "rejected": len(rejected),
            "train": kept["train"], "valid": kept["valid"], "test": kept["test"],
            "token_rows": {s: sum(m.token_rows for m in members if m.split == s) for s in ("train", "valid")},
            "replay": sum(1 for m in replayed if m.rejected is None),
            "by_format": dict(formats),
        },
        "issues": {
            "errors": sum(1 for i in issues if i.severity == "error"),
            "warnings": sum(1 for i in issues if i.severity == "warning"),
            "by_code": dict(sorted(codes.items())),
        },
        "quality": {**quality, "too_long": codes["too_long"], "zero_trainable_tokens": codes["zero_trainable_tokens"]},
        "tokens": tokens,
        "rejected_by_reason": dict(Counter(m.rejected[0] for m in rejected)),
        "split": {
            "seed": data.seed,
            "valid": "file" if data.valid is not None else f"{data.valid_fraction:g} of train (max {data.valid_max})",
            "test": "file" if data.test is not None else f"{data.test_fraction:g} of train (max {data.test_max})",
        },
        "notes": notes,
    }


def _write_outputs(out_dir: Path, members: list[_Member], issues: list[Issue], stats: dict[str, Any]) -> None:
    write_json_lines(out_dir / "replay.jsonl", [{"id": m.id, "source": m.example.source, "messages": m.example.messages}
                                            for m in members if m.replay and m.rejected is None])
    for split in SPLITS:
        kept = [m for m in members if m.split == split and m.rejected is None and not m.replay]
        write_json_lines(out_dir / f"{split}.jsonl",
                     [{"id": m.id, "source": m.example.source, "messages": m.example.messages, **m.example.extra}
                      for m in kept])
    write_json_lines(out_dir / "rejected.jsonl", [
        {"id": m.id, "source": m.example.source, "split": m.split, "reason": m.rejected[0], "message": m.rejected[1],
         "messages": m.example.messages}
        for m in members if m.rejected is not None
    ])
    write_json_lines(out_dir / "issues.jsonl", [issue.to_dict() for issue in issues])
    DataStats.model_validate(stats).write(out_dir / "stats.json")
