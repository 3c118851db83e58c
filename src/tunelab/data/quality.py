"""Quality checks across examples: duplicates, near-duplicates, leakage, conflicts, length outliers.

Reads normalised messages one example at a time (QualityIndex.add) and keeps only fixed-size
fingerprints per example (three 64-bit hashes, a length, and a MinHash signature for the first
`near_dup_max_examples` of each split), so memory stays bounded on millions of lines. Writes nothing;
`QualityIndex.findings()` returns the issues (each naming the lines involved) and the index pairs
that `prepare` acts on.

What counts as what:
  exact_duplicate       same split, same messages (roles and contents, character for character)
  conflicting_answers   same split, same prompt (every message before the last assistant turn,
                        case- and whitespace-insensitive), different final answer
  near_duplicate        same split, estimated Jaccard similarity >= 0.8 of the character 5-grams of
                        the user, assistant and tool texts (ASCII lower-cased, punctuation and
                        whitespace runs made one space; system prompts are left out: a shared system
                        prompt would make unrelated examples look alike)
  leakage_exact         a valid/test example whose prompt equals a train (or, for test, valid) prompt
  leakage_near          a valid/test example that is a near-duplicate of an example of an earlier split
  length_outlier        modified z-score of log(characters) > 3.5 and at least 8x from the median
MinHash signatures are computed in numpy batches by one-permutation hashing (signatures_of), ~5x
faster than datasketch's per-example MinHash.update_batch with 64 permutations, and banded for LSH
in numpy too (_NearDuplicates says why not datasketch's MinHashLSH: memory). The near-duplicate
checks cover the first `near_dup_max_examples` (default 100,000; None: all) examples of each split,
~1.5-3 s per 100,000 on 2 cores; beyond the cap they are skipped and `findings().notes` says so.
Exact duplicates, conflicts, exact leakage and outliers always cover every example.
"""

from __future__ import annotations

import hashlib
import string
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunelab.data.validate import Issue

SPLITS = ("train", "valid", "test")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
NEAR_DUP_THRESHOLD = 0.8
NEAR_DUP_MAX_EXAMPLES = 100_000
_BIN_BITS = 6
_BINS = 1 << _BIN_BITS  # signature length
_VALUE_BITS = 52  # bits of a bin's value; the bits above count densification steps
_VALUE_MASK = (1 << _VALUE_BITS) - 1
_SHINGLE_CHARS = 5
# 10 bands of 6 values: P(candidate) = 1 - (1 - J^6)^10 = 0.95 at J=0.8, 0.99 at 0.85, 0.999 at 0.9,
# and 6e-4 at J=0.2, so that unrelated pairs (J ~0.1 in ordinary text) rarely become candidates
_BANDS = 10
_BAND_ROWS = 6
_BUCKET_NEIGHBOURS = 8
_VERIFY_CHUNK_PAIRS = 65536
_SIGNATURE_BATCH = 512
# signatures_of holds ~57 bytes per text byte while it runs: a batch also ends at this many text
# bytes, so long records cost ~120 MB at most, not 57 x (512 records)
_SIGNATURE_BATCH_BYTES = 2 << 20
_MAX_RELATED = 5
_OUTLIER_Z = 3.5
_OUTLIER_MIN_RATIO = 8.0
_OUTLIER_MIN_EXAMPLES = 20


def _text(message: dict[str, Any]) -> str:
    if len(message) == 2:  # role and content only
        return message["content"]
    calls = message.get("tool_calls")
    return message["content"] if not calls else message["content"] + "\x1d" + repr(calls)


def _last_assistant(messages: list[dict[str, Any]]) -> int:
    if messages[-1]["role"] == "assistant":
        return len(messages) - 1
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _squeezed(text: str) -> str:
    """Lower-cased, whitespace runs collapsed (split/join only when there is something to collapse:
    this runs on every prompt of millions of lines)."""
    text = text.lower()
    if "  " in text or "\n" in text or "\t" in text or "\r" in text or text[:1].isspace() or text[-1:].isspace():
        return " ".join(text.split())
    return text


