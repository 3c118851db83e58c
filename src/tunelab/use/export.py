"""Export a run's fine-tuned model: the adapter alone, merged safetensors weights, or one GGUF file.

Reads a run directory (recipe.yaml, adapter/ or model/) and never writes into it. Writes the export
into a temporary sibling of `--out`, verifies it there, and only then moves it into place, so that a
failed export leaves nothing half-written at `--out`. `--out` is checked first by
files.check_output_dir: it is never the current folder, a parent of it, the home folder, the run or a
folder with files tunelab did not write; `--force` replaces an earlier export only:
  adapter   adapter_config.json + adapter_model.safetensors (PEFT format) + tokenizer + chat template
  merged    model.safetensors + config.json (AutoModelForCausalLM.from_pretrained loads it) + tokenizer
  gguf      model-f16.gguf (llama architecture, tokenizer and chat template inside)
and export.json (what was exported, from which run, each file's sha256 and the checks' numbers).
Every kind is at the run's chosen LoRA adapter scale (eval/adapter_scale.json; 1 without it): merged
weights are merged at that scale, an exported adapter carries it in lora_alpha.

Checks: every exported tensor is finite; merged weights reloaded from disk give the adapter model's
logits (max abs diff <= 1e-4 in fp32); the GGUF file, loaded back through transformers' GGUF loader,
gives the logits of the merged model rounded to its float type and its tokenizer encodes the same.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.console import say
from tunelab.contract import AdapterScale
from tunelab.errors import ConfigError, ModelError, TunelabError
from tunelab.files import check_output_dir, replace_dir, sha256_file

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FORMATS = ("safetensors", "gguf")
GGUF_TYPES = ("f16", "f32")
MERGED_MAX_ABS_DIFF = 1e-4  # fp32 merge changes only the order of additions
# Loaded back, a GGUF must reproduce the merged model with its weights rounded to the file's type;
# what remains is float32 summation order. Against the unrounded model the gap is f16 rounding
# itself, reported in export.json.
GGUF_MAX_ABS_DIFF_VS_ROUNDED = 1e-3
PROBE_MESSAGES = [{"role": "user", "content": "Export check: what is 2 + 2? Answer in one short sentence, please."}]
MANIFEST = "export.json"  # names every file the export wrote: what --force may replace
PROBE_TEXT = "Tokenizer check: Hello, world! 12345 <|im_end|> café naïve 東京 \n\t  spaces"


class ExportError(TunelabError):
    """An export could not be written or did not verify."""


@dataclass
class ExportResult:
    out_dir: Path
    kind: str  # adapter | merged | gguf
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    checks: dict[str, Any] = field(default_factory=dict)


def _check_finite(named_tensors: Any, what: str) -> int:
    """Raise on the first tensor with a NaN or an infinity; returns how many tensors were checked."""
    import torch

    count = 0
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"{what}: tensor {name} has non-finite values (NaN or inf); nothing exported")
        count += 1
    return count


def _probe_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    import torch

    from tunelab.engine.generate import render_prompt

    return torch.tensor([render_prompt(tokenizer, PROBE_MESSAGES)])


def _logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        return model(input_ids=input_ids.to(next(model.parameters()).device)).logits.float().cpu()


# ----------------------------------------------------------------------------------------------
# adapter only


def _export_adapter(adapter_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp: Path, scale: float = 1.0) -> dict[str, Any]:
    """Copy the PEFT adapter byte for byte (safetensors only) after checking its tensors. At an adapter
    scale other than 1 (eval/adapter_scale.json) the config's lora_alpha (and alpha_pattern) carry it:
    LoRA's update is (alpha / r) * B A, so alpha * scale is the same model for any PEFT loader."""
    from safetensors import safe_open

    config = adapter_dir / "adapter_config.json"
    weights = sorted(adapter_dir.glob("*.safetensors"))
    if not config.is_file() or not weights:
        raise ModelError(f"{adapter_dir}: expected adapter_config.json and *.safetensors (PEFT format)")
    checked = 0
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            checked += _check_finite(((k, f.get_tensor(k)) for k in f.keys()), str(path))  # noqa: SIM118
    for path in [config, *weights] if scale == 1.0 else weights:
        shutil.copy2(path, tmp / path.name)
        if sha256_file(tmp / path.name) != sha256_file(path):
            raise ExportError(f"{path}: copy does not match the original")
    if scale != 1.0:
        settings = json.loads(config.read_text(encoding="utf-8"))
        settings["lora_alpha"] = settings["lora_alpha"] * scale
        settings["alpha_pattern"] = {k: v * scale for k, v in (settings.get("alpha_pattern") or {}).items()}
        (tmp / config.name).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(tmp)
    return {"tensors_checked_finite": checked, "adapter_scale": scale}


