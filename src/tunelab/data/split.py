"""Seeded, stable train/valid/test split by a hash of each example's prompt.

Reads split keys (quality.prompt_key: examples with the same prompt share a key, so they always land
in the same split and cannot leak across it); writes nothing. Each example draws u in [0, 1) from
blake2b(seed, key): test takes u < test_fraction, valid the next valid_fraction. An example's split
depends only on its own key and the seed, so adding or removing other examples never moves it
(except when a cap is reached: then the examples with the smallest u are kept and the rest go to
train). A split that should hold at least one example (fraction x count >= 1) but drew none takes
the train example with the smallest u above its interval, so small datasets still get one.

Public API: assign_splits(keys, seed, ...) -> list[str] of "train" | "valid" | "test".
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def draw(key: bytes, seed: int) -> float:
    """The example's position u in [0, 1)."""
    digest = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()[:64]).digest()
    return int.from_bytes(digest, "little") / 2**64


def assign_splits(
    keys: Sequence[bytes],
    seed: int,
    valid_fraction: float,
    valid_max: int,
    test_fraction: float = 0.0,
    test_max: int = 0,
    make_valid: bool = True,
    make_test: bool = False,
) -> list[str]:
    """The split of each example, in the order of `keys`."""
    positions = [draw(key, seed) for key in keys]
    splits = ["train"] * len(keys)
    low = 0.0
    for name, wanted, fraction, cap in (("test", make_test, test_fraction, test_max), ("valid", make_valid, valid_fraction, valid_max)):
        if not wanted or fraction <= 0 or cap <= 0:
            continue
        high = low + fraction
        inside = sorted((u, i) for i, u in enumerate(positions) if low <= u < high and splits[i] == "train")
        if not inside and fraction * len(keys) >= 1:
            above = sorted((u, i) for i, u in enumerate(positions) if u >= low and splits[i] == "train")
            inside = above[:1]
        for _, index in inside[:cap]:
            splits[index] = name
        low = high
    # examples sharing a key must share a split; the cap or the fallback may have separated them
    held_out: dict[bytes, str] = {}
    for index, key in enumerate(keys):
        if splits[index] != "train":
            held_out.setdefault(key, splits[index])
    return [held_out.get(key, split) for key, split in zip(keys, splits, strict=True)]
