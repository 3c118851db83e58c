"""The GPU fast paths against their references, on a CUDA GPU (skipped elsewhere; CI has none).

Run on a GPU machine with `python -m pytest -q tests/test_gpu.py`. Small random-init Llama models
(no downloads). Each fast path must give the reference's loss and gradients: the flash varlen
kernel vs the masked SDPA path, compiled layers vs eager, and the memory probe must return a size
that it measured to fit."""

from __future__ import annotations

import pytest
import torch

from train_examples import random_examples
from tunelab.data.pack import collate, collate_varlen

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=3000, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    return model.to(dtype).train()


def _examples(lengths: list[int], seed: int = 0) -> list[dict]:
    return random_examples(lengths, seed, prompt_fraction=1 / 4, vocab=(5, 3000))


def _loss_and_grads(model, batch, varlen: bool, autocast: bool = True):
    from tunelab.train.attention import use_varlen_attention
    from tunelab.train.loss import CausalLMLoss

    model.zero_grad(set_to_none=True)
    loss = CausalLMLoss(model)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        if varlen:
            with use_varlen_attention(model):
                out = loss.forward_batch(batch)
        else:
            out = loss.forward_batch(batch)
    out.loss_sum.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return out, grads


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_flash_varlen_kernel_matches_the_masked_reference():
    from tunelab.train.attention import kernel_name

    assert kernel_name(torch.device("cuda"), torch.bfloat16) == "flash-varlen", "the fast kernel is not available"
    examples = _examples([300, 45, 700, 129, 64, 511], seed=1)
    rows = [(0, 1), (2,), (3, 4, 5)]
    model = _model()
    masked, masked_grads = _loss_and_grads(model, collate(examples, rows, 0).to("cuda"), varlen=False)
    varlen, varlen_grads = _loss_and_grads(
        model, collate_varlen(examples, rows, 0, pad_to_multiple=64, max_seqlen=1024).to("cuda"), varlen=True
    )
    # float32 without autocast: the reference both bf16 paths are measured against
    exact, exact_grads = _loss_and_grads(model, collate(examples, rows, 0).to("cuda"), varlen=False, autocast=False)
    assert int(varlen.count) == int(masked.count)
    assert varlen.loss_sum.item() == pytest.approx(masked.loss_sum.item(), rel=5e-3)
    fast_error, reference_error = _relative_error(varlen_grads, exact_grads), _relative_error(masked_grads, exact_grads)
    assert fast_error < 2e-2 and fast_error < 2 * reference_error + 1e-3, (fast_error, reference_error)


def test_compiled_layers_match_eager():
    from tunelab.train.setup import compile_layers

    examples = _examples([200, 90, 333], seed=2)
    batch = collate_varlen(examples, [(0, 1, 2)], 0, pad_to_multiple=64, max_seqlen=512).to("cuda")
    eager_model = _model()
    eager, eager_grads = _loss_and_grads(eager_model, batch, varlen=True)
    compiled_model = _model()
    compile_layers(compiled_model)
    for _ in range(2):  # the second call runs the compiled graph with no recompilation in between
        compiled, compiled_grads = _loss_and_grads(compiled_model, batch, varlen=True)
    assert compiled.loss_sum.item() == pytest.approx(eager.loss_sum.item(), rel=5e-3)
    assert _relative_error(compiled_grads, eager_grads) < 2e-2


def test_memory_probe_returns_a_size_it_measured_to_fit():
    from tunelab.config import load_recipe
    from tunelab.train.memory import auto_micro_batch_tokens
    from tunelab.train.setup import setup_training

    recipe = load_recipe(None, ["method=lora"])
    setup = setup_training(recipe, 10, "cuda", base=_model(torch.bfloat16))
    assert setup.attention == "varlen"
    size, tried = auto_micro_batch_tokens(setup, 8192, 512, 3000)
    assert size == 8192 and tried[0]["fits"] and tried[0]["peak_bytes"] > 0
    assert all(p.grad is None for p in setup.model.parameters())  # the probe leaves no gradients
    small, tried_small = auto_micro_batch_tokens(setup, 8192, 512, 3000, budget_fraction=1e-9)
    assert small == 512 and not any(t["fits"] for t in tried_small)


