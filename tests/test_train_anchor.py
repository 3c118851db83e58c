"""The KL anchor on replay rows (train.anchor, train/anchor.py): its loss term against a hand-computed
value, the base model's top-k targets computed with the adapter off equal to a fresh base model's, and
the term added by the training loss on a replay row equal to weight x -log(top-k mass) at step 0."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tunelab.config import Recipe, TrainConfig
from tunelab.data.pack import IGNORE_INDEX, collate
from tunelab.train.anchor import ANCHOR_TOP_K, attach_anchor, base_top_k, top_k_targets, trained_positions


def anchor_kl(hidden: torch.Tensor, head: nn.Module, ids: torch.Tensor, logp: torch.Tensor, coef: torch.Tensor,
              softcap: float | None = None) -> torch.Tensor:
    """The reference of the anchor's term, with autograd over full logits: sum over positions of
    sum_j coef_j * (logp_j - log q(ids_j)), q the model's full softmax."""
    logits = (hidden @ head.weight.T).float()
    if head.bias is not None:
        logits = logits + head.bias.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return (coef * (logp - torch.log_softmax(logits, dim=-1).gather(1, ids))).sum()


def test_anchor_kl_is_the_weighted_kl_to_the_base_top_k_by_hand():
    from tunelab.train.loss import linear_cross_entropy

    # a vocabulary of 3, the identity as LM head: logits = hidden = [0, ln 2, 0] -> q = [1/4, 1/2, 1/4]
    head = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
    hidden = torch.tensor([[0.0, math.log(2), 0.0], [5.0, 0.0, 0.0]], requires_grad=True)
    # the base's top-2: token 1 at 2/3, token 0 at 1/3 (renormalised); weight 2; the second row has no anchor
    ids = torch.tensor([[1, 0], [0, 0]])
    logp = torch.tensor([[math.log(2 / 3), math.log(1 / 3)], [0.0, 0.0]])
    coef = torch.tensor([[2 * 2 / 3, 2 * 1 / 3], [0.0, 0.0]])
    targets = torch.tensor([1, 0])
    with_anchor, _ = linear_cross_entropy(hidden, head.weight, targets, anchor=(ids, logp, coef))
    without, _ = linear_cross_entropy(hidden, head.weight, targets)
    # 2 x [2/3 ln((2/3)/(1/2)) + 1/3 ln((1/3)/(1/4))] = 2 x ln(4/3)
    assert (with_anchor - without).item() == pytest.approx(2 * math.log(4 / 3), rel=1e-5)
    assert anchor_kl(hidden, head, ids, logp, coef).item() == pytest.approx(2 * math.log(4 / 3), rel=1e-6)
    value = anchor_kl(hidden, head, ids, logp, coef)
    value.backward()
    assert hidden.grad[1].abs().sum().item() == 0.0  # a row without an anchor gets no gradient from it
    assert anchor_kl(hidden, head, ids, logp, torch.zeros_like(coef)).item() == 0.0


def test_top_k_targets_are_renormalised_log_probs_of_the_most_likely_tokens():
    ids, logp = top_k_targets(torch.log(torch.tensor([[0.1, 0.6, 0.3]])), 2)
    assert ids.tolist() == [[1, 2]]
    assert logp.exp().tolist()[0] == pytest.approx([0.6 / 0.9, 0.3 / 0.9])
    assert trained_positions([5, IGNORE_INDEX, 7, 8]) == [2, 3]  # the first token is never predicted


def _replay_example(tokenizer, text: str) -> dict:
    prompt = tokenizer("Tell me about colours.", add_special_tokens=False)["input_ids"]
    answer = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"id": "replay-abc", "input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def _setup(tiny_model_dir):
    from tunelab.train.setup import setup_training

    return setup_training(Recipe(model={"name": "tiny-test"}, train=TrainConfig(replay_share=0.2)), 2, "cpu")


