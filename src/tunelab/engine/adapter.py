"""Start training from an existing PEFT adapter (recipe key `model.adapter`), refusing one that does not fit.

Reads an adapter folder as `tunelab train` writes it (adapter/: adapter_config.json and
adapter_model.safetensors); writes nothing. train/setup.py calls `load_adapter_weights` on the
freshly wrapped PEFT model, so the LoRA weights to train start as the adapter's (`tunelab update`).
An adapter whose settings or tensor shapes differ from the model and recipe is refused with one
line naming the first difference: weights trained for one base model mean nothing on another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError
from tunelab.runs import RunPaths

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tunelab.config import Recipe

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors by their saved names) of a PEFT adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() and (RunPaths(folder).adapter / ADAPTER_CONFIG).is_file():
        folder = RunPaths(folder).adapter  # a run folder (runs/NAME): its adapter
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ConfigError(f"model.adapter: {path} not found (expected a PEFT adapter folder such as runs/NAME/adapter)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"model.adapter: {config_path} is not valid JSON ({err})") from None
    return config if isinstance(config, dict) else {}, load_file(str(weights_path))


def adapter_mismatch(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], recipe: Recipe) -> str | None:
    """The first way the adapter does not fit the PEFT-wrapped model built from `recipe`; None when it fits."""
    from peft import get_peft_model_state_dict

    for key, wanted in (("r", recipe.lora.rank), ("lora_alpha", recipe.lora.alpha), ("use_dora", recipe.method == "dora")):
        have = config.get(key)
        if have is not None and have != wanted:
            return f"its {key} is {have!r} but the recipe's is {wanted!r}"
    expected = get_peft_model_state_dict(model)
    unexpected, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unexpected:
        return f"{len(unexpected)} adapter tensor(s) have no place in the model, e.g. {unexpected[0]}"
    if missing:
        return f"the model has {len(missing)} LoRA tensor(s) the adapter lacks, e.g. {missing[0]} (other lora.targets?)"
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            return f"{name} is {list(tensor.shape)} in the adapter but {list(expected[name].shape)} in the model"
    return None


def load_adapter_weights(model: nn.Module, folder: str | Path, recipe: Recipe) -> None:
    """Copy the adapter's weights into the (trainable) LoRA weights of `model`, or refuse in one line."""
    from peft import set_peft_model_state_dict

    config, tensors = read_adapter(folder)
    problem = adapter_mismatch(model, config, tensors, recipe)
    if problem is not None:
        raise ConfigError(f"model.adapter: {folder} does not fit {recipe.model.name}: {problem}")
    set_peft_model_state_dict(model, tensors)
