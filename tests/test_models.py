import shutil

import pytest
import torch

from tunelab import models
from tunelab.errors import ModelError


def test_tiny_model_has_the_real_tokenizer_and_chat_template(tiny_model, tokenizer):
    assert tiny_model.config.num_hidden_layers == 2
    assert tiny_model.config.vocab_size == len(tokenizer) == 49152
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nhi<|im_end|>" in text
    assert tokenizer.convert_ids_to_tokens(models.end_of_turn_ids(tokenizer)) == ["<|im_end|>"]


def test_tiny_model_is_seeded(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    rebuilt = models.ensure_alias("tiny-test")
    a = models.load_model(str(tiny_model_dir), device="cpu")
    b = models.load_model(str(rebuilt), device="cpu")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest"])
def test_damaged_cache_entry_is_detected_and_rebuilt(tiny_model_dir, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    entry = models.cache_dir("tiny-test")
    shutil.copytree(tiny_model_dir, entry)
    weights = entry / "model.safetensors"
    original = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(original[: len(original) // 2])
    elif damage == "flip":
        weights.write_bytes(original[:-10] + bytes(b ^ 0xFF for b in original[-10:]))
    else:
        (entry / "tunelab-cache.json").unlink()
    assert models.verify_cache(entry) is not None
    models.ensure_alias("tiny-test")
    assert models.verify_cache(entry, full=True) is None
    assert weights.read_bytes() == original


def test_references_resolve_or_fail_clearly(tmp_path):
    assert models.resolve_reference("org/model").kind == "hub"
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_reference(str(tmp_path))
    with pytest.raises(ModelError, match="GGUF file not found"):
        models.resolve_reference(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelError, match="not an alias"):
        models.resolve_reference("no-such-model")


def test_local_folder_without_safetensors_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle would run here")
    with pytest.raises(ModelError, match="safetensors weights only"):
        models.load_model(str(folder), device="cpu")


@pytest.mark.slow
def test_default_model_cache_gives_the_gguf_logits():
    from transformers import AutoModelForCausalLM

    gguf = models.gguf_source()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cached = models.load_model(models.DEFAULT_MODEL, device="cpu")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 429, 2]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, cached(ids).logits)


@pytest.mark.slow
def test_default_model_answers_paris():
    from tunelab.engine.generate import DecodingSettings, generate

    model = models.load_model(models.DEFAULT_MODEL, device="cpu")
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    [answer] = generate(model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]],
                        DecodingSettings(max_new_tokens=20))
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"