def test_targets_computed_with_the_adapter_off_equal_a_fresh_base_models(tiny_model_dir, tokenizer):
    from tunelab.models import load_model

    setup = _setup(tiny_model_dir)
    with torch.no_grad():  # a trained adapter: the targets must still be the base model's
        for name, param in setup.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    example = _replay_example(tokenizer, "Blue and green are colours of the sea.")
    (ids, logp), = base_top_k(setup, [example], tokenizer.pad_token_id)
    base = load_model("tiny-test", device="cpu").eval()
    with torch.no_grad():
        logits = base(input_ids=torch.tensor([example["input_ids"]])).logits[0]
    positions = trained_positions(example["labels"])
    expected_ids, expected_logp = top_k_targets(logits[[t - 1 for t in positions]], ANCHOR_TOP_K)
    assert len(ids) == len(positions) and len(ids[0]) == ANCHOR_TOP_K
    assert ids == expected_ids.tolist()
    assert torch.tensor(logp) == pytest.approx(expected_logp, abs=1e-5)
    # with the adapter on, the targets differ: the switch is what makes them the base model's
    (on_ids, on_logp), = base_top_k(setup, [example], tokenizer.pad_token_id, adapter_off=False)
    assert not torch.allclose(torch.tensor(on_logp), torch.tensor(logp), atol=1e-3)


def test_the_training_loss_adds_weight_times_the_kl_on_replay_rows_only(tiny_model_dir, tokenizer):
    setup = _setup(tiny_model_dir)
    recipe = Recipe(model={"name": "tiny-test"}, train=TrainConfig(anchor=2.5))
    replay = _replay_example(tokenizer, "Blue and green are colours of the sea.")
    task = {**_replay_example(tokenizer, "Q7-NET"), "id": "train-1"}
    examples = [task, replay]
    record = attach_anchor(setup, recipe, examples, tokenizer.pad_token_id)
    assert record["examples"] == 1 and record["weight"] == 2.5 and record["top_k"] == ANCHOR_TOP_K
    assert record["tokens"] == len(trained_positions(replay["labels"])) and "anchor_ids" not in task
    module = setup.loss_module
    setup.model.eval()
    with torch.no_grad():
        anchored = collate(examples, [(0, 1)], tokenizer.pad_token_id)  # both in one packed row
        plain = collate([task, {k: v for k, v in replay.items() if not k.startswith("anchor")}], [(0, 1)],
                        tokenizer.pad_token_id)
        assert plain.anchor_coef is None and anchored.anchor_coef is not None
        with_anchor, without = module(**anchored.model_inputs()), module(**plain.model_inputs())
        # at step 0 the model is the base: p is q's top-k renormalised, so KL = -log(top-k mass of q)
        logits = setup.model(input_ids=torch.tensor([replay["input_ids"]])).logits[0].float()
    positions = trained_positions(replay["labels"])
    q = torch.softmax(logits[[t - 1 for t in positions]], dim=-1)
    mass = q.topk(ANCHOR_TOP_K, dim=-1).values.sum(-1)
    expected = 2.5 * (-torch.log(mass)).sum().item()
    assert (with_anchor.loss_sum - without.loss_sum).item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert with_anchor.count == without.count and with_anchor.correct == without.correct


def test_no_anchor_without_replay_or_with_weight_zero(tiny_model_dir, tokenizer):
    setup = _setup(tiny_model_dir)
    task = {**_replay_example(tokenizer, "Q7-NET"), "id": "train-1"}
    replay = _replay_example(tokenizer, "Blue is a colour.")
    assert attach_anchor(setup, Recipe(model={"name": "tiny-test"}), [task], tokenizer.pad_token_id) is None
    off = Recipe(model={"name": "tiny-test"}, train=TrainConfig(anchor=0))
    assert attach_anchor(setup, off, [task, replay], tokenizer.pad_token_id) is None and "anchor_ids" not in replay


