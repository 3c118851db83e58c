"""Checkpoints are atomic and verified: a damaged or unfinished one is never chosen, the previous
one is; pruning keeps the newest K plus the best; optimizer and RNG state round-trip exactly."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tunelab.train.checkpoint import (
    COMPLETE,
    TrainState,
    capture_rng,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)


def _optimizer_after_a_step(seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(5, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    return layer, opt


def _save(root, step, best=None):
    layer, opt = _optimizer_after_a_step(step)
    state = TrainState(step=step, epoch=1, position=step * 2, best_step=best, best_val_loss=1.5 if best else None)
    weights = {name: p.detach() for name, p in layer.named_parameters()}
    return save_checkpoint(root, step, weights, opt.state_dict(), capture_rng(), state), layer, opt


def test_round_trip_is_exact(tmp_path):
    path, layer, opt = _save(tmp_path, 3)
    assert verify_checkpoint(path) is None
    assert (path / COMPLETE).is_file()
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"weights.safetensors", "optimizer.safetensors", "optimizer.json", "rng.json", "state.json"}
    loaded = load_checkpoint(path)
    assert loaded.step == 3 and loaded.state.position == 6
    for name, p in layer.named_parameters():
        assert torch.equal(loaded.weights[name], p.detach())
    # the optimizer continues exactly as the original would
    fresh_layer = torch.nn.Linear(4, 3)
    fresh = torch.optim.AdamW(fresh_layer.parameters(), lr=1e-2)
    fresh.load_state_dict(loaded.optimizer_state)
    with torch.no_grad():
        for name, p in fresh_layer.named_parameters():
            p.copy_(loaded.weights[name])
    for model, optimizer in ((layer, opt), (fresh_layer, fresh)):
        torch.manual_seed(7)
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
    for (_, a), (_, b) in zip(layer.named_parameters(), fresh_layer.named_parameters(), strict=True):
        assert torch.equal(a, b)


def test_rng_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = json.loads(json.dumps(capture_rng()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng(saved)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == got[0] and expected[1] == got[1] and torch.equal(expected[2], got[2])


@pytest.mark.parametrize(
    "damage",
    ["missing_file", "corrupted_byte", "no_complete_marker", "truncated_manifest"],
)
def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, damage):
    _save(tmp_path, 2)
    newest, _, _ = _save(tmp_path, 4)
    if damage == "missing_file":
        (newest / "optimizer.safetensors").unlink()
    elif damage == "corrupted_byte":
        data = bytearray((newest / "weights.safetensors").read_bytes())
        data[-3] ^= 0xFF  # same size, different content: only the hash catches it
        (newest / "weights.safetensors").write_bytes(bytes(data))
    elif damage == "no_complete_marker":
        (newest / COMPLETE).unlink()
    else:
        (newest / "manifest.json").write_text('{"files": {')
    assert verify_checkpoint(newest) is not None
    chosen, skipped = find_resumable(tmp_path)
    assert chosen == tmp_path / "step-2"
    assert len(skipped) == 1 and "step-4" in skipped[0]


def test_nothing_resumable(tmp_path):
    assert find_resumable(tmp_path) == (None, [])
    (tmp_path / "step-1").mkdir()  # a folder left by a crash before COMPLETE
    assert find_resumable(tmp_path)[0] is None


def test_prune_keeps_newest_k_and_best_and_temporary_folders_go(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step)
    (tmp_path / ".tmp-step-6-123").mkdir()
    prune_checkpoints(tmp_path, keep_last=2, keep_steps={2})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert not (tmp_path / ".tmp-step-6-123").exists()


def test_rewriting_a_damaged_step_replaces_it(tmp_path):
    path, _, _ = _save(tmp_path, 3)
    (path / COMPLETE).unlink()
    again, _, _ = _save(tmp_path, 3)
    assert again == path and verify_checkpoint(path) is None