def conversation_keys(messages: list[dict[str, Any]]) -> tuple[int, int, int, int]:
    """(whole conversation, prompt, final answer, characters): hashes equal within one process only
    (Python's hash: fast, and 64 bits keep collisions negligible for millions of examples). The
    whole conversation compares roles and exact contents; the prompt is every message before the
    last assistant turn, compared case- and whitespace-insensitively."""
    texts = [m["content"] if len(m) == 2 else _text(m) for m in messages]
    roles = tuple([m["role"] for m in messages])
    last = len(roles) - 1 if roles[-1] == "assistant" else _last_assistant(messages)
    full = hash((roles, tuple(texts)))  # caches each text's hash: the answer's below is free
    # one string for the whole prompt; the spaced separator makes whitespace at message edges collapse too
    prompt = hash((roles[:last], _squeezed(" \x00 ".join(texts[:last]))))
    return full, prompt, hash(texts[last]), sum(map(len, texts))


def prompt_key(messages: list[dict[str, Any]]) -> bytes:
    """Stable bytes (the same in every process) naming an example's prompt, compared as in
    conversation_keys. split.py assigns splits by it, so equal prompts always share a split."""
    last = _last_assistant(messages)
    text = "\x1e".join(messages[i]["role"] for i in range(last)) + "\x1f" + _squeezed(" \x00 ".join(_text(m) for m in messages[:last]))
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def conversation_id(messages: list[dict[str, Any]]) -> str:
    """12 hex digits naming a conversation, the same in every process (prepare's ids)."""
    text = "\x1e".join(m["role"] + "\x1f" + _text(m).strip() for m in messages)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()


