"""The decoding loop of engine/generate.py against the definition of greedy decoding: the shared-prefix
KV cache computed once, the cache written in place and the left padding of a batch give, token for
token, what running each prompt alone without any cache gives."""

import pytest

SYSTEM = ("You are a support triage assistant. Read the customer's ticket and reply with one line of JSON "
          "with the keys category, urgency, order_id and product, nothing else.")
QUESTIONS = ["my router broke", "Where is order 12345? I need it today!!", "refund please", "cannot log in"]
NEW_TOKENS = 8


def conversations():
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]


def greedy_without_cache(model, prompt, new_tokens):
    """Greedy decoding by its definition: the whole sequence through the model for every new token."""
    import torch

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(new_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def decoded_tokens(model, prompts, prefix):
    """Every row's tokens from the decoding loop, with no stop token (every row runs to the end), and
    the logits of its first step (the prompts' last positions)."""
    from tunelab.engine.generate import DecodingSettings, _decode

    head = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_output_embeddings()
    calls = []
    hook = head.register_forward_hook(lambda module, args, out: calls.append(out[:, -1].detach().clone()))
    tokens = [[] for _ in prompts]
    try:
        for row, token, _ in _decode(model, prompts, DecodingSettings(max_new_tokens=NEW_TOKENS), set(), 0, prefix):
            if token is not None:
                tokens[row].append(token)
    finally:
        hook.remove()
    return tokens, calls[0]


def lora_wrapped(model):
    """The tiny model under a LoRA adapter with non-zero weights (the eval's tuned arms are PEFT models)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "lora"])
def test_prefix_reuse_and_padding_give_the_tokens_of_decoding_each_prompt_alone(tiny_model, tokenizer, wrap):
    from tunelab.engine.generate import prefill_shared_prefix, render_prompt, shared_prefix_length

    model = (lora_wrapped(tiny_model) if wrap else tiny_model).eval()
    prompts = [render_prompt(tokenizer, c) for c in conversations()]
    assert len({len(p) for p in prompts}) > 1  # the batch is padded, so padding is exercised
    prefix = prefill_shared_prefix(model, prompts, min_tokens=1)
    assert prefix is not None and prefix.length == shared_prefix_length(prompts) > 30
    import torch

    want = [greedy_without_cache(model, p, NEW_TOKENS) for p in prompts]
    with torch.inference_mode():
        want_logits = torch.cat([model(input_ids=torch.tensor([p])).logits[:, -1] for p in prompts])
    for reuse in (prefix, None):
        tokens, first_logits = decoded_tokens(model, prompts, reuse)
        assert tokens == want
        torch.testing.assert_close(first_logits, want_logits, atol=1e-5, rtol=1e-5)


def test_generate_reports_the_reused_prefix_and_the_same_replies_without_it(tiny_model, tokenizer):
    from tunelab.engine.generate import DecodingSettings, generate, render_prompt, shared_prefix_length

    settings = DecodingSettings(max_new_tokens=NEW_TOKENS)
    with_reuse = generate(tiny_model, tokenizer, conversations(), settings, batch_size=3)
    without = generate(tiny_model, tokenizer, conversations(), settings, batch_size=3, reuse_prefix=False)
    shared = shared_prefix_length([render_prompt(tokenizer, c) for c in conversations()])
    assert [g.prefix_reused_tokens for g in with_reuse] == [shared] * len(QUESTIONS)
    assert [g.prefix_reused_tokens for g in without] == [0] * len(QUESTIONS)
    assert [(g.text, g.completion_tokens, g.finish_reason) for g in with_reuse] == [
        (g.text, g.completion_tokens, g.finish_reason) for g in without]


def test_shared_prefix_leaves_every_prompt_its_last_token():
    from tunelab.engine.generate import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts: the last token is decoded
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2]]) == 1  # one prompt is the other's start
    assert shared_prefix_length([[7, 2], [8, 2]]) == 0
    assert shared_prefix_length([[5]]) == 0