# ----------------------------------------------------------------------------------------------
# merged safetensors


def _save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tmp: Path,
                 probe: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    model.config.use_cache = True  # tunelab turns it off for training; users' generate() wants it
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
    reloaded.eval()
    checked = _check_finite(reloaded.state_dict().items(), str(tmp))
    diff = float((_logits(reloaded, probe) - reference).abs().max())
    if not diff <= MERGED_MAX_ABS_DIFF:
        raise ExportError(
            f"merged weights reloaded from disk differ from the adapter model: max abs logit diff {diff:.3g} "
            f"> {MERGED_MAX_ABS_DIFF:g}; nothing exported"
        )
    return {"tensors_checked_finite": checked, "max_abs_logit_diff_vs_adapter_model": diff,
            "tolerance": MERGED_MAX_ABS_DIFF, "probe_tokens": int(probe.shape[1])}


# ----------------------------------------------------------------------------------------------
# GGUF


def _llama_permute(weights: Any, n_head: int) -> Any:
    """llama.cpp's rotary layout for q/k rows (convert_hf_to_gguf.py `permute`); transformers' GGUF
    loader undoes exactly this (LlamaTensorProcessor._reverse_permute_weights)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def _gguf_pre_tokenizer(model_name: str) -> str | None:
    """llama.cpp's pre-tokenizer name, read from the GGUF the base model came from when it came from
    one (our aliases, a .gguf reference). None when unknown: llama.cpp then uses its default split."""
    from tunelab.models import ALIASES, gguf_source

    if model_name in ALIASES:
        source = gguf_source()
    elif model_name.endswith(".gguf") and Path(model_name).is_file():
        source = Path(model_name)
    else:
        return None
    try:
        # reads scalars only (milliseconds); GGUFReader parses all 49k tokens and merges (seconds)
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # older transformers
        from gguf import GGUFReader

        field_ = GGUFReader(str(source)).fields.get("tokenizer.ggml.pre")
        return str(field_.contents()) if field_ is not None else None
    value = read_gguf_metadata(str(source))[0].get("tokenizer.ggml.pre")
    return str(value) if value is not None else None


def _gguf_vocab(tokenizer: PreTrainedTokenizerBase, vocab_rows: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order, their llama.cpp types, and the BPE merges ("a b")."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model_spec = spec.get("model", {})
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model_spec.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ModelError("GGUF export supports byte-level BPE tokenizers (GPT-2 style) only")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_rows or max(by_id) >= vocab_rows:
        raise ModelError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_rows} embedding rows")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for index in range(vocab_rows):
        if index not in by_id:  # embedding rows past the tokenizer (padding to a multiple)
            tokens.append(f"[PAD{index}]")
            types.append(int(TokenType.UNUSED))
            continue
        tokens.append(by_id[index])
        if index in added:
            types.append(int(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges", [])]
    return tokens, types, merges


def _gguf_tensors(model: PreTrainedModel, float_type: str) -> list[tuple[str, Any]]:
    """(GGUF name, numpy array) for every weight: matrices in the float type, norms in float32
    (llama.cpp's convention), q/k rows permuted to llama.cpp's rotary layout."""
    import numpy as np
    from gguf import MODEL_ARCH, get_tensor_name_map

    config = model.config
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is None:
            raise ModelError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
        array = tensor.detach().float().cpu().numpy()
        if ".self_attn.q_proj." in hf_name + ".":
            array = _llama_permute(array, config.num_attention_heads)
        elif ".self_attn.k_proj." in hf_name + ".":
            array = _llama_permute(array, config.num_key_value_heads)
        if array.ndim > 1 and float_type == "f16":
            array = array.astype(np.float16)
        if not np.isfinite(array).all():
            raise ExportError(f"GGUF export: tensor {hf_name} is not finite in {float_type} (overflow?); try --gguf-type f32")
        out.append((f"{gguf_base}.{suffix}", np.ascontiguousarray(array)))
    return out


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export: rope scaling '{params['rope_type']}' is not supported")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ModelError("GGUF export: the model config has no rope_theta")
    return float(theta)


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, name: str,
               float_type: str = "f16", pre_tokenizer: str | None = None) -> int:
    """Write a llama-architecture GGUF with the tokenizer and chat template; returns the tensor count."""
    import gguf

    config = model.config
    if config.model_type not in ("llama", "mistral"):
        raise ModelError(f"GGUF export supports llama-architecture models; this one is '{config.model_type}'")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    tokens, types, merges = _gguf_vocab(tokenizer, vocab_rows)
    tensors = _gguf_tensors(model, float_type)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_rows)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)  # llama.cpp reads these when head_dim != hidden / heads
    writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if float_type == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    for tensor_name, array in tensors:
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(tensors)


def _verify_gguf(path: Path, merged: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, float_type: str,
                 probe: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """Load the file back through transformers' GGUF loader and compare with the merged model."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # The config is read once and passed on: each read parses the whole file again (seconds).
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                  dtype=torch.float32)
    loaded.eval()
    checked = _check_finite(loaded.state_dict().items(), str(path))
    got = _logits(loaded, probe)
    rounded = copy.deepcopy(merged)
    if float_type == "f16":
        with torch.no_grad():
            for parameter in rounded.parameters():
                if parameter.ndim > 1:
                    parameter.copy_(parameter.half().float())
    diff_rounded = float((got - _logits(rounded, probe)).abs().max())
    diff_fp32 = float((got - reference).abs().max())
    if not diff_rounded <= GGUF_MAX_ABS_DIFF_VS_ROUNDED:
        raise ExportError(
            f"GGUF loaded back differs from the merged model rounded to {float_type}: max abs logit diff "
            f"{diff_rounded:.3g} > {GGUF_MAX_ABS_DIFF_VS_ROUNDED:g}; nothing exported"
        )
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if gguf_tokenizer(PROBE_TEXT)["input_ids"] != tokenizer(PROBE_TEXT)["input_ids"]:
        raise ExportError("the GGUF tokenizer encodes the probe text differently from the run's tokenizer")
    if gguf_tokenizer.chat_template != tokenizer.chat_template:
        raise ExportError("the GGUF file's chat template differs from the run's")
    return {"tensors_checked_finite": checked, "max_abs_logit_diff_vs_rounded_model": diff_rounded,
            "tolerance_vs_rounded_model": GGUF_MAX_ABS_DIFF_VS_ROUNDED,
            "max_abs_logit_diff_vs_fp32_model": diff_fp32,
            "same_argmax_as_fp32_model": bool((got.argmax(-1) == reference.argmax(-1)).all()),
            "tokenizer_round_trip": True, "probe_tokens": int(probe.shape[1])}