@dataclass
class QualityResult:
    issues: list[Issue]
    exact_duplicates: list[tuple[int, int]] = field(default_factory=list)  # (duplicate, first)
    conflicts: list[tuple[int, int]] = field(default_factory=list)  # (later, first)
    near_duplicates: list[tuple[int, int]] = field(default_factory=list)  # (later, earlier)
    leaks: list[tuple[int, int]] = field(default_factory=list)  # (earlier-split example, held-out example)
    length_outliers: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The quality counts of stats.json (too_long is added by the tokenizing stage)."""
        return {
            "exact_duplicates": len(self.exact_duplicates),
            "near_duplicates": len({later for later, _ in self.near_duplicates}),
            "leakage": len({held_out for _, held_out in self.leaks}),
            "conflicts": len({later for later, _ in self.conflicts}),
            "length_outliers": len(self.length_outliers),
        }


class QualityIndex:
    """Add examples in order (train first, then valid, then test); then call findings() once."""

    def __init__(self, near_dup_threshold: float = NEAR_DUP_THRESHOLD, near_dup_max_examples: int | None = NEAR_DUP_MAX_EXAMPLES):
        self.near_dup_threshold = near_dup_threshold
        self.near_dup_max_examples = near_dup_max_examples  # per split; None: no cap; 0: off
        self._paths: list[str] = []
        self._path_ids: dict[str, int] = {}
        self._last_path, self._last_path_id = None, 0
        self._split = array("B")
        self._path = array("I")
        self._line = array("I")
        self._full = array("q")
        self._prompt = array("q")
        self._answer = array("q")
        self._length = array("Q")
        self._near = _NearDuplicates(near_dup_threshold) if near_dup_max_examples != 0 else None
        self._near_counts = [0, 0, 0]
        self._near_skipped = [0, 0, 0]

    def __len__(self) -> int:
        return len(self._line)

    def add(self, split: str, path: str, line: int, messages: list[dict[str, Any]]) -> int:
        """Index of the example (findings name examples by these indices)."""
        split_id = _SPLIT_IDS[split]
        if path != self._last_path:
            if path not in self._path_ids:
                self._path_ids[path] = len(self._paths)
                self._paths.append(path)
            self._last_path, self._last_path_id = path, self._path_ids[path]
        index = len(self._line)
        full, prompt, answer, length = conversation_keys(messages)
        self._split.append(split_id)
        self._path.append(self._last_path_id)
        self._line.append(line)
        self._full.append(full)
        self._prompt.append(prompt)
        self._answer.append(answer)
        self._length.append(length)
        if self._near is not None:
            cap = self.near_dup_max_examples
            if cap is None or self._near_counts[split_id] < cap:
                self._near_counts[split_id] += 1
                self._near.add(index, messages)
            else:
                self._near_skipped[split_id] += 1
        return index

    def source(self, index: int) -> str:
        return f"{self._paths[self._path[index]]}:{self._line[index]}"

    def _issue(self, index: int, code: str, message: str, related: list[int]) -> Issue:
        sources = tuple(self.source(i) for i in related[:_MAX_RELATED])
        more = f" (and {len(related) - _MAX_RELATED} more)" if len(related) > _MAX_RELATED else ""
        return Issue(self._paths[self._path[index]], self._line[index], code, message.format(", ".join(sources)) + more,
                     related=sources)

    def findings(self) -> QualityResult:
        result = QualityResult(issues=[])
        if not len(self):
            return result
        split = np.frombuffer(self._split, dtype=np.uint8).astype(np.uint64)
        full = np.frombuffer(self._full, dtype=np.int64).view(np.uint64)
        prompt = np.frombuffer(self._prompt, dtype=np.int64).view(np.uint64)
        answer = np.frombuffer(self._answer, dtype=np.int64).view(np.uint64)
        duplicate_of: dict[int, int] = {}
        for group in _groups(full, split):
            for later in group[1:]:
                duplicate_of[later] = group[0]
                result.exact_duplicates.append((later, group[0]))
                result.issues.append(self._issue(later, "exact_duplicate", "the same conversation as {}", [group[0]]))
        for group in _groups(prompt, split):
            first = group[0]
            for later in group[1:]:
                if answer[later] != answer[first] and later not in duplicate_of:
                    result.conflicts.append((later, first))
                    result.issues.append(self._issue(later, "conflicting_answers", "the same prompt as {} with a different answer", [first]))
        leaked_prompt: set[int] = set()
        for group in _groups(prompt, None):
            splits = split[group]
            if splits.min() == splits.max():
                continue
            for split_id in sorted(set(splits.tolist()))[1:]:
                earlier = [i for i in group if split[i] < split_id]
                held_out = [i for i in group if split[i] == split_id]
                result.leaks.extend((i, held_out[0]) for i in earlier)  # every earlier one goes, in prepare
                for index in held_out:
                    leaked_prompt.add(index)
                    what = "the same example" if any(full[i] == full[index] for i in earlier[:_MAX_RELATED]) else "the same prompt"
                    result.issues.append(self._issue(index, "leakage_exact", f"{what} as {SPLITS[int(split[earlier[0]])]} {{}}", earlier))
        if self._near is not None:
            self._near_findings(result, split, full, prompt, leaked_prompt)
        self._length_findings(result)
        result.issues.sort(key=lambda issue: (issue.path, issue.line, issue.code))
        return result

    def _near_findings(self, result: QualityResult, split: np.ndarray, full: np.ndarray, prompt: np.ndarray,
                       leaked_prompt: set[int]) -> None:
        pairs = self._near.pairs()
        matches: dict[int, list[tuple[int, float]]] = {}
        for later, earlier, similarity in pairs:
            if full[later] == full[earlier] or prompt[later] == prompt[earlier]:
                continue  # an exact duplicate, a conflict or an exact leak: reported as such
            matches.setdefault(later, []).append((earlier, similarity))
        for later in sorted(matches):
            found = sorted(matches[later])
            same = [(i, s) for i, s in found if split[i] == split[later]]
            earlier_split = [(i, s) for i, s in found if split[i] < split[later]]
            if same:
                result.near_duplicates.extend((later, i) for i, _ in same)
                best = max(s for _, s in same)
                result.issues.append(self._issue(later, "near_duplicate", f"~{best:.0%} similar to {{}}", [i for i, _ in same]))
            if earlier_split and later not in leaked_prompt:
                result.leaks.extend((i, later) for i, _ in earlier_split)
                best = max(s for _, s in earlier_split)
                name = SPLITS[int(split[earlier_split[0][0]])]
                result.issues.append(self._issue(later, "leakage_near", f"~{best:.0%} similar to {name} {{}}", [i for i, _ in earlier_split]))
        for split_id, skipped in enumerate(self._near_skipped):
            if skipped:
                result.notes.append(
                    f"near-duplicate checks covered the first {self.near_dup_max_examples} {SPLITS[split_id]} examples; "
                    f"{skipped} more were not compared (raise the cap with --near-dup-max)"
                )

    def _length_findings(self, result: QualityResult) -> None:
        lengths = np.frombuffer(self._length, dtype=np.uint64).astype(np.float64)
        if len(lengths) < _OUTLIER_MIN_EXAMPLES:
            return
        logs = np.log1p(lengths)
        median = float(np.median(logs))
        mad = float(np.median(np.abs(logs - median)))
        if mad == 0:
            mad = float(np.mean(np.abs(logs - median))) or 1.0
        z = 0.6745 * (logs - median) / mad
        ratio = np.exp(np.abs(logs - median))
        median_chars = float(np.expm1(median))
        for index in np.nonzero((np.abs(z) > _OUTLIER_Z) & (ratio >= _OUTLIER_MIN_RATIO))[0]:
            index = int(index)
            result.length_outliers.append(index)
            side = "longer" if logs[index] > median else "shorter"
            result.issues.append(Issue(
                self._paths[self._path[index]], self._line[index], "length_outlier",
                f"{int(lengths[index])} characters, {ratio[index]:.0f}x {side} than the median ({median_chars:.0f})",
            ))


def _groups(keys: np.ndarray, split: np.ndarray | None) -> list[list[int]]:
    """Indices sharing a key (and a split, when given), each group in ascending order; only groups of 2+."""
    if split is not None:
        keys = keys ^ (split * np.uint64(0x9E3779B97F4A7C15))
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    repeated = np.nonzero(ordered[1:] == ordered[:-1])[0]
    if not len(repeated):
        return []
    groups: list[list[int]] = []
    current: list[int] = []
    previous = -2
    for position in repeated.tolist():
        if position != previous + 1:
            if current:
                groups.append(current)
            current = [int(order[position])]
        current.append(int(order[position + 1]))
        previous = position
    groups.append(current)
    return groups


class _NearDuplicates:
    """Near-duplicate pairs by MinHash + LSH banding, all in numpy. Signatures (one-permutation
    hashing of character 5-grams, 64 values) are computed in batches as examples arrive and kept
    (512 bytes an example); pairs() bands them (10 bands of 6 values), takes examples that share a
    band as candidates and keeps those whose signatures agree on >= threshold of the 64 values.
    datasketch's MinHashLSH was measured at ~5 KB of Python objects per example (560 MiB peak for
    100,000 examples) and ~40 us per insert+query; this is ~0.6 KB and vectorized."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._pending: list[bytes] = []
        self._pending_index: list[int] = []
        self._pending_bytes = 0
        self._blocks: list[np.ndarray] = []
        self._indices = array("q")

    def add(self, index: int, messages: list[dict[str, Any]]) -> None:
        self.add_text(index, " ".join([_text(m) for m in messages if m["role"] != "system"]))

    def add_text(self, index: int, text: str) -> None:
        encoded = text.encode("utf-8", "surrogatepass")
        self._pending.append(encoded)
        self._pending_index.append(index)
        self._pending_bytes += len(encoded)
        if len(self._pending) >= _SIGNATURE_BATCH or self._pending_bytes >= _SIGNATURE_BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            signatures, usable = signatures_of(self._pending)
            self._blocks.append(signatures[usable])
            self._indices.extend(i for i, ok in zip(self._pending_index, usable.tolist(), strict=True) if ok)
            self._pending, self._pending_index, self._pending_bytes = [], [], 0

    def pairs(self) -> list[tuple[int, int, float]]:
        """(later, earlier, similarity) in example indices, later > earlier."""
        self._flush()
        if not self._blocks:
            return []
        signatures = np.concatenate(self._blocks)
        self._blocks = [signatures]
        rows = len(signatures)
        codes = []  # candidate pairs as later * rows + earlier: 8 bytes a pair
        for band in range(_BANDS):
            values = signatures[:, band * _BAND_ROWS : (band + 1) * _BAND_ROWS]
            with np.errstate(over="ignore"):
                keys = values[:, 0].copy()
                for column in range(1, _BAND_ROWS):  # collisions only add candidates, which are verified
                    keys = keys * np.uint64(0x9E3779B97F4A7C15) + values[:, column]
            codes.extend(later * rows + earlier for later, earlier in _bucket_pairs(keys))
        if not codes:
            return []
        candidates = np.unique(np.concatenate(codes))
        del codes
        indices = np.frombuffer(self._indices, dtype=np.int64)
        found: list[tuple[int, int, float]] = []
        for start in range(0, len(candidates), _VERIFY_CHUNK_PAIRS):  # bounded memory for the row gathers
            chunk = candidates[start : start + _VERIFY_CHUNK_PAIRS]
            later, earlier = chunk // rows, chunk % rows
            agreement = np.mean(signatures[later] == signatures[earlier], axis=1)
            keep = agreement >= self.threshold
            found.extend(zip(indices[later[keep]].tolist(), indices[earlier[keep]].tolist(), agreement[keep].tolist(), strict=True))
        return found