def test_targets_of_examples_packed_in_one_row_equal_each_computed_alone(tiny_model_dir, tokenizer):
    setup = _setup(tiny_model_dir)
    examples = [_replay_example(tokenizer, text) for text in
                ("Blue is a colour.", "Green leaves and a long answer about trees in the park.", "Red.")]
    packed = base_top_k(setup, examples, tokenizer.pad_token_id, row_tokens=512)
    alone = base_top_k(setup, examples, tokenizer.pad_token_id, row_tokens=1)  # a row holds its one example
    for (ids, logp), (ids_alone, logp_alone), example in zip(packed, alone, examples, strict=True):
        assert len(ids) == len(trained_positions(example["labels"]))
        assert ids == ids_alone
        assert torch.tensor(logp) == pytest.approx(torch.tensor(logp_alone), abs=1e-4)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_the_fused_term_in_the_chunked_loss_equals_the_reference_in_value_and_gradient(softcap):
    from tunelab.train.loss import linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    n, width, vocab, k = 7, 6, 11, 3
    head = nn.Linear(width, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=gen))
        head.bias.copy_(torch.randn(vocab, generator=gen))
    hidden = torch.randn(n, width, generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    logp = torch.log_softmax(torch.randn(n, k, generator=gen), dim=-1)
    coef = 1.5 * logp.exp() * torch.tensor([1.0, 0, 1, 1, 0, 1, 1])[:, None]  # rows 1 and 4: no anchor

    def loss(with_anchor: bool, fused: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        ce, _ = linear_cross_entropy(h, head.weight, targets, head.bias, softcap, chunk_rows=2,
                                     anchor=(ids, logp, coef) if with_anchor and fused else None)
        total = ce + (anchor_kl(h, head, ids, logp, coef, softcap) if with_anchor and not fused else 0.0)
        total.backward()
        return total.item(), h.grad.clone(), head.weight.grad.clone()

    fused, reference, plain = loss(True, True), loss(True, False), loss(False, True)
    assert fused[0] == pytest.approx(reference[0], rel=1e-5) and fused[0] > plain[0]
    assert torch.allclose(fused[1], reference[1], atol=1e-5) and torch.allclose(fused[2], reference[2], atol=1e-5)


def _anchored(examples: list[dict]) -> list[tuple[list, list]]:
    return [(e["anchor_ids"], e["anchor_logp"]) for e in examples]


def test_targets_are_cached_per_base_model_and_read_back_equal(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """A second run on the same base model reads the targets it computed; a new example joins the cache;
    a torn cache file is computed again, never trusted."""
    from tunelab.train.anchor import anchor_cache_path

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    recipe = Recipe(model={"name": "tiny-test"}, train=TrainConfig(anchor=1.0))
    texts = ("Blue is a colour.", "Green leaves and a long answer about trees in the park.")
    setup = _setup(tiny_model_dir)
    first = [_replay_example(tokenizer, t) for t in texts]
    assert attach_anchor(setup, recipe, first, tokenizer.pad_token_id)["cached"] == 0
    path = anchor_cache_path(setup, ANCHOR_TOP_K, adapter_off=True)
    assert path.is_file() and path.parent.parent == tmp_path / "anchor" and path.suffix == ".safetensors"
    assert path.parent.name == Path(setup.model.config.name_or_path).name  # the model's folder, not its whole path

    again = [_replay_example(tokenizer, t) for t in texts] + [_replay_example(tokenizer, "Red.")]
    record = attach_anchor(_setup(tiny_model_dir), recipe, again, tokenizer.pad_token_id)
    assert record["cached"] == 2 and record["examples"] == 3
    assert _anchored(again[:2]) == _anchored(first)  # read back bit for bit
    (ids, logp), = base_top_k(setup, [again[2]], tokenizer.pad_token_id)
    assert again[2]["anchor_ids"] == ids and torch.tensor(again[2]["anchor_logp"]) == pytest.approx(torch.tensor(logp))
    assert attach_anchor(setup, recipe, [_replay_example(tokenizer, "Red.")], tokenizer.pad_token_id)["cached"] == 1

    path.write_bytes(b"not a safetensors file")
    torn = [_replay_example(tokenizer, t) for t in texts]
    assert attach_anchor(setup, recipe, torn, tokenizer.pad_token_id)["cached"] == 0
    assert _anchored(torn) == _anchored(first)
    assert attach_anchor(setup, recipe, [_replay_example(tokenizer, texts[0])], tokenizer.pad_token_id)["cached"] == 1


def test_the_cache_is_keyed_by_the_weights_not_the_models_name(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """Changed base weights are a different cache (their targets differ); a switched-off adapter's weights
    are not part of the key, a switched-on adapter's are."""
    from tunelab.train.anchor import anchor_cache_path

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    setup = _setup(tiny_model_dir)
    before = anchor_cache_path(setup, ANCHOR_TOP_K, adapter_off=True)
    with_adapter = anchor_cache_path(setup, ANCHOR_TOP_K, adapter_off=False)
    assert with_adapter != before
    with torch.no_grad():
        for name, param in setup.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    assert anchor_cache_path(setup, ANCHOR_TOP_K, adapter_off=True) == before
    assert anchor_cache_path(setup, ANCHOR_TOP_K, adapter_off=False) != with_adapter
    assert anchor_cache_path(setup, ANCHOR_TOP_K - 1, adapter_off=True) != before
    with torch.no_grad():
        base = next(p for name, p in setup.model.named_parameters() if "lora_" not in name and p.dim() == 2)
        base[0, 0] += 1e-3  # one value of one base tensor
    assert anchor_cache_path(setup, ANCHOR_TOP_K, adapter_off=True) != before
