"""Quality checks across examples: duplicates, near-duplicates, leakage, conflicts, length outliers.

Reads normalised messages one example at a time (QualityIndex.add) and keeps only fixed-size
fingerprints per example (three 64-bit hashes, a length, and a MinHash signature for the first
`near_dup_max_examples` of each split), so memory stays bounded on millions of lines. Writes nothing;
`QualityIndex.findings()` returns the issues (each naming the lines involved) and the index pairs
that `prepare` acts on.

What counts as what:
  exact_duplicate       same split, same messages (roles + stripped contents)
  conflicting_answers   same split, same prompt (every message before the last assistant turn,
                        case- and whitespace-insensitive), different final answer
  near_duplicate        same split, estimated Jaccard similarity >= 0.8 of the character 5-grams of
                        the user, assistant and tool texts (lower-cased, punctuation and runs of
                        spaces removed; system prompts are left out: a shared system prompt would
                        make unrelated examples look alike)
  leakage_exact         a valid/test example whose prompt equals a train (or, for test, valid) prompt
  leakage_near          a valid/test example that is a near-duplicate of an example of an earlier split
  length_outlier        modified z-score of log(characters) > 3.5 and at least 8x from the median
MinHash signatures are computed in numpy batches by one-permutation hashing (signatures_of), ~5x
faster than datasketch's per-example MinHash.update_batch with 64 permutations; datasketch's
MinHashLSH indexes them. The near-duplicate checks cover the first `near_dup_max_examples` (default 100,000)
examples of each split; beyond that they are skipped and `findings().notes` says so.
"""

from __future__ import annotations

import hashlib
import string
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunelab.data.validate import Issue

SPLITS = ("train", "valid", "test")
NEAR_DUP_THRESHOLD = 0.8
NEAR_DUP_MAX_EXAMPLES = 100_000
_BIN_BITS = 6
_BINS = 1 << _BIN_BITS  # signature length
_VALUE_BITS = 52  # bits of a bin's value; the bits above count densification steps
_VALUE_MASK = (1 << _VALUE_BITS) - 1
_SHINGLE_CHARS = 5
_SIGNATURE_BATCH = 512
_MAX_RELATED = 5
_OUTLIER_Z = 3.5
_OUTLIER_MIN_RATIO = 8.0
_OUTLIER_MIN_EXAMPLES = 20
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _text(message: dict[str, Any]) -> str:
    calls = message.get("tool_calls")
    return message["content"] if not calls else message["content"] + "\x1d" + repr(calls)


def conversation_keys(messages: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(whole conversation, prompt, final answer) hashes. The prompt is every message before the last
    assistant turn, compared case- and whitespace-insensitively."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    full = "\x1e".join(m["role"] + "\x1f" + _text(m).strip() for m in messages)
    prompt = "\x1e".join(m["role"] + "\x1f" + " ".join(_text(m).lower().split()) for m in messages[:last])
    return _digest(full), _digest(prompt), _digest(_text(messages[last]).strip())


def prompt_key(messages: list[dict[str, Any]]) -> bytes:
    """Stable bytes naming an example's prompt (split.py assigns splits by it, so that examples with
    the same prompt always land in the same split)."""
    return conversation_keys(messages)[1].to_bytes(8, "little")


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
        self._split = array("B")
        self._path = array("I")
        self._line = array("I")
        self._full = array("Q")
        self._prompt = array("Q")
        self._answer = array("Q")
        self._length = array("Q")
        self._near = _NearDuplicates(near_dup_threshold) if near_dup_max_examples != 0 else None
        self._near_counts = [0, 0, 0]
        self._near_skipped = [0, 0, 0]

    def __len__(self) -> int:
        return len(self._line)

    def add(self, split: str, path: str, line: int, messages: list[dict[str, Any]]) -> int:
        """Index of the example (findings name examples by these indices)."""
        split_id = SPLITS.index(split)
        path_id = self._path_ids.get(path)
        if path_id is None:
            path_id = self._path_ids[path] = len(self._paths)
            self._paths.append(path)
        index = len(self._line)
        full, prompt, answer = conversation_keys(messages)
        self._split.append(split_id)
        self._path.append(path_id)
        self._line.append(line)
        self._full.append(full)
        self._prompt.append(prompt)
        self._answer.append(answer)
        self._length.append(sum(len(m["content"]) for m in messages))
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
        full = np.frombuffer(self._full, dtype=np.uint64)
        prompt = np.frombuffer(self._prompt, dtype=np.uint64)
        answer = np.frombuffer(self._answer, dtype=np.uint64)
        duplicate_of: dict[int, int] = {}
        for group in _groups(full, split):
            for later in group[1:]:
                duplicate_of[later] = group[0]
                result.exact_duplicates.append((later, group[0]))
                result.issues.append(self._issue(later, "exact_duplicate", "the same conversation as {}", [group[0]]))
        same_prompt: set[tuple[int, int]] = set()
        for group in _groups(prompt, split):
            first = group[0]
            for later in group[1:]:
                same_prompt.add((later, first))
                if answer[later] != answer[first] and later not in duplicate_of:
                    result.conflicts.append((later, first))
                    result.issues.append(self._issue(later, "conflicting_answers", "the same prompt as {} with a different answer", [first]))
        leaked_prompt: set[int] = set()
        for group in _groups(prompt, None):
            splits = split[group]
            if splits.min() == splits.max():
                continue
            for held_out in group:
                earlier = [i for i in group if split[i] < split[held_out]]
                if earlier:
                    leaked_prompt.add(held_out)
                    result.leaks.extend((i, held_out) for i in earlier)
                    what = "the same example" if any(full[i] == full[held_out] for i in earlier) else "the same prompt"
                    result.issues.append(self._issue(held_out, "leakage_exact", f"{what} as {SPLITS[int(split[earlier[0]])]} {{}}", earlier))
        if self._near is not None:
            self._near_findings(result, split, duplicate_of, same_prompt, leaked_prompt)
        self._length_findings(result)
        result.issues.sort(key=lambda issue: (issue.path, issue.line, issue.code))
        return result

    def _near_findings(self, result: QualityResult, split: np.ndarray, duplicate_of: dict[int, int],
                       same_prompt: set[tuple[int, int]], leaked_prompt: set[int]) -> None:
        pairs = self._near.pairs()
        matches: dict[int, list[tuple[int, float]]] = {}
        for later, earlier, similarity in pairs:
            if duplicate_of.get(later) == earlier or (later, earlier) in same_prompt:
                continue  # already reported as an exact duplicate or a conflict
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


class _Signature:
    """What datasketch's MinHashLSH reads of a MinHash: the hash values and their count."""

    __slots__ = ("hashvalues",)

    def __init__(self, hashvalues: np.ndarray):
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)