# ----------------------------------------------------------------------------------------------
# the command


def export_run(run_dir: str | Path, out_dir: str | Path, merge: bool = False, fmt: str = "safetensors",
               force: bool = False, gguf_type: str = "f16", trust_remote_code: bool = False) -> ExportResult:
    """Export a run (see the module docstring). GGUF holds a whole model, so it is always merged; a
    full fine-tune has no adapter, so it is exported whole too."""
    from tunelab.runs import RunPaths, load_run_model, open_run

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    paths: RunPaths
    paths, recipe = open_run(run_dir, trust_remote_code)
    if not paths.adapter.is_dir() and not paths.model.is_dir():
        raise ModelError(f"{run_dir}: has neither adapter/ nor model/; has its training finished?")
    check_output_dir(out_dir, reads=[run_dir], manifest=MANIFEST, force=force)
    kind = "gguf" if fmt == "gguf" else ("adapter" if paths.adapter.is_dir() and not merge else "merged")
    if kind == "merged" and not merge:
        say(f"{run_dir} is a full fine-tune (model/): exporting the whole model")
    result = ExportResult(out_dir=out_dir, kind=kind)

    # the evaluation's chosen LoRA scale (eval/adapter_scale.json): load_run_model applies it before a merge
    scale = AdapterScale.from_file(paths.adapter_scale).scale if paths.adapter.is_dir() and paths.adapter_scale.is_file() else 1.0

    def build(tmp: Path) -> None:
        if kind == "adapter":
            from tunelab.models import load_tokenizer

            tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
            result.checks = _export_adapter(paths.adapter, tokenizer, tmp, scale)
        else:
            model, tokenizer = load_run_model(paths, recipe, device="cpu", dtype="float32")
            probe = _probe_ids(tokenizer)
            reference = _logits(model, probe)
            merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
            merged.eval()
            _check_finite(merged.state_dict().items(), "merged model")
            if kind == "merged":
                result.checks = _save_merged(merged, tokenizer, tmp, probe, reference)
            else:
                gguf_path = tmp / f"model-{gguf_type}.gguf"
                pre = _gguf_pre_tokenizer(recipe.model.name)
                if pre is None:
                    say("tokenizer.ggml.pre unknown for this base model; llama.cpp will use its default split")
                write_gguf(merged, tokenizer, gguf_path, recipe.name, gguf_type, pre)
                result.checks = _verify_gguf(gguf_path, merged, tokenizer, gguf_type, probe, reference)
        result.files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"kind": kind, "format": fmt, "run": str(run_dir), "run_name": recipe.name,
                    "base_model": recipe.model.name, "method": recipe.method, "adapter_scale": scale, "files": result.files,
                    "checks": result.checks}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    if out_dir.exists() and any(out_dir.iterdir()):
        say(f"replacing the earlier export in {out_dir} (--force)")
    replace_dir(build, out_dir)
    return result