def near_duplicate_texts(texts: Iterable[tuple[int, str]], threshold: float = NEAR_DUP_THRESHOLD) -> list[tuple[int, int, float]]:
    """(later, earlier, estimated Jaccard similarity >= threshold) among (index, text) items, later >
    earlier: the near_duplicate check's MinHash/LSH on texts of the caller's choosing (preference
    pairs compare prompts and answers apart, data/preference.py)."""
    finder = _NearDuplicates(threshold)
    for index, text in texts:
        finder.add_text(index, text)
    return finder.pairs()


def _bucket_pairs(keys: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(later rows, earlier rows) that share a key: each row with the first row of its bucket and
    with up to _BUCKET_NEIGHBOURS rows just before it (a bucket of thousands of near-identical
    examples then costs thousands of comparisons, not millions)."""
    order = np.argsort(keys, kind="stable")  # equal keys keep ascending row order
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    sizes = np.diff(np.concatenate((starts, [len(keys)])))
    out = []
    for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
        members = order[start : start + size].astype(np.int64)
        for back in range(1, min(size, _BUCKET_NEIGHBOURS + 1)):
            out.append((members[back:], members[:-back]))
        if size > _BUCKET_NEIGHBOURS + 1:
            rest = members[_BUCKET_NEIGHBOURS + 1 :]
            out.append((rest, np.full(len(rest), members[0])))
    return out


def _fold_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint8)
    table[ord("A") : ord("Z") + 1] += 32
    for char in string.punctuation + string.whitespace:
        table[ord(char)] = ord(" ")
    return table


_FOLD = _fold_table()  # byte -> ASCII lower case; punctuation and whitespace -> space


def signatures_of(texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(signatures, usable): (len(texts), 64) uint64 MinHash signatures of the character 5-gram sets
    of each UTF-8 text, normalised first (ASCII lower case, punctuation and whitespace runs to one
    space), by one-permutation hashing (one hash per shingle, binned by its top 6 bits, minimum per
    bin) with rotation densification for empty bins (Shrivastava & Li, 2014): P(equal bin) = Jaccard
    similarity. `usable` is False for texts shorter than one shingle after normalising. All numpy:
    the Python cost per text is one join."""
    raw_lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    folded = _FOLD[np.frombuffer(b"".join(texts), dtype=np.uint8)]
    starts = np.concatenate(([0], np.cumsum(raw_lengths)[:-1]))
    space = folded == ord(" ")
    drop = space.copy()
    drop[1:] &= space[:-1]  # a space after a space
    nonempty = starts[raw_lengths > 0]
    drop[nonempty] = space[nonempty]  # a text's leading space
    kept = ~drop
    chars = folded[kept].astype(np.uint64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    if len(nonempty):
        lengths[raw_lengths > 0] = np.add.reduceat(kept, nonempty)
    usable = lengths >= _SHINGLE_CHARS
    empty = np.iinfo(np.uint64).max
    signatures = np.full(len(texts) * _BINS, empty, dtype=np.uint64)
    width = len(chars) - _SHINGLE_CHARS + 1
    if width > 0 and usable.any():
        with np.errstate(over="ignore"):
            hashed = chars[:width].copy()
            for k in range(1, _SHINGLE_CHARS):
                hashed = hashed * np.uint64(0x100000001B3) + chars[k : width + k]
            for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):  # murmur3's finaliser mixes all bits
                hashed ^= hashed >> np.uint64(33)
                hashed *= np.uint64(multiplier)
            hashed ^= hashed >> np.uint64(33)
        owner = np.repeat(np.arange(len(texts)), lengths)  # the text each kept character belongs to
        whole = owner[:width] == owner[_SHINGLE_CHARS - 1 :]  # windows inside one text
        hashed, owner = hashed[whole], owner[:width][whole]
        bins = (hashed >> np.uint64(64 - _BIN_BITS)).astype(np.int64)
        np.minimum.at(signatures, owner * _BINS + bins, hashed & np.uint64(_VALUE_MASK))
    signatures = signatures.reshape(len(texts), _BINS)
    dense = signatures.copy()
    for step in range(1, _BINS):
        missing = dense[usable] == empty
        if not missing.any():
            break
        borrowed = np.roll(signatures, -step, axis=1)
        take = (dense == empty) & (borrowed != empty)
        dense[take] = borrowed[take] + np.uint64(step << _VALUE_BITS)
    return dense, usable
