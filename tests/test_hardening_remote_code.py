"""A run folder never runs a model's code on its own say (nor loads pickle): its recipe.yaml asking for
model.trust_remote_code is named in a warning and ignored; only the command line turns it on, and
then tunelab says so."""

import json
import shutil

import pytest
import yaml

from test_export import make_fake_run

MODELING = '''
from pathlib import Path
from transformers import LlamaForCausalLM

Path({marker!r}).write_text("remote code ran")  # importing this module must not happen unasked


class Hijacked(LlamaForCausalLM):
    pass
'''


@pytest.fixture
def hostile_run(tmp_path, tiny_model_dir, monkeypatch):
    """A run whose base model folder ships code (auto_map) and whose recipe.yaml trusts it."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    marker = tmp_path / "remote-code-ran"
    model_dir = tmp_path / "shipped-model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_hijack.Hijacked"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_hijack.py").write_text(MODELING.format(marker=str(marker)))
    run = make_fake_run(tmp_path / "runs" / "x")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"].update(name=str(model_dir), trust_remote_code=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run, marker


def test_a_run_folders_recipe_cannot_turn_trust_remote_code_on(hostile_run, capsys):
    from tunelab.use.chat import load_for_use

    run, marker = hostile_run
    loaded = load_for_use(str(run), device="cpu", dtype="float32")
    err = capsys.readouterr().err
    assert not marker.exists()
    assert loaded.recipe.model.trust_remote_code is False
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert f"warning: {run / 'recipe.yaml'} sets model.trust_remote_code: true; ignored" in err


def test_the_command_line_turns_it_on_and_it_is_announced(hostile_run, capsys):
    from tunelab.runs import load_tuned_model

    run, marker = hostile_run
    model, _ = load_tuned_model(run, device="cpu", dtype="float32", trust_remote_code=True)
    err = capsys.readouterr().err
    assert marker.exists() and "trust_remote_code is on" in err and "ignored" not in err


def test_an_adapter_saved_as_pickle_is_one_line_error_and_never_loaded(tmp_path, tiny_model_dir):
    from tunelab.errors import ModelError
    from tunelab.runs import load_tuned_model

    run = make_fake_run(tmp_path / "runs" / "x")
    adapter = run / "adapter"
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(ModelError, match=r"adapter_model.safetensors: not found .*adapter_model.bin.*never pickle") as err:
        load_tuned_model(run, device="cpu", dtype="float32")
    assert "\n" not in str(err.value)
