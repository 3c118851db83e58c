"""Automatic micro-batch sizing: the search over sizes (the CUDA probe itself runs in bench/train_speed.py)."""

from __future__ import annotations

import pytest
import torch

from tunelab.train.memory import auto_micro_batch_tokens, candidate_sizes, choose_size


def test_candidates_halve_from_the_step_down_to_one_row():
    assert candidate_sizes(8192, 1024) == [8192, 4096, 2048, 1024]
    assert candidate_sizes(3000, 1024) == [3000, 1500, 1024]
    assert candidate_sizes(512, 1024) == [1024]  # never below one row


def test_the_largest_size_that_fits_wins_and_out_of_memory_moves_on():
    peaks = {8192: None, 4096: 90, 2048: 60, 1024: 40}  # None: ran out of memory
    size, tried = choose_size([8192, 4096, 2048, 1024], peaks.get, budget_bytes=64)
    assert size == 2048
    assert [t["micro_batch_tokens"] for t in tried] == [8192, 4096, 2048]
    assert [t["fits"] for t in tried] == [False, False, True]


def test_nothing_fits_gives_the_smallest():
    size, tried = choose_size([4096, 2048], lambda _size: 10**12, budget_bytes=1)
    assert size == 2048 and len(tried) == 2


def test_auto_sizing_refuses_cpu(tiny_model):
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="CUDA"):
        auto_micro_batch_tokens(SimpleNamespace(device=torch.device("cpu")), 4096, 512, 100)