def test_training_loop_on_gpu_gives_the_same_losses_with_varlen_and_mask(tmp_path):
    from tunelab.config import load_recipe
    from tunelab.data.pack import Step, example_length, trainable_count
    from tunelab.train.loop import LoopOptions, train_loop
    from tunelab.train.setup import setup_training

    examples = _examples([300, 45, 700, 129, 64, 511, 80, 222], seed=3)
    plan = [Step(0, 0, (((0, 1), (2,)), ((3, 4, 5),)), 0, 0, 0.5), Step(0, 0, (((6, 7),),), 0, 0, 1.0)]
    plan = [Step(s.epoch, s.position, s.micro_batches,
                 sum(example_length(examples[i]) for mb in s.micro_batches for row in mb for i in row),
                 sum(trainable_count(examples[i]) for mb in s.micro_batches for row in mb for i in row), s.progress)
            for s in plan]
    losses = {}
    for attention in ("mask", "varlen"):
        recipe = load_recipe(None, ["method=full", f"train.attention={attention}", "train.lr=1e-4", "train.warmup_ratio=0"])
        setup = setup_training(recipe, len(plan), "cuda", base=_model())
        assert setup.attention == attention
        run = tmp_path / attention
        train_loop(setup, examples, plan, recipe.train, run, pad_id=0,
                   options=LoopOptions(progress=False, write_checkpoints=False))
        import json

        log = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
        losses[attention] = [r["loss"] for r in log if r["kind"] == "train"]
    assert len(losses["varlen"]) == 2
    assert losses["varlen"] == pytest.approx(losses["mask"], abs=2e-2)


def test_fsdp_on_one_gpu_gives_the_losses_of_plain_training(tmp_path, monkeypatch):
    """FSDP2 with NCCL and bf16 mixed precision (one rank: the sharding, hooks and collectives all
    run) against the same steps without FSDP."""
    import json
    import socket

    from tunelab.config import load_recipe
    from tunelab.data.pack import Step, example_length, trainable_count
    from tunelab.train.distributed import FullyShardedContext
    from tunelab.train.loop import LoopOptions, train_loop
    from tunelab.train.setup import setup_training

    examples = _examples([300, 45, 700, 129, 64, 511, 80, 222], seed=4)
    groups = [((0, 1), (2,)), ((3, 4, 5), (6, 7))]
    plan = [Step(0, i, (group,), sum(example_length(examples[j]) for row in group for j in row),
                 sum(trainable_count(examples[j]) for row in group for j in row), (i + 1) / 2)
            for i, group in enumerate(groups)]
    recipe = load_recipe(None, ["method=full", "train.lr=1e-4", "train.warmup_ratio=0", "train.attention=mask"])

    def losses(run, ctx=None) -> list[float]:
        kwargs = {"ctx": ctx} if ctx is not None else {}
        setup = setup_training(recipe, len(plan), "cpu" if ctx is not None else "cuda", base=_model().cpu() if ctx else _model())
        if ctx is not None:
            ctx.prepare(setup, recipe)
            assert setup.device.type == "cuda" and setup.autocast_dtype == torch.bfloat16
        train_loop(setup, examples, plan, recipe.train, run, pad_id=0,
                   options=LoopOptions(progress=False, write_checkpoints=False), **kwargs)
        log = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in log if r["kind"] == "train"]

    plain = losses(tmp_path / "plain")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", 0))
    try:
        sharded = losses(tmp_path / "fsdp", FullyShardedContext(rank=0, world_size=1, local_rank=0))
    finally:
        torch.distributed.destroy_process_group()
    assert len(sharded) == 2 and sharded == pytest.approx(plain, abs=2e-2)


def test_decoding_loop_with_a_shared_prefix_gives_the_tokens_of_each_prompt_alone():
    """engine/generate.py on a GPU: the shared prefix's KV cache computed once, the in-place cache and the
    padded batch give the greedy tokens of decoding each prompt alone without a cache."""
    from tunelab.engine.generate import DecodingSettings, _decode, prefill_shared_prefix

    model = _model().eval()
    generator = torch.Generator().manual_seed(3)
    shared = torch.randint(5, 3000, (300,), generator=generator).tolist()
    prompts = [shared + torch.randint(5, 3000, (n,), generator=generator).tolist() for n in (7, 40, 1, 23)]
    new_tokens = 12
    want = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(new_tokens):
                ids.append(int(model(input_ids=torch.tensor([ids], device="cuda"), use_cache=False).logits[0, -1].argmax()))
            want.append(ids[len(prompt):])
    prefix = prefill_shared_prefix(model, prompts)
    assert prefix is not None and prefix.length == 300
    for reuse in (prefix, None):
        got = [[] for _ in prompts]
        for row, token, _ in _decode(model, prompts, DecodingSettings(max_new_tokens=new_tokens), set(), 0, reuse):
            if token is not None:
                got[row].append(token)
        assert got == want
