"""tunelab export: merged weights give the adapter model's logits, the adapter exports in PEFT format,
GGUF loads back through transformers within f16 precision, and the run directory is never touched."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Parse: 3 May 2021"}],
]


def make_fake_run(run_dir: Path, seed: int = 1) -> Path:
    """A run directory as `tunelab train` leaves it for LoRA: recipe.yaml + a PEFT adapter (non-zero
    LoRA weights, so the adapter changes the logits) for the tiny-test model."""
    from peft import LoraConfig, get_peft_model

    from tunelab.config import load_recipe
    from tunelab.models import load_model

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(load_recipe(None, ["model.name=tiny-test", "name=x"]).to_yaml())
    torch.manual_seed(seed)
    base = load_model("tiny-test", dtype="float32", device="cpu")
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(run_dir / "adapter")
    return run_dir


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def prompt_ids(tokenizer):
    from tunelab.engine.generate import render_prompt

    width = max(len(render_prompt(tokenizer, m)) for m in PROMPTS)
    rows = [render_prompt(tokenizer, m) for m in PROMPTS]
    # right-pad with real tokens: every position is compared, no mask involved
    return torch.tensor([r + r[: width - len(r)] for r in rows])


def logits_of(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    return make_fake_run(tmp_path_factory.mktemp("runs") / "x")


@pytest.fixture(scope="module")
def adapter_reference(run_dir):
    from tunelab.models import load_model
    from tunelab.runs import load_tuned_model

    model, tokenizer = load_tuned_model(run_dir, device="cpu", dtype="float32")
    ids = prompt_ids(tokenizer)
    tuned = logits_of(model, ids)
    base = logits_of(load_model("tiny-test", dtype="float32", device="cpu"), ids)
    # the adapter must matter, or "the merge keeps the adapter's logits" would prove nothing
    assert (tuned - base).abs().max() > 1e-2
    return ids, tuned, tokenizer


def test_merged_export_gives_the_adapter_models_logits(run_dir, adapter_reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.use.export import export_run

    ids, tuned, tokenizer = adapter_reference
    before = tree_digest(run_dir)
    out = tmp_path / "merged"
    result = export_run(run_dir, out, merge=True)
    assert result.kind == "merged"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in name for name in model.state_dict())
    assert (logits_of(model, ids) - tuned).abs().max() <= 1e-4
    exported_tokenizer = AutoTokenizer.from_pretrained(out)
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    assert exported_tokenizer("Hello world")["input_ids"] == tokenizer("Hello world")["input_ids"]
    assert model.config.use_cache is True
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["checks"]["max_abs_logit_diff_vs_adapter_model"] <= 1e-4
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert tree_digest(run_dir) == before
    assert not list(tmp_path.glob(".merged.export-*"))


def test_adapter_export_is_peft_format_and_gives_the_same_logits(run_dir, adapter_reference, tmp_path):
    from peft import PeftModel

    from tunelab.models import load_model
    from tunelab.use.export import export_run

    ids, tuned, _ = adapter_reference
    out = tmp_path / "adapter"
    result = export_run(run_dir, out)
    assert result.kind == "adapter"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    model = PeftModel.from_pretrained(load_model("tiny-test", dtype="float32", device="cpu"), str(out))
    assert torch.equal(logits_of(model, ids), tuned)


def test_gguf_export_loads_back_through_transformers_within_f16_precision(run_dir, adapter_reference, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunelab.runs import load_tuned_model
    from tunelab.use.export import export_run

    ids, tuned, tokenizer = adapter_reference
    out = tmp_path / "gguf"
    result = export_run(run_dir, out, fmt="gguf")
    assert result.kind == "gguf"
    path = out / "model-f16.gguf"

    reader = GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"  # from the base model's own GGUF
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.F16
    assert types["output_norm.weight"] == GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied embeddings stay tied

    config = AutoConfig.from_pretrained(str(out), gguf_file=path.name)
    assert (config.model_type, config.num_hidden_layers, config.tie_word_embeddings) == ("llama", 2, True)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, config=config, dtype=torch.float32)
    got = logits_of(loaded, ids)
    # The exact target: the merged model with its matrices rounded to f16. Only summation order differs.
    merged, _ = load_tuned_model(run_dir, device="cpu", dtype="float32")
    merged = merged.merge_and_unload()
    with torch.no_grad():
        for parameter in merged.parameters():
            if parameter.ndim > 1:
                parameter.copy_(parameter.half().float())
    assert (got - logits_of(merged, ids)).abs().max() <= 1e-4
    # Against the fp32 adapter model: f16 rounding of the weights (relative 2^-11) and nothing more.
    assert (got - tuned).abs().max() <= 2e-3 * max(1.0, float(tuned.abs().max()))
    assert torch.equal(got[:, -1].argmax(-1), tuned[:, -1].argmax(-1))

    gguf_tokenizer = AutoTokenizer.from_pretrained(str(out), gguf_file=path.name)
    text = "Dates: 3 May 2021 -> 2021-05-03. <|im_end|> café 東京"
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert gguf_tokenizer.chat_template == tokenizer.chat_template


def test_gguf_q_and_k_rows_are_in_llama_cpp_rotary_order(run_dir, tmp_path):
    """Transformers' loader undoes llama.cpp's q/k permutation; a file written without it would
    load without error but compute other attention. Check the stored rows directly."""
    import numpy as np
    from gguf import GGUFReader

    from tunelab.runs import load_tuned_model
    from tunelab.use.export import _llama_permute, write_gguf

    model, tokenizer = load_tuned_model(run_dir, device="cpu", dtype="float32")
    merged = model.merge_and_unload()
    path = tmp_path / "model-f32.gguf"
    write_gguf(merged, tokenizer, path, "x", float_type="f32")
    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(str(path)).tensors}
    q = merged.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    k = merged.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    assert not np.array_equal(tensors["blk.0.attn_q.weight"], q)
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], _llama_permute(q, merged.config.num_attention_heads))
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"], _llama_permute(k, merged.config.num_key_value_heads))


def test_export_replaces_only_an_earlier_export_with_force_and_never_a_folder_in_the_run(run_dir, tmp_path):
    from tunelab.errors import ConfigError
    from tunelab.use.export import export_run

    out = tmp_path / "busy"
    export_run(run_dir, out)
    (out / "adapter_config.json").write_text("stale")
    with pytest.raises(ConfigError, match="--force to replace it"):
        export_run(run_dir, out)
    export_run(run_dir, out, force=True)
    assert (out / "adapter_config.json").read_text() != "stale"
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"did not write \(keep.txt\)"):
        export_run(run_dir, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    for inside in (run_dir, run_dir / "export", run_dir.parent):
        with pytest.raises(ConfigError, match="which this command reads"):
            export_run(run_dir, inside, force=True)
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


def test_export_refuses_non_finite_weights_and_writes_nothing(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    from tunelab.use.export import ExportError, export_run

    run = make_fake_run(tmp_path / "bad")
    weights_file = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    name = next(k for k in weights if "lora_B" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(weights_file))
    for kwargs in ({}, {"merge": True}):
        out = tmp_path / f"out-{len(kwargs)}"
        with pytest.raises(ExportError, match="non-finite"):
            export_run(run, out, **kwargs)
        assert not out.exists()