class _NearDuplicates:
    """Signatures by one-permutation hashing of character 5-grams (numpy, in batches), indexed by
    datasketch's MinHashLSH; pairs are found in insertion order."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._pending: list[tuple[int, bytes]] = []
        self._signatures: dict[int, np.ndarray] = {}
        self._pairs: list[tuple[int, int, float]] = []
        self._lsh = None

    def add(self, index: int, messages: list[dict[str, Any]]) -> None:
        text = " ".join(_text(m) for m in messages if m["role"] != "system")
        normalised = " ".join(text.lower().translate(_PUNCTUATION).split())
        if normalised:
            self._pending.append((index, normalised.encode("utf-8", "surrogatepass")))
        if len(self._pending) >= _SIGNATURE_BATCH:
            self._flush()

    def pairs(self) -> list[tuple[int, int, float]]:
        self._flush()
        return self._pairs

    def _flush(self) -> None:
        if not self._pending:
            return
        from datasketch import MinHashLSH

        if self._lsh is None:
            # candidates from a lower LSH threshold, then verified at the real one: near-certain
            # recall at the threshold (0.95 at J=0.8, 0.99 at 0.85 with 64 bins)
            self._lsh = MinHashLSH(threshold=max(0.3, self.threshold - 0.2), num_perm=_BINS)
        batch, self._pending = self._pending, []
        signatures = signatures_of([text for _, text in batch])
        for (index, _), signature in zip(batch, signatures, strict=True):
            minhash = _Signature(signature)
            matched = False
            for other in self._lsh.query(minhash):
                similarity = float(np.mean(self._signatures[other] == signature))
                if similarity >= self.threshold:
                    self._pairs.append((index, other, similarity))
                    matched = True
            if not matched:
                # a near-duplicate is represented by the example it matched: clusters of thousands of
                # near-identical examples then cost one comparison each, not one per pair
                self._lsh.insert(index, minhash, check_duplication=False)
                self._signatures[index] = signature


def signatures_of(texts: list[bytes]) -> np.ndarray:
    """(len(texts), 64) uint64 MinHash signatures of the character 5-gram sets, by one-permutation
    hashing (one hash per shingle, binned by its top 6 bits, minimum per bin) with rotation
    densification for empty bins (Shrivastava & Li, 2014): P(equal bin) = Jaccard similarity."""
    padded = [t if len(t) >= _SHINGLE_CHARS else t.ljust(_SHINGLE_CHARS) for t in texts]
    lengths = np.fromiter((len(t) for t in padded), dtype=np.int64, count=len(padded))
    chars = np.frombuffer(b"".join(padded), dtype=np.uint8).astype(np.uint64)
    width = len(chars) - _SHINGLE_CHARS + 1
    with np.errstate(over="ignore"):
        hashed = chars[:width].copy()
        for k in range(1, _SHINGLE_CHARS):
            hashed = hashed * np.uint64(0x100000001B3) + chars[k : width + k]
        for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):  # murmur3's finaliser mixes all bits
            hashed ^= hashed >> np.uint64(33)
            hashed *= np.uint64(multiplier)
        hashed ^= hashed >> np.uint64(33)
    ends = np.cumsum(lengths)
    keep = np.ones(width, dtype=bool)
    for offset in range(1, _SHINGLE_CHARS):  # windows that would run into the next text
        positions = ends - offset
        keep[positions[positions < width]] = False
    hashed = hashed[keep]
    owner = np.repeat(np.arange(len(padded)), lengths - _SHINGLE_CHARS + 1)
    bins = (hashed >> np.uint64(64 - _BIN_BITS)).astype(np.int64)
    values = hashed & np.uint64(_VALUE_MASK)
    empty = np.iinfo(np.uint64).max
    signatures = np.full(len(padded) * _BINS, empty, dtype=np.uint64)
    np.minimum.at(signatures, owner * _BINS + bins, values)
    signatures = signatures.reshape(len(padded), _BINS)
    dense = signatures.copy()
    for step in range(1, _BINS):
        missing = dense == empty
        if not missing.any():
            break
        borrowed = np.roll(signatures, -step, axis=1)
        take = missing & (borrowed != empty)
        dense[take] = borrowed[take] + np.uint64(step << _VALUE_BITS)
    return dense
